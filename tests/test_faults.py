"""One rank's fault is every rank's error, at once, and the same Buffer works afterwards (README,
"Failure behaviour"). On 2 and 4 ranks:

- bad input on one rank, of every kind, in every call: that rank raises its ValueError/TypeError,
  the others PeerInputError naming it and quoting it within a second, and the next round of every
  call is right on every rank; a rank that skips a call makes every rank raise at once;
- a rank that stops (SIGSTOP) before each collective of a round, or inside one, and is continued:
  the others raise after EPLIB_TIMEOUT_S naming it, it raises once continued, and the next round is
  right on the same Buffer;
- a rank killed (SIGKILL) before each collective: the others raise within a second naming it, their
  Buffer refuses further calls at once, and a group of the survivors built from the store works;
- a process whose peer is stopped for good shuts its group down within seconds (eplib.abort), or
  exits within seconds without it (eplib's exit hook).

A round is dist_harness.closed_form_errors: layout, dispatch, cached dispatch and two combines, each
collective checked against closed-form expectations. Stop, kill and exit cases run in pools of their
own (started by a forkserver: a fraction of a second each) with a short EPLIB_TIMEOUT_S and gloo
timeout.
"""

import os
import re
import signal
import subprocess
import sys
import time
from typing import Optional, Tuple

import pytest
import torch

from dist_harness import (RankPool, RemoteError, base_case, closed_form_errors, eplib_timeout, fill_case,
                          make_payload, make_topk_idx, make_topk_weights)

#: EPLIB_TIMEOUT_S of the stop and exit cases.
LIMIT_S = 1.5
#: EPLIB_TIMEOUT_S where no rank should time out (kills are seen as closed connections; the rounds
#: that check recovery): ample for a loaded 2-core machine running a dozen rank processes.
CALM_LIMIT_S = 10
#: The gloo timeout of their groups (init_process_group): above any stop a case makes.
GLOO_LIMIT_S = 20
#: The collectives of a round, in order (closed_form_errors; the second combine repeats 4 and 5).
ROUND_OPS = ["dispatch (header exchange)", "dispatch (payload)", "cached dispatch (header exchange)",
             "cached dispatch (payload)", "combine (header exchange)", "combine (payload)"]


def _round_case(R: int, seed: int) -> dict:
    return fill_case(base_case(seed=seed), R)


def _outcome(fn, *args):
    """(None, or (exception class names, message, missing_ranks) when fn(*args) raised; time.time()
    when it started; when it returned or raised)."""
    start = time.time()
    try:
        fn(*args)
        return None, start, time.time()
    except Exception as error:  # noqa: BLE001 - the tests inspect it
        mro = [c.__name__ for c in type(error).__mro__]
        return (mro, str(error), getattr(error, "missing_ranks", None)), start, time.time()


# ---------------------------------------------------------------------------------------------
# Bad input on one rank
# ---------------------------------------------------------------------------------------------

# name -> (the call that fails, a regex the failing rank's message matches: it names the argument)
BAD_INPUTS = {
    "layout_expert_id_equal_E": ("get_dispatch_layout", r"topk_idx"),
    "layout_expert_id_below_minus_1": ("get_dispatch_layout", r"topk_idx"),
    "layout_topk_idx_int32": ("get_dispatch_layout", r"topk_idx"),
    "layout_topk_idx_non_contiguous": ("get_dispatch_layout", r"topk_idx.*contiguous"),
    "layout_num_experts_not_multiple_of_R": ("get_dispatch_layout", r"num_experts"),
    "dispatch_x_int32": ("dispatch", r"^x:"),
    "dispatch_x_non_contiguous": ("dispatch", r"^x:.*contiguous"),
    "dispatch_topk_idx_non_contiguous": ("dispatch", r"topk_idx.*contiguous"),
    "dispatch_expert_id_equal_E": ("dispatch", r"topk_idx"),
    "dispatch_topk_weights_nan": ("dispatch", r"topk_weights"),
    "dispatch_num_tokens_per_rank_wrong": ("dispatch", r"num_tokens_per_rank"),
    "dispatch_num_worst_tokens_absurd": ("dispatch", r"^num_worst_tokens: .* GiB"),
    "dispatch_num_experts_absurd": ("dispatch", r"^num_tokens_per_expert: .* GiB"),
    "cached_x_int32": ("cached dispatch", r"^x:"),
    "cached_x_non_contiguous": ("cached dispatch", r"^x:.*contiguous"),
    "cached_x_rows_vs_handle": ("cached dispatch", r"^handle:"),
    "combine_x_int32": ("combine", r"^x:"),
    "combine_x_non_contiguous": ("combine", r"^x:.*contiguous"),
    "combine_x_rows_vs_handle": ("combine", r"^x:"),
    "combine_topk_weights_rows": ("combine", r"^topk_weights:"),
    "combine_bias_shape": ("combine", r"^bias"),
}


