"""The nccl transport: eplib's CUDA kernels for layout, packing and reduction, ``torch.distributed``
collectives (NCCL) for the exchange, on a communication stream that the Buffer owns.

Collectives per call (all on the communication stream):
    get_dispatch_layout   none.
    dispatch, normal      an all-gather of one int64 record per rank, [error flag | format fields |
                          R send counts | E per-expert counts], then ONE host sync that reads the
                          records (split sizes, per-expert counts, every rank's error flag and
                          format), then an all-to-all of the packed rows with those split sizes.
    dispatch, num_worst_tokens = W > 0 ("padded")
                          an all-gather of the int32 [R] send counts (on the device: it gives
                          handle[0], the whole [R, R] matrix), then an all-to-all with equal split
                          sizes of W rows per peer: source s's rows for rank r sit in slot rows
                          [r*W, (r+1)*W) of its send region. No host sync, so it can be captured
                          in a CUDA graph. Each rank sends and receives R*W packed rows whatever
                          the real counts: R*W*S bytes with S the packed row size
                          (``_C.dispatch_row_stride``: x, FP8 scales, source index, K ids and
                          weights, each part 16-byte aligned), where the normal mode moves the
                          real rows only; cached dispatch and combine of such a handle move
                          R*W rows too.
                          All ranks must pass the same W (and, in both modes, the same E): the
                          record and slot sizes follow from them, and NCCL cannot tell a size
                          mismatch from a slow peer (the call hangs until NCCL's watchdog). The
                          other format fields (K, dtype, H, FP8 scales) are compared on the host
                          in normal mode, as the cpu transport does.
    cached dispatch       one all-to-all (split sizes from the handle, or slots); no host sync.
    combine               one all-to-all (the inverse placement); no host sync.

Errors. Argument checks that need the values (expert ids in range, finite weights, the layout
tensors agreeing with each other, rows beyond W) run on the device and OR bits into the Buffer's
device error flag (int32 [1]) instead of stopping the host. The flag travels in the record of the
next normal-mode dispatch and is read at its host sync: the rank whose flag is set raises
ValueError naming the problem (then clears the flag), every other rank raises RuntimeError, and
no payload moves, so the group stays usable. Calls that never sync (get_dispatch_layout, padded
and cached dispatch, combine) therefore report bad input at the next normal-mode dispatch; inputs
flagged bad are treated as masked (-1 ids) or dropped (rows past W), never read out of bounds.

Waits. The host waits on a peer only at the normal-mode counts exchange, with the
``EPLIB_TIMEOUT_S`` limit (collectives.py). The payload all-to-all and the whole padded path are
waited on by the communication stream only (no host wait, so that async_finish overlaps and graph
capture works); a peer that never arrives there is caught by NCCL's watchdog after the process
group's own timeout (``init_process_group(timeout=...)``), not by EPLIB_TIMEOUT_S.

Staging through gloo. When the group's backend is gloo (no NCCL), each collective copies its
input to the host, runs the gloo collective with the EPLIB_TIMEOUT_S limit and copies the result
back. This exists so that N processes sharing one GPU can test the multi-rank logic (NCCL before
2.30 refuses two ranks on one GPU). It is slow, synchronizes the host at every collective and
cannot be captured in a CUDA graph.
"""

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import _C
from .._dtypes import KERNEL_DTYPE_CODES, WIRE_DTYPE_IDS
from ..collectives import CollectiveError, all_gather, all_to_all
from ..event import EventOverlap
from ..handle import DispatchHandle
from .records import check_format_agreement, check_receive_totals

Tensor = torch.Tensor

# Error bits set by the CUDA kernels (csrc/include/eplib/errors.h).
ERR_EXPERT_ID = _C.ERR_EXPERT_ID
ERR_WEIGHT = _C.ERR_WEIGHT
ERR_OVERFLOW = _C.ERR_OVERFLOW
# Error bits this transport sets with torch ops on the device.
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
# fields that must agree on all ranks (records.FORMAT_FIELDS).
_RECORD_FIELDS = ("error_flag", "num_experts", "num_topk", "x_dtype", "hidden", "scales_per_token")


