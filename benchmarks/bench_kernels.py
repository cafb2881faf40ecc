"""Microbenchmark of eplib's CUDA kernels on one GPU, beside plain-torch equivalents.

Times layout, dispatch packing, combine (reduce) and the expert permutation at DeepEP's test shape
(T=4096, H=7168, K=8, E=256, R=8 for the layout, bf16) and at decode size (T=128), with CUDA
events: warm-up, then the median of many runs, each on the next of several input copies whose total
exceeds 100 MB so that no run finds its inputs in L2. Beside each kernel: the plain-torch
equivalent on the same GPU, the bytes the kernel must read and write, its achieved GB/s and the
fraction of the device-to-device copy bandwidth (torch copy_ of a large buffer) measured in the same
run. Goals (issue 3): layout <= 15 us at T=4096, packing and combine >= 70% of copy bandwidth,
every kernel >= 3x the torch reference.

Usage: python benchmarks/bench_kernels.py [--quick] [--json out.json]
Without a CUDA device it says so and exits with status 0.
"""

import argparse
import json
import math
import statistics
import sys
from typing import Callable, Dict, List

import torch

import eplib
from eplib import _C
from eplib._dtypes import KERNEL_DTYPE_CODES

HIDDEN, NUM_TOPK, NUM_EXPERTS, NUM_RANKS = 7168, 8, 256, 8
ROTATION_BYTES = 128 << 20  # input copies per kernel add up to more than this (H100 L2: 50 MB)
COPY_BYTES = 1 << 30


def time_us(fn: Callable[[int], None], num_copies: int, warmup: int, runs: int) -> float:
    """Median of `runs` event-timed calls fn(i), i rotating over the input copies."""
    for i in range(warmup):
        fn(i % num_copies)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for i in range(runs):
        starts[i].record()
        fn((warmup + i) % num_copies)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth_gbs(warmup: int, runs: int) -> float:
    """Device-to-device bandwidth of torch copy_ (bytes read + written per second)."""
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_us(lambda _: dst.copy_(src), 1, warmup, runs)
    return 2 * COPY_BYTES / us / 1e3


def copies_for(bytes_per_copy: int) -> int:
    return max(2, math.ceil(ROTATION_BYTES / max(bytes_per_copy, 1)))


def stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def routing(num_tokens: int, seed: int) -> torch.Tensor:
    """topk_idx int64 [T, K]: K distinct experts per token, uniform."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scores = torch.rand(num_tokens, NUM_EXPERTS, device="cuda", generator=generator)
    return scores.topk(NUM_TOPK, dim=1).indices.contiguous()


def bench_shape(num_tokens: int, copy_gbs: float, warmup: int, runs: int) -> List[Dict]:
    cuda, dtype = dict(device="cuda"), torch.bfloat16
    x_bytes = HIDDEN * 2
    experts_per_rank = NUM_EXPERTS // NUM_RANKS
    results = []

    def record(name, kernel_us, torch_us, num_bytes):
        results.append(dict(kernel=name, num_tokens=num_tokens, eplib_us=kernel_us, torch_us=torch_us,
                            speedup=torch_us / kernel_us, bytes=num_bytes, gbs=num_bytes / kernel_us / 1e3,
                            copy_fraction=num_bytes / kernel_us / 1e3 / copy_gbs))

    # ---- layout: topk_idx -> per-rank / per-expert counts, is_token_in_rank
    num_copies = copies_for(num_tokens * NUM_TOPK * 8)
    idxs = [routing(num_tokens, seed) for seed in range(num_copies)]
    flag = torch.zeros(1, dtype=torch.int32, **cuda)
    per_rank = torch.empty(NUM_RANKS, dtype=torch.int32, **cuda)
    per_expert = torch.empty(NUM_EXPERTS, dtype=torch.int32, **cuda)
    in_rank = torch.empty(num_tokens, NUM_RANKS, dtype=torch.bool, **cuda)

    device = torch.cuda.current_device()
    layout_args = [_C.DispatchLayoutArgs(
        topk_idx=idxs[i].data_ptr(), num_tokens=num_tokens, num_topk=NUM_TOPK, num_experts=NUM_EXPERTS,
        num_ranks=NUM_RANKS, num_tokens_per_rank=per_rank.data_ptr(), num_tokens_per_expert=per_expert.data_ptr(),
        is_token_in_rank=in_rank.data_ptr(), error_flag=flag.data_ptr()) for i in range(num_copies)]

    def layout(i):
        _C.cuda_dispatch_layout(layout_args[i], device, stream())

    ones = torch.ones(num_tokens * NUM_TOPK, dtype=torch.int32, **cuda)

    def torch_layout(i):
        # No host sync (bincount and boolean indexing wait for the device): masked ids count in bin E.
        idx = idxs[i]
        valid = idx >= 0
        experts = torch.where(valid, idx, NUM_EXPERTS).reshape(-1)
        torch.zeros(NUM_EXPERTS + 1, dtype=torch.int32, **cuda).index_add_(0, experts, ones)
        ranks = torch.where(valid, idx // experts_per_rank, NUM_RANKS)
        mask = torch.zeros(num_tokens, NUM_RANKS + 1, dtype=torch.bool, **cuda).scatter_(1, ranks, True)
        mask[:, :NUM_RANKS].sum(0)

    layout_bytes = num_tokens * NUM_TOPK * 8 + num_tokens * NUM_RANKS + (NUM_EXPERTS + NUM_RANKS) * 4
    record("layout", time_us(layout, num_copies, warmup, runs), time_us(torch_layout, num_copies, warmup, runs),
           layout_bytes)

    # ---- dispatch packing: rows (x, ids, weights) into per-rank send regions
    layout(0)
    send_pos = torch.empty(num_tokens, NUM_RANKS, dtype=torch.int32, **cuda)
    counts = torch.empty(NUM_RANKS, dtype=torch.int32, **cuda)
    _C.cuda_send_positions(_C.SendPositionsArgs(
        is_token_in_rank=in_rank.data_ptr(), num_tokens=num_tokens, num_ranks=NUM_RANKS, send_pos=send_pos.data_ptr(),
        num_tokens_per_rank=counts.data_ptr(), error_flag=flag.data_ptr()), device, stream())
    num_rows = int(counts.sum())
    stride = _C.dispatch_row_stride(x_bytes, 0, NUM_TOPK)
    num_copies = copies_for(num_tokens * x_bytes + num_rows * stride)
    xs = [torch.randn(num_tokens, HIDDEN, **cuda).to(dtype) for _ in range(num_copies)]
    weights = torch.rand(num_tokens, NUM_TOPK, **cuda)
    send_buffers = [torch.empty(num_rows * stride, dtype=torch.uint8, **cuda) for _ in range(num_copies)]
    # torch: the same rows gathered rank after rank (x only, so a lower bound on its cost).
    token_order = in_rank.t().nonzero()[:, 1]
    torch_send = [torch.empty(num_rows, HIDDEN, dtype=dtype, **cuda) for _ in range(num_copies)]

    pack_args = [_C.DispatchPackArgs(
        x=xs[i].data_ptr(), x_bytes=x_bytes, topk_idx=idxs[0].data_ptr(), topk_weights=weights.data_ptr(),
        num_topk=NUM_TOPK, num_experts=NUM_EXPERTS, send_pos=send_pos.data_ptr(), num_tokens=num_tokens,
        num_ranks=NUM_RANKS, send_buffer=send_buffers[i].data_ptr(), error_flag=flag.data_ptr())
        for i in range(num_copies)]

    def pack(i):
        _C.cuda_dispatch_pack(pack_args[i], device, stream())

    def torch_pack(i):
        torch.index_select(xs[i], 0, token_order, out=torch_send[i])

    pack_bytes = num_tokens * (x_bytes + NUM_TOPK * 12) + num_rows * stride
    record("dispatch_pack", time_us(pack, num_copies, warmup, runs), time_us(torch_pack, num_copies, warmup, runs),
           pack_bytes)

    # ---- combine: fp32 sum per token of the rows its ranks send back, cast to bf16
    recv_buffers = [torch.randn(num_rows, HIDDEN, **cuda).to(dtype) for _ in range(num_copies)]
    combined = torch.empty(num_tokens, HIDDEN, dtype=dtype, **cuda)
    code = KERNEL_DTYPE_CODES[dtype]
    # Rows come rank after rank: rank r's are [starts[r], starts[r + 1]) (host values, read once here).
    starts = [0] + torch.cumsum(counts.long(), 0).tolist()

    reduce_args = [_C.CombineReduceArgs(
        dtype=code, recv_buffer=recv_buffers[i].data_ptr(), hidden=HIDDEN, send_pos=send_pos.data_ptr(),
        num_tokens=num_tokens, num_ranks=NUM_RANKS, combined_x=combined.data_ptr()) for i in range(num_copies)]

    def reduce(i):
        _C.cuda_combine_reduce(reduce_args[i], device, stream())

    def torch_reduce(i):
        acc = torch.zeros(num_tokens, HIDDEN, dtype=torch.float32, **cuda)
        for r in range(NUM_RANKS):  # ranks ascending, as the contract sums; slices, so no host sync
            begin, end = starts[r], starts[r + 1]
            acc.index_add_(0, token_order[begin:end], recv_buffers[i][begin:end].float())
        combined.copy_(acc)

    reduce_bytes = num_rows * x_bytes + num_tokens * x_bytes + num_tokens * NUM_RANKS * 4
    record("combine_reduce", time_us(reduce, num_copies, warmup, runs),
           time_us(torch_reduce, num_copies, warmup, runs), reduce_bytes)

    # ---- expert permutation on a receiving rank: T rows, local ids of rank 0 (about one per row)
    local_idx = torch.where(idxs[0] < experts_per_rank, idxs[0], -1)
    xs_perm = xs[:copies_for(2 * num_tokens * x_bytes)]
    permuted, _, handle = eplib.permute_by_expert(xs_perm[0], local_idx, experts_per_rank, expert_alignment=128)
    num_out_rows = handle.num_out_rows
    num_pairs = int((local_idx >= 0).sum())

    def permute(i):
        eplib.permute_by_expert(xs_perm[i], local_idx, experts_per_rank, expert_alignment=128,
                                num_out_rows=num_out_rows)

    flat = local_idx.reshape(-1)
    pairs = (flat >= 0).nonzero().flatten()
    order = torch.sort(flat[pairs], stable=True).indices

    def torch_permute(i):
        torch.sort(flat[pairs], stable=True)
        torch.index_select(xs_perm[i], 0, pairs[order] // NUM_TOPK)

    permute_bytes = num_tokens * x_bytes + num_out_rows * x_bytes + num_tokens * NUM_TOPK * 12
    record("permute", time_us(permute, len(xs_perm), warmup, runs), time_us(torch_permute, len(xs_perm), warmup, runs),
           permute_bytes)

    ys = [torch.randn(num_out_rows, HIDDEN, **cuda).to(dtype) for _ in range(copies_for(num_out_rows * x_bytes))]
    topk_weights = torch.rand(num_tokens, NUM_TOPK, **cuda)
    pos = handle.pair_pos.reshape(-1)[pairs].long()

    def unpermute(i):
        eplib.unpermute_by_expert(ys[i], handle, topk_weights)

    def torch_unpermute(i):
        acc = torch.zeros(num_tokens, HIDDEN, dtype=torch.float32, **cuda)
        acc.index_add_(0, pairs // NUM_TOPK, ys[i][pos].float() * topk_weights.reshape(-1)[pairs, None])
        acc.to(dtype)

    unpermute_bytes = num_pairs * x_bytes + num_tokens * x_bytes + num_tokens * NUM_TOPK * 8
    record("unpermute", time_us(unpermute, len(ys), warmup, runs), time_us(torch_unpermute, len(ys), warmup, runs),
           unpermute_bytes)
    return results


def goal_of(result: Dict) -> str:
    checks = [result["speedup"] >= 3]
    if result["kernel"] == "layout" and result["num_tokens"] == 4096:
        checks.append(result["eplib_us"] <= 15)
    if result["kernel"] in ("dispatch_pack", "combine_reduce") and result["num_tokens"] == 4096:
        checks.append(result["copy_fraction"] >= 0.7)
    return "met" if all(checks) else "MISSED"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (for a smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and _C.cuda_available() and _C.built_with_cuda()):
        print("bench_kernels: no CUDA device (or eplib built without CUDA kernels): nothing to measure")
        return 0
    warmup, runs = (5, 20) if args.quick else (20, 200)
    copy_gbs = copy_bandwidth_gbs(warmup, runs)
    device = torch.cuda.get_device_name()
    print(f"{device}, torch {torch.__version__}, CUDA runtime {_C.cuda_device_status()['runtime_version']}")
    print(f"device-to-device copy bandwidth (torch copy_, read + write): {copy_gbs:.0f} GB/s")
    print("goals: layout <= 15 us at T=4096; pack and combine >= 70% of copy bandwidth; every kernel >= 3x torch")
    header = f"{'kernel':<15} {'T':>5} {'eplib us':>9} {'torch us':>9} {'speedup':>8} {'GB/s':>7} {'% copy':>7}  goal"
    print(header)
    results = []
    for num_tokens in (4096, 128):
        for result in bench_shape(num_tokens, copy_gbs, warmup, runs):
            result["goal"] = goal_of(result)
            results.append(result)
            print(f"{result['kernel']:<15} {num_tokens:>5} {result['eplib_us']:>9.1f} {result['torch_us']:>9.1f} "
                  f"{result['speedup']:>7.1f}x {result['gbs']:>7.0f} {100 * result['copy_fraction']:>6.0f}%  "
                  f"{result['goal']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(device=device, torch=torch.__version__, copy_gbs=copy_gbs,
                           shape=dict(hidden=HIDDEN, num_topk=NUM_TOPK, num_experts=NUM_EXPERTS, num_ranks=NUM_RANKS,
                                      dtype="bfloat16"),
                           results=results), out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
