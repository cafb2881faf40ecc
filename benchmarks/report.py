"""Turning the gathered samples into figures: per-point records, tables, JSON, plot, machine info."""

import datetime
import json
import os
import platform
import statistics
import sys
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from timing import summarize

BYTE_RULE = ("bytes = what each rank sends to OTHER ranks through the collectives (all_to_all_single: its input "
             "minus the split it sends to itself; all-gather: its input x (R-1)), payload and metadata (counts, "
             "records, top-k ids and weights) alike, self-sends not counted, summed over all ranks; the same shim "
             "counts eplib, the reference and the framework baseline. GB/s = these bytes / median time.")
TIME_RULE = ("times: per iteration the slowest rank's wall time of the operation, timed right after a barrier "
             "(CPU: time.perf_counter_ns; CUDA: events); median [p10-p90] over iterations.")
HOST_RULE = ("host time: per iteration the largest over ranks of time.perf_counter_ns from the call until it "
             "returned (CUDA: without waiting for the device, so launches and host syncs inside the call); median.")
COLLECTIVE_RULE = ("collective share: the slowest rank's time inside all_to_all_single / all-gather calls "
                   "(including waiting for peers) over its time for the operation; the rest is eplib's kernels, "
                   "copies and Python. Median over iterations. CPU only.")
IMPLS = ("eplib", "reference", "framework")


def machine_info(world_size: int, transport: str, device: torch.device) -> dict:
    """Cores, CPU model, GPU, versions, date, command line and the load when the run started."""
    cpu_model = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu_model = models[0] if models else cpu_model
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f"torchrun --standalone --nproc_per_node={world_size} " + " ".join(sys.argv),
        "ranks": world_size,
        "transport": transport,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "torch_threads_per_rank": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }


def _op_record(per_rank: torch.Tensor, op: int) -> dict:
    """Figures of one op from per_rank [R, iterations, ops, (elapsed_ms, collective_ms, bytes, host_ms)]."""
    elapsed = per_rank[:, :, op, 0]
    slowest = elapsed.argmax(dim=0)  # [iterations]: the rank each iteration waited for
    iterations = torch.arange(elapsed.shape[1])
    slowest_ms = elapsed[slowest, iterations]
    collective_ms = per_rank[slowest, iterations, op, 1]
    bytes_per_rank = [int(b) for b in per_rank[:, -1, op, 2]]
    record = summarize(slowest_ms.tolist())
    record["host_median_ms"] = statistics.median(per_rank[:, :, op, 3].max(dim=0).values.tolist())
    record["samples_ms"] = [round(v, 4) for v in slowest_ms.tolist()]
    record["collective_ms"] = statistics.median(collective_ms.tolist())
    record["collective_share"] = statistics.median((collective_ms / slowest_ms.clamp(min=1e-9)).tolist())
    record["bytes"] = sum(bytes_per_rank)
    record["bytes_per_rank"] = bytes_per_rank
    record["gb_per_s"] = record["bytes"] / 1e9 / (record["median_ms"] / 1e3) if record["bytes"] else None
    return record


def point_record(point, names: Sequence[str], ops: Sequence[str], gathered: torch.Tensor, checks: dict,
                 collectives_timed: bool) -> dict:
    """One sweep point: parameters, per implementation and op the figures, ratios and the guard."""
    results = {}
    for i, name in enumerate(names):
        results[name] = {op: _op_record(gathered[:, i], j) for j, op in enumerate(ops)}
        if not collectives_timed:
            for figures in results[name].values():
                figures["collective_ms"] = figures["collective_share"] = None
    ratios = {}
    for name in names[1:]:
        ratios[f"{name}_over_eplib_time"] = {op: results[name][op]["median_ms"] / results["eplib"][op]["median_ms"]
                                             for op in ops}
        ratios[f"eplib_over_{name}_bytes"] = {  # None on one rank, where nothing leaves the rank
            op: results["eplib"][op]["bytes"] / results[name][op]["bytes"] if results[name][op]["bytes"] else None
            for op in ("dispatch", "combine", "end_to_end")}
    return {**point_fields(point), "results": results, "ratios": ratios, "check": checks}


def point_fields(point) -> dict:
    """The parameters of a sweep point, as every point record starts."""
    spec = point.spec
    return {
        "tokens_per_rank": point.tokens, "hidden": point.hidden, "top_k": spec.top_k, "num_experts": spec.num_experts,
        "dtype": point.dtype,
        "routing": {"kind": spec.kind, "label": spec.label(), "zipf_s": spec.zipf_s, "hot_fraction": spec.hot_fraction,
                    "n_group": spec.n_group, "topk_group": spec.topk_group},
    }


