"""Autograd-aware dispatch and combine over an ``eplib.Buffer``, as ``torch.library`` custom ops.

The two are each other's adjoint. Dispatch copies each token to every rank that owns one of its
experts, so its backward sums the gradients of those copies: a combine along the same handle.
Combine sums the rows that come back to a token, so its backward hands every row the gradient of
its token: a cached dispatch along the same handle. Both backwards are collectives, so every rank
of the group must run backward through the same ops in the same order (as a training step does).

Each is a ``torch.library`` custom op (``eplib::dispatch``, ``eplib::combine``,
``eplib::cached_dispatch``, and ``eplib::all_gather_rows`` / ``eplib::reduce_scatter_rows`` for the
token-parallel weight exchange), with a fake implementation and an autograd formula, so
``torch.compile`` traces them without a graph break. They are defined through
``torch.library.Library`` rather than ``torch.library.custom_op``, whose first call imports
torch._dynamo (seconds in every process). Custom ops take tensors and plain values only, hence:

- the Buffer travels as an int key (``buffer_key``), resolved when the op runs;
- the dispatch handle travels as tensors (``TensorHandle``), rebuilt into the Buffer's
  ``DispatchHandle`` when the op runs;
- the number of rows a rank receives is data-dependent: the fake implementation gives it an
  unbacked size, or exactly ``num_worst_tokens`` rows when that is set.
"""

import weakref
from typing import NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from .buffer import Buffer
from .collectives import all_gather, reduce_scatter
from .handle import DispatchHandle
from .timing import phase

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------
# Buffers by key, handles as tensors
# ------------------------------------------------------------------------------------------------

LIBRARY = torch.library.Library("eplib", "FRAGMENT")

# Weak values: registering a Buffer here does not keep it (or its process group) alive.
_buffers: "weakref.WeakValueDictionary[int, Buffer]" = weakref.WeakValueDictionary()


def buffer_key(buffer: Buffer) -> int:
    """The int that names ``buffer`` in eplib's custom ops, which take no Python objects; the key
    stays valid while the Buffer lives. Called outside ``torch.compile`` it also registers the
    Buffer; a compiled function only computes the key (dynamo cannot trace the registry), so a
    Buffer that a compiled function passes to these ops must have been registered before:
    ``eplib.MoE`` registers its own at construction, other callers call this once in eager mode."""
    if not isinstance(buffer, Buffer):
        raise TypeError(f"buffer: expected an eplib.Buffer, got {type(buffer).__name__}")
    if not torch.compiler.is_compiling():
        _buffers[id(buffer)] = buffer
    return id(buffer)


def buffer_of(key: int) -> Buffer:
    """The Buffer registered under ``key`` by ``buffer_key``."""
    buffer = _buffers.get(key)
    if buffer is None:
        raise RuntimeError(f"buffer: no live eplib.Buffer is registered under key {key}; call "
                           f"eplib.ops.buffer_key(buffer) once outside torch.compile, and keep the Buffer alive")
    return buffer


