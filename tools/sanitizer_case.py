"""A small case of every eplib CUDA kernel, one rank, for compute-sanitizer (tools/gpu_check.sh).

Runs layout, send positions, dispatch pack/unpack (normal and num_worst_tokens slot layouts, fp32,
bf16 and the FP8 tuple), cached dispatch, combine pack/reduce (weights, bias), the expert
permutation and its inverse, and bad input (expert ids out of range, too small num_worst_tokens)
that the kernels must flag without touching memory out of bounds. Results are compared with the
CPU implementations (eplib.reference, eplib.permute on CPU tensors).

All of it runs on the nccl transport and on the ipc transport. The one-rank group is gloo, so the
nccl transport stages its collectives through host memory and no NCCL kernel runs under the
sanitizer; the ipc transport's one rank sends every row through its own peer buffer. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1: torch's
caching allocator otherwise packs tensors into shared segments, where an out-of-bounds access
lands in a neighbour and memcheck cannot see it.

Exit status: 0 when every check passed, 1 on a mismatch, 2 without a usable GPU.
"""

import os
import sys
import tempfile
from typing import List

import torch
import torch.distributed as dist

import eplib
from eplib.reference import ReferenceBuffer

DEVICE = torch.device("cuda", 0)
T, K, E = 13, 3, 4  # one rank owns all 4 experts


def _inputs(seed: int, dtype: str, hidden: int):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, E, (T, K), generator=g)
    w = torch.rand(T, K, generator=g) + 0.1
    if dtype == "fp8":
        values = (torch.randn(T, hidden, generator=g) * 4).to(torch.float8_e4m3fn)
        x = (values, torch.rand(T, hidden // 128, generator=g))
    else:
        x = torch.randn(T, hidden, generator=g).to(getattr(torch, dtype))
    return x, idx, w


def _cuda(value):
    return tuple(v.to(DEVICE) for v in value) if isinstance(value, tuple) else value.to(DEVICE)


def _cpu(value):
    if isinstance(value, (tuple, list)):
        return type(value)(_cpu(v) for v in value)
    return value.cpu() if isinstance(value, torch.Tensor) else value


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    if isinstance(a, torch.Tensor):
        if a.dtype == torch.float8_e4m3fn:
            a, b = a.view(torch.uint8), b.view(torch.uint8)
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _pipeline(buf, x, idx, w, num_worst: int):
    """layout, dispatch, cached dispatch, combine with weights and a bias -> outputs."""
    lay = buf.get_dispatch_layout(idx, E)
    recv = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                        topk_idx=idx, topk_weights=w, num_worst_tokens=num_worst)
    values = x[0] if isinstance(x, tuple) else x
    x2 = values.float().to(torch.bfloat16) if isinstance(x, tuple) else values * 2
    cached = buf.dispatch(x2, handle=recv[4])[0]
    recv_values = recv[0][0] if isinstance(recv[0], tuple) else recv[0]
    y = recv_values.float().to(x2.dtype) + 1
    bias = torch.ones_like(x2)
    combined = buf.combine(y, recv[4], topk_weights=recv[2], bias=bias)
    return dict(layout=lay[:4], recv=recv[:4], cached=cached, combined=combined[:2])


def main() -> int:
    if not (torch.cuda.is_available() and eplib._C.cuda_available()):
        print("sanitizer_case: no usable CUDA device or eplib built without CUDA")
        return 2
    torch.cuda.set_device(DEVICE)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            failures = run_cases(dist.group.WORLD)
        finally:
            dist.destroy_process_group()
    for failure in failures:
        print("MISMATCH", failure)
    print(f"sanitizer_case: {'FAILED' if failures else 'passed'} ({len(failures)} mismatches)")
    return 1 if failures else 0


def run_cases(group) -> List[str]:
    failures: List[str] = []
    ref = ReferenceBuffer(group)
    # The nccl transport (staged through gloo) and the ipc one (one rank: every row goes through its
    # own peer buffer, inside the round hand-shake), sized for the largest row below.
    nvl_bytes = eplib.Buffer.get_nvl_buffer_size_hint(T, 128 * 4, 1, num_topk=K)
    buffers = {"nccl": eplib.Buffer(group),
               "ipc": eplib.Buffer(group, num_nvl_bytes=nvl_bytes, transport="ipc")}
    for name, buf in buffers.items():
        for dtype, hidden in (("float32", 40), ("bfloat16", 37), ("fp8", 128)):
            for num_worst in (0, T):
                x, idx, w = _inputs(1, dtype, hidden)
                outputs = _pipeline(buf, _cuda(x), _cuda(idx), _cuda(w), num_worst)
                got = {key: _cpu(value) for key, value in outputs.items()}
                want = _pipeline(ref, x, idx, w, num_worst)
                failures += [f"{name} {dtype} num_worst={num_worst} {key}" for key in want
                             if not _same(got[key], want[key])]

        # Bad input: flagged by the kernels (never out of bounds), raised at the next normal-mode dispatch.
        x, idx, w = (_cuda(t) for t in _inputs(2, "bfloat16", 64))
        bad = idx.clone()
        bad[0, 0], bad[1, 1] = E, -7
        for num_worst in (T, 1):  # ids out of range; then more rows than num_worst_tokens
            lay = buf.get_dispatch_layout(bad if num_worst == T else idx, E)
            buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                         topk_idx=bad if num_worst == T else idx, topk_weights=w, num_worst_tokens=num_worst)
            try:
                _pipeline(buf, x, idx, w, 0)
                failures.append(f"{name}: bad input (num_worst={num_worst}) was not reported")
            except ValueError as error:
                print(f"{name}: bad input reported as expected: {error}")
        _pipeline(buf, x, idx, w, 0)  # the flag is clear again

    # Expert permutation and its weighted inverse, CUDA against CPU.
    for dtype in ("float32", "bfloat16"):
        x, idx, w = _inputs(3, dtype, 40)
        for num_out_rows in (0, 64):
            permuted, counts, handle = eplib.permute_by_expert(_cuda(x), _cuda(idx), E, 4, num_out_rows)
            back = eplib.unpermute_by_expert(permuted, handle, _cuda(w))
            want_permuted, want_counts, want_handle = eplib.permute_by_expert(x, idx, E, 4, num_out_rows)
            want_back = eplib.unpermute_by_expert(want_permuted, want_handle, w)
            for key, a, b in (("permuted", permuted, want_permuted), ("counts", counts, want_counts),
                              ("unpermuted", back, want_back)):
                if not _same(a.cpu(), b):
                    failures.append(f"permute {dtype} num_out_rows={num_out_rows} {key}")
    torch.cuda.synchronize()
    return failures


if __name__ == "__main__":
    sys.exit(main())
