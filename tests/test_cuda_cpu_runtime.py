"""The CPU execution of the CUDA sources itself (marker cuda_cpu): what it computes for the warp
intrinsics, that shared memory belongs to one block, that a barrier missing from a kernel shows up,
the faults a GPU would report (a misaligned vector access, a barrier not every thread reaches: both
sticky), streams running ahead of the host in order, events and the last-error state, IPC refusing a
process's own handle, the device guard, and how a failing device query is reported. The kernels are
in csrc/cuda_cpu/selftest.cu."""

import os
import subprocess
import sys
import time

import pytest
import torch

from eplib import _C

pytestmark = pytest.mark.cuda_cpu


@pytest.fixture
def stream():
    handle = _C.cuda_cpu_stream_create()
    yield handle
    _C.cuda_cpu_stream_destroy(handle)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (a device fault is sticky: it breaks the process's device for good).
    The timeout only bounds a hang: under ThreadSanitizer on a loaded machine the import of torch alone
    has taken minutes."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_warp_intrinsics(stream):
    threads = 64
    out = torch.full((threads, 6), -7, dtype=torch.int64)
    _C.cuda_cpu_selftest_warp_intrinsics(out.data_ptr(), threads, stream)
    _C.cuda_cpu_stream_synchronize(stream)
    for t in range(threads):
        warp, lane = divmod(t, 32)

        def value(source_lane):
            return 100 * warp + source_lane

        match = sum(1 << other for other in range(32) if other % 3 == lane % 3)
        ballot = sum(1 << other for other in range(32) if other % 2 == 0)
        want = [value(3), value(lane - 1) if lane >= 1 else value(lane),
                value(lane + 2) if lane + 2 < 32 else value(lane), value(lane ^ 5), match, ballot]
        assert out[t].tolist() == want, f"thread {t}"


def test_shared_memory_is_per_block_and_a_missing_barrier_shows(stream):
    blocks, threads = 16, 64
    out = torch.empty(blocks, threads, dtype=torch.int32)
    _C.cuda_cpu_selftest_shared_memory(out.data_ptr(), blocks, threads, True, stream)
    _C.cuda_cpu_stream_synchronize(stream)
    assert bool((out == torch.arange(blocks, dtype=torch.int32)[:, None]).all())
    # Without the barrier some thread runs before thread 0 has stored its block's value.
    stale = 0
    for _ in range(5):
        _C.cuda_cpu_selftest_shared_memory(out.data_ptr(), blocks, threads, False, stream)
        _C.cuda_cpu_stream_synchronize(stream)
        stale += int((out != torch.arange(blocks, dtype=torch.int32)[:, None]).sum())
    assert stale > 0


FAULT_SCRIPT = """
import torch
from eplib import _C
stream = _C.cuda_cpu_stream_create()
buffer = torch.zeros(64, dtype=torch.uint8)
{launch}
for attempt in ("synchronize", "after"):
    try:
        _C.cuda_cpu_stream_synchronize(stream)
        print(attempt, "ok")
    except RuntimeError as error:
        print(attempt, error)
"""


@pytest.mark.parametrize("launch, message", [
    ("_C.cuda_cpu_selftest_misaligned(buffer.data_ptr(), stream)",
     r"a misaligned vector access \(address .*\) in kernel misaligned_kernel"),
    ("_C.cuda_cpu_selftest_divergent_barrier(stream)",
     r"a block that cannot go on .* in kernel divergent_barrier_kernel"),
])
def test_faults_are_reported_and_sticky(launch, message):
    import re

    result = run_python(FAULT_SCRIPT.format(launch=launch))
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    for line, attempt in zip(lines, ("synchronize", "after")):
        assert line.startswith(attempt + " eplib CPU execution") and re.search(message, line), line


def test_host_runs_ahead_in_stream_order_with_events(stream):
    threads = 64
    counter = torch.zeros(1, dtype=torch.int32)
    start = time.monotonic()
    _C.cuda_cpu_selftest_busy(300_000_000, counter.data_ptr(), threads, stream)
    launched = time.monotonic() - start
    event = _C.cuda_cpu_event_create()
    _C.cuda_cpu_event_record(event, stream)
    # The kernel still runs: the event is not ready, and that answer is this thread's last error.
    assert _C.cuda_cpu_event_query(event) == _C.CUDA_ERROR_NOT_READY
    assert _C.cuda_cpu_peek_last_error() == _C.CUDA_ERROR_NOT_READY
    # A second stream waits for the event before its own kernel.
    other = _C.cuda_cpu_stream_create()
    seen = torch.full((1,), -1, dtype=torch.int32)
    _C.cuda_cpu_stream_wait_event(other, event)
    _C.cuda_cpu_memcpy_async(seen.data_ptr(), counter.data_ptr(), 4, other)
    # A kernel launch after the not-ready answer does not inherit it (eplib's launch clears it first).
    flag = torch.zeros(1, dtype=torch.int32)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    per_rank, per_expert = torch.empty(2, dtype=torch.int32), torch.empty(4, dtype=torch.int32)
    in_rank = torch.empty(4, 2, dtype=torch.bool)
    _C.cuda_dispatch_layout(_C.DispatchLayoutArgs(
        topk_idx=idx.data_ptr(), num_tokens=4, num_topk=2, num_experts=4, num_ranks=2,
        num_tokens_per_rank=per_rank.data_ptr(), num_tokens_per_expert=per_expert.data_ptr(),
        is_token_in_rank=in_rank.data_ptr(), error_flag=flag.data_ptr()), 0, stream)
    _C.cuda_cpu_stream_synchronize(other)
    waited = time.monotonic() - start
    assert launched < 0.1 and waited >= 0.3, (launched, waited)
    assert int(seen) == threads  # the copy ran after the busy kernel, which the event marks
    _C.cuda_cpu_stream_synchronize(stream)
    assert _C.cuda_cpu_event_query(event) == 0 and per_expert.tolist() == [8, 0, 0, 0]
    assert _C.cuda_cpu_get_last_error() == 0
    _C.cuda_cpu_event_destroy(event)
    _C.cuda_cpu_stream_destroy(other)


def test_a_process_cannot_open_its_own_ipc_handle():
    assert _C.cuda_cpu_selftest_open_own_ipc_handle() == _C.CUDA_ERROR_INVALID_CONTEXT


def test_device_guard_restores_the_current_device():
    code = """
import torch
from eplib import _C
stream = _C.cuda_cpu_stream_create()
_C.cuda_cpu_set_device(1)
idx = torch.zeros(4, 2, dtype=torch.int64)
per_rank, per_expert = torch.empty(2, dtype=torch.int32), torch.empty(4, dtype=torch.int32)
in_rank, flag = torch.empty(4, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.int32)
_C.cuda_dispatch_layout(_C.DispatchLayoutArgs(topk_idx=idx.data_ptr(), num_tokens=4, num_topk=2, num_experts=4,
    num_ranks=2, num_tokens_per_rank=per_rank.data_ptr(), num_tokens_per_expert=per_expert.data_ptr(),
    is_token_in_rank=in_rank.data_ptr(), error_flag=flag.data_ptr()), 0, stream)
_C.cuda_cpu_stream_synchronize(stream)
print(_C.cuda_current_device(), per_expert.tolist())
"""
    result = run_python(code, EPLIB_CUDA_CPU_DEVICES="2")
    assert result.stdout.strip() == "1 [8, 0, 0, 0]", result.stdout + result.stderr


def test_a_failing_device_query_is_reported():
    code = """
import pytest, torch
from eplib import _C
from eplib.buffer import describe_cuda_status
print(_C.cuda_device_status()["error"])
print(describe_cuda_status())
torch.cuda.is_available = lambda: True  # as on a GPU machine whose driver eplib's runtime rejects
import conftest
try:
    conftest._fail_if_eplib_misses_the_gpu()
except BaseException as error:  # pytest.fail's Failed is a BaseException
    print(type(error).__name__, error)
"""
    tests = os.path.dirname(os.path.abspath(__file__))
    result = run_python(code, EPLIB_CUDA_CPU_DEVICE_ERROR="35", PYTHONPATH=tests + os.pathsep +
                        os.environ.get("PYTHONPATH", ""))
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stdout + result.stderr
    assert lines[0].startswith("cudaErrorInsufficientDriver: CUDA driver version is insufficient"), lines
    assert lines[1].startswith("error cudaErrorInsufficientDriver") and "driver version 0" in lines[1], lines
    assert lines[2].startswith("Failed torch sees") and "cudaErrorInsufficientDriver" in lines[2], lines
