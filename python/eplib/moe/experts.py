"""SwiGLU experts: the routed experts a rank owns, the shared experts, and the grouped computation
that both parallel modes run on expert-major rows."""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..collectives import all_gather, reduce_scatter
from ..permute import permute_by_expert, unpermute_by_expert
from ..timing import phase

Tensor = torch.Tensor
ExpertWeights = Tuple[Tensor, Tensor, Tensor]


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """One SwiGLU FFN: ``x [N, H]``, ``w_gate``/``w_up [H, F]``, ``w_down [F, H]`` -> ``[N, H]``."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def expert_weights_init(seed: int, expert: int, hidden_size: int, ffn_hidden_size: int) -> ExpertWeights:
    """Float32 ``(w_gate [H, F], w_up [H, F], w_down [F, H])`` of global expert ``expert``, drawn
    from its own generator: the same experts come out whatever the number of ranks or the mode."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + expert)
    w_gate = torch.randn(hidden_size, ffn_hidden_size, generator=generator) * hidden_size ** -0.5
    w_up = torch.randn(hidden_size, ffn_hidden_size, generator=generator) * hidden_size ** -0.5
    w_down = torch.randn(ffn_hidden_size, hidden_size, generator=generator) * ffn_hidden_size ** -0.5
    return w_gate, w_up, w_down


class Experts(nn.Module):
    """The routed experts ``[first_expert, first_expert + num_local_experts)`` of one rank.

    Parameters: ``w_gate [E_local, H, F]``, ``w_up [E_local, H, F]``, ``w_down [E_local, F, H]``.
    ``local_expert_range`` is the range of global expert ids they hold.
    """

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int, first_expert: int = 0,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.local_expert_range = range(first_expert, first_expert + num_local_experts)
        shapes = {"w_gate": (hidden_size, ffn_hidden_size), "w_up": (hidden_size, ffn_hidden_size),
                  "w_down": (ffn_hidden_size, hidden_size)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(num_local_experts, *shape, dtype=dtype,
                                                                   device=device)))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Each expert from ``expert_weights_init(seed, its global id, ...)``."""
        hidden_size, ffn_hidden_size = self.w_gate.shape[1:]
        for local, expert in enumerate(self.local_expert_range):
            for param, value in zip(self.weights(), expert_weights_init(seed, expert, hidden_size, ffn_hidden_size)):
                param[local].copy_(value)

    def weights(self) -> ExpertWeights:
        return self.w_gate, self.w_up, self.w_down


class SharedExperts(nn.Module):
    """``num_shared_experts`` always-on experts fused into one SwiGLU of width
    ``num_shared_experts * F`` (as DeepSeek-V3 does), replicated on every rank."""

    def __init__(self, num_shared_experts: int, hidden_size: int, ffn_hidden_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> None:
        super().__init__()
        # Shared experts draw from expert ids past any routed one, so their weights differ from all of them.
        parts = [expert_weights_init(seed, -1 - i, hidden_size, ffn_hidden_size) for i in range(num_shared_experts)]
        self.w_gate = nn.Parameter(torch.cat([p[0] for p in parts], 1).to(dtype=dtype, device=device))
        self.w_up = nn.Parameter(torch.cat([p[1] for p in parts], 1).to(dtype=dtype, device=device))
        self.w_down = nn.Parameter(torch.cat([p[2] for p in parts], 0).to(dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        """``x [T, H]`` -> ``[T, H]``."""
        return swiglu(x, self.w_gate, self.w_up, self.w_down)


def run_experts(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, weights: ExpertWeights,
                tokens_per_expert: Optional[List[int]] = None) -> Tensor:
    """``out[n] = Σ_k topk_weights[n, k] · expert_{topk_idx[n, k]}(x[n])`` over the slots with an id >= 0.

    The (row, slot) pairs are permuted into expert-major groups (``eplib.permute_by_expert``) so
    that each expert runs one matmul chain on a contiguous block, then the results are weighted
    and summed back per row (``eplib.unpermute_by_expert``).

    Args:
        x: ``[N, H]`` rows, the experts' dtype.
        topk_idx: int64 ``[N, K]`` ids into ``weights`` (``-1``: not here).
        topk_weights: float ``[N, K]`` gate values.
        weights: ``(w_gate [E, H, F], w_up [E, H, F], w_down [E, F, H])``.
        tokens_per_expert: the pairs of each of the E experts when the host already knows them
            (dispatch returns them); otherwise they are read from the device once.

    Returns:
        ``[N, H]`` in x's dtype.
    """
    num_experts = weights[0].shape[0]
    permuted_x, num_tokens_per_expert, handle = permute_by_expert(x, topk_idx, num_experts)
    if tokens_per_expert is None:
        tokens_per_expert = num_tokens_per_expert.tolist()
    blocks = permuted_x.split(tokens_per_expert)
    expert_out = torch.cat([swiglu(block, w_gate, w_up, w_down)
                            for block, w_gate, w_up, w_down in zip(blocks, *weights)])
    return unpermute_by_expert(expert_out, handle, topk_weights)


class _GatherExpertWeights(torch.autograd.Function):
    """All-gather of every rank's flattened experts ``[E_local, P]`` -> ``[E, P]``; the backward
    reduce-scatters the weight gradients back to their owners (summed over the ranks)."""

    @staticmethod
    def forward(ctx, local: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        num_ranks = dist.get_world_size(group)
        gathered = local.new_empty(num_ranks * local.shape[0], local.shape[1])
        with phase("tp all-gather", local.device):
            all_gather(gathered, local.contiguous(), group, "MoE tp (expert weights all-gather)")
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered: Tensor):
        num_ranks = dist.get_world_size(ctx.group)
        grad_local = grad_gathered.new_empty(grad_gathered.shape[0] // num_ranks, grad_gathered.shape[1])
        with phase("tp reduce-scatter", grad_local.device):
            reduce_scatter(grad_local, grad_gathered.contiguous(), ctx.group, "MoE tp (expert gradients reduce-scatter)")
        return grad_local, None


def gather_expert_weights(experts: Experts, group: dist.ProcessGroup) -> ExpertWeights:
    """All ranks' experts, ``(w_gate [E, H, F], w_up [E, H, F], w_down [E, F, H])``, with one
    all-gather forward and one reduce-scatter backward."""
    local = experts.weights()
    flat = torch.cat([w.flatten(1) for w in local], 1)
    gathered = _GatherExpertWeights.apply(flat, group)
    sizes = [w[0].numel() for w in local]
    return tuple(part.reshape(-1, *w.shape[1:]) for part, w in zip(gathered.split(sizes, 1), local))
