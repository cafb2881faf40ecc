"""The ipc transport on the CPU execution of the CUDA sources (marker cuda_cpu; eplib built with
EPLIB_CUDA_CPU=1): the real IpcTransport, the real _C.IpcBuffer and the real ipc kernels of
csrc/cuda, run by csrc/cuda_cpu (every CUDA thread a fiber, blocks shuffled, the host ahead of the
device; the ranks' buffers are memfd allocations that the rank processes map through their IPC
handles), behind eplib.Buffer.

Covers: results bit for bit against eplib.reference on 1, 2 and 4 ranks; the handle exchange and its
checks (open_ipc_buffer); row placement in the peers' regions (rank_prefix_matrix and slot layouts);
round counting across normal, num_worst_tokens, cached and combine calls, read from the device; the
fit checks (exact to the byte); the error-flag protocol; ranks that disagree on the format; the
double-buffered notify tables under a slow reader; timeouts (phase and peer named, outputs poisoned,
the Buffer refused afterwards, check_failed without a sync); launch sequences with no host work in
between, as a CUDA graph replays them; teardown. The same contract runs on a GPU in
tests/test_gpu_buffer.py and tests/test_ipc.py.
"""

import gc
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import eplib
from cuda_cpu import IPC_NVL_BYTES, cuda_cpu_buffer, cuda_cpu_transport
from dist_harness import (all_ranks_idx, base_case, captured_logs, describe_diff, eplib_timeout, fill_case,
                          make_random_rows, make_topk_idx, make_topk_weights, outcome, same, timed_outcome)
from eplib import _C
from eplib.reference import ReferenceBuffer
from eplib.transports.ipc import IpcUnavailable, open_ipc_buffer
from gpu_harness import REFUSED, check_timeout_report, dispatch_with_layout, job_gpu_compare
from test_gpu_buffer import GPU_CASES, check_error_flag

pytestmark = pytest.mark.cuda_cpu

BACKEND = "cuda_cpu-ipc"
HEADER_BYTES = _C.ipc_header_bytes() if hasattr(_C, "ipc_header_bytes") else 0
# Rings after the header for the small calls of these tests: one chunk per (source, channel) stream of
# Buffer's default configs for rows of up to ~1 KB on 4 ranks (rings longer than a chunk where it fits).
SMALL_CALLS_BYTES = HEADER_BYTES + (1 << 20)

# A subset of the GPU contract cases: every layout path (normal, num_worst_tokens slots, FP8 scales in
# both dtypes and column-major, x only, empty ranks, duplicate ids, bias forms).
COMPARE_CASES = ["fp32-uniform", "bf16-zipf", "fp8-masked", "fp32-dup-bias_single", "bf16-hot-bias_tuple-num_worst",
                 "fp32-masked-num_worst-bias", "fp32-empty_ranks-align8", "fp8-x_only-num_worst", "bf16-many_tokens",
                 "fp8-int32_column_major_scales"]


@pytest.mark.parametrize("name", COMPARE_CASES)
def test_ipc_cuda_cpu_equals_reference(pool, name):
    case = fill_case(base_case(**GPU_CASES[name]), pool.world_size)
    errs = pool.run(job_gpu_compare, BACKEND, case, "ref", timeout=120)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("name", ["fp32-uniform", "bf16-hot-bias_tuple-num_worst", "fp8-x_only-num_worst"])
def test_ipc_cuda_cpu_one_rank_equals_reference(pool_cache, name):
    """R=1: every row goes through the rank's own region, inside the same round hand-shake."""
    case = fill_case(base_case(**GPU_CASES[name]), 1)
    errs = pool_cache(1).run(job_gpu_compare, BACKEND, case, "ref", timeout=120)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("world_size", [1, 2])
def test_ipc_cuda_cpu_error_flag(pool_cache, world_size):
    check_error_flag(pool_cache, BACKEND, world_size)


# ------------------------------------------------------------------------------------ helpers


def ipc_buffer(group, num_nvl_bytes: int, **kwargs):
    """An eplib.Buffer on the ipc transport with num_nvl_bytes of buffer per rank (a collective)."""
    return cuda_cpu_buffer(group, "ipc", num_nvl_bytes=num_nvl_bytes, **kwargs)


def transport_of(buf):
    return buf._cpu


def counters_everywhere(buf, group) -> list:
    """[rank] -> the ipc header's local counters of that rank (read from the device, gathered over gloo)."""
    out = [None] * group.size()
    dist.all_gather_object(out, transport_of(buf).ipc_buffer.counters(), group=group)
    return out


def open_memfds() -> int:
    """Device allocations of the CPU execution this process still holds (memfds it created)."""
    fd_dir = "/proc/self/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            count += os.readlink(os.path.join(fd_dir, name)).startswith("/memfd:eplib-cuda-cpu")
        except OSError:
            pass
    return count


# ------------------------------------------------------------------------------------ construction


