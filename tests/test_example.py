"""The main job, examples/moe_layer.py, run as users run it (torchrun), on small sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_example(nproc, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "examples" / "moe_layer.py"), "--steps", "30", "--log-every", "10", "--batch", "4",
               "--seq-len", "32", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("nproc,parallel", [(2, "ep"), (4, "tp")])
def test_example_trains_and_loss_falls(nproc, parallel):
    result = _run_example(nproc, "--parallel", parallel)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loss fell" in result.stdout, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 3 and all(f"[{parallel}]" in line and "MaxVio" in line for line in lines), result.stdout
    assert f"parallel={parallel}" in result.stdout


def test_example_writes_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    result = _run_example(2, "--steps", "12", "--plot", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.stat().st_size > 1000
