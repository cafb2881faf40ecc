"""eplib.reference.ReferenceBuffer against closed-form expectations (DESIGN.md §2)."""

import pytest

from dist_harness import RemoteError, base_case, fill_case, job_closed_form, job_hand_example

# Cases shared with test_buffer.py (which runs them on eplib.Buffer): name -> overrides of base_case.
CASES = {
    "uniform": {},
    "zipf": dict(skew="zipf", K=3, E_per_rank=3),
    "hot_expert": dict(skew="hot"),
    "masked_slots": dict(skew="masked", K=3, E_per_rank=3),
    "duplicate_experts_in_row": dict(skew="dup", K=4),
    "bf16": dict(dtype="bf16", skew="masked"),
    "fp16": dict(dtype="fp16", skew="zipf"),
    "fp64_bias_tuple": dict(dtype="fp64", skew="masked", bias=2),
    "fp8_tuple": dict(dtype="fp8", H=256, skew="masked"),
    "K1": dict(K=1),
    "E_equals_R": dict(E_per_rank=1, K=1),
    "E_equals_R_K2": dict(E_per_rank=1, K=2, skew="masked"),
    "empty_ranks": dict(Ts=[0, 9]),
    "all_empty": dict(Ts=[0]),
    "all_to_one_expert": dict(skew="one"),
    "all_slots_masked": dict(skew="all_masked"),
    "expert_alignment_4": dict(alignment=4, skew="zipf", E_per_rank=3),
    "expert_alignment_128": dict(alignment=128),
    "num_worst_tokens": dict(num_worst=64, skew="masked"),
    "num_worst_tokens_exact_fit": dict(num_worst=-1),  # filled in: exactly the largest receive
    "num_worst_tokens_fp8": dict(num_worst=70, dtype="fp8", H=128),
    "x_only_without_topk": dict(with_topk=False, skew="zipf"),
    "x_only_without_topk_num_worst": dict(with_topk=False, num_worst=50),
    "bias_single": dict(bias=1, dtype="bf16"),
    "bias_tuple": dict(bias=2, skew="masked"),
    "bias_tuple_fp16_num_worst": dict(bias=2, dtype="fp16", num_worst=60),
    "many_tokens": dict(Ts=[150, 37], H=8, K=4, E_per_rank=4, skew="zipf"),
}


def make_case(name: str, R: int) -> dict:
    case = fill_case(base_case(**CASES[name]), R)
    if case["num_worst"] == -1:
        # Largest number of rows any rank receives: every rank gets exactly that many rows.
        from dist_harness import expected_dispatch, make_payload, make_topk_idx

        xs = [make_payload(case["seed"], s, case["Ts"][s], case["H"], case["dtype"]) for s in range(R)]
        idxs = [make_topk_idx(case["seed"], s, case["Ts"][s], case["K"], case["E"], case["skew"]) for s in range(R)]
        case["num_worst"] = max(expected_dispatch(d, R, case["E"], xs, idxs, None)[1].shape[0] for d in range(R))
    return case


@pytest.mark.parametrize("name", list(CASES))
def test_reference_closed_form(pool, name):
    errs = pool.run(job_closed_form, "ref", make_case(name, pool.world_size), timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def test_reference_hand_example(pool2):
    errs = pool2.run(job_hand_example, "ref")
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def job_num_worst_too_small(rank, R, group, impl):
    """Rank 0 asks for 1 row but receives more; the others leave plenty of room. EPLIB_TIMEOUT_S=5 for
    the job (restored after; read at each call): with eplib, the others' wait on rank 0 must end quickly."""
    import torch
    from dist_harness import eplib_timeout, make_buffer, make_payload

    with eplib_timeout(5):
        buf = make_buffer(impl, group)
        T = 6
        idx = torch.zeros((T, 1), dtype=torch.int64)  # every token of every rank -> expert 0 (rank 0)
        w = torch.ones((T, 1))
        lay = buf.get_dispatch_layout(idx, 2 * R)
        buf.dispatch(make_payload(1, rank, T, 8, "fp32"), num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                     num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=w,
                     num_worst_tokens=1 if rank == 0 else 1000)


def check_num_worst_too_small(pool, impl):
    res = pool.run(job_num_worst_too_small, impl, return_exceptions=True, timeout=40)
    assert isinstance(res[0], RemoteError) and res[0].is_a(ValueError), f"rank 0 should raise ValueError, got {res[0]!r}"
    assert "num_worst_tokens" in res[0].message, res[0].message
    for r in range(1, pool.world_size):
        assert isinstance(res[r], RemoteError) and res[r].is_a(ValueError, RuntimeError), (
            f"rank {r} should raise ValueError or RuntimeError, got {res[r]!r}")


def test_reference_num_worst_too_small(pool):
    check_num_worst_too_small(pool, "ref")
