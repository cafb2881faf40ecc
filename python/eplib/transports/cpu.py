"""The cpu transport: native CPU kernels for layout, packing and reduction, gloo collectives
(``torch.distributed``) for the exchange.

Collectives per call:
    get_dispatch_layout  none (see "Errors").
    dispatch          2: the call header (below), which carries the tokens sent to each rank, the
                         row format and num_worst_tokens, then one all-to-all of the packed rows (x,
                         FP8 scales, source index, local expert ids, weights); 3 for a dispatch of x
                         alone without num_worst_tokens, whose per-expert counts need one more
                         all-gather;
    cached dispatch   2: the call header, then an all-to-all of the packed x rows;
    combine           2: the call header, then an all-to-all of the expert outputs (plus weights
                         when given).

The call header is one all-gather of a fixed-size int64 record per rank (``records.make_header``),
the same size in every call: the call and its op index, whether this rank's input failed a check
(and its message), the row format, and the rows each rank sends to and expects from each rank.
Every rank checks every rank's header (``records.check_headers``) before any row travels.

Errors. Everything that can fail on this rank's own input (argument checks in the Buffer, the
kernels' value checks, layout consistency) runs before the header exchange. A rank whose input
fails joins the exchange its peers are waiting in (or will reach next: after a failed
``get_dispatch_layout``, the next call's header) with its error in its header, then raises; the
peers raise ``PeerInputError`` quoting it, at once, and every rank's Buffer stays usable. The
collectives run through the group's ``exchange.GroupChannel``, which keeps the ranks in step when
one of them is late, stuck or gone (see there).
"""

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _C
from .._dtypes import KERNEL_DTYPE_CODES
from ..collectives import CollectiveError
from ..exchange import channel_for
from ..handle import DispatchHandle
from .records import Headers, check_headers, check_receive_totals, format_values, header_words, make_header
from .tensors import as_bytes, ptr, row_bytes, scale_strides

Tensor = torch.Tensor


# Fresh allocations at least this large get huge pages before their first write: on the test VM a
# 61 MB output took 21 ms of page faults with 4 KB pages and 4 ms with 2 MB pages.
_HUGE_PAGE_MIN_BYTES = 8 << 20


