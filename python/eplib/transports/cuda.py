"""What the CUDA transports (nccl, ipc) share: the kernels called with tensors, DeepEP's stream
protocol, the device error flag, the argument checks that run on the device, and the parts of a
call that do not depend on how rows travel (layout, send positions, unpacking, handles).

Errors. Argument checks that need the values (expert ids in range, finite weights, the layout
tensors agreeing with each other, rows beyond num_worst_tokens) run on the device and OR bits into
the transport's device error flag (int32 [1]) instead of stopping the host. The flag travels in the
record of the next normal-mode dispatch and is read at its host sync: the rank whose flag is set
raises ValueError naming the problem (then clears the flag), every other rank raises RuntimeError,
and no payload moves, so the group stays usable. Calls that never sync (get_dispatch_layout,
num_worst_tokens and cached dispatch, combine) therefore report bad input at the next normal-mode
dispatch; inputs flagged bad are treated as masked (-1 ids) or dropped (rows past W), never read
out of bounds.
"""

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .. import _C
from .._dtypes import KERNEL_DTYPE_CODES
from ..event import EventOverlap
from ..handle import DispatchHandle
from .records import FORMAT_FIELDS, check_format_agreement, check_receive_totals
from .tensors import ptr, row_bytes

Tensor = torch.Tensor
# A receive buffer: a tensor (nccl transport) or the address of the peer transport's region.
Rows = Union[Tensor, int]

# Error bits set by the CUDA kernels (csrc/include/eplib/errors.h).
ERR_EXPERT_ID = _C.ERR_EXPERT_ID
ERR_WEIGHT = _C.ERR_WEIGHT
ERR_OVERFLOW = _C.ERR_OVERFLOW
# Error bits the transports set with torch ops on the device.
ERR_RANK_COUNTS = 1 << 8
ERR_EXPERT_COUNTS = 1 << 9

_ERROR_MESSAGES = {
    ERR_EXPERT_ID: "topk_idx: an expert id outside [-1, num_experts)",
    ERR_WEIGHT: "topk_weights: a weight that is not finite",
    ERR_OVERFLOW: "num_worst_tokens: a num_worst_tokens dispatch had more rows for one rank than "
                  "num_worst_tokens (the extra rows were dropped)",
    ERR_RANK_COUNTS: "num_tokens_per_rank: differs from the per-rank counts of is_token_in_rank",
    ERR_EXPERT_COUNTS: "num_tokens_per_expert: differs from the per-expert counts of topk_idx (or, without "
                       "topk_idx, holds a negative count)",
}

# Fields at the head of each rank's normal-mode record: each rank's own error flag, then the format
# fields that must agree on all ranks (records.FORMAT_FIELDS). Then R send counts, then per-expert counts.
RECORD_FIELDS = ("error_flag", *FORMAT_FIELDS)


def describe_error_flag(flag: int) -> str:
    """The problems named by the bits of a device error flag, joined with '; '."""
    known = [message for bit, message in _ERROR_MESSAGES.items() if flag & bit]
    unknown = flag & ~sum(_ERROR_MESSAGES)
    if unknown:
        known.append(f"unknown error bits {unknown:#x}")
    return "; ".join(known)


def _address(rows: Optional[Rows]) -> int:
    return rows if isinstance(rows, int) else ptr(rows)


