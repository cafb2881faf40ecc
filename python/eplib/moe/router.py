"""Top-k router with DeepSeek-V3's auxiliary-loss-free balancing bias.

Scores come from a linear gate in float32. A per-expert bias ``expert_bias`` is added to the
scores only to **choose** the experts; the gate values come from the unbiased scores (DeepSeek-V3,
§2.1.2; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").
The bias itself is moved by ``eplib.moe.Balancer`` from the per-expert token counts that this
module accumulates on the device.
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import check_int

Tensor = torch.Tensor

SCORE_FUNCS = ("softmax", "sigmoid")


class RouterOutput(NamedTuple):
    """``topk_idx`` int64 ``[T, K]`` global expert ids; ``topk_weights`` float32 ``[T, K]`` gate
    values; ``aux_loss`` float32 scalar (0 when ``aux_loss_alpha`` is 0)."""

    topk_idx: Tensor
    topk_weights: Tensor
    aux_loss: Tensor


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. the recompute of activation checkpointing)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def max_violation(counts: Tensor) -> Tensor:
    """MaxVio = max(load) / mean(load) - 1 of per-expert counts ``[E]``: a float32 scalar on their
    device, 0 when nothing was counted. Computed without reading the device."""
    counts = counts.float()
    mean = counts.mean()
    return torch.where(mean > 0, counts.max() / mean.clamp_min(1e-30) - 1, torch.zeros_like(mean))


class Router(nn.Module):
    """Chooses ``top_k`` of ``num_experts`` experts per token.

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: K, experts per token.
        score_func: ``"softmax"`` (over all experts) or ``"sigmoid"`` (per expert, DeepSeek-V3).
        n_group, topk_group: group-limited routing: the E experts form ``n_group`` equal groups, each
            ranked by the sum of its two best (biased) scores, and a token picks its experts only
            inside its ``topk_group`` best groups. ``n_group=1`` turns it off.
        norm_topk_prob: divide the K gate values of a token by their sum.
        routed_scaling_factor: multiplies the gate values (after the normalisation).
        aux_loss_alpha: weight of DeepSeek-V3's sequence-wise balance loss ``α Σ_i f_i P_i``
            (0 disables it; the bias does the balancing).

    Parameters and buffers: ``weight`` float32 ``[E, H]``; ``expert_bias`` float32 ``[E]`` (in the
    state_dict); the non-persistent counters of the Balancer.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, aux_loss_alpha: float = 0.0,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("num_experts", num_experts, 1)
        check_int("top_k", top_k, 1)
        if top_k > num_experts:
            raise ValueError(f"top_k: expected at most num_experts={num_experts}, got {top_k}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func: expected one of {SCORE_FUNCS}, got {score_func!r}")
        check_int("n_group", n_group, 1)
        check_int("topk_group", topk_group, 1)
        if num_experts % n_group != 0:
            raise ValueError(f"n_group: expected a divisor of num_experts={num_experts}, got {n_group}")
        if topk_group > n_group:
            raise ValueError(f"topk_group: expected at most n_group={n_group}, got {topk_group}")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k: expected at most topk_group * experts per group = "
                             f"{topk_group * (num_experts // n_group)}, got {top_k}")
        for name, value in (("routed_scaling_factor", routed_scaling_factor), ("aux_loss_alpha", aux_loss_alpha)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        self.num_experts, self.top_k, self.score_func = num_experts, top_k, score_func
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.aux_loss_alpha = float(aux_loss_alpha)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        # Token counts, int64 [E], not saved: this rank's since the last Balancer.step() (pending),
        # and the group's in the last step and since the last reset_load_stats() (accumulated).
        for name in ("pending_counts", "step_counts", "accumulated_counts"):
            self.register_buffer(name, torch.zeros(num_experts, dtype=torch.int64, device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """``weight`` ~ U(-1/sqrt(H), 1/sqrt(H)) from ``generator`` (torch's default one when None)."""
        bound = self.weight.shape[1] ** -0.5
        with torch.no_grad():
            self.weight.copy_(torch.rand(self.weight.shape, generator=generator) * (2 * bound) - bound)

    def scores(self, x: Tensor) -> Tensor:
        """Unbiased scores, float32 ``[T, E]``, of ``x [T, H]`` (any float dtype)."""
        logits = F.linear(x.float(), self.weight)
        return logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()

    def forward(self, x: Tensor, num_sequences: int = 1) -> RouterOutput:
        """Route ``x [T, H]``; the T tokens are ``num_sequences`` sequences of equal length, in order
        (used only by the sequence-wise aux loss).

        While grad is enabled and outside a backward pass (so evaluation and the recompute of
        activation checkpointing are not counted), the chosen experts are added to
        ``pending_counts`` on the device.
        """
        scores = self.scores(x)
        choice = scores.detach() + self.expert_bias
        if self.n_group > 1:
            choice = self._mask_to_top_groups(choice)
        topk_idx = choice.topk(self.top_k, dim=-1).indices
        topk_weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True).clamp_min(1e-20)
        topk_weights = topk_weights * self.routed_scaling_factor

        if torch.is_grad_enabled() and not _in_backward():
            self.pending_counts.scatter_add_(0, topk_idx.flatten(), torch.ones_like(topk_idx.flatten()))
        aux_loss = (self._sequence_aux_loss(scores, topk_idx, num_sequences) if self.aux_loss_alpha > 0
                    else scores.new_zeros(()))
        return RouterOutput(topk_idx, topk_weights, aux_loss)

    @torch.no_grad()
    def apply_load(self, group_counts: Tensor, bias_update_rate: float) -> None:
        """One balancing step from the group's counts ``group_counts`` int64 ``[E]`` (pending counts
        summed over the ranks): ``expert_bias += rate * sign(mean - count)``, then the statistics
        move on and the pending counts restart from zero. Reads nothing back to the host."""
        if bias_update_rate != 0:
            load = group_counts.float()
            self.expert_bias.add_(torch.sign(load.mean() - load), alpha=bias_update_rate)
        self.step_counts.copy_(group_counts)
        self.accumulated_counts.add_(group_counts)
        self.pending_counts.zero_()

    def _mask_to_top_groups(self, choice: Tensor) -> Tensor:
        """``choice [T, E]`` with the experts outside each token's ``topk_group`` best groups at -inf."""
        num_tokens = choice.shape[0]
        grouped = choice.view(num_tokens, self.n_group, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, n_group]
        top_groups = group_scores.topk(self.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, top_groups, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, -1)

    def _sequence_aux_loss(self, scores: Tensor, topk_idx: Tensor, num_sequences: int) -> Tensor:
        """DeepSeek-V3's sequence-wise balance loss, averaged over the sequences:
        ``α Σ_i f_i P_i`` with ``f_i = E / (K S) · #{t : i chosen for t}`` (no gradient) and
        ``P_i = 1/S Σ_t s_{t,i} / Σ_j s_{t,j}``."""
        num_tokens, num_experts = scores.shape
        if num_tokens % num_sequences != 0:
            raise ValueError(f"num_sequences: expected a divisor of the {num_tokens} tokens, got {num_sequences}")
        seq_len = num_tokens // num_sequences
        normalized = scores / scores.sum(-1, keepdim=True)
        probability = normalized.view(num_sequences, seq_len, num_experts).mean(1)  # P [B, E]
        chosen = torch.zeros(num_sequences, num_experts, dtype=scores.dtype, device=scores.device)
        chosen.scatter_add_(1, topk_idx.view(num_sequences, -1), torch.ones_like(topk_idx.view(num_sequences, -1),
                                                                                 dtype=scores.dtype))
        fraction = chosen * (num_experts / (self.top_k * seq_len))  # f [B, E]
        return self.aux_loss_alpha * (fraction * probability).sum(-1).mean()
