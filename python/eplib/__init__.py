"""eplib: expert-parallel dispatch and combine for Mixture-of-Experts models.

``eplib.Buffer`` matches DeepEP V1's ``deep_ep.Buffer`` call for call; ``eplib.reference`` is an
independent plain-torch implementation of the same contract (the test oracle and benchmark
baseline); ``eplib.ops`` makes dispatch and combine differentiable; ``eplib.MoE`` (with
``eplib.moe.Router`` and ``eplib.moe.Balancer``) is a ready MoE layer built on them.
"""

from . import _C, ops, reference, timing
from .buffer import Buffer
from .collectives import CollectiveError
from .config import Config
from .event import EventOverlap
from .exchange import PeerInputError, abort
from .handle import DispatchHandle
from .moe import MoE
from .permute import PermuteHandle, permute_by_expert, unpermute_by_expert

__version__ = "0.1.0"

__all__ = ["Buffer", "CollectiveError", "Config", "EventOverlap", "DispatchHandle", "MoE", "PeerInputError",
           "PermuteHandle", "abort", "ops", "permute_by_expert", "reference", "unpermute_by_expert", "__version__"]