class CudaKernels:
    """eplib._C's CUDA kernels called with tensors.

    Every kernel runs on the current stream and ORs problems it finds into ``error_flag``
    (int32 [1] on the device) instead of failing; none synchronizes or allocates. The four row
    kernels take the peer transport's arguments as keywords: ``peers`` (an ``_C.PeerBuffer``: rows go
    straight to the destinations' receive regions, inside the round hand-shake), the device
    ``rank_prefix_matrix`` that places them (or ``slot_rows``), and ``max_blocks`` (Config.num_sms).
    """

    def __init__(self, error_flag: Tensor) -> None:
        self.error_flag = error_flag

    @staticmethod
    def _stream() -> int:
        return torch.cuda.current_stream().cuda_stream

    def dispatch_layout(self, topk_idx: Tensor, num_ranks: int, num_tokens_per_rank: Tensor,
                        num_tokens_per_expert: Tensor, is_token_in_rank: Tensor) -> None:
        """topk_idx int64 [T, K] -> int32 [R], int32 [E], bool [T, R] (outputs given)."""
        num_tokens, num_topk = topk_idx.shape
        _C.cuda_dispatch_layout(topk_idx.data_ptr(), num_tokens, num_topk, num_tokens_per_expert.shape[0], num_ranks,
                                num_tokens_per_rank.data_ptr(), num_tokens_per_expert.data_ptr(),
                                is_token_in_rank.data_ptr(), self.error_flag.data_ptr(), self._stream())

    def send_positions(self, is_token_in_rank: Tensor, slot_rows: int, send_pos: Tensor,
                       num_tokens_per_rank: Tensor) -> None:
        """bool [T, R] -> send_pos int32 [T, R] (row in the send region, -1 if not sent) and the
        per-rank counts int32 [R]. slot_rows > 0: rank r's rows start at r * slot_rows."""
        num_tokens, num_ranks = is_token_in_rank.shape
        _C.cuda_send_positions(is_token_in_rank.data_ptr(), num_tokens, num_ranks, send_pos.data_ptr(),
                               num_tokens_per_rank.data_ptr(), slot_rows, self.error_flag.data_ptr(), self._stream())

    def dispatch_pack(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor],
                      topk_weights: Optional[Tensor], num_experts: int, send_pos: Tensor, send_buffer: Optional[Tensor],
                      *, peers=None, rank_prefix_matrix: Optional[Tensor] = None, slot_rows: int = 0,
                      max_blocks: int = 0) -> None:
        """Rows of x (and scales, source index, ids, weights) -> their send_pos rows of send_buffer (uint8),
        or with peers to the destinations' regions."""
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_tokens, num_ranks = send_pos.shape
        _C.cuda_dispatch_pack(ptr(x), row_bytes(x), ptr(x_scales), row_bytes(x_scales), ptr(topk_idx),
                              ptr(topk_weights), num_topk, num_experts, send_pos.data_ptr(), num_tokens, num_ranks,
                              ptr(send_buffer), self.error_flag.data_ptr(), peers, ptr(rank_prefix_matrix), slot_rows,
                              max_blocks, self._stream())

    def dispatch_unpack(self, recv_buffer: Rows, recv_counts: Tensor, slot_rows: int, x_bytes: int,
                        scales_bytes: int, num_topk: int, num_local_experts: int, recv_x: Tensor,
                        recv_x_scales: Optional[Tensor], recv_src_idx: Tensor, recv_topk_idx: Optional[Tensor],
                        recv_topk_weights: Optional[Tensor], num_recv_out: Optional[Tensor], *, peers=None,
                        max_blocks: int = 0) -> None:
        """Received rows -> compacted outputs in source order, padded to recv_x's rows (zeros, -1 indices).
        recv_counts: device int32 [R]. num_recv_out: device int32 [1], rows really received."""
        _C.cuda_dispatch_unpack(_address(recv_buffer), recv_counts.data_ptr(), recv_counts.shape[0], slot_rows,
                                recv_x.shape[0], x_bytes, scales_bytes, num_topk, num_local_experts,
                                recv_x.data_ptr(), ptr(recv_x_scales), recv_src_idx.data_ptr(), ptr(recv_topk_idx),
                                ptr(recv_topk_weights), 0, ptr(num_recv_out), self.error_flag.data_ptr(), peers,
                                max_blocks, self._stream())

    def combine_pack(self, x: Tensor, topk_weights: Optional[Tensor], recv_counts: Tensor, slot_rows: int,
                     send_buffer: Optional[Tensor], *, peers=None, rank_prefix_matrix: Optional[Tensor] = None,
                     max_blocks: int = 0) -> None:
        """Expert outputs x [N, H] (and weights [N, K]) -> combine rows at their source's place."""
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        _C.cuda_combine_pack(x.data_ptr(), row_bytes(x), ptr(topk_weights), num_topk, recv_counts.data_ptr(),
                             recv_counts.shape[0], slot_rows, x.shape[0], ptr(send_buffer), peers,
                             ptr(rank_prefix_matrix), max_blocks, self._stream())

    def combine_reduce(self, recv_buffer: Rows, send_pos: Tensor, bias_0: Optional[Tensor],
                       bias_1: Optional[Tensor], combined_x: Tensor, combined_topk_weights: Optional[Tensor], *,
                       peers=None, max_blocks: int = 0) -> None:
        """Per token: bias, then its rows from ranks 0..R-1 in order, summed in fp32, cast to x's dtype."""
        num_tokens, num_ranks = send_pos.shape
        num_topk = combined_topk_weights.shape[1] if combined_topk_weights is not None else 0
        _C.cuda_combine_reduce(KERNEL_DTYPE_CODES[combined_x.dtype], _address(recv_buffer), combined_x.shape[1],
                               num_topk, send_pos.data_ptr(), num_tokens, num_ranks, ptr(bias_0), ptr(bias_1),
                               combined_x.data_ptr(), ptr(combined_topk_weights), peers, max_blocks, self._stream())


