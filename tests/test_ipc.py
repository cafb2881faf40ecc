"""The ipc transport (CUDA peer memory, ``transport="ipc"``): what the contract tests of
test_gpu_buffer.py (setups R1-ipc, R2-ipc, R4-ipc) do not cover.

GPU tests (marker ``gpu``; skipped without a usable GPU): R processes on cuda:0 over the pool's gloo
group, which carries only the handle exchange at construction:
- a peer that never arrives: timeouts name the phase and the peer, the device does not hang;
- a buffer too small for a call: ValueError with the bytes needed on every rank, the Buffer keeps working;
- 1000 back-to-back rounds of changing size and mode, integer-coded payloads checked every round,
  no memory growth;
- CUDA-graph capture and replay (R=1 and R=2);
- destroy() / garbage collection and new Buffers; transport="auto"; num_sms bounds.

CPU tests (no GPU needed): the peer-buffer size hints, construction errors where CUDA is unusable, and
transport="auto" with num_nvl_bytes > 0 running CPU tensors on the cpu transport.

Payloads encode (round, source rank, token) in small integers, exact in bf16, so that a misplaced or
stale row shows as a wrong value, and expectations come in closed form from all ranks' inputs
(dist_harness.expected_dispatch), never from the transport under test.
"""

import functools
import gc
import os
import re
import time

import pytest
import torch
import torch.distributed as dist

import eplib
from dist_harness import (RankPool, all_ranks_idx, base_case, captured_logs, describe_diff, expected_combined_weights,
                          expected_dispatch, expected_identity_combine, fill_case, job_closed_form, make_payload,
                          make_topk_idx, make_topk_weights, outcome, pad_rows, same, timed_outcome)
from gpu_harness import (DEVICE, IPC_NVL_BYTES, REFUSED, check_timeout_report, cuda_graph_check, dispatch_with_layout,
                         eplib_buffer, gpu_usable, group_for, job_gpu_compare, to_host)
from test_gpu_buffer import GPU_CASES

GPU_USABLE = gpu_usable()


def gpu_test(fn):
    """Marker gpu, and skipped without a usable GPU (torch sees one and eplib has its CUDA kernels)."""
    return pytest.mark.gpu(pytest.mark.skipif(not GPU_USABLE, reason="needs a CUDA GPU and eplib built with CUDA "
                                                                      "kernels")(fn))


# ------------------------------------------------------------------------------------ shared by the GPU jobs


def coded_rows(code: int, src: int, T: int, H: int) -> torch.Tensor:
    """bf16 [T, H] whose rows identify (code, source rank, token): column 0 = src, 1 = t, 2 = code % 61,
    the others ((3t + c + 5 src + code) % 17) - 8. Every value stays exact in bf16 after a sum of up to
    4 copies (|value| <= 64, 4 * 64 = 256), so identity combines compare bit for bit. Needs T <= 64."""
    assert T <= 64 and H >= 3
    t = torch.arange(T, dtype=torch.int64)[:, None]
    c = torch.arange(H, dtype=torch.int64)[None, :]
    x = ((3 * t + c + 5 * src + code) % 17 - 8).expand(T, H).clone()
    x[:, 0] = src
    x[:, 1] = t[:, 0]
    x[:, 2] = code % 61
    return x.to(torch.bfloat16).contiguous()


def exchange_and_check(buf, rank: int, R: int, E: int, xs, idxs, ws, *, num_worst: int = 0, cached=None):
    """One dispatch and one combine of the received rows sent straight back (identity experts) on a
    CUDA Buffer, checked against the closed form from all ranks' CPU inputs (xs, idxs, ws: lists by rank).

    Normal mode (num_worst == 0), num_worst_tokens mode, or cached mode: ``cached`` = (handle,
    num_worst of the dispatch that made it); then only x travels and topk_idx / topk_weights of the
    handle's dispatch are idxs / ws. Padding rows are set to garbage before the combine, which must
    ignore them. Returns (mismatch descriptions, (handle, num_worst)) for a later cached call.
    """
    errs = []

    def check(name, got, want):
        got = to_host(got)
        if not same(got, want):
            errs.append(describe_diff(name, got, want))

    exp_x, exp_idx, exp_w, exp_list, exp_rpm = expected_dispatch(rank, R, E, xs, idxs, ws)
    n = exp_idx.shape[0]
    x = xs[rank].to(DEVICE)
    if cached is None:
        recv_x, recv_idx, recv_w, num_list, handle, _ = dispatch_with_layout(
            buf, x, idxs[rank].to(DEVICE), ws[rank].to(DEVICE), E, num_worst_tokens=num_worst)
        rows = num_worst or n
        check("recv_topk_idx", recv_idx, pad_rows(exp_idx, rows, -1))
        check("recv_topk_weights", recv_w, pad_rows(exp_w, rows, 0))
        check("num_recv_tokens_per_expert_list", num_list, [] if num_worst else exp_list)
        check("handle[0] rank_prefix_matrix", handle[0], exp_rpm)
    else:
        handle, num_worst = cached
        recv_x, recv_idx, recv_w, num_list, new_handle, _ = buf.dispatch(x, handle=handle)
        rows = num_worst or n
        check("cached dispatch outputs [1:5]", [recv_idx, recv_w, num_list, new_handle], [None] * 4)
    check("recv_x", recv_x, pad_rows(exp_x, rows, 0))

    y = recv_x.clone()
    y[n:] = 77
    back_w = None
    if recv_w is not None:
        back_w = recv_w.clone()
        back_w[n:] = 1e4
    combined_x, combined_w, _ = buf.combine(y, handle, topk_weights=back_w)
    check("combined_x (identity experts)", combined_x, expected_identity_combine(xs[rank], idxs[rank], E, R))
    check("combined_topk_weights", combined_w,
          expected_combined_weights(idxs[rank], ws[rank], E, R) if back_w is not None else None)
    return errs, (handle, num_worst)


