"""DeepEP's ``deep_ep.buffer``: the Buffer, with the names that module imports."""

from ..buffer import Buffer
from ..config import Config
from ..event import EventHandle, EventOverlap

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap"]