def _absurd_num_experts(R: int) -> int:
    """Near 2**31 and a multiple of R: the per-expert counts of R ranks need 8 * R * E bytes."""
    return (2**31 - 1) // R * R


def job_one_rank_bad(rank, R, group, name, bad_rank):
    """Rank ``bad_rank`` passes the bad input ``name`` to its call, the others valid input. Returns
    (outcome of that call, seconds from the start of the round to it, errors of the next round)."""
    import eplib

    with eplib_timeout(20):  # a hang shows as a slow failure, well inside the pool's limit
        buf = eplib.Buffer(group)
        case = _round_case(R, seed=11)
        T, H, K, E = case["Ts"][rank], case["H"], case["K"], case["E"]
        x, w = make_payload(11, rank, T, H, "fp32"), make_topk_weights(11, rank, T, K)
        idx = make_topk_idx(11, rank, T, K, E, "uniform")
        call, _ = BAD_INPUTS[name]
        mine = rank == bad_rank

        def dispatch(lay, **over):
            args = dict(x=x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                        topk_idx=idx, topk_weights=w)
            args.update(over)
            return buf.dispatch(**args)

        def bad_call(lay, recv_x, recv_w, handle):
            bad = {
                "layout_expert_id_equal_E": lambda: buf.get_dispatch_layout(torch.full_like(idx, E), E),
                "layout_expert_id_below_minus_1": lambda: buf.get_dispatch_layout(torch.full_like(idx, -2), E),
                "layout_topk_idx_int32": lambda: buf.get_dispatch_layout(idx.to(torch.int32), E),
                "layout_topk_idx_non_contiguous": lambda: buf.get_dispatch_layout(idx.t().contiguous().t(), E),
                "layout_num_experts_not_multiple_of_R": lambda: buf.get_dispatch_layout(idx, E + 1),
                "dispatch_x_int32": lambda: dispatch(lay, x=x.to(torch.int32)),
                "dispatch_x_non_contiguous": lambda: dispatch(lay, x=torch.cat([x, x], dim=1)[:, ::2]),
                "dispatch_topk_idx_non_contiguous": lambda: dispatch(lay, topk_idx=idx.t().contiguous().t()),
                "dispatch_expert_id_equal_E": lambda: dispatch(lay, topk_idx=idx.clone().index_fill_(
                    0, torch.tensor([0]), E)),
                "dispatch_topk_weights_nan": lambda: dispatch(lay, topk_weights=w.clone().index_fill_(
                    0, torch.tensor([0]), float("nan"))),
                "dispatch_num_tokens_per_rank_wrong": lambda: dispatch(lay, num_tokens_per_rank=lay[0] + 1),
                "dispatch_num_worst_tokens_absurd": lambda: dispatch(lay, num_worst_tokens=2**31 - 1),
                # x alone: the per-expert counts of every rank are all-gathered. The tensor is never
                # touched, so its pages are never allocated.
                "dispatch_num_experts_absurd": lambda: dispatch(lay, topk_idx=None, topk_weights=None,
                                                                num_tokens_per_expert=torch.empty(
                                                                    _absurd_num_experts(R), dtype=torch.int32)),
                "cached_x_int32": lambda: buf.dispatch(x.to(torch.int32), handle=handle),
                "cached_x_non_contiguous": lambda: buf.dispatch(torch.cat([x, x], dim=1)[:, ::2], handle=handle),
                "cached_x_rows_vs_handle": lambda: buf.dispatch(x[:-1], handle=handle),
                "combine_x_int32": lambda: buf.combine(recv_x.to(torch.int32), handle),
                "combine_x_non_contiguous": lambda: buf.combine(torch.cat([recv_x, recv_x], dim=1)[:, ::2], handle),
                "combine_x_rows_vs_handle": lambda: buf.combine(torch.cat([recv_x, recv_x[:1]]), handle),
                "combine_topk_weights_rows": lambda: buf.combine(recv_x, handle, topk_weights=torch.zeros(
                    recv_x.shape[0] + 1, K)),
                "combine_bias_shape": lambda: buf.combine(recv_x, handle, bias=torch.zeros(T + 1, H)),
            }
            return bad[name]()

        def call_that_fails():
            """The valid calls before the one that fails (on the others: where they learn of it),
            then that one, returned as a function."""
            if call == "get_dispatch_layout":
                if mine:
                    return lambda: bad_call(None, None, None, None)
                lay = buf.get_dispatch_layout(idx, E)
                return lambda: dispatch(lay)
            lay = buf.get_dispatch_layout(idx, E)
            if call == "dispatch":
                return lambda: bad_call(lay, None, None, None) if mine else dispatch(lay)
            recv_x, _, recv_w, _, handle, _ = dispatch(lay)
            if mine:
                return lambda: bad_call(lay, recv_x, recv_w, handle)
            if call == "cached dispatch":
                return lambda: buf.dispatch(x, handle=handle)
            return lambda: buf.combine(recv_x, handle)

        outcome, started, ended = _outcome(call_that_fails())
        return outcome, started, ended, closed_form_errors(buf, rank, R, "eplib", _round_case(R, seed=12))


