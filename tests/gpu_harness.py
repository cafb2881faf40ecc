"""Helpers for the GPU tests: run eplib.Buffer on CUDA tensors inside the spawned rank processes
of dist_harness.RankPool, and compare with CPU implementations on the same inputs.

Backends (``eplib_buffer``, ``CudaBuffer``):
- "nccl": the nccl transport over a real NCCL group of the pool's ranks, made once per process by
  ``nccl_group()`` (R=1: NCCL before 2.30 refuses two ranks on one GPU);
- "gloo": the nccl transport over the pool's own gloo group; R processes share cuda:0 and the
  transport stages its collectives through host memory;
- "ipc": the ipc (CUDA peer memory) transport, ``transport="ipc"`` with ``IPC_NVL_BYTES`` of peer
  buffer; the pool's gloo group carries only the handle exchange at construction, R processes
  share cuda:0 and map each other's buffers;
- "cuda_cpu-nccl": CPU tensors through the nccl transport, its CUDA kernels run by the CPU execution of
  the CUDA sources (tests/cuda_cpu.py; eplib built with EPLIB_CUDA_CPU=1);
- "cuda_cpu-ipc": CPU tensors through the ipc transport, its ipc buffers and kernels run by the CPU
  execution (memory shared between the rank processes), ``cuda_cpu.IPC_NVL_BYTES`` of buffer.

Also shared by the GPU test modules: deterministic CUDA inputs (``make_inputs``), a normal-mode
dispatch with its layout (``dispatch_with_layout``), per-step outcomes (``attempt``), the CUDA-graph
check (``cuda_graph_check``), and for the ipc transport's timeout tests (on a GPU and on the CPU execution) the
refusal after a timeout (``REFUSED``) and the check of a timeout's report (``check_timeout_report``).
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from dist_harness import (_compare_sequence, describe_diff, make_buffer, make_random_rows, make_topk_idx,
                          make_topk_weights, outcome, same)

DEVICE = torch.device("cuda", 0)

#: num_nvl_bytes of the "ipc" backend's Buffers. The test cases move far less (their largest
#: exchange, num_worst_tokens slot layouts included, is under 1 MiB per rank); 4 ranks on one GPU
#: then hold 256 MiB of peer buffers in all.
IPC_NVL_BYTES = 64 << 20

BACKENDS = ("nccl", "gloo", "ipc", "cuda_cpu-nccl", "cuda_cpu-ipc")

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
    """backend "nccl": the process's NCCL group; "gloo" (staged nccl transport) and "ipc" (handle
    exchange): the pool's own gloo group. Makes cuda:0 the current device."""
    if backend not in BACKENDS or backend.startswith("cuda_cpu"):
        raise ValueError(f"backend: expected one of {BACKENDS[:3]}, got {backend!r}")
    torch.cuda.set_device(DEVICE)
    return nccl_group(world_group) if backend == "nccl" else world_group


def eplib_buffer(backend: str, world_group: dist.ProcessGroup, **kwargs: Any) -> Tuple[Any, torch.device]:
    """(an eplib.Buffer whose CUDA calls go through ``backend``, its device).

    "nccl" / "gloo": the nccl transport (``transport="auto"`` unless kwargs say otherwise); "ipc":
    ``transport="ipc"`` with ``num_nvl_bytes=IPC_NVL_BYTES`` unless kwargs give another size (a
    collective: every rank of the pool must make it); "cuda_cpu-nccl" / "cuda_cpu-ipc": CPU tensors through
    the transport and its kernels on the CPU execution of the CUDA sources (ipc: a collective too)."""
    if backend.startswith("cuda_cpu-"):
        from cuda_cpu import cuda_cpu_buffer

        return cuda_cpu_buffer(world_group, backend[len("cuda_cpu-"):], **kwargs), torch.device("cpu")
    import eplib

    if backend == "ipc":
        kwargs = {"num_nvl_bytes": IPC_NVL_BYTES, **kwargs, "transport": "ipc"}
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
    """eplib.Buffer on a CUDA transport (``backend`` as in ``eplib_buffer``) behind the CPU interface
    of the dist_harness sequences: inputs are moved to its device, outputs back to the CPU, handles
    wrapped in HostHandle."""

    def __init__(self, backend: str, world_group: dist.ProcessGroup, **kwargs: Any) -> None:
        self.buffer, self.device = eplib_buffer(backend, world_group, **kwargs)

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


def job_gpu_compare(rank: int, R: int, group, backend: str, case: dict, against: Sequence[str] = ("ref",)
                    ) -> List[str]:
    """The dist_harness compare sequence on a CUDA transport (`backend`, see eplib_buffer), run once, and
    on each CPU implementation of `against` ("ref" = eplib.reference.ReferenceBuffer, "eplib" = the cpu
    transport; one name or several), every output torch.equal to each. Returns mismatch descriptions,
    each naming the implementation it is against (empty = pass)."""
    against = (against,) if isinstance(against, str) else tuple(against)
    if not against:
        raise ValueError("job_gpu_compare: against names no CPU implementation")
    wants = {impl: _compare_sequence(make_buffer(impl, group), rank, R, case) for impl in against}
    got = _compare_sequence(CudaBuffer(backend, group), rank, R, case)
    return [f"rank {rank} cuda/{backend} vs {impl}: " + describe_diff(k, got[k], want[k])
            for impl, want in wants.items() for k in want if not same(got[k], want[k])]


# ------------------------------------------------------------------------------------ shared GPU helpers