class _FailingOpen:
    """An _C.IpcBuffer whose open_peers fails as a refused cudaIpcOpenMemHandle would."""

    def __init__(self, *args) -> None:
        self.buffer = _REAL_IPC_BUFFER(*args)

    def __getattr__(self, name):
        return getattr(self.buffer, name)

    def open_peers(self, handles) -> None:
        raise RuntimeError("eplib: cannot open the ipc buffer of rank 1 (cudaIpcOpenMemHandle: refused by the test)")


def _failing_allocation(*args):
    raise RuntimeError("eplib: cudaMalloc (ipc buffer) failed: out of memory (the test)")


_REAL_IPC_BUFFER = _C.IpcBuffer if hasattr(_C, "IpcBuffer") else None


def job_open_checks(rank, R, group):
    """open_ipc_buffer through IpcTransport: each failure raises alike on every rank and the group stays in
    step (a good construction follows each); nothing stays allocated. Returns {step: outcome}."""
    good = HEADER_BYTES + 4096
    out = {}
    memfds_before = open_memfds()

    def make(nbytes):
        return cuda_cpu_transport(group, "ipc", nbytes)

    def with_ipc_buffer(factory, step):
        _C.IpcBuffer = factory
        try:
            out[step] = outcome(lambda: make(good))
        finally:
            _C.IpcBuffer = _REAL_IPC_BUFFER

    out["sizes differ"] = outcome(lambda: make(good + 16 * rank))
    out["too small"] = outcome(lambda: make(HEADER_BYTES + 15))
    with_ipc_buffer(_failing_allocation if rank == R - 1 else _REAL_IPC_BUFFER, "allocation fails on the last rank")
    with_ipc_buffer(_FailingOpen if rank == 0 else _REAL_IPC_BUFFER, "open fails on rank 0")
    import socket

    saved = socket.gethostname
    if rank == R - 1:
        socket.gethostname = lambda: "another-host"
    try:
        out["several hosts"] = outcome(lambda: make(good))
    finally:
        socket.gethostname = saved
    gc.collect()
    out["allocations left after the failures"] = open_memfds() - memfds_before
    transport = make(good)
    buffer = transport.ipc_buffer
    out["good"] = (type(buffer).__name__, buffer.is_open, buffer.num_bytes, buffer.region_bytes,
                   len(buffer.ipc_handle()), open_memfds() - memfds_before)
    out["destroy"] = transport.destroy()
    out["destroy again"] = transport.destroy()
    out["after destroy"] = outcome(lambda: transport._check_usable())
    out["buffer after destroy"] = (buffer.is_open, buffer.timeout_report())
    out["allocations left after destroy"] = open_memfds() - memfds_before
    return out


def test_ipc_cuda_cpu_open_checks(pool):
    R = pool.world_size
    results = pool.run(job_open_checks, timeout=60)
    for rank, out in enumerate(results):
        assert re.match(r"ValueError: num_nvl_bytes: all ranks must pass the same", out["sizes differ"]), out
        assert re.match(rf"ValueError: num_nvl_bytes: .*at least {HEADER_BYTES + 16}\b", out["too small"]), out
        assert re.match(rf"IpcUnavailable: rank\(s\) \[{R - 1}\] could not allocate",
                        out["allocation fails on the last rank"]), out
        assert re.match(r"IpcUnavailable: rank\(s\) \[0\] could not open", out["open fails on rank 0"]), out
        assert re.match(r"IpcUnavailable: the ranks are on several hosts", out["several hosts"]), out
        assert out["allocations left after the failures"] == 0, out
        assert out["good"] == ("IpcBuffer", True, HEADER_BYTES + 4096, 4096, 64, 1), out
        assert out["destroy"] is True and out["destroy again"] is True, out
        assert re.match(r"RuntimeError: eplib: this Buffer was destroyed", out["after destroy"]), out
        assert out["buffer after destroy"] == (False, (0, -1)), out
        assert out["allocations left after destroy"] == 0, out


def test_ipc_cuda_cpu_too_many_ranks():
    class Group:  # open_ipc_buffer asks only for the size and rank before refusing
        def size(self):
            return _C.IPC_MAX_RANKS + 1

        def rank(self):
            return 0

    with pytest.raises(IpcUnavailable, match=rf"{_C.IPC_MAX_RANKS + 1} ranks"):
        open_ipc_buffer(Group(), torch.device("cpu"), 0, HEADER_BYTES + 4096)


# ------------------------------------------------------------------------------------ a peer that never arrives

TIMEOUT_S = 0.5
PHASES = _C.IPC_PHASES if hasattr(_C, 'IPC_PHASES') else {}


