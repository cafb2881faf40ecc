"""Low-latency (LL) mode: DeepEP's ``low_latency_dispatch`` / ``low_latency_combine``. What every
transport shares: the handle, the argument checks, and the state of the two alternating buffers,
the receive hooks. The transports' engines: ``transports/low_latency_cpu.py`` (CPU tensors) and
``transports/low_latency_cuda.py`` with its nccl and ipc engines (CUDA tensors). Layout and message
format: ``csrc/include/eplib/low_latency.h``.

Rows and their order (every transport, bit for bit):
- A token travels once to each distinct expert among its top-k slots (a slot that repeats an expert
  of an earlier slot adds no row; in combine it reads that row too).
- ``recv_x`` is ``[E_local, R * num_max, H]``; expert ``le``'s rows are ordered by source rank, then
  source token; ``recv_count[le]`` of them are valid, the others are unspecified.
  ``layout_range[le, s] = begin << 32 | count`` of source s's rows, ``src_info`` their source tokens.
- FP8: per token and block of 128 channels (``eplib.reference.fp8_quantize``); scales float32
  ``[E_local, R * num_max, H / 128]`` column-major in the last two dims, or (use_ue8m0) int32
  ``[.., ceil(H / 512)]`` holding four exponent bytes each.
- Combine: per token, in fp32 from 0, for each slot k ascending whose expert is not -1 and whose rank
  is not masked: ``acc = acc + w[t, k] * row``; cast once to bf16.

Buffers. As in DeepEP, two buffers alternate: LL call n (dispatch or combine) uses buffer n % 2, so
at most two LL calls may await their receive hook at once. Round numbers, not zeroed flags, tell the
calls apart, so nothing needs cleaning between calls (``clean_low_latency_buffer`` checks that no
hook is pending).

Masks (``enable_shrink=True``): a rank that does not answer within ``EPLIB_TIMEOUT_S`` is masked
instead of raising: the call completes for the live ranks, a masked source contributes no rows and a
masked expert rank nothing to combine. The mask is per Buffer and transport.
"""

from typing import Callable, List, Optional, Tuple

import torch

from . import _C
from .validation import check_int, check_int32_product, check_num_experts, check_tensor

Tensor = torch.Tensor

