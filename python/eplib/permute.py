"""Expert-major permutation of dispatched rows, for grouped GEMMs.

``permute_by_expert`` copies row ``n`` of ``x`` once for every slot ``k`` with a local expert id
``e = topk_idx[n, k] >= 0`` into a block of rows per expert: experts ascending, inside one expert
the (row, slot) pairs in ascending order, each expert's block padded with zero rows to a multiple
of ``expert_alignment``. ``unpermute_by_expert`` is its weighted inverse: ``out[n] = sum_k
w[n, k] * y[pair_pos[n, k]]`` in fp32 (fp64 for float64), slots ascending. Both are differentiable
(each one's backward is the other, plus the gradient of the weights).

Native kernels do the work: the CPU kernels for CPU tensors, the CUDA kernels for CUDA tensors
(float32 and bfloat16; on the current stream, no device synchronisation beyond the one host read
of the row count when ``num_out_rows`` is 0). Index arithmetic: ``csrc/include/eplib/permute.h``.
"""

from typing import NamedTuple, Optional, Tuple

import torch

from . import _C
from ._dtypes import CUDA_KERNEL_DTYPES, INT32_LIMIT, KERNEL_DTYPE_CODES
from .transports.tensors import ptr
from .validation import check_int, check_tensor

Tensor = torch.Tensor

__all__ = ["PermuteHandle", "check_permute_errors", "permute_by_expert", "unpermute_by_expert"]


