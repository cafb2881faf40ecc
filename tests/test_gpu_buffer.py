"""eplib.Buffer on CUDA tensors (the nccl and ipc transports), against CPU implementations on the
same inputs.

Runs where torch sees a GPU and eplib was built with its CUDA kernels; skipped elsewhere. Every
multi-rank case runs R processes sharing cuda:0:
- nccl transport, R=1 over a real NCCL group;
- nccl transport, R=2 and R=4 over the pool's gloo group, which makes the transport stage its
  collectives through host memory (NCCL before 2.30 refuses two ranks on one GPU). The kernels and
  the transport's multi-rank logic are the production ones; only the byte movement differs.
- ipc transport (CUDA peer memory), R=1, 2 and 4: the processes map each other's buffers on the one
  GPU; the gloo group only carries the handle exchange at construction.
Stream semantics and CUDA-graph capture of the nccl transport need the real NCCL path (the staged
path synchronizes the host at every collective and cannot be captured), so they run with R=1; the
ipc transport's stream semantics run here with R=1, its other checks (timeouts, sizes, many rounds,
CUDA graphs with R=1 and 2) in test_ipc.py.
"""

import re

import pytest
import torch

from dist_harness import base_case, fill_case, make_random_rows, same
from gpu_harness import (DEVICE, IPC_NVL_BYTES, attempt, cuda_graph_check, dispatch_with_layout, eplib_buffer,
                         gpu_usable, group_for, job_gpu_compare, make_inputs)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not gpu_usable(), reason="needs a CUDA GPU and eplib built "
                                                                            "with CUDA kernels")]

# (backend, world size): nccl transport R=1 over NCCL, R=2 and R=4 staged through gloo on one GPU;
# ipc transport (peer memory) R=1, 2 and 4 on one GPU.
SETUPS = {"R1-nccl": ("nccl", 1), "R2-gloo": ("gloo", 2), "R4-gloo": ("gloo", 4),
          "R1-ipc": ("ipc", 1), "R2-ipc": ("ipc", 2), "R4-ipc": ("ipc", 4)}

# Buffer vs reference on random (non-integer) data: CUDA dtypes (fp32, bf16, FP8 tuple), every option.
GPU_CASES = {
    "fp32-uniform": dict(dtype="fp32", skew="uniform", H=32, K=3, E_per_rank=3),
    "bf16-zipf": dict(dtype="bf16", skew="zipf", H=32, K=3, E_per_rank=3),
    "fp8-masked": dict(dtype="fp8", skew="masked", H=256, K=3, E_per_rank=3),
    "fp32-dup-bias_single": dict(dtype="fp32", skew="dup", K=4, bias=1),
    "bf16-hot-bias_tuple-num_worst": dict(dtype="bf16", skew="hot", bias=2, num_worst=64),
    "fp32-masked-num_worst-bias": dict(dtype="fp32", skew="masked", bias=1, num_worst=48),
    "fp32-empty_ranks-align8": dict(Ts=[0, 21, 5], alignment=8),
    "bf16-x_only": dict(dtype="bf16", with_topk=False),
    "fp8-x_only-num_worst": dict(dtype="fp8", H=128, with_topk=False, num_worst=80),
    # DeepEP's other scale forms: int32 (UE8M0) scales, column-major, read through their strides.
    "fp8-int32_column_major_scales": dict(dtype="fp8", skew="zipf", H=1024, K=3, E_per_rank=3,
                                          scales="int32_column_major"),
    "fp32-E_equals_R-K1": dict(E_per_rank=1, K=1),
    # Row sizes that are not a multiple of 16 bytes take the kernels' scalar tails.
    "fp32-H20": dict(dtype="fp32", H=20, K=2),
    "bf16-H7": dict(dtype="bf16", H=7, K=2, skew="masked"),
    "bf16-many_tokens": dict(dtype="bf16", Ts=[150, 90], H=512, K=4, E_per_rank=4, skew="zipf", bias=2),
}


@pytest.fixture(params=list(SETUPS), ids=list(SETUPS))
def setup(request, pool_cache):
    backend, world_size = SETUPS[request.param]
    return backend, pool_cache(world_size)


def cpu_implementations(name: str) -> tuple:
    """The CPU implementations whose outputs GPU_CASES[name] must give bit for bit: eplib.reference
    always; for fp32 also the cpu transport (same row order, same fp32 sums)."""
    return ("ref", "eplib") if GPU_CASES[name].get("dtype", "fp32") == "fp32" else ("ref",)


#: (case name, CPU implementations) of the compare tests, ids "<case>-vs-ref" or "<case>-vs-ref+eplib".
COMPARE_PARAMS = [pytest.param(name, against, id=f"{name}-vs-{'+'.join(against)}")
                  for name, against in ((name, cpu_implementations(name)) for name in GPU_CASES)]