def _skip_unless_absurd_num_experts_testable(R: int) -> None:
    from eplib.validation import device_memory_bytes

    num_experts = _absurd_num_experts(R)
    memory = device_memory_bytes(torch.device("cpu"))
    if memory is None or memory >= 8 * R * num_experts:
        pytest.skip(f"this machine has the {8 * R * num_experts} bytes the case counts as absurd")
    try:
        torch.empty(num_experts, dtype=torch.int32)  # reserved, never touched
    except RuntimeError as error:
        pytest.skip(f"cannot reserve the {4 * num_experts} bytes of an untouched num_tokens_per_expert: {error}")


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_one_rank_bad_input(pool, name):
    R = pool.world_size
    if name == "dispatch_num_experts_absurd":
        _skip_unless_absurd_num_experts_testable(R)
    bad_rank = list(BAD_INPUTS).index(name) % R
    results = pool.run(job_one_rank_bad, name, bad_rank, timeout=90)
    call, pattern = BAD_INPUTS[name]
    bad_outcome, bad_started, _, _ = results[bad_rank]
    assert bad_outcome is not None, f"rank {bad_rank} ({name}): no error"
    bad_mro, bad_message, _ = bad_outcome
    assert bad_mro[0] in ("ValueError", "TypeError"), f"rank {bad_rank}: {bad_outcome}"
    assert re.search(pattern, bad_message), f"rank {bad_rank}: the message does not name the argument: {bad_message}"
    for rank, (outcome, started, ended, next_round) in enumerate(results):
        assert not next_round, f"rank {rank}: the round after {name} went wrong: {next_round}"
        if rank == bad_rank:
            continue
        assert outcome is not None, f"rank {rank}: no error although rank {bad_rank} failed ({name})"
        mro, message, _ = outcome
        assert "PeerInputError" in mro and "RuntimeError" in mro, f"rank {rank}: {outcome}"
        assert f"rank {bad_rank} in {call}: {bad_mro[0]}: {bad_message[:80]}" in message, f"rank {rank}: {message}"
        # From the moment both ranks were in their calls.
        seconds = ended - max(started, bad_started)
        assert seconds < 1.0, f"rank {rank} raised {seconds:.2f} s after rank {bad_rank} started its call"


