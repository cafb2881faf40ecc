"""Autograd-aware dispatch and combine over an ``eplib.Buffer``.

The two are each other's adjoint. Dispatch copies each token to every rank that owns one of its
experts, so its backward sums the gradients of those copies: a combine along the same handle.
Combine sums the rows that come back to a token, so its backward hands every row the gradient of
its token: a cached dispatch along the same handle. Both backwards are collectives, so every rank
of the group must run backward through the same ops in the same order (as a training step does).
"""

from typing import List, Optional, Tuple

import torch

from .buffer import Buffer
from .handle import DispatchHandle
from .timing import phase

Tensor = torch.Tensor


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, topk_weights: Tensor, topk_idx: Tensor, buffer: Buffer, num_experts: int,
                expert_alignment: int, layout: Optional[tuple]):
        with phase("dispatch", x.device):
            if layout is None:
                layout = buffer.get_dispatch_layout(topk_idx, num_experts)
            num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = layout
            recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                expert_alignment=expert_alignment)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.save_for_backward(recv_topk_idx)
        ctx.mark_non_differentiable(recv_topk_idx)
        # Non-tensor outputs (the list and the handle) pass through autograd untouched.
        return recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_recv_x: Tensor, _grad_idx, grad_recv_topk_weights: Tensor, _grad_list, _grad_handle):
        (recv_topk_idx,) = ctx.saved_tensors
        # Slots whose expert lives on another rank received the constant 0, not the weight: their
        # gradient must not flow back to the weight.
        grad_recv_topk_weights = grad_recv_topk_weights.masked_fill(recv_topk_idx < 0, 0).contiguous()
        with phase("combine", grad_recv_x.device):
            grad_x, grad_topk_weights, _ = ctx.buffer.combine(grad_recv_x.contiguous(), ctx.handle,
                                                              topk_weights=grad_recv_topk_weights)
        return grad_x, grad_topk_weights, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, buffer: Buffer, handle: DispatchHandle) -> Tensor:
        ctx.buffer, ctx.handle = buffer, handle
        with phase("combine", x.device):
            combined_x, _, _ = buffer.combine(x, handle)
        return combined_x

    @staticmethod
    def backward(ctx, grad_combined_x: Tensor):
        with phase("dispatch", grad_combined_x.device):
            grad_x, *_ = ctx.buffer.dispatch(grad_combined_x.contiguous(), handle=ctx.handle)
        return grad_x, None, None


def dispatch(buffer: Buffer, x: Tensor, topk_idx: Tensor, topk_weights: Tensor, num_experts: int,
             expert_alignment: int = 1, layout: Optional[tuple] = None
             ) -> Tuple[Tensor, Tensor, Tensor, List[int], DispatchHandle]:
    """Layout plus dispatch, differentiable in ``x`` and ``topk_weights``.

    Args:
        buffer: the ``eplib.Buffer`` of the expert-parallel group.
        x: ``[T, H]`` contiguous, bf16/fp16/fp32/fp64.
        topk_idx: int64 ``[T, K]``, global expert ids in ``[-1, E)``.
        topk_weights: ``[T, K]`` float32, or float64 (gradcheck): the weights travel as float32, as
            in DeepEP, and come back in their own dtype.
        num_experts: E, a multiple of the group size.
        expert_alignment: each entry of the per-expert list is rounded up to a multiple of this.
        layout: what ``buffer.get_dispatch_layout(topk_idx, num_experts)`` returned, when the caller
            already has it; None computes it.

    Returns:
        ``recv_x [N, H]`` (x's dtype), ``recv_topk_idx`` int64 ``[N, K]`` (local ids, -1 elsewhere),
        ``recv_topk_weights`` ``[N, K]`` (topk_weights' dtype, 0 where the id is -1), the list of
        received (row, slot) pairs per local expert, and the handle for ``combine``.
    """
    recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = _Dispatch.apply(
        x, topk_weights.float(), topk_idx, buffer, num_experts, expert_alignment, layout)
    return recv_x, recv_topk_idx, recv_topk_weights.to(topk_weights.dtype), tokens_per_expert, handle


def combine(buffer: Buffer, x: Tensor, handle: DispatchHandle) -> Tensor:
    """Combine, differentiable in ``x``: ``x [N, H]`` (one row per dispatched row) -> ``[T, H]``,
    the per-token sum of the rows sent back, in x's dtype (fp32 accumulation, fp64 for fp64)."""
    return _Combine.apply(x, buffer, handle)
