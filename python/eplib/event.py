"""DeepEP-compatible events for overlapping communication with computation."""

from typing import Iterable, Optional, Union

import torch


class EventHandle:
    """DeepEP's ``deep_ep.utils.EventHandle``: made, it records an event on the current CUDA stream.

    ``event`` is that ``torch.cuda.Event``, or None where CUDA is not in use (no GPU, or CUDA not
    initialized in this process: nothing to wait for then), where ``current_stream_wait()`` is a no-op.
    """

    def __init__(self) -> None:
        self.event: Optional["torch.cuda.Event"] = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event (no-op without one)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)


class EventOverlap:
    """An event recorded after a communication call, plus the tensors it keeps alive.

    On CUDA, calls with ``async_finish=True`` return one whose ``event`` is a ``torch.cuda.Event``
    recorded on the Buffer's communication stream; ``current_stream_wait()`` makes the current
    stream wait for it. Calls without async_finish (the current stream already waits) and all
    calls on CPU (finished when they return) give ``event = None``: waiting is then a no-op. As a
    context manager (``with event: ...``) it waits on exit, like DeepEP's, so the body overlaps
    with the communication. It may also be made from an ``EventHandle``, as DeepEP code does
    (``EventOverlap(EventHandle())``); ``event`` is then the handle's CUDA event.
    """

    def __init__(self, event: Union["torch.cuda.Event", EventHandle, None] = None,
                 extra_tensors: Optional[Iterable[torch.Tensor]] = None) -> None:
        self.event = event.event if isinstance(event, EventHandle) else event
        # Held only so that tensors in flight are not freed before the event completes.
        self.extra_tensors = tuple(extra_tensors) if extra_tensors is not None else None

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event (no-op without one)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self.current_stream_wait()
