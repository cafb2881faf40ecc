"""Low-latency mode on the nccl and ipc transports, their CUDA kernels run by the CPU execution of the
CUDA sources (marker cuda_cpu; eplib built with EPLIB_CUDA_CPU=1): the cases of test_low_latency.py and
test_low_latency_masks.py on the backends "cuda_cpu-nccl" and "cuda_cpu-ipc" (tests/gpu_harness.py),
bit for bit against eplib.reference; then what only the CUDA engines do: bad input reported through the
device error flag, and (ipc) a peer that never arrives, raised or masked.
"""

import re
import time

import pytest
import torch

from dist_harness import eplib_timeout
from eplib import _C
from test_low_latency import (CASES, _ll_round, _normal_round, check_dispatch, fill, job_ll, job_mixed,
                              job_two_hooks_and_stats, ll_buffer, ll_case, ll_inputs)
from test_low_latency_masks import _mask_status, job_manual_masks

pytestmark = pytest.mark.cuda_cpu

BACKENDS = ["cuda_cpu-nccl", "cuda_cpu-ipc"]
# Every layout and row format: bf16 (odd hidden size, hooks, out=, zero_copy over 3 rounds), FP8 (plain,
# round_scale, UE8M0), hot and repeated experts, masked slots, ranks without tokens, 32 slots.
NAMES = ["bf16", "bf16-odd_hidden-hook-out", "bf16-zero_copy-rounds", "fp8", "fp8-round_scale", "fp8-ue8m0-H640",
         "hot", "masked-slots", "dup-slots", "empty-ranks", "topk32"]


