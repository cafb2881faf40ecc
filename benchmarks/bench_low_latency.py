"""``bench_dispatch.py --mode ll``: eplib's low-latency (LL) dispatch and combine beside its normal mode,
on the same inputs, in the same run, iteration by iteration interleaved.

Per point (tokens per rank T, dtype bf16 or fp8) it times on every rank, each right after a barrier:
    ll       low_latency_dispatch (FP8 cast inside for fp8), low_latency_combine, and both in a row;
    ll_zero_copy  low_latency_dispatch, then (untimed: the experts' job) the valid rows written into
             get_next_low_latency_combine_buffer, then low_latency_combine(zero_copy=True), which reads
             them from the expert ranks' shared memory; "end_to_end" is the sum of the two timed calls;
    normal   get_dispatch_layout + dispatch (for fp8: the cast to the (e4m3, scales) tuple by
             eplib.reference.fp8_quantize, then the dispatch of the tuple), combine, and the three in
             a row.
Both modes start from the same bf16 x and end with the same rows (bf16, or FP8 with the same scales)
on the expert side.
Medians and p10/p90 over iterations of the slowest rank. The LL Buffer is sized once for the largest
point (``Buffer.get_low_latency_rdma_size_hint``); ``num_max_dispatch_tokens_per_rank`` is the largest
T of the sweep at every point, as a decode server sets it once.

Guard (bf16): LL combine of the received rows sent straight back (identity experts) must equal, bit
for bit, sum over k of w[t, k] * x[t] in fp32 in slot order, cast once; the normal mode's combine of
identity experts must equal x times the number of ranks each token went to. FP8: LL recv_count must
equal the bf16 run's.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

import eplib
import report
import routing
from eplib.reference import fp8_quantize
from timing import summarize, time_operation

LL_SWEEP = {"tokens": [1, 2, 4, 8, 16, 32, 64, 128, 256], "hidden": [7168], "top_k": [8], "experts": [256],
            "dtype": ["bf16", "fp8"], "warmup": 3, "iters": 15}
LL_QUICK = {"tokens": [1, 16], "hidden": [256], "top_k": [4], "experts": [16], "dtype": ["bf16", "fp8"],
            "warmup": 1, "iters": 3}
LL_DTYPES = ("bf16", "fp8")
OPS = ("dispatch", "combine", "end_to_end")
# ll_zero_copy: combine with zero_copy=True; its end_to_end is the sum of its dispatch and combine
# (the experts fill the buffer in between, untimed).
MODES = ("ll", "ll_zero_copy", "normal")


class Inputs:
    """One rank's inputs at a point: bf16 x [T, H] of small integers, routing, and the FP8 tuple."""

    def __init__(self, tokens: int, hidden: int, spec: routing.RoutingSpec, seed: int, rank: int,
                 device: torch.device) -> None:
        generator = torch.Generator().manual_seed(seed * 1000 + rank + 500)
        self.x = torch.randint(-4, 5, (tokens, hidden), generator=generator).to(torch.bfloat16).to(device)
        topk_idx, topk_weights = routing.generate(spec, tokens, seed, rank)
        self.topk_idx, self.topk_weights = topk_idx.to(device), topk_weights.to(device)
        self.num_experts = spec.num_experts


def ll_round(buffer: eplib.Buffer, inputs: Inputs, num_max: int, use_fp8: bool):
    recv, recv_count, handle, _, _ = buffer.low_latency_dispatch(inputs.x, inputs.topk_idx, num_max,
                                                                 inputs.num_experts, use_fp8=use_fp8)
    return recv, recv_count, handle


def ll_combine(buffer: eplib.Buffer, inputs: Inputs, expert_out: torch.Tensor, handle,
               zero_copy: bool = False) -> torch.Tensor:
    return buffer.low_latency_combine(expert_out, inputs.topk_idx, inputs.topk_weights, handle,
                                      zero_copy=zero_copy)[0]


def fill_zero_copy_buffer(buffer: eplib.Buffer, handle, recv_count: torch.Tensor, expert_out: torch.Tensor) -> None:
    """What an expert writing its output in place does: the valid rows into the next combine's buffer."""
    target = buffer.get_next_low_latency_combine_buffer(handle)
    for expert, count in enumerate(recv_count.tolist()):
        target[expert, :count] = expert_out[expert, :count]


