"""Dispatch/combine latency of eplib beside eplib.reference and a framework-style baseline.

    torchrun --standalone --nproc_per_node=4 benchmarks/bench_dispatch.py [--quick] [--json out.json] [--plot out.png]

Sweeps tokens per rank, hidden size, top-k, experts, dtype and routing skew (benchmarks/routing.py).
For each point and implementation it times get_dispatch_layout, dispatch, combine, and
layout+dispatch+combine end to end, each right after a barrier, and reports the median and p10/p90
over iterations of the slowest rank. The three implementations run interleaved, iteration by
iteration, so that background load hits them alike. Before timing a point, a correctness guard
checks that every implementation's combine returns the same tokens.

Implementations:
    eplib      eplib.Buffer (``--transport``)
    reference  eplib.reference.ReferenceBuffer, plain torch (CPU tensors only)
    framework  benchmarks/baselines.py: replicate each token K times, sort by expert,
               all_to_all_single, and back (Megatron-core's AllToAll dispatcher)

``--transport ipc`` (CUDA peer memory) measures something else, on a gloo group (which carries
only the IPC handle exchange and the reference's CPU tensors, and, unlike NCCL before 2.30,
lets several processes share one GPU). The Buffer gets num_nvl_bytes from
Buffer.get_nvl_buffer_size_hint for the largest point; the default sweep is the issue's goal
shapes (IPC_SWEEP: T=4096 and T=128, H=7168, top-8 of 256 experts, bf16, uniform).
    every R    at each point, eplib's layout, dispatch (its four outputs and rank_prefix_matrix),
               cached dispatch and combine against eplib.reference on CPU copies of the same inputs,
               bit for bit, on every rank;
    R = 1      layout, dispatch, cached dispatch, combine and end to end timed as above (CUDA
               events; host wall time beside), and the copy efficiency of dispatch, cached dispatch
               and combine against torch copy_ of the same memory traffic (benchmarks/copy_efficiency.py),
               with the issue's goals;
    R > 1      timed as above only when every rank has a GPU of its own; processes that share a GPU
               time-slice, so then only the check runs and the output says that timings are not
               reported.
"""

import argparse
import datetime
import gc
import os
import socket
import sys
import time
from dataclasses import dataclass
from itertools import product
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import bench_low_latency
import copy_efficiency
import eplib
import report
import routing
from collective_meter import CollectiveMeter
# Bound at import, before CollectiveMeter.install() wraps eplib.collectives' binding: the samples'
# all-gather (gather_ranks) is never metered.
from eplib.collectives import _all_gather_single
from eplib.reference import ReferenceBuffer
from pipelines import DeepEPStylePipeline, FrameworkPipeline, Pipeline, reference_mismatches
from timing import Sample, time_operation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ("layout", "dispatch", "combine", "end_to_end")
TRANSPORTS = ("cpu", "nccl", "ipc", "auto")
FULL_SWEEP = {"tokens": [128, 512, 4096], "hidden": [2048], "top_k": [8], "experts": [64], "dtype": ["bf16"],
              "routing": list(routing.KINDS), "warmup": 3, "iters": 20}
QUICK_SWEEP = {"tokens": [64, 256], "hidden": [256], "top_k": [4], "experts": [16], "dtype": ["bf16"],
               "routing": list(routing.KINDS), "warmup": 2, "iters": 8}
# --transport ipc without --quick: the goal shapes of issue 4 (copy efficiency at T=4096, launch at T=128).
IPC_SWEEP = {"tokens": [4096, 128], "hidden": [7168], "top_k": [8], "experts": [256], "dtype": ["bf16"],
             "routing": ["uniform"], "warmup": 10, "iters": 100}
IPC_OPS = ("layout", "dispatch", "cached_dispatch", "combine", "end_to_end")


