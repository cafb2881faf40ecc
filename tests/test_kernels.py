"""Single-process tests of the native CPU kernels (eplib._C) against plain torch.

The kernels take raw addresses, so these tests also pin down the memory layout contracts: send
positions, packed rows, and the fp32 summation order with its final rounding.
"""

import pytest
import torch

from eplib import _C
from eplib._dtypes import KERNEL_DTYPE_CODES


def torch_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    """Plain-torch layout: (tokens per rank, tokens per expert, is_token_in_rank)."""
    experts_per_rank = num_experts // num_ranks
    valid = topk_idx >= 0
    per_expert = torch.bincount(topk_idx[valid], minlength=num_experts).to(torch.int32)
    ranks = torch.where(valid, topk_idx // experts_per_rank, num_ranks)  # masked slots to a spare column
    in_rank = torch.zeros(topk_idx.shape[0], num_ranks + 1, dtype=torch.bool)
    in_rank.scatter_(1, ranks, True)
    in_rank = in_rank[:, :num_ranks].contiguous()
    return in_rank.sum(0).to(torch.int32), per_expert, in_rank


def native_layout(topk_idx: torch.Tensor, num_experts: int, num_ranks: int):
    num_tokens, num_topk = topk_idx.shape
    per_rank = torch.empty(num_ranks, dtype=torch.int32)
    per_expert = torch.empty(num_experts, dtype=torch.int32)
    in_rank = torch.empty(num_tokens, num_ranks, dtype=torch.bool)
    _C.dispatch_layout(topk_idx.data_ptr(), num_tokens, num_topk, num_experts, num_ranks, per_rank.data_ptr(),
                       per_expert.data_ptr(), in_rank.data_ptr())
    return per_rank, per_expert, in_rank


@pytest.mark.parametrize("num_tokens", [0, 1, 5000])
@pytest.mark.parametrize("num_experts,num_ranks,num_topk", [(64, 4, 8), (8, 8, 1), (6, 2, 3)])
def test_layout_matches_torch(threads, num_tokens, num_experts, num_ranks, num_topk):
    generator = torch.Generator().manual_seed(num_tokens + num_experts)
    topk_idx = torch.randint(-1, num_experts, (num_tokens, num_topk), generator=generator)
    for native, expected in zip(native_layout(topk_idx, num_experts, num_ranks),
                                torch_layout(topk_idx, num_experts, num_ranks)):
        assert torch.equal(native, expected)


@pytest.mark.parametrize("bad", [64, -2])
def test_layout_rejects_out_of_range_ids(bad):
    topk_idx = torch.zeros(10, 2, dtype=torch.int64)
    topk_idx[7, 1] = bad
    with pytest.raises(ValueError, match=r"topk_idx\[7, 1\] = %d is outside \[-1, num_experts=64\)" % bad):
        native_layout(topk_idx, 64, 4)


@pytest.mark.parametrize("num_tokens", [0, 3, 9000])
def test_send_positions_group_by_rank_then_token(threads, num_tokens):
    num_ranks = 4
    generator = torch.Generator().manual_seed(num_tokens)
    in_rank = torch.rand(num_tokens, num_ranks, generator=generator) < 0.4
    send_pos = torch.empty(num_tokens, num_ranks, dtype=torch.int32)
    counts = torch.empty(num_ranks, dtype=torch.int32)
    _C.send_positions(in_rank.data_ptr(), num_tokens, num_ranks, send_pos.data_ptr(), counts.data_ptr())
    assert torch.equal(counts, in_rank.sum(0).to(torch.int32))
    # Expected: enumerate (rank, token) pairs in rank-major order.
    expected = torch.full((num_tokens, num_ranks), -1, dtype=torch.int32)
    ranks, tokens = in_rank.t().nonzero(as_tuple=True)
    expected[tokens, ranks] = torch.arange(tokens.numel(), dtype=torch.int32)
    assert torch.equal(send_pos, expected)


def combine_two(a: torch.Tensor, b: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """combine_reduce with bias = a and one returned row = b per token: the kernel computes
    cast(0 + float(a) + float(b)), which must round exactly like torch."""
    num_tokens, hidden = a.shape
    send_pos = torch.full((num_tokens, num_ranks), -1, dtype=torch.int32)
    send_pos[:, num_ranks - 1] = torch.arange(num_tokens, dtype=torch.int32)
    out = torch.empty_like(a)
    _C.combine_reduce(KERNEL_DTYPE_CODES[a.dtype], b.data_ptr(), hidden, 0, send_pos.data_ptr(), num_tokens,
                      num_ranks, a.data_ptr(), 0, out.data_ptr(), 0)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduction_rounds_like_torch_for_every_bit_pattern(threads, dtype):
    """Every 16-bit pattern (normals, subnormals, zeros, inf, NaN) as a, against random and special b."""
    a = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)
    generator = torch.Generator().manual_seed(0)
    for b_bits in (torch.randint(-32768, 32768, (256, 256), dtype=torch.int32, generator=generator),
                   a.view(torch.int16).flip(0).to(torch.int32)):
        b = b_bits.to(torch.int16).view(dtype)
        expected = (a.float() + b.float()).to(dtype)
        got = combine_two(a, b, num_ranks=1)
        same = (got.view(torch.int16) == expected.view(torch.int16)) | (got.isnan() & expected.isnan())
        assert bool(same.all()), f"first mismatch at {same.logical_not().nonzero()[0].tolist()}"


def test_fp16_rounding_near_boundaries(threads):
    """fp16 sums that land exactly between fp16 neighbours or on the overflow threshold."""
    pairs = [(65504.0, 8.0), (65504.0, 16.0), (-65504.0, -16.0), (65504.0, 15.0), (1.0, 2.0 ** -11),
             (1.0 + 2.0 ** -10, 2.0 ** -11), (2.0 ** -14, -(2.0 ** -24)), (2.0 ** -24, -(2.0 ** -24))]
    a = torch.tensor([[p[0]] for p in pairs], dtype=torch.float16)
    b = torch.tensor([[p[1]] for p in pairs], dtype=torch.float16)
    got = combine_two(a, b, num_ranks=1)
    assert torch.equal(got.view(torch.int16), (a.float() + b.float()).to(torch.float16).view(torch.int16))
    assert got[1].isinf() and got[2].isinf() and got[0].item() == 65504.0 and got[4].item() == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_reduction_order_is_bias_then_ranks_ascending(threads, dtype):
    """Addition is not associative: the kernel must add bias_0, bias_1, then rank 0, 1, ... in
    fp32 (fp64 for fp64 data, which fp32 accumulation would round)."""
    num_tokens, hidden, num_ranks = 64, 33, 3
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randn(num_tokens, hidden, generator=generator).mul(1e4 ** (r % 2)).to(dtype) for r in range(num_ranks)]
    biases = [torch.randn(num_tokens, hidden, generator=generator).mul(1e-3).to(dtype) for _ in range(2)]
    present = torch.rand(num_tokens, num_ranks, generator=generator) < 0.7
    send_pos = torch.full((num_tokens, num_ranks), -1, dtype=torch.int32)
    received = []
    for r in range(num_ranks):  # the receive region holds rank 0's rows, then rank 1's, ...
        tokens = present[:, r].nonzero().flatten()
        send_pos[tokens, r] = torch.arange(tokens.numel(), dtype=torch.int32) + sum(t.shape[0] for t in received)
        received.append(rows[r][tokens])
    recv_buffer = torch.cat(received).contiguous()
    out = torch.empty(num_tokens, hidden, dtype=dtype)
    _C.combine_reduce(KERNEL_DTYPE_CODES[dtype], recv_buffer.data_ptr(), hidden, 0, send_pos.data_ptr(), num_tokens,
                      num_ranks, biases[0].data_ptr(), biases[1].data_ptr(), out.data_ptr(), 0)
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.zeros(num_tokens, hidden, dtype=acc_dtype)
    expected += biases[0].to(acc_dtype)
    expected += biases[1].to(acc_dtype)
    for r in range(num_ranks):
        expected[present[:, r]] += rows[r][present[:, r]].to(acc_dtype)
    assert torch.equal(out, expected.to(dtype))