def job_skipped_call(rank, R, group, skipping_rank):
    """After a dispatch, rank ``skipping_rank`` skips the cached dispatch that the others make and
    goes on to combine. Returns (outcome of that call, its seconds, errors of the next round)."""
    import eplib

    with eplib_timeout(20):
        buf = eplib.Buffer(group)
        case = _round_case(R, seed=13)
        T, H, K, E = case["Ts"][rank], case["H"], case["K"], case["E"]
        x, w = make_payload(13, rank, T, H, "fp32"), make_topk_weights(13, rank, T, K)
        idx = make_topk_idx(13, rank, T, K, E, "uniform")
        lay = buf.get_dispatch_layout(idx, E)
        recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                                                  num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=w)
        if rank == skipping_rank:
            outcome, started, ended = _outcome(buf.combine, recv_x, handle)
        else:
            outcome, started, ended = _outcome(lambda: buf.dispatch(x, handle=handle))
        return outcome, ended - started, closed_form_errors(buf, rank, R, "eplib", _round_case(R, seed=14))


def test_skipped_call_is_detected(pool):
    """A rank that skips a call never pairs its next call with the others' one: every rank raises at
    once naming the calls of every rank, and the next round is right on the same Buffers."""
    R = pool.world_size
    results = pool.run(job_skipped_call, R - 1, timeout=90)
    calls = ["cached dispatch"] * (R - 1) + ["combine"]
    for rank, (outcome, seconds, next_round) in enumerate(results):
        assert outcome is not None, f"rank {rank}: no error although rank {R - 1} skipped a call"
        mro, message, _ = outcome
        assert "RuntimeError" in mro and f"the ranks are in different calls ({calls}" in message, \
            f"rank {rank}: {outcome}"
        assert seconds < 1.0, f"rank {rank} raised after {seconds:.2f} s"
        assert not next_round, f"rank {rank}: the round after the skipped call went wrong: {next_round}"


# ---------------------------------------------------------------------------------------------
# Stopped, killed and exiting ranks
# ---------------------------------------------------------------------------------------------

_kept = {}  # per rank process: the Buffer that the jobs of one pool share


def _buffer(group):
    import eplib

    if "buffer" not in _kept:
        _kept["buffer"] = eplib.Buffer(group)
    return _kept["buffer"]


def _act_at(buf, op: int, action: str, stamp_file: str) -> None:
    """Makes this rank act on itself at the ``op``-th collective (ROUND_OPS) of its next round:
    "stop" (SIGSTOP) before issuing it, "stop inside" right after issuing it, "kill" (SIGKILL) before.
    It writes the time it acts (time.time()) to ``stamp_file`` first. Patched on the instance:
    job_faulty_round removes it after the round."""
    channel = buf._cpu.channel
    run = channel._run
    count = iter(range(op + 1))

    def act_now() -> None:
        with open(stamp_file, "w") as f:
            f.write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)

    def act(issue, phase, gather_words):
        if next(count, None) != op:
            return run(issue, phase, gather_words)
        if action == "stop inside":
            def issue_then_stop(group):
                work = issue(group)
                act_now()
                return work
            return run(issue_then_stop, phase, gather_words)
        act_now()
        return run(issue, phase, gather_words)

    channel._run = act


def job_faulty_round(rank, R, group, victim, op, action, seed, stamp_file, limit_s=None):
    """A round in which rank ``victim`` acts on itself at collective ``op`` (``_act_at``), with
    EPLIB_TIMEOUT_S=limit_s (default: CALM_LIMIT_S for kills, LIMIT_S otherwise). Returns (outcome,
    seconds from the start of the round to it, when this rank started its last collective (the one
    that failed; time.time()), when it raised, and the outcome of a further call at once after a kill)."""
    with eplib_timeout(limit_s or (CALM_LIMIT_S if action == "kill" else LIMIT_S)):
        buf = _buffer(group)
        if rank == victim:
            _act_at(buf, op, action, stamp_file)
        channel, started = buf._cpu.channel, []
        run = channel._run

        def timed_run(*args, **kwargs):
            started.append(time.time())
            return run(*args, **kwargs)

        channel._run = timed_run
        try:
            case = _round_case(R, seed)
            outcome, round_started, raised = _outcome(closed_form_errors, buf, rank, R, "eplib", case)
            again = _outcome(closed_form_errors, buf, rank, R, "eplib", case) if action == "kill" else None
        finally:
            del channel._run
        return outcome, raised - round_started, started[-1] if started else round_started, raised, again