def assemble(args, machine: dict, points: List[dict], extra_rules: Optional[Dict[str, str]] = None) -> dict:
    return {
        "machine": machine,
        "settings": {"iters": args.iters, "warmup": args.warmup, "seed": args.seed, "quick": args.quick,
                     "seed_rule": "routing of rank r from torch.Generator().manual_seed(seed * 1000 + r); "
                                  "expert popularity from seed alone"},
        "rules": {"bytes": BYTE_RULE, "time": TIME_RULE, "collective_share": COLLECTIVE_RULE, **(extra_rules or {})},
        "points": points,
    }


def _cell(figures: dict) -> str:
    return f"{figures['median_ms']:.2f} [{figures['p10_ms']:.2f}–{figures['p90_ms']:.2f}]"


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


KEY_HEADER = ["tokens/rank", "routing", "H/K/E", "dtype"]


def _key(p: dict) -> List[str]:
    return [str(p["tokens_per_rank"]), p["routing"]["label"], f"{p['hidden']}/{p['top_k']}/{p['num_experts']}",
            p["dtype"]]


def _machine_line(result: dict) -> str:
    m = result["machine"]
    return (f"{m['ranks']} ranks, {m['backend']} (eplib transport {m['transport']}), "
            f"{m['cores']} cores ({m['cpu_model']})"
            + (f", GPU {m['gpu']}" if m["gpu"] else "") + f", torch {m['torch']}, {m['date_utc']}, "
            f"{result['settings']['iters']} iterations after {result['settings']['warmup']} warm-up, "
            f"load average at start {m['load_average_start'][0]:.2f}")


def render_tables(result: dict) -> str:
    """Markdown tables (readable in a terminal, pasteable into RESULTS.md)."""
    points = result["points"]
    names = [n for n in IMPLS if n in points[0]["results"]]
    out = [_machine_line(result), "", TIME_RULE, ""]

    out.append("Layout + dispatch + combine, end to end (ms):\n")
    rows = []
    for p in points:
        r = p["results"]
        ratios = [f"{p['ratios'][f'{n}_over_eplib_time']['end_to_end']:.2f}x" for n in names[1:]]
        rows.append(_key(p) + [_cell(r[n]["end_to_end"]) for n in names] + ratios)
    out.append(_table(KEY_HEADER + [f"{n} ms" for n in names] + [f"{n}/eplib" for n in names[1:]], rows))

    out.append("\nPer phase, median ms (layout / dispatch / combine):\n")
    rows = [_key(p) + [" / ".join(f"{p['results'][n][op]['median_ms']:.2f}" for op in ("layout", "dispatch", "combine"))
                      for n in names] for p in points]
    out.append(_table(KEY_HEADER + names, rows))

    out.append("\nBytes moved (dispatch + combine, all ranks), bandwidth and time in collectives (end to end):\n")
    rows = []
    for p in points:
        r = p["results"]
        row = _key(p) + [f"{r[n]['end_to_end']['bytes'] / 1e6:.2f}" for n in names]
        row += [_number(p["ratios"][f"eplib_over_{n}_bytes"]["end_to_end"], "{:.3f}") for n in names[1:]]
        row += [_number(r[n]["end_to_end"]["gb_per_s"], "{:.2f}") for n in names]
        row += [_share(r[n]["end_to_end"]) for n in names]
        row.append(" / ".join(_share(r["eplib"][op]) for op in ("dispatch", "combine")))
        rows.append(row)
    header = (KEY_HEADER + [f"{n} MB" for n in names] + [f"eplib/{n} bytes" for n in names[1:]]
              + [f"{n} GB/s" for n in names] + [f"{n} in collectives" for n in names]
              + ["eplib in collectives: dispatch / combine"])
    out.append(_table(header, rows))
    out += ["", BYTE_RULE, COLLECTIVE_RULE, ""]

    out.append("Correctness guard (each implementation's combine of identity experts == x * K, bit for bit): "
               + _guard_outcome(points))
    return "\n".join(out)


def _guard_outcome(points: List[dict]) -> str:
    failed = [f"tokens={p['tokens_per_rank']} {p['routing']['label']}: {name}"
              + (f" ({', '.join(c['mismatches'])})" if c.get("mismatches") else "")
              for p in points for name, c in p["check"].items() if not c["passed"]]
    return "passed at every point" if not failed else "FAILED at " + "; ".join(failed)