@pytest.mark.parametrize("x_bytes,scales_bytes,num_topk", [(4096, 0, 8), (7, 0, 0), (256, 8, 3), (18, 0, 1)])
def test_packed_rows_are_16_byte_aligned(x_bytes, scales_bytes, num_topk):
    stride = _C.dispatch_row_stride(x_bytes, scales_bytes, num_topk)
    minimum = x_bytes + scales_bytes + 4 + 8 * num_topk
    assert stride % 16 == 0 and minimum <= stride < minimum + 3 * 16
    assert _C.combine_row_stride(x_bytes, 0) == x_bytes
    if num_topk:
        assert _C.combine_row_stride(x_bytes, num_topk) % 16 == 0


def test_pack_then_unpack_round_trips_rows_and_metadata(threads):
    num_tokens, hidden, num_topk, num_experts, num_ranks = 300, 40, 4, 16, 4
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(num_tokens, hidden, generator=generator).to(torch.bfloat16)
    topk_idx = torch.randint(-1, num_experts, (num_tokens, num_topk), generator=generator)
    topk_weights = torch.rand(num_tokens, num_topk, generator=generator)
    _, _, in_rank = torch_layout(topk_idx, num_experts, num_ranks)
    send_pos = torch.empty(num_tokens, num_ranks, dtype=torch.int32)
    counts = torch.empty(num_ranks, dtype=torch.int32)
    _C.send_positions(in_rank.data_ptr(), num_tokens, num_ranks, send_pos.data_ptr(), counts.data_ptr())
    rows = int(counts.sum())
    stride = _C.dispatch_row_stride(hidden * 2, 0, num_topk)
    buffer = torch.empty(rows * stride, dtype=torch.uint8)
    _C.dispatch_pack(x.data_ptr(), hidden * 2, 0, 0, 0, 0, topk_idx.data_ptr(), topk_weights.data_ptr(), num_topk,
                     num_experts, send_pos.data_ptr(), num_tokens, num_ranks, buffer.data_ptr())
    recv_x = torch.empty(rows, hidden, dtype=torch.bfloat16)
    recv_src = torch.empty(rows, dtype=torch.int32)
    recv_idx = torch.empty(rows, num_topk, dtype=torch.int64)
    recv_w = torch.empty(rows, num_topk, dtype=torch.float32)
    # Unpacking everything as if one rank had received it: ids of all ranks' regions are counted.
    experts_per_rank = num_experts // num_ranks
    per_expert = torch.empty(experts_per_rank, dtype=torch.int64)
    _C.dispatch_unpack(buffer.data_ptr(), rows, hidden * 2, 0, num_topk, experts_per_rank, recv_x.data_ptr(), 0,
                       recv_src.data_ptr(), recv_idx.data_ptr(), recv_w.data_ptr(), per_expert.data_ptr())
    valid = topk_idx[topk_idx >= 0]
    assert torch.equal(per_expert, torch.bincount(valid % experts_per_rank, minlength=experts_per_rank))
    for rank in range(num_ranks):
        tokens = in_rank[:, rank].nonzero().flatten()
        region = slice(int(counts[:rank].sum()), int(counts[:rank + 1].sum()))
        assert torch.equal(recv_src[region], tokens.to(torch.int32))
        assert torch.equal(recv_x[region], x[tokens])
        local = topk_idx[tokens] - rank * experts_per_rank
        mine = (local >= 0) & (local < experts_per_rank)
        assert torch.equal(recv_idx[region], torch.where(mine, local, -1))
        assert torch.equal(recv_w[region], torch.where(mine, topk_weights[tokens], 0.0))


