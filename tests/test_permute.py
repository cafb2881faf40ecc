"""eplib.permute_by_expert / unpermute_by_expert on CPU against a plain-torch float64 reference.

Integer-coded payloads (small integers, dyadic weights) make every kernel result exact in every
dtype, so a misplaced row or a wrong padding row fails torch.equal. Random data checks the
summation order against torch's own fp32 arithmetic; gradcheck covers both backwards in float64.
"""

import pytest
import torch

import eplib

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def reference_layout(topk_idx, num_local_experts, alignment):
    """(pair_pos int32 [N, K], expert_offsets int64 [E + 1], counts int64 [E]) by a stable sort."""
    num_rows, num_topk = topk_idx.shape
    flat = topk_idx.reshape(-1)
    pairs = (flat >= 0).nonzero().flatten()  # (row, slot) order
    experts = flat[pairs]
    order = torch.sort(experts, stable=True).indices
    counts = torch.bincount(experts, minlength=num_local_experts)
    aligned = (counts + alignment - 1) // alignment * alignment
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), aligned.cumsum(0)])
    unaligned_starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    sorted_experts = experts[order]
    rank_in_expert = torch.arange(order.numel()) - unaligned_starts[sorted_experts]
    pair_pos = torch.full((num_rows * num_topk,), -1, dtype=torch.int64)
    pair_pos[pairs[order]] = offsets[sorted_experts] + rank_in_expert
    return pair_pos.reshape(num_rows, num_topk).to(torch.int32), offsets, counts


def reference_permute(x, pair_pos, num_out_rows):
    out = torch.zeros(num_out_rows, x.shape[1], dtype=torch.float64)
    rows, slots = (pair_pos >= 0).nonzero(as_tuple=True)
    out[pair_pos[rows, slots].long()] = x[rows].double()
    return out.to(x.dtype)


def reference_unpermute(y, pair_pos, weights, acc_dtype=torch.float64):
    """Sum over slots ascending from 0, in acc_dtype."""
    out = torch.zeros(pair_pos.shape[0], y.shape[1], dtype=acc_dtype)
    for k in range(pair_pos.shape[1]):
        valid = pair_pos[:, k] >= 0
        term = y[pair_pos[valid, k].long()].to(acc_dtype)
        if weights is not None:
            term = weights[valid, k, None].to(acc_dtype) * term
        out[valid] = out[valid] + term
    return out.to(y.dtype)


def integer_rows(num_rows, hidden, dtype, generator):
    """Rows whose column 0 is the row index and the rest small integers: exact in every dtype."""
    x = torch.randint(-4, 5, (num_rows, hidden), generator=generator).to(torch.float64)
    x[:, 0] = torch.arange(num_rows) % 256
    return x.to(dtype)


def make_topk_idx(num_rows, num_topk, num_local_experts, generator, masked=0.3, empty_expert=None):
    idx = torch.randint(0, num_local_experts, (num_rows, num_topk), generator=generator)
    idx[torch.rand(num_rows, num_topk, generator=generator) < masked] = -1
    if empty_expert is not None:
        idx[idx == empty_expert] = -1
    return idx


