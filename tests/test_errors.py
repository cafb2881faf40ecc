"""Bad inputs raise ValueError / TypeError naming the argument (DESIGN.md §3), on every rank
alike so nobody waits; a peer that never shows up turns into a RuntimeError after EPLIB_TIMEOUT_S.

Device mismatches need a CUDA device and are not tested here.
"""

import re
import time

import pytest

from dist_harness import RankPool, RemoteError

IMPLS = ["ref", "eplib"]

# name -> regex the message must match (it names the offending argument).
BAD_INPUTS = {
    "x_dtype_int32": r"\bx\b",
    "x_dtype_int64": r"\bx\b",
    "x_not_2d": r"\bx\b",
    "x_non_contiguous": r"\bx\b.*contiguous|contiguous.*\bx\b",
    "fp8_scales_dtype": r"\bx\b|scales",
    "fp8_scales_rows": r"\bx\b|scales",
    "fp8_values_non_contiguous": r"\bx\b.*contiguous|contiguous.*\bx\b",
    "topk_idx_dtype_layout": r"topk_idx",
    "topk_idx_dtype_dispatch": r"topk_idx",
    "topk_weights_dtype": r"topk_weights",
    "x_rows_vs_topk_idx": r"\bx\b|topk_idx",
    "topk_weights_rows": r"topk_weights",
    "topk_weights_K": r"topk_weights",
    "num_experts_not_multiple_of_R": r"num_experts",
    "expert_id_equal_E_layout": r"topk_idx",
    "expert_id_below_minus_1_layout": r"topk_idx",
    "expert_id_equal_E_dispatch": r"topk_idx",
    "topk_weights_nan": r"topk_weights",
    "topk_weights_inf": r"topk_weights",
    "is_token_in_rank_rows": r"is_token_in_rank",
    "cached_x_rows_vs_handle": r"\bx\b|handle",
    "combine_x_rows_vs_handle": r"\bx\b|handle",
    "combine_x_dtype": r"\bx\b",
    "combine_topk_weights_rows": r"topk_weights",
    "combine_bias_shape": r"bias",
}

# Layout consistency checks that eplib makes and the reference (which trusts its layout) does not.
EPLIB_ONLY_BAD_INPUTS = {
    "num_tokens_per_rank_vs_is_token_in_rank": r"num_tokens_per_rank",
    "num_tokens_per_expert_vs_topk_idx": r"num_tokens_per_expert",
    "is_token_in_rank_misses_expert_rank": r"is_token_in_rank",
    "cached_dispatch_with_topk": r"topk_idx",
    "dispatch_without_layout": r"num_tokens_per_rank",
}


