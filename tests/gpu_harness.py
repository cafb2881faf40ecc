"""Helpers for the GPU tests: run eplib.Buffer on CUDA tensors inside the spawned rank processes
of dist_harness.RankPool, and compare with CPU implementations on the same inputs.

Backends of the nccl transport:
- "nccl": a real NCCL group over the pool's ranks, made once per process by ``nccl_group()``
  (R=1: NCCL before 2.30 refuses two ranks on one GPU);
- "gloo": the pool's own gloo group; R processes share cuda:0 and the transport stages its
  collectives through host memory;
- "emulated": CPU tensors through the transport with the CUDA kernels emulated on the CPU
  (tests/nccl_emulation.py), so that its logic is tested on machines without a GPU.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dist_harness import _compare_sequence, describe_diff, make_buffer, same

DEVICE = torch.device("cuda", 0)

_NCCL_GROUPS: Dict[int, dist.ProcessGroup] = {}


def gpu_usable() -> bool:
    """True when CUDA tensors can go through eplib here (torch sees a GPU and eplib has CUDA kernels)."""
    import eplib

    return torch.cuda.is_available() and eplib._C.built_with_cuda() and eplib._C.cuda_available()


def nccl_group(world_group: dist.ProcessGroup) -> dist.ProcessGroup:
    """An NCCL group over the same ranks as the pool's gloo group, created once per process."""
    size = world_group.size()
    if size not in _NCCL_GROUPS:
        torch.cuda.set_device(DEVICE)
        _NCCL_GROUPS[size] = dist.new_group(list(range(size)), backend="nccl")
    return _NCCL_GROUPS[size]


def group_for(backend: str, world_group: dist.ProcessGroup) -> dist.ProcessGroup:
    """backend "nccl": the process's NCCL group; "gloo": the pool's own group (staged transport)."""
    torch.cuda.set_device(DEVICE)
    return nccl_group(world_group) if backend == "nccl" else world_group


def eplib_buffer(backend: str, world_group: dist.ProcessGroup, **kwargs: Any) -> Tuple[Any, torch.device]:
    """(an eplib.Buffer whose calls go through the nccl transport over ``backend``, its device)."""
    if backend == "emulated":
        from nccl_emulation import emulated_buffer

        return emulated_buffer(world_group, **kwargs), torch.device("cpu")
    import eplib

    return eplib.Buffer(group_for(backend, world_group), **kwargs), DEVICE


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples) moved to device; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


def to_host(value: Any) -> Any:
    """Tensors (also inside tuples and lists) copied to the CPU; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, (tuple, list)) and not isinstance(value, HostHandle):
        return type(value)(to_host(v) for v in value)
    return value


class HostHandle(tuple):
    """A CUDA dispatch handle as the CPU test code sees it: its entries copied to the CPU (so that
    ``handle[0]`` compares with a CPU implementation's), the real handle in ``device_handle``."""

    device_handle: Any

    def __new__(cls, handle) -> "HostHandle":
        host = super().__new__(cls, (to_host(v) for v in handle))
        host.device_handle = handle
        return host


class CudaBuffer:
    """eplib.Buffer on the nccl transport behind the CPU interface of the dist_harness sequences:
    inputs are moved to its device, outputs back to the CPU, handles wrapped in HostHandle."""

    def __init__(self, backend: str, world_group: dist.ProcessGroup) -> None:
        self.buffer, self.device = eplib_buffer(backend, world_group)

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, **kwargs: Any):
        return to_host(self.buffer.get_dispatch_layout(to_device(topk_idx, self.device), num_experts, **kwargs))

    def dispatch(self, x, handle: Optional[HostHandle] = None, **kwargs: Any):
        kwargs = {k: to_device(v, self.device) for k, v in kwargs.items()}
        device_handle = handle.device_handle if handle is not None else None
        out = self.buffer.dispatch(to_device(x, self.device), handle=device_handle, **kwargs)
        new_handle = HostHandle(out[4]) if out[4] is not None else None
        return to_host(out[:4]) + (new_handle, out[5])

    def combine(self, x: torch.Tensor, handle: HostHandle, topk_weights=None, bias=None, **kwargs: Any):
        out = self.buffer.combine(to_device(x, self.device), handle.device_handle,
                                  topk_weights=to_device(topk_weights, self.device), bias=to_device(bias, self.device),
                                  **kwargs)
        return to_host(out[:2]) + (out[2],)


def job_gpu_compare(rank: int, R: int, group, backend: str, case: dict, against: str) -> List[str]:
    """The dist_harness compare sequence on the nccl transport (over `backend`) and on a CPU
    implementation (`against`: "ref" = eplib.reference.ReferenceBuffer, "eplib" = the cpu transport),
    every output torch.equal. Returns mismatch descriptions (empty = pass)."""
    want = _compare_sequence(make_buffer(against, group), rank, R, case)
    got = _compare_sequence(CudaBuffer(backend, group), rank, R, case)
    return [f"rank {rank} cuda/{backend} vs {against}: " + describe_diff(k, got[k], want[k])
            for k in want if not same(got[k], want[k])]
