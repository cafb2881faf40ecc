"""Failed-rank masks of the low-latency mode (DeepEP's enable_shrink) on the cpu transport.

- Masks set by hand (update / query / clean) change who exchanges with whom, and results stay equal to
  the reference over the unmasked ranks.
- A rank that stops answering: without enable_shrink the others raise RuntimeError naming it and the
  phase after EPLIB_TIMEOUT_S; with enable_shrink a rank process killed mid-loop is masked after one
  timeout, and the others go on for 100 more rounds, correct over the live ranks.
"""

import os
import queue
import time
from datetime import timedelta

import pytest
import torch
import torch.multiprocessing as mp

from dist_harness import _free_port
from test_low_latency import _ll_round, check_dispatch, fill, ll_buffer, ll_case, ll_inputs


def _mask_status(buffer, R: int) -> list:
    status = torch.full((R,), -1, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    return status.tolist()


def job_manual_masks(rank, R, group, case):
    """The last rank and the others mask each other for two rounds, then every mask is cleaned."""
    buffer = ll_buffer(group, case.get("backend", "cpu"), enable_shrink=True)
    last = R - 1
    errs = _ll_round(buffer, rank, R, case, 0)
    masked = [r for r in range(R - 1)] if rank == last else [last]
    for r in masked:
        buffer.low_latency_update_mask_buffer(r, True)
    expected_status = [int(r in masked) for r in range(R)]
    if _mask_status(buffer, R) != expected_status:
        errs.append(f"rank {rank}: mask status {_mask_status(buffer, R)} != {expected_status}")
    for round_ in (1, 2):
        errs += _ll_round(buffer, rank, R, case, round_, masked)
    buffer.low_latency_clean_mask_buffer()
    if _mask_status(buffer, R) != [0] * R:
        errs.append(f"rank {rank}: mask status {_mask_status(buffer, R)} after clean")
    return errs + _ll_round(buffer, rank, R, case, 3)


def test_low_latency_manual_masks(pool):
    case = fill(ll_case(use_fp8=True, hook=True, zero_copy=True), pool.world_size)
    errs = pool.run(job_manual_masks, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def job_one_sided_mask(rank, R, group, case):
    """Rank 0 masks rank 1, rank 1 does not mask rank 0. Rank 0 no longer waits for rank 1 to read its
    published dispatch, and rewrites it two calls later while rank 1's dispatch still awaits its hook. Rank
    1's receive then finds rank 0's buffer a round ahead: it masks rank 0 and places the rows of the live
    ranks only (equal to the reference without rank 0)."""
    import torch.distributed as dist

    import eplib

    buffer = eplib.Buffer(group, 0, 0, low_latency_mode=True, num_qps_per_rank=1, enable_shrink=True)
    x, idx, _ = ll_inputs(case, rank)
    errs = []
    if rank == 0:
        buffer.low_latency_update_mask_buffer(1, True)
        for call in range(3):  # buffers 0, 1, then 0 again
            out = buffer.low_latency_dispatch(x, idx, case["num_max"], case["E"], use_fp8=case["use_fp8"])
            if call == 0:
                errs += check_dispatch(rank, R, case, out[:3], masked=[1])
        dist.barrier(group)
    else:
        recv, recv_count, handle, _, hook = buffer.low_latency_dispatch(
            x, idx, case["num_max"], case["E"], use_fp8=case["use_fp8"], return_recv_hook=True)
        dist.barrier(group)
        hook()
        errs += check_dispatch(rank, R, case, (recv, recv_count, handle), masked=[0])
    expected_status = [0, 1] if rank == 0 else [1, 0]
    if _mask_status(buffer, R) != expected_status:
        errs.append(f"rank {rank}: mask status {_mask_status(buffer, R)}, expected {expected_status}")
    dist.barrier(group)  # rank 0's regions stay until rank 1 has read them
    return errs


def test_low_latency_one_sided_mask(pool2):
    case = fill(ll_case(use_fp8=True), 2)
    errs = pool2.run(job_one_sided_mask, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def job_mask_needs_shrink(rank, R, group):
    import eplib

    buffer = eplib.Buffer(group, 0, 0, low_latency_mode=True, num_qps_per_rank=1)
    with pytest.raises(RuntimeError, match="enable_shrink=True"):
        buffer.low_latency_update_mask_buffer((rank + 1) % R, True)
    shrink = eplib.Buffer(group, 0, 0, low_latency_mode=True, num_qps_per_rank=1, enable_shrink=True)
    with pytest.raises(ValueError, match="rank_to_mask: a rank cannot mask itself"):
        shrink.low_latency_update_mask_buffer(rank, True)
    with pytest.raises(ValueError, match="rank_to_mask"):
        shrink.low_latency_update_mask_buffer(R, True)
    with pytest.raises(ValueError, match="mask_status"):
        shrink.low_latency_query_mask_buffer(torch.zeros(R + 1, dtype=torch.int32))


def test_low_latency_mask_arguments(pool2):
    pool2.run(job_mask_needs_shrink)


def job_silent_peer(rank, R, group, case):
    """The last rank makes one round, then no more LL calls: without enable_shrink the others raise
    RuntimeError naming it and the phase, after about EPLIB_TIMEOUT_S (1 s here)."""
    import eplib

    buffer = eplib.Buffer(group, 0, 0, low_latency_mode=True, num_qps_per_rank=1)
    errs = _ll_round(buffer, rank, R, case, 0)
    if rank == R - 1:
        return errs
    os.environ["EPLIB_TIMEOUT_S"] = "1"
    start = time.monotonic()
    try:
        _ll_round(buffer, rank, R, case, 1)
        errs.append(f"rank {rank}: no error although rank {R - 1} is silent")
    except RuntimeError as error:
        if f"rank(s) [{R - 1}]" not in str(error) or "low_latency_dispatch (receive" not in str(error):
            errs.append(f"rank {rank}: unclear error: {error}")
    finally:
        del os.environ["EPLIB_TIMEOUT_S"]
    if not 0.9 < time.monotonic() - start < 10:
        errs.append(f"rank {rank}: the timeout took {time.monotonic() - start:.1f} s")
    with pytest.raises(RuntimeError, match="out of step"):
        _ll_round(buffer, rank, R, case, 2)
    return errs


def test_low_latency_silent_peer_raises(pool):
    case = fill(ll_case(), pool.world_size)
    errs = pool.run(job_silent_peer, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


# ------------------------------------------------------------------------ a rank process dies

ROUNDS_BEFORE, ROUNDS_AFTER = 5, 100


def _dying_rank_main(rank: int, R: int, init_method: str, results, case: dict) -> None:
    """Rank body: LL rounds with enable_shrink; the last rank exits (os._exit, no goodbye) before round
    ROUNDS_BEFORE. The others report their mismatches and how long the round with the death took."""
    import torch.distributed as dist

    import eplib

    os.environ["EPLIB_TIMEOUT_S"] = "2"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=R, timeout=timedelta(seconds=30))
    buffer = eplib.Buffer(dist.group.WORLD, 0, 0, low_latency_mode=True, num_qps_per_rank=1, enable_shrink=True)
    dead = R - 1
    errs, slowest = [], 0.0
    try:
        for round_ in range(ROUNDS_BEFORE + ROUNDS_AFTER):
            if rank == dead and round_ == ROUNDS_BEFORE:
                os._exit(0)
            masked = [dead] if round_ >= ROUNDS_BEFORE else []
            start = time.monotonic()
            errs += _ll_round(buffer, rank, R, dict(case, hook=round_ % 2 == 1), round_, masked)
            slowest = max(slowest, time.monotonic() - start)
            if round_ >= ROUNDS_BEFORE and _mask_status(buffer, R) != [int(r == dead) for r in range(R)]:
                errs.append(f"rank {rank}: round {round_}: mask status {_mask_status(buffer, R)}")
    except Exception as error:  # noqa: BLE001 - reported to the test process
        errs.append(f"rank {rank}: {type(error).__name__}: {error}")
    results.put((rank, errs[:10], slowest))
    results.close()
    results.join_thread()
    os._exit(0)  # the group has a dead member: leave without its teardown


@pytest.mark.slow  # 4 fresh rank processes and 105 checked rounds: about 30 s on a loaded 2-core VM
def test_low_latency_dead_rank_is_masked():
    R = 4
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    case = fill(ll_case(use_fp8=True, Ts=[6], num_max=8, H=128), R)
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_dying_rank_main, args=(r, R, init_method, results, case), daemon=True)
             for r in range(R)]
    for p in procs:
        p.start()
    reports = {}
    try:
        deadline = time.monotonic() + 120
        while len(reports) < R - 1 and time.monotonic() < deadline:
            try:
                rank, errs, slowest = results.get(timeout=1)
            except queue.Empty:
                if all(not p.is_alive() for p in procs[:-1]):
                    break
                continue
            reports[rank] = (errs, slowest)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert sorted(reports) == list(range(R - 1)), f"live ranks that reported: {sorted(reports)}"
    for rank, (errs, slowest) in reports.items():
        assert not errs, "\n".join(errs)
        # One round waits out the 2 s timeout for the dead rank; none waits for it twice.
        assert slowest < 2 * 2, f"rank {rank}: slowest round {slowest:.1f} s"