def make_inputs(rank: int, seed: int, T: int, H: int, K: int, E: int, dtype: str = "bf16", skew: str = "uniform",
                device: torch.device = DEVICE):
    """(x, topk_idx, topk_weights) on device for `rank`, deterministic in seed (random, non-integer x)."""
    idx = make_topk_idx(seed, rank, T, K, E, skew)
    return (make_random_rows(seed, rank, T, H, dtype).to(device), idx.to(device),
            make_topk_weights(seed, rank, T, K).to(device))


def dispatch_with_layout(buf, x, idx, w, E: int, **kwargs: Any):
    """get_dispatch_layout, then a dispatch with its outputs (normal mode unless kwargs say otherwise)."""
    lay = buf.get_dispatch_layout(idx, E)
    return buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                        topk_idx=idx, topk_weights=w, **kwargs)


#: What every call of an ipc Buffer answers after one of its waits timed out: at once, this.
REFUSED = re.compile(r"RuntimeError: .*create a new\b.*\bBuffer", re.S)


def check_timeout_report(step: str, result, phase: Union[str, re.Pattern], max_s: float, min_s: float = 0.0,
                         peer: int = 1) -> None:
    """result = (outcome, seconds) of an ipc call whose wait for rank `peer` timed out: a RuntimeError that
    names the phase (`phase`, a regular expression searched in the message; its flags, if compiled) and
    the peer, after min_s to max_s seconds."""
    text, elapsed = result
    assert text.startswith("RuntimeError: "), f"{step}: expected RuntimeError, got {text!r}"
    pattern = re.compile(phase) if isinstance(phase, str) else phase
    assert pattern.search(text), f"{step}: the message does not name the phase ({pattern.pattern}): {text!r}"
    assert re.search(rf"\brank {peer}\b", text), \
        f"{step}: the message does not name the peer (rank {peer}): {text!r}"
    assert min_s <= elapsed <= max_s, f"{step}: took {elapsed:.2f} s, expected {min_s}-{max_s} s: {text!r}"


def attempt(results: dict, name: str, fn) -> None:
    """results[name] = dist_harness.outcome(fn): "ok" or "ExceptionType: message"."""
    results[name] = outcome(fn)


def cuda_graph_check(buf, rank: int, R: int, group: dist.ProcessGroup, *, eager_between_replays: bool = False
                     ) -> List[str]:
    """Captures layout + num_worst_tokens dispatch + cached dispatch + combine on `buf` (CUDA) in a
    CUDA graph, replays it on new inputs and compares every output with eplib.reference on the CPU
    (over `group`, the pool's gloo group). Returns mismatch descriptions (empty = pass).

    With ``eager_between_replays`` the same sequence also runs uncaptured between two replays (and is
    checked too): transports that count rounds on the device must keep graph and eager calls in step.
    Ends with a normal-mode dispatch, whose host sync would raise if the captured work had been flagged.
    """
    from eplib.reference import ReferenceBuffer

    T, H, K, E = 48, 256, 4, 8
    W = T * R  # a rank receives at most T tokens from each rank
    static_x, static_idx, static_w = make_inputs(rank, 10, T, H, K, E)
    static_x2 = torch.empty_like(static_x)

    def step(b, x, x2, idx, w):
        lay = b.get_dispatch_layout(idx, E)
        recv_x, recv_idx, recv_w, num_list, handle, _ = b.dispatch(
            x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
            topk_weights=w, num_worst_tokens=W)
        cached = b.dispatch(x2, handle=handle)[0]
        combined_x, combined_w, _ = b.combine(recv_x, handle, topk_weights=recv_w)
        return dict(layout=lay[:4], recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w, num_list=num_list,
                    rank_prefix_matrix=handle[0], cached=cached, combined_x=combined_x, combined_w=combined_w)

    # Warm up on a side stream (torch's rule before capture); this also creates NCCL communicators.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(buf, static_x, static_x2, static_idx, static_w)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: NCCL's watchdog thread may query events while this thread captures.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_out = step(buf, static_x, static_x2, static_idx, static_w)
        # A normal-mode dispatch reads counts on the host: refused before it touches the capture.
        lay = static_out["layout"]
        refused = outcome(lambda: buf.dispatch(static_x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                                               num_tokens_per_expert=lay[2], topk_idx=static_idx,
                                               topk_weights=static_w))

    errs: List[str] = []
    if not refused.startswith("ValueError: num_worst_tokens"):
        errs.append(f"a normal-mode dispatch during capture: expected ValueError naming num_worst_tokens, "
                    f"got {refused!r}")
    ref = ReferenceBuffer(group)

    def compare(what: str, got_out: dict, want_out: dict) -> None:
        for key, value in want_out.items():
            got = to_host(got_out[key])
            if not same(got, value):
                errs.append(f"{what}: " + describe_diff(key, got, value))

    def host_inputs(seed: int):
        x, idx, w = (t.cpu() for t in make_inputs(rank, seed, T, H, K, E,
                                                  skew="masked" if seed % 2 == 0 else "uniform"))
        return x, make_random_rows(seed + 100, rank, T, H, "bf16"), idx, w

    for seed in (11, 12):
        x, x2, idx, w = host_inputs(seed)
        for static, value in ((static_x, x), (static_x2, x2), (static_idx, idx), (static_w, w)):
            static.copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        compare(f"replay seed {seed}", static_out, step(ref, x, x2, idx, w))
        if eager_between_replays and seed == 11:
            x, x2, idx, w = host_inputs(13)
            eager = step(buf, *(t.to(DEVICE) for t in (x, x2, idx, w)))
            torch.cuda.synchronize()
            compare("eager call between replays", eager, step(ref, x, x2, idx, w))
    # Nothing in the captured work was flagged: the next normal-mode dispatch goes through.
    dispatch_with_layout(buf, static_x, static_idx, static_w, E)
    torch.cuda.synchronize()
    return errs
