"""The balancing controllers side by side: eplib.moe.Balancer's sign rule and quantile controller on
the same routed scores of a skewed router, on 1 and 4 gloo ranks, and inside the example's training.

Run (one command; it starts the torchrun jobs itself and prints, plots and saves everything):

    python benchmarks/bench_balance.py --json balance.json --plot balance.png

Simulation: a sigmoid router of E=64 experts, top-8, skewed towards 4 experts (feature 0 of every
token is 1 and those experts' weight on it is raised), routes a fresh batch of T tokens per step
(``--tokens``, the group's batch, split evenly over the ranks; every controller and every rank count
sees the same tokens) for ``--steps`` steps; ``Balancer.step()`` after each. Per controller: steps
until batch MaxVio < 0.3, the mean batch MaxVio over the last ``--window`` steps, MaxVio of the
counts accumulated over those steps, and the median time of ``step()`` and of the router's forward
(slowest rank, after a barrier). The noise floor: the mean batch MaxVio of an ideal router that
picks K distinct experts uniformly at random per token (``--floor-draws`` draws), beside the
closed form of ``load_stats()["max_vio_floor"]``.

Example: ``examples/moe_layer.py`` on 4 ranks per controller and seed; the final loss is the mean of
the last 20 steps, averaged over the seeds.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

import eplib
from eplib.moe import Balancer, max_violation, max_violation_floor
from report import machine_info

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "moe_layer.py")
HIDDEN, NUM_EXPERTS, TOP_K = 32, 64, 8
HOT_EXPERTS, SKEW = 4, 1.0
BALANCED = 0.3  # "balanced": batch MaxVio below this
LOSS_WINDOW = 20  # the example's final loss: mean of its last LOSS_WINDOW steps

# name -> Balancer keyword arguments. The simulation runs all; the example the ones in EXAMPLE_RUNS.
CONTROLLERS = {
    "sign 1e-3": dict(method="sign", bias_update_rate=1e-3),
    "sign 1e-2": dict(method="sign", bias_update_rate=1e-2),
    "quantile 0.5": dict(method="quantile", damping=0.5),
    "quantile 0.3": dict(method="quantile", damping=0.3),
}
EXAMPLE_RUNS = {
    "sign 1e-2": ["--balancer", "sign", "--bias-update-rate", "1e-2"],
    "sign 1e-3": ["--balancer", "sign", "--bias-update-rate", "1e-3"],
    "quantile 0.5": ["--balancer", "quantile", "--damping", "0.5"],
}
COLORS = {"sign 1e-3": "tab:blue", "sign 1e-2": "tab:orange", "quantile 0.5": "tab:green", "quantile 0.3": "tab:red"}
GOAL_CONTROLLER, BASELINE = "quantile 0.5", "sign 1e-3"
EXAMPLE_BASELINE = "sign 1e-2"  # the example's default rate
GOALS = dict(steps=10, floor_ratio=1.15, accumulated=0.005)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,4", help="comma-separated rank counts of the simulation")
    parser.add_argument("--tokens", default="4096,512", help="comma-separated tokens per step (the group's)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--window", type=int, default=200, help="the last steps the steady figures cover")
    parser.add_argument("--floor-draws", type=int, default=400)
    parser.add_argument("--example-seeds", type=int, default=3, help="example runs per controller (0: none)")
    parser.add_argument("--example-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="OUT.json")
    parser.add_argument("--plot", metavar="OUT.png", help="needs matplotlib")
    parser.add_argument("--from-json", metavar="IN.json", help="print and plot a saved --json report instead of running")
    parser.add_argument("--worker", metavar="OUT.json", help=argparse.SUPPRESS)  # set by the driver
    args = parser.parse_args(argv)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if not 0 < args.window <= args.steps:
        parser.error("--window must be in [1, --steps]")
    for tokens in args.tokens:
        if any(tokens % ranks for ranks in args.ranks):
            parser.error(f"--tokens {tokens} must be a multiple of every rank count in --ranks")
    return args


# ---------------------------------------------------------------------------------------------
# Worker: one torchrun job runs every (tokens, controller) of the simulation
# ---------------------------------------------------------------------------------------------

def batch_tokens(seed: int, step: int, tokens: int) -> torch.Tensor:
    """The group's batch of one step, float32 ``[tokens, HIDDEN]``, the same for every controller
    and every rank count."""
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
    x[:, 0] = 1.0
    return x


def simulate(controller: Dict[str, object], tokens: int, args: argparse.Namespace) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = eplib.MoE(HIDDEN, 4, NUM_EXPERTS, TOP_K, score_func="sigmoid", seed=args.seed)
    with torch.no_grad():
        moe.router.weight[:HOT_EXPERTS, 0] += SKEW
    balancer = Balancer(moe, **controller)
    share = tokens // world
    batch_max_vio, times_ms = [], torch.zeros(args.steps, 2, dtype=torch.float64)
    for step in range(args.steps):
        if step == args.steps - args.window:
            moe.reset_load_stats()
        x = batch_tokens(args.seed, step, tokens)[rank * share:(rank + 1) * share]
        dist.barrier()
        start = time.perf_counter()
        moe.router(x)
        routed = time.perf_counter()
        dist.barrier()
        stepping = time.perf_counter()
        balancer.step()
        times_ms[step] = torch.tensor([routed - start, time.perf_counter() - stepping]) * 1e3
        batch_max_vio.append(float(moe.load_stats()["max_vio_batch"]))
    dist.all_reduce(times_ms, op=dist.ReduceOp.MAX)  # the slowest rank per step
    stats = moe.load_stats()
    steady = batch_max_vio[-args.window:]
    return {"batch_max_vio": batch_max_vio,
            "steps_to_balanced": next((i + 1 for i, v in enumerate(batch_max_vio) if v < BALANCED), None),
            "steady_batch_max_vio": sum(steady) / len(steady),
            "accumulated_max_vio": float(stats["max_vio_accumulated"]),
            "floor_closed_form": float(stats["max_vio_floor"]),
            "forward_ms": statistics.median(times_ms[:, 0].tolist()),
            "step_ms": statistics.median(times_ms[:, 1].tolist())}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        results = {f"{tokens}/{name}": simulate(controller, tokens, args)
                   for tokens in args.tokens for name, controller in CONTROLLERS.items()}
        if dist.get_rank() == 0:
            with open(args.worker, "w") as out:
                json.dump({"ranks": dist.get_world_size(), "runs": results}, out)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def torchrun(num_ranks: int, script: str, script_args: List[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_ranks}",
               script, *script_args]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def measured_floor(tokens: int, draws: int, seed: int) -> float:
    """Mean batch MaxVio of the ideal router: each token picks TOP_K distinct experts uniformly."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(draws):
        chosen = torch.rand(tokens, NUM_EXPERTS, generator=generator).topk(TOP_K, dim=-1).indices
        total += float(max_violation(torch.bincount(chosen.flatten(), minlength=NUM_EXPERTS)))
    return total / draws