def job_bad_input(rank, R, group, impl, name):
    """A valid dispatch (collective, all ranks), then the same bad call on every rank.

    Returns None if the bad call did not raise, else (exception class names, message).
    """
    import torch
    from dist_harness import make_buffer, make_payload, make_topk_idx, make_topk_weights

    buf = make_buffer(impl, group)
    T, H, K, E = 6, 16, 2, 2 * R
    x = make_payload(3, 0, T, H, "fp32")  # same inputs on every rank
    idx = make_topk_idx(3, 0, T, K, E, "uniform")
    w = make_topk_weights(3, 0, T, K)
    lay = buf.get_dispatch_layout(idx, E)
    layout = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2])
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    x7 = make_payload(3, 0, T + 1, H, "fp32")  # one token more than the dispatch of handle

    def dispatch(**over):
        args = dict(x=x, topk_idx=idx, topk_weights=w, **layout)
        args.update(over)
        return buf.dispatch(**args)

    bad_idx = idx.clone()
    bad_w = w.clone()
    calls = {
        "x_dtype_int32": lambda: dispatch(x=x.to(torch.int32)),
        "x_dtype_int64": lambda: dispatch(x=x.to(torch.int64)),
        "x_not_2d": lambda: dispatch(x=x.reshape(T, 2, H // 2)),
        "x_non_contiguous": lambda: dispatch(x=torch.cat([x, x], dim=1)[:, ::2]),
        "fp8_scales_dtype": lambda: dispatch(x=(torch.zeros(T, 128).to(torch.float8_e4m3fn),
                                                torch.ones(T, 1, dtype=torch.float64))),
        "fp8_scales_rows": lambda: dispatch(x=(torch.zeros(T, 128).to(torch.float8_e4m3fn),
                                               torch.ones(T + 1, 1))),
        "fp8_values_non_contiguous": lambda: dispatch(x=(torch.zeros(128, T).to(torch.float8_e4m3fn).T,
                                                         torch.ones(T, 1))),
        "topk_idx_dtype_layout": lambda: buf.get_dispatch_layout(idx.to(torch.int32), E),
        "topk_idx_dtype_dispatch": lambda: dispatch(topk_idx=idx.to(torch.int32)),
        "topk_weights_dtype": lambda: dispatch(topk_weights=w.double()),
        "x_rows_vs_topk_idx": lambda: dispatch(topk_idx=idx[:-1], topk_weights=w[:-1]),
        "topk_weights_rows": lambda: dispatch(topk_weights=w[:-1]),
        "topk_weights_K": lambda: dispatch(topk_weights=torch.cat([w, w[:, :1]], dim=1)),
        "num_experts_not_multiple_of_R": lambda: buf.get_dispatch_layout(idx, E + 1),
        "expert_id_equal_E_layout": lambda: buf.get_dispatch_layout(bad_idx.fill_(E), E),
        "expert_id_below_minus_1_layout": lambda: buf.get_dispatch_layout(bad_idx.fill_(-2), E),
        "expert_id_equal_E_dispatch": lambda: dispatch(topk_idx=bad_idx.index_fill_(0, torch.tensor([2]), E)),
        "topk_weights_nan": lambda: dispatch(topk_weights=bad_w.index_fill_(0, torch.tensor([3]), float("nan"))),
        "topk_weights_inf": lambda: dispatch(topk_weights=bad_w.index_fill_(0, torch.tensor([1]), float("inf"))),
        "is_token_in_rank_rows": lambda: dispatch(is_token_in_rank=lay[3][:-1]),
        "cached_x_rows_vs_handle": lambda: buf.dispatch(x7, handle=handle),
        "combine_x_rows_vs_handle": lambda: buf.combine(torch.cat([recv_x, recv_x[:1]]), handle),
        "combine_x_dtype": lambda: buf.combine(recv_x.to(torch.int32), handle),
        "combine_topk_weights_rows": lambda: buf.combine(recv_x, handle, topk_weights=recv_w[:-1]),
        "combine_bias_shape": lambda: buf.combine(recv_x, handle, bias=torch.zeros(T + 1, H)),
        "num_tokens_per_rank_vs_is_token_in_rank": lambda: dispatch(num_tokens_per_rank=lay[0] + 1),
        "num_tokens_per_expert_vs_topk_idx": lambda: dispatch(num_tokens_per_expert=lay[2].index_add(
            0, torch.tensor([0]), torch.tensor([1], dtype=torch.int32))),
        "is_token_in_rank_misses_expert_rank": lambda: dispatch(
            is_token_in_rank=torch.zeros_like(lay[3]), num_tokens_per_rank=torch.zeros_like(lay[0])),
        "cached_dispatch_with_topk": lambda: buf.dispatch(x, handle=handle, topk_idx=idx),
        "dispatch_without_layout": lambda: buf.dispatch(x, topk_idx=idx, topk_weights=w),
    }
    try:
        calls[name]()
    except Exception as e:  # noqa: BLE001 - the test inspects it
        return [c.__name__ for c in type(e).__mro__], str(e)
    return None


@pytest.mark.parametrize("impl,name", [(impl, name) for impl in IMPLS for name in BAD_INPUTS]
                         + [("eplib", name) for name in EPLIB_ONLY_BAD_INPUTS])
def test_bad_input_raises(pool2, impl, name):
    res = pool2.run(job_bad_input, impl, name, timeout=40)
    pattern = {**BAD_INPUTS, **EPLIB_ONLY_BAD_INPUTS}[name]
    for rank, r in enumerate(res):
        assert r is not None, f"rank {rank} [{impl}] {name}: no exception raised"
        mro, message = r
        assert "ValueError" in mro or "TypeError" in mro, f"rank {rank} [{impl}] {name}: raised {mro[0]}: {message}"
        assert re.search(pattern, message), (
            f"rank {rank} [{impl}] {name}: message does not name the argument ({pattern!r}): {message}")


def job_timeout(rank, R, group):
    """Rank 1 fails before dispatch (and stays alive, silent); rank 0 dispatches and must time out."""
    import os

    import eplib
    import torch

    os.environ["EPLIB_TIMEOUT_S"] = "2"
    buf = eplib.Buffer(group)
    if rank == 1:
        raise RuntimeError("rank 1 fails before dispatch on purpose")
    idx = torch.tensor([[0], [1], [2], [3]])
    lay = buf.get_dispatch_layout(idx, 4)
    def dispatch():
        buf.dispatch(torch.ones(4, 8), num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                     num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=torch.ones(4, 1))

    t0 = time.monotonic()
    try:
        dispatch()
    except Exception as e:  # noqa: BLE001
        first = [c.__name__ for c in type(e).__mro__], str(e), time.monotonic() - t0
    else:
        return None, "dispatch returned", time.monotonic() - t0, None
    # The abandoned collective is still pending: the next call waits for rank 1 to come back (it does
    # not), starts nothing, and says who is missing.
    t0 = time.monotonic()
    try:
        dispatch()
    except Exception as e:  # noqa: BLE001
        return (*first, ([c.__name__ for c in type(e).__mro__], str(e), time.monotonic() - t0))
    return (*first, None)


def test_timeout_names_phase():
    """A fresh group (the peer's silence wedges it), not the shared pool."""
    pool = RankPool(2)
    try:
        res = pool.run(job_timeout, return_exceptions=True, timeout=40)
    finally:
        pool.kill()
    assert isinstance(res[1], RemoteError) and "on purpose" in res[1].message
    assert not isinstance(res[0], RemoteError), f"rank 0's job itself failed: {res[0]}"
    mro, message, elapsed, second = res[0]
    assert mro is not None and "RuntimeError" in mro, f"rank 0: expected RuntimeError, got {mro}: {message}"
    assert elapsed < 10, f"rank 0 waited {elapsed:.1f} s with EPLIB_TIMEOUT_S=2"
    assert re.search(r"dispatch", message, re.I), f"message does not name the phase: {message}"
    assert "rank 1 never arrived" in message, f"message does not name the missing rank: {message}"
    assert second is not None, "a call after the timeout went ahead without the missing rank"
    mro, second_message, second_elapsed = second
    assert "RuntimeError" in mro and "rank 1 did not come back" in second_message, second
    assert 1.5 < second_elapsed < 10, second


def test_check_allocation_bounds():
    """Sizes that cannot exist raise ValueError naming the argument, before any allocation: beyond
    int64, or beyond the device's memory; a size that fits passes."""
    import torch

    from eplib.validation import INT64_LIMIT, check_allocation, device_memory_bytes

    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"^num_worst_tokens: .* more than int64 can count"):
        check_allocation("num_worst_tokens", "rows", INT64_LIMIT + 1, cpu)
    memory = device_memory_bytes(cpu)
    if memory is not None:
        with pytest.raises(ValueError, match=r"^num_experts: .* GiB, more than the .* GiB of memory on cpu"):
            check_allocation("num_experts", "counts", memory + 1, cpu)
    check_allocation("num_experts", "counts", 1 << 20, cpu)
