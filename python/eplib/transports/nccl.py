"""The nccl transport: eplib's CUDA kernels for layout, packing and reduction, ``torch.distributed``
collectives (NCCL) for the exchange, on a communication stream that the Buffer owns.

Collectives per call (all on the communication stream). Every call starts with the same
all-gather of a fixed-size int64 *call head* per rank (``records.make_header``, the cpu transport's
call header: the call, whether this rank's input failed a check and its message, num_worst_tokens,
the row format, the rows this rank sends to and expects from each rank), so that a rank whose
input failed a check can always join its peers' call (``share_error``, below).
    get_dispatch_layout   none.
    dispatch, normal      the call heads, then an all-gather of [error flag | E per-expert counts]
                          per rank, then ONE host sync that reads both (split sizes, per-expert
                          counts, every rank's error flag, format and call), then an all-to-all of
                          the packed rows with those split sizes.
    dispatch, num_worst_tokens = W > 0 ("padded")
                          the call heads (their send counts stay on the device: they give
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
    cached dispatch       the call heads, then one all-to-all (split sizes from the handle, or
                          slots); no host sync.
    combine               the call heads, then one all-to-all (the inverse placement); no host sync.

One rank's bad input. A rank whose arguments fail a check (in the Buffer, before anything runs)
joins its peers' call before it raises (``share_error``): its head says "rejected" and carries its
message; it reads every head on the host, and then joins the rest of the call that the peers' heads
describe, with zero bytes of the sizes they expect (normal dispatch: the per-expert all-gather; the
other calls: the all-to-all), so the ranks stay in step. A normal-mode dispatch reads the heads at its
host sync: its peers raise ``PeerInputError`` quoting the error there, at once. The calls without a
host sync cannot raise on the host: their peers keep the rejecting rank's head on the device, their
outputs are not valid, and they raise ``PeerInputError`` quoting it at their next normal-mode
dispatch (whose records carry ``ERR_PEER_INPUT``, so that every rank abandons that dispatch alike).
A rank whose get_dispatch_layout fails joins its peers' next call in the same way.

Waits. The host waits on a peer only at the normal-mode dispatch's exchanges of call heads and
per-expert counts, and on a rank whose input failed (``share_error``), with the ``EPLIB_TIMEOUT_S``
limit (collectives.py). The payload all-to-all and the whole padded path are
waited on by the communication stream only (no host wait, so that async_finish overlaps and graph
capture works); a peer that never arrives there is caught by NCCL's watchdog after the process
group's own timeout (``init_process_group(timeout=...)``), not by EPLIB_TIMEOUT_S.

Staging through gloo. When the group's backend is gloo (no NCCL), each collective copies its
input to the host, runs the gloo collective with the EPLIB_TIMEOUT_S limit and copies the result
back. This exists so that N processes sharing one GPU can test the multi-rank logic (NCCL before
2.30 refuses two ranks on one GPU). It is slow, synchronizes the host at every collective and
cannot be captured in a CUDA graph.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _C
from .._dtypes import WIRE_DTYPE_IDS
from ..collectives import CollectiveError, all_gather, all_to_all
from ..event import EventOverlap
from ..exchange import describe_ranks
from ..handle import DispatchHandle
from .cuda import CombineOutputs, CudaTransport, NormalCounts, UnpackOutputs
from .device_errors import ERR_PEER_INPUT, check_records
from .records import (ERROR_WORD, Headers, check_headers, count_slices, format_values, header_words,
                      make_header)
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
        self._head_words = header_words(self.num_ranks)
        self._sends, self._expects = count_slices(self.num_ranks)
        # The host-known part of this rank's call heads, on the device, by (call, W, format): made once,
        # so that a call writes its head with one kernel and no host-to-device copy (graph capture).
        self._head_constants: Dict[tuple, Tensor] = {}
        # [R, head words]: the last head of each rank that rejected its input, seen by a call without a
        # host sync (zeros: none since the last normal-mode dispatch, which reports and clears them).
        self._rejections = self.context.zeros(self.num_ranks * self._head_words, torch.int64).view(
            self.num_ranks, self._head_words)

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
    # Call heads
    # ------------------------------------------------------------------------------------------

    def _exchange_heads(self, call: str, sends: Tensor, expects: Optional[Tensor], num_worst_tokens: int,
                        format_fields: Dict[str, int]) -> Tensor:
        """All-gathers this rank's call head (no host wait) -> every rank's, device int64 [R, words].
        sends / expects: device int32 [R] rows to and from each rank (expects None: not known)."""
        key = (call, num_worst_tokens, expects is None, *format_fields.values())
        constant = self._head_constants.get(key)
        if constant is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # Every rank captures the same calls: all raise alike, before any collective.
                raise RuntimeError(f"eplib: the first {call} of this kind (num_worst_tokens={num_worst_tokens}, "
                                   f"{format_fields}) copies its call head's constant part to the device, which a "
                                   f"CUDA graph capture cannot do: run it once before capturing it (warm-up)")
            constant = make_header(self.num_ranks, 0, call, num_worst_tokens=num_worst_tokens,
                                   **format_fields).to(self.device)
            self._head_constants[key] = constant
        expected = constant[self._expects] if expects is None else expects
        head = torch.cat([constant[:self._sends.start], sends.to(torch.int64), expected.to(torch.int64),
                          constant[self._expects.stop:]])
        return self._gather_heads(head, call, host_wait=False)

    def _gather_heads(self, head: Tensor, call: str, host_wait: bool) -> Tensor:
        gathered = torch.empty(self.num_ranks * self._head_words, dtype=torch.int64, device=self.device)
        self._all_gather(gathered, head, f"{call} (call heads)", host_wait=host_wait)
        return gathered.view(self.num_ranks, self._head_words)

    def _keep_rejections(self, heads: Tensor) -> None:
        """A call without a host sync: the heads of ranks that rejected their input are kept on the
        device, for the next normal-mode dispatch to report (no host sync here)."""
        rejected = heads[:, ERROR_WORD:ERROR_WORD + 1] > 0
        torch.where(rejected, heads, self._rejections, out=self._rejections)

    def share_error(self, call: str, error: Exception) -> None:
        """This rank's input failed a check in ``call`` (records.CALLS): joins the peers' call with a head
        that says so (carrying the message), then the rest of that call as their heads describe it, so
        that every rank stays in step. The caller raises ``error`` afterwards (see _can_share_error)."""
        if not self._can_share_error(error):
            return
        try:
            with self._call(None, False):
                head = make_header(self.num_ranks, 0, call, error=error).to(self.device)
                heads = Headers(self._gather_heads(head, call, host_wait=True).cpu())
                self._join_rest_of_call(heads)
        except CollectiveError:
            pass  # the group is failing: the next call reports it, the caller raises the input error

    def _join_rest_of_call(self, heads: Headers) -> None:
        """After a rejected head: the collectives that the call of the peers' heads issues next, with
        zeros of the sizes the peers expect from this rank."""
        accepted = [r for r in range(self.num_ranks) if r not in heads.failed()]
        if not accepted:
            return  # every rank's input failed: nobody goes on
        peer = accepted[0]
        call = heads.call(peer)
        field = {name: heads.column(name)[peer] for name in ("num_worst_tokens", "num_experts", "num_topk",
                                                               "x_dtype", "hidden", "scales")}
        slot_rows = field["num_worst_tokens"]
        if call == "dispatch" and slot_rows == 0:  # the per-expert counts, then the peers read everything
            words = 1 + field["num_experts"]
            gathered = torch.empty(self.num_ranks * words, dtype=torch.int64, device=self.device)
            self._all_gather(gathered, torch.zeros(words, dtype=torch.int64, device=self.device),
                             "dispatch (expert counts exchange)", host_wait=True)
            return
        x_bytes = field["hidden"] * _WIRE_ELEMENT_BYTES[field["x_dtype"]]
        if call == "combine":
            stride = _C.combine_row_stride(x_bytes, field["num_topk"])
        else:
            stride = _C.dispatch_row_stride(x_bytes, 4 * abs(field["scales"]), field["num_topk"])
        if slot_rows > 0:
            send_sizes = recv_sizes = [slot_rows * stride] * self.num_ranks
        else:  # send each rank what it expects from this one, receive what it sends
            send_sizes = [0 if r == self.rank else int(heads.expects[r, self.rank]) * stride
                          for r in range(self.num_ranks)]
            recv_sizes = [0 if r == self.rank else int(heads.sends[r, self.rank]) * stride
                          for r in range(self.num_ranks)]
        send_buffer = torch.zeros(sum(send_sizes), dtype=torch.uint8, device=self.device)
        recv_buffer = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=self.device)
        self._all_to_all(recv_buffer, send_buffer, recv_sizes, send_sizes, f"{call} (payload)")

    def _peer_input(self) -> str:
        """The kept heads of the ranks that rejected their input in calls without a host sync (host read;
        then cleared)."""
        heads = Headers(self._rejections.cpu())
        self._rejections.zero_()
        failed = heads.failed()
        return f"the input of {describe_ranks(failed)} failed a check in an earlier call ({heads.quote(failed)})"

    # ------------------------------------------------------------------------------------------
    # Dispatch
    # ------------------------------------------------------------------------------------------

    def _exchange_normal_records(self, x: Tensor, x_scales: Optional[Tensor], num_tokens_per_expert: Tensor,
                                 num_topk: int, send_counts: Tensor) -> Tuple[Tensor, Headers, Tensor]:
        """The call heads, then [error flag | per-expert counts] of every rank, read on the host (the one
        host sync of a normal-mode dispatch). Returns (device heads [R, words], their host copy, host
        int64 [R, 1 + E] records)."""
        num_experts = num_tokens_per_expert.shape[0]
        device_heads = self._exchange_heads("dispatch", send_counts, None, 0,
                                            format_values(x, x_scales, num_experts, num_topk))
        record = torch.empty(1 + num_experts, dtype=torch.int64, device=self.device)
        record[:1].copy_(self.error_flag)  # every flag bit of this and earlier calls, in stream order
        # A rejection kept by a call without a host sync is reported now, by every rank alike.
        record[:1].bitwise_or_((self._rejections[:, ERROR_WORD].amax() > 0).to(torch.int64) * ERR_PEER_INPUT)
        record[1:].copy_(num_tokens_per_expert)
        gathered = torch.empty(self.num_ranks * record.numel(), dtype=torch.int64, device=self.device)
        self._all_gather(gathered, record, "dispatch (expert counts exchange)", host_wait=True)
        return device_heads, Headers(device_heads.cpu()), gathered.view(self.num_ranks, record.numel()).cpu()

    def _dispatch_normal(self, call: CallStreams, x: Tensor, x_scales: Optional[Tensor], is_token_in_rank: Tensor,
                         num_tokens_per_expert: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor],
                         expert_alignment: int, send_pos: Tensor, send_counts: Tensor, config):
        num_topk = topk_idx.shape[1] if topk_idx is not None else 0
        num_experts = num_tokens_per_expert.shape[0]
        num_local = num_experts // self.num_ranks
        device_heads, heads, records = self._exchange_normal_records(x, x_scales, num_tokens_per_expert, num_topk,
                                                                     send_counts)
        check_headers(heads, self.rank, "dispatch", None)
        peer_input = self._peer_input() if records[self.rank, 0] & ERR_PEER_INPUT else ""
        check_records(records, self.rank, self.error_flag, self._rejection, lambda: peer_input, check_format=False)
        per_expert = records[:, 1 + self.rank * num_local:1 + (self.rank + 1) * num_local]
        counts = NormalCounts(heads.sends, per_expert, self.rank, expert_alignment)
        device_counts = device_heads[:, self._sends]
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
        heads = self._exchange_heads("dispatch", send_counts, None, num_worst_tokens,
                                     format_values(x, x_scales, num_experts, num_topk))
        self._keep_rejections(heads)
        counts = heads[:, self._sends]  # [source, destination]; zeros from a rank that rejected its input
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
            self._keep_rejections(self._exchange_heads("cached dispatch", _device_send_counts(handle),
                                                       handle.device_recv_counts, handle.slot_rows,
                                                       format_values(x, x_scales, 0, 0)))
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
            # The way back: send what was received from each rank, receive what was sent to it.
            self._keep_rejections(self._exchange_heads("combine", handle.device_recv_counts, _device_send_counts(handle),
                                                       handle.slot_rows, format_values(x, None, 0, num_topk)))
            recv_buffer = self._exchange_rows(send_buffer, stride, handle, True, "combine (payload)")
            outputs = CombineOutputs(call, handle, x, num_topk)
            self.kernels.combine_reduce(outputs.args(recv_buffer, handle, bias_0, bias_1),
                                        (recv_buffer, outputs.combined_x, outputs.combined_topk_weights, bias_0,
                                         bias_1) + handle.tensors())
            in_flight = (x, topk_weights, bias_0, bias_1, outputs.combined_x,
                         outputs.combined_topk_weights) + handle.tensors()
            return (outputs.combined_x, outputs.combined_topk_weights), call.finish(async_finish, in_flight)


def _device_send_counts(handle: DispatchHandle) -> Tensor:
    """int32 [R] rows the handle's dispatch sent to each rank, on the device (its entry 1 views them)."""
    return handle[1].view(-1)


# Bytes of an element of x by the dtype id a call head carries (records.format_values).
_WIRE_ELEMENT_BYTES = {wire_id: dtype.itemsize for dtype, wire_id in WIRE_DTYPE_IDS.items()}