MAX_TOPK = 32
# Counts of the local experts travel in every message header.
MAX_LOCAL_EXPERTS = 4096


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle ``(src_info, layout_range, num_max_dispatch_tokens_per_rank, hidden,
    num_experts)``: a tuple of those five, so DeepEP code that unpacks or indexes it runs. eplib keeps
    what combine needs on the sending side as attributes:

    - ``send_slot`` int32 ``[T, K]``: the row of slot (t, k) among this rank's rows for its expert
      (tokens of this rank before t that name it); -1 for a masked slot.
    - ``send_counts`` int32 ``[E]``: this rank's rows for each expert.
    - ``send_offset`` int32 ``[E]``: rows of the experts of the same rank before each expert.
    - ``num_topk``, ``use_fp8``: of the dispatch; ``owner``: the engine that made it.
    """

    def __new__(cls, src_info: Tensor, layout_range: Tensor, num_max: int, hidden: int, num_experts: int, *,
                send_slot: Tensor, send_counts: Tensor, send_offset: Tensor, owner: object) -> "LowLatencyHandle":
        handle = super().__new__(cls, (src_info, layout_range, num_max, hidden, num_experts))
        handle.send_slot = send_slot
        handle.send_counts = send_counts
        handle.send_offset = send_offset
        handle.owner = owner
        return handle

    src_info = property(lambda self: self[0])
    layout_range = property(lambda self: self[1])
    num_max_dispatch_tokens_per_rank = property(lambda self: self[2])
    hidden = property(lambda self: self[3])
    num_experts = property(lambda self: self[4])

    @property
    def num_tokens(self) -> int:
        return self.send_slot.shape[0]

    @property
    def num_topk(self) -> int:
        return self.send_slot.shape[1]


def rdma_size_hint(num_max: int, hidden: int, num_ranks: int, num_experts: int, num_topk: int = MAX_TOPK) -> int:
    """Bytes of eplib's low-latency memory per rank (``num_rdma_bytes``) for calls of up to ``num_max``
    tokens per rank of hidden size ``hidden`` (bf16, the widest rows) with up to ``num_topk`` experts per
    token: a flag header, then two buffers of ``num_ranks`` message slots (eplib/low_latency.h)."""
    check_int("num_max_dispatch_tokens_per_rank", num_max, 1)
    check_int("hidden", hidden, 1)
    check_num_experts(num_experts, check_int("num_ranks", num_ranks, 1))
    check_int("num_topk", num_topk, 1, MAX_TOPK)
    sizes = _C.low_latency_layout(num_max, hidden, num_topk, num_experts // num_ranks, False)
    return region_bytes(num_ranks, sizes["message_bytes"])


ZERO_COPY_HANDLE_BYTES = 128  # after the flags, per buffer: the handles of the rank's zero-copy and published buffers


def flags_bytes(num_ranks: int) -> int:
    """Bytes of the flag header in front of the two buffers of a low-latency region (4 KiB pages): flags,
    then the handles of the two zero-copy buffers and of the two published-dispatch buffers."""
    return (128 + 16 * num_ranks + 4 * ZERO_COPY_HANDLE_BYTES + 4095) // 4096 * 4096


def region_bytes(num_ranks: int, message_bytes: int) -> int:
    """Bytes of a low-latency region of two buffers of num_ranks message slots."""
    return flags_bytes(num_ranks) + 2 * num_ranks * message_bytes


# ------------------------------------------------------------------------------------------------
# Argument checks (before anything moves)
# ------------------------------------------------------------------------------------------------


class DispatchCall:
    """A checked low_latency_dispatch call: its arguments and the sizes they imply."""

    def __init__(self, x, topk_idx, num_max: int, num_experts: int, num_ranks: int,
                 cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8: bool,
                 round_scale: bool, use_ue8m0: bool) -> None:
        check_tensor("x", x, [torch.bfloat16], [None, None])
        device = x.device
        self.num_tokens, self.hidden = x.shape
        if self.hidden == 0:
            raise ValueError(f"x: expected a hidden size > 0, got shape {list(x.shape)}")
        self.num_max = check_int("num_max_dispatch_tokens_per_rank", num_max, 1)
        if self.num_tokens > num_max:
            raise ValueError(f"num_max_dispatch_tokens_per_rank: x has {self.num_tokens} tokens, more than "
                             f"num_max_dispatch_tokens_per_rank={num_max}")
        self.num_experts = check_num_experts(num_experts, num_ranks)
        self.num_local_experts = num_experts // num_ranks
        if self.num_local_experts > MAX_LOCAL_EXPERTS:
            raise ValueError(f"num_experts: at most {MAX_LOCAL_EXPERTS} experts per rank in low-latency mode, got "
                             f"{num_experts} on {num_ranks} ranks")
        check_tensor("topk_idx", topk_idx, [torch.int64], [self.num_tokens, None], device)
        self.num_topk = topk_idx.shape[1]
        if not 1 <= self.num_topk <= MAX_TOPK:
            raise ValueError(f"topk_idx: expected 1 to {MAX_TOPK} slots per token, got shape {list(topk_idx.shape)}")
        for name, flag in (("use_fp8", use_fp8), ("round_scale", round_scale), ("use_ue8m0", use_ue8m0)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        if use_fp8 and self.hidden % 128 != 0:
            raise ValueError(f"x: FP8 casts blocks of 128 channels, so the hidden size must be a multiple of 128 "
                             f"with use_fp8=True, got {self.hidden}")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0: UE8M0 scales need use_fp8=True and round_scale=True, got "
                             f"use_fp8={use_fp8}, round_scale={round_scale}")
        if cumulative_local_expert_recv_stats is not None:
            check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, [torch.int32],
                         [self.num_local_experts], device)
        if dispatch_wait_recv_cost_stats is not None:
            check_tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, [torch.int64],
                         [num_ranks], device)
        check_int32_product("num_max_dispatch_tokens_per_rank", "R * num_max * H", num_ranks, num_max, self.hidden)
        self.x, self.topk_idx = x, topk_idx
        self.cumulative_stats = cumulative_local_expert_recv_stats
        self.wait_stats = dispatch_wait_recv_cost_stats
        self.use_fp8, self.round_scale, self.use_ue8m0 = use_fp8, round_scale, use_ue8m0
        self.num_ranks = num_ranks

    @property
    def format(self) -> int:
        """The LowLatencyFormat bits of its rows."""
        formats = _C.LL_FORMATS
        return ((formats["fp8"] if self.use_fp8 else 0) | (formats["round_scale"] if self.round_scale else 0)
                | (formats["ue8m0"] if self.use_ue8m0 else 0))

    def layout(self) -> dict:
        """Sizes of its messages (_C.low_latency_layout)."""
        return _C.low_latency_layout(self.num_max, self.hidden, self.num_topk, self.num_local_experts, self.use_fp8)

    def header_fields(self, rejected: bool = False) -> List[int]:
        return header_fields(self.num_max, self.hidden, self.num_experts, self.num_topk, self.format,
                             self.num_tokens, rejected)


class CombineCall:
    """A checked low_latency_combine call."""

    def __init__(self, x, topk_idx, topk_weights, handle, num_ranks: int, use_logfmt: bool, zero_copy: bool,
                 out, combine_wait_recv_cost_stats) -> None:
        if not isinstance(handle, LowLatencyHandle):
            raise TypeError(f"handle: expected the handle returned by this Buffer's low_latency_dispatch, got "
                            f"{type(handle).__name__}")
        if handle.layout_range.shape[1] != num_ranks:
            raise ValueError(f"handle: made for a group of {handle.layout_range.shape[1]} ranks, this Buffer's group "
                             f"has {num_ranks}")
        if use_logfmt:
            raise ValueError("use_logfmt: eplib's low-latency combine sends bf16 rows only; DeepEP's LogFMT "
                             "(10-bit) encoding is not implemented, pass use_logfmt=False")
        for name, flag in (("zero_copy", zero_copy),):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
        num_max, hidden, num_experts = handle[2], handle[3], handle[4]
        num_local = num_experts // num_ranks
        device = handle.src_info.device
        check_tensor("x", x, [torch.bfloat16], [num_local, num_ranks * num_max, hidden], device)
        shape = [handle.num_tokens, handle.num_topk]
        check_tensor("topk_idx", topk_idx, [torch.int64], shape, device)
        check_tensor("topk_weights", topk_weights, [torch.float32], shape, device)
        if out is not None:
            check_tensor("out", out, [torch.bfloat16], [handle.num_tokens, hidden], device)
        if combine_wait_recv_cost_stats is not None:
            check_tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, [torch.int64], [num_ranks],
                         device)
        self.x, self.topk_idx, self.topk_weights, self.handle = x, topk_idx, topk_weights, handle
        self.zero_copy, self.out, self.wait_stats = zero_copy, out, combine_wait_recv_cost_stats
        self.num_max, self.hidden, self.num_experts, self.num_local_experts = num_max, hidden, num_experts, num_local
        self.num_ranks = num_ranks

    def layout(self) -> dict:
        return _C.low_latency_layout(self.num_max, self.hidden, self.handle.num_topk, self.num_local_experts, False)

    def header_fields(self) -> List[int]:
        return header_fields(self.num_max, self.hidden, self.num_experts, self.handle.num_topk,
                             _C.LL_FORMATS["combine"], self.handle.num_tokens, False)


def header_fields(num_max: int, hidden: int, num_experts: int, num_topk: int, row_format: int, num_tokens: int,
                  rejected: bool) -> List[int]:
    """The int32 fields of a message header (eplib/low_latency.h, LowLatencyHeaderField)."""
    fields = [0] * _C.LL_HEADER_FIELDS
    index = _C.LL_FIELDS
    fields[index["magic"]] = _C.LL_MAGIC
    fields[index["num_max"]] = num_max
    fields[index["hidden"]] = hidden
    fields[index["num_experts"]] = num_experts
    fields[index["num_topk"]] = num_topk
    fields[index["format"]] = row_format
    fields[index["rejected"]] = int(rejected)
    fields[index["num_tokens"]] = num_tokens
    return fields


def check_clean_args(num_max: int, hidden: int, num_experts: int, num_ranks: int) -> None:
    check_int("num_max_dispatch_tokens_per_rank", num_max, 1)
    check_int("hidden", hidden, 1)
    check_num_experts(num_experts, num_ranks)


def message_problem(status: int, source: int, rank: int) -> Optional[Tuple[type, str]]:
    """(exception type, message) for a received message's status (_C.ll_message_status), None when usable."""
    if status == 0:
        return None
    if status == 2:
        return RuntimeError, (f"eplib: low-latency call abandoned on rank {rank}: rank {source} rejected its input "
                              f"(its ValueError says why)")
    if status >= 3:
        field = {v: k for k, v in _C.LL_FIELDS.items()}[status - 3]
        argument = {"num_max": "num_max_dispatch_tokens_per_rank", "hidden": "x", "num_experts": "num_experts",
                    "num_topk": "topk_idx", "format": "use_fp8/round_scale/use_ue8m0"}[field]
        return ValueError, f"{argument}: all ranks must agree on {field}, rank {source} differs from rank {rank}"
    return RuntimeError, f"eplib: rank {rank} got a corrupt low-latency message from rank {source} (status {status})"


