"""How long each fault takes to reach every rank: the measured figures of README "Failure behaviour".

    python benchmarks/faults.py [--ranks 2 4] [--timeout 5] [--repeats 3]

Runs the fault cases of tests/test_faults.py, each in a fresh pool of rank processes (started by a
forkserver, gloo group on 127.0.0.1) with EPLIB_TIMEOUT_S=--timeout, and prints per case and group
size the seconds from the fault (or from a rank's own arrival at the collective, when later) to the
error on the other ranks (the slowest of them; min, median and max over the repeats, and over the
six collectives of a round where a case runs at each), and what follows it:

    bad input       one rank's input fails a check (int32 x in dispatch, an expert id out of range
                    in get_dispatch_layout, wrong rows in combine): from both ranks being in their
                    calls
    stopped         the last rank stops (SIGSTOP) before a collective, then is continued: from the
                    others' arrival at that collective; the stopped rank's own error from SIGCONT;
                    the next round's correctness
    killed          the last rank is killed (SIGKILL) before a collective: from the kill
    store stopped   rank 0, which hosts the store, stops before the dispatch: from the others'
                    arrival there
    store killed    rank 0 is killed before the dispatch: from the kill
    shutdown        the last rank stops for good; the others' eplib.abort + destroy_process_group
    exit            2 ranks started as torchrun would: rank 1 stops for good, rank 0 times out (at
                    EPLIB_TIMEOUT_S=1.5) and returns from main without eplib.abort: from its error
                    to its exit (eplib's exit hook)

--cases picks some of them (default: all).
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch

_TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import test_faults as faults  # noqa: E402
from dist_harness import RankPool  # noqa: E402
from report import machine_info  # noqa: E402


_CASES = ("bad input", "stopped", "killed", "store host stopped", "store host killed", "shutdown", "exit")


def _pool(R: int, limit: float) -> RankPool:
    return RankPool(R, start_method="forkserver", gloo_timeout_s=faults.GLOO_LIMIT_S + 4 * limit)


def bad_input(R: int, limit: float) -> List[float]:
    pool = _pool(R, limit)
    try:
        seconds = []
        for name in ("dispatch_x_int32", "layout_expert_id_equal_E", "combine_x_rows_vs_handle"):
            results = pool.run(faults.job_one_rank_bad, name, R - 1, timeout=120)
            assert all(not next_round for *_, next_round in results), results
            bad_started = results[-1][1]
            seconds.append(max(ended - max(started, bad_started) for _, started, ended, _ in results[:-1]))
        return seconds
    finally:
        pool.kill()


def stopped(R: int, limit: float, stamps: Path) -> Dict[str, List[float]]:
    stamps.mkdir(parents=True, exist_ok=True)
    pool, figures = _pool(R, limit), {"others": [], "stopped rank": [], "next round right": []}
    try:
        for op in range(len(faults.ROUND_OPS)):
            results, _, continued, next_round = faults._stop_case(pool, R, op, "stop", stamps / f"s{R}{op}",
                                                                           limit)
            figures["others"].append(max(_waited(results[r]) for r in range(R - 1)))
            figures["stopped rank"].append(results[R - 1][3] - continued)
            figures["next round right"].append(float(not any(next_round)))
        return figures
    finally:
        pool.kill()


def killed(R: int, stamps: Path) -> List[float]:
    results = faults._run_kills(R, stamps)
    assert all(errors == [] for case in results.values() for errors in case["recovered"].values()), results
    return [max(_since(case[r], case["killed"]) for r in range(R - 1)) for case in results.values()]


def store_host(R: int, action: str, limit: float, stamps: Path) -> float:
    """Seconds from rank 0's kill (or from the others' arrival at the collective it stopped before) to
    the slowest other rank's error."""
    pool = _pool(R, limit)
    try:
        job = pool.submit(faults.job_store_host_fault, action, str(stamps / f"h{R}{action}"), limit)
        results = pool.collect(job, range(1, R), timeout=6 * limit + 60, gone=[0])
        if action == "stop":
            return max(_waited(results[r]) for r in range(1, R))
        return max(_since(results[r], faults._acted_at(stamps / f"h{R}{action}")) for r in range(1, R))
    finally:
        pool.kill()


def shutdown(R: int, limit: float, stamps: Path) -> float:
    pool = _pool(R, limit)
    try:
        job = pool.submit(faults.job_shutdown_after_stuck_peer, str(stamps / f"x{R}"))
        return max(s for _, s in pool.collect(job, range(R - 1), timeout=limit + 60).values())
    finally:
        pool.kill()


def _since(result: tuple, fault: float) -> float:
    """Seconds from the fault, or from the rank's own arrival at the failed collective when that was
    later, to its error (result: tests/test_faults.py's job_faulty_round)."""
    _, _, op_started, raised, _ = result
    return raised - max(op_started, fault)


def process_exit() -> float:
    returncode, seconds, out = faults.exit_after_stuck_peer()
    assert returncode == 0 and seconds is not None, out
    return seconds


def _waited(result: tuple) -> float:
    """Seconds from the rank's arrival at the failed collective to its error: what a timeout counts."""
    _, _, op_started, raised, _ = result
    return raised - op_started


def _spread(values: List[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f} s"


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--timeout", type=float, default=5.0, help="EPLIB_TIMEOUT_S of the cases")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=_CASES, default=list(_CASES))
    args = parser.parse_args(argv)
    limit = args.timeout
    machine = machine_info(1, "cpu", torch.device("cpu"))
    print(f"{machine['cores']} cores ({machine['cpu_model']}), torch {machine['torch']}, {machine['date_utc']}; "
          f"EPLIB_TIMEOUT_S={args.timeout:g}; min / median / max over {args.repeats} repeats")
    stamps = Path(tempfile.mkdtemp(prefix="eplib-faults-"))
    for R in args.ranks:
        runs: Dict[str, List[float]] = {}
        next_round_right = True
        for repeat in range(args.repeats):
            for case in args.cases:
                if case == "bad input":
                    runs.setdefault(case, []).extend(bad_input(R, limit))
                elif case == "stopped":
                    stop = stopped(R, limit, stamps / f"r{repeat}")
                    runs.setdefault("stopped: others", []).extend(stop["others"])
                    runs.setdefault("stopped: the stopped rank, once continued", []).extend(stop["stopped rank"])
                    next_round_right &= all(stop["next round right"])
                elif case == "killed":
                    runs.setdefault(case, []).extend(killed(R, Path(tempfile.mkdtemp(dir=stamps))))
                elif case in ("store host stopped", "store host killed"):
                    action = "stop" if case == "store host stopped" else "kill"
                    runs.setdefault(case, []).append(store_host(R, action, limit, stamps))
                elif case == "shutdown":
                    runs.setdefault(case, []).append(shutdown(R, limit, stamps))
                elif case == "exit" and R == 2:
                    runs.setdefault(case, []).append(process_exit())
        print(f"\n{R} ranks:")
        for name, values in runs.items():
            print(f"  {name:45s} {_spread(values)}   ({len(values)} samples)")
        if "stopped" in args.cases:
            print(f"  the round after each stop right on every rank: {next_round_right}")


if __name__ == "__main__":
    main()