def define(schema: str, impl, fake, backward=None, setup_context=None) -> None:
    """Defines the custom op ``eplib::<schema>`` with ``impl`` for every device, its fake
    implementation and, when given, its autograd formula."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"eplib::{name}", fake, lib=LIBRARY)
    if backward is not None:
        torch.library.register_autograd(f"eplib::{name}", backward, setup_context=setup_context, lib=LIBRARY)


class TensorHandle(NamedTuple):
    """A ``DispatchHandle`` as tensors only, as eplib's custom ops pass it (``to_tensor_handle``,
    ``to_dispatch_handle``). Returned by ``dispatch``, taken by ``combine``.

    Fields:
        rank_prefix_matrix, recv_src_idx, is_token_in_rank, send_pos: the handle's tensors.
        host: int64 ``[3 + 2R]`` on the CPU: ``slot_rows, hidden, num_recv_tokens``, then ``send_counts`` and ``recv_counts`` (R each); -1 for the counts
            that are device tensors (padded mode, ``slot_rows > 0``).
        device_counts: int32 on the device of the dispatch: empty on the cpu transport; else the
            handle's device values concatenated: ``device_recv_counts [R]``, preceded in padded
            mode by ``send_counts [R], recv_counts [R], num_recv_tokens [1]``.
        channel_counts: the handle's ``channel_counts [R, C]`` flattened (ipc transport), else empty.
    """

    rank_prefix_matrix: Tensor
    recv_src_idx: Tensor
    is_token_in_rank: Tensor
    send_pos: Tensor
    host: Tensor
    device_counts: Tensor
    channel_counts: Tensor


_HOST_HEAD = 3  # slot_rows, hidden, num_recv_tokens


def to_tensor_handle(handle: DispatchHandle) -> TensorHandle:
    """``handle`` as tensors (see ``TensorHandle``); host values move into a CPU tensor."""
    num_ranks = handle.rank_prefix_matrix.shape[0]
    padded = handle.slot_rows > 0
    counts = [handle.send_counts, handle.recv_counts, handle.num_recv_tokens] if padded else []
    on_device = [t.reshape(-1).to(torch.int32) for t in counts + [handle.device_recv_counts] if t is not None]
    host = [handle.slot_rows, handle.hidden]
    host += [-1] * (1 + 2 * num_ranks) if padded else [handle.num_recv_tokens, *handle.send_counts,
                                                       *handle.recv_counts]
    device = handle.rank_prefix_matrix.device
    device_counts = torch.cat(on_device) if on_device else torch.empty(0, dtype=torch.int32, device=device)
    channel_counts = (handle.channel_counts.reshape(-1) if handle.channel_counts is not None
                      else torch.empty(0, dtype=torch.int32, device=device))
    return TensorHandle(handle.rank_prefix_matrix, handle.recv_src_idx, handle.is_token_in_rank, handle.send_pos,
                        torch.tensor(host, dtype=torch.int64), device_counts, channel_counts)


def to_dispatch_handle(handle: TensorHandle) -> DispatchHandle:
    """The Buffer's ``DispatchHandle`` from its ``TensorHandle`` (reads only the CPU ``host`` tensor)."""
    num_ranks = handle.rank_prefix_matrix.shape[0]
    slot_rows, hidden, num_recv_tokens = handle.host[:_HOST_HEAD].tolist()
    device_recv_counts = handle.device_counts[-num_ranks:] if handle.device_counts.numel() else None
    if slot_rows > 0:
        send_counts, recv_counts, num_recv = handle.device_counts[:2 * num_ranks + 1].split(
            [num_ranks, num_ranks, 1])
    else:
        host_counts = handle.host[_HOST_HEAD:].tolist()
        send_counts, recv_counts = tuple(host_counts[:num_ranks]), tuple(host_counts[num_ranks:])
        num_recv = num_recv_tokens
    # Entry 1 of the DeepEP-style tuple views the rows sent to each rank, on the device (as Buffer makes it).
    device_send_counts = (send_counts if isinstance(send_counts, Tensor) else
                          torch.tensor(send_counts, dtype=torch.int32)).to(handle.rank_prefix_matrix.device)
    return DispatchHandle(rank_prefix_matrix=handle.rank_prefix_matrix, device_send_counts=device_send_counts,
                          send_counts=send_counts,
                          recv_counts=recv_counts, recv_src_idx=handle.recv_src_idx,
                          is_token_in_rank=handle.is_token_in_rank, send_pos=handle.send_pos,
                          num_recv_tokens=num_recv, hidden=hidden, slot_rows=slot_rows,
                          device_recv_counts=device_recv_counts,
                          channel_counts=(handle.channel_counts.view(num_ranks, -1)
                                          if handle.channel_counts.numel() else None))


def _fake_tensor_handle(buffer: Buffer, device: torch.device, num_tokens: int, num_rows, num_worst_tokens: int
                        ) -> TensorHandle:
    """Empty tensors of a dispatch's ``TensorHandle`` shapes (for the fake implementations)."""
    num_ranks = buffer.group_size
    if device.type == "cpu":
        device_values, channel_values = 0, 0
    else:  # channel counts: ipc only, as many as its channels
        device_values = num_ranks + (2 * num_ranks + 1 if num_worst_tokens > 0 else 0)
        channel_values = torch.library.get_ctx().new_dynamic_size()
    return TensorHandle(torch.empty(num_ranks, num_ranks, dtype=torch.int32, device=device),
                        torch.empty(num_rows, dtype=torch.int32, device=device),
                        torch.empty(num_tokens, num_ranks, dtype=torch.bool, device=device),
                        torch.empty(num_tokens, num_ranks, dtype=torch.int32, device=device),
                        torch.empty(_HOST_HEAD + 2 * num_ranks, dtype=torch.int64),
                        torch.empty(device_values, dtype=torch.int32, device=device),
                        torch.empty(channel_values, dtype=torch.int32, device=device))