# ------------------------------------------------------------------------------------------------
# State every engine keeps
# ------------------------------------------------------------------------------------------------


class LowLatencyState:
    """The alternating buffers: LL call n uses buffer n % 2, its round is the number of calls so far on that
    buffer (1, 2, ...). A call whose receive has not run (a hook not yet called) keeps its buffer."""

    def __init__(self) -> None:
        self.num_calls = 0
        self.awaiting: List[Optional[str]] = [None, None]

    def next_call(self, what: str) -> Tuple[int, int]:
        """(buffer index, round) of the next LL call; RuntimeError if its buffer still awaits a hook."""
        buffer_index = self.num_calls % 2
        if self.awaiting[buffer_index] is not None:
            raise RuntimeError(f"{what}: the low-latency buffer it would use still holds the {self.awaiting[buffer_index]} "
                               f"whose receive hook was not called; at most two low-latency calls may await their hooks "
                               f"(as in DeepEP): call that hook first")
        self.num_calls += 1
        return buffer_index, (self.num_calls - 1) // 2 + 1

    def check_idle(self, what: str) -> None:
        pending = [name for name in self.awaiting if name is not None]
        if pending:
            raise RuntimeError(f"{what}: {pending[0]} still awaits its receive hook; call it first")


class DispatchOutputs:
    """The outputs of the dispatches on each of the two buffers: ``(recv_x, recv_scales or None, src_info,
    layout_range, recv_count)``, kept and handed out again by the buffer's next dispatch when their shapes
    fit. As in DeepEP, at most two low-latency results are alive at once; reusing them spares the page
    faults of fresh outputs (``[E/R, R * num_max, H]`` is hundreds of MB at H=7168, of which a dispatch
    writes a few) and keeps their addresses fixed for CUDA graph replays."""

    def __init__(self, num_ranks: int) -> None:
        self.num_ranks = num_ranks
        self._kept: List[Optional[tuple]] = [None, None]  # per buffer: (shape key, outputs)

    def get(self, buffer_index: int, call: "DispatchCall", empty: Callable[..., Tensor]) -> tuple:
        """The outputs for ``call`` on buffer ``buffer_index``; new ones come from ``empty(*shape, dtype=)``.
        FP8 scales are float32 ``[E_local, rows, H / 128]``, or int32 ``[E_local, rows, ceil(H / 512)]``,
        column-major in the last two dims (DeepEP's layout)."""
        num_local, rows = call.num_local_experts, self.num_ranks * call.num_max
        key = (num_local, rows, call.hidden, call.use_fp8, call.use_ue8m0)
        kept = self._kept[buffer_index]
        if kept is None or kept[0] != key:
            recv_x = empty(num_local, rows, call.hidden, dtype=torch.float8_e4m3fn if call.use_fp8 else torch.bfloat16)
            recv_scales = None
            if call.use_fp8:
                num_scales = call.hidden // 128
                columns = (num_scales + 3) // 4 if call.use_ue8m0 else num_scales
                recv_scales = empty(num_local, columns, rows,
                                    dtype=torch.int32 if call.use_ue8m0 else torch.float32).transpose(1, 2)
            kept = self._kept[buffer_index] = (key, (
                recv_x, recv_scales, empty(num_local, rows, dtype=torch.int32),
                empty(num_local, self.num_ranks, dtype=torch.int64), empty(num_local, dtype=torch.int32)))
        return kept[1]

    def kept(self, buffer_index: int) -> Optional[tuple]:
        """The outputs last handed out on buffer ``buffer_index`` (None before its first dispatch)."""
        kept = self._kept[buffer_index]
        return kept[1] if kept is not None else None


