"""What the call header costs: eplib's cached dispatch and combine (header exchange, then payload)
beside the same calls without the header (the path before it: pack, payload, unpack or reduce),
timed interleaved in the same processes, and the header exchange alone beside a plain all-gather
of as many bytes.

    torchrun --standalone --nproc_per_node=4 benchmarks/call_header.py [--tokens 128 4096] [--iters 60]

Shape: hidden 2048 bf16, top-8 of 64 experts, uniform routing (benchmarks/routing.py); combine with
the top-k weights. Each operation is timed right after a barrier; per iteration the slowest rank
counts; the table gives the median and p10/p90 over iterations. The two paths' outputs are checked
to be equal.
"""

import argparse
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

import eplib
import routing
from collective_meter import CollectiveMeter
from report import machine_info
from eplib.transports.records import header_words
from timing import summarize, time_operation


def operations(buffer: eplib.Buffer, tokens: int, seed: int) -> Dict[str, Callable[[], object]]:
    """The timed operations on one point, after one layout and dispatch."""
    rank = dist.get_rank()
    topk_idx, topk_weights = routing.generate(routing.RoutingSpec("uniform", 64, 8), tokens, seed, rank)
    x = torch.randn(tokens, 2048, generator=torch.Generator().manual_seed(seed + rank)).to(torch.bfloat16)
    layout = buffer.get_dispatch_layout(topk_idx, 64)
    recv_x, _, recv_weights, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3], num_tokens_per_expert=layout[2],
        topk_idx=topk_idx, topk_weights=topk_weights)
    transport = buffer._cpu
    num_topk = recv_weights.shape[1]

    def combine_without_header():
        send, stride = transport._pack_combine(recv_x, recv_weights, handle.num_recv_tokens)
        return transport._combine_reduce(transport._combine_rows(send, stride, handle), recv_x, handle, num_topk,
                                         None, None)

    def cached_without_header():
        send, stride = transport._pack(x, None, None, None, 0, handle.send_pos, sum(handle.send_counts))
        received = transport._exchange_rows(send, stride, handle.send_counts, handle.recv_counts,
                                            "cached dispatch (payload)")
        return transport._unpack(received, handle.num_recv_tokens, handle.num_output_rows, x, None, 0, 0)[0]

    def header_alone():
        transport._exchange_headers("combine", sends=handle.recv_counts, expects=handle.send_counts)

    words = header_words(dist.get_world_size())
    gathered, header = torch.empty(dist.get_world_size() * words, dtype=torch.int64), torch.zeros(words, dtype=torch.int64)

    return {
        "combine": lambda: buffer.combine(recv_x, handle, topk_weights=recv_weights)[:2],
        "combine without header": combine_without_header,
        "cached dispatch": lambda: buffer.dispatch(x, handle=handle)[0],
        "cached dispatch without header": cached_without_header,
        "header exchange alone": header_alone,
        "plain all-gather of a header's size": lambda: dist.all_gather_into_tensor(gathered, header),
    }


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 4096])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    buffer, meter = eplib.Buffer(dist.group.WORLD), CollectiveMeter(600, time_collectives=False)
    if dist.get_rank() == 0:
        machine = machine_info(dist.get_world_size(), "cpu", torch.device("cpu"))
        print(f"{dist.get_world_size()} ranks, {machine['cores']} cores ({machine['cpu_model']}), torch "
              f"{machine['torch']}, {machine['date_utc']}")
    for tokens in args.tokens:
        ops = operations(buffer, tokens, seed=tokens)
        with_header, without = ops["combine"](), ops["combine without header"]()
        assert all(torch.equal(a, b) for a, b in zip(with_header, without)), "combine paths differ"
        assert torch.equal(ops["cached dispatch"](), ops["cached dispatch without header"]()), "cached paths differ"
        samples = {name: [] for name in ops}
        for i in range(args.warmup + args.iters):
            for name, fn in ops.items():  # interleaved, so that background load hits all alike
                elapsed = time_operation(fn, meter, torch.device("cpu"))[1].elapsed_ms
                if i >= args.warmup:
                    samples[name].append(elapsed)
        table = torch.tensor([samples[name] for name in ops], dtype=torch.float64)
        dist.all_reduce(table, op=dist.ReduceOp.MAX)  # the slowest rank of each iteration
        if dist.get_rank() == 0:
            print(f"\nT = {tokens} tokens/rank, H = 2048 bf16, top-8 of 64 experts, uniform:")
            medians = {}
            for name, row in zip(ops, table.tolist()):
                figures = summarize(row)
                medians[name] = figures["median_ms"]
                print(f"  {name:32s} median {figures['median_ms']:8.3f} ms  (p10 {figures['p10_ms']:.3f}, "
                      f"p90 {figures['p90_ms']:.3f})")
            for call in ("combine", "cached dispatch"):
                extra = medians[call] - medians[f"{call} without header"]
                print(f"  {call}: the header adds {extra:+.3f} ms to the median "
                      f"({extra / medians[f'{call} without header'] * 100:+.1f} %)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