class CallStreams:
    """DeepEP's stream protocol for one call (deep_ep.cpp, Buffer::intranode_dispatch):

    - the communication stream first waits for ``previous_event``, else for the current stream;
    - kernels, collectives and temporaries run on the communication stream;
    - outputs are allocated on the current stream, or on the communication stream with
      ``allocate_on_comm_stream`` (DeepEP allows that only with previous_event and async_finish);
    - ``finish``: with async_finish, an event recorded on the communication stream is returned and
      every tensor in flight is ``record_stream``-ed on it (and on the current stream when outputs
      were allocated on the communication stream) so the caching allocator does not hand its memory
      out before the communication is done; otherwise the current stream waits for the
      communication stream.
    """

    def __init__(self, comm: "torch.cuda.Stream", previous_event: Optional[EventOverlap],
                 allocate_on_comm_stream: bool) -> None:
        self.comm = comm
        self.compute = torch.cuda.current_stream(comm.device)
        self.allocate_on_comm_stream = allocate_on_comm_stream
        if previous_event is not None and previous_event.event is not None:
            comm.wait_event(previous_event.event)
        else:
            comm.wait_stream(self.compute)

    def empty(self, *shape: int, dtype: torch.dtype) -> Tensor:
        """An output tensor, allocated on the stream that owns the call's outputs."""
        with torch.cuda.stream(self.comm if self.allocate_on_comm_stream else self.compute):
            return torch.empty(*shape, dtype=dtype, device=self.comm.device)

    def finish(self, async_finish: bool, in_flight: Sequence[Optional[Tensor]]) -> EventOverlap:
        """Ends the call: returns its event (async) or makes the current stream wait (sync)."""
        if not async_finish:
            self.compute.wait_stream(self.comm)
            return EventOverlap()
        for tensor in in_flight:
            if tensor is not None:
                tensor.record_stream(self.comm)
                if self.allocate_on_comm_stream:
                    tensor.record_stream(self.compute)
        event = torch.cuda.Event()
        event.record(self.comm)
        return EventOverlap(event)


