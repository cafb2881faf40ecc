"""The ipc transport's logic on the CPU (no GPU needed): IpcTransport with its peer buffers and the
round protocol of csrc/cuda/peer.h emulated by tests/ipc_emulation.py (files in /dev/shm mapped by
every rank process, the kernels' send and receive steps on CPU tensors), behind eplib.Buffer.

Covers what does not depend on CUDA itself: the handle exchange and its checks (open_peer_buffer),
the counts records, row placement in the peers' regions (rank_prefix_matrix and slot layouts), round
counting across normal, num_worst_tokens, cached and combine calls, the fit checks (exact to the
byte), the error-flag protocol, ranks that disagree on the format (every rank raises after the
counts exchange), the double-buffered notify tables, timeouts (phase and peer named, the Buffer
refused afterwards) and teardown. The same contract runs on a GPU in tests/test_gpu_buffer.py and
tests/test_ipc.py.

A test fails when the emulated protocol is broken on purpose (tried by hand: a row shift off by one in
dispatch or combine, a fit check one row short, a receiver that does not wait for `done`, a sender
that does not wait for `ready`, single-buffered notify tables, `done` published one round behind).
"""

import gc
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import eplib
from dist_harness import (all_ranks_idx, base_case, captured_logs, describe_diff, eplib_timeout, fill_case,
                          make_random_rows, make_topk_idx, make_topk_weights, outcome, same, timed_outcome)
from eplib import _C
from eplib.reference import ReferenceBuffer
from eplib.transports.ipc import PeerUnavailable, open_peer_buffer
from gpu_harness import REFUSED, check_timeout_report, dispatch_with_layout, job_gpu_compare
from ipc_emulation import (HEADER_BYTES, EmulatedIpcTransport, EmulatedMemoryError, EmulatedPeerBuffer, _shm_dir,
                           emulated_ipc_buffer, emulated_peer_buffers)
from test_gpu_buffer import GPU_CASES, check_error_flag

BACKEND = "emulated-ipc"

# A subset of the GPU contract cases: every layout path (normal, num_worst_tokens slots, FP8 scales,
# x only, empty ranks, duplicate ids, bias forms).
COMPARE_CASES = ["fp32-uniform", "bf16-zipf", "fp8-masked", "fp32-dup-bias_single", "bf16-hot-bias_tuple-num_worst",
                 "fp32-masked-num_worst-bias", "fp32-empty_ranks-align8", "fp8-x_only-num_worst", "bf16-many_tokens"]