# ------------------------------------------------------------------------------------ peer never arrives

TIMEOUT_S = 2
# Buffers of job_peer_never_arrives: never freed (their peers may still map them); the pool is killed after.
_KEEP_ALIVE = []


def job_peer_never_arrives(rank, R, group):
    """Both ranks make two ipc Buffers; rank 1 then never calls them and waits in a gloo barrier while
    rank 0 dispatches: a normal dispatch on the first Buffer, a num_worst_tokens dispatch on the second.
    Returns rank 0's {step: (outcome, seconds)}.

    EPLIB_TIMEOUT_S is set after the construction (the handle exchange honours it too, and the ranks
    of a fresh pool may reach it seconds apart); the transport reads it at each call."""
    buffers = [eplib_buffer("ipc", group)[0] for _ in range(2)]
    _KEEP_ALIVE.extend(buffers)
    torch.cuda.synchronize()
    dist.barrier(group)
    os.environ["EPLIB_TIMEOUT_S"] = str(TIMEOUT_S)
    if rank != 0:
        dist.barrier(group)  # silent until rank 0 has seen its timeouts
        return None
    normal, worst = buffers
    T, H, E = 16, 64, 2 * R
    idx = all_ranks_idx(T, R, E // R).to(DEVICE)
    w = make_topk_weights(3, rank, T, R).to(DEVICE)
    x = coded_rows(0, rank, T, H).to(DEVICE)
    layouts = [b.get_dispatch_layout(idx, E) for b in buffers]
    torch.cuda.synchronize()

    def dispatch(b, lay, **kwargs):
        return b.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                          topk_idx=idx, topk_weights=w, **kwargs)

    out = {}
    out["normal dispatch"] = timed_outcome(lambda: dispatch(normal, layouts[0]))
    out["normal: next call"] = timed_outcome(lambda: dispatch(normal, layouts[0]))
    out["num_worst dispatch"] = timed_outcome(lambda: dispatch(worst, layouts[1], num_worst_tokens=T * R))
    out["synchronize"] = timed_outcome(torch.cuda.synchronize)
    out["num_worst: next call"] = timed_outcome(lambda: dispatch(worst, layouts[1]))
    out["num_worst: call after"] = timed_outcome(lambda: dispatch(worst, layouts[1]))
    dist.barrier(group)
    return out


@gpu_test
def test_ipc_peer_never_arrives():
    """EPLIB_TIMEOUT_S=2. Normal dispatch: RuntimeError naming the phase and rank 1 after about 2 s, and
    the Buffer refuses further calls. num_worst_tokens dispatch: returns without waiting, the device
    does not hang, the next call raises the timeout. A fresh pool: its ranks are killed after."""
    pool = RankPool(2)
    try:
        out = pool.run(job_peer_never_arrives, timeout=90)[0]
    finally:
        pool.kill()
    check_timeout_report("normal dispatch", out["normal dispatch"], re.compile(r"notify|dispatch", re.I),
                         min_s=0.75 * TIMEOUT_S, max_s=TIMEOUT_S + 8)
    assert REFUSED.match(out["normal: next call"][0]) and out["normal: next call"][1] < 1, out["normal: next call"]

    text, elapsed = out["num_worst dispatch"]
    assert text == "ok", f"num_worst_tokens dispatch: expected to return (no host wait), got {text!r}"
    assert elapsed < 0.75 * TIMEOUT_S, f"num_worst_tokens dispatch waited {elapsed:.2f} s on the host"
    text, elapsed = out["synchronize"]
    assert text == "ok" and elapsed < 3 * TIMEOUT_S + 8, f"torch.cuda.synchronize: {text!r} after {elapsed:.1f} s"
    check_timeout_report("call after the num_worst timeout", out["num_worst: next call"], re.compile(r"dispatch", re.I),
                         max_s=1)
    assert REFUSED.match(out["num_worst: call after"][0]) and out["num_worst: call after"][1] < 1, \
        out["num_worst: call after"]