def _acted_at(stamp_file) -> float:
    """When the victim acted (time.time()), from its stamp file."""
    with open(stamp_file) as f:
        return float(f.read())


def job_round(rank, R, group, seed):
    """Errors of one round on the kept Buffer."""
    with eplib_timeout(CALM_LIMIT_S):
        return closed_form_errors(_buffer(group), rank, R, "eplib", _round_case(R, seed))


def _check_timed_out(results, victim) -> None:
    """The others raised a timeout naming the stopped rank, EPLIB_TIMEOUT_S after they issued the
    collective it never reached (the first to give up; the others see its mark at once, or time out
    themselves)."""
    waited = []
    for rank in (r for r in results if r != victim):
        outcome, _, op_started, raised, _ = results[rank]
        assert outcome is not None, f"rank {rank}: the round went through without rank {victim}"
        mro, message, missing = outcome
        assert "RuntimeError" in mro and "timed out" in message and f"rank {victim} never arrived" in message, \
            f"rank {rank}: {outcome}"
        assert missing == [victim], f"rank {rank}: missing_ranks {missing}"
        waited.append(raised - op_started)
    assert LIMIT_S * 0.9 < max(waited) and max(waited) < LIMIT_S + 1.5, waited


# (op, action) of the stop cases; "stop inside" only where the next collective is in the same
# round, so that the ranks that complete the stopped one still raise (README).
STOPS = [(op, "stop") for op in range(len(ROUND_OPS))] + [(1, "stop inside")]


@pytest.fixture(scope="module")
def stop_results(tmp_path_factory):
    """Every stop case, on 2 and 4 ranks at once (a thread and a pool each; within a pool the cases
    run one after the other, each starting from where the last one recovered): {(R, op, action):
    _stop_case's result, or the exception it raised}."""
    from concurrent.futures import ThreadPoolExecutor

    stamps = tmp_path_factory.mktemp("stops")

    def run_all(R):
        pool, results = RankPool(R, start_method="forkserver", gloo_timeout_s=GLOO_LIMIT_S), {}
        try:
            for op, action in STOPS:
                try:
                    results[(R, op, action)] = _stop_case(pool, R, op, action, stamps / f"{R}-{op}-{action}")
                except Exception as error:  # noqa: BLE001 - reported by the case's test
                    results[(R, op, action)] = error
        finally:
            pool.kill()
        return results

    with ThreadPoolExecutor(2) as threads:
        return {case: result for results in threads.map(run_all, (2, 4)) for case, result in results.items()}


def _stop_case(pool, R, op, action, stamp, limit_s=LIMIT_S):
    """Rank R-1 stops at collective ``op`` of a round; once the others have raised it is continued.
    Returns ({rank: job_faulty_round's result}, when it stopped, when it was continued, the next
    round's errors per rank)."""
    victim, others = R - 1, range(R - 1)
    job = pool.submit(job_faulty_round, victim, op, action, 30 + op, str(stamp), limit_s)
    results = pool.collect(job, others, timeout=limit_s + 30)
    pool.wait_stopped(victim)
    continued = time.time()
    pool.signal(victim, signal.SIGCONT)
    results.update(pool.collect(job, [victim], timeout=limit_s + 30))
    return results, _acted_at(stamp), continued, pool.run(job_round, 50 + op, timeout=30)


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("op,action", STOPS, ids=[f"{a.replace(' ', '_')}-{ROUND_OPS[o]}" for o, a in STOPS])
def test_rank_stopped_then_continued(stop_results, R, op, action):
    """The others raise after EPLIB_TIMEOUT_S naming the stopped rank; continued, it raises too (it
    gets there late); the next round on the same Buffers is right."""
    result = stop_results[(R, op, action)]
    if isinstance(result, Exception):
        raise result
    results, _, _, next_round = result
    victim = R - 1
    _check_timed_out(results, victim)
    outcome = results[victim][0]
    assert outcome is not None and "RuntimeError" in outcome[0], f"rank {victim}: {outcome}"
    assert re.search(r"late: rank \d+ had given up|timed out", outcome[1]), f"rank {victim}: {outcome}"
    assert not any(next_round), next_round