@pytest.mark.parametrize("name", COMPARE_CASES)
def test_emulated_ipc_equals_reference(pool, name):
    case = fill_case(base_case(**GPU_CASES[name]), pool.world_size)
    errs = pool.run(job_gpu_compare, BACKEND, case, "ref", timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("name", ["fp32-uniform", "bf16-hot-bias_tuple-num_worst", "fp8-x_only-num_worst"])
def test_emulated_ipc_one_rank_equals_reference(pool_cache, name):
    """R=1: every row goes through the rank's own region, inside the same round hand-shake."""
    case = fill_case(base_case(**GPU_CASES[name]), 1)
    errs = pool_cache(1).run(job_gpu_compare, BACKEND, case, "ref", timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("world_size", [1, 2])
def test_emulated_ipc_error_flag(pool_cache, world_size):
    check_error_flag(pool_cache, BACKEND, world_size)


# ------------------------------------------------------------------------------------ helpers


def transport_of(buf) -> EmulatedIpcTransport:
    return buf._cpu


def counters_everywhere(buf, group) -> list:
    """[rank] -> the peer header's local counters of that rank (gathered over the gloo group)."""
    out = [None] * group.size()
    dist.all_gather_object(out, transport_of(buf).peer.counters(), group=group)
    return out


def own_shm_files() -> list:
    """This process's emulated peer-buffer files still in the directory the emulation puts them in
    (ipc_emulation._shm_dir(): /dev/shm, else the temporary directory); names are unlinked once opened."""
    prefix = f"eplib-emu-{os.getpid()}-"
    return [n for n in os.listdir(_shm_dir()) if n.startswith(prefix)]


# ------------------------------------------------------------------------------------ construction


def job_open_checks(rank, R, group):
    """open_peer_buffer through EmulatedIpcTransport: each failure raises alike on every rank and the
    group stays in step (a good construction follows each). Returns {step: outcome}."""
    good = HEADER_BYTES + 4096
    out = {}

    def make(nbytes):
        return EmulatedIpcTransport(group, nbytes)

    out["sizes differ"] = outcome(lambda: make(good + 16 * rank))
    out["too small"] = outcome(lambda: make(HEADER_BYTES + 15))
    EmulatedPeerBuffer.fail_allocation = rank == R - 1
    try:
        out["allocation fails on the last rank"] = outcome(lambda: make(good))
    finally:
        EmulatedPeerBuffer.fail_allocation = False
    EmulatedPeerBuffer.fail_open = rank == 0
    try:
        out["open fails on rank 0"] = outcome(lambda: make(good))
    finally:
        EmulatedPeerBuffer.fail_open = False
    import socket

    saved = socket.gethostname
    if rank == R - 1:
        socket.gethostname = lambda: "another-host"
    try:
        out["several hosts"] = outcome(lambda: make(good))
    finally:
        socket.gethostname = saved
    gc.collect()
    out["files left after the failures"] = repr(own_shm_files())
    transport = make(good)
    peer = transport.peer
    out["good"] = (type(peer).__name__, peer.is_open, peer.num_bytes, peer.region_bytes,
                   len(peer.ipc_handle()), repr(own_shm_files()))
    out["destroy"] = transport.destroy()
    out["destroy again"] = transport.destroy()
    out["after destroy"] = outcome(lambda: transport._check_usable())
    out["peer after destroy"] = (peer.is_open, peer.timeout_report())
    return out


def test_emulated_ipc_open_checks(pool):
    R = pool.world_size
    results = pool.run(job_open_checks, timeout=60)
    for rank, out in enumerate(results):
        assert re.match(r"ValueError: num_nvl_bytes: all ranks must pass the same", out["sizes differ"]), out
        assert re.match(rf"ValueError: num_nvl_bytes: .*at least {HEADER_BYTES + 16}\b", out["too small"]), out
        assert re.match(rf"PeerUnavailable: rank\(s\) \[{R - 1}\] could not allocate",
                        out["allocation fails on the last rank"]), out
        assert re.match(r"PeerUnavailable: rank\(s\) \[0\] could not open", out["open fails on rank 0"]), out
        assert re.match(r"PeerUnavailable: the ranks are on several hosts", out["several hosts"]), out
        assert out["files left after the failures"] == "[]", out
        assert out["good"] == ("EmulatedPeerBuffer", True, HEADER_BYTES + 4096, 4096, 64, "[]"), out
        assert out["destroy"] is True and out["destroy again"] is True, out
        assert re.match(r"RuntimeError: eplib: this Buffer was destroyed", out["after destroy"]), out
        assert out["peer after destroy"] == (False, (0, -1)), out


def test_emulated_ipc_too_many_ranks():
    class Group:  # open_peer_buffer asks only for the size and rank before refusing
        def size(self):
            return _C.PEER_MAX_RANKS + 1

        def rank(self):
            return 0

    with emulated_peer_buffers(), pytest.raises(PeerUnavailable, match=rf"{_C.PEER_MAX_RANKS + 1} ranks"):
        open_peer_buffer(Group(), torch.device("cpu"), HEADER_BYTES + 4096)


# ------------------------------------------------------------------------------------ a peer that never arrives

TIMEOUT_S = 0.5
PHASES = _C.PEER_PHASES


def job_peer_never_arrives(rank, R, group):
    """Rank 1 takes part in the first calls, then goes quiet (waits in a gloo barrier) while rank 0
    calls: every wait for it times out after EPLIB_TIMEOUT_S, names the phase and rank 1, and the Buffer
    refuses calls afterwards. Also a sender that stalls between its ready hand-shake and its rows
    (receive-phase timeout). Returns rank 0's {step: (outcome, seconds)}."""
    T, H, K, E = 12, 32, 2, 2 * R
    idx, w = make_topk_idx(5, rank, T, K, E, "uniform"), make_topk_weights(5, rank, T, K)
    x = make_random_rows(5, rank, T, H, "fp32")
    names = ("normal", "worst", "cached", "combine", "slow")
    bufs = {name: emulated_ipc_buffer(group, HEADER_BYTES + (1 << 16)) for name in names}
    handles = {}
    for name in ("cached", "combine"):
        out = dispatch_with_layout(bufs[name], x, idx, w, E)
        handles[name] = out
    out = {}
    # A sender that stalls after its ready hand-shake: rank 0's receive gives up first.
    if rank == 1:
        EmulatedPeerBuffer.stall_in_send_s = 4 * TIMEOUT_S
    try:
        with eplib_timeout(TIMEOUT_S if rank == 0 else 20):
            out["stalled sender: dispatch"] = timed_outcome(lambda: dispatch_with_layout(bufs["slow"], x, idx, w, E))
    finally:
        EmulatedPeerBuffer.stall_in_send_s = 0.0
    if rank != 0:
        dist.barrier(group)
        return None
    with eplib_timeout(TIMEOUT_S):
        out["stalled sender: next call"] = timed_outcome(lambda: dispatch_with_layout(bufs["slow"], x, idx, w, E))
        out["normal dispatch"] = timed_outcome(lambda: dispatch_with_layout(bufs["normal"], x, idx, w, E))
        out["normal: next call"] = timed_outcome(lambda: dispatch_with_layout(bufs["normal"], x, idx, w, E))
        out["num_worst dispatch"] = timed_outcome(lambda: dispatch_with_layout(bufs["worst"], x, idx, w, E,
                                                                        num_worst_tokens=T * R))
        out["num_worst: next call"] = timed_outcome(lambda: bufs["worst"].get_dispatch_layout(idx, E))
        out["num_worst: call after"] = timed_outcome(lambda: bufs["worst"].get_dispatch_layout(idx, E))
        recv_x, _, recv_w, _, handle, _ = handles["cached"]
        out["cached dispatch"] = timed_outcome(lambda: bufs["cached"].dispatch(x, handle=handle))
        out["cached: next call"] = timed_outcome(lambda: bufs["cached"].dispatch(x, handle=handle))
        recv_x, _, recv_w, _, handle, _ = handles["combine"]
        out["combine"] = timed_outcome(lambda: bufs["combine"].combine(recv_x, handle, topk_weights=recv_w))
        out["combine: next call"] = timed_outcome(lambda: bufs["combine"].combine(recv_x, handle, topk_weights=recv_w))
        out["aborted"] = {name: transport_of(b).peer.counters()["aborted"] for name, b in bufs.items()}
    dist.barrier(group)
    return out


def check_timeout(step, result, phase: int, max_s: float, min_s: float = 0.0) -> None:
    """gpu_harness.check_timeout_report, the phase named exactly as _C.PEER_PHASES[phase] (case included)."""
    check_timeout_report(step, result, re.escape(PHASES[phase]), max_s=max_s, min_s=min_s)


def test_emulated_ipc_peer_never_arrives(pool2):
    out = pool2.run(job_peer_never_arrives, timeout=60)[0]
    # Receive-phase timeout: not raised by the dispatch itself (only the counts exchange is waited
    # for on the host), but by the next call.
    assert out["stalled sender: dispatch"][0] == "ok", out
    check_timeout("stalled sender", out["stalled sender: next call"], 3, max_s=0.5)
    # Counts exchange: raised at once, after about EPLIB_TIMEOUT_S.
    check_timeout("normal dispatch", out["normal dispatch"], 1, min_s=TIMEOUT_S, max_s=TIMEOUT_S + 3)
    assert REFUSED.match(out["normal: next call"][0]) and out["normal: next call"][1] < 0.5, out
    # num_worst_tokens: the host does not read the counts; the next call raises, then refuses.
    assert out["num_worst dispatch"][0] == "ok", out
    check_timeout("num_worst: next call", out["num_worst: next call"], 1, max_s=0.5)
    assert REFUSED.match(out["num_worst: call after"][0]), out
    # Send phases of cached dispatch and combine.
    assert out["cached dispatch"][0] == "ok" and out["combine"][0] == "ok", out
    check_timeout("cached: next call", out["cached: next call"], 2, max_s=0.5)
    check_timeout("combine: next call", out["combine: next call"], 4, max_s=0.5)
    assert out["aborted"] == {"normal": 1, "worst": 1, "cached": 1, "combine": 1, "slow": 1}, out


# ------------------------------------------------------------------------------------ buffer too small

NEEDS = re.compile(r"num_nvl_bytes: this (.*) needs (\d+) bytes of peer buffer.*the Buffer has (\d+); "
                   r"size it with Buffer.get_nvl_buffer_size_hint", re.S)


def job_buffer_too_small(rank, R, group):
    """A Buffer with exactly the bytes of a bf16 normal dispatch of T tokens to every rank. Calls that
    need more raise ValueError with the exact bytes they need, on every rank; the Buffer works after
    (results compared with eplib.reference) and the ranks' round counters stay equal.
    Returns {"num_nvl_bytes", "needed": {step: bytes}, "outcomes", "errors", "counters"}."""
    T, H, El = 16, 64, 2
    E, K = El * R, R
    idx = all_ranks_idx(T, R, El)
    w = make_topk_weights(20, rank, T, K)
    x = make_random_rows(20, rank, T, H, "bf16")
    stride = _C.dispatch_row_stride(2 * H, 0, K)
    nvl = HEADER_BYTES + R * T * stride
    buf, ref = emulated_ipc_buffer(group, nvl), ReferenceBuffer(group)
    res = {"num_nvl_bytes": nvl, "outcomes": {}, "errors": [], "needed": {}}

    def check(name, got, want):
        if not same(got, want):
            res["errors"].append(f"rank {rank} " + describe_diff(name, got, want))

    def both(fn, name):
        got, want = fn(buf), fn(ref)
        for i, (g, v) in enumerate(zip(got, want)):
            if not (hasattr(g, "current_stream_wait") or i == 4 and name.endswith("dispatch")):
                check(f"{name}[{i}]", g, v)
        return got, want

    (d, d_ref) = both(lambda b: dispatch_with_layout(b, x, idx, w, E), "fitting dispatch")
    handle, handle_ref = d[4], d_ref[4]
    # Too large. Normal mode, only the last rank receives (every token of every rank), K = 1.
    x32 = make_random_rows(21, rank, T, H, "fp32")
    to_last = ((R - 1) * El + torch.arange(T, dtype=torch.int64) % El)[:, None].contiguous()
    res["needed"]["dispatch"] = HEADER_BYTES + R * T * _C.dispatch_row_stride(4 * H, 0, 1)
    res["outcomes"]["dispatch"] = outcome(lambda: dispatch_with_layout(
        buf, x32, to_last, make_topk_weights(21, rank, T, 1), E))
    res["needed"]["num_worst_tokens dispatch"] = HEADER_BYTES + R * (R * T) * stride
    res["outcomes"]["num_worst_tokens dispatch"] = outcome(lambda: dispatch_with_layout(
        buf, x, idx, w, E, num_worst_tokens=R * T))
    res["needed"]["cached dispatch"] = HEADER_BYTES + R * T * _C.dispatch_row_stride(4 * H, 0, 0)
    res["outcomes"]["cached dispatch"] = outcome(lambda: buf.dispatch(x32, handle=handle))
    res["needed"]["combine"] = HEADER_BYTES + R * T * _C.combine_row_stride(4 * H, K)
    y32 = make_random_rows(22, rank, R * T, H, "fp32")
    res["outcomes"]["combine"] = outcome(lambda: buf.combine(y32, handle, topk_weights=d[2]))
    counters_after_errors = transport_of(buf).peer.counters()

    # The Buffer works after: cached dispatch and combine on the first handle, a smaller round.
    x2 = make_random_rows(23, rank, T, H, "bf16")
    check("cached dispatch after", buf.dispatch(x2, handle=handle)[0], ref.dispatch(x2, handle=handle_ref)[0])
    y = make_random_rows(24, rank, R * T, H, "bf16")
    check("combine after", buf.combine(y, handle, topk_weights=d[2])[:2],
          ref.combine(y, handle_ref, topk_weights=d_ref[2])[:2])
    small = T // 2
    both(lambda b: dispatch_with_layout(b, x[:small], idx[:small].contiguous(), w[:small].contiguous(), E),
         "smaller dispatch")
    res["counters"] = counters_everywhere(buf, group)
    res["counters after the errors"] = counters_after_errors
    return res


@pytest.mark.parametrize("world_size", [2, 4])
def test_emulated_ipc_buffer_too_small(pool_cache, world_size):
    results = pool_cache(world_size).run(job_buffer_too_small, timeout=60)
    for rank, res in enumerate(results):
        assert not res["errors"], "\n".join(res["errors"])
        for step, text in res["outcomes"].items():
            assert text.startswith("ValueError: "), f"rank {rank} {step}: expected ValueError, got {text!r}"
            match = NEEDS.search(text)
            assert match, f"rank {rank} {step}: no 'num_nvl_bytes: this ... needs N bytes ... has M' in {text!r}"
            assert match.group(1) == step, f"rank {rank}: {step} reported as {match.group(1)!r}"
            assert int(match.group(2)) == res["needed"][step], f"rank {rank} {step}: {text!r}, rows need " \
                                                               f"{res['needed'][step]}"
            assert int(match.group(3)) == res["num_nvl_bytes"], text
        # Rounds: 1 notify + 1 send per dispatch that went through (2 normal), 1 notify for the dispatch
        # that failed its fit check after the counts exchange; 1 send for the cached dispatch and the
        # combine after; nothing for the calls refused before any kernel.
        assert res["counters after the errors"] == dict(round_sent=1, notify_round=2, barrier_round=0,
                                                        blocks_finished=0, aborted=0), res
        assert res["counters"] == [dict(round_sent=4, notify_round=3, barrier_round=0, blocks_finished=0,
                                        aborted=0)] * world_size, res["counters"]


def job_exact_fit(rank, R, group, mode, slack):
    """A Buffer of exactly the bytes one call needs, plus `slack` (0 or -1): the call runs within the
    region (the emulation raises EmulatedMemoryError on any row outside) and equals eplib.reference
    (slack 0), or raises ValueError on every rank (slack -1). Uneven routing (zipf, an empty rank), so
    receive and send totals differ per rank. Cached dispatch and combine move fp32 rows on the handle
    of a bf16 dispatch, so theirs is the larger need. Returns (outcome, errors)."""
    T, H, K, E = [9, 0, 14, 5][rank % 4], 48, 3, 3 * R
    idx = make_topk_idx(31, rank, T, K, E, "zipf")
    w = make_topk_weights(31, rank, T, K)
    single = mode in ("dispatch", "num_worst")
    x = make_random_rows(31, rank, T, H, "fp32" if single else "bf16")
    ref = ReferenceBuffer(group)
    d_ref = dispatch_with_layout(ref, x, idx, w, E)
    counts = torch.diff(d_ref[4][0].to(torch.int64), dim=0, prepend=torch.zeros(1, R, dtype=torch.int64))
    recv_max, send_max = int(counts.sum(0).max()), int(counts.sum(1).max())
    W = recv_max
    needed = {"dispatch": HEADER_BYTES + recv_max * _C.dispatch_row_stride(4 * H, 0, K),
              "num_worst": HEADER_BYTES + R * W * _C.dispatch_row_stride(4 * H, 0, K),
              "cached": HEADER_BYTES + recv_max * _C.dispatch_row_stride(4 * H, 0, 0),
              "combine": HEADER_BYTES + send_max * _C.combine_row_stride(4 * H, K)}[mode]
    if not single:
        assert needed + slack >= HEADER_BYTES + recv_max * _C.dispatch_row_stride(2 * H, 0, K)
    # The reference first: its collectives must not wait for a rank that the emulation stopped.
    x2 = make_random_rows(32, rank, T, H, "fp32")
    y = make_random_rows(33, rank, d_ref[0].shape[0], H, "fp32")
    kwargs = dict(num_worst_tokens=W) if mode == "num_worst" else {}
    if mode == "cached":
        def call(b, dd):
            return b.dispatch(x2, handle=dd[4])[0]
    elif mode == "combine":
        def call(b, dd):
            return b.combine(y, dd[4], topk_weights=dd[2])[:2]
    else:
        def call(b, dd):
            return dispatch_with_layout(b, x, idx, w, E, **kwargs)[:4]
    want = call(ref, d_ref)
    buf = emulated_ipc_buffer(group, needed + slack)
    errs, got = [], []
    try:
        d = None if single else dispatch_with_layout(buf, x, idx, w, E)
        result = outcome(lambda: got.append(call(buf, d)))
        if result == "ok" and not same(got[0], want):
            errs.append(describe_diff(mode, got[0], want))
    except EmulatedMemoryError as error:
        result = "out of bounds"
        errs.append(str(error))
    return result, errs


@pytest.mark.parametrize("mode", ["dispatch", "num_worst", "cached", "combine"])
def test_emulated_ipc_exact_fit(pool4, mode):
    """Exactly enough bytes: the call runs (inside the region, right results); one byte less: ValueError
    on every rank. A cached dispatch needs the most rows any rank receives, a combine the most any
    rank sends (they come back)."""
    for slack in (0, -1):
        results = pool4.run(job_exact_fit, mode, slack, timeout=60)
        for rank, (result, errs) in enumerate(results):
            assert not errs, f"slack {slack} rank {rank}: " + "\n".join(errs)
            if slack == 0:
                assert result == "ok", f"rank {rank}: {result}"
            else:
                assert NEEDS.search(result) and result.startswith("ValueError"), f"rank {rank}: {result}"


# ------------------------------------------------------------------------------------ many rounds

NUM_ROUNDS = 100


def job_many_rounds(rank, R, group, num_rounds):
    """num_rounds back-to-back rounds on one Buffer (sized by get_nvl_buffer_size_hint), the mode cycling
    normal -> cached (on the normal round's handle) -> num_worst_tokens -> cached (on its handle), each
    followed by a combine; token counts change every round (0 to T_MAX, different per rank, now and then
    0 on every rank), skews cycle, num_sms varies; every output is compared with eplib.reference running
    the same calls. Then the ranks' round counters. Returns (errors (first 20), number of errors,
    counters of every rank, expected counters)."""
    T_MAX, H, K = 24, 32, 3
    E = 3 * R
    W = R * T_MAX
    buf = emulated_ipc_buffer(group, eplib.Buffer.get_nvl_buffer_size_hint(W, 2 * H, R, num_topk=K))
    ref = ReferenceBuffer(group)
    skews = ("uniform", "masked", "zipf", "hot", "dup", "all_masked")
    errors, num_errors = [], 0
    previous = None
    sends = notifies = 0
    config_sms = (2, 4, 20)
    for i in range(num_rounds):
        mode = ("normal", "cached", "num_worst", "cached")[i % 4]
        where = f"rank {rank} round {i} ({mode})"
        config = eplib.Config(config_sms[i % len(config_sms)])
        if mode == "cached":
            (handle, handle_ref, T), previous = previous, None
            x = make_random_rows(i, rank, T, H, "bf16")
            got = buf.dispatch(x, handle=handle, config=config)
            want = ref.dispatch(x, handle=handle_ref)
            sends += 1
            recv_w = recv_w_ref = None
        else:
            T = (7 * i + 11 * rank + 3) % (T_MAX + 1) if i % 10 != 4 else 0  # sometimes no rank has tokens
            skew = skews[(i // 4) % len(skews)]
            idx = make_topk_idx(i, rank, T, K, E, skew)
            w = make_topk_weights(i, rank, T, K)
            x = make_random_rows(i, rank, T, H, "bf16")
            kwargs = dict(num_worst_tokens=W) if mode == "num_worst" else {}
            got = dispatch_with_layout(buf, x, idx, w, E, config=config, **kwargs)
            want = dispatch_with_layout(ref, x, idx, w, E, **kwargs)
            handle, handle_ref = got[4], want[4]
            recv_w, recv_w_ref = got[2], want[2]
            sends += 1
            notifies += 1
            previous = (handle, handle_ref, T)
        errs = [describe_diff(f"dispatch[{k}]", g, v) for k, (g, v) in enumerate(zip(got[:4], want[:4]))
                if not same(g, v)]
        if mode == "cached":
            if got[4] is not None:
                errs.append("cached dispatch returned a handle")
        elif not same(got[4][0], want[4][0]):
            errs.append(describe_diff("handle[0]", got[4][0], want[4][0]))
        y = make_random_rows(i + 1000, rank, got[0].shape[0], H, "bf16")
        bias = make_random_rows(i + 2000, rank, T, H, "bf16") if i % 2 else None
        c = buf.combine(y, handle, topk_weights=recv_w, bias=bias, config=config)
        c_ref = ref.combine(y, handle_ref, topk_weights=recv_w_ref, bias=bias)
        sends += 1
        errs += [describe_diff(f"combine[{k}]", g, v) for k, (g, v) in enumerate(zip(c[:2], c_ref[:2]))
                 if not same(g, v)]
        num_errors += len(errs)
        errors += [f"{where}: {e}" for e in errs][:20 - len(errors)]
    expected = dict(round_sent=sends, notify_round=notifies, barrier_round=0, blocks_finished=0, aborted=0)
    return errors, num_errors, counters_everywhere(buf, group), expected


@pytest.mark.parametrize("world_size,num_rounds", [(2, 2 * NUM_ROUNDS), (4, NUM_ROUNDS)], ids=["R2", "R4"])
def test_emulated_ipc_many_rounds(pool_cache, world_size, num_rounds):
    results = pool_cache(world_size).run(job_many_rounds, num_rounds, timeout=60)
    for rank, (errors, num_errors, counters, expected) in enumerate(results):
        assert num_errors == 0, f"rank {rank}: {num_errors} mismatches in {num_rounds} rounds, first:\n" + \
            "\n".join(errors)
        assert counters == [expected] * world_size, f"rank {rank}: round counters {counters}, expected {expected}"


# ------------------------------------------------------------------------------------ teardown


def job_destroy(rank, R, group):
    """explicitly_destroy=True: destroy() meets the other ranks at the peer-memory barrier (no warning),
    later calls raise. A rank that destroys while the others do not come: its barrier times out after
    EPLIB_TIMEOUT_S, it warns and frees anyway; the late ranks then find its barrier flag and pass.
    Without explicitly_destroy, garbage collection frees the peer buffer without a barrier.
    Returns {step: value}."""
    import logging
    import weakref

    out = {}
    T, H, K, E = 8, 16, 2, 2 * R
    idx, w = make_topk_idx(3, rank, T, K, E, "uniform"), make_topk_weights(3, rank, T, K)
    x = make_random_rows(3, rank, T, H, "fp32")
    with captured_logs(logging.WARNING) as warnings:
        buf = emulated_ipc_buffer(group, HEADER_BYTES + (1 << 16), explicitly_destroy=True)
        dispatch_with_layout(buf, x, idx, w, E)
        peer = transport_of(buf).peer
        buf.destroy()
        out["explicit: warnings"] = list(warnings)
        out["explicit: peer"] = (peer.is_open, peer.timeout_report())
        out["explicit: call after"] = outcome(lambda: dispatch_with_layout(buf, x, idx, w, E))

        # Rank 0 destroys alone first.
        transports = [EmulatedIpcTransport(group, HEADER_BYTES + 4096) for _ in range(2)]
        warnings.clear()
        with eplib_timeout(TIMEOUT_S):
            if rank == 0:
                out["alone"] = timed_outcome(lambda: out.setdefault("alone: clean", transports[0].destroy()))
                out["alone: warnings"] = list(warnings)
            dist.barrier(group)
            if rank != 0:
                out["late: clean"] = transports[0].destroy()
        out["together: clean"] = transports[1].destroy()

        # Garbage collection: no barrier, so one rank alone does not wait.
        buf = emulated_ipc_buffer(group, HEADER_BYTES + 4096)
        dispatch_with_layout(buf, x, idx, w, E)
        alive = weakref.ref(transport_of(buf).peer)
        dist.barrier(group)
        if rank == 0:
            t0 = time.monotonic()
            del buf
            gc.collect()
            out["gc: freed"] = alive() is None
            out["gc: seconds"] = time.monotonic() - t0
        dist.barrier(group)
        out["files left"] = own_shm_files()
    return out


def test_emulated_ipc_destroy(pool):
    results = pool.run(job_destroy, timeout=60)
    for rank, out in enumerate(results):
        assert out["explicit: warnings"] == [], out
        assert out["explicit: peer"] == (False, (0, -1)), out
        assert re.match(r"RuntimeError: .*destroyed", out["explicit: call after"]), out
        if rank == 0:
            assert out["alone: clean"] is False and out["alone"][0] == "ok", out
            assert TIMEOUT_S <= out["alone"][1] < TIMEOUT_S + 3, out
            assert any("teardown barrier timed out" in m for m in out["alone: warnings"]), out
            assert out["gc: freed"] and out["gc: seconds"] < 0.5 * TIMEOUT_S, out
        else:
            assert out["late: clean"] is True, out
        assert out["together: clean"] is True, out
        assert out["files left"] == [], out


# ------------------------------------------------------------------------------------ notify tables


def job_notify_tables(rank, R, group):
    """Two counts exchanges back to back with no row round between them (the first dispatch does not
    fit the buffer and raises after its exchange), while the last rank lingers between its wait and
    the read of its table: the others write their next records meanwhile, which must not land in the
    table being read (peer.h: tables double-buffered by the notify round's parity). Returns
    (outcome of the large dispatch, errors of the small one against eplib.reference)."""
    T, H, K, E = 12, 32, 2, 2 * R
    buf, ref = emulated_ipc_buffer(group, HEADER_BYTES + 4 * T * _C.dispatch_row_stride(4 * H, 0, K)), \
        ReferenceBuffer(group)
    idx, w = make_topk_idx(8, rank, T, K, E, "uniform"), make_topk_weights(8, rank, T, K)
    # Only rank 0's record makes the first dispatch too large (its 4T tokens all go to the last rank):
    # a rank that read rank 0's next record instead would go ahead and send.
    T_large = 4 * T if rank == 0 else T
    x_large = make_random_rows(8, rank, T_large, H, "fp32")
    idx_large = make_topk_idx(9, rank, T_large, K, E, "hot" if rank == 0 else "uniform")
    w_large = make_topk_weights(9, rank, T_large, K)
    x = make_random_rows(10, rank, T, H, "fp32")
    EmulatedPeerBuffer.stall_in_notify_s = 0.3 if rank == R - 1 else 0.0
    try:
        with eplib_timeout(5):
            large = outcome(lambda: dispatch_with_layout(buf, x_large, idx_large, w_large, E))
    finally:
        EmulatedPeerBuffer.stall_in_notify_s = 0.0
    with eplib_timeout(5):
        got = dispatch_with_layout(buf, x, idx, w, E)
    want = dispatch_with_layout(ref, x, idx, w, E)
    errs = [describe_diff(f"[{i}]", g, v) for i, (g, v) in enumerate(zip(got[:4], want[:4])) if not same(g, v)]
    return large, errs


def test_emulated_ipc_notify_tables(pool):
    for rank, (large, errs) in enumerate(pool.run(job_notify_tables, timeout=60)):
        assert large.startswith("ValueError: num_nvl_bytes: this dispatch needs"), f"rank {rank}: {large}"
        assert not errs, f"rank {rank}: " + "\n".join(errs)


# ------------------------------------------------------------------------------------ ranks that disagree


def job_mismatch_ipc(rank, R, group, name):
    """test_peer_errors.job_mismatch (one rank's input differs from the others') on the emulated ipc
    transport: every rank must raise after the counts exchange, before any row moves, and the Buffer
    must keep working."""
    from test_peer_errors import job_mismatch

    saved = eplib.Buffer
    eplib.Buffer = lambda group, **kwargs: emulated_ipc_buffer(group, HEADER_BYTES + (1 << 16))
    try:
        return job_mismatch(rank, R, group, name, timeout_s=10)
    finally:
        eplib.Buffer = saved


# Not "dtype_differs_same_width": its odd rank passes fp16, which CUDA transports refuse on that rank alone
# (TypeError before any exchange), so the others' exchange pairs with that rank's next call.
@pytest.mark.parametrize("name", ["nan_weight_on_last_rank", "top_k_differs", "hidden_differs", "num_experts_differs"])
def test_emulated_ipc_mismatch(pool, name):
    from test_peer_errors import check_mismatch_results

    check_mismatch_results(pool.run(job_mismatch_ipc, name, timeout=60), name, max_seconds=5)