def normal_dispatch(buffer: eplib.Buffer, inputs: Inputs, use_fp8: bool):
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(inputs.topk_idx, inputs.num_experts)
    return buffer.dispatch(fp8_quantize(inputs.x) if use_fp8 else inputs.x, num_tokens_per_rank=per_rank,
                           is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=inputs.topk_idx,
                           topk_weights=inputs.topk_weights)


def normal_combine(buffer: eplib.Buffer, dispatched, expert_out: torch.Tensor) -> torch.Tensor:
    return buffer.combine(expert_out, dispatched[4])[0]


def dequantized(recv) -> torch.Tensor:
    """Normal-mode received rows as bf16 expert outputs (FP8 rows dequantized)."""
    if not isinstance(recv, tuple):
        return recv
    values, scales = recv
    return (values.float().unflatten(-1, (-1, 128)) * scales.unsqueeze(-1)).flatten(-2).to(torch.bfloat16)


def guard(buffer: eplib.Buffer, inputs: Inputs, num_max: int, use_fp8: bool) -> List[str]:
    """The point's correctness checks on this rank (module docstring); the mismatches."""
    problems = []
    recv, recv_count, handle = ll_round(buffer, inputs, num_max, use_fp8)
    if use_fp8:
        bf16_count = ll_round(buffer, inputs, num_max, False)[1]
        if not torch.equal(recv_count, bf16_count):
            problems.append("ll fp8 recv_count differs from bf16's")
    else:
        combined = ll_combine(buffer, inputs, recv, handle)
        acc = torch.zeros(inputs.x.shape, dtype=torch.float32, device=inputs.x.device)
        for k in range(inputs.topk_idx.shape[1]):
            acc = acc + inputs.topk_weights[:, k:k + 1] * inputs.x.float()
        if not torch.equal(combined, acc.to(torch.bfloat16)):
            problems.append("ll combine of identity experts")
        recv, recv_count, handle = ll_round(buffer, inputs, num_max, use_fp8)
        fill_zero_copy_buffer(buffer, handle, recv_count, recv)
        if not torch.equal(ll_combine(buffer, inputs, recv, handle, zero_copy=True), acc.to(torch.bfloat16)):
            problems.append("ll zero-copy combine of identity experts")
        dispatched = normal_dispatch(buffer, inputs, False)
        combined = normal_combine(buffer, dispatched, dispatched[0])
        ranks = buffer.get_dispatch_layout(inputs.topk_idx, inputs.num_experts)[3].sum(1, keepdim=True)
        if not torch.equal(combined, (inputs.x.float() * ranks.float()).to(torch.bfloat16)):
            problems.append("normal combine of identity experts")
    return problems


def time_point(buffer: eplib.Buffer, inputs: Inputs, num_max: int, use_fp8: bool, warmup: int, iters: int,
               meter) -> Dict[str, Dict[str, List[float]]]:
    """Per mode and op, this rank's times (ms) of the timed iterations."""
    device = inputs.x.device
    times = {mode: {op: [] for op in OPS} for mode in MODES}
    # Expert outputs: the rows themselves (bf16), or for FP8 zeros in the recv_count rows that combine reads
    # (dequantizing all E_local * R * num_max rows would take gigabytes at H=7168). The dispatches below
    # reuse recv's memory (two buffers alternate), which changes nothing that is timed.
    recv, recv_count, _ = ll_round(buffer, inputs, num_max, use_fp8)
    ll_out = recv
    if use_fp8:
        ll_out = torch.empty(recv[0].shape, dtype=torch.bfloat16, device=device)
        for expert, count in enumerate(recv_count.tolist()):
            ll_out[expert, :count] = 0
    normal_out = dequantized(normal_dispatch(buffer, inputs, use_fp8)[0])
    for iteration in range(warmup + iters):
        samples = {}
        dispatched, samples["ll", "dispatch"] = time_operation(lambda: ll_round(buffer, inputs, num_max, use_fp8),
                                                               meter, device)
        _, samples["ll", "combine"] = time_operation(lambda: ll_combine(buffer, inputs, ll_out, dispatched[2]),
                                                     meter, device)
        _, samples["ll", "end_to_end"] = time_operation(
            lambda: ll_combine(buffer, inputs, ll_out, ll_round(buffer, inputs, num_max, use_fp8)[2]), meter, device)
        dispatched, samples["normal", "dispatch"] = time_operation(lambda: normal_dispatch(buffer, inputs, use_fp8),
                                                                   meter, device)
        _, samples["normal", "combine"] = time_operation(lambda: normal_combine(buffer, dispatched, normal_out),
                                                         meter, device)
        _, samples["normal", "end_to_end"] = time_operation(
            lambda: normal_combine(buffer, normal_dispatch(buffer, inputs, use_fp8), normal_out), meter, device)
        (_, recv_count, handle), samples["ll_zero_copy", "dispatch"] = time_operation(
            lambda: ll_round(buffer, inputs, num_max, use_fp8), meter, device)
        fill_zero_copy_buffer(buffer, handle, recv_count, ll_out)  # the experts' job: not timed
        _, samples["ll_zero_copy", "combine"] = time_operation(
            lambda: ll_combine(buffer, inputs, ll_out, handle, zero_copy=True), meter, device)
        samples["ll_zero_copy", "end_to_end"] = samples["ll_zero_copy", "dispatch"]  # replaced: slowest_rank
        if iteration >= warmup:
            for (mode, op), sample in samples.items():
                times[mode][op].append(sample.elapsed_ms)
    return times


