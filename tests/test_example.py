"""The main job, examples/moe_layer.py, run as users run it (torchrun), on small sizes."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The run that also writes the plot (--plot), when matplotlib is importable.
PLOTTED = (2, "ep")


def _run_example(nproc, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "examples" / "moe_layer.py"), "--steps", "30", "--log-every", "10", "--batch", "4",
               "--seq-len", "32", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _matplotlib_importable() -> bool:
    """What pytest.importorskip("matplotlib") checks (test_example_writes_plot skips without it)."""
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """run(nproc, parallel) -> (the torchrun result, the plot's path or None), one torchrun per
    (nproc, parallel) and module; the PLOTTED run also writes a plot when matplotlib is importable."""
    runs = {}

    def run(nproc, parallel):
        if (nproc, parallel) not in runs:
            extra, plot = ["--parallel", parallel], None
            if (nproc, parallel) == PLOTTED and _matplotlib_importable():
                plot = tmp_path_factory.mktemp("plot") / "curves.png"
                extra += ["--plot", str(plot)]
            runs[nproc, parallel] = _run_example(nproc, *extra), plot
        return runs[nproc, parallel]

    return run


@pytest.mark.parametrize("nproc,parallel", [PLOTTED, (4, "tp")])
def test_example_trains_and_loss_falls(example_run, nproc, parallel):
    result, _ = example_run(nproc, parallel)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loss fell" in result.stdout, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 3 and all(f"[{parallel}]" in line and "MaxVio" in line for line in lines), result.stdout
    assert f"parallel={parallel}" in result.stdout


def test_example_writes_plot(example_run):
    """The plot of the PLOTTED run (no torchrun of its own)."""
    pytest.importorskip("matplotlib")
    result, out = example_run(*PLOTTED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.stat().st_size > 1000