def job_store_host_fault(rank, R, group, action, stamp_file, limit_s=None):
    """Rank 0 (which hosts the store) stops or is killed before the first collective of a round. On
    a stop the others start the round once it has stopped: a slow rank 0 would otherwise meet their
    timeout with its store still answering."""
    if action == "stop" and rank != 0:
        deadline = time.monotonic() + 30
        while not os.path.exists(stamp_file) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # the stamp is written just before the stop
    return job_faulty_round(rank, R, group, 0, 0, action, 40, stamp_file, limit_s)


def test_store_host_stopped(tmp_path):
    """The others cannot settle the timeout without the store: they raise after EPLIB_TIMEOUT_S plus
    the time eplib gives store operations (min(EPLIB_TIMEOUT_S / 4, 2 s) each), and the group is
    unusable from then on: every call raises at once."""
    pool = RankPool(2, start_method="forkserver", gloo_timeout_s=GLOO_LIMIT_S)
    try:
        job = pool.submit(job_store_host_fault, "stop", str(tmp_path / "stamp"))
        outcome, _, op_started, raised, _ = pool.collect(job, [1], timeout=LIMIT_S * 4 + 30)[1]
        pool.signal(0, signal.SIGCONT)
        assert outcome is not None and "the store did not answer" in outcome[1], outcome
        seconds = raised - op_started  # from its own arrival at the collective rank 0 never reached
        # The store operations that go unanswered cost min(EPLIB_TIMEOUT_S / 4, 2 s) each: the late
        # claim of a first collective, then (after the timeout) the attempt to abandon it.
        assert 0.9 * LIMIT_S < seconds < 2 * LIMIT_S + 1, seconds
        again = pool.collect(pool.submit(job_round, 41), [1], timeout=30)[1]
        assert isinstance(again, RemoteError) and "cannot be used any more" in again.message, again
    finally:
        pool.kill()


def job_survivors_round(rank, R, group, missing, seed):
    """The recovery recipe of README "Failure behaviour": a new world group of the survivors, through
    the store of the broken one, and a round on a new Buffer. Returns its errors."""
    import eplib
    import torch.distributed as dist
    from datetime import timedelta

    store = group.get_group_store()
    eplib.abort(group)
    _kept.clear()
    dist.destroy_process_group()
    survivors = [r for r in range(R) if r not in missing]
    dist.init_process_group("gloo", store=dist.PrefixStore("after-failure-1", store), rank=survivors.index(rank),
                            world_size=len(survivors), timeout=timedelta(seconds=GLOO_LIMIT_S))
    with eplib_timeout(CALM_LIMIT_S):
        new_rank, new_size = dist.get_rank(), dist.get_world_size()
        return closed_form_errors(eplib.Buffer(dist.group.WORLD), new_rank, new_size, "eplib",
                                  _round_case(new_size, seed))


@pytest.fixture(scope="module")
def kill_results(tmp_path_factory):
    """results(R) -> every kill case on R ranks, run at once, each in a pool of its own: {op: {rank:
    job_faulty_round's result, "killed": when the victim died, "recovered": {rank: errors of a round
    on a group of the survivors}}}."""
    cache = {}

    def results(R):
        if R not in cache:
            cache[R] = _run_kills(R, tmp_path_factory.mktemp(f"kills{R}"))
        return cache[R]

    return results


def _run_kills(R, stamps):
    """Every kill case on R ranks at once (rank R-1 kills itself), each in a pool of its own; see
    kill_results."""
    victim, survivors = R - 1, range(R - 1)
    pools = {op: RankPool(R, start_method="forkserver", gloo_timeout_s=GLOO_LIMIT_S) for op in range(len(ROUND_OPS))}
    try:
        jobs = {op: pool.submit(job_faulty_round, victim, op, "kill", 60, str(stamps / f"{op}"))
                for op, pool in pools.items()}
        results = {op: pools[op].collect(job, survivors, timeout=60, gone=[victim]) for op, job in jobs.items()}
        recovery = {op: pool.submit(job_survivors_round, [victim], 61) for op, pool in pools.items()}
        for op, job in recovery.items():
            results[op]["killed"] = _acted_at(stamps / f"{op}")
            results[op]["recovered"] = pools[op].collect(job, survivors, timeout=60, gone=[victim])
        return results
    finally:
        for pool in pools.values():
            pool.kill()


