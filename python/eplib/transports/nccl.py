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

Errors found on the device travel as described in ``transports/device_errors.py``.

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

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _C
from ..collectives import CollectiveError, all_gather, all_to_all
from ..event import EventOverlap
from ..handle import DispatchHandle
from .cuda import CombineOutputs, CudaTransport, NormalCounts, UnpackOutputs, normal_records_for_rank
from .device_errors import RECORD_FIELDS
from .records import format_values
from .streams import CallStreams
from .tensors import as_bytes, row_bytes

Tensor = torch.Tensor


class NcclTransport(CudaTransport):
    """Dispatch and combine for CUDA tensors on one device over a torch.distributed group.

    The group's backend is NCCL (production), or gloo, whose collectives are then staged through
    host memory (tests with several processes on one GPU; see the module docstring).
    """

    name = "nccl"

    def __init__(self, group: dist.ProcessGroup, device: torch.device, context=None) -> None:
        backend = str(dist.get_backend(group))
        if "nccl" in backend:
            self.staged = False
        elif "gloo" in backend:
            self.staged = True
        else:
            raise ValueError(f"group: CUDA tensors need a group with the nccl backend (or gloo, staged through host "
                             f"memory), this group uses {backend!r}")
        super().__init__(group, device, context)

    # ------------------------------------------------------------------------------------------
    # Collectives
    # ------------------------------------------------------------------------------------------

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

    # ------------------------------------------------------------------------------------------
    # Dispatch
    # ------------------------------------------------------------------------------------------

    def _exchange_normal_records(self, x: Tensor, x_scales: Optional[Tensor], num_tokens_per_expert: Tensor,
                                 num_topk: int, send_counts: Tensor) -> Tuple[Tensor, Tensor]:
        """All-gathers [error flag | format fields | send counts | per-expert counts] and reads it on the
        host (the one host sync of a normal-mode dispatch). Returns (device int64 [R, L], host copy)."""
        num_experts = num_tokens_per_expert.shape[0]
        num_fields = len(RECORD_FIELDS)
        record = torch.empty(num_fields + self.num_ranks + num_experts, dtype=torch.int64, device=self.device)
        record[:1].copy_(self.error_flag)  # every flag bit of this and earlier calls, in stream order
        # fill_ writes host values without a host-to-device copy (a pageable one would sync the stream).
        for index, value in enumerate(format_values(x, x_scales, num_experts, num_topk).values(), start=1):
            record[index].fill_(value)
        record[num_fields:num_fields + self.num_ranks].copy_(send_counts)
        record[num_fields + self.num_ranks:].copy_(num_tokens_per_expert)
        gathered = torch.empty(self.num_ranks * record.numel(), dtype=torch.int64, device=self.device)
        self._all_gather(gathered, record, "dispatch (counts exchange)", host_wait=True)
        gathered = gathered.view(self.num_ranks, record.numel())
        return gathered, gathered.cpu()

    def _dispatch_normal(self, call: CallStreams, x: Tensor, x_scales: Optional[Tensor], is_token_in_rank: Tensor,
                         num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                         expert_alignment: int, send_pos: Tensor, send_counts: Tensor, config):
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_experts = num_tokens_per_expert.shape[0]
        num_local = num_experts // self.num_ranks
        device_records, records = self._exchange_normal_records(x, x_scales, num_tokens_per_expert, num_topk,
                                                                send_counts)
        self._check_records(records)
        counts = NormalCounts(normal_records_for_rank(records, self.rank, self.num_ranks), self.rank,
                              expert_alignment)
        first_count = len(RECORD_FIELDS)
        device_counts = device_records[:, first_count:first_count + self.num_ranks]
        stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales), num_topk)
        send_buffer = torch.empty(sum(counts.send_counts) * stride, dtype=torch.uint8, device=self.device)
        self.kernels.dispatch_pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, send_buffer)
        recv_buffer = torch.empty(counts.num_recv * stride, dtype=torch.uint8, device=self.device)
        self._all_to_all(recv_buffer, send_buffer, [n * stride for n in counts.recv_counts],
                         [n * stride for n in counts.send_counts], "dispatch (payload)")
        rank_prefix_matrix, recv_counts = self._device_counts(call, device_counts)
        outputs = UnpackOutputs(call, counts.num_recv, x, x_scales, num_topk, with_count=False)
        self._unpack(outputs, recv_buffer, recv_counts, 0, x, x_scales, num_local)
        handle = self._normal_handle(counts, rank_prefix_matrix, recv_counts, outputs.recv_src_idx, is_token_in_rank,
                                     send_pos, send_counts, x.shape[1])
        return self._dispatch_result(outputs, counts.num_recv_tokens_per_expert_list, handle)

    def _unpack(self, outputs: UnpackOutputs, recv_buffer: Tensor, recv_counts: Tensor, slot_rows: int, x: Tensor,
                x_scales: Optional[Tensor], num_local_experts: int) -> None:
        """The received rows of recv_buffer into the outputs."""
        args = outputs.args(recv_buffer, recv_counts, slot_rows, x, x_scales, num_local_experts, self.error_flag)
        self.kernels.dispatch_unpack(args, (recv_buffer, recv_counts) + outputs.tensors())

    def _dispatch_padded(self, call: CallStreams, x: Tensor, x_scales: Optional[Tensor], is_token_in_rank: Tensor,
                         num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                         num_worst_tokens: int, send_pos: Tensor, send_counts: Tensor, config):
        """The fixed-size exchange: everything stays on the device (see the module docstring)."""
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_experts = num_tokens_per_expert.shape[0]
        slot_rows = num_worst_tokens
        stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales), num_topk)
        send_buffer = torch.empty(self.num_ranks * slot_rows * stride, dtype=torch.uint8, device=self.device)
        self.kernels.dispatch_pack(x, x_scales, topk_idx, topk_weights, num_experts, send_pos, send_buffer)
        counts = torch.empty(self.num_ranks * self.num_ranks, dtype=torch.int32, device=self.device)
        self._all_gather(counts, send_counts, "dispatch (counts exchange)", host_wait=False)
        counts = counts.view(self.num_ranks, self.num_ranks)  # [source, destination]
        recv_buffer = torch.empty_like(send_buffer)
        self._all_to_all(recv_buffer, send_buffer, None, None, "dispatch (payload)")
        rank_prefix_matrix, recv_counts = self._device_counts(call, counts)
        outputs = UnpackOutputs(call, num_worst_tokens, x, x_scales, num_topk, with_count=True)
        self._unpack(outputs, recv_buffer, recv_counts, num_worst_tokens, x, x_scales, num_experts // self.num_ranks)
        handle = self._padded_handle(rank_prefix_matrix, recv_counts, outputs, is_token_in_rank, send_pos,
                                     send_counts, x.shape[1], num_worst_tokens)
        return self._dispatch_result(outputs, [], handle)

    # ------------------------------------------------------------------------------------------
    # Cached dispatch and combine
    # ------------------------------------------------------------------------------------------

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
                        previous_event: Optional[EventOverlap], async_finish: bool, allocate_on_comm_stream: bool,
                        config=None) -> Tuple[Tuple[Tensor, Optional[Tensor]], EventOverlap]:
        """Dispatch x (and FP8 scales) along the layout of an earlier dispatch: one collective, no host sync."""
        with self._call(previous_event, allocate_on_comm_stream) as call:
            stride = _C.dispatch_row_stride(row_bytes(x), row_bytes(x_scales), 0)
            send_rows = self.num_ranks * handle.slot_rows if handle.slot_rows > 0 else sum(handle.send_counts)
            send_buffer = torch.empty(send_rows * stride, dtype=torch.uint8, device=self.device)
            self.kernels.dispatch_pack(x, x_scales, None, None, 0, handle.send_pos, send_buffer)
            recv_buffer = self._exchange_rows(send_buffer, stride, handle, False, "cached dispatch (payload)")
            outputs = UnpackOutputs(call, handle.num_output_rows, x, x_scales, 0, with_count=False)
            self._unpack(outputs, recv_buffer, handle.device_recv_counts, handle.slot_rows, x, x_scales, 0)
            in_flight = (x, x_scales, outputs.recv_x, outputs.recv_x_scales) + handle.tensors()
            return (outputs.recv_x, outputs.recv_x_scales), call.finish(async_finish, in_flight)

    def combine(self, x: Tensor, handle: DispatchHandle, topk_weights: Optional[Tensor], bias_0: Optional[Tensor],
                bias_1: Optional[Tensor], *, previous_event: Optional[EventOverlap], async_finish: bool,
                allocate_on_comm_stream: bool, config=None) -> Tuple[Tuple[Tensor, Optional[Tensor]], EventOverlap]:
        """Send expert outputs back and reduce them per token; see ``Buffer.combine``. No host sync."""
        with self._call(previous_event, allocate_on_comm_stream) as call:
            num_topk = topk_weights.shape[1] if topk_weights is not None else 0
            stride = _C.combine_row_stride(row_bytes(x), num_topk)
            if handle.slot_rows == 0 and num_topk == 0:
                send_buffer = as_bytes(x)  # rows are already in the order they go back
            else:
                send_rows = self.num_ranks * handle.slot_rows if handle.slot_rows > 0 else x.shape[0]
                send_buffer = torch.empty(send_rows * stride, dtype=torch.uint8, device=self.device)
                self.kernels.combine_pack(x, topk_weights, handle.device_recv_counts, handle.slot_rows, send_buffer)
            recv_buffer = self._exchange_rows(send_buffer, stride, handle, True, "combine (payload)")
            outputs = CombineOutputs(call, handle, x, num_topk)
            self.kernels.combine_reduce(outputs.args(recv_buffer, handle, bias_0, bias_1),
                                        (recv_buffer, outputs.combined_x, outputs.combined_topk_weights, bias_0,
                                         bias_1) + handle.tensors())
            in_flight = (x, topk_weights, bias_0, bias_1, outputs.combined_x,
                         outputs.combined_topk_weights) + handle.tensors()
            return (outputs.combined_x, outputs.combined_topk_weights), call.finish(async_finish, in_flight)
