"""Transports move the packed rows between ranks; the Buffer picks one per call.

``cpu``: CPU tensors over gloo. ``nccl``: CUDA tensors over NCCL (or gloo, staged through host memory).
``ipc``: CUDA tensors of one node through peer GPU memory (CUDA IPC).
"""

from .cpu import CpuTransport
from .cuda import CudaTransport
from .ipc import IpcTransport, IpcUnavailable
from .nccl import NcclTransport

__all__ = ["CpuTransport", "CudaTransport", "IpcTransport", "NcclTransport", "IpcUnavailable"]
