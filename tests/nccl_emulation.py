"""The nccl transport's logic on CPU tensors, for machines without a GPU.

``EmulatedKernels`` implements the contract of the CUDA kernels (the API in
``/work/scratch/issue3_api.md``: slot layout, error flag bits, padding rows) with the CPU kernels
plus torch ops; ``EmulatedNcclTransport`` is the real ``NcclTransport`` (records, checks, split
sizes, padded exchange, handles, cached dispatch, combine) with those kernels, no CUDA streams, and
its gloo staging path for the collectives. It tests the transport, not the CUDA kernels: those
are tested by tests/test_gpu_buffer.py on a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from eplib import _C
from eplib._dtypes import KERNEL_DTYPE_CODES
from eplib.event import EventOverlap
from eplib.transports.cuda import ERR_EXPERT_ID, ERR_OVERFLOW, ERR_WEIGHT
from eplib.transports.nccl import NcclTransport
from eplib.transports.tensors import as_bytes, ptr, row_bytes

Tensor = torch.Tensor


class EmulatedKernels:
    """CudaKernels' methods on CPU tensors, with the CUDA contract: bad input sets error bits and is
    treated as masked or dropped instead of raising."""

    def __init__(self, error_flag: Tensor) -> None:
        self.error_flag = error_flag

    def _flag_if(self, condition: Tensor, bit: int) -> None:
        if bool(condition.any()):
            self.error_flag.bitwise_or_(bit)

    def _clean_ids(self, topk_idx: Tensor, num_experts: int) -> Tensor:
        bad = (topk_idx < -1) | (topk_idx >= num_experts)
        self._flag_if(bad, ERR_EXPERT_ID)
        return topk_idx.masked_fill(bad, -1)

    def dispatch_layout(self, topk_idx: Tensor, num_ranks: int, num_tokens_per_rank: Tensor,
                        num_tokens_per_expert: Tensor, is_token_in_rank: Tensor) -> None:
        num_experts = num_tokens_per_expert.shape[0]
        clean = self._clean_ids(topk_idx, num_experts)
        _C.dispatch_layout(clean.data_ptr(), clean.shape[0], clean.shape[1], num_experts, num_ranks,
                           num_tokens_per_rank.data_ptr(), num_tokens_per_expert.data_ptr(),
                           is_token_in_rank.data_ptr())

    def send_positions(self, is_token_in_rank: Tensor, slot_rows: int, send_pos: Tensor,
                       num_tokens_per_rank: Tensor) -> None:
        num_tokens, num_ranks = is_token_in_rank.shape
        _C.send_positions(is_token_in_rank.data_ptr(), num_tokens, num_ranks, send_pos.data_ptr(),
                          num_tokens_per_rank.data_ptr())
        if slot_rows > 0:
            index = is_token_in_rank.to(torch.int32).cumsum(0) - 1  # place among the tokens bound for r
            over = is_token_in_rank & (index >= slot_rows)
            self._flag_if(over, ERR_OVERFLOW)
            slot = index + torch.arange(num_ranks, dtype=torch.int32) * slot_rows
            send_pos.copy_(torch.where(is_token_in_rank & ~over, slot, torch.full_like(slot, -1)))

    def dispatch_pack(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor],
                      topk_weights: Optional[Tensor], num_experts: int, send_pos: Tensor, send_buffer: Tensor) -> None:
        num_tokens, num_ranks = send_pos.shape
        num_topk = 0
        if topk_idx is not None:
            num_topk = topk_idx.shape[1]
            topk_idx = self._clean_ids(topk_idx, num_experts)
            # The CPU kernel rejects a slot whose rank gets no row: the CUDA one drops overflowed rows.
            dest = torch.where(topk_idx >= 0, topk_idx // (num_experts // num_ranks), torch.zeros_like(topk_idx))
            dropped = (topk_idx >= 0) & (send_pos.gather(1, dest) < 0)
            topk_idx = topk_idx.masked_fill(dropped, -1)
            finite = torch.isfinite(topk_weights)
            self._flag_if(~finite, ERR_WEIGHT)
            topk_weights = torch.where(finite, topk_weights, torch.zeros_like(topk_weights))
        # x_scales, when given, is float32 (validation.check_x): row_bytes is shape[1] * 4.
        _C.dispatch_pack(ptr(x), row_bytes(x), ptr(x_scales), row_bytes(x_scales), ptr(topk_idx), ptr(topk_weights),
                         num_topk, num_experts, send_pos.data_ptr(), num_tokens, num_ranks, send_buffer.data_ptr())

    @staticmethod
    def _region_starts(counts: Sequence[int], slot_rows: int) -> list:
        if slot_rows > 0:
            return [s * slot_rows for s in range(len(counts))]
        starts, total = [], 0
        for count in counts:
            starts.append(total)
            total += count
        return starts

    def dispatch_unpack(self, recv_buffer: Tensor, recv_counts: Tensor, slot_rows: int, x_bytes: int,
                        scales_bytes: int, num_topk: int, num_local_experts: int, recv_x: Tensor,
                        recv_x_scales: Optional[Tensor], recv_src_idx: Tensor, recv_topk_idx: Optional[Tensor],
                        recv_topk_weights: Optional[Tensor], num_recv_out: Optional[Tensor]) -> None:
        stride = _C.dispatch_row_stride(x_bytes, scales_bytes, num_topk)
        rows = recv_buffer.view(-1, stride)
        counts = recv_counts.tolist()
        parts = [rows[start:start + count] for start, count in zip(self._region_starts(counts, slot_rows), counts)]
        compact = torch.cat(parts) if parts else rows[:0]
        num_rows = recv_x.shape[0]
        if compact.shape[0] > num_rows:
            self.error_flag.bitwise_or_(ERR_OVERFLOW)
            compact = compact[:num_rows]
        compact = compact.contiguous()
        n = compact.shape[0]
        per_expert = torch.empty(num_local_experts, dtype=torch.int64) if num_topk else None
        _C.dispatch_unpack(compact.data_ptr(), n, x_bytes, scales_bytes, num_topk, num_local_experts,
                           recv_x.data_ptr(), ptr(recv_x_scales), recv_src_idx.data_ptr(), ptr(recv_topk_idx),
                           ptr(recv_topk_weights), ptr(per_expert))
        for tensor in (recv_x, recv_x_scales, recv_topk_weights):
            if tensor is not None:
                tensor[n:].view(torch.uint8).zero_()
        for tensor in (recv_src_idx, recv_topk_idx):
            if tensor is not None:
                tensor[n:].fill_(-1)
        if num_recv_out is not None:
            num_recv_out.fill_(n)

    def combine_pack(self, x: Tensor, topk_weights: Optional[Tensor], recv_counts: Tensor, slot_rows: int,
                     send_buffer: Tensor) -> None:
        num_topk = topk_weights.shape[1] if topk_weights is not None else 0
        x_bytes = row_bytes(x)
        stride = _C.combine_row_stride(x_bytes, num_topk)
        compact = torch.empty(x.shape[0] * stride, dtype=torch.uint8)
        if num_topk:
            _C.combine_pack(x.data_ptr(), x_bytes, topk_weights.data_ptr(), num_topk, x.shape[0], compact.data_ptr())
        else:
            compact.copy_(as_bytes(x))
        compact_rows, send_rows = compact.view(-1, stride), send_buffer.view(-1, stride)
        counts = recv_counts.tolist()
        placed = self._region_starts(counts, slot_rows)
        compacted = self._region_starts(counts, 0)
        for dst, src, count in zip(placed, compacted, counts):
            send_rows[dst:dst + count] = compact_rows[src:src + count]

    def combine_reduce(self, recv_buffer: Tensor, send_pos: Tensor, bias_0: Optional[Tensor],
                       bias_1: Optional[Tensor], combined_x: Tensor, combined_topk_weights: Optional[Tensor]) -> None:
        num_tokens, num_ranks = send_pos.shape
        num_topk = combined_topk_weights.shape[1] if combined_topk_weights is not None else 0
        _C.combine_reduce(KERNEL_DTYPE_CODES[combined_x.dtype], recv_buffer.data_ptr(), combined_x.shape[1], num_topk,
                          send_pos.data_ptr(), num_tokens, num_ranks, ptr(bias_0), ptr(bias_1),
                          combined_x.data_ptr(), ptr(combined_topk_weights))


class _HostCall:
    """CallStreams without streams: outputs on the CPU, a completed no-op event."""

    @staticmethod
    def empty(*shape: int, dtype: torch.dtype) -> Tensor:
        return torch.empty(*shape, dtype=dtype)

    @staticmethod
    def finish(async_finish: bool, in_flight) -> EventOverlap:
        return EventOverlap()


def init_host_transport(transport, group: dist.ProcessGroup, kernels_class: type) -> None:
    """What CudaTransport.__init__ sets, for CPU tensors and without a CUDA stream: the emulated
    transports skip that __init__, which makes one."""
    transport.group = group
    transport.rank = group.rank()
    transport.num_ranks = group.size()
    transport.device = torch.device("cpu")
    transport.comm_stream = None
    transport.error_flag = torch.zeros(1, dtype=torch.int32)
    transport.kernels = kernels_class(transport.error_flag)
    transport._out_of_step = None


class EmulatedNcclTransport(NcclTransport):
    """NcclTransport on CPU tensors over a gloo group (its staging path), with EmulatedKernels."""

    def __init__(self, group: dist.ProcessGroup) -> None:  # noqa: no super().__init__: it makes a CUDA stream
        self.staged = True
        init_host_transport(self, group, EmulatedKernels)

    @contextlib.contextmanager
    def _call(self, previous_event, allocate_on_comm_stream) -> Iterator[_HostCall]:
        if self._out_of_step is not None:
            raise RuntimeError(f"out of step: {self._out_of_step}")
        yield _HostCall()


def emulated_buffer(group: dist.ProcessGroup, **kwargs):
    """An eplib.Buffer whose CPU calls go through EmulatedNcclTransport (Buffer checks included)."""
    import eplib

    buffer = eplib.Buffer(group, **kwargs)
    buffer._cpu = EmulatedNcclTransport(group)
    return buffer
