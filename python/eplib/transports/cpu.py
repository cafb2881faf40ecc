"""The cpu transport: native CPU kernels for layout, packing and reduction, gloo collectives
(``torch.distributed``) for the exchange.

Collectives per call:
    dispatch          2: all-gather of the counts, then one all-to-all of the packed rows
                         (x, FP8 scales, source index, local expert ids, weights in one row);
    cached dispatch   1: all-to-all of the packed x rows;
    combine           1: all-to-all of the expert outputs (plus weights when given).
"""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _C
from .._dtypes import KERNEL_DTYPE_CODES
from ..collectives import all_gather, all_to_all
from ..handle import DispatchHandle

Tensor = torch.Tensor

# Entries of the per-rank header all-gathered with the counts, after [R tokens per rank | E tokens per expert].
_HEADER_NUM_WORST_TOKENS = 0
_HEADER_ROW_STRIDE = 1
_HEADER_SIZE = 2


def _ptr(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _row_bytes(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.shape[1] * tensor.element_size()


def _as_bytes(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1).view(torch.uint8)


class CpuTransport:
    """Dispatch and combine for CPU tensors over a gloo (or any CPU-capable) process group."""

    name = "cpu"

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank = group.rank()
        self.num_ranks = group.size()
        # Send and receive staging bytes, kept between calls: a fresh allocation of tens of MB
        # costs as much in page faults as the copy into it. Never handed out to callers.
        self._staging = {"send": torch.empty(0, dtype=torch.uint8), "recv": torch.empty(0, dtype=torch.uint8)}

    def _staging_bytes(self, name: str, num_bytes: int) -> Tensor:
        """The first num_bytes of the reusable staging tensor `name`, grown when too small."""
        if self._staging[name].numel() < num_bytes:
            self._staging[name] = torch.empty(num_bytes + num_bytes // 4, dtype=torch.uint8)
        return self._staging[name][:num_bytes]

    @staticmethod
    def _sync_threads() -> None:
        # Follow torch's setting (torchrun sets OMP_NUM_THREADS=1 per rank) so ranks sharing a
        # machine do not oversubscribe it.
        _C.set_num_threads(torch.get_num_threads())

    def get_dispatch_layout(self, topk_idx: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
        """topk_idx int64 [T, K] -> (num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
        is_token_in_rank bool [T, R])."""
        self._sync_threads()
        num_tokens, num_topk = topk_idx.shape
        num_tokens_per_rank = torch.empty(self.num_ranks, dtype=torch.int32)
        num_tokens_per_expert = torch.empty(num_experts, dtype=torch.int32)
        is_token_in_rank = torch.empty(num_tokens, self.num_ranks, dtype=torch.bool)
        _C.dispatch_layout(topk_idx.data_ptr(), num_tokens, num_topk, num_experts, self.num_ranks,
                           num_tokens_per_rank.data_ptr(), num_tokens_per_expert.data_ptr(),
                           is_token_in_rank.data_ptr())
        return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank

    def _pack(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
              num_experts: int, send_pos: Tensor, num_send_rows: int) -> Tuple[Tensor, int]:
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        stride = _C.dispatch_row_stride(_row_bytes(x), _row_bytes(x_scales), num_topk)
        send_buffer = self._staging_bytes("send", num_send_rows * stride)
        _C.dispatch_pack(_ptr(x), _row_bytes(x), _ptr(x_scales), _row_bytes(x_scales), _ptr(topk_idx),
                         _ptr(topk_weights), num_topk, num_experts, send_pos.data_ptr(), x.shape[0], self.num_ranks,
                         send_buffer.data_ptr())
        return send_buffer, stride

    def _exchange_rows(self, send_buffer: Tensor, stride: int, send_counts: Tuple[int, ...],
                       recv_counts: Tuple[int, ...], phase: str) -> Tensor:
        recv_buffer = self._staging_bytes("recv", sum(recv_counts) * stride)
        all_to_all(recv_buffer, send_buffer, [n * stride for n in recv_counts], [n * stride for n in send_counts],
                   self.group, phase)
        return recv_buffer

    def _unpack(self, recv_buffer: Tensor, num_recv: int, num_rows: int, x: Tensor, x_scales: Optional[Tensor],
                num_topk: int) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
        """Received rows -> (recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights), each
        with num_rows rows; rows past num_recv (num_worst_tokens padding) are zero, and -1 in the indices."""
        recv_x = torch.empty(num_rows, x.shape[1], dtype=x.dtype)
        recv_x_scales = torch.empty(num_rows, x_scales.shape[1], dtype=x_scales.dtype) if x_scales is not None else None
        recv_src_idx = torch.empty(num_rows, dtype=torch.int32)
        recv_topk_idx = torch.empty(num_rows, num_topk, dtype=torch.int64) if num_topk else None
        recv_topk_weights = torch.empty(num_rows, num_topk, dtype=torch.float32) if num_topk else None
        _C.dispatch_unpack(recv_buffer.data_ptr(), num_recv, _row_bytes(x), _row_bytes(x_scales), num_topk,
                           recv_x.data_ptr(), _ptr(recv_x_scales), recv_src_idx.data_ptr(), _ptr(recv_topk_idx),
                           _ptr(recv_topk_weights))
        if num_rows > num_recv:
            for tensor in (recv_x, recv_x_scales, recv_topk_weights):
                if tensor is not None:
                    tensor[num_recv:].view(torch.uint8).zero_()  # zero bytes are +0.0 in every float dtype, FP8 too
            for tensor in (recv_src_idx, recv_topk_idx):
                if tensor is not None:
                    tensor[num_recv:].fill_(-1)
        return recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights

    def _exchange_counts(self, num_tokens_per_rank: Tensor, num_tokens_per_expert: Tensor, num_worst_tokens: int,
                         stride: int) -> Tensor:
        """All-gather [tokens per rank | tokens per expert | header] -> int64 [R, R + E + header]."""
        header = torch.zeros(_HEADER_SIZE, dtype=torch.int64)
        header[_HEADER_NUM_WORST_TOKENS] = num_worst_tokens
        header[_HEADER_ROW_STRIDE] = stride
        local = torch.cat([num_tokens_per_rank.to(torch.int64), num_tokens_per_expert.to(torch.int64), header])
        gathered = torch.empty(self.num_ranks * local.numel(), dtype=torch.int64)
        all_gather(gathered, local, self.group, "dispatch (counts exchange)")
        return gathered.view(self.num_ranks, local.numel())

    def _check_gathered_header(self, header: Tensor, recv_totals: List[int]) -> None:
        """Every rank checks every rank's header, so all of them raise together instead of some
        of them waiting in the next collective."""
        strides = header[:, _HEADER_ROW_STRIDE].tolist()
        if len(set(strides)) != 1:
            raise ValueError(f"x/topk_idx: ranks disagree on the row format (hidden size, dtype, FP8 scales, "
                             f"top-k): packed row bytes per rank are {strides}")
        worst = header[:, _HEADER_NUM_WORST_TOKENS].tolist()
        too_small = [r for r in range(self.num_ranks) if 0 < worst[r] < recv_totals[r]]
        if self.rank in too_small:
            raise ValueError(f"num_worst_tokens: rank {self.rank} receives {recv_totals[self.rank]} tokens, "
                             f"more than num_worst_tokens={worst[self.rank]}")
        if too_small:
            r = too_small[0]
            raise RuntimeError(f"eplib: dispatch abandoned on rank {self.rank}: rank {r} receives {recv_totals[r]} "
                               f"tokens, more than its num_worst_tokens={worst[r]}")

    def dispatch(self, x: Tensor, x_scales: Optional[Tensor], num_tokens_per_rank: Tensor, is_token_in_rank: Tensor,
                 num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                 expert_alignment: int, num_worst_tokens: int):
        """See ``Buffer.dispatch``. Returns (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle)."""
        self._sync_threads()
        num_tokens = x.shape[0]
        num_experts = num_tokens_per_expert.shape[0]
        send_pos = torch.empty(num_tokens, self.num_ranks, dtype=torch.int32)
        counted = torch.empty(self.num_ranks, dtype=torch.int32)
        _C.send_positions(is_token_in_rank.data_ptr(), num_tokens, self.num_ranks, send_pos.data_ptr(),
                          counted.data_ptr())
        if not torch.equal(counted, num_tokens_per_rank):
            raise ValueError(f"num_tokens_per_rank: expected the per-rank counts of is_token_in_rank "
                             f"{counted.tolist()}, got {num_tokens_per_rank.tolist()}")
        if topk_idx is not None:
            # The receivers size their per-expert lists from these counts: check them against topk_idx.
            _, expected_per_expert, _ = self.get_dispatch_layout(topk_idx, num_experts)
            if not torch.equal(expected_per_expert, num_tokens_per_expert):
                raise ValueError(f"num_tokens_per_expert: expected the per-expert counts of topk_idx "
                                 f"{expected_per_expert.tolist()}, got {num_tokens_per_expert.tolist()}")
        send_counts = tuple(counted.tolist())
        # Packing validates expert ids and weights, so it runs before the first collective.
        send_buffer, stride = self._pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, sum(send_counts))

        gathered = self._exchange_counts(num_tokens_per_rank, num_tokens_per_expert, num_worst_tokens, stride)
        counts_matrix = gathered[:, :self.num_ranks]  # [source, destination]
        recv_totals = counts_matrix.sum(0).tolist()
        self._check_gathered_header(gathered[:, self.num_ranks + num_experts:], recv_totals)
        recv_counts = tuple(counts_matrix[:, self.rank].tolist())
        num_recv = recv_totals[self.rank]

        if num_worst_tokens > 0:
            num_recv_tokens_per_expert_list = []
        else:
            experts_per_rank = num_experts // self.num_ranks
            first = self.num_ranks + self.rank * experts_per_rank
            per_expert = gathered[:, first:first + experts_per_rank].sum(0).tolist()
            num_recv_tokens_per_expert_list = [-(-n // expert_alignment) * expert_alignment for n in per_expert]

        recv_buffer = self._exchange_rows(send_buffer, stride, send_counts, recv_counts, "dispatch (payload)")
        num_rows = num_worst_tokens if num_worst_tokens > 0 else num_recv
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights = self._unpack(
            recv_buffer, num_recv, num_rows, x, x_scales, num_topk)
        handle = DispatchHandle(
            rank_prefix_matrix=counts_matrix.cumsum(0).to(torch.int32),
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            recv_src_idx=recv_src_idx,
            num_recv_tokens=num_recv,
            send_counts=send_counts,
            recv_counts=recv_counts,
        )
        return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle

    def cached_dispatch(self, x: Tensor, x_scales: Optional[Tensor],
                        handle: DispatchHandle) -> Tuple[Tensor, Optional[Tensor]]:
        """Dispatch x (and FP8 scales) along the layout of an earlier dispatch: one collective."""
        self._sync_threads()
        send_buffer, stride = self._pack(x, x_scales, None, None, 0, handle.send_pos,
                                         sum(handle.send_counts))
        recv_buffer = self._exchange_rows(send_buffer, stride, handle.send_counts, handle.recv_counts,
                                          "cached dispatch (payload)")
        recv_x, recv_x_scales, _, _, _ = self._unpack(recv_buffer, handle.num_recv_tokens, handle.num_output_rows,
                                                      x, x_scales, 0)
        return recv_x, recv_x_scales

    def combine(self, x: Tensor, handle: DispatchHandle, topk_weights: Optional[Tensor], bias_0: Optional[Tensor],
                bias_1: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Send expert outputs back and reduce them per token; see ``Buffer.combine``."""
        self._sync_threads()
        num_recv = handle.num_recv_tokens
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        x_bytes = _row_bytes(x)
        stride = _C.combine_row_stride(x_bytes, num_topk)
        if topk_weights is None:
            send_buffer = _as_bytes(x[:num_recv])  # rows are already in the order they go back
        else:
            send_buffer = self._staging_bytes("send", num_recv * stride)
            _C.combine_pack(x.data_ptr(), x_bytes, topk_weights.data_ptr(), num_topk, num_recv,
                            send_buffer.data_ptr())
        # The way back inverts the dispatch: send what was received from each rank, receive what was sent to it.
        recv_buffer = self._exchange_rows(send_buffer, stride, handle.recv_counts, handle.send_counts,
                                          "combine (payload)")
        num_tokens, hidden = handle.num_tokens, x.shape[1]
        combined_x = torch.empty(num_tokens, hidden, dtype=x.dtype)
        combined_topk_weights = torch.empty(num_tokens, num_topk, dtype=torch.float32) if num_topk else None
        _C.combine_reduce(KERNEL_DTYPE_CODES[x.dtype], recv_buffer.data_ptr(), hidden, num_topk,
                          handle.send_pos.data_ptr(), num_tokens, self.num_ranks, _ptr(bias_0), _ptr(bias_1),
                          combined_x.data_ptr(), _ptr(combined_topk_weights))
        return combined_x, combined_topk_weights