@pytest.mark.parametrize("name,against", COMPARE_PARAMS)
def test_gpu_buffer_equals_cpu_implementations(setup, name, against):
    """One run of the compare sequence on the CUDA transport, every output torch.equal to eplib.reference's
    and, for fp32, to the cpu transport's."""
    backend, pool = setup
    case = fill_case(base_case(**GPU_CASES[name]), pool.world_size)
    errs = pool.run(job_gpu_compare, backend, case, against, timeout=120)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


# ------------------------------------------------------------------------------------ streams


# About 0.2-0.5 s of GPU time at 1-2 GHz: long enough that the host sees the work still pending.
SLEEP_CYCLES = 400_000_000


def job_streams(rank, R, group, backend="nccl"):
    """DeepEP's stream protocol, observed from the outside (R=1, `backend` "nccl" or "ipc"). Returns
    {check: bool}.

    The dispatches here use num_worst_tokens (no host sync), so that the host can watch work that
    is still pending on the GPU."""
    import eplib

    buf, _ = eplib_buffer(backend, group)
    comm = buf.get_comm_stream()
    current = torch.cuda.current_stream()
    T, H, K, E = 64, 128, 2, 4
    x1, idx, w = make_inputs(rank, 1, T, H, K, E)
    x2 = make_random_rows(2, rank, T, H, "bf16").to(DEVICE)
    x3 = make_random_rows(3, rank, T, H, "bf16").to(DEVICE)
    lay = buf.get_dispatch_layout(idx, E)

    def run(x, **kwargs):
        return buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                            topk_idx=idx, topk_weights=w, num_worst_tokens=T * R, **kwargs)

    want = {name: run(x)[0].clone() for name, x in (("x1", x1), ("x2", x2), ("x3", x3))}
    out = {"comm stream is its own": isinstance(comm, torch.cuda.Stream) and comm != current}

    # The comm stream waits for the current stream: x is written there after a long sleep.
    x = torch.empty_like(x1)
    torch.cuda._sleep(SLEEP_CYCLES)
    x.copy_(x2)
    out["waits for the current stream"] = same(run(x)[0], want["x2"])

    # previous_event: x is written on a side stream that the current stream never waits for.
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        x.copy_(x3)
        written = eplib.Buffer.capture()
    result = run(x, previous_event=written, async_finish=True, allocate_on_comm_stream=True)
    result[5].current_stream_wait()
    out["waits for previous_event"] = same(result[0], want["x3"])

    # async_finish: the call returns while the comm stream is still busy and the current stream is
    # free until current_stream_wait(). Sync mode: the current stream waits at once.
    torch.cuda.synchronize()
    with torch.cuda.stream(comm):
        torch.cuda._sleep(SLEEP_CYCLES)
    result = run(x1, async_finish=True)
    event = result[5]
    out["async: event pending"] = event.event is not None and not event.event.query()
    out["async: current stream not held"] = current.query()
    event.current_stream_wait()
    out["async: current stream waits after current_stream_wait"] = not current.query()
    out["async: result"] = same(result[0], want["x1"])
    torch.cuda.synchronize()
    with torch.cuda.stream(comm):
        torch.cuda._sleep(SLEEP_CYCLES)
    result = run(x1)
    out["sync: no event"] = result[5].event is None
    out["sync: current stream waits"] = not current.query()
    out["sync: result"] = same(result[0], want["x1"])

    # The context manager waits on exit; cached dispatch, combine and layout follow the same protocol.
    torch.cuda.synchronize()
    handle = result[4]
    with torch.cuda.stream(comm):
        torch.cuda._sleep(SLEEP_CYCLES)
    cached = buf.dispatch(x2, handle=handle, previous_event=eplib.Buffer.capture(), async_finish=True)
    with cached[5] as entered:
        out["context manager returns the event"] = entered is cached[5]
    out["context manager waits on exit"] = not current.query()
    out["cached async"] = same(cached[0], want["x2"])
    sync_combined = buf.combine(result[0], handle, topk_weights=result[2])
    async_combined = buf.combine(result[0], handle, topk_weights=result[2], previous_event=eplib.Buffer.capture(),
                                 async_finish=True, allocate_on_comm_stream=True)
    async_combined[2].current_stream_wait()
    out["combine async"] = same(async_combined[:2], sync_combined[:2])
    layout_async = buf.get_dispatch_layout(idx, E, async_finish=True)
    layout_async[4].current_stream_wait()
    out["layout async"] = same(layout_async[:4], lay[:4])

    try:
        buf.dispatch(x1, handle=handle, allocate_on_comm_stream=True)
        out["allocate_on_comm_stream needs previous_event and async_finish"] = False
    except ValueError as error:
        out["allocate_on_comm_stream needs previous_event and async_finish"] = "allocate_on_comm_stream" in str(error)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("backend", ["nccl", "ipc"])