def run_example(name: str, seed: int, steps: int, out_dir: str) -> dict:
    path = os.path.join(out_dir, f"example-{name.replace(' ', '_')}-{seed}.json")
    torchrun(4, EXAMPLE, [*EXAMPLE_RUNS[name], "--seed", str(seed), "--steps", str(steps), "--log-every",
                          str(steps), "--json", path])
    with open(path) as f:
        run = json.load(f)
    history = run["history"]
    max_vio = history["max_vio"]
    return {"loss": history["loss"], "max_vio": max_vio,
            "final_loss": sum(history["loss"][-LOSS_WINDOW:]) / LOSS_WINDOW,
            "steps_to_balanced": next((i + 1 for i, v in enumerate(max_vio) if v < BALANCED), None),
            "steady_batch_max_vio": sum(max_vio[-100:]) / len(max_vio[-100:]),
            "floor_closed_form": history["max_vio_floor"][-1], "seconds": run["seconds"]}


def print_report(report: dict, args: argparse.Namespace) -> None:
    machine = report["machine"]
    print(f"machine: {machine['cores']} cores, {machine['cpu_model']}; torch {machine['torch']}; "
          f"load average at start {machine['load_average_start']}")
    print(f"simulation: E={NUM_EXPERTS} top-{TOP_K}, sigmoid router skewed to {HOT_EXPERTS} experts, {args.steps} "
          f"steps, steady figures over the last {args.window}; times: median over steps of the slowest rank")
    for tokens in args.tokens:
        floor = report["floor"][str(tokens)]
        print(f"\nT = {tokens} tokens per step: noise floor {floor['measured']:.4f} (ideal router, "
              f"{args.floor_draws} draws), closed form {floor['closed_form']:.4f}")
        print(f"  {'ranks':>5} {'controller':<13} {'steps<0.3':>9} {'steady':>7} {'/floor':>6} "
              f"{'accum.':>7} {'step() ms':>9} {'forward ms':>10}")
        for ranks in args.ranks:
            for name in report["controllers"]:
                run = report["simulation"][str(ranks)][f"{tokens}/{name}"]
                steps = run["steps_to_balanced"] if run["steps_to_balanced"] is not None else f">{args.steps}"
                print(f"  {ranks:>5} {name:<13} {steps:>9} {run['steady_batch_max_vio']:7.4f} "
                      f"{run['steady_batch_max_vio'] / floor['measured']:6.3f} {run['accumulated_max_vio']:7.4f} "
                      f"{run['step_ms']:9.3f} {run['forward_ms']:10.3f}")
        if len(args.ranks) > 1:
            same = all(report["simulation"][str(r)][f"{tokens}/{name}"]["batch_max_vio"]
                       == report["simulation"][str(args.ranks[0])][f"{tokens}/{name}"]["batch_max_vio"]
                       for r in args.ranks for name in report["controllers"])
            print(f"  every controller's batch MaxVio, step by step, identical on {args.ranks} ranks: "
                  f"{'yes' if same else 'NO'}")
    if report["example"]:
        print(f"\nexample (examples/moe_layer.py, 4 ranks, {args.example_steps} steps, seeds 0..{args.example_seeds - 1};"
              f" final loss = mean of the last {LOSS_WINDOW} steps; steady MaxVio = mean of the last 100 steps):")
        for name, runs in report["example"].items():
            losses = [run["final_loss"] for run in runs]
            print(f"  {name:<13} final loss {statistics.mean(losses):.4f} (per seed "
                  + ", ".join(f"{v:.4f}" for v in losses) + f"); steps<0.3 "
                  + ", ".join(str(run["steps_to_balanced"]) for run in runs)
                  + f"; steady MaxVio {statistics.mean(run['steady_batch_max_vio'] for run in runs):.3f} "
                  f"(floor {runs[0]['floor_closed_form']:.3f})")
    print(f"\ngoals ({GOAL_CONTROLLER}; the baseline {BASELINE}):")
    for tokens in args.tokens:
        floor = report["floor"][str(tokens)]["measured"]
        for ranks in args.ranks:
            run = report["simulation"][str(ranks)][f"{tokens}/{GOAL_CONTROLLER}"]
            base = report["simulation"][str(ranks)][f"{tokens}/{BASELINE}"]
            checks = [(f"steps to MaxVio < {BALANCED} <= {GOALS['steps']} (baseline {base['steps_to_balanced']})",
                       run["steps_to_balanced"] is not None and run["steps_to_balanced"] <= GOALS["steps"],
                       run["steps_to_balanced"]),
                      (f"steady batch MaxVio <= {GOALS['floor_ratio']} x floor",
                       run["steady_batch_max_vio"] <= GOALS["floor_ratio"] * floor,
                       f"{run['steady_batch_max_vio'] / floor:.3f} x"),
                      (f"accumulated MaxVio <= {GOALS['accumulated']}",
                       run["accumulated_max_vio"] <= GOALS["accumulated"], f"{run['accumulated_max_vio']:.4f}")]
            for text, met, value in checks:
                print(f"  T={tokens}, {ranks} rank(s): {text}: {value} -> {'met' if met else 'MISSED'}")
    if report["example"]:
        goal = statistics.mean(run["final_loss"] for run in report["example"][GOAL_CONTROLLER])
        base = statistics.mean(run["final_loss"] for run in report["example"][EXAMPLE_BASELINE])
        print(f"  example: final loss {goal:.4f} <= {EXAMPLE_BASELINE}'s {base:.4f} -> "
              f"{'met' if goal <= base else 'MISSED'}")


