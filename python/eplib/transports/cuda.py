"""What the CUDA transports (nccl, ipc) share: the parts of a call that do not depend on how rows
travel (layout, send positions, the device-side checks, the outputs of unpacking, handles).

Where the work runs: ``streams.CudaContext`` (the device, its streams, DeepEP's stream protocol).
How the kernels are called: ``kernels.py``. How errors found on the device are reported:
``device_errors.py``.
"""

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from .. import _C
from ..collectives import CollectiveError
from ..config import Config
from ..event import EventOverlap
from ..handle import DispatchHandle
from .device_errors import RECORD_FIELDS, check_records
from .kernels import CudaKernels, combine_reduce_args, dispatch_unpack_args
from .records import check_receive_totals
from .streams import CallStreams, CudaContext
from .tensors import row_bytes

Tensor = torch.Tensor


class NormalCounts:
    """What a normal-mode dispatch learns at its one host sync, from every rank's record."""

    def __init__(self, counts: Tensor, per_expert: Tensor, rank: int, expert_alignment: int) -> None:
        """counts: host int64 [R, R], [source, destination]; per_expert: host int64 [R, E/R], each
        source's counts of this rank's experts."""
        self.send_counts = tuple(counts[rank].tolist())
        self.recv_counts = tuple(counts[:, rank].tolist())
        self.num_recv = sum(self.recv_counts)
        check_receive_totals(counts.sum(0).tolist())
        self.num_recv_tokens_per_expert_list = [-(-n // expert_alignment) * expert_alignment
                                                for n in per_expert.sum(0).tolist()]

    @classmethod
    def from_records(cls, records: Tensor, rank: int, expert_alignment: int) -> "NormalCounts":
        """records: host int64 [R, L], rank-major: RECORD_FIELDS, R send counts, then the counts of
        this rank's E/R experts (whoever made the records cut them to this rank's experts)."""
        num_ranks = records.shape[0]
        first_count = len(RECORD_FIELDS)
        return cls(records[:, first_count:first_count + num_ranks], records[:, first_count + num_ranks:], rank,
                   expert_alignment)


class UnpackOutputs:
    """The outputs of a dispatch's receiving end, allocated for the call, and the kernel arguments that
    fill them (``dispatch_unpack_args``)."""

    def __init__(self, call: CallStreams, num_rows: int, x: Tensor, x_scales: Optional[Tensor], num_topk: int,
                 with_count: bool) -> None:
        self.recv_x = call.empty(num_rows, x.shape[1], dtype=x.dtype)
        self.recv_x_scales = (call.empty(num_rows, x_scales.shape[1], dtype=x_scales.dtype)
                              if x_scales is not None else None)
        self.recv_src_idx = call.empty(num_rows, dtype=torch.int32)
        self.recv_topk_idx = call.empty(num_rows, num_topk, dtype=torch.int64) if num_topk else None
        self.recv_topk_weights = call.empty(num_rows, num_topk, dtype=torch.float32) if num_topk else None
        self.num_recv = call.empty(1, dtype=torch.int32) if with_count else None
        self.num_topk = num_topk

    def args(self, recv_buffer: Optional[Tensor], recv_counts: Tensor, slot_rows: int, x: Tensor,
             x_scales: Optional[Tensor], num_local_experts: int, error_flag: Tensor):
        """The unpack kernel's arguments for these outputs (recv_buffer None: the ipc region)."""
        return dispatch_unpack_args(recv_buffer, recv_counts, slot_rows, row_bytes(x), row_bytes(x_scales),
                                    self.num_topk, num_local_experts, self.recv_x, self.recv_x_scales,
                                    self.recv_src_idx, self.recv_topk_idx, self.recv_topk_weights, self.num_recv,
                                    error_flag)

    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        return (self.recv_x, self.recv_x_scales, self.recv_src_idx, self.recv_topk_idx, self.recv_topk_weights,
                self.num_recv)


class CombineOutputs:
    """The outputs of a combine's reduction, and the kernel arguments that fill them."""

    def __init__(self, call: CallStreams, handle: DispatchHandle, x: Tensor, num_topk: int) -> None:
        self.combined_x = call.empty(handle.num_tokens, x.shape[1], dtype=x.dtype)
        self.combined_topk_weights = (call.empty(handle.num_tokens, num_topk, dtype=torch.float32)
                                      if num_topk else None)

    def args(self, recv_buffer: Optional[Tensor], handle: DispatchHandle, bias_0: Optional[Tensor],
             bias_1: Optional[Tensor]):
        """The reduction kernel's arguments (recv_buffer None: the ipc region)."""
        return combine_reduce_args(recv_buffer, handle.send_pos, bias_0, bias_1, self.combined_x,
                                   self.combined_topk_weights)


class CudaTransport:
    """The part of a CUDA transport that does not depend on how rows travel. Subclasses implement
    ``_dispatch_normal``, ``_dispatch_padded``, ``cached_dispatch`` and ``combine``.

    ``context``: where the work runs (default: torch's CUDA device ``device``; the tests' CPU
    execution of the CUDA sources passes its own)."""

    name = "cuda"
    # What a user does once the ranks are out of step (the collectives of the group are, for nccl).
    recovery = "create a new process group and Buffer"

    def __init__(self, group: dist.ProcessGroup, device: torch.device, context=None) -> None:
        self.group = group
        self.rank = group.rank()
        self.num_ranks = group.size()
        self.device = device
        self.context = context if context is not None else CudaContext(device)
        self.comm_stream = self.context.comm_stream
        self.error_flag = self.context.zeros(1, torch.int32)
        self.kernels = CudaKernels(self.error_flag, self.context)
        self._out_of_step: Optional[str] = None
        # Every kernel loaded now, not lazily at a first launch that would wait for the device to go idle.
        _C.cuda_preload_kernels(self.context.device_index)

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
        with self.context.call(previous_event, allocate_on_comm_stream) as call:
            yield call

    def _device_counts(self, call: CallStreams, counts: Tensor) -> Tuple[Tensor, Tensor]:
        """From the device counts [source, destination] of every rank: (rank_prefix_matrix int32 [R, R],
        this rank's receive counts int32 [R]), both on the device."""
        rank_prefix_matrix = call.empty(self.num_ranks, self.num_ranks, dtype=torch.int32)
        rank_prefix_matrix.copy_(counts.cumsum(0))
        recv_counts = call.empty(self.num_ranks, dtype=torch.int32)
        recv_counts.copy_(counts[:, self.rank])
        return rank_prefix_matrix, recv_counts

    @staticmethod
    def _normal_handle(counts: NormalCounts, rank_prefix_matrix: Tensor, recv_counts: Tensor, recv_src_idx: Tensor,
                       is_token_in_rank: Tensor, send_pos: Tensor, send_counts: Tensor, hidden: int,
                       channel_counts: Optional[Tensor] = None) -> DispatchHandle:
        """The handle of a normal-mode dispatch: host counts, device prefix matrix and send and receive counts
        (and the ipc transport's channel counts)."""
        return DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix,
            device_send_counts=send_counts,
            send_counts=counts.send_counts,
            recv_counts=counts.recv_counts,
            recv_src_idx=recv_src_idx,
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            num_recv_tokens=counts.num_recv,
            hidden=hidden,
            slot_rows=0,
            device_recv_counts=recv_counts,
            channel_counts=channel_counts,
        )

    def _padded_handle(self, rank_prefix_matrix: Tensor, recv_counts: Tensor, outputs: UnpackOutputs,
                       is_token_in_rank: Tensor, send_pos: Tensor, send_counts: Tensor, hidden: int,
                       num_worst_tokens: int, channel_counts: Optional[Tensor] = None) -> DispatchHandle:
        """The handle of a num_worst_tokens dispatch (slot layout): device counts only (and the ipc
        transport's channel counts)."""
        return DispatchHandle(
            rank_prefix_matrix=rank_prefix_matrix,
            device_send_counts=send_counts,
            send_counts=send_counts,
            recv_counts=recv_counts,
            recv_src_idx=outputs.recv_src_idx,
            is_token_in_rank=is_token_in_rank,
            send_pos=send_pos,
            num_recv_tokens=outputs.num_recv,
            hidden=hidden,
            slot_rows=num_worst_tokens,
            device_recv_counts=recv_counts,
            channel_counts=channel_counts,
        )

    @staticmethod
    def _dispatch_result(outputs: UnpackOutputs, num_recv_tokens_per_expert_list: list, handle: DispatchHandle):
        return (outputs.recv_x, outputs.recv_x_scales, outputs.recv_topk_idx, outputs.recv_topk_weights,
                num_recv_tokens_per_expert_list, handle)

    # ------------------------------------------------------------------------------------------
    # Calls
    # ------------------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: Tensor, num_experts: int, *, previous_event: Optional[EventOverlap],
                            async_finish: bool, allocate_on_comm_stream: bool, config: Optional[Config] = None
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
                 async_finish: bool, allocate_on_comm_stream: bool, config: Optional[Config] = None):
        """See ``Buffer.dispatch`` (``config``: the call's Config; the ipc transport's channels and rings).
        Returns ((recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
        num_recv_tokens_per_expert_list, handle), event)."""
        inputs = (x, x_scales, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
        with self._call(previous_event, allocate_on_comm_stream) as call:
            self._before_dispatch(x, x_scales, topk_idx, num_tokens_per_expert.shape[0], config)
            num_tokens = x.shape[0]
            slot_rows = num_worst_tokens  # 0 = normal mode (contiguous regions, host-known counts)
            send_pos = call.empty(num_tokens, self.num_ranks, dtype=torch.int32)
            # Rows placed per rank (at most slot_rows: rows beyond a slot are flagged and dropped).
            send_counts = call.empty(self.num_ranks, dtype=torch.int32)
            self.kernels.send_positions(is_token_in_rank, slot_rows, send_pos, send_counts)
            self.kernels.check_dispatch_inputs(send_counts, num_tokens_per_rank, slot_rows, topk_idx, topk_weights,
                                               num_tokens_per_expert)
            layout = (x, x_scales, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
            if num_worst_tokens > 0:
                result = self._dispatch_padded(call, *layout, num_worst_tokens, send_pos, send_counts, config)
            else:
                result = self._dispatch_normal(call, *layout, expert_alignment, send_pos, send_counts, config)
            recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, _, handle = result
            in_flight = inputs + (recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights) + handle.tensors()
            return result, call.finish(async_finish, in_flight)

    def _before_dispatch(self, x: Tensor, x_scales: Optional[Tensor], topk_idx: Optional[Tensor],
                         num_experts: int, config: Optional[Config]) -> None:
        """Host checks a transport makes before a dispatch launches anything (none by default)."""

    def _can_share_error(self, error: Exception) -> bool:
        """Whether share_error may tell the peers about ``error``: not for errors of the group itself
        (CollectiveError: the group reports them to every rank), not once the ranks are out of step,
        and not during a CUDA graph capture, where every rank captures the same calls (an argument error
        there is every rank's) and a host wait would break the capture."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return not (isinstance(error, CollectiveError) or self._out_of_step is not None or capturing)

    def _check_records(self, records: Tensor) -> None:
        """Raises on every rank alike when a rank rejected its input, a rank's error flag is set or the
        ranks' formats differ (device_errors.check_records)."""
        check_records(records, self.rank, self.error_flag, self._rejection)

    def _rejection(self, rank: int) -> str:
        """The error of another rank whose record said REJECTED (the transport's way of carrying it)."""
        return "its error did not reach this rank"
