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

__version__ = "0.1.0"

__all__ = ["Buffer", "Config", "EventOverlap", "DispatchHandle", "reference", "__version__"]