def job_peer_never_arrives(rank, R, group):
    """Rank 1 takes part in the first calls, then goes quiet (waits in a gloo barrier) while rank 0
    calls: every wait for it times out after EPLIB_TIMEOUT_S, names the phase and rank 1, and the Buffer
    refuses calls afterwards. Also a sender that stalls between its ready hand-shake and its rows
    (receive-phase timeout). Returns rank 0's {step: (outcome, seconds)}."""
    T, H, K, E = 12, 32, 2, 2 * R
    idx, w = make_topk_idx(5, rank, T, K, E, "uniform"), make_topk_weights(5, rank, T, K)
    x = make_random_rows(5, rank, T, H, "fp32")
    names = ("normal", "worst", "cached", "combine", "slow")
    bufs = {name: ipc_buffer(group, SMALL_CALLS_BYTES) for name in names}
    handles = {}
    for name in ("cached", "combine"):
        out = dispatch_with_layout(bufs[name], x, idx, w, E)
        handles[name] = out
    out = {}
    # A sender that stalls at its barriers and warp operations (after its ready hand-shake too): rank 0's
    # receive gives up first. Blocks [0, C) of the exchange kernel send.
    if rank == 1:
        channels = eplib.Buffer.get_dispatch_config(R).num_channels
        _C.cuda_cpu_stall("ipc_dispatch_kernel", 4 * TIMEOUT_S, 1.0, 0, channels)
    try:
        with eplib_timeout(TIMEOUT_S if rank == 0 else 20):
            out["stalled sender: dispatch"] = timed_outcome(lambda: dispatch_with_layout(bufs["slow"], x, idx, w, E))
    finally:
        _C.cuda_cpu_stall("ipc_dispatch_kernel", 0)
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
        out["aborted"] = {name: transport_of(b).ipc_buffer.counters()["aborted"] for name, b in bufs.items()}
    dist.barrier(group)
    return out


def check_timeout(step, result, phases, max_s: float, min_s: float = 0.0) -> None:
    """gpu_harness.check_timeout_report, the phase named exactly as _C.IPC_PHASES[p] (case included) for
    one p of `phases` (an int or a tuple: an exchange's senders and receivers wait at once, and the first
    to give up reports)."""
    phases = phases if isinstance(phases, tuple) else (phases,)
    check_timeout_report(step, result, "|".join(re.escape(PHASES[p]) for p in phases), max_s=max_s, min_s=min_s)


def test_ipc_cuda_cpu_peer_never_arrives(pool2):
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
    # Cached dispatch and combine: their senders (waiting for rank 1 to be ready) and receivers (waiting
    # for its rows) give up alike.
    assert out["cached dispatch"][0] == "ok" and out["combine"][0] == "ok", out
    check_timeout("cached: next call", out["cached: next call"], (2, 3), max_s=0.5)
    check_timeout("combine: next call", out["combine: next call"], (4, 5), max_s=0.5)
    assert out["aborted"] == {"normal": 1, "worst": 1, "cached": 1, "combine": 1, "slow": 1}, out


# ------------------------------------------------------------------------------------ streaming through small rings

NEEDS = re.compile(r"num_nvl_bytes: this (\w+) needs at least (\d+) bytes of ipc buffer.*the Buffer has (\d+); "
                   r"size it with Buffer.get_nvl_buffer_size_hint", re.S)

# Channels, ring slots per (source, channel) stream, rows per chunk of the streaming tests.
STREAM_CONFIG = dict(num_sms=4, num_max_nvl_chunked_send_tokens=2, num_max_nvl_chunked_recv_tokens=4)

# name -> (tokens of each rank by rank % 4, routing skew (of make_topk_idx, or "first_half"), the kernel blocks to stall: "senders",
# "receivers", "both", "last_rank_receivers" (the last rank's only: the others' next rounds start while it
# still reads) or None). Blocks [0, C) of an exchange kernel send, [C, 2C) receive.
STREAM_CASES = {
    "one_chunk": ([1, 2, 1, 0], "uniform", None),
    "many_chunks_wrap_around": ([128, 96, 128, 80], "uniform", None),  # up to 16x a ring per stream
    "empty_rank": ([64, 0, 48, 0], "first_half", None),  # odd ranks send nothing, the upper half receives nothing
    "slow_receivers": ([64, 48, 64, 32], "zipf", "receivers"),
    "slow_senders": ([64, 48, 64, 32], "hot", "senders"),
    "random_stalls": ([96, 64, 96, 48], "masked", "both"),
    "one_slow_receiving_rank": ([64, 48, 64, 32], "uniform", "last_rank_receivers"),
}


def stall_blocks(which, channels: int, seconds: float, rank: int, R: int) -> None:
    """Random stalls (probability 0.3 at every synchronisation point) in the exchange kernels' sender or
    receiver blocks, or none (which=None)."""
    if which == "last_rank_receivers":
        which = "receivers" if rank == R - 1 else None
    blocks = {"senders": (0, channels), "receivers": (channels, 2 * channels), "both": (0, 2 * channels)}
    for kernel in ("ipc_dispatch_kernel", "ipc_combine_kernel"):
        if which is None:
            _C.cuda_cpu_stall(kernel, 0)
        else:
            _C.cuda_cpu_stall(kernel, seconds, 0.3, *blocks[which])