# ------------------------------------------------------------------------------------ buffer too small

NEEDS = re.compile(r"num_nvl_bytes.*needs (\d+) bytes.*has (\d+).*get_nvl_buffer_size_hint", re.S)


def job_buffer_too_small(rank, R, group):
    """A Buffer of exactly Buffer.get_nvl_buffer_size_hint(T, H, R) bytes for FP8 rows of H = 4096 bytes:
    an FP8 dispatch of T tokens to every rank fits; fp32 and over-large num_worst_tokens calls do not
    (each needs at least `lower bound` bytes of rows alone); smaller calls still work after.
    Returns {"num_nvl_bytes", "lower bounds": {step: bytes}, "outcomes": {step: str}, "errors": [...]}."""
    T, H, El = 64, 4096, 2
    E = El * R
    nvl = eplib.Buffer.get_nvl_buffer_size_hint(T, H, R)
    buf, _ = eplib_buffer("ipc", group, num_nvl_bytes=nvl)
    idx = all_ranks_idx(T, R, El)
    idxs = [idx] * R
    ws = [make_topk_weights(20, s, T, R) for s in range(R)]
    x8s = [make_payload(20, s, T, H, "fp8") for s in range(R)]
    x8s_cached = [make_payload(21, s, T, H, "fp8") for s in range(R)]
    d_idx, d_w = idx.to(DEVICE), ws[rank].to(DEVICE)
    res = {"num_nvl_bytes": nvl, "outcomes": {}, "errors": []}

    def check(name, got, want):
        got = to_host(got)
        if not same(got, want):
            res["errors"].append(f"rank {rank} {name}: " + describe_diff(name, got, want))

    # Fits by the hint's definition (T tokens per rank of H bytes, every token to every rank).
    exp_x, exp_idx, exp_w, exp_list, exp_rpm = expected_dispatch(rank, R, E, x8s, idxs, ws)
    recv_x, recv_idx, recv_w, num_list, handle8, _ = dispatch_with_layout(
        buf, tuple(p.to(DEVICE) for p in x8s[rank]), d_idx, d_w, E)
    check("fp8 dispatch recv_x", recv_x, exp_x)
    check("fp8 dispatch recv_topk_idx", recv_idx, exp_idx)
    check("fp8 dispatch recv_topk_weights", recv_w, exp_w)
    check("fp8 dispatch list", num_list, exp_list)
    check("fp8 dispatch rank_prefix_matrix", handle8[0], exp_rpm)
    n = exp_idx.shape[0]  # = R * T

    # Too large. Normal mode: only the last rank receives (every token of every rank), but every rank
    # must raise (after the notify, all ranks know all counts).
    x32 = make_payload(22, rank, T, H, "fp32").to(DEVICE)
    to_last = ((R - 1) * El + torch.arange(T, dtype=torch.int64) % El)[:, None].contiguous()
    res["lower bounds"] = {"normal dispatch, all to the last rank": R * T * H * 4,
                           "num_worst_tokens dispatch": R * (R * T) * H * 2,
                           "cached dispatch of fp32 rows": R * T * H * 4,
                           "combine of fp32 rows": T * R * H * 4}
    res["outcomes"]["normal dispatch, all to the last rank"] = outcome(lambda: dispatch_with_layout(
        buf, x32, to_last.to(DEVICE), make_topk_weights(22, rank, T, 1).to(DEVICE), E))
    res["outcomes"]["num_worst_tokens dispatch"] = outcome(lambda: dispatch_with_layout(
        buf, x32.to(torch.bfloat16), d_idx, d_w, E, num_worst_tokens=R * T))
    res["outcomes"]["cached dispatch of fp32 rows"] = outcome(lambda: buf.dispatch(x32, handle=handle8))
    res["outcomes"]["combine of fp32 rows"] = outcome(lambda: buf.combine(
        torch.ones((n, H), dtype=torch.float32, device=DEVICE), handle8))

    # Smaller calls work after: a cached FP8 dispatch on the first handle, a bf16 round of 8 tokens.
    recv_cached = buf.dispatch(tuple(p.to(DEVICE) for p in x8s_cached[rank]), handle=handle8)[0]
    check("cached fp8 dispatch after", recv_cached, expected_dispatch(rank, R, E, x8s_cached, idxs, ws)[0])
    small = 8
    xs = [coded_rows(1, s, small, H) for s in range(R)]
    errs, _ = exchange_and_check(buf, rank, R, E, xs, [idx[:small].contiguous()] * R,
                                 [w[:small].contiguous() for w in ws])
    res["errors"] += [f"rank {rank} bf16 round after: {e}" for e in errs]
    torch.cuda.synchronize()
    return res