def slowest_rank(times: Dict[str, Dict[str, List[float]]]) -> Dict[str, Dict[str, dict]]:
    """All ranks' times -> per mode and op the summary of the slowest rank of each iteration."""
    modes = list(times)
    local = torch.tensor([[times[m][op] for op in OPS] for m in modes], dtype=torch.float64)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    slowest = torch.stack(gathered).max(dim=0).values
    results = {m: {op: summarize(slowest[i, j].tolist()) for j, op in enumerate(OPS)} for i, m in enumerate(modes)}
    # Sums of separately timed calls, both from the slowest rank of each call (so both alike).
    for mode, key in (("normal", "dispatch_plus_combine"), ("ll_zero_copy", "end_to_end")):
        i = modes.index(mode)
        results[mode][key] = summarize((slowest[i, 0] + slowest[i, 1]).tolist())
    return results


CELLS = (("ll", "dispatch"), ("ll", "combine"), ("ll", "end_to_end"), ("ll_zero_copy", "combine"),
         ("ll_zero_copy", "end_to_end"), ("normal", "dispatch"), ("normal", "combine"), ("normal", "end_to_end"))


def render(result: dict) -> str:
    lines = [f"LL vs normal mode, eplib {result['machine']['transport']} transport: median ms [p10-p90] of the slowest rank. speed-up LL both: "
             "normal both / LL both (each one timed span); speed-up zero-copy: (normal dispatch + normal combine) / "
             "(LL dispatch + LL zero-copy combine), medians of per-iteration sums of separately timed calls", ""]
    header = ["T", "dtype", "LL dispatch", "LL combine", "LL both", "LL zero-copy combine",
              "LL zero-copy dispatch+combine", "normal dispatch", "normal combine", "normal both",
              "speed-up LL both", "speed-up zero-copy"]
    rows = []
    for p in result["points"]:
        cells = [f"{p['results'][m][op]['median_ms']:.2f} [{p['results'][m][op]['p10_ms']:.2f}-"
                 f"{p['results'][m][op]['p90_ms']:.2f}]" for m, op in CELLS]
        rows.append([str(p["tokens_per_rank"]), p["dtype"]] + cells
                    + [f"{p['speedup_end_to_end']:.2f}x", f"{p['speedup_zero_copy']:.2f}x"])
    lines.append(report._table(header, rows))
    failed = [p for p in result["points"] if p["check"]["mismatches"]]
    lines.append("")
    lines.append("Correctness guard: " + ("passed at every point" if not failed else
                                          f"FAILED at {len(failed)} point(s)"))
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Median dispatch+combine time vs tokens per rank, LL and normal mode, one panel per dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({p["dtype"] for p in result["points"]})
    figure, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4), squeeze=False)
    for axis, dtype in zip(axes.flat, dtypes):
        points = sorted((p for p in result["points"] if p["dtype"] == dtype), key=lambda p: p["tokens_per_rank"])
        tokens = [p["tokens_per_rank"] for p in points]
        for mode, label in (("ll", "low-latency"), ("normal", "normal")):
            figures = [p["results"][mode]["end_to_end"] for p in points]
            median = [f["median_ms"] for f in figures]
            errors = [[m - f["p10_ms"] for m, f in zip(median, figures)],
                      [f["p90_ms"] - m for m, f in zip(median, figures)]]
            axis.errorbar(tokens, median, yerr=errors, marker="o", capsize=3, label=label)
        first = points[0]
        axis.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="dispatch + combine, ms",
                 title=f"{dtype}, H={first['hidden']}, top-{first['top_k']} of {first['num_experts']}")
        axis.set_xticks(tokens, [str(t) for t in tokens])
        axis.legend()
    machine = result["machine"]
    figure.suptitle(f"eplib {machine['transport']} transport, {machine['ranks']} ranks on a {machine['cores']}-core VM shared with "
                    f"other jobs, {machine['date_utc']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def run(args: argparse.Namespace, device: torch.device) -> None:
    """The --mode ll sweep on ``device`` (bench_dispatch.py parses the arguments and makes the process group:
    gloo for the cpu and ipc transports, NCCL for nccl; CUDA tensors on nccl and ipc)."""
    defaults = LL_QUICK if args.quick else LL_SWEEP
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for dtype in args.dtype:
        if dtype not in LL_DTYPES:
            raise SystemExit(f"--mode ll: --dtype takes {LL_DTYPES}, got {dtype!r}")
    if args.plot:
        report.require_matplotlib()
    rank, world = dist.get_rank(), dist.get_world_size()
    from collective_meter import CollectiveMeter

    meter = CollectiveMeter(args.timeout_s, time_collectives=True)
    machine = report.machine_info(world, args.transport, device)
    num_max = max(args.tokens)
    points = [(tokens, hidden, top_k, experts, kind, dtype) for hidden in args.hidden for top_k in args.top_k
              for experts in args.experts for kind in (args.routing or ["uniform"]) for dtype in args.dtype
              for tokens in args.tokens]
    rdma_bytes = max(eplib.Buffer.get_low_latency_rdma_size_hint(num_max, hidden, world, experts, top_k)
                     for _, hidden, top_k, experts, _, _ in points)
    # ipc: the normal-mode calls need their peer buffer too (sized for the largest point's bf16 rows).
    nvl_bytes = max(eplib.Buffer.get_nvl_buffer_size_hint(num_max, hidden * 2, world, top_k)
                    for _, hidden, top_k, _, _, _ in points) if args.transport == "ipc" else 0
    buffer = eplib.Buffer(dist.group.WORLD, num_nvl_bytes=nvl_bytes, num_rdma_bytes=rdma_bytes, low_latency_mode=True,
                          transport=args.transport)
    records, started = [], time.monotonic()
    for index, (tokens, hidden, top_k, experts, kind, dtype) in enumerate(points):
        if rank == 0:
            print(f"[{index + 1}/{len(points)}] tokens={tokens} hidden={hidden} top-k={top_k} experts={experts} "
                  f"{kind} {dtype} ({time.monotonic() - started:.0f} s elapsed)", file=sys.stderr, flush=True)
        spec = routing.RoutingSpec(kind, experts, top_k)
        inputs = Inputs(tokens, hidden, spec, args.seed, rank, device)
        use_fp8 = dtype == "fp8"
        problems = guard(buffer, inputs, num_max, use_fp8)
        per_rank: List[List[str]] = [[] for _ in range(world)]
        dist.all_gather_object(per_rank, problems)
        results = slowest_rank(time_point(buffer, inputs, num_max, use_fp8, args.warmup, args.iters, meter))
        records.append({"tokens_per_rank": tokens, "hidden": hidden, "top_k": top_k, "num_experts": experts,
                        "routing": kind, "dtype": dtype, "num_max_dispatch_tokens_per_rank": num_max,
                        "results": results,
                        "speedup_end_to_end": results["normal"]["end_to_end"]["median_ms"]
                        / results["ll"]["end_to_end"]["median_ms"],
                        "speedup_zero_copy": results["normal"]["dispatch_plus_combine"]["median_ms"]
                        / results["ll_zero_copy"]["end_to_end"]["median_ms"],
                        "check": {"mismatches": [f"rank {r}: {m}" for r, ms in enumerate(per_rank) for m in ms]}})
    if rank == 0:
        machine["load_average_end"] = os.getloadavg()
        machine["sweep_seconds"] = round(time.monotonic() - started, 1)
        result = {"machine": machine, "mode": "ll",
                  "settings": {"iters": args.iters, "warmup": args.warmup, "seed": args.seed},
                  "points": records}
        print(render(result))
        print(f"(machine: {machine['cores']} cores, {world} ranks, load average at start "
              f"{statistics.fmean(machine['load_average_start']):.1f})")
        if args.json:
            report.write_json(result, args.json)
        if args.plot:
            plot(result, args.plot)
    failed = any(r["check"]["mismatches"] for r in records)
    del buffer
    dist.destroy_process_group()
    if failed:
        raise SystemExit("correctness guard failed; see the 'check' entries")