class NormalCounts:
    """What a normal-mode dispatch learns at its one host sync, from every rank's record."""

    def __init__(self, records: Tensor, rank: int, expert_alignment: int) -> None:
        """records: host int64 [R, L], rank-major: RECORD_FIELDS, R send counts, then the counts of
        this rank's E/R experts (whoever made the records cut them to this rank's experts)."""
        num_ranks = records.shape[0]
        first_count = len(RECORD_FIELDS)
        counts = records[:, first_count:first_count + num_ranks]  # [source, destination]
        self.send_counts = tuple(counts[rank].tolist())
        self.recv_counts = tuple(counts[:, rank].tolist())
        self.num_recv = sum(self.recv_counts)
        recv_totals = counts.sum(0).tolist()
        check_receive_totals(recv_totals)
        # The most rows a rank's receive region holds: a dispatch receives, a combine gets its sends back.
        self.max_recv_rows = max(recv_totals)
        self.max_send_rows = max(counts.sum(1).tolist())
        per_expert = records[:, first_count + num_ranks:].sum(0).tolist()
        self.num_recv_tokens_per_expert_list = [-(-n // expert_alignment) * expert_alignment for n in per_expert]


class CudaTransport:
    """The part of a CUDA transport that does not depend on how rows travel. Subclasses implement
    ``_dispatch_normal``, ``_dispatch_padded``, ``cached_dispatch`` and ``combine``."""

    name = "cuda"
    # What a user does once the ranks are out of step (the collectives of the group are, for nccl).
    recovery = "create a new process group and Buffer"

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.rank = group.rank()
        self.num_ranks = group.size()
        self.device = device
        self.comm_stream = torch.cuda.Stream(device)
        # Allocated on the communication stream, where every kernel that writes it runs.
        with torch.cuda.stream(self.comm_stream):
            self.error_flag = torch.zeros(1, dtype=torch.int32, device=device)
        self.kernels = CudaKernels(self.error_flag)
        self._out_of_step: Optional[str] = None

    # ------------------------------------------------------------------------------------------
    # Plumbing
    # ------------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        """Raises RuntimeError when an earlier failure left the ranks out of step."""
        if self._out_of_step is not None:
            raise RuntimeError(f"eplib: this Buffer's ranks are out of step since an earlier exchange failed "
                               f"({self._out_of_step}); {self.recovery}")

    @contextlib.contextmanager
    def _call(self, previous_event: Optional[EventOverlap], allocate_on_comm_stream: bool) -> Iterator[CallStreams]:
        """One call: checks the transport, then runs the body with the communication stream current."""
        self._check_usable()
        # eplib's own (static) CUDA runtime launches on its current device: make it this one.
        _C.cuda_set_device(self.device.index)
        streams = CallStreams(self.comm_stream, previous_event, allocate_on_comm_stream)
        try:
            with torch.cuda.stream(self.comm_stream):
                yield streams
        except BaseException:
            # Inputs may still be read on the communication stream: order their reuse after it.
            streams.compute.wait_stream(self.comm_stream)
            raise

    def _flag_if(self, condition: Tensor, bit: int) -> None:
        """error_flag |= bit where the 0-dim bool ``condition`` holds, on the device."""
        self.error_flag.bitwise_or_(condition.to(torch.int32) * bit)

    def _check_inputs_on_device(self, send_counts: Tensor, num_tokens_per_rank: Tensor,
                                num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor],
                                topk_weights: Optional[Tensor]) -> None:
        """Flags what the cpu transport checks on the host before its first collective: layout tensors
        that disagree with each other, expert ids out of range, weights that are not finite."""
        self._flag_if((send_counts != num_tokens_per_rank).any(), ERR_RANK_COUNTS)
        if topk_idx is None:
            self._flag_if((num_tokens_per_expert < 0).any(), ERR_EXPERT_COUNTS)
            return
        num_tokens, num_experts = topk_idx.shape[0], num_tokens_per_expert.shape[0]
        per_rank = torch.empty(self.num_ranks, dtype=torch.int32, device=self.device)
        per_expert = torch.empty(num_experts, dtype=torch.int32, device=self.device)
        in_rank = torch.empty(num_tokens, self.num_ranks, dtype=torch.bool, device=self.device)
        # Also flags expert ids out of range.
        self.kernels.dispatch_layout(topk_idx, self.num_ranks, per_rank, per_expert, in_rank)
        self._flag_if((per_expert != num_tokens_per_expert).any(), ERR_EXPERT_COUNTS)
        self._flag_if(~torch.isfinite(topk_weights).all(), ERR_WEIGHT)

    def _check_records(self, records: Tensor) -> None:
        """Raises on every rank alike when a rank's error flag is set or the ranks' formats differ.
        records: host int64 [R, L] starting with RECORD_FIELDS."""
        def column(name: str) -> List[int]:
            return records[:, RECORD_FIELDS.index(name)].tolist()

        flags = column("error_flag")
        if flags[self.rank]:
            self.error_flag.zero_()  # reported now; the next call starts clean
            raise ValueError(f"{describe_error_flag(flags[self.rank])} (found on the device by this or an earlier "
                             f"call of this Buffer on rank {self.rank} since the last normal-mode dispatch)")
        flagged = [r for r, flag in enumerate(flags) if flag]
        if flagged:
            raise RuntimeError(f"eplib: dispatch abandoned on rank {self.rank}: rank(s) {flagged} found bad input "
                               f"on the device (their ValueError says what)")
        check_format_agreement(column, self.num_ranks)

    def _device_counts(self, call: CallStreams, counts: Tensor) -> Tuple[Tensor, Tensor]:
        """From the device counts [source, destination] of every rank: (rank_prefix_matrix int32 [R, R],
        this rank's receive counts int32 [R]), both on the device."""
        rank_prefix_matrix = call.empty(self.num_ranks, self.num_ranks, dtype=torch.int32)
        rank_prefix_matrix.copy_(counts.cumsum(0))
        recv_counts = call.empty(self.num_ranks, dtype=torch.int32)
        recv_counts.copy_(counts[:, self.rank])
        return rank_prefix_matrix, recv_counts

    def _unpack(self, call: CallStreams, recv_buffer: Rows, recv_counts: Tensor, slot_rows: int, num_rows: int,
                x: Tensor, x_scales: Optional[Tensor], num_topk: int, num_local_experts: int,
                num_recv: Optional[Tensor], **peer_args):
        """Received rows -> (recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights), each
        with num_rows rows; the kernel writes the padding rows (zero, -1 indices) too."""
        recv_x = call.empty(num_rows, x.shape[1], dtype=x.dtype)
        recv_x_scales = call.empty(num_rows, x_scales.shape[1], dtype=x_scales.dtype) if x_scales is not None else None
        recv_src_idx = call.empty(num_rows, dtype=torch.int32)
        recv_topk_idx = call.empty(num_rows, num_topk, dtype=torch.int64) if num_topk else None
        recv_topk_weights = call.empty(num_rows, num_topk, dtype=torch.float32) if num_topk else None
        self.kernels.dispatch_unpack(recv_buffer, recv_counts, slot_rows, row_bytes(x), row_bytes(x_scales),
                                     num_topk, num_local_experts, recv_x, recv_x_scales, recv_src_idx, recv_topk_idx,
                                     recv_topk_weights, num_recv, **peer_args)
        return recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights

    @staticmethod
    def _normal_handle(counts: NormalCounts, rank_prefix_matrix: Tensor, recv_counts: Tensor, recv_src_idx: Tensor,
                       is_token_in_rank: Tensor, send_pos: Tensor, hidden: int) -> DispatchHandle:
        """The handle of a normal-mode dispatch: host counts, device prefix matrix and receive counts."""
        return DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix,
            send_counts=counts.send_counts,
            recv_counts=counts.recv_counts,
            recv_src_idx=recv_src_idx,
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            num_recv_tokens=counts.num_recv,
            hidden=hidden,
            slot_rows=0,
            device_recv_counts=recv_counts,
            max_recv_rows=counts.max_recv_rows,
            max_send_rows=counts.max_send_rows,
        )

    def _finish_padded(self, call: CallStreams, recv_buffer: Rows, counts: Tensor, x: Tensor,
                       x_scales: Optional[Tensor], is_token_in_rank: Tensor, num_topk: int, num_experts: int,
                       num_worst_tokens: int, send_pos: Tensor, send_counts: Tensor, peer_args: dict):
        """Unpacks a num_worst_tokens exchange (slot layout) and makes its handle, on the device only.
        counts: device int32 [R, R], [source, destination]."""
        rank_prefix_matrix, recv_counts = self._device_counts(call, counts)
        num_recv = call.empty(1, dtype=torch.int32)
        outputs = self._unpack(call, recv_buffer, recv_counts, num_worst_tokens, num_worst_tokens, x, x_scales,
                               num_topk, num_experts // self.num_ranks, num_recv, **peer_args)
        recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights = outputs
        handle = DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix,
            send_counts=send_counts,
            recv_counts=recv_counts,
            recv_src_idx=recv_src_idx,
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            num_recv_tokens=num_recv,
            hidden=x.shape[1],
            slot_rows=num_worst_tokens,
            device_recv_counts=recv_counts,
            max_recv_rows=self.num_ranks * num_worst_tokens,
            max_send_rows=self.num_ranks * num_worst_tokens,
        )
        return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, [], handle

    def _receive_cached(self, call: CallStreams, recv_buffer: Rows, x: Tensor, x_scales: Optional[Tensor],
                        handle: DispatchHandle, **peer_args):
        """The receiving end of a cached dispatch: recv_buffer unpacked along the handle. Returns
        ((recv_x, recv_x_scales), the tensors in flight for call.finish)."""
        recv_x, recv_x_scales, *_ = self._unpack(call, recv_buffer, handle.device_recv_counts, handle.slot_rows,
                                                 handle.num_output_rows, x, x_scales, 0, 0, None, **peer_args)
        return (recv_x, recv_x_scales), (x, x_scales, recv_x, recv_x_scales) + handle_tensors(handle)

    def _receive_combine(self, call: CallStreams, recv_buffer: Rows, x: Tensor, handle: DispatchHandle,
                         topk_weights: Optional[Tensor], bias_0: Optional[Tensor], bias_1: Optional[Tensor],
                         **peer_args):
        """The receiving end of a combine: the per-token reduction of recv_buffer. Returns
        ((combined_x, combined_topk_weights), the tensors in flight for call.finish)."""
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        combined_x = call.empty(handle.num_tokens, x.shape[1], dtype=x.dtype)
        combined_topk_weights = call.empty(handle.num_tokens, num_topk, dtype=torch.float32) if num_topk else None
        self.kernels.combine_reduce(recv_buffer, handle.send_pos, bias_0, bias_1, combined_x, combined_topk_weights,
                                    **peer_args)
        in_flight = (x, topk_weights, bias_0, bias_1, combined_x, combined_topk_weights) + handle_tensors(handle)
        return (combined_x, combined_topk_weights), in_flight

    # ------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: Tensor, num_experts: int, *, previous_event: Optional[EventOverlap],
                            async_finish: bool, allocate_on_comm_stream: bool, num_sms: int = 0
                            ) -> Tuple[Tuple[Tensor, Tensor, Tensor], EventOverlap]:
        """topk_idx int64 [T, K] -> ((num_tokens_per_rank int32 [R], num_tokens_per_expert int32 [E],
        is_token_in_rank bool [T, R]), event). Ids out of range are flagged, not raised (no host sync)."""
        with self._call(previous_event, allocate_on_comm_stream) as call:
            num_tokens = topk_idx.shape[0]
            num_tokens_per_rank = call.empty(self.num_ranks, dtype=torch.int32)
            num_tokens_per_expert = call.empty(num_experts, dtype=torch.int32)
            is_token_in_rank = call.empty(num_tokens, self.num_ranks, dtype=torch.bool)
            self.kernels.dispatch_layout(topk_idx, self.num_ranks, num_tokens_per_rank, num_tokens_per_expert,
                                         is_token_in_rank)
            outputs = (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank)
            return outputs, call.finish(async_finish, (topk_idx,) + outputs)

    def dispatch(self, x: Tensor, x_scales: Optional[Tensor], num_tokens_per_rank: Tensor, is_token_in_rank: Tensor,
                 num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                 expert_alignment: int, num_worst_tokens: int, *, previous_event: Optional[EventOverlap],
                 async_finish: bool, allocate_on_comm_stream: bool, num_sms: int = 0):
        """See ``Buffer.dispatch``. Returns ((recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle), event)."""
        inputs = (x, x_scales, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
        with self._call(previous_event, allocate_on_comm_stream) as call:
            self._before_dispatch(x, x_scales, topk_idx, num_tokens_per_expert.shape[0], num_worst_tokens)
            num_tokens = x.shape[0]
            slot_rows = num_worst_tokens  # 0 = normal mode (contiguous regions, host-known counts)
            send_pos = call.empty(num_tokens, self.num_ranks, dtype=torch.int32)
            send_counts = call.empty(self.num_ranks, dtype=torch.int32)
            self.kernels.send_positions(is_token_in_rank, slot_rows, send_pos, send_counts)
            expected_counts = num_tokens_per_rank
            if slot_rows > 0:
                # Rows beyond a slot were flagged (ERR_OVERFLOW) and dropped: count only rows sent,
                # and compare within the slot so an overflow is not also reported as a mismatch.
                send_counts.clamp_(max=slot_rows)
                expected_counts = num_tokens_per_rank.clamp(max=slot_rows)
            self._check_inputs_on_device(send_counts, expected_counts, num_tokens_per_expert, topk_idx, topk_weights)
            layout = (x, x_scales, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
            if num_worst_tokens > 0:
                result = self._dispatch_padded(call, *layout, num_worst_tokens, send_pos, send_counts, num_sms)
            else:
                result = self._dispatch_normal(call, *layout, expert_alignment, send_pos, send_counts, num_sms)
            recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, _, handle = result
            in_flight = inputs + (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights) + handle_tensors(handle)
            return result, call.finish(async_finish, in_flight)

    def _before_dispatch(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor],
                         num_experts: int, num_worst_tokens: int) -> None:
        """Host checks a transport makes before a dispatch launches anything (none by default)."""


def handle_tensors(handle: DispatchHandle) -> Tuple[Tensor, ...]:
    """The device tensors of a handle (the others are host values)."""
    return tuple(value for value in handle if isinstance(value, torch.Tensor))


def normal_records_for_rank(records: Tensor, rank: int, num_ranks: int) -> Tensor:
    """Full records [R, fields + R + E] -> the same with only rank's E/R expert counts."""
    first_expert = len(RECORD_FIELDS) + num_ranks
    num_local = (records.shape[1] - first_expert) // num_ranks
    start = first_expert + rank * num_local
    return torch.cat([records[:, :first_expert], records[:, start:start + num_local]], dim=1)

