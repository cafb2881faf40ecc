"""eplib._C's CUDA kernels called with tensors.

The ``*_args`` functions build the argument struct of a kernel (``_C.<Name>Args``, csrc/cuda/kernels.h)
from tensors; ``CudaKernels`` launches them on a device context's current stream, with the context's
device current for the launch (the C++ device guard restores the previous one). The ipc transport
hands the row kernels' structs to ``_C.IpcBuffer.dispatch`` / ``combine`` instead, which own its
round sequence.

Every kernel runs on the current stream and ORs problems it finds into ``error_flag`` (int32 [1] on
the device) instead of failing; none synchronizes or allocates.
"""

from typing import Callable, Optional, Sequence

import torch

from .. import _C
from .._dtypes import KERNEL_DTYPE_CODES
from .tensors import ptr, row_bytes, scale_strides

Tensor = torch.Tensor


def dispatch_pack_args(x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor],
                       topk_weights: Optional[Tensor], num_experts: int, send_pos: Tensor,
                       send_buffer: Optional[Tensor], error_flag: Tensor, *,
                       rank_prefix_matrix: Optional[Tensor] = None, slot_rows: int = 0) -> "_C.DispatchPackArgs":
    """Rows of x [T, H] (and scales [T, S], read through their strides; source index, ids [T, K], weights
    [T, K]) to their send_pos [T, R] rows of send_buffer (uint8; nccl), or (ipc) of the destinations'
    regions, placed by the device int32 [R, R] rank_prefix_matrix or by slots of slot_rows rows."""
    num_tokens, num_ranks = send_pos.shape
    scales_token_stride, scales_column_stride = scale_strides(x_scales)
    return _C.DispatchPackArgs(
        x=ptr(x), x_bytes=row_bytes(x), x_scales=ptr(x_scales), scales_bytes=row_bytes(x_scales),
        scales_token_stride=scales_token_stride, scales_column_stride=scales_column_stride,
        topk_idx=ptr(topk_idx), topk_weights=ptr(topk_weights),
        num_topk=topk_idx.shape[1] if topk_idx is not None else 0, num_experts=num_experts,
        send_pos=send_pos.data_ptr(), num_tokens=num_tokens, num_ranks=num_ranks, slot_rows=slot_rows,
        rank_prefix_matrix=ptr(rank_prefix_matrix), send_buffer=ptr(send_buffer), error_flag=error_flag.data_ptr())


def dispatch_unpack_args(recv_buffer: Optional[Tensor], recv_counts: Tensor, slot_rows: int, x_bytes: int,
                         scales_bytes: int, num_topk: int, num_local_experts: int, recv_x: Tensor,
                         recv_x_scales: Optional[Tensor], recv_src_idx: Tensor, recv_topk_idx: Optional[Tensor],
                         recv_topk_weights: Optional[Tensor], num_recv_out: Optional[Tensor],
                         error_flag: Tensor) -> "_C.DispatchUnpackArgs":
    """Received rows (recv_buffer; the own region for ipc) -> compacted outputs in source order, padded to
    recv_x's rows (zeros, -1 indices). recv_counts: device int32 [R]. num_recv_out: int32 [1]."""
    return _C.DispatchUnpackArgs(
        recv_buffer=ptr(recv_buffer), recv_counts=recv_counts.data_ptr(), num_ranks=recv_counts.shape[0],
        slot_rows=slot_rows, num_out_rows=recv_x.shape[0], x_bytes=x_bytes, scales_bytes=scales_bytes,
        num_topk=num_topk, num_local_experts=num_local_experts, recv_x=recv_x.data_ptr(),
        recv_x_scales=ptr(recv_x_scales), recv_src_idx=recv_src_idx.data_ptr(), recv_topk_idx=ptr(recv_topk_idx),
        recv_topk_weights=ptr(recv_topk_weights), num_recv_out=ptr(num_recv_out), error_flag=error_flag.data_ptr())


def combine_pack_args(x: Tensor, topk_weights: Optional[Tensor], recv_counts: Tensor, slot_rows: int,
                      send_buffer: Optional[Tensor]) -> "_C.CombinePackArgs":
    """Expert outputs x [N, H] (and weights [N, K]) -> combine rows at their source's place."""
    return _C.CombinePackArgs(
        x=x.data_ptr(), x_bytes=row_bytes(x), topk_weights=ptr(topk_weights),
        num_topk=topk_weights.shape[1] if topk_weights is not None else 0, recv_counts=recv_counts.data_ptr(),
        num_ranks=recv_counts.shape[0], slot_rows=slot_rows, num_rows=x.shape[0],
        send_buffer=ptr(send_buffer))


def combine_reduce_args(recv_buffer: Optional[Tensor], send_pos: Tensor, bias_0: Optional[Tensor],
                        bias_1: Optional[Tensor], combined_x: Tensor,
                        combined_topk_weights: Optional[Tensor]) -> "_C.CombineReduceArgs":
    """Per token: bias, then its rows from ranks 0..R-1 in order, summed in fp32, cast to x's dtype."""
    num_tokens, num_ranks = send_pos.shape
    return _C.CombineReduceArgs(
        dtype=KERNEL_DTYPE_CODES[combined_x.dtype], recv_buffer=ptr(recv_buffer), hidden=combined_x.shape[1],
        num_topk=combined_topk_weights.shape[1] if combined_topk_weights is not None else 0,
        send_pos=send_pos.data_ptr(), num_tokens=num_tokens, num_ranks=num_ranks, bias_0=ptr(bias_0),
        bias_1=ptr(bias_1), combined_x=combined_x.data_ptr(), combined_topk_weights=ptr(combined_topk_weights))


