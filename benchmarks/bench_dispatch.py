"""Dispatch + combine latency of eplib beside eplib.reference, in the same run.

    torchrun --standalone --nproc_per_node=4 benchmarks/bench_dispatch.py \
        --tokens 4096 --hidden 2048 --top-k 8 --experts 64 --dtype bf16

CPU ranks over gloo. Each iteration is timed between two barriers with time.perf_counter_ns;
figures are the median and p10/p90 over iterations of the slowest rank (a step waits for it).
"""

import argparse
import os
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

import eplib
from eplib.reference import ReferenceBuffer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def time_slowest_rank(fn: Callable[[], None], warmup: int, iters: int) -> List[float]:
    """Per-iteration milliseconds of the slowest rank."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        dist.barrier()
        start = time.perf_counter_ns()
        fn()
        elapsed = torch.tensor([(time.perf_counter_ns() - start) / 1e6], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        samples.append(elapsed.item())
    return samples


def summarize(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {"median_ms": statistics.median(ordered), "p10_ms": pick(0.1), "p90_ms": pick(0.9)}


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=generator).to(DTYPES[args.dtype])
    # Uniform routing: K distinct experts per token.
    topk_idx = torch.rand(args.tokens, args.experts, generator=generator).topk(args.top_k, dim=1).indices
    topk_weights = torch.rand(args.tokens, args.top_k, generator=generator)

    results = {}
    for name, buffer in (("eplib", eplib.Buffer(group)), ("reference", ReferenceBuffer(group))):
        def step() -> None:
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, args.experts)
            recv_x, _, _, _, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)
            buffer.combine(recv_x, handle)
        results[name] = summarize(time_slowest_rank(step, args.warmup, args.iters))

    if rank == 0:
        print(f"layout+dispatch+combine, {world} gloo ranks, {os.cpu_count()} cores, tokens/rank={args.tokens} "
              f"hidden={args.hidden} top-k={args.top_k} experts={args.experts} dtype={args.dtype}, "
              f"{args.iters} iterations")
        for name, stats in results.items():
            print(f"  {name:10s} median {stats['median_ms']:9.2f} ms   p10 {stats['p10_ms']:9.2f}   "
                  f"p90 {stats['p90_ms']:9.2f}")
        print(f"  speed-up of eplib over reference: {results['reference']['median_ms'] / results['eplib']['median_ms']:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
