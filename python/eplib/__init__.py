"""eplib: expert-parallel dispatch and combine for Mixture-of-Experts models.

``eplib.Buffer`` matches DeepEP V1's ``deep_ep.Buffer`` call for call; ``eplib.reference`` is an
independent plain-torch implementation of the same contract (the test oracle and benchmark
baseline).
"""

from . import _C, reference
from .buffer import Buffer
from .config import Config
from .event import EventOverlap
from .handle import DispatchHandle
from .permute import PermuteHandle, permute_by_expert, unpermute_by_expert

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchHandle", "PermuteHandle", "permute_by_expert", "reference",
           "unpermute_by_expert", "__version__"]
