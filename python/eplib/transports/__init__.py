"""Transports move the packed rows between ranks; the Buffer picks one per call.

``cpu``: CPU tensors over gloo. ``nccl``: CUDA tensors over NCCL (or gloo, staged through host memory).
"""

from .cpu import CpuTransport
from .nccl import NcclTransport

__all__ = ["CpuTransport", "NcclTransport"]
