"""Where the CUDA transports run their work: the device, its streams and DeepEP's stream protocol.

``CudaContext`` is torch's CUDA device: a communication stream the Buffer owns, torch's current
stream, ``CallStreams`` per call. The tests' CPU execution of the CUDA sources (tests/cuda_cpu.py)
provides the same interface over the emulated device, so the transports run unchanged there.
"""

import contextlib
from typing import Iterator, Optional, Sequence

import torch

from ..event import EventOverlap

Tensor = torch.Tensor


class CallStreams:
    """DeepEP's stream protocol for one call (deep_ep.cpp, Buffer::intranode_dispatch):

    - the communication stream first waits for ``previous_event``, else for the current stream;
    - kernels, collectives and temporaries run on the communication stream;
    - outputs are allocated on the current stream, or on the communication stream with
      ``allocate_on_comm_stream`` (DeepEP allows that only with previous_event and async_finish);
    - ``finish``: with async_finish, an event recorded on the communication stream is returned and
      every tensor in flight is ``record_stream``-ed on it (and on the current stream when outputs
      were allocated on the communication stream) so the caching allocator does not hand its memory
      out before the communication is done; otherwise the current stream waits for the
      communication stream.
    """

    def __init__(self, comm: "torch.cuda.Stream", previous_event: Optional[EventOverlap],
                 allocate_on_comm_stream: bool) -> None:
        self.comm = comm
        self.compute = torch.cuda.current_stream(comm.device)
        self.allocate_on_comm_stream = allocate_on_comm_stream
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(self.compute)

    def empty(self, *shape: int, dtype: torch.dtype) -> Tensor:
        """An output tensor, allocated on the stream that owns the call's outputs."""
        with torch.cuda.stream(self.comm if self.allocate_on_comm_stream else self.compute):
            return torch.empty(*shape, dtype=dtype, device=self.comm.device)

    def finish(self, async_finish: bool, in_flight: Sequence[Optional[Tensor]]) -> EventOverlap:
        """Ends the call: returns its event (async) or makes the current stream wait (sync)."""
        if not async_finish:
            self.compute.wait_stream(self.comm)
            return EventOverlap()
        for tensor in in_flight:
            if tensor is not None:
                tensor.record_stream(self.comm)
                if self.allocate_on_comm_stream:
                    tensor.record_stream(self.compute)
        event = torch.cuda.Event()
        event.record(self.comm)
        return EventOverlap(event)


class CudaContext:
    """A CUDA device as the transports use it (torch's streams)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.device_index = device.index
        self.comm_stream = torch.cuda.Stream(device)

    def current_stream(self) -> int:
        """The handle (cudaStream_t) of the stream that kernels launched now run on."""
        return torch.cuda.current_stream(self.device).cuda_stream

    def zeros(self, size: int, dtype: torch.dtype) -> Tensor:
        """A zeroed device tensor owned by the communication stream, where the kernels that write it run."""
        with torch.cuda.stream(self.comm_stream):
            return torch.zeros(size, dtype=dtype, device=self.device)

    def hold(self, tensors: Sequence[Optional[Tensor]]) -> None:
        """Tensors a launch uses: nothing to do, torch's caching allocator reuses memory in stream order."""

    @contextlib.contextmanager
    def call(self, previous_event: Optional[EventOverlap], allocate_on_comm_stream: bool) -> Iterator[CallStreams]:
        """One call of a transport, with the communication stream current."""
        streams = CallStreams(self.comm_stream, previous_event, allocate_on_comm_stream)
        try:
            with torch.cuda.stream(self.comm_stream):
                yield streams
        except BaseException:
            # Inputs may still be read on the communication stream: order their reuse after it.
            streams.compute.wait_stream(self.comm_stream)
            raise