def _empty(*shape: int, dtype: torch.dtype) -> Tensor:
    """torch.empty for outputs and staging bytes; large ones are backed by huge pages."""
    tensor = torch.empty(*shape, dtype=dtype)
    num_bytes = tensor.numel() * tensor.element_size()
    if num_bytes >= _HUGE_PAGE_MIN_BYTES:
        _C.advise_huge_pages(tensor.data_ptr(), num_bytes)
    return tensor


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
        self.channel = channel_for(group)

    # ------------------------------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------------------------------

    def _start_call(self) -> None:
        self.channel.check_usable()
        # Follow torch's setting (torchrun sets OMP_NUM_THREADS=1 per rank) so ranks sharing a
        # machine do not oversubscribe it.
        _C.set_num_threads(torch.get_num_threads())

    @contextlib.contextmanager
    def _failures_shared(self, call: str) -> Iterator[None]:
        """Around the local part of a call, before its header exchange: an input that fails here is
        told to the peers (``share_error``) before the error propagates."""
        try:
            yield
        except Exception as error:
            self.share_error(call, error)
            raise

    def share_error(self, call: str, error: Exception) -> None:
        """Joins the exchange that the other ranks wait in, or reach next, with this rank's error in
        its header, so that they raise at once. ``call`` is the call that failed (records.CALLS). The
        caller raises ``error`` afterwards. Errors of the group itself (CollectiveError) are not told:
        the group reports them to every rank."""
        if isinstance(error, CollectiveError):
            return
        try:
            self._exchange_headers(call, error=error)
        except CollectiveError:
            pass  # the group is failing too: its next call reports that, the caller raises the input error

    def _exchange_headers(self, call: str, **fields) -> Headers:
        """All-gathers this rank's call header (records.make_header(**fields)) -> every rank's."""
        header = make_header(self.num_ranks, self.channel.ready(), call, **fields)
        gathered = torch.empty(self.num_ranks, header_words(self.num_ranks), dtype=torch.int64)
        self.channel.all_gather(gathered.view(-1), header, phase=f"{call} (header exchange)")
        return Headers(gathered)

    def _staging_bytes(self, name: str, num_bytes: int) -> Tensor:
        """The first num_bytes of the reusable staging tensor `name`, grown when too small."""
        if self._staging[name].numel() < num_bytes:
            self._staging[name] = _empty(num_bytes + num_bytes // 4, dtype=torch.uint8)
        return self._staging[name][:num_bytes]

    # ------------------------------------------------------------------------------------------
    # Kernels
    # ------------------------------------------------------------------------------------------

    def _layout(self, topk_idx: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
        num_tokens, num_topk = topk_idx.shape
        num_tokens_per_rank = torch.empty(self.num_ranks, dtype=torch.int32)
        num_tokens_per_expert = torch.empty(num_experts, dtype=torch.int32)
        is_token_in_rank = torch.empty(num_tokens, self.num_ranks, dtype=torch.bool)
        _C.dispatch_layout(topk_idx.data_ptr(), num_tokens, num_topk, num_experts, self.num_ranks,
                           num_tokens_per_rank.data_ptr(), num_tokens_per_expert.data_ptr(),
                           is_token_in_rank.data_ptr())
        return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank

    def _send_positions(self, is_token_in_rank: Tensor) -> Tuple[Tensor, Tensor]:
        num_tokens = is_token_in_rank.shape[0]
        send_pos = torch.empty(num_tokens, self.num_ranks, dtype=torch.int32)
        send_counts = torch.empty(self.num_ranks, dtype=torch.int32)
        _C.send_positions(is_token_in_rank.data_ptr(), num_tokens, self.num_ranks, send_pos.data_ptr(),
                          send_counts.data_ptr())
        return send_pos, send_counts

    def _pack(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
              num_experts: int, send_pos: Tensor, num_send_rows: int) -> Tuple[Tensor, int]:
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales), num_topk)
        send_buffer = self._staging_bytes("send", num_send_rows * stride)
        _C.dispatch_pack(ptr(x), row_bytes(x), ptr(x_scales), row_bytes(x_scales), *scale_strides(x_scales),
                         ptr(topk_idx), ptr(topk_weights), num_topk, num_experts, send_pos.data_ptr(), x.shape[0],
                         self.num_ranks, send_buffer.data_ptr())
        return send_buffer, stride

    def _exchange_rows(self, send_buffer: Tensor, stride: int, send_counts: Tuple[int, ...],
                       recv_counts: Tuple[int, ...], phase: str) -> Tensor:
        recv_buffer = self._staging_bytes("recv", sum(recv_counts) * stride)
        self.channel.all_to_all(recv_buffer, send_buffer, [n * stride for n in recv_counts],
                                [n * stride for n in send_counts], phase)
        return recv_buffer

    def _unpack(self, recv_buffer: Tensor, num_recv: int, num_rows: int, x: Tensor, x_scales: Optional[Tensor],
                num_topk: int, num_local_experts: int):
        """Received rows -> (recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights,
        received (row, slot) pairs per local expert), each with num_rows rows; rows past num_recv
        (num_worst_tokens padding) are zero, and -1 in the indices."""
        recv_x = _empty(num_rows, x.shape[1], dtype=x.dtype)
        recv_x_scales = torch.empty(num_rows, x_scales.shape[1], dtype=x_scales.dtype) if x_scales is not None else None
        recv_src_idx = torch.empty(num_rows, dtype=torch.int32)
        recv_topk_idx = torch.empty(num_rows, num_topk, dtype=torch.int64) if num_topk else None
        recv_topk_weights = torch.empty(num_rows, num_topk, dtype=torch.float32) if num_topk else None
        per_expert = torch.empty(num_local_experts, dtype=torch.int64) if num_topk else None
        _C.dispatch_unpack(recv_buffer.data_ptr(), num_recv, row_bytes(x), row_bytes(x_scales), num_topk,
                           num_local_experts, recv_x.data_ptr(), ptr(recv_x_scales), recv_src_idx.data_ptr(),
                           ptr(recv_topk_idx), ptr(recv_topk_weights), ptr(per_expert))
        if num_rows > num_recv:
            for tensor in (recv_x, recv_x_scales, recv_topk_weights):
                if tensor is not None:
                    tensor[num_recv:].view(torch.uint8).zero_()  # zero bytes are +0.0 in every float dtype, FP8 too
            for tensor in (recv_src_idx, recv_topk_idx):
                if tensor is not None:
                    tensor[num_recv:].fill_(-1)
        return recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights, per_expert

    # ------------------------------------------------------------------------------------------
    # The headers of a dispatch
    # ------------------------------------------------------------------------------------------

    def _check_dispatch_headers(self, headers: Headers) -> List[int]:
        """Raises on every rank alike when any header is unusable; returns rows received per rank."""
        check_headers(headers, self.rank, "dispatch", self.channel)
        recv_totals = headers.sends.sum(0).tolist()
        check_receive_totals(recv_totals)
        worst = headers.column("num_worst_tokens")
        too_small = [r for r in range(self.num_ranks) if 0 < worst[r] < recv_totals[r]]
        if self.rank in too_small:
            raise ValueError(f"num_worst_tokens: rank {self.rank} receives {recv_totals[self.rank]} tokens, "
                             f"more than num_worst_tokens={worst[self.rank]}")
        if too_small:
            r = too_small[0]
            raise RuntimeError(f"eplib: dispatch abandoned on rank {self.rank}: rank {r} receives {recv_totals[r]} "
                               f"tokens, more than its num_worst_tokens={worst[r]}")
        return recv_totals

    # ------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
        """topk_idx int64 [T, K] -> (num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
        is_token_in_rank bool [T, R])."""
        self._start_call()
        with self._failures_shared("get_dispatch_layout"):
            return self._layout(topk_idx, num_experts)

    def dispatch(self, x: Tensor, x_scales: Optional[Tensor], num_tokens_per_rank: Tensor, is_token_in_rank: Tensor,
                 num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                 expert_alignment: int, num_worst_tokens: int):
        """See ``Buffer.dispatch``. Returns (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle)."""
        self._start_call()
        num_experts = num_tokens_per_expert.shape[0]
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        with self._failures_shared("dispatch"):
            send_pos, send_counts = self._local_dispatch_checks(num_tokens_per_rank, is_token_in_rank,
                                                                num_tokens_per_expert, topk_idx)
            # Packing checks expert ids and weights, so it runs before the first collective.
            send_buffer, stride = self._pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos,
                                             int(send_counts.sum()))
        headers = self._exchange_headers("dispatch", sends=send_counts, num_worst_tokens=num_worst_tokens,
                                         **format_values(x, x_scales, num_experts, num_topk))
        recv_totals = self._check_dispatch_headers(headers)
        counts_matrix = headers.sends  # [source, destination]
        recv_counts = tuple(counts_matrix[:, self.rank].tolist())
        num_recv = recv_totals[self.rank]

        host_send_counts = tuple(send_counts.tolist())
        recv_buffer = self._exchange_rows(send_buffer, stride, host_send_counts, recv_counts, "dispatch (payload)")
        num_rows = num_worst_tokens if num_worst_tokens > 0 else num_recv
        num_local_experts = num_experts // self.num_ranks
        recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights, per_expert = self._unpack(
            recv_buffer, num_recv, num_rows, x, x_scales, num_topk, num_local_experts)

        if num_worst_tokens > 0:
            num_recv_tokens_per_expert_list = []
        else:
            if per_expert is None:  # x alone: the counts come from every source's num_tokens_per_expert
                per_expert = self._gather_local_expert_counts(num_tokens_per_expert)
            num_recv_tokens_per_expert_list = [-(-n // expert_alignment) * expert_alignment
                                               for n in per_expert.tolist()]
        handle = DispatchHandle(
            rank_prefix_matrix=counts_matrix.cumsum(0).to(torch.int32),
            device_send_counts=send_counts,
            send_counts=host_send_counts,
            recv_counts=recv_counts,
            recv_src_idx=recv_src_idx,
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            num_recv_tokens=num_recv,
            hidden=x.shape[1],
        )
        return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle

    def _local_dispatch_checks(self, num_tokens_per_rank: Tensor, is_token_in_rank: Tensor,
                               num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Checks the layout arguments against each other; returns (send_pos, send_counts)."""
        send_pos, send_counts = self._send_positions(is_token_in_rank)
        if not torch.equal(send_counts, num_tokens_per_rank):
            raise ValueError(f"num_tokens_per_rank: expected the per-rank counts of is_token_in_rank "
                             f"{send_counts.tolist()}, got {num_tokens_per_rank.tolist()}")
        if topk_idx is not None:
            # Receivers size their per-expert lists from these counts: they must be topk_idx's.
            _, expected_per_expert, _ = self._layout(topk_idx, num_tokens_per_expert.shape[0])
            if not torch.equal(expected_per_expert, num_tokens_per_expert):
                raise ValueError(f"num_tokens_per_expert: expected the per-expert counts of topk_idx "
                                 f"{expected_per_expert.tolist()}, got {num_tokens_per_expert.tolist()}")
        elif bool((num_tokens_per_expert < 0).any()):
            raise ValueError(f"num_tokens_per_expert: expected counts >= 0, got {num_tokens_per_expert.tolist()}")
        return send_pos, send_counts

    def _gather_local_expert_counts(self, num_tokens_per_expert: Tensor) -> Tensor:
        """Sum over source ranks of their num_tokens_per_expert for this rank's experts (int64)."""
        num_experts = num_tokens_per_expert.shape[0]
        gathered = torch.empty(self.num_ranks * num_experts, dtype=torch.int64)
        self.channel.all_gather(gathered, num_tokens_per_expert.to(torch.int64),
                                phase="dispatch (expert counts exchange)")
        num_local = num_experts // self.num_ranks
        return gathered.view(self.num_ranks, num_experts)[:, self.rank * num_local:(self.rank + 1) * num_local].sum(0)

    def cached_dispatch(self, x: Tensor, x_scales: Optional[Tensor],
                        handle: DispatchHandle) -> Tuple[Tensor, Optional[Tensor]]:
        """Dispatch x (and FP8 scales) along the layout of an earlier dispatch: the header, then one all-to-all."""
        self._start_call()
        with self._failures_shared("cached dispatch"):
            send_buffer, stride = self._pack(x, x_scales, None, None, 0, handle.send_pos, sum(handle.send_counts))
        headers = self._exchange_headers("cached dispatch", sends=handle.send_counts, expects=handle.recv_counts,
                                         **format_values(x, x_scales, 0, 0))
        check_headers(headers, self.rank, "cached dispatch", self.channel)
        recv_buffer = self._exchange_rows(send_buffer, stride, handle.send_counts, handle.recv_counts,
                                          "cached dispatch (payload)")
        recv_x, recv_x_scales, *_ = self._unpack(recv_buffer, handle.num_recv_tokens, handle.num_output_rows,
                                                 x, x_scales, 0, 0)
        return recv_x, recv_x_scales

    def combine(self, x: Tensor, handle: DispatchHandle, topk_weights: Optional[Tensor], bias_0: Optional[Tensor],
                bias_1: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Send expert outputs back and reduce them per token; see ``Buffer.combine``."""
        self._start_call()
        num_recv = handle.num_recv_tokens
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        with self._failures_shared("combine"):
            send_buffer, stride = self._pack_combine(x, topk_weights, num_recv)
        # The way back inverts the dispatch: send what was received from each rank, receive what was sent to it.
        headers = self._exchange_headers("combine", sends=handle.recv_counts, expects=handle.send_counts,
                                         **format_values(x, None, 0, num_topk))
        check_headers(headers, self.rank, "combine", self.channel)
        return self._combine_reduce(self._combine_rows(send_buffer, stride, handle), x, handle, num_topk, bias_0,
                                    bias_1)

    def _pack_combine(self, x: Tensor, topk_weights: Optional[Tensor], num_recv: int) -> Tuple[Tensor, int]:
        """The rows combine sends back (x, plus the weights when given) and their stride."""
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        x_bytes = row_bytes(x)
        stride = _C.combine_row_stride(x_bytes, num_topk)
        if topk_weights is None:
            return as_bytes(x[:num_recv]), stride  # rows are already in the order they go back
        send_buffer = self._staging_bytes("send", num_recv * stride)
        _C.combine_pack(x.data_ptr(), x_bytes, topk_weights.data_ptr(), num_topk, num_recv, send_buffer.data_ptr())
        return send_buffer, stride

    def _combine_rows(self, send_buffer: Tensor, stride: int, handle: DispatchHandle) -> Tensor:
        """The payload of a combine: what was received from each rank goes back to it."""
        return self._exchange_rows(send_buffer, stride, handle.recv_counts, handle.send_counts, "combine (payload)")

    def _combine_reduce(self, recv_buffer: Tensor, x: Tensor, handle: DispatchHandle, num_topk: int,
                        bias_0: Optional[Tensor], bias_1: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """The received rows summed per token (bias first, then the ranks in order) -> (combined_x
        [T, H] in x's dtype, combined_topk_weights float32 [T, K] or None)."""
        num_tokens, hidden = handle.num_tokens, x.shape[1]
        combined_x = _empty(num_tokens, hidden, dtype=x.dtype)
        combined_topk_weights = torch.empty(num_tokens, num_topk, dtype=torch.float32) if num_topk else None
        _C.combine_reduce(KERNEL_DTYPE_CODES[x.dtype], recv_buffer.data_ptr(), hidden, num_topk,
                          handle.send_pos.data_ptr(), num_tokens, self.num_ranks, ptr(bias_0), ptr(bias_1),
                          combined_x.data_ptr(), ptr(combined_topk_weights))
        return combined_x, combined_topk_weights
