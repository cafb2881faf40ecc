"""Low-latency mode on CUDA tensors: what the nccl and ipc engines share.

Both run the same CUDA kernels (``csrc/cuda/low_latency.cu``), which place every row where the cpu
engine's kernels do (``eplib/low_latency.h``): a layout kernel (send_slot / send_counts / send_offset),
a pack kernel that writes each row, FP8-cast on the device, into the message of its destination, and
after the exchange an unpack (dispatch) or reduction (combine) kernel. The kernels reach the messages
through device arrays of addresses, one per rank and buffer; the engines differ in where those
addresses point and how the messages travel (``low_latency_nccl.py``: a send and a receive buffer and
one ``all_to_all_single``; ``low_latency_ipc.py``: the peers' slots in CUDA peer memory and flags).

No LL call synchronizes with the host, and every tensor a call allocates has a size fixed by its
arguments (outputs are kept per buffer and reused), so calls can be captured in a CUDA graph.
Problems only the device sees go to the transport's device error flag, as in the normal mode: an
expert id outside [-1, E) (counted as -1), a message that its sender rejected or that belongs to a
call of another format (counted as empty). The flag is reported by the next normal-mode dispatch.

Masks live on the device (int32 [R], then the poison flag): ``low_latency_update_mask_buffer`` and
``low_latency_clean_mask_buffer`` write them on the communication stream, and the kernels neither
write to nor read from a masked rank.
"""

import struct
from typing import Callable, List, Optional, Sequence

import torch

from .. import _C
from ..low_latency import (CombineCall, DispatchCall, DispatchOutputs, LowLatencyHandle, LowLatencyState, flags_bytes,
                           region_bytes, run_receive, zero_copy_source)
from .ipc import _all_gather_bytes
from .tensors import ptr

Tensor = torch.Tensor