def job_streaming(rank, R, group, case):
    """Rows through rings of 4 slots per (source, channel) stream, 2 channels, chunks of 2 rows, in a
    Buffer of exactly those rings for the largest row: a normal dispatch, a cached dispatch, a combine
    with weights and bias, a num_worst_tokens dispatch and its combine, every output against
    eplib.reference; then the round counters and the rows every rank sent and received. Returns
    (errors, counters of every rank)."""
    tokens, skew, stalls = STREAM_CASES[case]
    T, H, K, E = tokens[rank % 4], 24, 3, 3 * R
    config = eplib.Config(**STREAM_CONFIG)
    stride = max(_C.dispatch_row_stride(4 * H, 0, K), _C.combine_row_stride(4 * H, K))
    nvl = _C.ipc_buffer_bytes(R, config.num_channels, stride, STREAM_CONFIG["num_max_nvl_chunked_recv_tokens"])
    buf, ref = ipc_buffer(group, nvl), ReferenceBuffer(group)
    if skew == "first_half":  # experts of the lower half of the ranks only
        idx = make_topk_idx(60, rank, T, K, E // 2, "uniform")
    else:
        idx = make_topk_idx(60, rank, T, K, E, skew)
    w = make_topk_weights(60, rank, T, K)
    x = make_random_rows(60, rank, T, H, "fp32")
    errs = []

    def check(name, got, want):
        for i, (g, v) in enumerate(zip(got, want)):
            if not same(g, v):
                errs.append(f"rank {rank} {case} {name}[{i}]: " + describe_diff(name, g, v))

    x2, bias = make_random_rows(61, rank, T, H, "fp32"), make_random_rows(63, rank, T, H, "fp32")
    W = max(tokens) * R
    stall_blocks(stalls, config.num_channels, 0.002, rank, R)
    try:
        with eplib_timeout(30):
            # The three calls of each pass run back to back, with no collective between them that would
            # let a slow rank catch up: the next exchange starts while peers may still receive the last.
            for kwargs in ({}, {"num_worst_tokens": W}):
                d = dispatch_with_layout(buf, x, idx, w, E, config=config, **kwargs)
                cached = buf.dispatch(x2, handle=d[4], config=config)[:1]
                y = make_random_rows(62, rank, d[0].shape[0], H, "fp32")
                combined = buf.combine(y, d[4], topk_weights=d[2], bias=bias, config=config)[:2]
                d_ref = dispatch_with_layout(ref, x, idx, w, E, **kwargs)
                check(f"dispatch {kwargs}", d[:4], d_ref[:4])
                check("cached dispatch", cached, ref.dispatch(x2, handle=d_ref[4])[:1])
                check("combine", combined, ref.combine(y, d_ref[4], topk_weights=d_ref[2], bias=bias)[:2])
    finally:
        stall_blocks(None, config.num_channels, 0, rank, R)
    return errs, counters_everywhere(buf, group)


@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_ipc_cuda_cpu_streams_through_small_rings(pool, case):
    """Calls many times larger than the rings (rows stream while they are written; senders wait for
    credits), with one chunk, empty ranks, and random stalls of the senders or receivers."""
    results = pool.run(job_streaming, case, timeout=300)
    counters = results[0][1]
    for rank, (errs, rank_counters) in enumerate(results):
        assert not errs, "\n".join(errs[:10])
        assert rank_counters == counters, f"rank {rank} sees other counters: {rank_counters} vs {counters}"
    # 6 exchanges (2 dispatches, 2 cached, 2 combines) and 2 counts exchanges on every rank; every row
    # sent was received.
    for rank, c in enumerate(counters):
        assert (c["round"], c["notify_round"], c["blocks_finished"], c["aborted"]) == (6, 2, 0, 0), (rank, c)
    assert sum(c["rows_sent"] for c in counters) == sum(c["rows_received"] for c in counters) > 0, counters


def job_ring_too_small(rank, R, group, slack):
    """For each of a dispatch (bf16 rows with top-k), a cached dispatch and a combine (fp32 rows, on the
    handle of a bf16 dispatch): a Buffer of exactly one chunk per (source, channel) ring for that call's
    rows, plus `slack` bytes (0 or -1). The call streams through it and equals eplib.reference (slack 0),
    or raises ValueError naming the bytes it needs, on every rank, before any kernel runs (slack -1); either
    way the Buffer's next dispatch (which fits) works. Returns ({call: outcome}, errors, {call: bytes needed})."""
    T, H, K, E = [9, 0, 14, 5][rank % 4], 48, 3, 3 * R
    config = eplib.Config(num_sms=2, num_max_nvl_chunked_send_tokens=3, num_max_nvl_chunked_recv_tokens=64)
    channels, chunk = config.num_channels, config.num_max_nvl_chunked_send_tokens
    idx, w = make_topk_idx(31, rank, T, K, E, "zipf"), make_topk_weights(31, rank, T, K)
    x = make_random_rows(31, rank, T, H, "bf16")
    x32 = make_random_rows(32, rank, T, H, "fp32")
    strides = {"dispatch": _C.dispatch_row_stride(2 * H, 0, K), "cached dispatch": _C.dispatch_row_stride(4 * H, 0, 0),
               "combine": _C.combine_row_stride(4 * H, K)}
    needed = {name: _C.ipc_buffer_bytes(R, channels, stride, chunk) for name, stride in strides.items()}
    assert needed["dispatch"] < min(needed["cached dispatch"], needed["combine"]) - 1  # their dispatch fits
    ref = ReferenceBuffer(group)
    d_ref = dispatch_with_layout(ref, x, idx, w, E)
    y = make_random_rows(33, rank, d_ref[0].shape[0], H, "fp32")
    calls = {"dispatch": (lambda b, d: dispatch_with_layout(b, x, idx, w, E, config=config)[:4], lambda: d_ref[:4]),
             "cached dispatch": (lambda b, d: b.dispatch(x32, handle=d[4], config=config)[:1],
                                 lambda: ref.dispatch(x32, handle=d_ref[4])[:1]),
             "combine": (lambda b, d: b.combine(y, d[4], topk_weights=d[2], config=config)[:2],
                         lambda: ref.combine(y, d_ref[4], topk_weights=d_ref[2])[:2])}
    outcomes, errs = {}, []
    for name, (call, want) in calls.items():
        buf = ipc_buffer(group, needed[name] + slack)
        d = dispatch_with_layout(buf, x, idx, w, E, config=config) if name != "dispatch" else None
        got = []
        outcomes[name] = outcome(lambda: got.append(call(buf, d)))
        if got and not all(same(g, v) for g, v in zip(got[0], want())):
            errs.append(f"rank {rank} {name}: results differ from the reference")
        if d is not None:  # a refused call leaves the Buffer in step: its next dispatch (which fits) works
            if not all(same(g, v) for g, v in zip(dispatch_with_layout(buf, x, idx, w, E, config=config)[:4],
                                                  d_ref[:4])):
                errs.append(f"rank {rank} dispatch after {name}: results differ from the reference")
    return outcomes, errs, needed


def test_ipc_cuda_cpu_buffer_of_one_chunk_per_ring(pool4):
    for slack in (0, -1):
        for rank, (outcomes, errs, needed) in enumerate(pool4.run(job_ring_too_small, slack, timeout=300)):
            assert not errs, errs
            for name, text in outcomes.items():
                if slack == 0:
                    assert text == "ok", f"slack 0, rank {rank}, {name}: {text}"
                    continue
                match = NEEDS.search(text)
                assert text.startswith("ValueError: ") and match, f"rank {rank} {name}: {text!r}"
                assert match.group(1) == name.split()[-1] and int(match.group(2)) == needed[name], (name, text)
                assert int(match.group(3)) == needed[name] - 1, text


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
    buf = ipc_buffer(group, eplib.Buffer.get_nvl_buffer_size_hint(W, 2 * H, R, num_topk=K))
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
    expected = dict(round=sends, notify_round=notifies, barrier_round=0, blocks_finished=0, aborted=0)
    counters = [{k: c[k] for k in expected} for c in counters_everywhere(buf, group)]
    return errors, num_errors, counters, expected


@pytest.mark.parametrize("world_size,num_rounds", [(2, 2 * NUM_ROUNDS), (4, NUM_ROUNDS)], ids=["R2", "R4"])
def test_ipc_cuda_cpu_many_rounds(pool_cache, world_size, num_rounds):
    results = pool_cache(world_size).run(job_many_rounds, num_rounds, timeout=300)
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
        memfds_before = open_memfds()
        buf = ipc_buffer(group, SMALL_CALLS_BYTES, explicitly_destroy=True)
        dispatch_with_layout(buf, x, idx, w, E)
        ipc = transport_of(buf).ipc_buffer
        buf.destroy()
        out["explicit: warnings"] = list(warnings)
        out["explicit: buffer"] = (ipc.is_open, ipc.timeout_report())
        out["explicit: call after"] = outcome(lambda: dispatch_with_layout(buf, x, idx, w, E))

        # Rank 0 destroys alone first.
        transports = [cuda_cpu_transport(group, "ipc", HEADER_BYTES + 4096) for _ in range(2)]
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
        buf = ipc_buffer(group, SMALL_CALLS_BYTES)
        dispatch_with_layout(buf, x, idx, w, E)
        alive = weakref.ref(transport_of(buf))
        dist.barrier(group)
        if rank == 0:
            gc.collect()  # earlier garbage first: a full collection of this process takes its own time
            t0 = time.monotonic()
            del buf
            gc.collect()
            with_buffer = time.monotonic() - t0
            t0 = time.monotonic()
            gc.collect()
            out["gc: freed"] = alive() is None
            out["gc: seconds beyond a plain collection"] = with_buffer - (time.monotonic() - t0)
        dist.barrier(group)
        if rank != 0:
            del buf
        gc.collect()
        out["allocations left"] = open_memfds() - memfds_before
    return out


def test_ipc_cuda_cpu_destroy(pool):
    results = pool.run(job_destroy, timeout=60)
    for rank, out in enumerate(results):
        assert out["explicit: warnings"] == [], out
        assert out["explicit: buffer"] == (False, (0, -1)), out
        assert re.match(r"RuntimeError: .*destroyed", out["explicit: call after"]), out
        if rank == 0:
            assert out["alone: clean"] is False and out["alone"][0] == "ok", out
            assert TIMEOUT_S <= out["alone"][1] < TIMEOUT_S + 3, out
            assert any("teardown barrier timed out" in m for m in out["alone: warnings"]), out
            assert out["gc: freed"] and out["gc: seconds beyond a plain collection"] < 0.5 * TIMEOUT_S, out
        else:
            assert out["late: clean"] is True, out
        assert out["together: clean"] is True, out
        assert out["allocations left"] == 0, out


# ------------------------------------------------------------------------------------ notify tables


def job_notify_tables(rank, R, group):
    """Two counts exchanges back to back with no row round between them (the first dispatch's records
    disagree, so every rank raises after its exchange), while the last rank lingers between its wait and
    the read of its table: the others write their next records meanwhile, which must not land in the
    table being read (ipc.h: tables double-buffered by the notify round's parity). Returns
    (outcome of the disagreeing dispatch, errors of the next one against eplib.reference)."""
    T, H, K, E = 12, 32, 2, 2 * R
    buf, ref = ipc_buffer(group, SMALL_CALLS_BYTES), ReferenceBuffer(group)
    idx, w = make_topk_idx(8, rank, T, K, E, "uniform"), make_topk_weights(8, rank, T, K)
    # Only rank 0's first record disagrees (top-k of K + 1): a rank that read rank 0's next record
    # instead would find the records alike and go ahead and send.
    K_first = K + 1 if rank == 0 else K
    idx_first, w_first = make_topk_idx(9, rank, T, K_first, E, "uniform"), make_topk_weights(9, rank, T, K_first)
    x = make_random_rows(10, rank, T, H, "fp32")
    # The last rank's notify kernel lingers at each barrier, its wait for the others' records included.
    if rank == R - 1:
        _C.cuda_cpu_stall("notify_kernel", 0.3)
    try:
        with eplib_timeout(5):
            first = outcome(lambda: dispatch_with_layout(buf, x, idx_first, w_first, E))
    finally:
        _C.cuda_cpu_stall("notify_kernel", 0)
    with eplib_timeout(5):
        got = dispatch_with_layout(buf, x, idx, w, E)
    want = dispatch_with_layout(ref, x, idx, w, E)
    errs = [describe_diff(f"[{i}]", g, v) for i, (g, v) in enumerate(zip(got[:4], want[:4])) if not same(g, v)]
    return first, errs


def test_ipc_cuda_cpu_notify_tables(pool):
    for rank, (first, errs) in enumerate(pool.run(job_notify_tables, timeout=60)):
        assert first.startswith("ValueError: ") and "top" in first, f"rank {rank}: {first}"
        assert not errs, f"rank {rank}: " + "\n".join(errs)


# ------------------------------------------------------------------------------------ ranks that disagree


def job_mismatch_ipc(rank, R, group, name):
    """test_peer_errors.job_mismatch (one rank's input differs from the others') on the ipc transport: every rank must raise after the counts exchange, before any row moves, and the Buffer
    must keep working."""
    from test_peer_errors import job_mismatch

    saved = eplib.Buffer
    eplib.Buffer = lambda group, **kwargs: ipc_buffer(group, SMALL_CALLS_BYTES)
    try:
        return job_mismatch(rank, R, group, name, timeout_s=10)
    finally:
        eplib.Buffer = saved


# Not "dtype_differs_same_width": its odd rank passes fp16, which CUDA transports refuse on that rank alone
# (TypeError before any exchange; the others raise PeerInputError: tests/test_peer_errors_cuda_cpu.py).
@pytest.mark.parametrize("name", ["nan_weight_on_last_rank", "top_k_differs", "hidden_differs", "num_experts_differs",
                                  "fp8_scales_dtype_differs"])
def test_ipc_cuda_cpu_mismatch(pool, name):
    from test_peer_errors import check_mismatch_results

    check_mismatch_results(pool.run(job_mismatch_ipc, name, timeout=60), name, max_seconds=5)


# ------------------------------------------------------------------------------------ after a timeout


def job_poisoned_after_timeout(rank, R, group):
    """Rank 1 stops calling after the first dispatch. Rank 0's next rounds go on without any host check
    in between, as the replay of a captured CUDA graph does (IpcBuffer.dispatch and .combine straight
    away): their receive waits time out, and every output of the timed-out rounds and of the later ones
    is poisoned (NaN rows, -1 ids and counts) instead of left at the last good values.
    Buffer.check_failed() reports it without a sync; the next call is refused. Returns rank 0's results."""
    from eplib.transports.cuda import CombineOutputs, UnpackOutputs
    from eplib.transports.kernels import combine_pack_args, dispatch_pack_args

    T, H, K, E = 16, 32, 2, 2 * R
    idx, w = make_topk_idx(6, rank, T, K, E, "uniform"), make_topk_weights(6, rank, T, K)
    x = make_random_rows(6, rank, T, H, "fp32")
    buf = ipc_buffer(group, SMALL_CALLS_BYTES)
    recv_x, _, recv_w, _, handle, _ = dispatch_with_layout(buf, x, idx, w, E, num_worst_tokens=R * T)
    if rank != 0:
        dist.barrier(group)
        return None
    transport = transport_of(buf)
    out = {"before": outcome(buf.check_failed)}
    with eplib_timeout(0.3):
        transport._check_usable()  # sets the device waits' limit, as every call does
        with transport.context.call(None, False) as call:
            cached = UnpackOutputs(call, handle.num_output_rows, x, None, 0, with_count=False)
            combined = CombineOutputs(call, handle, recv_x, K)
        dispatch_exchange, combine_exchange, _channel_counts = exchanges(transport, handle, x, K)
        for _ in range(2):  # a timed-out round, then one on the aborted buffer
            transport.ipc_buffer.dispatch(
                dispatch_pack_args(x, None, None, None, 0, handle.send_pos, None, transport.error_flag,
                                   slot_rows=handle.slot_rows),
                cached.args(None, handle.device_recv_counts, handle.slot_rows, x, None, 0, transport.error_flag),
                dispatch_exchange, transport.context.current_stream())
            transport.ipc_buffer.combine(
                combine_pack_args(recv_x, recv_w, handle.device_recv_counts, handle.slot_rows, None),
                combined.args(None, handle, None, None), combine_exchange, transport.context.current_stream())
        transport.context.synchronize()
        out["cached x all NaN"] = bool(torch.isnan(cached.recv_x).all())
        out["cached src_idx"] = sorted(set(cached.recv_src_idx.tolist()))
        out["combined x all NaN"] = bool(torch.isnan(combined.combined_x).all())
        out["combined weights all NaN"] = bool(torch.isnan(combined.combined_topk_weights).all())
        out["check_failed"] = outcome(buf.check_failed)
        out["next call"] = outcome(lambda: buf.dispatch(x, handle=handle))
    dist.barrier(group)
    return out


def test_ipc_cuda_cpu_outputs_poisoned_after_timeout(pool2):
    out = pool2.run(job_poisoned_after_timeout, timeout=60)[0]
    assert out["before"] == "ok", out
    assert out["cached x all NaN"] and out["cached src_idx"] == [-1], out
    assert out["combined x all NaN"] and out["combined weights all NaN"], out
    # Rank 1 never reaches the round: rank 0's senders (waiting for it to be ready) or receivers (waiting
    # for its rows) give up, whichever first.
    assert re.match(r"RuntimeError: .*dispatch \((send: waiting for a receiver to be ready or to free ring slots|"
                    r"receive: waiting for a sender's rows)\) timed out waiting for rank 1\b", out["check_failed"]), out
    assert REFUSED.match(out["next call"]), out


# ------------------------------------------------------------------------------------ graph-like replays


def job_replayed_rounds(rank, R, group, num_replays):
    """A num_worst_tokens dispatch, then num_replays rounds of (new x into the same input tensors, cached
    dispatch, combine) launched back to back with no host sync and no host check between them, on fixed
    input and output tensors (what replaying a captured CUDA graph does); each replay's outputs are
    copied aside on the stream. Every replay must equal eplib.reference. Returns errors."""
    from eplib.transports.cuda import CombineOutputs, UnpackOutputs
    from eplib.transports.kernels import combine_pack_args, dispatch_pack_args

    T, H, K, E = 12, 24, 2, 2 * R
    idx, w = make_topk_idx(40, rank, T, K, E, "zipf"), make_topk_weights(40, rank, T, K)
    x0 = make_random_rows(40, rank, T, H, "bf16")
    buf, ref = ipc_buffer(group, SMALL_CALLS_BYTES), ReferenceBuffer(group)
    d = dispatch_with_layout(buf, x0, idx, w, E, num_worst_tokens=R * T)
    d_ref = dispatch_with_layout(ref, x0, idx, w, E, num_worst_tokens=R * T)
    handle, recv_w = d[4], d[2]
    transport = transport_of(buf)
    context, stream = transport.context, transport.context.current_stream()
    x = x0.clone()
    y = torch.zeros(R * T, H, dtype=torch.bfloat16)
    with context.call(None, False) as call:
        cached = UnpackOutputs(call, handle.num_output_rows, x, None, 0, with_count=False)
        combined = CombineOutputs(call, handle, y, 0)
    inputs = [make_random_rows(41 + i, rank, T, H, "bf16") for i in range(num_replays)]
    kept = [(torch.empty_like(cached.recv_x), torch.empty_like(combined.combined_x)) for _ in range(num_replays)]
    flag = transport.error_flag
    dispatch_exchange, combine_exchange, _channel_counts = exchanges(transport, handle, x, 0)
    for i in range(num_replays):  # no host work between the replays: stream-ordered copies only
        _memcpy_async(x, inputs[i], stream)
        transport.ipc_buffer.dispatch(
            dispatch_pack_args(x, None, None, None, 0, handle.send_pos, None, flag, slot_rows=handle.slot_rows),
            cached.args(None, handle.device_recv_counts, handle.slot_rows, x, None, 0, flag), dispatch_exchange, stream)
        _memcpy_async(y, cached.recv_x, stream)  # the expert output is the dispatched rows themselves
        transport.ipc_buffer.combine(
            combine_pack_args(y, None, handle.device_recv_counts, handle.slot_rows, None),
            combined.args(None, handle, None, None), combine_exchange, stream)
        _memcpy_async(kept[i][0], cached.recv_x, stream)
        _memcpy_async(kept[i][1], combined.combined_x, stream)
    context.synchronize()
    errs = []
    for i in range(num_replays):
        want_x = ref.dispatch(inputs[i], handle=d_ref[4])[0]
        want_c = ref.combine(want_x, d_ref[4])[0]
        if not same(kept[i][0], want_x):
            errs.append(f"rank {rank} replay {i}: " + describe_diff("cached dispatch", kept[i][0], want_x))
        if not same(kept[i][1], want_c):
            errs.append(f"rank {rank} replay {i}: " + describe_diff("combine", kept[i][1], want_c))
    return errs, recv_w is not None and int(flag.item()) == 0


def exchanges(transport, handle, x, num_topk):
    """The ring arguments of a cached dispatch of x and of a combine of rows like x with num_topk weights,
    along handle's channels, with the Buffer's default configs (what Buffer.dispatch and .combine pass),
    and the int32 [R, C] tensor the dispatch writes its channel counts to (keep it until the stream is done)."""
    from eplib.transports.tensors import row_bytes

    R, channels = transport.num_ranks, handle.channel_counts.shape[1]
    new_counts = torch.empty(R, channels, dtype=torch.int32)
    return (transport._exchange_args(eplib.Buffer.get_dispatch_config(R), channels,
                                     _C.dispatch_row_stride(row_bytes(x), 0, 0), "dispatch", new_counts),
            transport._exchange_args(eplib.Buffer.get_combine_config(R), channels,
                                     _C.combine_row_stride(row_bytes(x), num_topk), "combine", handle.channel_counts),
            new_counts)


def _memcpy_async(dst: torch.Tensor, src: torch.Tensor, stream: int) -> None:
    """A stream-ordered copy on the CPU execution's device (what a captured copy node does)."""
    _C.cuda_cpu_memcpy_async(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(), stream)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ipc_cuda_cpu_replayed_rounds(pool_cache, world_size):
    for rank, (errs, clean) in enumerate(pool_cache(world_size).run(job_replayed_rounds, 6, timeout=120)):
        assert not errs, "\n".join(errs)
        assert clean, f"rank {rank}: the error flag was set"


# ------------------------------------------------------------------------------------ runtime state


def job_runtime_state(rank, R, group):
    """The last rank reaches its dispatch late, so the others' hosts wait for the counts exchange past
    the spin phase and query the notify kernel's event (cudaErrorNotReady); the launches after that
    query must not fail on the stale answer. No kernel is loaded lazily (the transports preload them)."""
    T, H, K, E = 8, 16, 2, 2 * R
    idx, w = make_topk_idx(50, rank, T, K, E, "uniform"), make_topk_weights(50, rank, T, K)
    x = make_random_rows(50, rank, T, H, "fp32")
    buf, ref = ipc_buffer(group, SMALL_CALLS_BYTES), ReferenceBuffer(group)
    if rank == R - 1:
        time.sleep(0.5)
    got = dispatch_with_layout(buf, x, idx, w, E)
    want = dispatch_with_layout(ref, x, idx, w, E)
    errs = [describe_diff(f"[{i}]", g, v) for i, (g, v) in enumerate(zip(got[:4], want[:4])) if not same(g, v)]
    statistics = _C.cuda_cpu_statistics()
    return errs, _C.cuda_cpu_peek_last_error(), statistics["lazy_load_waits"]


def test_ipc_cuda_cpu_not_ready_answers_and_preloaded_kernels(pool):
    for rank, (errs, last_error, lazy_load_waits) in enumerate(pool.run(job_runtime_state, timeout=60)):
        assert not errs, f"rank {rank}: " + "\n".join(errs)
        assert last_error == 0, f"rank {rank}: a stale error ({last_error}) is left for the next launch"
        assert lazy_load_waits == {}, f"rank {rank}: launches waited for lazy module loading: {lazy_load_waits}"