def test_gpu_stream_semantics(pool_cache, backend):
    out = pool_cache(1).run(job_streams, backend, timeout=120)[0]
    assert all(out.values()), {k: v for k, v in out.items() if not v}


# ------------------------------------------------------------------------------------ device error flag


def job_error_flag(rank, R, group, backend):
    """Bad values found by the kernels: raised at the next normal-mode dispatch on the rank that had
    them (ValueError), RuntimeError on the others; the flag is cleared after. Returns {step: outcome}."""
    buf, device = eplib_buffer(backend, group)
    T, H, K, E = 16, 32, 2, 2 * R
    x, idx, w = make_inputs(rank, 4, T, H, K, E, dtype="fp32", device=device)
    bad_idx = idx.clone()
    if rank == R - 1:
        bad_idx[3, 1] = E  # one id out of range on the last rank only
    results = {}
    attempt(results, "layout of a bad id", lambda: buf.get_dispatch_layout(bad_idx, E))
    attempt(results, "normal dispatch of a bad id", lambda: dispatch_with_layout(buf, x, bad_idx, w, E))
    attempt(results, "normal dispatch after", lambda: dispatch_with_layout(buf, x, idx, w, E))
    attempt(results, "num_worst dispatch of a bad id",
            lambda: dispatch_with_layout(buf, x, bad_idx, w, E, num_worst_tokens=T * R))
    attempt(results, "next normal dispatch", lambda: dispatch_with_layout(buf, x, idx, w, E))
    attempt(results, "clean again", lambda: dispatch_with_layout(buf, x, idx, w, E))
    # Every rank sends more than one token to every rank: all overflow num_worst_tokens=1.
    attempt(results, "num_worst_tokens too small",
            lambda: dispatch_with_layout(buf, x, idx, w, E, num_worst_tokens=1))
    attempt(results, "after overflow", lambda: dispatch_with_layout(buf, x, idx, w, E))
    bad_w = w.clone()
    if rank == 0:
        bad_w[0, 0] = float("nan")
    attempt(results, "nan weight", lambda: dispatch_with_layout(buf, x, idx, bad_w, E))
    lay = buf.get_dispatch_layout(idx, E)
    attempt(results, "num_tokens_per_rank off by one", lambda: buf.dispatch(
        x, num_tokens_per_rank=lay[0] + 1, is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
        topk_weights=w))
    attempt(results, "final", lambda: dispatch_with_layout(buf, x, idx, w, E))
    return results


@pytest.mark.parametrize("setup_name", ["R1-nccl", "R2-gloo", "R2-ipc"])
def test_gpu_error_flag(pool_cache, setup_name):
    check_error_flag(pool_cache, *SETUPS[setup_name])


def check_error_flag(pool_cache, backend: str, world_size: int) -> None:
    """Runs job_error_flag and checks each rank's outcome of each step."""
    results = pool_cache(world_size).run(job_error_flag, backend, timeout=120)
    last = world_size - 1
    for rank, res in enumerate(results):
        bad_id = (r"ValueError: topk_idx: an expert id outside" if rank == last
                  else rf"RuntimeError: .*rank\(s\) \[{last}\]")
        expected = {
            "layout of a bad id": "^ok$",
            "normal dispatch of a bad id": bad_id,
            "normal dispatch after": "^ok$",
            "num_worst dispatch of a bad id": "^ok$",  # no host sync: reported at the next one
            "next normal dispatch": bad_id,
            "clean again": "^ok$",
            "num_worst_tokens too small": "^ok$",
            "after overflow": r"ValueError: num_worst_tokens",
            "nan weight": r"ValueError: topk_weights" if rank == 0 else r"RuntimeError: .*rank\(s\) \[0\]",
            "num_tokens_per_rank off by one": r"ValueError: num_tokens_per_rank",
            "final": "^ok$",
        }
        for step, pattern in expected.items():
            assert re.search(pattern, res[step]), f"rank {rank} {step}: {res[step]!r} does not match {pattern!r}"


# ------------------------------------------------------------------------------------ CUDA graph


def job_cuda_graph(rank, R, group):
    """CUDA-graph capture and replay of layout + num_worst_tokens dispatch + cached dispatch + combine
    on the nccl transport (R=1, NCCL), compared with the reference (gpu_harness.cuda_graph_check).

    Only the NCCL path is capturable: the gloo staging path copies through host memory. The ipc
    transport's graph test (R=1 and R=2) is in test_ipc.py."""
    import eplib

    return cuda_graph_check(eplib.Buffer(group_for("nccl", group)), rank, R, group)