@pytest.mark.parametrize("bad_weight,message", [(float("nan"), "not finite"), (float("inf"), "not finite")])
def test_pack_rejects_non_finite_weights(bad_weight, message):
    topk_idx = torch.tensor([[0, 1], [1, -1]])
    topk_weights = torch.ones(2, 2)
    topk_weights[1, 1] = bad_weight
    send_pos = torch.tensor([[0], [1]], dtype=torch.int32)
    x = torch.zeros(2, 4)
    buffer = torch.empty(2 * _C.dispatch_row_stride(16, 0, 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"topk_weights\[1, 1\] = .* " + message):
        _C.dispatch_pack(x.data_ptr(), 16, 0, 0, 0, 0, topk_idx.data_ptr(), topk_weights.data_ptr(), 2, 2,
                         send_pos.data_ptr(), 2, 1, buffer.data_ptr())


def test_pack_rejects_expert_on_rank_not_marked():
    topk_idx = torch.tensor([[0, 3]])  # expert 3 lives on rank 1 of 2
    send_pos = torch.tensor([[0, -1]], dtype=torch.int32)
    x = torch.zeros(1, 4)
    buffer = torch.empty(_C.dispatch_row_stride(16, 0, 2), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"lives on rank 1, but is_token_in_rank\[0, 1\] is False"):
        _C.dispatch_pack(x.data_ptr(), 16, 0, 0, 0, 0, topk_idx.data_ptr(), torch.ones(1, 2).data_ptr(), 2, 4,
                         send_pos.data_ptr(), 1, 2, buffer.data_ptr())


def test_cuda_queries_work_without_a_gpu():
    assert isinstance(_C.built_with_cuda(), bool)
    status = _C.cuda_device_status()
    assert set(status) == {"device_count", "error", "driver_version", "runtime_version", "cpu_execution"}
    assert status["device_count"] >= 0 and status["cpu_execution"] == _C.cuda_cpu_execution()
    # cuda_available: kernels run on a GPU here; never for the CPU execution, which has no GPU.
    assert _C.cuda_available() == (_C.built_with_cuda() and not _C.cuda_cpu_execution()
                                   and status["device_count"] > 0)
    if not torch.cuda.is_available():
        assert not _C.cuda_available()


def test_cuda_part_is_compiled_when_requested():
    """A build with EPLIB_CUDA=1 (nvcc) or EPLIB_CUDA_CPU=1 must really contain the CUDA sources."""
    import os

    if os.environ.get("EPLIB_CUDA_CPU") == "1":
        assert _C.built_with_cuda() and _C.cuda_cpu_execution()
    elif os.environ.get("EPLIB_CUDA") == "1":
        assert _C.built_with_cuda() and not _C.cuda_cpu_execution()
        assert _C.cuda_device_status()["runtime_version"] >= 11000
    else:
        pytest.skip("neither EPLIB_CUDA=1 nor EPLIB_CUDA_CPU=1 set for this build")
