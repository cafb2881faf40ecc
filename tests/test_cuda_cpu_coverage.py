"""Every __global__ function of csrc/cuda ran in the CPU execution during this test session.

Each process of the session logs the kernels it launches (EPLIB_CUDA_CPU_LAUNCH_LOG, set by
conftest.py; spawned ranks inherit it). This test runs after every other cuda_cpu test of the session
(marker after_cuda_cpu_suite) and compares the log with the kernels declared in the sources; it skips
when the session did not run the whole cuda_cpu suite (-k, -m or a file subset)."""

import os
import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cuda_cpu, pytest.mark.after_cuda_cpu_suite]

CUDA_SOURCES = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
# The test files that launch kernels through the CPU execution.
SUITE = {"test_cuda_kernels.py", "test_nccl_cuda_cpu.py", "test_ipc_cuda_cpu.py", "test_cuda_cpu_runtime.py",
         "test_low_latency_cuda_cpu.py"}


def kernels_in_sources() -> set:
    """Names of the __global__ functions declared in csrc/cuda."""
    pattern = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
    names = set()
    for path in sorted(CUDA_SOURCES.glob("*.cu*")):
        names.update(pattern.findall(path.read_text()))
    return names


def launched_kernels() -> set:
    directory = Path(os.environ["EPLIB_CUDA_CPU_LAUNCH_LOG"])
    return {line for path in directory.iterdir() for line in path.read_text().split()}


def test_the_sources_declare_the_kernels_this_test_expects():
    """The regular expression finds the kernels (a change of declaration style must not hide them)."""
    found = kernels_in_sources()
    assert {"dispatch_layout_kernel", "combine_reduce_kernel", "notify_kernel", "barrier_kernel",
            "permute_rows_kernel"} <= found and len(found) >= 12, sorted(found)


def test_every_kernel_ran(request):
    selection = request.config.cuda_cpu_selection
    if selection["deselected"] or not SUITE <= selection["modules"]:
        pytest.skip(f"runs only with the whole cuda_cpu suite ({sorted(SUITE)}), unfiltered")
    missing = kernels_in_sources() - launched_kernels()
    assert not missing, f"kernels of csrc/cuda that no cuda_cpu test launched: {sorted(missing)}"