@dataclass(frozen=True)
class Point:
    tokens: int
    hidden: int
    dtype: str
    spec: routing.RoutingSpec


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    names = lambda text: text.split(",")  # noqa: E731
    parser.add_argument("--tokens", type=ints,
                        help=f"tokens per rank, comma-separated (default {FULL_SWEEP['tokens']})")
    parser.add_argument("--hidden", type=ints, help=f"default {FULL_SWEEP['hidden']}")
    parser.add_argument("--top-k", type=ints, help=f"default {FULL_SWEEP['top_k']}")
    parser.add_argument("--experts", type=ints, help=f"default {FULL_SWEEP['experts']}")
    parser.add_argument("--dtype", type=names, help=f"of {sorted(DTYPES)}, default {FULL_SWEEP['dtype']}")
    parser.add_argument("--routing", type=names, help=f"of {list(routing.KINDS)}, default all")
    parser.add_argument("--zipf-s", type=float, default=1.0,
                        help="Zipf exponent of the zipf routing (default %(default)s)")
    parser.add_argument("--hot-fraction", type=float, default=0.5,
                        help="share of tokens that pick the hot expert (default %(default)s)")
    parser.add_argument("--n-group", type=int, default=8,
                        help="expert groups of the group routing, DeepSeek-V3 (default %(default)s)")
    parser.add_argument("--topk-group", type=int, default=4,
                        help="groups each token may use in the group routing (default %(default)s)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="cpu",
                        help="eplib transport; cpu runs gloo with CPU tensors, nccl runs NCCL with CUDA tensors, "
                             "auto picks CUDA (and NCCL) when there is a GPU; ipc runs CUDA peer memory on a gloo "
                             "group: checked against eplib.reference, timed against torch copy_ with one rank "
                             "(see above)")
    parser.add_argument("--warmup", type=int, help=f"warm-up iterations per point (default {FULL_SWEEP['warmup']})")
    parser.add_argument("--iters", type=int, help=f"timed iterations per point (default {FULL_SWEEP['iters']})")
    parser.add_argument("--seed", type=int, default=0, help="routing and token seed (default %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="limit of every wait on another rank (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny sweep for CI smoke runs: {QUICK_SWEEP} unless given explicitly "
                             f"(without it, --transport ipc defaults to {IPC_SWEEP})")
    parser.add_argument("--mode", choices=("normal", "ll"), default="normal",
                        help="normal: the sweep above; ll: low-latency dispatch/combine beside the normal mode on "
                             "the same inputs (benchmarks/bench_low_latency.py; any --transport; defaults "
                             f"{bench_low_latency.LL_SWEEP}, --quick {bench_low_latency.LL_QUICK})")
    parser.add_argument("--json", metavar="PATH", help="write every figure and the machine info here")
    parser.add_argument("--plot", metavar="PATH", help="draw latency vs tokens here (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.mode == "ll":  # bench_low_latency.run fills in its own defaults
        return args
    defaults = QUICK_SWEEP if args.quick else IPC_SWEEP if args.transport == "ipc" else FULL_SWEEP
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for dtype in args.dtype:
        if dtype not in DTYPES:
            parser.error(f"--dtype: expected names from {sorted(DTYPES)}, got {dtype!r}")
    for kind in args.routing:
        if kind not in routing.KINDS:
            parser.error(f"--routing: expected names from {list(routing.KINDS)}, got {kind!r}")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def sweep(args: argparse.Namespace) -> List[Point]:
    """Every combination of the swept values; exits with a message on one that cannot run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    points = []
    for hidden, top_k, experts, dtype, kind, tokens in product(args.hidden, args.top_k, args.experts, args.dtype,
                                                               args.routing, args.tokens):
        if experts % world_size != 0:
            raise SystemExit(f"--experts: {experts} experts do not split evenly over {world_size} ranks")
        try:
            spec = routing.RoutingSpec(kind, experts, top_k, zipf_s=args.zipf_s, hot_fraction=args.hot_fraction,
                                       n_group=args.n_group, topk_group=args.topk_group)
        except ValueError as error:
            raise SystemExit(f"sweep point top-k={top_k} experts={experts} routing={kind}: {error}") from error
        points.append(Point(tokens, hidden, dtype, spec))
    return points


def init_distributed(transport: str, timeout_s: float) -> torch.device:
    """Process group and device: gloo + CPU for the cpu transport, gloo + this rank's GPU for ipc
    (several ranks may share one GPU), NCCL + this rank's GPU otherwise."""
    use_cuda = transport in ("nccl", "ipc") or (transport == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit(f"--transport {transport}: needs CUDA, and torch.cuda.is_available() is False")
    timeout = datetime.timedelta(seconds=timeout_s)
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if transport == "ipc":
            dist.init_process_group("gloo", timeout=timeout)
        else:
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        return device
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


def nvl_bytes_for(points: List[Point], num_ranks: int) -> int:
    """Peer buffer bytes that fit every point: Buffer.get_nvl_buffer_size_hint of the largest."""
    return max(eplib.Buffer.get_nvl_buffer_size_hint(p.tokens, p.hidden * DTYPES[p.dtype].itemsize, num_ranks,
                                                     p.spec.top_k) for p in points)


def chunk_configuration(num_ranks: int) -> dict:
    """The configs the Buffer's calls use by default (what the ipc rings stream with), per op."""
    configs = {"dispatch": eplib.Buffer.get_dispatch_config(num_ranks),
               "combine": eplib.Buffer.get_combine_config(num_ranks)}
    return {op: {"channels": c.num_channels, "chunk_rows": c.num_max_nvl_chunked_send_tokens,
                 "ring_rows": c.num_max_nvl_chunked_recv_tokens} for op, c in configs.items()}


def make_buffer(transport: str, points: List[Point]) -> eplib.Buffer:
    """The Buffer under test; the ipc transport's is sized for the largest point."""
    kwargs = {"num_nvl_bytes": nvl_bytes_for(points, dist.get_world_size())} if transport == "ipc" else {}
    try:
        return eplib.Buffer(dist.group.WORLD, transport=transport, **kwargs)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as error:
        dist.destroy_process_group()
        raise SystemExit(f"--transport {transport}: this eplib build's Buffer rejected it: {error}") from error


def ranks_share_a_gpu(device: torch.device) -> bool:
    """True when two ranks of the group run on one GPU (their kernels then time-slice)."""
    properties = torch.cuda.get_device_properties(device)
    gpu = str(getattr(properties, "uuid", "")) or f"{socket.gethostname()}:{device.index}"
    gpus = [None] * dist.get_world_size()
    dist.all_gather_object(gpus, gpu)
    return len(set(gpus)) < len(gpus)


def make_tokens(point: Point, seed: int, rank: int, device: torch.device) -> torch.Tensor:
    """x [T, H]: small integers in [-4, 4], so every sum the guard checks is exact in every dtype."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank + 500)
    x = torch.randint(-4, 5, (point.tokens, point.hidden), generator=generator)
    return x.to(DTYPES[point.dtype]).to(device)


def make_pipelines(point: Point, buffer: eplib.Buffer, reference: Optional[ReferenceBuffer], seed: int,
                   device: torch.device, framework: bool = True) -> List[Pipeline]:
    """eplib (on ``device``), the reference (on CPU copies of the same inputs) and the framework
    baseline (on ``device``) on this rank's inputs for ``point``."""
    rank = dist.get_rank()
    topk_idx, topk_weights = routing.generate(point.spec, point.tokens, seed, rank)
    x = make_tokens(point, seed, rank, torch.device("cpu"))
    experts = point.spec.num_experts
    on_device = DeepEPStylePipeline("eplib", buffer, x.to(device), topk_idx.to(device), topk_weights.to(device),
                                    experts)
    pipelines: List[Pipeline] = [on_device]
    if reference is not None:
        pipelines.append(DeepEPStylePipeline("reference", reference, x, topk_idx, topk_weights, experts))
    if framework:
        pipelines.append(FrameworkPipeline(dist.group.WORLD, on_device.x, on_device.topk_idx, experts))
    return pipelines


def check_outputs(pipelines: List[Pipeline], point: Point) -> Dict[str, Dict[str, object]]:
    """Each implementation's combine of identity-expert outputs against x * K (exact); the
    baselines also against eplib's. Returns per implementation {passed, max_abs_diff_vs_eplib}."""
    outputs = {p.name: p.check_output() for p in pipelines}
    x = pipelines[0].x
    expected = (x.float() * point.spec.top_k).to(x.dtype)
    eplib_out = outputs["eplib"]
    checks = {}
    for name, out in outputs.items():
        passed = torch.equal(out, expected) and torch.equal(out, eplib_out)
        checks[name] = {"passed": passed, "max_abs_diff_vs_eplib": float((out.float() - eplib_out.float()).abs().max())
                        if out.numel() else 0.0}
    return checks


def run_iteration(pipeline: Pipeline, meter: CollectiveMeter, device: torch.device,
                  ops: Sequence[str] = OPS) -> List[Sample]:
    """One timed layout, dispatch (and cached dispatch when ``ops`` names it) and combine, then one
    timed end-to-end run; the samples in the order of ``ops``."""
    samples = {}
    layout, samples["layout"] = time_operation(pipeline.layout, meter, device)
    dispatched, samples["dispatch"] = time_operation(lambda: pipeline.dispatch(layout), meter, device)
    if "cached_dispatch" in ops:
        _, samples["cached_dispatch"] = time_operation(lambda: pipeline.cached_dispatch(dispatched), meter, device)
    _, samples["combine"] = time_operation(lambda: pipeline.combine(dispatched), meter, device)
    _, samples["end_to_end"] = time_operation(lambda: pipeline.combine(pipeline.dispatch(pipeline.layout())), meter,
                                              device)
    return [samples[op] for op in ops]


def gather_ranks(local: torch.Tensor) -> torch.Tensor:
    """All-gather ``local`` of every rank -> CPU tensor [R, *local.shape], row r from rank r."""
    flat = local.reshape(-1)
    gathered = torch.empty(dist.get_world_size() * flat.numel(), dtype=local.dtype, device=local.device)
    _all_gather_single(gathered, flat)
    return gathered.view((dist.get_world_size(),) + tuple(local.shape)).cpu()


def gather_samples(samples: Dict[str, List[List[Sample]]], device: torch.device) -> torch.Tensor:
    """Per rank [impl, iteration, op, Sample's fields] -> all ranks [R, ...] (float64)."""
    return gather_ranks(torch.tensor([[[list(s) for s in it] for it in per_impl] for per_impl in samples.values()],
                                     dtype=torch.float64, device=device))


def gather_checks(checks: Dict[str, Dict[str, object]], device: torch.device) -> Dict[str, Dict[str, object]]:
    """Checks of all ranks: passed on every rank, largest difference."""
    gathered = gather_ranks(torch.tensor([[float(c["passed"]), c["max_abs_diff_vs_eplib"]] for c in checks.values()],
                                         dtype=torch.float64, device=device))
    return {name: {"passed": bool(gathered[:, i, 0].min() == 1.0),
                   "max_abs_diff_vs_eplib": float(gathered[:, i, 1].max())} for i, name in enumerate(checks)}


def gather_mismatches(mismatches: List[str]) -> Dict[str, object]:
    """reference_mismatches of every rank -> {passed on every rank, the mismatches named by rank}."""
    per_rank: List[List[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, mismatches)
    named = [f"rank {rank}: {name}" for rank, names in enumerate(per_rank) for name in names]
    return {"passed": not named, "mismatches": named}


def run_point(point: Point, pipelines: List[Pipeline], args: argparse.Namespace, meter: CollectiveMeter,
              device: torch.device, gather_device: torch.device, checks: Dict[str, Dict[str, object]],
              ops: Sequence[str] = OPS) -> dict:
    """Times ``ops`` of every pipeline; the point record with ``checks`` (gathers on ``gather_device``)."""
    samples: Dict[str, List[List[Sample]]] = {p.name: [] for p in pipelines}
    for iteration in range(args.warmup + args.iters):
        for pipeline in pipelines:  # interleaved, so background load hits every implementation alike
            timed = run_iteration(pipeline, meter, device, ops)
            if iteration >= args.warmup:
                samples[pipeline.name].append(timed)
    gathered = gather_samples(samples, gather_device)
    return report.point_record(point, list(samples), ops, gathered, checks, collectives_timed=device.type == "cpu")


def run_ipc_point(point: Point, pipelines: List[Pipeline], args: argparse.Namespace, meter: CollectiveMeter,
                  device: torch.device, gather_device: torch.device, timed: bool) -> dict:
    """The ipc transport at one point: eplib against the reference on every rank; when ``timed``,
    eplib's figures, and with one rank its copy efficiency and the goals it measures."""
    on_device, reference = pipelines
    checks = {"eplib_vs_reference": gather_mismatches(reference_mismatches(on_device, reference))}
    if not timed:
        return {**report.point_fields(point), "results": {}, "ratios": {}, "check": checks, "timed": False}
    record = run_point(point, [on_device], args, meter, device, gather_device, checks, IPC_OPS)
    record["timed"] = True
    if dist.get_world_size() == 1:
        dispatched = on_device.dispatch(on_device.layout())
        traffic = copy_efficiency.traffic_bytes(on_device.x, on_device.topk_idx, on_device.topk_weights, dispatched)
        del dispatched
        record["copy_efficiency"] = copy_efficiency.figures(traffic, record["results"]["eplib"], args.warmup,
                                                            args.iters, meter, device)
        record["goals"] = copy_efficiency.goals(record, record["copy_efficiency"])
    return record


def main() -> None:
    args = parse_args()
    if args.mode == "ll":
        bench_low_latency.run(args, init_distributed(args.transport, args.timeout_s))
        return
    points = sweep(args)
    if args.plot:
        report.require_matplotlib()
    device = init_distributed(args.transport, args.timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    ipc = args.transport == "ipc"
    buffer = make_buffer(args.transport, points)
    reference = ReferenceBuffer(dist.group.WORLD) if device.type == "cpu" or ipc else None
    gather_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    meter = CollectiveMeter(args.timeout_s, time_collectives=device.type == "cpu")
    meter.install()
    machine = report.machine_info(world, args.transport, device)
    timed = True
    if ipc:
        timed = not ranks_share_a_gpu(device)
        machine.update(cuda_transport=buffer.transport_name("cuda"), num_nvl_bytes=buffer.num_nvl_bytes,
                       ranks_share_a_gpu=not timed, ipc_chunks=chunk_configuration(world))
        if rank == 0 and not timed:
            print(f"--transport ipc: the {world} processes share a GPU, which time-slices between processes, so "
                  "their timings mean nothing: correctness only, timings not reported", file=sys.stderr, flush=True)
    records = []
    started = time.monotonic()
    for index, point in enumerate(points):
        if rank == 0:
            print(f"[{index + 1}/{len(points)}] tokens={point.tokens} hidden={point.hidden} top-k={point.spec.top_k} "
                  f"experts={point.spec.num_experts} {point.dtype} {point.spec.label()}  "
                  f"({time.monotonic() - started:.0f} s elapsed)", file=sys.stderr, flush=True)
        pipelines = make_pipelines(point, buffer, reference, args.seed, device, framework=not ipc)
        if ipc:
            records.append(run_ipc_point(point, pipelines, args, meter, device, gather_device, timed))
        else:
            checks = gather_checks(check_outputs(pipelines, point), gather_device)
            records.append(run_point(point, pipelines, args, meter, device, gather_device, checks))
        del pipelines
    meter.uninstall()
    if rank == 0:
        machine["load_average_end"] = os.getloadavg()
        machine["sweep_seconds"] = round(time.monotonic() - started, 1)
        rules = {"traffic": copy_efficiency.TRAFFIC_RULE, "copy_efficiency": copy_efficiency.EFFICIENCY_RULE,
                 "host_time": report.HOST_RULE} if ipc else None
        result = report.assemble(args, machine, records, rules)
        print(report.render_ipc_tables(result) if ipc else report.render_tables(result))
        if args.json:
            report.write_json(result, args.json)
        if args.plot:
            if any(r["results"] for r in records):
                report.plot(result, args.plot)
            else:
                print(f"--plot: no timings to plot; {args.plot} not written", file=sys.stderr)
    failed = [r for r in records if not all(c["passed"] for c in r["check"].values())]
    del buffer, reference  # before the group goes (the ipc transport frees its peer buffer with all ranks)
    gc.collect()
    dist.destroy_process_group()
    if failed:
        raise SystemExit(f"correctness guard failed at {len(failed)} point(s); see the 'check' entries")


if __name__ == "__main__":
    main()