def render_ipc_tables(result: dict) -> str:
    """The IPC transport's run: per-op times (when timed), one rank's copy efficiency and goals,
    and the check against eplib.reference."""
    m, points = result["machine"], result["points"]
    out = [_machine_line(result)]
    if m.get("ipc_chunks"):
        out.append(f"ipc rings ({m['num_nvl_bytes']} bytes of buffer; rings shrink to fit it, one chunk at least): " +
                   "; ".join(f"{op} {c['channels']} channels, chunks of {c['chunk_rows']} rows, rings of up to "
                             f"{c['ring_rows']} rows per (source, channel)" for op, c in m["ipc_chunks"].items()))
    out.append("")
    timed = [p for p in points if p["results"]]
    if not timed:
        out.append(f"Timings not reported: the {m['ranks']} processes share a GPU, which time-slices between "
                   "processes, so their times mean nothing. Correctness only.")
    else:
        out += [TIME_RULE, HOST_RULE, "", "Per op, device median ms [p10–p90] / host median us:\n"]
        ops = list(timed[0]["results"]["eplib"])
        rows = [_key(p) + [f"{_cell(f)} / {1e3 * f['host_median_ms']:.0f}" for f in p["results"]["eplib"].values()]
                for p in timed]
        out.append(_table(KEY_HEADER + ops, rows))
    efficient = [p for p in timed if p.get("copy_efficiency")]
    if efficient:
        out.append("\nCopy efficiency on one GPU (traffic / time against torch copy_ of the same traffic):\n")
        rows = []
        for p in efficient:
            for op, f in p["copy_efficiency"].items():
                rows.append(_key(p) + [op, f"{f['traffic_bytes'] / 1e6:.1f}", f"{f['median_ms'] * 1e3:.1f}",
                                       f"{f['gb_per_s']:.0f}", f"{f['copy_gb_per_s']:.0f}",
                                       f"{100 * f['efficiency']:.0f}%"])
        out.append(_table(KEY_HEADER + ["op", "traffic MB", "op us", "op GB/s", "copy GB/s", "% of copy"], rows))
        goals = [g for p in efficient for g in p["goals"]]
        if goals:
            out.append("\nGoals:\n")
            out.append(_table(["goal", "value", "target", "outcome"],
                              [[g["goal"], str(g["value"]), g["target"], "met" if g["met"] else "MISSED"]
                               for g in goals]))
        out += ["", result["rules"]["traffic"], result["rules"]["copy_efficiency"]]
    out.append("\nCheck against eplib.reference (CPU, same inputs; layout, dispatch outputs, rank_prefix_matrix, "
               "cached dispatch, combine; bit for bit): " + _guard_outcome(points))
    return "\n".join(out)


def _number(value: Optional[float], form: str) -> str:
    return "n/a" if value is None else form.format(value)


def _share(figures: dict) -> str:
    if figures["collective_share"] is None:
        return "n/a"
    return f"{100 * figures['collective_share']:.0f}% ({figures['collective_ms']:.1f} ms)"


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def require_matplotlib() -> None:
    """Fail before the sweep, not after it, when --plot cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from error


def plot(result: dict, path: str) -> None:
    """End-to-end median latency vs tokens per rank, one panel per configuration, one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels: Dict[str, List[dict]] = {}
    for p in result["points"]:
        title = f"{p['routing']['label']}, H={p['hidden']} K={p['top_k']} E={p['num_experts']} {p['dtype']}"
        panels.setdefault(title, []).append(p)
    columns = min(2, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    machine = result["machine"]
    for axis, (title, points) in zip(axes.flat, panels.items()):
        points = sorted(points, key=lambda p: p["tokens_per_rank"])
        tokens = [p["tokens_per_rank"] for p in points]
        for name in IMPLS:
            if name not in points[0]["results"]:
                continue
            figures = [p["results"][name]["end_to_end"] for p in points]
            median = [f["median_ms"] for f in figures]
            errors = [[m - f["p10_ms"] for m, f in zip(median, figures)],
                      [f["p90_ms"] - m for m, f in zip(median, figures)]]
            label = f"eplib ({machine['transport']})" if name == "eplib" else name
            axis.errorbar(tokens, median, yerr=errors, marker="o", capsize=3, label=label)
        axis.set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="layout+dispatch+combine, ms",
                 title=title)
        axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        axis.set_xticks(tokens, [str(t) for t in tokens])
        axis.legend()
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.suptitle(f"{machine['ranks']} ranks, {machine['backend']}, {machine['cores']} cores, {machine['date_utc']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