class CudaLowLatency:
    """The low-latency calls of one Buffer on a CUDA transport. Subclasses say where messages live
    (``_allocate``) and how they travel (``_before_send``, ``_send``, ``_before_receive``, ``_after_receive``)."""

    name = "cuda"

    def __init__(self, transport, enable_shrink: bool, num_rdma_bytes: int, masked: Sequence[bool]) -> None:
        self.transport = transport
        self.group = transport.group
        self.rank, self.num_ranks = transport.rank, transport.num_ranks
        self.enable_shrink = enable_shrink
        self.num_rdma_bytes = num_rdma_bytes
        self.state = LowLatencyState()
        self.context = transport.context
        self.device = transport.device
        # [R] masks, then the poison flag (set by an ipc wait that timed out without enable_shrink).
        self.mask = self.context.zeros(self.num_ranks + 1, torch.int32)
        for r, is_masked in enumerate(masked):
            if is_masked:
                self.set_masked(r, True)
        self.slot_bytes = 0  # fixed by the first call (a collective): every rank's share of the largest region
        self.messages: List[List[Tensor]] = []  # [direction: 0 send, 1 receive][buffer]: int64 [R] addresses
        self._outputs = DispatchOutputs(self.num_ranks)
        self._zero_copy: List[Optional[Tensor]] = [None, None]

    # --------------------------------------------------------------------------------------------
    # What the engines differ in
    # --------------------------------------------------------------------------------------------

    def _allocate(self, num_bytes: int) -> None:
        """Makes the messages of a region of ``num_bytes`` (the same on every rank) and sets slot_bytes and
        messages."""
        raise NotImplementedError

    def _before_send(self, buffer_index: int) -> None:
        """Before the pack kernel writes the messages of buffer ``buffer_index``."""

    def _send(self, buffer_index: int, phase: str) -> None:
        """After the pack kernel: the messages travel (or are published)."""

    def _before_receive(self, buffer_index: int, wait_stats: Optional[Tensor]) -> None:
        """Before the messages of buffer ``buffer_index`` are read."""

    def _after_receive(self, buffer_index: int) -> None:
        """After they were read."""

    def check_failed(self) -> None:
        """Raises when an earlier call left the ranks out of step (ipc: a wait timed out). Never synchronizes."""
        self.transport._check_usable()

    # --------------------------------------------------------------------------------------------
    # Plumbing
    # --------------------------------------------------------------------------------------------

    def _messages_for(self, message_bytes: int) -> None:
        """Makes the messages at the first call (a collective: every rank makes its first LL call together),
        and checks that a call's messages fit their slots."""
        if not self.messages:
            needed = max(self.num_rdma_bytes, region_bytes(self.num_ranks, message_bytes))
            sizes = _all_gather_bytes(self.group, struct.pack("<q", needed), self.device,
                                      "low-latency buffers (sizes)")
            self._allocate(max(struct.unpack("<q", size)[0] for size in sizes))
        if message_bytes > self.slot_bytes:
            raise ValueError(f"num_rdma_bytes: this low-latency call needs {region_bytes(self.num_ranks, message_bytes)} "
                             f"bytes of low-latency memory per rank, the Buffer has "
                             f"{region_bytes(self.num_ranks, self.slot_bytes)} (sized by its first low-latency call or "
                             f"by num_rdma_bytes); size it with Buffer.get_low_latency_rdma_size_hint")

    def _slot_bytes(self, num_bytes: int) -> int:
        """A rank's message slot in a region of num_bytes (eplib.low_latency.region_bytes)."""
        return (num_bytes - flags_bytes(self.num_ranks)) // (2 * self.num_ranks) // 16 * 16

    def _addresses(self, addresses: Sequence[int]) -> Tensor:
        """Device int64 [R] of message addresses (made once, at the first call)."""
        return torch.tensor(list(addresses), dtype=torch.int64).to(self.device)

    def _launch(self, kernel: Callable, args, tensors: Sequence[Optional[Tensor]]) -> None:
        self.transport.kernels.launch(kernel, args, tensors)

    def _call(self):
        return self.transport._call(None, False)

    # --------------------------------------------------------------------------------------------
    # Calls
    # --------------------------------------------------------------------------------------------

    def dispatch(self, call: DispatchCall, async_finish: bool, return_recv_hook: bool):
        """See Buffer.low_latency_dispatch; returns (recv_x, recv_count, handle, event, hook)."""
        self.check_failed()
        num_tokens, num_topk, num_experts = call.num_tokens, call.num_topk, call.num_experts
        self._messages_for(call.layout()["message_bytes"])
        buffer_index, _ = self.state.next_call("low_latency_dispatch")
        error_flag = self.transport.error_flag
        with self._call() as streams:
            send_slot = streams.empty(num_tokens, num_topk, dtype=torch.int32)
            send_counts = streams.empty(num_experts, dtype=torch.int32)
            send_offset = streams.empty(num_experts, dtype=torch.int32)
            self._launch(_C.cuda_ll_layout, _C.LLLayoutArgs(
                topk_idx=call.topk_idx.data_ptr(), num_tokens=num_tokens, num_topk=num_topk, num_experts=num_experts,
                num_ranks=self.num_ranks, send_slot=ptr(send_slot), send_counts=send_counts.data_ptr(),
                send_offset=send_offset.data_ptr(), error_flag=error_flag.data_ptr()),
                (call.topk_idx, send_slot, send_counts, send_offset))
            self._before_send(buffer_index)
            self._launch(_C.cuda_ll_dispatch_pack, _C.LLDispatchPackArgs(
                x=ptr(call.x), num_tokens=num_tokens, num_max=call.num_max, hidden=call.hidden, num_topk=num_topk,
                num_experts=num_experts, num_ranks=self.num_ranks, format=call.format, rejected=False,
                topk_idx=call.topk_idx.data_ptr(), send_slot=ptr(send_slot), send_counts=send_counts.data_ptr(),
                send_offset=send_offset.data_ptr(), messages=self.messages[0][buffer_index].data_ptr(),
                mask=self.mask.data_ptr()), (call.x, call.topk_idx, send_slot, send_counts, send_offset))
            self._send(buffer_index, "low_latency_dispatch (messages)")
            outputs = self._outputs.get(buffer_index, call, streams.empty)
            event = streams.finish(async_finish, (call.x, call.topk_idx, send_slot, send_counts, send_offset))
        recv_x, recv_scales, src_info, layout_range, recv_count = outputs
        events = [event]

        def receive() -> None:
            with self._call() as streams:
                self._before_receive(buffer_index, call.wait_stats)
                self._launch(_C.cuda_ll_dispatch_unpack, _C.LLDispatchUnpackArgs(
                    messages=self.messages[1][buffer_index].data_ptr(), mask=self.mask.data_ptr(),
                    poisoned=self.mask[self.num_ranks:].data_ptr(), num_max=call.num_max, hidden=call.hidden,
                    num_topk=num_topk, num_experts=num_experts, num_ranks=self.num_ranks, format=call.format,
                    recv_x=recv_x.data_ptr(), recv_scales=ptr(recv_scales), src_info=src_info.data_ptr(),
                    layout_range=layout_range.data_ptr(), recv_count=recv_count.data_ptr(),
                    cumulative_stats=ptr(call.cumulative_stats), error_flag=error_flag.data_ptr()),
                    outputs + (call.cumulative_stats,))
                self._after_receive(buffer_index)
                events.append(streams.finish(async_finish, outputs + (call.cumulative_stats, call.wait_stats)))
            self.check_failed()

        hook = run_receive(self.state, buffer_index, "low_latency_dispatch", receive, return_recv_hook)
        handle = LowLatencyHandle(src_info, layout_range, call.num_max, call.hidden, num_experts, send_slot=send_slot,
                                  send_counts=send_counts, send_offset=send_offset, owner=self)
        recv = (recv_x, recv_scales) if call.use_fp8 else recv_x
        return recv, recv_count, handle, events[-1], hook

    def combine(self, call: CombineCall, async_finish: bool, return_recv_hook: bool):
        """See Buffer.low_latency_combine; returns (combined_x, event, hook)."""
        self.check_failed()
        handle = call.handle
        if handle.owner is not self:
            raise ValueError("handle: made by another Buffer's (or transport's) low_latency_dispatch")
        self._messages_for(call.layout()["message_bytes"])
        x = zero_copy_source(self._zero_copy, self.state, call) if call.zero_copy else call.x
        buffer_index, _ = self.state.next_call("low_latency_combine")
        with self._call() as streams:
            self._before_send(buffer_index)
            self._launch(_C.cuda_ll_combine_pack, _C.LLCombinePackArgs(
                x=x.data_ptr(), layout_range=handle.layout_range.data_ptr(), num_max=call.num_max, hidden=call.hidden,
                num_topk=handle.num_topk, num_experts=call.num_experts, num_ranks=self.num_ranks,
                num_tokens=handle.num_tokens, messages=self.messages[0][buffer_index].data_ptr(),
                mask=self.mask.data_ptr()), (x, handle.layout_range))
            self._send(buffer_index, "low_latency_combine (messages)")
            out = call.out if call.out is not None else streams.empty(handle.num_tokens, call.hidden,
                                                                      dtype=torch.bfloat16)
            event = streams.finish(async_finish, (x, handle.layout_range, out))
        events = [event]

        def receive() -> None:
            with self._call() as streams:
                self._before_receive(buffer_index, call.wait_stats)
                self._launch(_C.cuda_ll_combine_reduce, _C.LLCombineReduceArgs(
                    messages=self.messages[1][buffer_index].data_ptr(), mask=self.mask.data_ptr(),
                    poisoned=self.mask[self.num_ranks:].data_ptr(), num_max=call.num_max, hidden=call.hidden,
                    num_topk=handle.num_topk, num_experts=call.num_experts, num_ranks=self.num_ranks,
                    topk_idx=call.topk_idx.data_ptr(), topk_weights=call.topk_weights.data_ptr(),
                    num_tokens=handle.num_tokens, send_slot=ptr(handle.send_slot),
                    send_offset=handle.send_offset.data_ptr(), out=out.data_ptr(),
                    error_flag=self.transport.error_flag.data_ptr()),
                    (call.topk_idx, call.topk_weights, handle.send_slot, handle.send_offset, out))
                self._after_receive(buffer_index)
                events.append(streams.finish(async_finish, (call.topk_idx, call.topk_weights, out, call.wait_stats)))
            self.check_failed()

        hook = run_receive(self.state, buffer_index, "low_latency_combine", receive, return_recv_hook)
        return out, events[-1], hook

    def next_combine_buffer(self, handle: LowLatencyHandle) -> Tensor:
        """bf16 [E_local, R * num_max, H] that the next combine reads with zero_copy=True (one per buffer,
        kept: its rows are packed into the messages on the device, so nothing waits for the peers here)."""
        self.check_failed()
        buffer_index = self.state.num_calls % 2
        shape = (handle[4] // self.num_ranks, self.num_ranks * handle[2], handle[3])
        if self._zero_copy[buffer_index] is None or tuple(self._zero_copy[buffer_index].shape) != shape:
            with self._call() as streams:
                self._zero_copy[buffer_index] = streams.empty(*shape, dtype=torch.bfloat16)
        return self._zero_copy[buffer_index]

    def reject(self, what: str, error: Exception) -> None:
        """Raises ``error``, a check that this rank's call failed, after taking part in the call's round with
        headers that say so (the peers count it as empty and set their error flag; no host waits for it).
        Before the first call it raises at once."""
        if not self.messages or any(self.state.awaiting):
            raise error
        buffer_index, _ = self.state.next_call(what)
        with self._call() as streams:
            no_counts = self.context.zeros(self.num_ranks, torch.int32)
            self._before_send(buffer_index)
            self._launch(_C.cuda_ll_dispatch_pack, _C.LLDispatchPackArgs(
                num_tokens=0, num_max=1, hidden=1, num_topk=1, num_experts=self.num_ranks, num_ranks=self.num_ranks,
                rejected=True, send_counts=no_counts.data_ptr(), messages=self.messages[0][buffer_index].data_ptr(),
                mask=self.mask.data_ptr()), (no_counts,))
            self._send(buffer_index, f"{what} (rejected round)")
            self._before_receive(buffer_index, None)
            self._after_receive(buffer_index)
            streams.finish(False, (no_counts,))
        raise error

    def clean(self) -> None:
        self.check_failed()
        self.state.check_idle("clean_low_latency_buffer")

    def set_masked(self, rank: int, masked: bool) -> None:
        with self._call():
            self.mask[rank].fill_(int(masked))

    def query_mask(self, mask_status: Tensor) -> None:
        with self._call():
            mask_status.copy_(self.mask[:self.num_ranks])

    def clear_mask(self) -> None:
        with self._call():
            self.mask[:self.num_ranks].zero_()

    def destroy(self) -> None:
        """Frees what the engine holds beyond torch tensors (nothing by default)."""
