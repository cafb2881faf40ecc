"""The main job, examples/moe_layer.py, run as users run it (torchrun), on small sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("nproc,extra", [(2, ["--dtype", "bf16"]), (4, ["--experts", "8", "--top-k", "3"])])
def test_moe_layer_example_matches_dense_reference(nproc, extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / "examples" / "moe_layer.py"), "--tokens", "48", "--hidden", "32", "--ffn-hidden", "64",
               "--steps", "2", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout, result.stdout