def _unaliased(tensor: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """``tensor``, or a copy where it is one of ``inputs`` (a custom op's outputs may not alias its inputs)."""
    return tensor.clone() if any(tensor is given for given in inputs if given is not None) else tensor


# ------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------

def _dispatch_impl(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, buffer_key: int, num_experts: int,
                   expert_alignment: int, num_worst_tokens: int, num_tokens_per_rank: Optional[Tensor],
                   num_tokens_per_expert: Optional[Tensor], is_token_in_rank: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """-> (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert int64 on the CPU,
    the six tensors of the TensorHandle)."""
    buffer = buffer_of(buffer_key)
    with phase("dispatch", x.device):
        if num_tokens_per_rank is None:
            num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
                topk_idx, num_experts)
        recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens)
    tensors = to_tensor_handle(handle)
    tensors = tensors._replace(is_token_in_rank=_unaliased(tensors.is_token_in_rank, is_token_in_rank))
    return (recv_x, recv_topk_idx, recv_topk_weights, torch.tensor(per_expert, dtype=torch.int64), *tensors)


def _dispatch_fake(x, topk_idx, topk_weights, buffer_key, num_experts, expert_alignment, num_worst_tokens,
                   num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank):
    buffer = buffer_of(buffer_key)
    rows = num_worst_tokens if num_worst_tokens > 0 else torch.library.get_ctx().new_dynamic_size()
    per_expert = 0 if num_worst_tokens > 0 else num_experts // buffer.group_size
    return (x.new_empty(rows, x.shape[1]), topk_idx.new_empty(rows, topk_idx.shape[1]),
            topk_weights.new_empty(rows, topk_weights.shape[1]), torch.empty(per_expert, dtype=torch.int64),
            *_fake_tensor_handle(buffer, x.device, x.shape[0], rows, num_worst_tokens))


