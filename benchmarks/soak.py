"""Soak: many rounds of mixed Buffer calls with changing shapes, watching the process for leaks.

    torchrun --standalone --nproc_per_node=4 benchmarks/soak.py [--rounds 3000] [--json out.json]

Each round runs get_dispatch_layout, dispatch, cached dispatch and combine on the cpu transport,
with a shape that changes every round (tokens, hidden size, top-k, dtype among fp32/bf16/fp16/FP8,
with or without top-k data, num_worst_tokens, bias, combined weights), and checks combine against
its closed form (each token's row times the ranks it went to). Every 25th round one rank passes a
bad x to its dispatch first (the others raise PeerInputError), so the error path soaks too.

It reports, per rank, the resident memory (RSS), open file descriptors and threads after a warm-up
(a tenth of the rounds), at the middle and at the end, and the growth from the middle to the end
per 1000 rounds. tests/test_soak.py runs it with a few hundred rounds.
"""

import argparse
import json
import os
from typing import Dict, List

import torch
import torch.distributed as dist

import eplib

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def process_figures() -> Dict[str, float]:
    """This process's resident memory (MiB), open file descriptors and threads (Linux /proc)."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir("/proc/self/fd")),
            "threads": int(status["Threads"])}


def one_round(buffer: eplib.Buffer, rank: int, num_ranks: int, i: int) -> None:
    """Layout, dispatch, cached dispatch and combine with round ``i``'s shape; raises on a wrong
    combine. Every 25th round, rank i % R first passes an int32 x (the others see PeerInputError)."""
    g = torch.Generator().manual_seed(i * 1009 + rank)
    num_tokens = 1 + (i * 37 + rank * 11) % 160
    dtype = _DTYPES[i % len(_DTYPES)]
    hidden = 128 * (1 + i % 3) if dtype == torch.float8_e4m3fn else 16 * (1 + i % 5)
    num_topk, num_experts = 1 + i % 4, 4 * num_ranks
    with_topk, num_worst = i % 3 != 2, (num_ranks * 160 if i % 4 == 3 else 0)
    topk_idx = torch.stack([torch.randperm(num_experts, generator=g)[:num_topk] for _ in range(num_tokens)])
    topk_weights = torch.rand(num_tokens, num_topk, generator=g)
    values = torch.randint(-8, 9, (num_tokens, hidden), generator=g).to(torch.float32)
    if dtype == torch.float8_e4m3fn:
        x = (values.to(dtype), torch.rand(num_tokens, hidden // 128, generator=g) + 0.5)
    else:
        x = values.to(dtype)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    kwargs = dict(num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
                  num_worst_tokens=num_worst)
    if with_topk:
        kwargs.update(topk_idx=topk_idx, topk_weights=topk_weights)
    if i % 25 == 0:
        try:
            buffer.dispatch(values.to(torch.int32) if rank == i % num_ranks else x, **kwargs)
        except (TypeError, eplib.PeerInputError):
            pass
        else:
            raise AssertionError(f"round {i}: a dispatch with one bad x went through")
    recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(x, **kwargs)
    buffer.dispatch(x, handle=handle)
    rows = recv_x[0].shape[0] if isinstance(recv_x, tuple) else recv_x.shape[0]
    back = (recv_x[0].to(torch.bfloat16) if isinstance(recv_x, tuple) else recv_x).contiguous()
    bias = torch.ones(num_tokens, hidden, dtype=back.dtype) if i % 2 else None
    combined, _, _ = buffer.combine(back, handle, topk_weights=recv_weights if with_topk else None, bias=bias)
    expected = values.to(back.dtype).float() * layout[3].sum(1, keepdim=True) + (1 if i % 2 else 0)
    if rows != (num_worst or rows) or not torch.equal(combined.float(), expected.to(back.dtype).float()):
        raise AssertionError(f"rank {rank} round {i}: combine differs from its closed form")


def soak(group: dist.ProcessGroup, rounds: int) -> Dict[str, object]:
    """Runs ``rounds`` rounds on a new Buffer; returns this rank's figures (see the module docstring)."""
    buffer = eplib.Buffer(group)
    rank, num_ranks = group.rank(), group.size()
    warm, middle = max(1, rounds // 10), rounds // 2
    figures: Dict[str, Dict[str, float]] = {}
    for i in range(rounds):
        one_round(buffer, rank, num_ranks, i)
        if i + 1 in (warm, middle, rounds):
            figures[{warm: "start", middle: "middle", rounds: "end"}[i + 1]] = process_figures()
    per_1000 = {key: (figures["end"][key] - figures["middle"][key]) * 1000 / (rounds - middle)
                for key in figures["end"]}
    return {"rank": rank, "rounds": rounds, **figures, "growth_per_1000_rounds": per_1000}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--json", help="write every rank's figures here (rank 0)")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    result = soak(dist.group.WORLD, args.rounds)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        for r in results:
            print(f"rank {r['rank']}: " + "; ".join(
                f"{point} RSS {r[point]['rss_mib']:.1f} MiB, {r[point]['fds']} fds, {r[point]['threads']} threads"
                for point in ("start", "middle", "end")))
            growth = r["growth_per_1000_rounds"]
            print(f"    growth per 1000 rounds (middle to end): RSS {growth['rss_mib']:+.2f} MiB, fds "
                  f"{growth['fds']:+.1f}, threads {growth['threads']:+.1f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
