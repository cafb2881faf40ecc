"""benchmarks/bench_balance.py: its simulation gives the same figures on 2 and 4 ranks (the
quantile is exact and the counts are integers), the quantile controller balances before the sign
rule, and the report and plot are written (small sizes, in the running rank pools)."""

import os
import sys

import pytest

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
ARGS = ["--ranks", "2,4", "--tokens", "256", "--steps", "12", "--window", "6", "--floor-draws", "10",
        "--example-seeds", "0"]
CONTROLLERS = ("sign 1e-3", "quantile 0.5")


def _bench():
    if _BENCH not in sys.path:
        sys.path.insert(0, _BENCH)
    import bench_balance

    return bench_balance


def job_simulate(rank, world_size, group):
    bench = _bench()
    args = bench.parse_args(ARGS)
    return {f"256/{name}": bench.simulate(bench.CONTROLLERS[name], 256, args) for name in CONTROLLERS}


def test_simulation_is_the_same_on_2_and_4_ranks_and_reports(pool2, pool4, tmp_path, capsys):
    bench = _bench()
    runs = {str(pool.world_size): pool.run(job_simulate)[0] for pool in (pool2, pool4)}
    for name in CONTROLLERS:
        assert runs["2"][f"256/{name}"]["batch_max_vio"] == runs["4"][f"256/{name}"]["batch_max_vio"]
    quantile, sign = runs["4"]["256/quantile 0.5"], runs["4"]["256/sign 1e-3"]
    assert quantile["batch_max_vio"][0] == sign["batch_max_vio"][0] > 3  # same skewed start
    assert max(quantile["batch_max_vio"][-6:]) < 1.0 < min(sign["batch_max_vio"])

    args = bench.parse_args(ARGS)
    report = {"machine": {"cores": 2, "cpu_model": "test", "torch": "test", "load_average_start": (0, 0, 0)},
              "controllers": list(CONTROLLERS), "simulation": runs,
              "floor": {"256": {"measured": bench.measured_floor(256, args.floor_draws, 0), "closed_form": 0.4}},
              "example": {}}
    bench.print_report(report, args)
    printed = capsys.readouterr().out
    assert "identical on [2, 4] ranks: yes" in printed and "MISSED" in printed  # 12 steps: far from the goals
    pytest.importorskip("matplotlib")
    bench.write_plot(str(tmp_path / "balance.png"), report, args)
    assert (tmp_path / "balance.png").stat().st_size > 1000