def write_plot(path: str, report: dict, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(args.tokens) + (2 if report["example"] else 0)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    axes = axes[0]
    simulation = report["simulation"][str(args.ranks[-1])]
    for axis, tokens in zip(axes, args.tokens):
        for name in report["controllers"]:
            axis.plot(range(1, args.steps + 1), simulation[f"{tokens}/{name}"]["batch_max_vio"], label=name, lw=0.8,
                      color=COLORS.get(name))
        axis.axhline(report["floor"][str(tokens)]["measured"], color="black", ls="--", lw=1, label="noise floor")
        axis.set(yscale="log", xlabel="step", ylabel="batch MaxVio",
                 title=f"skewed router, E={NUM_EXPERTS} top-{TOP_K}, T={tokens}")
    axes[0].legend(fontsize=7)
    if report["example"]:
        loss_axis, vio_axis = axes[len(args.tokens):]
        for name, runs in report["example"].items():
            # mean over seeds, then a 10-step moving average
            loss = torch.tensor([run["loss"] for run in runs]).mean(0)
            smooth = torch.nn.functional.avg_pool1d(loss.view(1, 1, -1), 10, 1).flatten()
            loss_axis.plot(range(10, len(loss) + 1), smooth.tolist(), label=name, lw=1, color=COLORS.get(name))
            vio = torch.tensor([run["max_vio"] for run in runs]).mean(0)
            vio_axis.plot(range(1, len(vio) + 1), vio.tolist(), label=name, lw=0.8, color=COLORS.get(name))
        vio_axis.axhline(report["example"][name][0]["floor_closed_form"], color="black", ls="--", lw=1)
        seeds = len(next(iter(report["example"].values())))
        loss_axis.set(xlabel="step", ylabel="loss (10-step mean)", title=f"example: loss, mean of {seeds} seeds")
        loss_axis.set_ylim(top=3.0)
        vio_axis.set(yscale="log", xlabel="step", ylabel="batch MaxVio (max of layers)",
                     title=f"example: MaxVio, mean of {seeds} seeds")
        loss_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=72)
    from PIL import Image  # matplotlib's own dependency

    # A palette PNG is about a third of the size (the README shows this plot).
    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=64)
    palette.save(path, optimize=True)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.from_json:
        with open(args.from_json) as f:
            report = json.load(f)
        args = parse_args(report["argv"] + (["--plot", args.plot] if args.plot else []))
        print_report(report, args)
        if args.plot:
            write_plot(args.plot, report, args)
        return
    report = {"machine": machine_info(1, "gloo", torch.device("cpu")), "argv": sys.argv[1:],
              "controllers": list(CONTROLLERS), "simulation": {}, "floor": {}, "example": {}}
    forwarded = ["--tokens", ",".join(map(str, args.tokens)), "--steps", str(args.steps), "--window",
                 str(args.window), "--seed", str(args.seed), "--ranks", ",".join(map(str, args.ranks))]
    with tempfile.TemporaryDirectory() as out_dir:
        for ranks in args.ranks:
            path = os.path.join(out_dir, f"simulation-{ranks}.json")
            torchrun(ranks, os.path.abspath(__file__), [*forwarded, "--worker", path])
            with open(path) as f:
                report["simulation"][str(ranks)] = json.load(f)["runs"]
        for tokens in args.tokens:
            report["floor"][str(tokens)] = {
                "measured": measured_floor(tokens, args.floor_draws, args.seed),
                "closed_form": float(max_violation_floor(torch.tensor(tokens), TOP_K, NUM_EXPERTS))}
        for name in EXAMPLE_RUNS if args.example_seeds > 0 else ():
            report["example"][name] = [run_example(name, seed, args.example_steps, out_dir)
                                       for seed in range(args.example_seeds)]
    report["machine"]["load_average_end"] = os.getloadavg()
    print_report(report, args)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out)
    if args.plot:
        write_plot(args.plot, report, args)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