def _combine_impl(x: Tensor, rank_prefix_matrix: Tensor, recv_src_idx: Tensor, is_token_in_rank: Tensor,
                  send_pos: Tensor, host: Tensor, device_counts: Tensor, channel_counts: Tensor, buffer_key: int,
                  topk_weights: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """-> (combined_x [T, H], combined_topk_weights [T, K], or an empty tensor without topk_weights)."""
    handle = to_dispatch_handle(TensorHandle(rank_prefix_matrix, recv_src_idx, is_token_in_rank, send_pos, host,
                                             device_counts, channel_counts))
    with phase("combine", x.device):
        combined_x, combined_topk_weights, _ = buffer_of(buffer_key).combine(x, handle, topk_weights=topk_weights)
    if combined_topk_weights is None:
        combined_topk_weights = x.new_empty(0, dtype=torch.float32)
    return combined_x, combined_topk_weights


def _combine_fake(x, rank_prefix_matrix, recv_src_idx, is_token_in_rank, send_pos, host, device_counts,
                  channel_counts, buffer_key, topk_weights):
    num_tokens = is_token_in_rank.shape[0]
    weights = (topk_weights.new_empty(num_tokens, topk_weights.shape[1]) if topk_weights is not None
               else x.new_empty(0, dtype=torch.float32))
    return x.new_empty(num_tokens, x.shape[1]), weights


def _cached_dispatch_impl(x: Tensor, rank_prefix_matrix: Tensor, recv_src_idx: Tensor, is_token_in_rank: Tensor,
                          send_pos: Tensor, host: Tensor, device_counts: Tensor, channel_counts: Tensor,
                          buffer_key: int) -> Tensor:
    """-> recv_x [N, H]: x along the layout of an earlier dispatch."""
    handle = to_dispatch_handle(TensorHandle(rank_prefix_matrix, recv_src_idx, is_token_in_rank, send_pos, host,
                                             device_counts, channel_counts))
    with phase("dispatch", x.device):
        recv_x, *_ = buffer_of(buffer_key).dispatch(x, handle=handle)
    return recv_x


def _cached_dispatch_fake(x, rank_prefix_matrix, recv_src_idx, is_token_in_rank, send_pos, host, device_counts,
                          channel_counts, buffer_key):
    return x.new_empty(recv_src_idx.shape[0], x.shape[1])


def _dispatch_setup_context(ctx, inputs, output) -> None:
    ctx.buffer_key = inputs[3]
    ctx.save_for_backward(output[1], *output[4:])  # recv_topk_idx, the handle


def _dispatch_backward(ctx, grad_recv_x, grad_recv_topk_idx, grad_recv_topk_weights, *unused_grads):
    recv_topk_idx, *handle = ctx.saved_tensors
    # Slots whose expert lives on another rank received the constant 0, not the weight: their
    # gradient must not flow back to the weight.
    grad_recv_topk_weights = grad_recv_topk_weights.masked_fill(recv_topk_idx < 0, 0).contiguous()
    grad_x, grad_topk_weights = torch.ops.eplib.combine(grad_recv_x.contiguous(), *handle, ctx.buffer_key,
                                                        grad_recv_topk_weights)
    return grad_x, None, grad_topk_weights, None, None, None, None, None, None, None


def _combine_setup_context(ctx, inputs, output) -> None:
    if inputs[-1] is not None and inputs[-1].requires_grad:
        raise NotImplementedError("topk_weights: eplib::combine is differentiable in x only")
    ctx.buffer_key = inputs[8]
    ctx.save_for_backward(*inputs[1:8])  # the handle


def _combine_backward(ctx, grad_combined_x, grad_combined_topk_weights):
    grad_x = torch.ops.eplib.cached_dispatch(grad_combined_x.contiguous(), *ctx.saved_tensors, ctx.buffer_key)
    return (grad_x,) + (None,) * 9


_HANDLE_SCHEMA = ("Tensor rank_prefix_matrix, Tensor recv_src_idx, Tensor is_token_in_rank, Tensor send_pos, "
                  "Tensor host, Tensor device_counts, Tensor channel_counts, int buffer_key")
define("dispatch(Tensor x, Tensor topk_idx, Tensor topk_weights, int buffer_key, int num_experts, "
       "int expert_alignment, int num_worst_tokens, Tensor? num_tokens_per_rank, Tensor? num_tokens_per_expert, "
       "Tensor? is_token_in_rank) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
       "Tensor)",
       _dispatch_impl, _dispatch_fake, _dispatch_backward, _dispatch_setup_context)
define(f"combine(Tensor x, {_HANDLE_SCHEMA}, Tensor? topk_weights) -> (Tensor, Tensor)",
       _combine_impl, _combine_fake, _combine_backward, _combine_setup_context)
define(f"cached_dispatch(Tensor x, {_HANDLE_SCHEMA}) -> Tensor", _cached_dispatch_impl, _cached_dispatch_fake)


def _all_gather_rows_impl(local: Tensor, buffer_key: int) -> Tensor:
    """Every rank's ``local [n, P]``, rank-major: ``[R * n, P]``."""
    group = buffer_of(buffer_key).group
    gathered = local.new_empty(dist.get_world_size(group) * local.shape[0], local.shape[1])
    with phase("tp all-gather", local.device):
        all_gather(gathered, local, group, "MoE tp (expert weights all-gather)")
    return gathered


def _all_gather_rows_fake(local, buffer_key):
    return local.new_empty(buffer_of(buffer_key).group_size * local.shape[0], local.shape[1])


def _reduce_scatter_rows_impl(rows: Tensor, buffer_key: int) -> Tensor:
    """``rows [R * n, P]`` summed over the ranks; rank r keeps block r, ``[n, P]``."""
    group = buffer_of(buffer_key).group
    local = rows.new_empty(rows.shape[0] // dist.get_world_size(group), rows.shape[1])
    with phase("tp reduce-scatter", rows.device):
        reduce_scatter(local, rows, group, "MoE tp (expert gradients reduce-scatter)")
    return local


def _reduce_scatter_rows_fake(rows, buffer_key):
    return rows.new_empty(rows.shape[0] // buffer_of(buffer_key).group_size, rows.shape[1])


def _all_gather_rows_setup_context(ctx, inputs, output) -> None:
    ctx.buffer_key = inputs[1]


def _all_gather_rows_backward(ctx, grad_gathered):
    return torch.ops.eplib.reduce_scatter_rows(grad_gathered.contiguous(), ctx.buffer_key), None


define("all_gather_rows(Tensor local, int buffer_key) -> Tensor", _all_gather_rows_impl, _all_gather_rows_fake,
       _all_gather_rows_backward, _all_gather_rows_setup_context)
define("reduce_scatter_rows(Tensor rows, int buffer_key) -> Tensor", _reduce_scatter_rows_impl,
       _reduce_scatter_rows_fake)


# ------------------------------------------------------------------------------------------------
# The functions callers use
# ------------------------------------------------------------------------------------------------


def dispatch(buffer: Buffer, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, num_experts: int,
             expert_alignment: int = 1, layout: Optional[tuple] = None, num_worst_tokens: int = 0
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, TensorHandle]:
    """Layout plus dispatch, differentiable in ``x`` and ``topk_weights``.

    Args:
        buffer: the ``eplib.Buffer`` of the expert-parallel group.
        x: ``[T, H]`` contiguous, bf16/fp16/fp32/fp64.
        topk_idx: int64 ``[T, K]``, global expert ids in ``[-1, E)``.
        topk_weights: ``[T, K]`` float32, or float64 (gradcheck): the weights travel as float32, as
            in DeepEP, and come back in their own dtype.
        num_experts: E, a multiple of the group size.
        expert_alignment: each entry of the per-expert counts is rounded up to a multiple of this.
        layout: what ``buffer.get_dispatch_layout(topk_idx, num_experts)`` returned, when the caller
            already has it; None computes it.
        num_worst_tokens: if > 0, outputs have exactly this many rows (see ``Buffer.dispatch``):
            under ``torch.compile`` a static size instead of an unbacked one.

    Returns:
        ``recv_x [N, H]`` (x's dtype), ``recv_topk_idx`` int64 ``[N, K]`` (local ids, -1 elsewhere),
        ``recv_topk_weights`` ``[N, K]`` (topk_weights' dtype, 0 where the id is -1), the received
        (row, slot) pairs per local expert as int64 ``[E/R]`` on the CPU (reading it never waits
        for a device; empty with ``num_worst_tokens``, as Buffer.dispatch's list), and the handle
        for ``combine``.
    """
    layout_tensors = (layout[0], layout[2], layout[3]) if layout is not None else (None, None, None)
    recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, *handle = torch.ops.eplib.dispatch(
        x, topk_idx, topk_weights.float(), buffer_key(buffer), num_experts, expert_alignment, num_worst_tokens,
        *layout_tensors)
    return recv_x, recv_topk_idx, recv_topk_weights.to(topk_weights.dtype), tokens_per_expert, TensorHandle(*handle)


def combine(buffer: Buffer, x: Tensor, handle: TensorHandle) -> Tensor:
    """Combine, differentiable in ``x``: ``x [N, H]`` (one row per dispatched row) -> ``[T, H]``,
    the per-token sum of the rows sent back, in x's dtype (fp32 accumulation, fp64 for fp64)."""
    if not isinstance(handle, TensorHandle):
        raise TypeError(f"handle: expected the TensorHandle returned by eplib.ops.dispatch, got "
                        f"{type(handle).__name__}")
    return torch.ops.eplib.combine(x, *handle, buffer_key(buffer), None)[0]


def all_gather_rows(buffer: Buffer, local: Tensor) -> Tensor:
    """Every rank's ``local [n, P]`` of the Buffer's group, stacked rank-major: ``[R * n, P]``. The
    backward reduce-scatters the gradient: each rank gets the sum over the ranks of its block."""
    return torch.ops.eplib.all_gather_rows(local.contiguous(), buffer_key(buffer))
