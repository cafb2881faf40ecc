"""Low-latency mode on the cpu transport against eplib.reference's low_latency_*_expected.

Every rank regenerates every rank's inputs from (seed, rank), so the expected outputs need no
collective: dispatch outputs (counts, layout ranges, source tokens, the valid rows of recv_x and of
the FP8 scales) and the combined tokens must equal the reference bit for bit. The expert outputs fed
to combine are random bf16 per (seed, expert rank), independent of what was dispatched, so that a
row read from the wrong place is caught.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dist_harness import make_topk_idx, make_topk_weights

# ------------------------------------------------------------------------------------- inputs


def _generator(seed: int, rank: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + salt)


def ll_inputs(case: dict, rank: int):
    """(x bf16 [T, H], topk_idx int64 [T, K], topk_weights float32 [T, K]) of `rank`."""
    T, H, K, E = case["Ts"][rank], case["H"], case["K"], case["E"]
    x = (torch.randn(T, H, generator=_generator(case["seed"], rank, 11)) * case.get("scale", 1.0)).to(torch.bfloat16)
    idx = make_topk_idx(case["seed"], rank, T, K, E, case["skew"])
    return x, idx, make_topk_weights(case["seed"], rank, T, K)


def expert_outputs(case: dict, rank: int, R: int, round_: int = 0) -> torch.Tensor:
    """bf16 [E/R, R * num_max, H]: what the experts of `rank` return (random, per round)."""
    shape = (case["E"] // R, R * case["num_max"], case["H"])
    return torch.randn(shape, generator=_generator(case["seed"] + round_, rank, 13)).to(torch.bfloat16)


def ll_case(**overrides) -> dict:
    case = dict(seed=3, Ts=None, H=256, K=4, E_per_rank=3, num_max=16, skew="uniform", use_fp8=False,
                round_scale=False, use_ue8m0=False, hook=False, zero_copy=False, rounds=1, use_out=False)
    case.update(overrides)
    return case


def fill(case: dict, R: int) -> dict:
    case = dict(case)
    if case["Ts"] is None:
        case["Ts"] = [min(case["num_max"], 5 + 4 * r) for r in range(R)]
    elif len(case["Ts"]) != R:
        case["Ts"] = [case["Ts"][r % len(case["Ts"])] for r in range(R)]
    case["E"] = case.pop("E_per_rank") * R if "E_per_rank" in case else case["E"]
    case["K"] = min(case["K"], case["E"])
    return case


# ------------------------------------------------------------------------------------- checks


_EXPECTED_DISPATCH: dict = {}


def check_dispatch(rank: int, R: int, case: dict, out, masked=()) -> list:
    """Errors of low_latency_dispatch's outputs (recv, recv_count, handle) against the reference."""
    from eplib.reference import low_latency_dispatch_expected

    recv, recv_count, handle = out
    key = (repr(sorted(case.items())), rank, R, tuple(masked))
    if key not in _EXPECTED_DISPATCH:  # loops repeat a case: its dispatch outputs do not change
        inputs = [ll_inputs(case, r) for r in range(R)]
        if len(_EXPECTED_DISPATCH) > 8:
            _EXPECTED_DISPATCH.clear()
        _EXPECTED_DISPATCH[key] = low_latency_dispatch_expected(
            rank, [i[0] for i in inputs], [i[1] for i in inputs], case["num_max"], case["E"], case["use_fp8"],
            case["round_scale"], case["use_ue8m0"], masked)
    exp_recv, exp_count, exp_src, exp_range = _EXPECTED_DISPATCH[key]
    errs = []
    if not torch.equal(recv_count, exp_count):
        errs.append(f"rank {rank}: recv_count {recv_count.tolist()} != {exp_count.tolist()}")
        return errs
    if not torch.equal(handle[1], exp_range):
        errs.append(f"rank {rank}: layout_range differs")
    rows = R * case["num_max"]
    values, exp_values = (recv[0], exp_recv[0]) if case["use_fp8"] else (recv, exp_recv)
    scales, exp_scales = (recv[1], exp_recv[1]) if case["use_fp8"] else (None, None)
    if tuple(values.shape) != (case["E"] // R, rows, case["H"]):
        errs.append(f"rank {rank}: recv_x shape {list(values.shape)}")
        return errs
    if scales is not None and (scales.dtype != exp_scales.dtype or scales.shape != exp_scales.shape
                               or _layout(scales) != _layout(exp_scales)):
        errs.append(f"rank {rank}: scales {scales.dtype} {list(scales.shape)} strides {scales.stride()}, expected "
                    f"{exp_scales.dtype} {list(exp_scales.shape)} strides {exp_scales.stride()}")
        return errs
    for le, n in enumerate(exp_count.tolist()):
        if not torch.equal(handle[0][le, :n], exp_src[le, :n]):
            errs.append(f"rank {rank}: src_info of local expert {le} differs")
        if not torch.equal(values[le, :n].view(torch.uint8), exp_values[le, :n].view(torch.uint8)):
            errs.append(f"rank {rank}: rows of local expert {le} differ")
        if scales is not None and not torch.equal(scales[le, :n], exp_scales[le, :n]):
            errs.append(f"rank {rank}: scales of local expert {le} differ")
    return errs


def _layout(t: torch.Tensor) -> list:
    """The strides that matter (those of dimensions longer than 1)."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size > 1]


def check_combine(rank: int, R: int, case: dict, combined, round_: int = 0, masked=()) -> list:
    from eplib.reference import low_latency_combine_expected

    idxs = [ll_inputs(case, r)[1] for r in range(R)]
    ys = [expert_outputs(case, r, R, round_) for r in range(R)]
    expected = low_latency_combine_expected(rank, ys, idxs, ll_inputs(case, rank)[2], case["E"], masked)
    if combined.dtype != torch.bfloat16 or not torch.equal(combined, expected):
        bad = (combined.float() != expected.float()).any(dim=1).nonzero().flatten().tolist()
        return [f"rank {rank}: combined tokens {bad[:8]} differ from the reference (round {round_})"]
    return []


# ------------------------------------------------------------------------------------- jobs


def _ll_round(buffer, rank: int, R: int, case: dict, round_: int, masked=()) -> list:
    """One dispatch + combine on `buffer`, checked; the options come from the case."""
    x, idx, weights = ll_inputs(case, rank)
    recv, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, idx, case["num_max"], case["E"], use_fp8=case["use_fp8"], round_scale=case["round_scale"],
        use_ue8m0=case["use_ue8m0"], return_recv_hook=case["hook"])
    if case["hook"]:
        hook()
    errs = check_dispatch(rank, R, case, (recv, recv_count, handle), masked)
    y = expert_outputs(case, rank, R, round_)
    if case["zero_copy"]:
        buffer.get_next_low_latency_combine_buffer(handle).copy_(y)
    out = torch.full((x.shape[0], case["H"]), 7.0, dtype=torch.bfloat16) if case["use_out"] else None
    combined, event, hook = buffer.low_latency_combine(y, idx, weights, handle, zero_copy=case["zero_copy"],
                                                       return_recv_hook=case["hook"], out=out)
    if case["hook"]:
        hook()
    if out is not None and combined.data_ptr() != out.data_ptr():
        errs.append(f"rank {rank}: combine did not write into out=")
    return errs + check_combine(rank, R, case, combined, round_, masked)


def ll_buffer(group, backend: str = "cpu", exchange: str = "auto", **kwargs):
    """A Buffer for LL calls: eplib.Buffer on CPU tensors ("cpu"), or a gpu_harness backend whose calls take
    CPU tensors through the nccl or ipc transport on the CPU execution of the CUDA sources ("cuda_cpu-*").
    kwargs: Buffer's. exchange "gloo" (cpu only): the cpu engine sends messages on gloo point-to-point (the
    exchange between hosts) instead of pulling dispatches from shared memory."""
    import eplib
    from eplib.transports.low_latency_cpu import CpuLowLatency

    kwargs = dict(low_latency_mode=True, num_qps_per_rank=1, **kwargs)
    if backend != "cpu":
        from gpu_harness import eplib_buffer

        return eplib_buffer(backend, group, **kwargs)[0]
    buffer = eplib.Buffer(group, 0, 0, **kwargs)
    if exchange != "auto":
        buffer._low_latency[buffer._transport_for("x", torch.empty(0))] = CpuLowLatency(
            group, buffer.enable_shrink, 0, [False] * group.size(), exchange=exchange)
    return buffer


def job_ll(rank, R, group, case):
    buffer = ll_buffer(group, case.get("backend", "cpu"))
    errs = []
    for round_ in range(case["rounds"]):
        errs += _ll_round(buffer, rank, R, case, round_)
    return errs


CASES = {
    "bf16": ll_case(),
    "bf16-odd_hidden-hook-out": ll_case(H=77, hook=True, use_out=True),
    "bf16-zero_copy-rounds": ll_case(zero_copy=True, rounds=3),
    "fp8": ll_case(use_fp8=True),
    "fp8-round_scale": ll_case(use_fp8=True, round_scale=True, scale=1e-3),
    "fp8-ue8m0-H640": ll_case(use_fp8=True, round_scale=True, use_ue8m0=True, H=640, scale=300.0),
    "hot": ll_case(skew="hot", Ts=[16]),
    "masked-slots": ll_case(skew="masked", K=5),
    "dup-slots": ll_case(skew="dup", K=6),
    "empty-ranks": ll_case(Ts=[0, 9, 0]),
    "topk32": ll_case(K=32, E_per_rank=12, H=128, Ts=[3]),
}


@pytest.fixture(scope="module", params=[1, 2, 4], ids=["R1", "R2", "R4"])
def ll_pool(request, pool_cache):
    return pool_cache(request.param)


@pytest.mark.parametrize("name", list(CASES))
def test_low_latency_equals_reference(ll_pool, name):
    case = fill(CASES[name], ll_pool.world_size)
    errs = ll_pool.run(job_ll, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def job_ll_gloo(rank, R, group, case):
    """job_ll on the gloo exchange."""
    buffer = ll_buffer(group, exchange="gloo")
    errs = []
    for round_ in range(case["rounds"]):
        errs += _ll_round(buffer, rank, R, case, round_)
    return errs


@pytest.mark.parametrize("name", ["bf16-zero_copy-rounds", "fp8-ue8m0-H640", "empty-ranks", "dup-slots"])
def test_low_latency_gloo_exchange(ll_pool, name):
    case = fill(CASES[name], ll_pool.world_size)
    errs = ll_pool.run(job_ll_gloo, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


# ------------------------------------------------------------------------------ hooks, stats, mixing


def job_two_hooks_and_stats(rank, R, group, case):
    """Two dispatches await their hooks at once (buffers 0 and 1); a third LL call is refused until a hook
    runs; hooks run in reverse order; the receive statistics accumulate; then both combines, hooked too."""
    buffer = ll_buffer(group, case.get("backend", "cpu"))
    cases = [case, dict(case, seed=case["seed"] + 100)]
    stats = torch.zeros(case["E"] // R, dtype=torch.int32)
    waits = torch.zeros(R, dtype=torch.int64)
    calls = []
    for c in cases:
        x, idx, _ = ll_inputs(c, rank)
        calls.append(buffer.low_latency_dispatch(x, idx, c["num_max"], c["E"], use_fp8=c["use_fp8"],
                                                 cumulative_local_expert_recv_stats=stats,
                                                 dispatch_wait_recv_cost_stats=waits, return_recv_hook=True))
    errs = []
    try:
        buffer.low_latency_dispatch(*ll_inputs(case, rank)[:2], case["num_max"], case["E"], use_fp8=False)
        errs.append(f"rank {rank}: a third low-latency call while two await their hooks was accepted")
    except RuntimeError as error:
        if "hook" not in str(error):
            errs.append(f"rank {rank}: unclear error for a third pending call: {error}")
    for call in reversed(calls):
        call[4]()
    for c, call in zip(cases, calls):
        errs += check_dispatch(rank, R, c, call[:3])
    total = calls[0][1] + calls[1][1]
    if not torch.equal(stats, total):
        errs.append(f"rank {rank}: cumulative_local_expert_recv_stats {stats.tolist()} != {total.tolist()}")
    if (waits < 0).any():
        errs.append(f"rank {rank}: negative wait statistics {waits.tolist()}")
    hooks = []
    for round_, (c, call) in enumerate(zip(cases, calls)):
        _, idx, w = ll_inputs(c, rank)
        combined, _, hook = buffer.low_latency_combine(expert_outputs(c, rank, R, round_), idx, w, call[2],
                                                       return_recv_hook=True)
        hooks.append((hook, combined, c, round_))
    for hook, combined, c, round_ in hooks:
        hook()
        errs += check_combine(rank, R, c, combined, round_)
    return errs


def test_low_latency_two_pending_hooks(ll_pool):
    case = fill(ll_case(use_fp8=True), ll_pool.world_size)
    errs = ll_pool.run(job_two_hooks_and_stats, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def _normal_round(buffer, rank: int, R: int, seed: int) -> list:
    """A normal-mode dispatch + combine with identity experts: integer payloads come back times the number
    of ranks each token went to, exactly."""
    from dist_harness import make_payload

    T, E = 9 + rank, 2 * R
    x = make_payload(seed, rank, T, 32, "bf16")
    idx = make_topk_idx(seed, rank, T, 2, E, "uniform")
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, E)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                num_tokens_per_expert=per_expert, topk_idx=idx,
                                                topk_weights=make_topk_weights(seed, rank, T, 2))
    combined = buffer.combine(recv_x, handle)[0]
    expected = (x.float() * in_rank.sum(1, keepdim=True).float()).to(torch.bfloat16)
    return [] if torch.equal(combined, expected) else [f"rank {rank}: normal-mode round {seed} wrong"]


def job_mixed(rank, R, group, case):
    """Normal and LL calls on one Buffer, with clean_low_latency_buffer between them (as DeepEP asks)."""
    buffer = ll_buffer(group, case.get("backend", "cpu"))
    errs = _normal_round(buffer, rank, R, 1)
    for round_ in range(2):
        buffer.clean_low_latency_buffer(case["num_max"], case["H"], case["E"])
        errs += _ll_round(buffer, rank, R, case, round_)
        errs += _normal_round(buffer, rank, R, 2 + round_)
    return errs


def test_low_latency_mixed_with_normal_mode(pool):
    case = fill(ll_case(hook=True), pool.world_size)
    errs = pool.run(job_mixed, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


# ------------------------------------------------------------------------------------ bad input

BAD_CALLS = {
    # name: (overrides of the dispatch call, how the error must start: naming the argument)
    "num_max_too_small": (dict(num_max=4), "num_max_dispatch_tokens_per_rank:"),
    "fp8_hidden_not_128": (dict(H=200, use_fp8=True), "x:"),
    "topk_over_32": (dict(K=33), "topk_idx:"),
    "ue8m0_without_round_scale": (dict(use_fp8=True, use_ue8m0=True), "use_ue8m0:"),
    "experts_not_multiple_of_ranks": (dict(E_plus=1), "num_experts:"),
    # found by the kernel, after the exchange started: the rank still takes part with a rejected header
    "expert_id_out_of_range": (dict(bad_id=True), "topk_idx[2, 1] = "),
}


def _dispatch_args(rank: int, R: int, bad: dict):
    T, H, K = 6, bad.get("H", 128), bad.get("K", 2)
    E = 40 * R + bad.get("E_plus", 0)
    x = torch.randn(T, H).to(torch.bfloat16)
    idx = torch.randint(0, E, (T, K), dtype=torch.int64)
    if bad.get("bad_id"):
        idx[2, 1] = E
    return (x, idx, bad.get("num_max", 8), E), dict(use_fp8=bad.get("use_fp8", False),
                                                    use_ue8m0=bad.get("use_ue8m0", False))


def job_bad_call(rank, R, group, name, bad_ranks, case, exchange="auto"):
    """A good LL round, then a call that is bad on `bad_ranks`: those raise the ValueError naming the
    argument, the others a RuntimeError naming a bad rank (at once, not after the timeout); then a good
    round again on every rank."""
    import time

    bad, argument = BAD_CALLS[name]
    buffer = ll_buffer(group, exchange=exchange)
    errs = _ll_round(buffer, rank, R, case, 0)
    args, kwargs = _dispatch_args(rank, R, bad if rank in bad_ranks else {})
    start = time.monotonic()
    try:
        buffer.low_latency_dispatch(*args, **kwargs)
        errs.append(f"rank {rank}: {name}: no error")
    except ValueError as error:
        if rank not in bad_ranks or not str(error).startswith(argument):
            errs.append(f"rank {rank}: {name}: ValueError {error}")
    except RuntimeError as error:
        if rank in bad_ranks or f"rank {bad_ranks[0]}" not in str(error):
            errs.append(f"rank {rank}: {name}: RuntimeError {error}")
    if time.monotonic() - start > 10:
        errs.append(f"rank {rank}: {name}: the error took {time.monotonic() - start:.1f} s")
    return errs + _ll_round(buffer, rank, R, case, 1)


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_low_latency_bad_call(pool, name):
    R = pool.world_size
    case = fill(ll_case(), R)
    for bad_ranks in ([R - 1], list(range(R))):
        errs = pool.run(job_bad_call, name, bad_ranks, case, timeout=60)
        assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("name", ["topk_over_32", "expert_id_out_of_range"])
def test_low_latency_bad_call_gloo_exchange(pool2, name):
    case = fill(ll_case(), 2)
    errs = pool2.run(job_bad_call, name, [1], case, "gloo", timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def job_bad_first_call_on_one_rank(rank, R, group, case, exchange):
    """Bad input on the last rank at the Buffer's first LL call, before the exchange exists: that rank raises
    the ValueError, the others a RuntimeError naming it at once (the exchange's set-up carries the rejection);
    then every rank makes good rounds."""
    import time

    buffer = ll_buffer(group, exchange=exchange)
    bad = rank == R - 1
    args, kwargs = _dispatch_args(rank, R, dict(num_max=2) if bad else {})
    errs = []
    start = time.monotonic()
    try:
        buffer.low_latency_dispatch(*args, **kwargs)
        errs.append(f"rank {rank}: no error")
    except ValueError as error:
        if not bad or not str(error).startswith("num_max_dispatch_tokens_per_rank: x has 6 tokens"):
            errs.append(f"rank {rank}: ValueError {error}")
    except RuntimeError as error:
        if bad or f"rank {R - 1} rejected its input" not in str(error):
            errs.append(f"rank {rank}: RuntimeError {error}")
    if time.monotonic() - start > 10:
        errs.append(f"rank {rank}: the error took {time.monotonic() - start:.1f} s")
    return errs + _ll_round(buffer, rank, R, case, 0) + _ll_round(buffer, rank, R, case, 1)


@pytest.mark.parametrize("exchange", ["auto", "gloo"])
def test_low_latency_bad_first_call_on_one_rank(pool2, exchange):
    case = fill(ll_case(use_fp8=True), 2)
    errs = pool2.run(job_bad_first_call_on_one_rank, case, exchange, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def job_bad_first_call(rank, R, group):
    """Bad sizes on every rank at the first call: ValueError before anything is exchanged."""
    import eplib

    buffer = eplib.Buffer(group, 0, 0, low_latency_mode=True, num_qps_per_rank=1)
    args, kwargs = _dispatch_args(rank, R, dict(num_max=2))
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank: x has 6 tokens"):
        buffer.low_latency_dispatch(*args, **kwargs)
    engine = buffer._low_latency[buffer._cpu]
    calls_after_error = engine.state.num_calls
    handle = buffer.low_latency_dispatch(*_dispatch_args(rank, R, {})[0])[2]
    with pytest.raises(ValueError, match="use_logfmt"):  # all ranks reject: the round completes at once
        buffer.low_latency_combine(torch.zeros(1, 1, 1, dtype=torch.bfloat16), args[1], torch.zeros(6, 2), handle,
                                   use_logfmt=True)
    return calls_after_error, engine._exchange is None or engine._exchange.kind


def test_low_latency_bad_first_call(pool2):
    assert pool2.run(job_bad_first_call) == [(0, "shared memory")] * 2


# ------------------------------------------------------------------------------------ properties

SETTINGS = settings(max_examples=12, deadline=None, derandomize=bool(os.environ.get("CI")), print_blob=True)


@st.composite
def ll_cases(draw, R: int) -> dict:
    fp8 = draw(st.booleans())
    round_scale = fp8 and draw(st.booleans())
    num_max = draw(st.integers(1, 24))
    E = R * draw(st.integers(1, 6))
    return dict(
        seed=draw(st.integers(0, 2**20)),
        Ts=draw(st.lists(st.integers(0, num_max), min_size=R, max_size=R)),
        H=128 * draw(st.integers(1, 3)) if fp8 else draw(st.integers(1, 300)),
        K=draw(st.integers(1, min(E, 9))),
        E=E,
        num_max=num_max,
        skew=draw(st.sampled_from(["uniform", "zipf", "hot", "masked", "dup", "all_masked", "one"])),
        use_fp8=fp8, round_scale=round_scale, use_ue8m0=round_scale and draw(st.booleans()),
        hook=draw(st.booleans()), zero_copy=draw(st.booleans()), use_out=draw(st.booleans()), rounds=2,
        scale=draw(st.sampled_from([1e-6, 1.0, 1e4])),
    )


@SETTINGS
@given(data=st.data())
def test_low_latency_property(ll_pool, data):
    case = data.draw(ll_cases(ll_pool.world_size), label="case")
    errs = ll_pool.run(job_ll, case, timeout=60)
    assert not any(errs), f"case {case}:\n" + "\n".join(e for rank_errs in errs for e in rank_errs)


# ------------------------------------------------------------------------------------ FP8 cast


@pytest.mark.parametrize("round_scale", [False, True])
def test_fp8_cast_of_every_bf16_value(round_scale):
    """The native cast (eplib/fp8.h) equals eplib.reference.fp8_quantize bit for bit on every finite bf16
    value, in blocks of 128 whose largest magnitudes span the whole range (so the scaled values cover
    normals, subnormals, halfway cases and the saturation at 448)."""
    from eplib import _C
    from eplib.reference import fp8_quantize

    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    values = values[values.float().isfinite()]
    assert values.numel() == 510 * 128
    # Shuffled, so that every block mixes large and tiny values; rows of 5 blocks.
    x = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))].view(102, 640).contiguous()
    got_values = torch.empty(x.shape, dtype=torch.uint8)
    got_scales = torch.empty(x.shape[0], x.shape[1] // 128, dtype=torch.float32)
    _C.ll_quantize(x.data_ptr(), x.shape[0], x.shape[1], round_scale, got_values.data_ptr(), got_scales.data_ptr())
    expected_values, expected_scales = fp8_quantize(x, round_scale)
    assert torch.equal(got_scales, expected_scales)
    assert torch.equal(got_values, expected_values.view(torch.uint8))


def job_reference_buffer(rank, R, group, case):
    """eplib.reference.ReferenceBuffer's low-latency calls (all-gather, then the pure functions)."""
    from eplib.reference import ReferenceBuffer

    reference = ReferenceBuffer(group)
    x, idx, weights = ll_inputs(case, rank)
    recv, recv_count, handle, _, _ = reference.low_latency_dispatch(
        x, idx, case["num_max"], case["E"], use_fp8=case["use_fp8"], round_scale=case["round_scale"],
        use_ue8m0=case["use_ue8m0"])
    errs = check_dispatch(rank, R, case, (recv, recv_count, handle))
    combined = reference.low_latency_combine(expert_outputs(case, rank, R), idx, weights, handle)[0]
    return errs + check_combine(rank, R, case, combined)


@pytest.mark.parametrize("name", ["bf16", "fp8-ue8m0-H640", "empty-ranks"])
def test_reference_buffer_low_latency(pool, name):
    case = fill(CASES[name], pool.world_size)
    errs = pool.run(job_reference_buffer, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)