@gpu_test
def test_ipc_buffer_too_small(pool_cache):
    results = pool_cache(2).run(job_buffer_too_small, timeout=120)
    for rank, res in enumerate(results):
        assert not res["errors"], "\n".join(res["errors"])
        nvl = res["num_nvl_bytes"]
        for step, text in res["outcomes"].items():
            lower = res["lower bounds"][step]
            assert lower > nvl, (f"test sizes: {step} needs at least {lower} bytes, but the hint gave {nvl}; "
                                 f"make the case larger")
            assert text.startswith("ValueError: "), f"rank {rank} {step}: expected ValueError, got {text!r}"
            match = NEEDS.search(text)
            assert match, f"rank {rank} {step}: no 'num_nvl_bytes ... needs N bytes ... has M' in {text!r}"
            needed, have = int(match.group(1)), int(match.group(2))
            assert needed >= lower, f"rank {rank} {step}: says it needs {needed} bytes, rows alone take {lower}"
            assert needed > have and have <= nvl, f"rank {rank} {step}: needs {needed}, has {have}, num_nvl_bytes {nvl}"


# ------------------------------------------------------------------------------------ many rounds

NUM_ROUNDS = 1000
MEMORY_SLACK_BYTES = 64 << 10


def job_many_rounds(rank, R, group, num_rounds):
    """num_rounds back-to-back rounds on one ipc Buffer sized by Buffer.get_nvl_buffer_size_hint, mode
    cycling normal -> cached (the previous round's handle) -> num_worst_tokens, token counts changing
    every round (0 to 64, different per rank), routings cycling through the skews; every round checked
    by exchange_and_check. Returns (errors (first 20) and their count, [(round, memory_allocated)],
    seconds)."""
    T_MAX, H, K = 64, 128, 4
    E = 4 * R
    W = R * T_MAX  # the most rows a rank can receive
    # The num_worst_tokens slot layout holds R * W rows: the hint for W tokens per rank covers it.
    buf, _ = eplib_buffer("ipc", group, num_nvl_bytes=eplib.Buffer.get_nvl_buffer_size_hint(W, 2 * H, R, num_topk=K))
    skews = ("uniform", "masked", "zipf", "hot", "dup")
    errors, num_errors, samples = [], 0, []
    previous = state = None
    t0 = time.monotonic()
    for i in range(num_rounds):
        mode = ("normal", "cached", "num_worst")[i % 3]
        if mode == "cached":
            idxs, ws, state = previous
        else:
            Ts = [(7 * i + 13 * s + 5) % (T_MAX + 1) for s in range(R)]
            skew = skews[(i // 3) % len(skews)]
            idxs = [make_topk_idx(i, s, Ts[s], K, E, skew) for s in range(R)]
            ws = [make_topk_weights(i, s, Ts[s], K) for s in range(R)]
        xs = [coded_rows(i, s, idxs[s].shape[0], H) for s in range(R)]
        errs, state = exchange_and_check(buf, rank, R, E, xs, idxs, ws, num_worst=W if mode == "num_worst" else 0,
                                         cached=state if mode == "cached" else None)
        num_errors += len(errs)
        where = f"rank {rank} round {i} ({mode}, T={[x.shape[0] for x in xs]})"
        errors += [f"{where}: {e}" for e in errs][:20 - len(errors)]
        previous = (idxs, ws, state) if mode == "normal" else None
        if i % 30 == 29:  # after a num_worst_tokens round: no tensor of an earlier round is referenced
            state = errs = None
            torch.cuda.synchronize()
            samples.append((i, torch.cuda.memory_allocated(DEVICE)))
    torch.cuda.synchronize()
    return errors, num_errors, samples, time.monotonic() - t0


@gpu_test
def test_ipc_many_rounds(pool_cache):
    results = pool_cache(2).run(job_many_rounds, NUM_ROUNDS, timeout=300)
    for rank, (errors, num_errors, samples, seconds) in enumerate(results):
        assert num_errors == 0, (f"rank {rank}: {num_errors} mismatches in {NUM_ROUNDS} rounds, first:\n"
                                 + "\n".join(errors))
        # By round 300 every token count has come up several times: anything cached has reached its size.
        baseline = max(m for i, m in samples if i < 300)
        later = [(i, m) for i, m in samples if i >= 300]
        grown = [(i, m - baseline) for i, m in later if m > baseline + MEMORY_SLACK_BYTES]
        assert not grown, f"rank {rank}: torch.cuda.memory_allocated grew past round 300 by (round, bytes) {grown}"
        print(f"rank {rank}: {NUM_ROUNDS} rounds in {seconds:.1f} s")


# ------------------------------------------------------------------------------------ back to back, no sync


def job_padded_then_normal(rank, R, group):
    """A num_worst_tokens dispatch, then at once (no host sync) a normal round with other counts, while
    rank 1 arrives late: rank 0's host launches the normal dispatch while its padded counts exchange
    still waits for rank 1. The normal dispatch must size its outputs from its own counts, not from
    the padded exchange's (which used to reach the host late and pass for them). Returns mismatches."""
    buf, _ = eplib_buffer("ipc", group)
    H, El = 64, 2
    E, W = El * R, 64
    errs = []
    for it in range(6):
        sizes1 = [8 + it + 3 * s for s in range(R)]  # padded round
        sizes2 = [2 + 2 * it + s for s in range(R)]  # normal round: other counts
        xs1 = [coded_rows(2 * it, s, sizes1[s], H) for s in range(R)]
        idxs1 = [all_ranks_idx(sizes1[s], R, El) for s in range(R)]
        ws1 = [make_topk_weights(30 + it, s, sizes1[s], R) for s in range(R)]
        xs2 = [coded_rows(2 * it + 1, s, sizes2[s], H) for s in range(R)]
        idxs2 = [make_topk_idx(40 + it, s, sizes2[s], 2, E, "uniform") for s in range(R)]
        ws2 = [make_topk_weights(40 + it, s, sizes2[s], 2) for s in range(R)]
        torch.cuda.synchronize()
        dist.barrier(group)
        if rank == 1:
            time.sleep(0.05)
        padded = dispatch_with_layout(buf, xs1[rank].to(DEVICE), idxs1[rank].to(DEVICE), ws1[rank].to(DEVICE), E,
                                      num_worst_tokens=W)
        round_errs, _ = exchange_and_check(buf, rank, R, E, xs2, idxs2, ws2)
        errs += [f"iteration {it}, normal round: {e}" for e in round_errs]
        exp_x, exp_idx, exp_w, _, exp_rpm = expected_dispatch(rank, R, E, xs1, idxs1, ws1)
        for name, got, want in (("recv_x", padded[0], pad_rows(exp_x, W, 0)),
                                ("recv_topk_idx", padded[1], pad_rows(exp_idx, W, -1)),
                                ("recv_topk_weights", padded[2], pad_rows(exp_w, W, 0)),
                                ("rank_prefix_matrix", padded[4][0], exp_rpm)):
            got = to_host(got)
            if not same(got, want):
                errs.append(f"iteration {it}, padded dispatch: " + describe_diff(name, got, want))
    return errs


@gpu_test
def test_ipc_padded_then_normal_without_sync(pool_cache):
    results = pool_cache(2).run(job_padded_then_normal, timeout=120)
    assert not any(results), "\n".join(e for rank_errs in results for e in rank_errs)


# ------------------------------------------------------------------------------------ CUDA graph


def job_ipc_cuda_graph(rank, R, group):
    """gpu_harness.cuda_graph_check on an ipc Buffer, with an eager call between two replays (the round
    numbers on the device must stay in step across graph and eager calls)."""
    buf, _ = eplib_buffer("ipc", group)
    return cuda_graph_check(buf, rank, R, group, eager_between_replays=True)


@gpu_test
@pytest.mark.parametrize("world_size", [1, 2], ids=["R1", "R2"])
def test_ipc_cuda_graph(pool_cache, world_size):
    errs = pool_cache(world_size).run(job_ipc_cuda_graph, timeout=120)
    assert not any(errs), "\n".join(f"rank {r}: {e}" for r, rank_errs in enumerate(errs) for e in rank_errs)


# ------------------------------------------------------------------------------------ lifetime

LIFETIME_NVL_BYTES = 256 << 20  # large, so that a buffer left allocated shows in the device's free memory
LIFETIME_CYCLES = 4


def _round_trip(buf, rank, R, seed):
    T, H, K, E = 24, 64, 2, 2 * R
    idxs = [make_topk_idx(seed, s, T, K, E, "uniform") for s in range(R)]
    ws = [make_topk_weights(seed, s, T, K) for s in range(R)]
    xs = [coded_rows(seed, s, T, H) for s in range(R)]
    return exchange_and_check(buf, rank, R, E, xs, idxs, ws)[0]


def _free_device_bytes(group) -> int:
    """Free device memory once every rank has released what it frees (barrier first)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    dist.barrier(group)
    return torch.cuda.mem_get_info(DEVICE)[0]


def job_lifetime(rank, R, group):
    """Buffers made and released LIFETIME_CYCLES times: with explicitly_destroy=True and destroy(), then
    without it (released at garbage collection); each one carries a checked round first, a destroyed one
    refuses calls. Returns (errors, outcomes of calls after destroy(), free device bytes after each cycle)."""
    errors, after_destroy, free = [], [], []
    for cycle in range(LIFETIME_CYCLES):
        buf, _ = eplib_buffer("ipc", group, num_nvl_bytes=LIFETIME_NVL_BYTES, explicitly_destroy=True)
        errors += [f"rank {rank} destroy() cycle {cycle}: {e}" for e in _round_trip(buf, rank, R, 30 + cycle)]
        buf.destroy()
        probe = torch.zeros((1, 1), dtype=torch.int64, device=DEVICE)
        after_destroy.append(outcome(functools.partial(buf.get_dispatch_layout, probe, R)))
        del buf
        free.append(("destroy", _free_device_bytes(group)))
    for cycle in range(LIFETIME_CYCLES):
        buf, _ = eplib_buffer("ipc", group, num_nvl_bytes=LIFETIME_NVL_BYTES)
        errors += [f"rank {rank} gc cycle {cycle}: {e}" for e in _round_trip(buf, rank, R, 40 + cycle)]
        del buf
        gc.collect()
        free.append(("gc", _free_device_bytes(group)))
    return errors, after_destroy, free


@gpu_test
def test_ipc_destroy_and_new_buffers(pool_cache):
    R = 2
    for rank, (errors, after_destroy, free) in enumerate(pool_cache(R).run(job_lifetime, timeout=120)):
        assert not errors, "\n".join(errors)
        for text in after_destroy:
            assert text.startswith("RuntimeError: ") and "destroyed" in text, \
                f"rank {rank}: call after destroy(): {text}"
        # A Buffer left allocated on each rank would take R * 256 MiB per cycle.
        first = free[0][1]
        lost = [(how, (first - f) >> 20) for how, f in free[1:] if f < first - LIFETIME_NVL_BYTES // 2]
        assert not lost, f"rank {rank}: device memory not returned, (path, MiB lost since cycle 0): {lost}"


# ------------------------------------------------------------------------------------ transport="auto"


def job_auto(rank, R, group):
    """transport="auto" on one node: num_nvl_bytes > 0 -> "ipc", 0 -> "nccl" (R=1 over an NCCL group,
    R>1 over the pool's gloo group); both move CUDA rows right, no fallback warning; CPU tensors of the
    num_nvl_bytes > 0 Buffer go through the cpu transport (gloo group only). Returns (names, errors, warnings)."""
    with captured_logs() as messages:
        g = group_for("nccl" if R == 1 else "gloo", group)
        with_nvl = eplib.Buffer(g, num_nvl_bytes=IPC_NVL_BYTES)
        without = eplib.Buffer(g)
        names = {"num_nvl_bytes > 0": with_nvl.transport_name("cuda"),
                 "num_nvl_bytes > 0, default device_type": with_nvl.transport_name(),
                 "num_nvl_bytes = 0": without.transport_name("cuda")}
        errors = []
        for name, buf in (("num_nvl_bytes > 0", with_nvl), ("num_nvl_bytes = 0", without)):
            errors += [f"rank {rank} {name}: {e}" for e in _round_trip(buf, rank, R, 50)]
        if R > 1:
            names["num_nvl_bytes > 0, cpu"] = with_nvl.transport_name("cpu")
            case = fill_case(base_case(seed=51, dtype="bf16", skew="zipf", bias=1,
                                       buffer_kwargs={"num_nvl_bytes": IPC_NVL_BYTES}), R)
            errors += [f"cpu tensors: {e}" for e in job_closed_form(rank, R, group, "eplib", case)]
        torch.cuda.synchronize()
    return names, errors, [m for m in messages if "falling back" in m]


@gpu_test
@pytest.mark.parametrize("world_size", [1, 2], ids=["R1-nccl_group", "R2-gloo_group"])
def test_ipc_auto_selection(pool_cache, world_size):
    for rank, (names, errors, warnings) in enumerate(pool_cache(world_size).run(job_auto, timeout=120)):
        want = {"num_nvl_bytes > 0": "ipc", "num_nvl_bytes > 0, default device_type": "ipc",
                "num_nvl_bytes = 0": "nccl"}
        if world_size > 1:
            want["num_nvl_bytes > 0, cpu"] = "cpu"
        assert names == want, f"rank {rank}"
        assert not errors, "\n".join(errors)
        assert not warnings, f"rank {rank}: fell back on one node: {warnings}"


# ------------------------------------------------------------------------------------ num_sms


def job_few_sms(rank, R, group, case):
    """job_gpu_compare on the ipc backend with Buffer.set_num_sms(2): few blocks, many rows each."""
    old = eplib.Buffer.num_sms
    eplib.Buffer.set_num_sms(2)
    try:
        return job_gpu_compare(rank, R, group, "ipc", case, "ref")
    finally:
        eplib.Buffer.num_sms = old


@gpu_test
@pytest.mark.parametrize("name", ["bf16-many_tokens", "fp8-x_only-num_worst"])
def test_ipc_few_sms(pool_cache, name):
    pool = pool_cache(2)
    errs = pool.run(job_few_sms, fill_case(base_case(**GPU_CASES[name]), pool.world_size), timeout=120)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


# ------------------------------------------------------------------------------------ CPU: size hints

HINT_TOKENS = (1, 7, 128, 4096, 8192)
HINT_HIDDEN_BYTES = (2, 256, 7168, 14336)
HINT_RANKS = (1, 2, 4, 8)
HINT_TOPK = (1, 8, 32)


def ring_rows_of(hint: int, R: int, config, row_bytes: int) -> float:
    """Slots per (source, channel) ring that `hint` bytes give rows of row_bytes (slot header included)."""
    header, slot = eplib._C.ipc_header_bytes(), eplib._C.ipc_buffer_bytes(1, 1, row_bytes, 1) - eplib._C.ipc_header_bytes()
    return (hint - header) / (R * config.num_channels * slot)


def test_nvl_size_hint_fits_default_calls_and_monotone():
    """An int; a Buffer of that size takes the default configs' dispatch (FP8 rows with scales and K
    weights) and combine (rows of hidden_bytes, K weights): at least one chunk per ring, and rings of a
    channel's share of T (at most DeepEP's ring size), so that such calls never wait for ring space;
    non-decreasing in T, hidden_bytes and num_topk (not in num_ranks: DeepEP's configs for 2 ranks have
    larger chunks than for 4), and growing with each at a realistic size."""
    hint, _C = eplib.Buffer.get_nvl_buffer_size_hint, eplib._C
    values = {}
    for T in HINT_TOKENS:
        for hb in HINT_HIDDEN_BYTES:
            for R in HINT_RANKS:
                for K in HINT_TOPK:
                    v = hint(T, hb, R, num_topk=K)
                    assert isinstance(v, int) and not isinstance(v, bool), (T, hb, R, K, v)
                    calls = ((eplib.Buffer.get_dispatch_config(R), _C.dispatch_row_stride(hb, (hb + 127) // 128 * 4, K)),
                             (eplib.Buffer.get_combine_config(R), _C.combine_row_stride(hb, K)))
                    for config, stride in calls:
                        assert v >= _C.ipc_buffer_bytes(R, config.num_channels, stride,
                                                        config.num_max_nvl_chunked_send_tokens), (T, hb, R, K, config)
                        share = min(-(-T // config.num_channels), config.num_max_nvl_chunked_recv_tokens)
                        assert ring_rows_of(v, R, config, stride) >= share, (T, hb, R, K, config)
                    values[T, hb, R, K] = v
    axes = (HINT_TOKENS, HINT_HIDDEN_BYTES, HINT_RANKS, HINT_TOPK)
    for key, v in values.items():
        for axis, points in enumerate(axes):
            i = points.index(key[axis])
            if axis != 2 and i + 1 < len(points):
                bigger = key[:axis] + (points[i + 1],) + key[axis + 1:]
                assert values[bigger] >= v, f"hint{bigger} = {values[bigger]} < hint{key} = {v}"
    assert hint(4096, 14336, 8) == hint(4096, 14336, 8, num_topk=32)  # num_topk defaults to 32
    assert hint(1024, 14336, 8) > hint(128, 14336, 8)
    assert hint(4096, 14336 * 2, 8) > hint(4096, 14336, 8)
    assert hint(4096, 14336, 8) > hint(4096, 14336, 4)
    assert hint(4096, 14336, 8, num_topk=32) > hint(4096, 14336, 8, num_topk=1)


def test_config_nvl_size_hint_is_its_rings():
    """Config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks) is the header and, per (source rank,
    channel), a ring of num_max_nvl_chunked_recv_tokens slots of the widest row (FP8 dispatch row with
    32 weights, or combine row); num_max_tokens caps each ring at a channel's share (one chunk at least)."""
    _C = eplib._C
    configs = (eplib.Config(), eplib.Config(24, 6, 256, 6, 128), eplib.Config(2, 1, 8, 1, 8),
               eplib.Buffer.get_dispatch_config(8), eplib.Buffer.get_combine_config(2))
    for cfg in configs:
        for hb in (256, 7168, 14336):
            stride = max(_C.dispatch_row_stride(hb, (hb + 127) // 128 * 4, 32), _C.combine_row_stride(hb, 32))
            for R in (1, 2, 8):
                for tokens, ring in ((None, cfg.num_max_nvl_chunked_recv_tokens),
                                     (100, max(cfg.num_max_nvl_chunked_send_tokens,
                                               min(cfg.num_max_nvl_chunked_recv_tokens, -(-100 // cfg.num_channels))))):
                    got = cfg.get_nvl_buffer_size_hint(hb, R, num_max_tokens=tokens)
                    assert ring_rows_of(got, R, cfg, stride) == ring, (cfg, hb, R, tokens, got)


GOOD_HINT_ARGS = dict(num_max_tokens=128, hidden_bytes=7168, num_ranks=4, num_topk=8)


@pytest.mark.parametrize("argument,value", [("num_max_tokens", -1), ("hidden_bytes", 0), ("hidden_bytes", -2),
                                            ("num_ranks", 0), ("num_topk", -1)])
def test_buffer_nvl_size_hint_bad_argument(argument, value):
    with pytest.raises(ValueError, match=argument):
        eplib.Buffer.get_nvl_buffer_size_hint(**{**GOOD_HINT_ARGS, argument: value})


@pytest.mark.parametrize("argument,value", [("num_max_tokens", -1), ("hidden_bytes", 0), ("num_ranks", 0)])
def test_config_nvl_size_hint_bad_argument(argument, value):
    kwargs = {"hidden_bytes": 7168, "num_ranks": 4, "num_max_tokens": 128, argument: value}
    with pytest.raises(ValueError, match=argument):
        eplib.Config().get_nvl_buffer_size_hint(**kwargs)


# ------------------------------------------------------------------------------------ CPU: construction


def job_construct_on_rank0(rank, R, group):
    """Only rank 0 makes ipc Buffers; a collective would wait for rank 1 (gloo times out after 30 s).
    Returns rank 0's {case: (outcome, seconds)}."""
    if rank != 0:
        return None
    return {"num_nvl_bytes > 0": timed_outcome(lambda: eplib.Buffer(group, num_nvl_bytes=IPC_NVL_BYTES,
                                                                    transport="ipc")),
            "num_nvl_bytes = 0": timed_outcome(lambda: eplib.Buffer(group, transport="ipc"))}


@pytest.mark.skipif(GPU_USABLE, reason="checks what a machine without a usable GPU answers")
def test_ipc_construction_without_cuda_raises_before_any_collective(pool2):
    out = pool2.run(job_construct_on_rank0, timeout=60)[0]
    if not all(text.startswith("ValueError: ") and seconds < 5 for text, seconds in out.values()):
        pool2.restart()  # rank 0 may have left a collective half done
    text, seconds = out["num_nvl_bytes > 0"]
    assert re.match(r"ValueError: .*cuda", text, re.I | re.S), text
    assert seconds < 5, f"took {seconds:.1f} s: waited for the other rank?"
    text, seconds = out["num_nvl_bytes = 0"]
    assert re.match(r"ValueError: .*(cuda|num_nvl_bytes)", text, re.I | re.S), text
    assert seconds < 5, f"took {seconds:.1f} s: waited for the other rank?"


def job_auto_cpu_tensors(rank, R, group):
    """transport="auto" with num_nvl_bytes > 0, CPU tensors: the cpu transport, closed-form checked."""
    buf = eplib.Buffer(group, num_nvl_bytes=IPC_NVL_BYTES)
    name = buf.transport_name("cpu")
    errors = []
    for case in (base_case(seed=60, dtype="bf16", skew="zipf", bias=1),
                 base_case(seed=61, dtype="fp32", skew="masked", num_worst=64, bias=2)):
        case["buffer_kwargs"] = {"num_nvl_bytes": IPC_NVL_BYTES}
        errors += job_closed_form(rank, R, group, "eplib", fill_case(case, R))
    return name, errors


def test_auto_with_num_nvl_bytes_runs_cpu_tensors_on_cpu_transport(pool):
    for rank, (name, errors) in enumerate(pool.run(job_auto_cpu_tensors, timeout=60)):
        assert name == "cpu", f"rank {rank}: transport_name('cpu') = {name!r}"
        assert not errors, "\n".join(errors)