class ReceiveHook:
    """The ``hook`` of a call with ``return_recv_hook=True``: calling it completes the receive (once)."""

    def __init__(self, state: LowLatencyState, buffer_index: int, what: str, receive: Callable[[], None]) -> None:
        self._state, self._buffer_index, self._receive = state, buffer_index, receive
        self._called = False
        state.awaiting[buffer_index] = what

    def __call__(self) -> None:
        if self._called:
            raise RuntimeError("hook: this receive hook was already called")
        self._called = True
        self._state.awaiting[self._buffer_index] = None
        self._receive()


def zero_copy_source(zero_copy: List[Optional[Tensor]], state: LowLatencyState, call: CombineCall) -> Tensor:
    """The tensor a zero_copy combine reads: the one get_next_low_latency_combine_buffer handed out for the
    next call's buffer (``zero_copy``: per buffer)."""
    buffer_index = state.num_calls % 2
    source = zero_copy[buffer_index]
    if source is None or source.shape != call.x.shape:
        raise ValueError("zero_copy: fill the tensor from get_next_low_latency_combine_buffer(handle) right before "
                         "this combine (it belongs to the next low-latency call's buffer); none of this shape "
                         "was handed out for it")
    return source


def run_receive(state: LowLatencyState, buffer_index: int, what: str, receive: Callable[[], None],
                return_recv_hook: bool) -> Optional[ReceiveHook]:
    """The receive of a call: now (None), or later through the returned hook."""
    hook = ReceiveHook(state, buffer_index, what, receive)
    if return_recv_hook:
        return hook
    hook()
    return None
