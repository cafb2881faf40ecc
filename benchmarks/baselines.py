"""The framework-style baseline: how an MoE framework dispatches without a special library.

It follows Megatron-core's AllToAll token dispatcher:

    layout    per-expert counts (bincount) and a stable argsort of the T*K slots by expert id;
    dispatch  exchange the per-expert counts (all_to_all_single of E int64 counts), then replicate
              each token once per slot in expert order (one index_select of x) and send the T*K
              rows with all_to_all_single and the per-rank split sizes;
    combine   all_to_all_single the rows back, un-sort them, and sum each token's K copies in fp32
              (no gate weights), cast back to x's dtype.

Simplifications that favour the baseline: the gate weights do not travel, and the received rows
are not regrouped by local expert (Megatron's second permutation). Masked slots (-1) are not
supported; the benchmark's routing never produces them.
"""

from typing import List, NamedTuple, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class FrameworkLayout(NamedTuple):
    order: Tensor  # int64 [T*K]: slot ids (t*K + k) sorted by expert, stable
    tokens_per_expert: Tensor  # int64 [E]: slots naming each expert


class FrameworkHandle(NamedTuple):
    order: Tensor
    send_splits: List[int]  # rows sent to each rank
    recv_splits: List[int]  # rows received from each rank
    num_tokens: int


class FrameworkDispatcher:
    """Replicate-sort-all_to_all dispatch and combine over a process group (CPU or CUDA tensors)."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.num_ranks = dist.get_world_size(group)
        if num_experts % self.num_ranks != 0:
            raise ValueError(f"num_experts: expected a multiple of the group size {self.num_ranks}, got {num_experts}")
        self.num_experts = num_experts

    def layout(self, topk_idx: Tensor) -> FrameworkLayout:
        """topk_idx int64 [T, K] with ids in [0, E) -> the slot order and per-expert counts."""
        flat = topk_idx.reshape(-1)
        if flat.numel() and int(flat.min()) < 0:
            raise ValueError("topk_idx: the framework baseline takes no masked slots (-1)")
        order = torch.argsort(flat, stable=True)
        return FrameworkLayout(order, torch.bincount(flat, minlength=self.num_experts))

    def dispatch(self, x: Tensor, layout: FrameworkLayout, top_k: int) -> Tuple[Tensor, FrameworkHandle]:
        """x [T, H] -> (received rows [N, H] grouped by source rank then expert, handle)."""
        experts_per_rank = self.num_experts // self.num_ranks
        recv_counts = torch.empty_like(layout.tokens_per_expert)
        dist.all_to_all_single(recv_counts, layout.tokens_per_expert, group=self.group)
        send_splits = layout.tokens_per_expert.view(self.num_ranks, experts_per_rank).sum(1).tolist()
        recv_splits = recv_counts.view(self.num_ranks, experts_per_rank).sum(1).tolist()
        permuted = x.index_select(0, layout.order // top_k)
        received = x.new_empty((sum(recv_splits), x.shape[1]))
        dist.all_to_all_single(received, permuted, recv_splits, send_splits, group=self.group)
        return received, FrameworkHandle(layout.order, send_splits, recv_splits, x.shape[0])

    def combine(self, expert_out: Tensor, handle: FrameworkHandle) -> Tensor:
        """expert_out [N, H] (rows as dispatch returned them) -> [T, H], the fp32 sum of each token's K rows."""
        returned = expert_out.new_empty((handle.order.numel(), expert_out.shape[1]))
        dist.all_to_all_single(returned, expert_out, handle.send_splits, handle.recv_splits, group=self.group)
        unsorted = torch.empty_like(returned)
        unsorted[handle.order] = returned
        summed = unsorted.view(handle.num_tokens, -1, expert_out.shape[1]).sum(dim=1, dtype=torch.float32)
        return summed.to(expert_out.dtype)
