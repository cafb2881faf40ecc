"""Low-latency mode on the cpu transport against eplib.reference's low_latency_*_expected.

Every rank regenerates every rank's inputs from (seed, rank), so the expected outputs need no
collective: dispatch outputs (counts, layout ranges, source tokens, the valid rows of recv_x and of
the FP8 scales) and the combined tokens must equal the reference bit for bit. The expert outputs fed
to combine are random bf16 per (seed, expert rank), independent of what was dispatched, so that a
row read from the wrong place is caught.
"""

import pytest
import torch

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


def check_dispatch(rank: int, R: int, case: dict, out, masked=()) -> list:
    """Errors of low_latency_dispatch's outputs (recv, recv_count, handle) against the reference."""
    from eplib.reference import low_latency_dispatch_expected

    recv, recv_count, handle = out
    inputs = [ll_inputs(case, r) for r in range(R)]
    exp_recv, exp_count, exp_src, exp_range = low_latency_dispatch_expected(
        rank, [i[0] for i in inputs], [i[1] for i in inputs], case["num_max"], case["E"], case["use_fp8"],
        case["round_scale"], case["use_ue8m0"], masked)
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
                               or scales.stride() != exp_scales.stride()):
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


def _ll_round(buffer, rank: int, R: int, case: dict, round_: int) -> list:
    """One dispatch + combine on `buffer`, checked; the options come from the case."""
    x, idx, weights = ll_inputs(case, rank)
    recv, recv_count, handle, event, hook = buffer.low_latency_dispatch(
        x, idx, case["num_max"], case["E"], use_fp8=case["use_fp8"], round_scale=case["round_scale"],
        use_ue8m0=case["use_ue8m0"], return_recv_hook=case["hook"])
    if case["hook"]:
        hook()
    errs = check_dispatch(rank, R, case, (recv, recv_count, handle))
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
    return errs + check_combine(rank, R, case, combined, round_)


def job_ll(rank, R, group, case):
    import eplib

    buffer = eplib.Buffer(group, 0, 0, low_latency_mode=True, num_qps_per_rank=1)
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