CASES = {
    "plain": dict(N=50, K=4, E=6, alignment=1),
    "aligned": dict(N=50, K=4, E=6, alignment=8),
    "empty_expert": dict(N=40, K=3, E=5, alignment=4, empty_expert=2),
    "all_masked": dict(N=9, K=2, E=3, alignment=4, masked=1.0),
    "no_rows": dict(N=0, K=2, E=3, alignment=4),
    "one_expert_K1": dict(N=17, K=1, E=1, alignment=1, masked=0.0),
    "fixed_rows": dict(N=30, K=2, E=4, alignment=2, extra_rows=13),
    "many_rows": dict(N=3000, K=8, E=32, alignment=16),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_permute_and_unpermute_match_reference(threads, name, dtype):
    case = CASES[name]
    generator = torch.Generator().manual_seed(len(name))
    idx = make_topk_idx(case["N"], case["K"], case["E"], generator, case.get("masked", 0.3), case.get("empty_expert"))
    x = integer_rows(case["N"], 12, dtype, generator)
    want_pos, want_offsets, want_counts = reference_layout(idx, case["E"], case["alignment"])
    num_out_rows = int(want_offsets[-1]) + case["extra_rows"] if "extra_rows" in case else 0

    permuted, counts, handle = eplib.permute_by_expert(x, idx, case["E"], case["alignment"], num_out_rows)
    assert torch.equal(handle.pair_pos, want_pos)
    assert torch.equal(handle.expert_offsets, want_offsets)
    assert torch.equal(counts, want_counts) and torch.equal(handle.num_tokens_per_expert, want_counts)
    rows = num_out_rows or int(want_offsets[-1])
    assert handle.num_out_rows == rows and handle.error_flag is None
    assert permuted.dtype == dtype and torch.equal(permuted, reference_permute(x, want_pos, rows))

    # Dyadic weights in [0.5, 2]: every product and sum is exact, so the float64 reference is too.
    weights = torch.randint(1, 5, idx.shape, generator=generator).to(torch.float32) / 2
    y = integer_rows(rows, 12, dtype, generator)
    assert torch.equal(eplib.unpermute_by_expert(y, handle), reference_unpermute(y, want_pos, None))
    assert torch.equal(eplib.unpermute_by_expert(y, handle, weights), reference_unpermute(y, want_pos, weights))


def test_permute_then_unpermute_counts_each_row_once_per_slot(threads):
    generator = torch.Generator().manual_seed(3)
    idx = make_topk_idx(64, 4, 8, generator)
    x = integer_rows(64, 16, torch.float32, generator)
    permuted, _, handle = eplib.permute_by_expert(x, idx, 8, expert_alignment=4)
    slots = (idx >= 0).sum(1, keepdim=True).to(torch.float32)
    assert torch.equal(eplib.unpermute_by_expert(permuted, handle), x * slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_unpermute_sums_in_fp32_slots_ascending(threads, dtype):
    """Random data: the result is torch's own fp32 sum over slots 0, 1, ... (then one cast)."""
    generator = torch.Generator().manual_seed(4)
    idx = make_topk_idx(200, 6, 5, generator)
    x = torch.randn(200, 40, generator=generator).to(dtype)
    _, _, handle = eplib.permute_by_expert(x, idx, 5, expert_alignment=4)
    y = (torch.randn(handle.num_out_rows, 40, generator=generator) * 100).to(dtype)
    weights = torch.rand(idx.shape, generator=generator)
    got = eplib.unpermute_by_expert(y, handle, weights)
    assert torch.equal(got, reference_unpermute(y, handle.pair_pos, weights, acc_dtype=torch.float32))
    close = reference_unpermute(y, handle.pair_pos, weights).to(torch.float64)
    torch.testing.assert_close(got.double(), close, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-3)


def test_gradcheck_float64():
    generator = torch.Generator().manual_seed(5)
    idx = make_topk_idx(7, 3, 4, generator, empty_expert=1)
    idx[2] = -1  # a row with no expert
    idx[3] = torch.tensor([2, 2, -1])  # one expert twice
    x = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)

    def permute(x):
        return eplib.permute_by_expert(x, idx, 4, expert_alignment=4)[0]

    assert torch.autograd.gradcheck(permute, (x,))
    _, _, handle = eplib.permute_by_expert(x.detach(), idx, 4, expert_alignment=4)
    y = torch.randn(handle.num_out_rows, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.rand(7, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: eplib.unpermute_by_expert(y, handle, w), (y, w))
    assert torch.autograd.gradcheck(lambda y: eplib.unpermute_by_expert(y, handle), (y,))


def test_backward_in_float32_weights_and_padding():
    """Gradients of y are zero on padding rows; gradients of weights are zero on masked slots and
    come back in the weights' own dtype."""
    idx = torch.tensor([[0, 1], [1, -1], [0, 0]])
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    _, _, handle = eplib.permute_by_expert(x, idx, 2, expert_alignment=4)  # rows 0-2 expert 0, 4-5 expert 1
    y = torch.arange(16.0).reshape(8, 2).requires_grad_()
    w = torch.tensor([[0.5, 2.0], [1.0, 3.0], [0.25, 4.0]], dtype=torch.bfloat16, requires_grad=True)
    out = eplib.unpermute_by_expert(y, handle, w)
    out.backward(torch.ones_like(out))
    pos = handle.pair_pos.tolist()
    assert pos == [[0, 4], [5, -1], [1, 2]]
    want_grad_y = torch.zeros(8, 2)
    for n in range(3):
        for k in range(2):
            if pos[n][k] >= 0:
                want_grad_y[pos[n][k]] = w[n, k].float()
    assert torch.equal(y.grad, want_grad_y)
    assert w.grad.dtype == torch.bfloat16
    want_grad_w = torch.tensor([[0.0 + 1.0, 8.0 + 9.0], [10.0 + 11.0, 0.0], [2.0 + 3.0, 4.0 + 5.0]])
    assert torch.equal(w.grad.float(), want_grad_w)


def test_fixed_rows_too_small_raises():
    idx = torch.tensor([[0, 1], [1, 1]])
    with pytest.raises(ValueError, match=r"num_out_rows: the permutation needs 8 rows \(expert_alignment=4\), "
                                         r"more than num_out_rows=7"):
        eplib.permute_by_expert(torch.zeros(2, 3), idx, 2, expert_alignment=4, num_out_rows=7)


@pytest.mark.parametrize("bad", [3, -2])
def test_out_of_range_id_raises(bad):
    idx = torch.zeros(5, 2, dtype=torch.int64)
    idx[4, 1] = bad
    with pytest.raises(ValueError, match=r"topk_idx\[4, 1\] = %d is outside \[-1, num_local_experts=3\)" % bad):
        eplib.permute_by_expert(torch.zeros(5, 3), idx, 3)


def _bad_calls():
    x = torch.zeros(4, 3)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    _, _, handle = eplib.permute_by_expert(x, idx, 2)
    return {
        "x_int": (TypeError, r"^x: expected a torch.float32 or .* got torch.int32",
                  lambda: eplib.permute_by_expert(x.int(), idx, 2)),
        "x_1d": (ValueError, r"^x: expected", lambda: eplib.permute_by_expert(x[0], idx, 2)),
        "x_non_contiguous": (ValueError, r"^x: expected a contiguous", lambda: eplib.permute_by_expert(x.t(), idx, 2)),
        "topk_idx_int32": (TypeError, r"^topk_idx: expected a torch.int64", lambda: eplib.permute_by_expert(
            x, idx.int(), 2)),
        "topk_idx_rows": (ValueError, r"^topk_idx: expected .*\[4, \*\]", lambda: eplib.permute_by_expert(
            x, idx[:3], 2)),
        "topk_idx_K0": (ValueError, r"^topk_idx: expected at least one slot", lambda: eplib.permute_by_expert(
            x, idx[:, :0].contiguous(), 2)),
        "num_local_experts_0": (ValueError, r"^num_local_experts", lambda: eplib.permute_by_expert(x, idx, 0)),
        "num_local_experts_float": (TypeError, r"^num_local_experts", lambda: eplib.permute_by_expert(x, idx, 2.0)),
        "alignment_0": (ValueError, r"^expert_alignment", lambda: eplib.permute_by_expert(x, idx, 2, 0)),
        "num_out_rows_negative": (ValueError, r"^num_out_rows", lambda: eplib.permute_by_expert(x, idx, 2, 1, -1)),
        "handle_tuple": (TypeError, r"^handle: expected the PermuteHandle", lambda: eplib.unpermute_by_expert(
            x, tuple(handle))),
        "y_rows": (ValueError, r"^y: expected 8 rows", lambda: eplib.unpermute_by_expert(x, handle)),
        "y_dtype": (TypeError, r"^y: expected", lambda: eplib.unpermute_by_expert(
            torch.zeros(8, 3, dtype=torch.int64), handle)),
        "weights_int": (TypeError, r"^topk_weights: expected a float tensor", lambda: eplib.unpermute_by_expert(
            torch.zeros(8, 3), handle, idx)),
        "weights_shape": (ValueError, r"^topk_weights: expected shape \[4, 2\]", lambda: eplib.unpermute_by_expert(
            torch.zeros(8, 3), handle, torch.ones(4, 3))),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_arguments_raise_naming_the_argument(name):
    error, pattern, call = _bad_calls()[name]
    with pytest.raises(error, match=pattern):
        call()
