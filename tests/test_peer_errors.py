"""Errors that only some ranks see, or that only show across ranks: every rank must raise together,
promptly (no waiting for EPLIB_TIMEOUT_S), and the group must stay usable afterwards."""

import re
import time

import pytest

from dist_harness import eplib_timeout, make_payload, make_topk_idx, make_topk_weights

# name -> (what the odd rank does differently, argument the ValueError must name on the ranks that raise it)
MISMATCHES = {
    "nan_weight_on_last_rank": "topk_weights",
    "top_k_differs": "topk_idx",
    "dtype_differs_same_width": "x",
    "hidden_differs": "x",
    "num_experts_differs": "num_tokens_per_expert",
    "fp8_scales_dtype_differs": "x[1]",
    "cached_fp8_scales_dtype_differs": "x[1]",  # in a cached dispatch after an agreeing one
}


def job_mismatch(rank, R, group, name, timeout_s: float = 20):
    """Rank R-1 differs from the others as `name` says; then every rank dispatches valid input. Runs with
    EPLIB_TIMEOUT_S=timeout_s, restored after: a hang shows as a slow test, well before the pool's limit."""
    with eplib_timeout(timeout_s):
        return _run_mismatch(rank, R, group, name)


def _run_mismatch(rank, R, group, name):
    """job_mismatch inside its EPLIB_TIMEOUT_S: (dispatch outcome, seconds it took, group recovered)."""
    import eplib
    import torch

    odd = rank == R - 1
    T, H, K, E = 12, 16, 2, 2 * R
    if name == "top_k_differs" and odd:
        K = 3
    if name == "hidden_differs" and odd:
        H = 24
    if name == "num_experts_differs" and odd:
        E = 4 * R
    dtype = "fp16" if (name == "dtype_differs_same_width" and odd) else "bf16"
    buf = eplib.Buffer(group)
    idx, w = make_topk_idx(7, rank, T, K, E, "uniform"), make_topk_weights(7, rank, T, K)
    if name == "nan_weight_on_last_rank" and odd:
        w[5, 1] = float("nan")
    x = make_payload(7, rank, T, H, dtype)
    if name.endswith("fp8_scales_dtype_differs"):  # float32 scales here, int32 (UE8M0) ones of the same count there
        values, scales = make_payload(7, rank, T, H, "fp8")
        x = (values, scales.view(torch.int32) if odd else scales)
    lay = buf.get_dispatch_layout(idx, E)
    dispatch_args = dict(num_tokens_per_rank=lay[0], is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                         topk_idx=idx, topk_weights=w)
    if name.startswith("cached_"):
        dispatch_args = dict(handle=buf.dispatch((values, scales), **dispatch_args)[4])
    start = time.monotonic()
    try:
        buf.dispatch(x, **dispatch_args)
        outcome = None
    except Exception as error:  # noqa: BLE001 - the test inspects it
        outcome = ([c.__name__ for c in type(error).__mro__], str(error))
    elapsed = time.monotonic() - start

    # The group is still in step: a valid dispatch and combine work on every rank.
    T, H, K, E = 5, 8, 2, 2 * R
    idx, w = make_topk_idx(8, rank, T, K, E, "uniform"), make_topk_weights(8, rank, T, K)
    x = make_payload(8, rank, T, H, "fp32")
    lay = buf.get_dispatch_layout(idx, E)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=lay[0], is_token_in_rank=lay[3],
                                              num_tokens_per_expert=lay[2], topk_idx=idx, topk_weights=w)
    combined, _, _ = buf.combine(recv_x, handle)
    recovered = torch.equal(combined, x * lay[3].sum(1, keepdim=True))
    return outcome, elapsed, recovered


def check_mismatch_results(results, name: str, max_seconds: float) -> None:
    """job_mismatch's results: every rank raised (ValueError naming the argument; RuntimeError on the
    innocent ranks of a bad-value case) within max_seconds, and the group works after."""
    world_size = len(results)
    for rank, (outcome, elapsed, recovered) in enumerate(results):
        assert outcome is not None, f"rank {rank}: dispatch did not raise"
        mro, message = outcome
        if name == "nan_weight_on_last_rank" and rank != world_size - 1:
            # The peers did nothing wrong: they learn that rank R-1 rejected its input.
            assert "RuntimeError" in mro and re.search(rf"\[{world_size - 1}\]|rank {world_size - 1} ", message), \
                f"rank {rank}: {outcome}"
        else:
            assert mro[0] == "ValueError" and message.startswith(MISMATCHES[name]), f"rank {rank}: {outcome}"
        assert elapsed < max_seconds, f"rank {rank} took {elapsed:.1f} s to raise"
        assert recovered, f"rank {rank}: the group did not recover"


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_mismatch_raises_on_every_rank_and_group_recovers(pool, name):
    results = pool.run(job_mismatch, name, timeout=90)
    check_mismatch_results(results, name, max_seconds=10)
    if name == "nan_weight_on_last_rank":  # the cpu transport quotes the failing rank's error
        for mro, message in (outcome for outcome, _, _ in results[:-1]):
            assert "PeerInputError" in mro, (mro, message)
            assert f"rank {len(results) - 1} in dispatch: ValueError: topk_weights" in message, message