def describe_error_flag(flag: int) -> str:
    """The problems named by the bits of a device error flag, joined with '; '."""
    known = [message for bit, message in _ERROR_MESSAGES.items() if flag & bit]
    unknown = flag & ~sum(_ERROR_MESSAGES)
    if unknown:
        known.append(f"unknown error bits {unknown:#x}")
    return "; ".join(known)


def _ptr(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _row_bytes(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.shape[1] * tensor.element_size()


class CudaKernels:
    """eplib._C's CUDA kernels (API: scratch issue3_api.md) called with tensors.

    Every kernel runs on the current stream and ORs problems it finds into ``error_flag``
    (int32 [1] on the device) instead of failing; none synchronizes or allocates.
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
                      topk_weights: Optional[Tensor], num_experts: int, send_pos: Tensor, send_buffer: Tensor) -> None:
        """Rows of x (and scales, source index, ids, weights) -> their send_pos rows of send_buffer (uint8)."""
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_tokens, num_ranks = send_pos.shape
        _C.cuda_dispatch_pack(_ptr(x), _row_bytes(x), _ptr(x_scales), _row_bytes(x_scales), _ptr(topk_idx),
                              _ptr(topk_weights), num_topk, num_experts, send_pos.data_ptr(), num_tokens, num_ranks,
                              send_buffer.data_ptr(), self.error_flag.data_ptr(), self._stream())

    def dispatch_unpack(self, recv_buffer: Tensor, recv_counts: Tensor, slot_rows: int, x_bytes: int,
                        scales_bytes: int, num_topk: int, num_local_experts: int, recv_x: Tensor,
                        recv_x_scales: Optional[Tensor], recv_src_idx: Tensor, recv_topk_idx: Optional[Tensor],
                        recv_topk_weights: Optional[Tensor], num_recv_out: Optional[Tensor]) -> None:
        """Received rows -> compacted outputs in source order, padded to recv_x's rows (zeros, -1 indices).
        recv_counts: device int32 [R]. num_recv_out: device int32 [1], rows really received."""
        _C.cuda_dispatch_unpack(recv_buffer.data_ptr(), recv_counts.data_ptr(), recv_counts.shape[0], slot_rows,
                                recv_x.shape[0], x_bytes, scales_bytes, num_topk, num_local_experts,
                                recv_x.data_ptr(), _ptr(recv_x_scales), recv_src_idx.data_ptr(), _ptr(recv_topk_idx),
                                _ptr(recv_topk_weights), 0, _ptr(num_recv_out), self.error_flag.data_ptr(),
                                self._stream())

    def combine_pack(self, x: Tensor, topk_weights: Optional[Tensor], recv_counts: Tensor, slot_rows: int,
                     send_buffer: Tensor) -> None:
        """Expert outputs x [N, H] (and weights [N, K]) -> combine rows at their source's place."""
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        _C.cuda_combine_pack(x.data_ptr(), _row_bytes(x), _ptr(topk_weights), num_topk, recv_counts.data_ptr(),
                             recv_counts.shape[0], slot_rows, x.shape[0], send_buffer.data_ptr(), self._stream())

    def combine_reduce(self, recv_buffer: Tensor, send_pos: Tensor, bias_0: Optional[Tensor],
                       bias_1: Optional[Tensor], combined_x: Tensor, combined_topk_weights: Optional[Tensor]) -> None:
        """Per token: bias, then its rows from ranks 0..R-1 in order, summed in fp32, cast to x's dtype."""
        num_tokens, num_ranks = send_pos.shape
        num_topk = combined_topk_weights.shape[1] if combined_topk_weights is not None else 0
        _C.cuda_combine_reduce(KERNEL_DTYPE_CODES[combined_x.dtype], recv_buffer.data_ptr(), combined_x.shape[1],
                               num_topk, send_pos.data_ptr(), num_tokens, num_ranks, _ptr(bias_0), _ptr(bias_1),
                               combined_x.data_ptr(), _ptr(combined_topk_weights), self._stream())


class _CallStreams:
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


class NcclTransport:
    """Dispatch and combine for CUDA tensors on one device over a torch.distributed group.

    The group's backend is NCCL (production), or gloo, whose collectives are then staged through
    host memory (tests with several processes on one GPU; see the module docstring).
    """

    name = "nccl"

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        backend = str(dist.get_backend(group))
        if "nccl" in backend:
            self.staged = False
        elif "gloo" in backend:
            self.staged = True
        else:
            raise ValueError(f"group: CUDA tensors need a group with the nccl backend (or gloo, staged through host "
                             f"memory), this group uses {backend!r}")
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

    @contextlib.contextmanager
    def _call(self, previous_event: Optional[EventOverlap], allocate_on_comm_stream: bool
              ) -> Iterator[_CallStreams]:
        """One call: checks the group, then runs the body with the communication stream current."""
        if self._out_of_step is not None:
            raise RuntimeError(f"eplib: this Buffer's group is out of step since an earlier collective failed "
                               f"({self._out_of_step}); create a new process group and Buffer")
        streams = _CallStreams(self.comm_stream, previous_event, allocate_on_comm_stream)
        try:
            with torch.cuda.stream(self.comm_stream):
                yield streams
        except BaseException:
            # Inputs may still be read on the communication stream: order their reuse after it.
            streams.compute.wait_stream(self.comm_stream)
            raise

    def _all_gather(self, output: Tensor, input: Tensor, phase: str, host_wait: bool) -> None:
        """All-gather ``input`` of every rank into ``output`` (rank-major), on the current (comm) stream."""
        if self.staged:
            host_output = torch.empty(output.shape, dtype=output.dtype)
            self._collective(all_gather, host_output, input.cpu(), phase=phase)
            output.copy_(host_output)
        else:
            self._collective(all_gather, output, input, phase=phase, host_wait=host_wait)

    def _all_to_all(self, output: Tensor, input: Tensor, output_split_sizes: Optional[List[int]],
                    input_split_sizes: Optional[List[int]], phase: str) -> None:
        """``all_to_all_single`` on the current (comm) stream; the host does not wait (unless staged)."""
        if self.staged:
            host_output = torch.empty(output.shape, dtype=output.dtype)
            self._collective(all_to_all, host_output, input.cpu(), output_split_sizes, input_split_sizes,
                             phase=phase)
            output.copy_(host_output)
        else:
            self._collective(all_to_all, output, input, output_split_sizes, input_split_sizes, phase=phase,
                             host_wait=False)

    def _collective(self, collective, *args, phase: str, **kwargs) -> None:
        """Runs collective(*args, group, phase, **kwargs); a failure marks the group out of step."""
        try:
            collective(*args, self.group, phase, **kwargs)
        except CollectiveError as error:
            self._out_of_step = str(error)
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

    # ------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: Tensor, num_experts: int, *, previous_event: Optional[EventOverlap],
                            async_finish: bool, allocate_on_comm_stream: bool
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
                 async_finish: bool, allocate_on_comm_stream: bool):
        """See ``Buffer.dispatch``. Returns ((recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle), event)."""
        inputs = (x, x_scales, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
        with self._call(previous_event, allocate_on_comm_stream) as call:
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
            if num_worst_tokens > 0:
                result = self._dispatch_padded(call, x, x_scales, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                               topk_weights, num_worst_tokens, send_pos, send_counts)
            else:
                result = self._dispatch_normal(call, x, x_scales, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                               topk_weights, expert_alignment, send_pos, send_counts)
            recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, _, handle = result
            in_flight = inputs + (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights) + _handle_tensors(handle)
            return result, call.finish(async_finish, in_flight)

    def _exchange_normal_records(self, x: Tensor, x_scales: Optional[Tensor], num_tokens_per_expert: Tensor,
                                 num_topk: int, send_counts: Tensor) -> Tuple[Tensor, Tensor]:
        """All-gathers [error flag | format fields | send counts | per-expert counts] and reads it on the
        host (the one host sync of a normal-mode dispatch). Returns (device int64 [R, L], host copy)."""
        num_experts = num_tokens_per_expert.shape[0]
        num_fields = len(_RECORD_FIELDS)
        record = torch.empty(num_fields + self.num_ranks + num_experts, dtype=torch.int64, device=self.device)
        record[:1].copy_(self.error_flag)  # every flag bit of this and earlier calls, in stream order
        # fill_ writes host values without a host-to-device copy (a pageable one would sync the stream).
        for index, value in enumerate((num_experts, num_topk, WIRE_DTYPE_IDS[x.dtype], x.shape[1],
                                       x_scales.shape[1] if x_scales is not None else 0), start=1):
            record[index].fill_(value)
        record[num_fields:num_fields + self.num_ranks].copy_(send_counts)
        record[num_fields + self.num_ranks:].copy_(num_tokens_per_expert)
        gathered = torch.empty(self.num_ranks * record.numel(), dtype=torch.int64, device=self.device)
        self._all_gather(gathered, record, "dispatch (counts exchange)", host_wait=True)
        gathered = gathered.view(self.num_ranks, record.numel())
        return gathered, gathered.cpu()

    def _check_records(self, records: Tensor) -> None:
        """Raises on every rank alike when a rank's error flag is set or the ranks' formats differ."""
        def column(name: str) -> List[int]:
            return records[:, _RECORD_FIELDS.index(name)].tolist()

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

    def _dispatch_normal(self, call: _CallStreams, x: Tensor, x_scales: Optional[Tensor], is_token_in_rank: Tensor,
                         num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                         expert_alignment: int, send_pos: Tensor, send_counts: Tensor):
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_experts = num_tokens_per_expert.shape[0]
        num_local = num_experts // self.num_ranks
        device_records, records = self._exchange_normal_records(x, x_scales, num_tokens_per_expert, num_topk,
                                                                send_counts)
        self._check_records(records)
        first_count = len(_RECORD_FIELDS)
        counts = records[:, first_count:first_count + self.num_ranks]  # [source, destination]
        host_send_counts = tuple(counts[self.rank].tolist())
        host_recv_counts = tuple(counts[:, self.rank].tolist())
        num_recv = sum(host_recv_counts)
        check_receive_totals(counts.sum(0).tolist())
        first_expert = first_count + self.num_ranks + self.rank * num_local
        per_expert = records[:, first_expert:first_expert + num_local].sum(0).tolist()
        num_recv_tokens_per_expert_list = [-(-n // expert_alignment) * expert_alignment for n in per_expert]

        device_counts = device_records[:, first_count:first_count + self.num_ranks]
        stride = _C.dispatch_row_stride(_row_bytes(x), _row_bytes(x_scales), num_topk)
        send_buffer = torch.empty(sum(host_send_counts) * stride, dtype=torch.uint8, device=self.device)
        self.kernels.dispatch_pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, send_buffer)
        recv_buffer = torch.empty(num_recv * stride, dtype=torch.uint8, device=self.device)
        self._all_to_all(recv_buffer, send_buffer, [n * stride for n in host_recv_counts],
                         [n * stride for n in host_send_counts], "dispatch (payload)")
        recv_counts = call.empty(self.num_ranks, dtype=torch.int32)
        recv_counts.copy_(device_counts[:, self.rank])
        outputs = self._unpack(call, recv_buffer, recv_counts, 0, num_recv, x, x_scales, num_topk, num_local, None)
        recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights = outputs
        handle = DispatchHandle(
            rank_prefix_matrix=self._prefix_matrix(call, device_counts),
            send_counts=host_send_counts,
            recv_counts=host_recv_counts,
            recv_src_idx=recv_src_idx,
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            num_recv_tokens=num_recv,
            hidden=x.shape[1],
            slot_rows=0,
            device_recv_counts=recv_counts,
        )
        return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle

    def _dispatch_padded(self, call: _CallStreams, x: Tensor, x_scales: Optional[Tensor], is_token_in_rank: Tensor,
                         num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                         num_worst_tokens: int, send_pos: Tensor, send_counts: Tensor):
        """The fixed-size exchange: everything stays on the device (see the module docstring)."""
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_experts = num_tokens_per_expert.shape[0]
        slot_rows = num_worst_tokens
        stride = _C.dispatch_row_stride(_row_bytes(x), _row_bytes(x_scales), num_topk)
        send_buffer = torch.empty(self.num_ranks * slot_rows * stride, dtype=torch.uint8, device=self.device)
        self.kernels.dispatch_pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, send_buffer)
        counts = torch.empty(self.num_ranks * self.num_ranks, dtype=torch.int32, device=self.device)
        self._all_gather(counts, send_counts, "dispatch (counts exchange)", host_wait=False)
        counts = counts.view(self.num_ranks, self.num_ranks)  # [source, destination]
        recv_buffer = torch.empty_like(send_buffer)
        self._all_to_all(recv_buffer, send_buffer, None, None, "dispatch (payload)")
        recv_counts = call.empty(self.num_ranks, dtype=torch.int32)
        recv_counts.copy_(counts[:, self.rank])
        num_recv = call.empty(1, dtype=torch.int32)
        outputs = self._unpack(call, recv_buffer, recv_counts, slot_rows, num_worst_tokens, x, x_scales, num_topk,
                               num_experts // self.num_ranks, num_recv)
        recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights = outputs
        handle = DispatchHandle(
            rank_prefix_matrix=self._prefix_matrix(call, counts),
            send_counts=send_counts,
            recv_counts=recv_counts,
            recv_src_idx=recv_src_idx,
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            num_recv_tokens=num_recv,
            hidden=x.shape[1],
            slot_rows=slot_rows,
            device_recv_counts=recv_counts,
        )
        return recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, [], handle

    def _prefix_matrix(self, call: _CallStreams, counts: Tensor) -> Tensor:
        """rank_prefix_matrix int32 [R, R] from the device counts [source, destination]."""
        matrix = call.empty(self.num_ranks, self.num_ranks, dtype=torch.int32)
        matrix.copy_(counts.cumsum(0))
        return matrix

    def _unpack(self, call: _CallStreams, recv_buffer: Tensor, recv_counts: Tensor, slot_rows: int, num_rows: int,
                x: Tensor, x_scales: Optional[Tensor], num_topk: int, num_local_experts: int,
                num_recv: Optional[Tensor]):
        """Received rows -> (recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights), each
        with num_rows rows; the kernel writes the padding rows (zero, -1 indices) too."""
        recv_x = call.empty(num_rows, x.shape[1], dtype=x.dtype)
        recv_x_scales = call.empty(num_rows, x_scales.shape[1], dtype=x_scales.dtype) if x_scales is not None else None
        recv_src_idx = call.empty(num_rows, dtype=torch.int32)
        recv_topk_idx = call.empty(num_rows, num_topk, dtype=torch.int64) if num_topk else None
        recv_topk_weights = call.empty(num_rows, num_topk, dtype=torch.float32) if num_topk else None
        self.kernels.dispatch_unpack(recv_buffer, recv_counts, slot_rows, _row_bytes(x), _row_bytes(x_scales),
                                     num_topk, num_local_experts, recv_x, recv_x_scales, recv_src_idx, recv_topk_idx,
                                     recv_topk_weights, num_recv)
        return recv_x, recv_x_scales, recv_src_idx, recv_topk_idx, recv_topk_weights

    def _exchange_rows(self, send_buffer: Tensor, stride: int, handle: DispatchHandle, back: bool,
                       phase: str) -> Tensor:
        """All-to-all of packed rows along a handle's layout; ``back``: the combine direction."""
        if handle.slot_rows > 0:
            recv_buffer = torch.empty(self.num_ranks * handle.slot_rows * stride, dtype=torch.uint8,
                                      device=self.device)
            self._all_to_all(recv_buffer, send_buffer, None, None, phase)
            return recv_buffer
        send_counts, recv_counts = handle.send_counts, handle.recv_counts
        if back:  # send what was received from each rank, receive what was sent to it
            send_counts, recv_counts = recv_counts, send_counts
        recv_buffer = torch.empty(sum(recv_counts) * stride, dtype=torch.uint8, device=self.device)
        self._all_to_all(recv_buffer, send_buffer, [n * stride for n in recv_counts],
                         [n * stride for n in send_counts], phase)
        return recv_buffer

    def cached_dispatch(self, x: Tensor, x_scales: Optional[Tensor], handle: DispatchHandle, *,
                        previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool
                        ) -> Tuple[Tuple[Tensor, Optional[Tensor]], EventOverlap]:
        """Dispatch x (and FP8 scales) along the layout of an earlier dispatch: one collective, no host sync."""
        with self._call(previous_event, allocate_on_comm_stream) as call:
            stride = _C.dispatch_row_stride(_row_bytes(x), _row_bytes(x_scales), 0)
            send_rows = self.num_ranks * handle.slot_rows if handle.slot_rows > 0 else sum(handle.send_counts)
            send_buffer = torch.empty(send_rows * stride, dtype=torch.uint8, device=self.device)
            self.kernels.dispatch_pack(x, x_scales, None, None, 0, handle.send_pos, send_buffer)
            recv_buffer = self._exchange_rows(send_buffer, stride, handle, False, "cached dispatch (payload)")
            recv_x, recv_x_scales, *_ = self._unpack(call, recv_buffer, handle.device_recv_counts, handle.slot_rows,
                                                     handle.num_output_rows, x, x_scales, 0, 0, None)
            in_flight = (x, x_scales, recv_x, recv_x_scales) + _handle_tensors(handle)
            return (recv_x, recv_x_scales), call.finish(async_finish, in_flight)

    def combine(self, x: Tensor, handle: DispatchHandle, topk_weights: Optional[Tensor], bias_0: Optional[Tensor],
                bias_1: Optional[Tensor], *, previous_event: Optional[EventOverlap], async_finish: bool,
                allocate_on_comm_stream: bool) -> Tuple[Tuple[Tensor, Optional[Tensor]], EventOverlap]:
        """Send expert outputs back and reduce them per token; see ``Buffer.combine``. No host sync."""
        with self._call(previous_event, allocate_on_comm_stream) as call:
            num_topk = topk_weights.shape[1] if topk_weights is not None else 0
            stride = _C.combine_row_stride(_row_bytes(x), num_topk)
            if handle.slot_rows == 0 and num_topk == 0:
                send_buffer = x.reshape(-1).view(torch.uint8)  # rows are already in the order they go back
            else:
                send_rows = self.num_ranks * handle.slot_rows if handle.slot_rows > 0 else x.shape[0]
                send_buffer = torch.empty(send_rows * stride, dtype=torch.uint8, device=self.device)
                self.kernels.combine_pack(x, topk_weights, handle.device_recv_counts, handle.slot_rows, send_buffer)
            recv_buffer = self._exchange_rows(send_buffer, stride, handle, True, "combine (payload)")
            combined_x = call.empty(handle.num_tokens, x.shape[1], dtype=x.dtype)
            combined_topk_weights = call.empty(handle.num_tokens, num_topk, dtype=torch.float32) if num_topk else None
            self.kernels.combine_reduce(recv_buffer, handle.send_pos, bias_0, bias_1, combined_x,
                                        combined_topk_weights)
            in_flight = (x, topk_weights, bias_0, bias_1, combined_x, combined_topk_weights) + _handle_tensors(handle)
            return (combined_x, combined_topk_weights), call.finish(async_finish, in_flight)


def _handle_tensors(handle: DispatchHandle) -> Tuple[Tensor, ...]:
    """The device tensors of a handle (the others are host values)."""
    return tuple(value for value in handle if isinstance(value, torch.Tensor))