class CudaKernels:
    """Launches eplib's CUDA kernels on ``context``'s current stream and device (see streams.py);
    ``error_flag``: the transport's device error flag."""

    def __init__(self, error_flag: Tensor, context) -> None:
        self.error_flag = error_flag
        self.context = context

    def launch(self, kernel: Callable, args, tensors: Sequence[Optional[Tensor]]) -> None:
        """kernel(args) on the current stream; ``tensors``: those it reads or writes."""
        kernel(args, self.context.device_index, self.context.current_stream())
        self.context.hold(tensors)

    def dispatch_layout(self, topk_idx: Tensor, num_ranks: int, num_tokens_per_rank: Tensor,
                        num_tokens_per_expert: Tensor, is_token_in_rank: Tensor) -> None:
        """topk_idx int64 [T, K] -> int32 [R], int32 [E], bool [T, R] (outputs given)."""
        num_tokens, num_topk = topk_idx.shape
        args = _C.DispatchLayoutArgs(
            topk_idx=topk_idx.data_ptr(), num_tokens=num_tokens, num_topk=num_topk,
            num_experts=num_tokens_per_expert.shape[0], num_ranks=num_ranks,
            num_tokens_per_rank=num_tokens_per_rank.data_ptr(), num_tokens_per_expert=num_tokens_per_expert.data_ptr(),
            is_token_in_rank=is_token_in_rank.data_ptr(), error_flag=self.error_flag.data_ptr())
        self.launch(_C.cuda_dispatch_layout, args,
                    (topk_idx, num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank))

    def send_positions(self, is_token_in_rank: Tensor, slot_rows: int, send_pos: Tensor,
                       num_tokens_per_rank: Tensor) -> None:
        """bool [T, R] -> send_pos int32 [T, R] (row in the send region, -1 if not sent) and the rows
        placed per rank int32 [R]. slot_rows > 0: rank r's rows start at r * slot_rows, at most slot_rows."""
        num_tokens, num_ranks = is_token_in_rank.shape
        args = _C.SendPositionsArgs(
            is_token_in_rank=is_token_in_rank.data_ptr(), num_tokens=num_tokens, num_ranks=num_ranks,
            slot_rows=slot_rows, send_pos=send_pos.data_ptr(), num_tokens_per_rank=num_tokens_per_rank.data_ptr(),
            error_flag=self.error_flag.data_ptr())
        self.launch(_C.cuda_send_positions, args, (is_token_in_rank, send_pos, num_tokens_per_rank))

    def check_dispatch_inputs(self, send_counts: Tensor, num_tokens_per_rank: Tensor, slot_rows: int,
                              topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                              num_tokens_per_expert: Tensor) -> None:
        """Flags what the cpu transport checks on the host before its first collective, in one launch:
        layout tensors that disagree with each other, expert ids out of range, non-finite weights."""
        args = _C.DispatchCheckArgs(
            send_counts=send_counts.data_ptr(), num_tokens_per_rank=num_tokens_per_rank.data_ptr(),
            num_ranks=send_counts.shape[0], slot_rows=slot_rows, topk_idx=ptr(topk_idx),
            topk_weights=ptr(topk_weights), num_tokens=topk_idx.shape[0] if topk_idx is not None else 0,
            num_topk=topk_idx.shape[1] if topk_idx is not None else 0,
            num_tokens_per_expert=num_tokens_per_expert.data_ptr(), num_experts=num_tokens_per_expert.shape[0],
            error_flag=self.error_flag.data_ptr())
        self.launch(_C.cuda_check_dispatch_inputs, args,
                    (send_counts, num_tokens_per_rank, topk_idx, topk_weights, num_tokens_per_expert))

    def dispatch_pack(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor],
                      topk_weights: Optional[Tensor], num_experts: int, send_pos: Tensor, send_buffer: Tensor) -> None:
        """See dispatch_pack_args (the nccl transport's placement)."""
        args = dispatch_pack_args(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, send_buffer,
                                  self.error_flag)
        self.launch(_C.cuda_dispatch_pack, args, (x, x_scales, topk_idx, topk_weights, send_pos, send_buffer))

    def dispatch_unpack(self, args: "_C.DispatchUnpackArgs", tensors: Sequence[Optional[Tensor]]) -> None:
        """See dispatch_unpack_args."""
        self.launch(_C.cuda_dispatch_unpack, args, tensors)

    def combine_pack(self, x: Tensor, topk_weights: Optional[Tensor], recv_counts: Tensor, slot_rows: int,
                     send_buffer: Tensor) -> None:
        """See combine_pack_args."""
        args = combine_pack_args(x, topk_weights, recv_counts, slot_rows, send_buffer)
        self.launch(_C.cuda_combine_pack, args, (x, topk_weights, recv_counts, send_buffer))

    def combine_reduce(self, args: "_C.CombineReduceArgs", tensors: Sequence[Optional[Tensor]]) -> None:
        """See combine_reduce_args."""
        self.launch(_C.cuda_combine_reduce, args, tensors)
