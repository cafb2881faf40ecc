"""DeepEP's ``deep_ep.utils``: the event classes DeepEP code imports from it."""

from ..event import EventHandle, EventOverlap

__all__ = ["EventHandle", "EventOverlap"]