def test_gpu_cuda_graph_num_worst_tokens(pool_cache):
    errs = pool_cache(1).run(job_cuda_graph, timeout=120)[0]
    assert not errs, "\n".join(errs)


# ------------------------------------------------------------------------------------ argument checks


def job_device_checks(rank, R, group):
    """Arguments on the wrong device or of a dtype the CUDA kernels lack raise before any kernel."""
    import eplib

    nccl = group_for("nccl", group)
    buf = eplib.Buffer(nccl)
    T, H, K, E = 8, 32, 2, 2
    x, idx, w = make_inputs(rank, 5, T, H, K, E)
    lay = buf.get_dispatch_layout(idx, E)
    kwargs = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2], topk_idx=idx,
                  topk_weights=w)
    recv = buf.dispatch(x, **kwargs)
    cpu_handle = eplib.Buffer(group).dispatch(x.cpu(), **{k: v.cpu() for k, v in kwargs.items()})[4]
    results = {}
    attempt(results, "topk_idx on cpu", lambda: buf.dispatch(x, **{**kwargs, "topk_idx": idx.cpu()}))
    attempt(results, "num_tokens_per_rank on cpu",
            lambda: buf.dispatch(x, **{**kwargs, "num_tokens_per_rank": lay[0].cpu()}))
    attempt(results, "fp16 x", lambda: buf.dispatch(x.half(), **kwargs))
    attempt(results, "bias on cpu", lambda: buf.combine(recv[0], recv[4], bias=torch.zeros(T, H, dtype=x.dtype)))
    attempt(results, "cpu handle", lambda: buf.combine(recv[0], cpu_handle))
    attempt(results, "previous_event type", lambda: buf.get_dispatch_layout(idx, E, previous_event=object()))
    attempt(results, "transport cpu with cuda", lambda: eplib.Buffer(group, transport="cpu").get_dispatch_layout(
        idx, E))
    attempt(results, "transport nccl with cpu", lambda: eplib.Buffer(nccl, transport="nccl").get_dispatch_layout(
        idx.cpu(), E))
    # The ipc transport needs a peer buffer: num_nvl_bytes=0 (the default) is refused at construction.
    attempt(results, "transport ipc without num_nvl_bytes", lambda: eplib.Buffer(nccl, transport="ipc"))
    # With one, the handle exchange also runs over an NCCL group.
    attempt(results, "transport ipc over an nccl group works", lambda: eplib.Buffer(
        nccl, num_nvl_bytes=IPC_NVL_BYTES, transport="ipc").get_dispatch_layout(idx, E))
    attempt(results, "transport ipc with cpu", lambda: eplib.Buffer(
        nccl, num_nvl_bytes=IPC_NVL_BYTES, transport="ipc").get_dispatch_layout(idx.cpu(), E))
    attempt(results, "explicit nccl works", lambda: eplib.Buffer(nccl, transport="nccl").get_dispatch_layout(idx, E))
    torch.cuda.synchronize()
    return results


def test_gpu_device_checks(pool_cache):
    res = pool_cache(1).run(job_device_checks, timeout=120)[0]
    expected = {
        "topk_idx on cpu": r"ValueError: topk_idx: expected a tensor on cuda",
        "num_tokens_per_rank on cpu": r"ValueError: num_tokens_per_rank: expected a tensor on cuda",
        "fp16 x": r"TypeError: x: expected torch.float32 or torch.bfloat16",
        "bias on cpu": r"ValueError: bias\[0\]: expected a tensor on cuda",
        "cpu handle": r"ValueError: handle",
        "previous_event type": r"TypeError: previous_event",
        "transport cpu with cuda": r"ValueError: topk_idx: .*transport='cpu'",
        "transport nccl with cpu": r"ValueError: topk_idx: .*transport='nccl'",
        "transport ipc without num_nvl_bytes": r"^ValueError: .*num_nvl_bytes",
        "transport ipc over an nccl group works": r"^ok$",
        "transport ipc with cpu": r"ValueError: topk_idx: .*transport='ipc'",
        "explicit nccl works": r"^ok$",
    }
    for step, pattern in expected.items():
        assert re.search(pattern, res[step]), f"{step}: {res[step]!r} does not match {pattern!r}"


# ------------------------------------------------------------------------------------ EventOverlap on CUDA


def test_gpu_event_overlap_waits():
    """EventOverlap.current_stream_wait and the context manager make the current stream wait."""
    import eplib

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        event = eplib.Buffer.capture()
    current = torch.cuda.current_stream()
    assert event.event is not None and not event.event.query()
    assert current.query()
    with event:
        pass
    assert not current.query()
    torch.cuda.synchronize()
    assert event.event.query() and current.query()