class PermuteHandle(NamedTuple):
    """What ``unpermute_by_expert`` needs from the ``permute_by_expert`` call it inverts."""

    pair_pos: Tensor  # int32 [N, K]: output row of pair (n, k); -1 for a masked slot (or a dropped pair)
    expert_offsets: Tensor  # int64 [E_local + 1]: first row of each expert's block; [-1] = aligned rows used
    num_out_rows: int  # M: rows of permuted_x
    num_tokens_per_expert: Tensor  # int64 [E_local]: pairs per expert (the rest of each block is padding)
    # CUDA only: int32 [1] error bits (_C.ERR_EXPERT_ID, _C.ERR_OVERFLOW) of a call with
    # num_out_rows > 0, which never waits for the device; check it with check_permute_errors.
    error_flag: Optional[Tensor] = None


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Weights and sums are float32, or float64 for float64 rows (as in the kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rows(name: str, rows) -> Tensor:
    if isinstance(rows, Tensor) and rows.is_cuda:
        dtypes = list(CUDA_KERNEL_DTYPES)
        if not _C.built_with_cuda():
            raise RuntimeError(f"{name}: a CUDA tensor, but eplib was built without CUDA (EPLIB_CUDA=1 builds it)")
    else:
        dtypes = list(KERNEL_DTYPE_CODES)
    rows = check_tensor(name, rows, dtypes, [None, None])
    if rows.shape[1] == 0:
        raise ValueError(f"{name}: expected a hidden size > 0, got shape {list(rows.shape)}")
    return rows


def _launch_on(tensor: Tensor, kernel, args) -> None:
    """kernel(args) on the current stream of ``tensor``'s device, with that device current for eplib's
    runtime during the launch (the C++ device guard of every _C.cuda_* call; it restores the previous
    device, so torch's current device does not change)."""
    kernel(args, tensor.device.index, torch.cuda.current_stream(tensor.device).cuda_stream)


def _raise_errors(bits: int, num_local_experts: int, num_out_rows: int) -> None:
    if bits & _C.ERR_EXPERT_ID:
        raise ValueError(f"topk_idx: an id is outside [-1, num_local_experts={num_local_experts})")
    if bits & _C.ERR_OVERFLOW:
        raise ValueError(f"num_out_rows: the permutation needs more than num_out_rows={num_out_rows} rows")


def check_permute_errors(handle: PermuteHandle) -> None:
    """Raises ValueError if the CUDA permutation behind ``handle`` met a bad expert id or ran out of
    rows (it then treated the id as -1, or dropped the pair). Waits for the device; a no-op on CPU."""
    if handle.error_flag is not None:
        _raise_errors(int(handle.error_flag.item()), handle.expert_offsets.shape[0] - 1, handle.num_out_rows)


def _layout(topk_idx: Tensor, num_local_experts: int, expert_alignment: int,
            num_out_rows: int) -> Tuple[Tensor, Tensor, Tensor, int, Optional[Tensor]]:
    """-> (pair_pos, expert_offsets, num_tokens_per_expert, M, error_flag)."""
    num_rows, num_topk = topk_idx.shape
    device = topk_idx.device
    pair_pos = torch.empty(num_rows, num_topk, dtype=torch.int32, device=device)
    expert_offsets = torch.empty(num_local_experts + 1, dtype=torch.int64, device=device)
    num_tokens_per_expert = torch.empty(num_local_experts, dtype=torch.int64, device=device)
    if not topk_idx.is_cuda:
        _C.permute_layout(topk_idx.data_ptr(), num_rows, num_topk, num_local_experts, expert_alignment, num_out_rows,
                          pair_pos.data_ptr(), expert_offsets.data_ptr(), num_tokens_per_expert.data_ptr())  # raises
        return pair_pos, expert_offsets, num_tokens_per_expert, num_out_rows or int(expert_offsets[-1]), None
    error_flag = torch.zeros(1, dtype=torch.int32, device=device)
    _launch_on(topk_idx, _C.cuda_permute_layout, _C.PermuteLayoutArgs(
        topk_idx=topk_idx.data_ptr(), num_rows=num_rows, num_topk=num_topk, num_local_experts=num_local_experts,
        expert_alignment=expert_alignment, num_out_rows=num_out_rows, pair_pos=pair_pos.data_ptr(),
        expert_offsets=expert_offsets.data_ptr(), num_tokens_per_expert=num_tokens_per_expert.data_ptr(),
        error_flag=error_flag.data_ptr()))
    if num_out_rows > 0:
        return pair_pos, expert_offsets, num_tokens_per_expert, num_out_rows, error_flag
    # The one host read: the row count, with the error bits in the same transfer.
    total, bits = torch.stack([expert_offsets[-1], error_flag[0].to(torch.int64)]).tolist()
    _raise_errors(bits, num_local_experts, num_out_rows)
    return pair_pos, expert_offsets, num_tokens_per_expert, total, None


# The CPU kernels' positional arguments are the CUDA argument structs' fields, in this order.
_PERMUTE_ROWS_FIELDS = ("dtype", "x", "num_rows", "hidden", "num_topk", "pair_pos", "topk_weights", "expert_offsets",
                        "num_tokens_per_expert", "num_local_experts", "num_out_rows", "out")
_UNPERMUTE_ROWS_FIELDS = ("dtype", "y", "num_in_rows", "hidden", "num_topk", "pair_pos", "topk_weights", "num_rows",
                          "out")


def _permute_rows(x: Tensor, pair_pos: Tensor, topk_weights: Optional[Tensor], expert_offsets: Tensor,
                  num_tokens_per_expert: Tensor, num_out_rows: int) -> Tensor:
    """out [M, H]: out[pair_pos[n, k]] = x[n] (times topk_weights[n, k] when given), padding zero."""
    num_rows, hidden = x.shape
    out = torch.empty(num_out_rows, hidden, dtype=x.dtype, device=x.device)
    args = (KERNEL_DTYPE_CODES[x.dtype], x.data_ptr(), num_rows, hidden, pair_pos.shape[1], pair_pos.data_ptr(),
            ptr(topk_weights), expert_offsets.data_ptr(),
            num_tokens_per_expert.data_ptr(), num_tokens_per_expert.shape[0], num_out_rows, out.data_ptr())
    if x.is_cuda:
        _launch_on(x, _C.cuda_permute_rows, _C.PermuteRowsArgs(**dict(zip(_PERMUTE_ROWS_FIELDS, args))))
    else:
        _C.permute_rows(*args)
    return out


def _unpermute_rows(y: Tensor, pair_pos: Tensor, topk_weights: Optional[Tensor]) -> Tensor:
    """out [N, H]: out[n] = sum_k w[n, k] * y[pair_pos[n, k]] (w = 1 without weights)."""
    num_rows, num_topk = pair_pos.shape
    out = torch.empty(num_rows, y.shape[1], dtype=y.dtype, device=y.device)
    args = (KERNEL_DTYPE_CODES[y.dtype], y.data_ptr(), y.shape[0], y.shape[1], num_topk, pair_pos.data_ptr(),
            ptr(topk_weights), num_rows, out.data_ptr())
    if y.is_cuda:
        _launch_on(y, _C.cuda_unpermute_rows, _C.UnpermuteRowsArgs(**dict(zip(_UNPERMUTE_ROWS_FIELDS, args))))
    else:
        _C.unpermute_rows(*args)
    return out


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, pair_pos: Tensor, expert_offsets: Tensor, num_tokens_per_expert: Tensor,
                num_out_rows: int) -> Tensor:
        ctx.save_for_backward(pair_pos)
        return _permute_rows(x, pair_pos, None, expert_offsets, num_tokens_per_expert, num_out_rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (pair_pos,) = ctx.saved_tensors
        # Row n went to every pair_pos[n, k]: its gradient is the sum of theirs (padding rows get none).
        return _unpermute_rows(grad_out.contiguous(), pair_pos, None), None, None, None, None


class _UnpermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, topk_weights: Optional[Tensor], pair_pos: Tensor, expert_offsets: Tensor,
                num_tokens_per_expert: Tensor) -> Tensor:
        ctx.save_for_backward(y, topk_weights, pair_pos, expert_offsets, num_tokens_per_expert)
        return _unpermute_rows(y, pair_pos, topk_weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        y, topk_weights, pair_pos, expert_offsets, num_tokens_per_expert = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            # d out[n] / d y[pair_pos[n, k]] = w[n, k]: the weighted permutation of grad_out.
            grad_y = _permute_rows(grad_out, pair_pos, topk_weights, expert_offsets, num_tokens_per_expert,
                                   y.shape[0])
        if ctx.needs_input_grad[1]:
            # d out[n] / d w[n, k] = y[pair_pos[n, k]]: dot(grad_out[n], y[pair_pos[n, k]]), 0 without a row.
            # Computed in the permuted layout, one dot per output row of y, so the extra memory is
            # [M, H] (an [N, K, H] gather would cost K times x).
            valid = (pair_pos >= 0) & (pair_pos < y.shape[0])
            acc_dtype = topk_weights.dtype
            grad_rows = _permute_rows(grad_out, pair_pos, None, expert_offsets, num_tokens_per_expert, y.shape[0])
            dots = (grad_rows.to(acc_dtype) * y.to(acc_dtype)).sum(-1)  # [M]
            # Slots without a row read an appended 0 (also right when M is 0).
            dots = torch.cat([dots, dots.new_zeros(1)])
            grad_w = dots[torch.where(valid, pair_pos.long(), y.shape[0])]
        return grad_y, grad_w, None, None, None


def permute_by_expert(x: Tensor, topk_idx: Tensor, num_local_experts: int, expert_alignment: int = 1,
                      num_out_rows: int = 0) -> Tuple[Tensor, Tensor, PermuteHandle]:
    """Groups the (row, slot) pairs of ``x`` by expert (differentiable in ``x``).

    Args:
        x: ``[N, H]`` contiguous; float32/bfloat16/float16/float64 on CPU, float32/bfloat16 on CUDA.
        topk_idx: int64 ``[N, K]`` local expert ids in ``[-1, num_local_experts)`` (as dispatch's
            ``recv_topk_idx``), on x's device; -1 = no expert here. An id outside raises ValueError
            (on CUDA: at the host read, or through ``check_permute_errors`` when num_out_rows > 0).
        num_local_experts: E_local >= 1.
        expert_alignment: each expert's block is padded with zero rows to a multiple of this.
        num_out_rows: 0: the output has exactly the aligned rows needed (one host read of the
            count on CUDA); > 0: it has this many rows, with zero rows past the last block, and the
            host never waits (needing more rows raises on CPU; on CUDA the pairs that do not fit are
            dropped and the handle's error_flag says so).

    Returns:
        ``(permuted_x [M, H], num_tokens_per_expert int64 [E_local] (pairs per expert, unaligned,
        on x's device), handle)``. Expert ``e``'s rows are ``permuted_x[handle.expert_offsets[e]:]``,
        ``num_tokens_per_expert[e]`` of them, then its padding.
    """
    x = _check_rows("x", x)
    topk_idx = check_tensor("topk_idx", topk_idx, [torch.int64], [x.shape[0], None], x.device)
    if topk_idx.shape[1] == 0:
        raise ValueError(f"topk_idx: expected at least one slot per row (K >= 1), got shape {list(topk_idx.shape)}")
    check_int("num_local_experts", num_local_experts, 1)
    check_int("expert_alignment", expert_alignment, 1)
    check_int("num_out_rows", num_out_rows, 0)
    # Positions are int32 in the kernels: the largest row count the layout may reach must fit.
    max_rows = max(num_out_rows, topk_idx.numel() + num_local_experts * (expert_alignment - 1))
    if max_rows > INT32_LIMIT:
        raise ValueError(f"topk_idx: the permutation may need up to {max_rows} rows (N*K plus the alignment "
                         f"padding, or num_out_rows); at most {INT32_LIMIT} fit int32 positions")
    pair_pos, expert_offsets, num_tokens_per_expert, num_rows_out, error_flag = _layout(
        topk_idx, num_local_experts, expert_alignment, num_out_rows)
    permuted_x = _PermuteRows.apply(x, pair_pos, expert_offsets, num_tokens_per_expert, num_rows_out)
    handle = PermuteHandle(pair_pos, expert_offsets, num_rows_out, num_tokens_per_expert, error_flag)
    return permuted_x, num_tokens_per_expert, handle


def unpermute_by_expert(y: Tensor, handle: PermuteHandle, topk_weights: Optional[Tensor] = None) -> Tensor:
    """The (weighted) inverse of ``permute_by_expert`` (differentiable in ``y`` and ``topk_weights``).

    Args:
        y: ``[M, H]`` contiguous, one row per row of the ``permuted_x`` that made ``handle`` (padding
            rows are ignored); same dtypes as ``permute_by_expert``'s x.
        handle: from that call.
        topk_weights: None (weight 1) or a float tensor ``[N, K]`` on y's device; used in float32
            (float64 for float64 y), its gradient comes back in its own dtype.

    Returns:
        ``[N, H]`` in y's dtype: ``out[n] = sum over k ascending with a row of w[n, k] *
        y[pair_pos[n, k]]``, accumulated in float32 (float64 for float64) from 0.
    """
    if not isinstance(handle, PermuteHandle):
        raise TypeError(f"handle: expected the PermuteHandle returned by permute_by_expert, "
                        f"got {type(handle).__name__}")
    y = _check_rows("y", y)
    if y.shape[0] != handle.num_out_rows or y.device != handle.pair_pos.device:
        raise ValueError(f"y: expected {handle.num_out_rows} rows (permuted_x of handle) on "
                         f"{handle.pair_pos.device}, got shape {list(y.shape)} on {y.device}")
    if topk_weights is not None:
        if not isinstance(topk_weights, Tensor) or not topk_weights.is_floating_point():
            raise TypeError(f"topk_weights: expected a float tensor of shape {list(handle.pair_pos.shape)}, got "
                            f"{getattr(topk_weights, 'dtype', type(topk_weights).__name__)}")
        if tuple(topk_weights.shape) != tuple(handle.pair_pos.shape) or topk_weights.device != y.device:
            raise ValueError(f"topk_weights: expected shape {list(handle.pair_pos.shape)} on {y.device}, got "
                             f"{list(topk_weights.shape)} on {topk_weights.device}")
        # A differentiable cast: the gradient returns in the caller's dtype.
        topk_weights = topk_weights.to(_accumulator_dtype(y.dtype)).contiguous()
    return _UnpermuteRows.apply(y, topk_weights, handle.pair_pos, handle.expert_offsets,
                                handle.num_tokens_per_expert)
