"""eplib.Buffer (CPU transport) against the reference and closed-form expectations (DESIGN.md §2).

Every output must be torch.equal to eplib.reference.ReferenceBuffer's, for every dtype; the
closed-form checks (payloads encoding source rank and token index) run on eplib.Buffer too.
"""

import pytest

from dist_harness import SCALE_FORMS, base_case, fill_case, job_closed_form, job_compare, job_hand_example
from test_reference import CASES, check_num_worst_too_small, make_case


@pytest.mark.parametrize("name", list(CASES))
def test_buffer_closed_form(pool, name):
    errs = pool.run(job_closed_form, "eplib", make_case(name, pool.world_size), timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


# Buffer vs reference on random (non-integer) data, every dtype, the main shapes and options.
COMPARE_CASES = {
    **{f"{dtype}-{skew}": dict(dtype=dtype, skew=skew, H=256 if dtype == "fp8" else 32, K=3, E_per_rank=3)
       for dtype in ("fp32", "bf16", "fp16", "fp8") for skew in ("uniform", "zipf", "masked")},
    "bf16-bias_tuple-num_worst": dict(dtype="bf16", bias=2, num_worst=64, skew="hot"),
    "fp16-bias_single": dict(dtype="fp16", bias=1, skew="dup", K=4),
    "fp32-empty_ranks-align8": dict(Ts=[0, 21, 5], alignment=8),
    "bf16-x_only": dict(dtype="bf16", with_topk=False),
    "fp8-x_only-num_worst": dict(dtype="fp8", H=128, with_topk=False, num_worst=80),
    "fp32-E_equals_R-K1": dict(E_per_rank=1, K=1),
    "bf16-many_tokens": dict(dtype="bf16", Ts=[150, 90], H=64, K=4, E_per_rank=4, skew="zipf", bias=2),
}


@pytest.mark.parametrize("name", list(COMPARE_CASES))
def test_buffer_equals_reference(pool, name):
    case = fill_case(base_case(**COMPARE_CASES[name]), pool.world_size)
    errs = pool.run(job_compare, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("scales", SCALE_FORMS)
def test_buffer_fp8_scale_forms_equal_reference(pool_cache, world_size, scales):
    """Column-major and int32 (UE8M0) scales, as DeepEP takes them, arrive as the reference's."""
    case = fill_case(base_case(dtype="fp8", H=1024, K=3, E_per_rank=4, skew="zipf", scales=scales), world_size)
    errs = pool_cache(world_size).run(job_compare, case, timeout=60)
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def test_buffer_hand_example(pool2):
    errs = pool2.run(job_hand_example, "eplib")
    assert not any(errs), "\n".join(e for rank_errs in errs for e in rank_errs)


def test_buffer_num_worst_too_small(pool):
    try:
        check_num_worst_too_small(pool, "eplib")
    finally:
        # Some ranks may have left a collective half done: start the next test on a fresh group.
        pool.restart()


# ------------------------------------------------------------------------ DeepEP API surface


def job_api_surface(rank, R, group):
    """Constructor keywords, destroy, Config, config getters, capture, set_num_sms, EventOverlap."""
    import eplib
    import torch
    from dist_harness import make_payload, make_topk_idx, make_topk_weights, same

    out = {}
    buf = eplib.Buffer(group, num_nvl_bytes=0, num_rdma_bytes=0, low_latency_mode=False, num_qps_per_rank=24,
                       allow_nvlink_for_low_latency_mode=True, allow_mnnvl=False, explicitly_destroy=False)
    # DeepEP's positional order: num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
    # allow_nvlink_for_low_latency_mode, allow_mnnvl, explicitly_destroy, enable_shrink, comm.
    positional = eplib.Buffer(group, 0, 0, False, 24, True, False, True, False, None)
    out["positional explicitly_destroy"] = positional.explicitly_destroy
    positional.destroy()
    explicit = eplib.Buffer(group, explicitly_destroy=True)
    explicit.destroy()

    cfg = eplib.Config(20, 6, 256, 6, 128)
    dcfg = eplib.Buffer.get_dispatch_config(R)
    ccfg = eplib.Buffer.get_combine_config(R)
    out["config types"] = (isinstance(cfg, eplib.Config), isinstance(dcfg, eplib.Config), isinstance(ccfg, eplib.Config))
    old = getattr(eplib.Buffer, "num_sms", 20)
    eplib.Buffer.set_num_sms(24)
    eplib.Buffer.set_num_sms(old)

    captured = eplib.Buffer.capture()
    T, E = 9, 2 * R
    idx = make_topk_idx(5, rank, T, 2, E, "uniform")
    w = make_topk_weights(5, rank, T, 2)
    x = make_payload(5, rank, T, 16, "bf16")
    lay = buf.get_dispatch_layout(idx, E, previous_event=captured, async_finish=True, allocate_on_comm_stream=True)
    ev = lay[4]
    ev.current_stream_wait()
    with ev:
        pass
    plain = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                         topk_idx=idx, topk_weights=w)
    tuned = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                         topk_idx=idx, topk_weights=w, config=dcfg, previous_event=eplib.Buffer.capture(),
                         async_finish=True, allocate_on_comm_stream=True)
    ev = tuned[5]
    out["dispatch event is EventOverlap"] = isinstance(ev, eplib.EventOverlap)
    ev.current_stream_wait()
    with ev:
        pass
    out["dispatch same with config/async"] = all(same(a, b) for a, b in zip(plain[:4], tuned[:4]))
    c1 = buf.combine(plain[0], plain[4])
    c2 = buf.combine(tuned[0], tuned[4], config=ccfg, previous_event=eplib.Buffer.capture(), async_finish=True,
                     allocate_on_comm_stream=True)
    c2[2].current_stream_wait()
    with c2[2]:
        pass
    out["combine same with config/async"] = same(c1[0], c2[0])
    out["combine identity"] = same(c1[0].float(), x.float() * torch.tensor(
        [len({int(e) // 2 for e in row if e >= 0}) for row in idx], dtype=torch.float32)[:, None])
    return out


def test_buffer_api_surface(pool):
    res = pool.run(job_api_surface, timeout=60)
    for rank, out in enumerate(res):
        assert out == {
            "positional explicitly_destroy": True,
            "config types": (True, True, True),
            "dispatch event is EventOverlap": True,
            "dispatch same with config/async": True,
            "combine same with config/async": True,
            "combine identity": True,
        }, f"rank {rank}: {out}"