@pytest.mark.parametrize("R", [2, 4])
@pytest.mark.parametrize("op", range(len(ROUND_OPS)), ids=ROUND_OPS)
def test_rank_killed(kill_results, R, op):
    """The others raise within a second of the kill, naming the dead rank; their Buffer refuses the
    next call at once; a group of the survivors works."""
    results, victim = kill_results(R)[op], R - 1
    for rank in range(R - 1):
        outcome, _, op_started, raised, (again, again_started, again_raised) = results[rank]
        assert outcome is not None, f"rank {rank}: no error"
        mro, message, missing = outcome
        assert "RuntimeError" in mro and f"rank {victim} left the group" in message, f"rank {rank}: {outcome}"
        assert missing == [victim], f"rank {rank}: missing_ranks {missing}"
        seconds = raised - max(op_started, results["killed"])  # from the kill, or its own arrival if later
        assert seconds < 1.0, f"rank {rank} raised {seconds:.2f} s after the kill"
        assert again is not None and "cannot be used any more" in again[1] and again_raised - again_started < 0.1, again
        assert results["recovered"][rank] == [], results["recovered"][rank]


def job_shutdown_after_stuck_peer(rank, R, group, stamp_file):
    """Rank R-1 stops for good before its dispatch; the others time out, then abort the group and
    destroy it. Returns (outcome, seconds from the error to the group being gone)."""
    import gc

    import eplib
    import torch.distributed as dist

    from datetime import timedelta

    outcome = job_faulty_round(rank, R, group, R - 1, 0, "stop", 70, stamp_file)[0]
    # Every survivor has its own timeout before any closes its connections (which a survivor still
    # waiting would see as the group lost).
    store = group.get_group_store()
    store.set(f"test/timed-out/{rank}", "1")
    store.wait([f"test/timed-out/{r}" for r in range(R - 1)], timedelta(seconds=30))
    start = time.monotonic()
    eplib.abort(group)
    _kept.clear()
    dist.destroy_process_group()
    gc.collect()
    return outcome, time.monotonic() - start


@pytest.mark.parametrize("R", [2, 4])
def test_shutdown_after_stuck_peer(R, tmp_path):
    pool = RankPool(R, start_method="forkserver", gloo_timeout_s=600)  # gloo alone would hold on for 10 min
    try:
        job = pool.submit(job_shutdown_after_stuck_peer, str(tmp_path / "stamp"))
        for rank, (outcome, seconds) in pool.collect(job, range(R - 1), timeout=LIMIT_S + 30).items():
            assert outcome is not None and f"rank {R - 1} never arrived" in outcome[1], f"rank {rank}: {outcome}"
            assert seconds < 3, f"rank {rank}: shutting the group down took {seconds:.1f} s"
    finally:
        pool.kill()


def test_process_exits_after_stuck_peer():
    """Real interpreters (tests/fault_exit_rank.py, as torchrun would start them): rank 1 stops for
    good; rank 0 times out and returns from main without calling eplib.abort. It exits within seconds
    (eplib's exit hook aborts the group); without it, it would wait for gloo's timeout (here 600 s)."""
    returncode, seconds, out = exit_after_stuck_peer()
    assert returncode == 0 and seconds is not None, out
    assert seconds < 5, f"rank 0 exited {seconds:.1f} s after its error:\n{out}"


def exit_after_stuck_peer() -> Tuple[int, Optional[float], str]:
    """Runs the two interpreters of test_process_exits_after_stuck_peer; returns rank 0's exit code,
    the seconds from its error to its exit (None when it did not raise) and its output."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_exit_rank.py")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               EPLIB_TIMEOUT_S=str(LIMIT_S), OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, script], env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        out, _ = ranks[0].communicate(timeout=120)
        exited = time.time()
        raised = [float(line.split()[1]) for line in out.splitlines() if line.startswith("raised")]
        return ranks[0].returncode, exited - raised[0] if raised else None, out
    finally:
        for process in ranks:
            process.kill()
            process.communicate()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