def run_case(pool, backend: str, case: dict, job=job_ll) -> None:
    errs = pool.run(job, dict(fill(case, pool.world_size), backend=backend), timeout=120)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_low_latency_cuda_cpu_equals_reference(pool, backend, name):
    run_case(pool, backend, CASES[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["bf16-odd_hidden-hook-out", "fp8-ue8m0-H640", "empty-ranks"])
def test_low_latency_cuda_cpu_one_rank(pool_cache, backend, name):
    run_case(pool_cache(1), backend, CASES[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_cuda_cpu_four_ranks(pool4, backend):
    run_case(pool4, backend, ll_case(use_fp8=True, round_scale=True, hook=True, zero_copy=True, rounds=2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_cuda_cpu_two_pending_hooks(pool2, backend):
    """Both buffers await their hooks at once, hooks in reverse order, statistics accumulate."""
    run_case(pool2, backend, ll_case(use_fp8=True), job_two_hooks_and_stats)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_cuda_cpu_mixed_with_normal_mode(pool2, backend):
    run_case(pool2, backend, ll_case(hook=True), job_mixed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_cuda_cpu_manual_masks(pool2, backend):
    run_case(pool2, backend, ll_case(use_fp8=True, hook=True, zero_copy=True), job_manual_masks)


def job_staggered(rank, R, group, case):
    """Ranks out of step, with new inputs every round (so a stale message shows):
    - a slow sender: the last rank starts round 1 half a second late, the others' receives must wait for it;
    - a slow receiver: every rank sends two dispatches whose hooks wait (buffers 0 and 1); the last rank calls
      its hooks half a second late, its unpack kernel slowed down too, while the others call theirs at once
      and send the next dispatch on buffer 0, which must not overwrite the last rank's unread messages."""
    buffer = ll_buffer(group, case["backend"])
    last = rank == R - 1
    errs = _ll_round(buffer, rank, R, case, 0)
    if last:
        time.sleep(0.5)
    errs += _ll_round(buffer, rank, R, dict(case, seed=case["seed"] + 1), 1)
    cases = [dict(case, seed=case["seed"] + s) for s in (2, 3, 4)]

    def dispatch(c):
        x, idx, _ = ll_inputs(c, rank)
        return buffer.low_latency_dispatch(x, idx, c["num_max"], c["E"], use_fp8=c["use_fp8"], return_recv_hook=True)

    outs = [dispatch(c) for c in cases[:2]]
    if last:
        time.sleep(0.5)
        _C.cuda_cpu_stall("ll_dispatch_unpack_kernel", 0.05)
    for c, out in zip(cases, outs):
        out[4]()
        errs += check_dispatch(rank, R, c, out[:3])  # before a later dispatch on its buffer reuses its outputs
    _C.cuda_cpu_stall("ll_dispatch_unpack_kernel", 0)
    out = dispatch(cases[2])
    out[4]()
    return errs + check_dispatch(rank, R, cases[2], out[:3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_cuda_cpu_staggered(pool2, backend):
    run_case(pool2, backend, ll_case(use_fp8=True), job_staggered)


# ------------------------------------------------------------------------------------ bad input


def job_bad_input(rank, R, group, case):
    """num_max smaller than x's tokens on every rank: ValueError naming it, the rounds stay in step. Then an
    expert id out of range on the last rank: no host sync, so the call completes (the id counts as -1) and
    the next normal-mode dispatch raises ValueError there and RuntimeError on the others; then LL rounds
    work again."""
    buffer = ll_buffer(group, case["backend"])
    errs = _ll_round(buffer, rank, R, case, 0)
    x = torch.zeros(case["num_max"] + 1, case["H"], dtype=torch.bfloat16)
    idx = torch.zeros(case["num_max"] + 1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="^num_max_dispatch_tokens_per_rank: x has"):
        buffer.low_latency_dispatch(x, idx, case["num_max"], case["E"], use_fp8=False)
    errs += _ll_round(buffer, rank, R, case, 1)
    idx = torch.full((3, 2), case["E"] if rank == R - 1 else 0, dtype=torch.int64)
    recv_count = buffer.low_latency_dispatch(torch.ones(3, case["H"], dtype=torch.bfloat16), idx, case["num_max"],
                                             case["E"], use_fp8=False)[1]
    if recv_count[0] != (3 * (R - 1) if rank == 0 else 0):
        errs.append(f"rank {rank}: recv_count {recv_count.tolist()} with the last rank's ids out of range")
    expected = ValueError if rank == R - 1 else RuntimeError
    with pytest.raises(expected, match="topk_idx: an expert id outside" if rank == R - 1 else "rank"):
        _normal_round(buffer, rank, R, 5)
    return errs + _ll_round(buffer, rank, R, case, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_cuda_cpu_bad_input(pool2, backend):
    run_case(pool2, backend, ll_case(), job_bad_input)


# ------------------------------------------------------------------------------ ipc: a silent peer

TIMEOUT_S = 1.0


def job_silent_peer(rank, R, group, case, shrink):
    """The last rank makes one round, then no more LL calls. Without enable_shrink the others' next
    dispatch raises after about TIMEOUT_S naming the peer and the phase, its outputs poisoned, and later
    calls are refused; with enable_shrink the others complete 3 rounds over the live ranks, the peer
    masked after the first."""
    buffer = ll_buffer(group, case["backend"], enable_shrink=shrink)
    errs = _ll_round(buffer, rank, R, case, 0)
    if rank == R - 1:
        return errs, None
    silent = R - 1
    start = time.monotonic()
    with eplib_timeout(TIMEOUT_S):
        if shrink:
            for round_ in (1, 2, 3):
                errs += _ll_round(buffer, rank, R, case, round_, masked=[silent])
            if _mask_status(buffer, R) != [int(r == silent) for r in range(R)]:
                errs.append(f"rank {rank}: mask status {_mask_status(buffer, R)}")
            return errs, time.monotonic() - start
        x, idx, _ = ll_inputs(case, rank)
        elapsed = float("inf")
        try:
            buffer.low_latency_dispatch(x, idx, case["num_max"], case["E"], use_fp8=False)
            errs.append(f"rank {rank}: no error although rank {silent} is silent")
        except RuntimeError as error:
            elapsed = time.monotonic() - start
            if not re.search(rf"low-latency call \((send|receive).*rank {silent}\b", str(error)):
                errs.append(f"rank {rank}: unclear error: {error}")
        recv_count = buffer._low_latency[buffer._cpu]._outputs.kept(0)[4]  # of LL call 2, on buffer 0
        if not bool((recv_count == -1).all()):
            errs.append(f"rank {rank}: outputs not poisoned: recv_count {recv_count.tolist()}")
        with pytest.raises(RuntimeError, match="out of step"):
            _ll_round(buffer, rank, R, case, 2)
        return errs, elapsed


@pytest.mark.parametrize("shrink", [False, True], ids=["raises", "shrink"])
def test_low_latency_ipc_cuda_cpu_silent_peer(pool2, shrink):
    case = dict(fill(ll_case(), 2), backend="cuda_cpu-ipc")
    results = pool2.run(job_silent_peer, case, shrink, timeout=120)
    errs, elapsed = results[0]
    assert not errs, "\n".join(errs)
    # One wait gives up after the timeout; with shrink no later round waits for the masked peer again.
    assert TIMEOUT_S * 0.9 <= elapsed <= TIMEOUT_S + 8, f"took {elapsed:.2f} s"
