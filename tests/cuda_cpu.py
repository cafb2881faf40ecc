"""The tests' side of the CPU execution of the CUDA sources (eplib built with EPLIB_CUDA_CPU=1; the
executor and runtime are csrc/cuda_cpu): the real nccl and ipc transports, with their real CUDA
kernels, on CPU tensors.

``CpuExecutionContext`` stands in for ``eplib.transports.streams.CudaContext``: kernels launch on an
emulated stream of the emulated device, the host runs ahead of them until it synchronizes. Torch ops
of the transports run on the host, not on a stream, so inside a call every torch op first waits for
the emulated device (``_DeviceOrdered``): that keeps the order a GPU stream would give them relative to
the kernels. Tensors a launch uses are held until the next such wait, as torch's caching allocator
keeps memory in use by a stream. A call ends with a wait for the device (outputs are then final, as
after a synchronous DeepEP call; asynchronous overlap is a GPU matter, tested there).

``cuda_cpu_buffer(group, transport)`` is an ``eplib.Buffer`` whose CPU calls go through such a
transport ("nccl": NcclTransport over the gloo group's staging path; "ipc": IpcTransport with real
``_C.IpcBuffer``s, which map each other's memory between the rank processes).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from eplib import _C
from eplib.event import EventOverlap

Tensor = torch.Tensor

#: True when eplib was built as the CPU execution of its CUDA sources.
CUDA_CPU = _C.cuda_cpu_execution()

#: num_nvl_bytes of the ipc Buffers here (memfd pages: only touched pages cost memory).
IPC_NVL_BYTES = 4 << 20


class _DeviceOrdered(TorchDispatchMode):
    """Every torch op first waits for the emulated device, as an op on the kernels' stream would."""

    def __init__(self, context: "CpuExecutionContext") -> None:
        super().__init__()
        self.context = context

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.context.synchronize()
        return func(*args, **(kwargs or {}))


class HostCall:
    """CallStreams for the CPU execution: outputs on the CPU; the call ends once the device is done."""

    def __init__(self, context: "CpuExecutionContext") -> None:
        self.context = context

    @staticmethod
    def empty(*shape: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(*shape, dtype=dtype)

    def finish(self, async_finish: bool, in_flight: Sequence[Optional[Tensor]]) -> EventOverlap:
        self.context.synchronize()
        return EventOverlap()


class CpuExecutionContext:
    """streams.CudaContext's interface on the emulated device (see the module docstring)."""

    device_index = 0

    def __init__(self) -> None:
        self.comm_stream = _C.cuda_cpu_stream_create()
        self._held = []

    def current_stream(self) -> int:
        return self.comm_stream

    @staticmethod
    def zeros(size: int, dtype: torch.dtype) -> Tensor:
        return torch.zeros(size, dtype=dtype)

    def hold(self, tensors: Sequence[Optional[Tensor]]) -> None:
        self._held.extend(t for t in tensors if t is not None)

    def synchronize(self) -> None:
        _C.cuda_cpu_device_synchronize()
        self._held.clear()

    @contextlib.contextmanager
    def call(self, previous_event, allocate_on_comm_stream: bool) -> Iterator[HostCall]:
        try:
            with _DeviceOrdered(self):
                yield HostCall(self)
        finally:
            self.synchronize()


def cuda_cpu_transport(group: dist.ProcessGroup, transport: str, num_nvl_bytes: int = IPC_NVL_BYTES):
    """The real NcclTransport ("nccl") or IpcTransport ("ipc", a collective) on the emulated device."""
    from eplib.transports.ipc import IpcTransport
    from eplib.transports.nccl import NcclTransport

    if transport == "nccl":
        return NcclTransport(group, torch.device("cpu"), context=CpuExecutionContext())
    if transport == "ipc":
        return IpcTransport(group, torch.device("cpu"), num_nvl_bytes, context=CpuExecutionContext())
    raise ValueError(f"transport: expected 'nccl' or 'ipc', got {transport!r}")


def cuda_cpu_buffer(group: dist.ProcessGroup, transport: str, **kwargs):
    """An eplib.Buffer (its argument checks included) whose CPU calls go through cuda_cpu_transport;
    with "ipc", ``Buffer.destroy()`` (explicitly_destroy=True) reaches IpcTransport.destroy (the barrier).
    kwargs: Buffer's, num_nvl_bytes included (ipc: IPC_NVL_BYTES unless given)."""
    from eplib.buffer import Buffer  # not eplib.Buffer: tests replace that name with this function

    if transport == "ipc":
        kwargs = {"num_nvl_bytes": IPC_NVL_BYTES, **kwargs}
    buffer = Buffer(group, **{**kwargs, "transport": "cpu"})
    buffer._cpu = cuda_cpu_transport(group, transport, kwargs.get("num_nvl_bytes", IPC_NVL_BYTES))
    if transport == "ipc":
        buffer._cuda = buffer._cpu
    return buffer
