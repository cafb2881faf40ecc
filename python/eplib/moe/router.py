"""Top-k router with DeepSeek-V3's auxiliary-loss-free balancing bias.

Scores come from a linear gate in float32. A per-expert bias ``expert_bias`` is added to the
scores only to **choose** the experts; the gate values come from the unbiased scores (DeepSeek-V3,
§2.1.2; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts").
The bias itself is moved by ``eplib.moe.Balancer`` from what this module accumulates on the
device: per-expert token counts, and for the quantile controller each token's margins (how far
each expert's score is from the threshold at which the token would pick it).
"""

import functools
import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import check_int

Tensor = torch.Tensor

SCORE_FUNCS = ("softmax", "sigmoid")
#: How group-limited routing ranks a group: by the sum of its two best (biased) scores
#: (DeepSeek-V3), or by its best one (DeepSeek-V2's "group_limited_greedy").
GROUP_SCORES = ("top2_sum", "max")
NEG_INF = float("-inf")


class RouterOutput(NamedTuple):
    """``topk_idx`` int64 ``[T, K]`` global expert ids; ``topk_weights`` float32 ``[T, K]`` gate
    values; ``aux_loss`` float32 scalar (0 when ``aux_loss_alpha`` is 0)."""

    topk_idx: Tensor
    topk_weights: Tensor
    aux_loss: Tensor


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. the recompute of activation checkpointing).
    False under ``torch.compile``, whose compiled backward does not rerun the forward's counting."""
    if torch.compiler.is_compiling():
        return False
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def max_violation(counts: Tensor) -> Tensor:
    """MaxVio = max(load) / mean(load) - 1 of per-expert counts ``[E]``: a float32 scalar on their
    device, 0 when nothing was counted. Computed without reading the device."""
    counts = counts.float()
    mean = counts.mean()
    return torch.where(mean > 0, counts.max() / mean.clamp_min(1e-30) - 1, torch.zeros_like(mean))


@functools.lru_cache(maxsize=None)
def _max_of_normals_moments(count: int) -> Tuple[float, float]:
    """(E[M], E[M²]) of the maximum M of ``count`` independent standard normals: Simpson's rule on
    the density ``count·φ(x)·Φ(x)^(count-1)`` over [-12, 12] (host arithmetic, once per count)."""
    points, low, high = 4001, -12.0, 12.0
    step = (high - low) / (points - 1)
    first = second = 0.0
    for i in range(points):
        x = low + i * step
        weight = (1 if i in (0, points - 1) else 4 if i % 2 else 2) * step / 3
        density = count * math.exp(-x * x / 2) / math.sqrt(2 * math.pi) * (0.5 * math.erfc(-x / math.sqrt(2))) ** (count - 1)
        first += weight * x * density
        second += weight * x * x * density
    return first, second


def max_violation_floor(num_tokens: Tensor, top_k: int, num_experts: int) -> Tensor:
    """Expected batch MaxVio of an ideal router, whose ``num_tokens`` tokens each pick ``top_k``
    distinct experts of ``num_experts`` uniformly at random: the sampling-noise floor that no
    balancer beats on a batch of that size. ``num_tokens``: a scalar tensor (any dtype, any device);
    returns a float32 scalar on its device (0 for no tokens), without reading the device.

    Closed form: an expert's count has mean ``μ = N·p`` (p = K/E) and variance ``N·p·(1-p)``; the
    counts sum to N·K, so ``max - μ`` is ``σ·sqrt(E/(E-1))`` times the maximum of E standard normals
    less their mean, whose moments are integrated numerically; a Cornish-Fisher term adds the
    binomial skew ``(1-2p)/σ``. Within 1.5% of a Monte-Carlo estimate for 512 to 16384 tokens at
    top-8 of 64 experts and top-2 of 8 (tests/test_balancer.py).
    """
    if top_k >= num_experts:
        return torch.zeros((), dtype=torch.float32, device=num_tokens.device)
    p = top_k / num_experts
    mean_max, second_moment = _max_of_normals_moments(num_experts)
    spread = math.sqrt(num_experts / (num_experts - 1))
    # MaxVio ≈ spread·sqrt((1-p)/(N·p))·mean_max + spread·(1-2p)·(second_moment-1)/(6·N·p)
    root_term = spread * math.sqrt((1 - p) / p) * mean_max
    skew_term = spread * (1 - 2 * p) * (second_moment - 1) / (6 * p)
    tokens = num_tokens.to(torch.float32)
    floor = root_term * tokens.clamp_min(1).rsqrt() + skew_term / tokens.clamp_min(1)
    return torch.where(tokens > 0, floor, torch.zeros_like(floor))


def _kth_best_of_others(best_values: Tensor, best_ids: Tensor, num_candidates: int) -> Tensor:
    """For each candidate c of a row, the K-th best value among the row's *other* entries.

    ``best_values [..., K+1]``: the row's K + 1 best values, best first; ``best_ids [..., K]``: the
    ids of the K best (ids >= ``num_candidates`` are entries that are no candidate). Returns
    ``[..., num_candidates]``: the (K+1)-th best where c is among the K best (taking c out moves
    it up one place), else the K-th best."""
    among_best = best_ids.new_zeros(best_ids.shape[:-1] + (num_candidates + 1,), dtype=torch.bool)
    among_best.scatter_(-1, best_ids.clamp(max=num_candidates), True)
    top_k = best_ids.shape[-1]
    return torch.where(among_best[..., :num_candidates], best_values[..., top_k:], best_values[..., top_k - 1:top_k])


class Router(nn.Module):
    """Chooses ``top_k`` of ``num_experts`` experts per token.

    Args:
        hidden_size: H.
        num_experts: E.
        top_k: K, experts per token.
        score_func: ``"softmax"`` (over all experts) or ``"sigmoid"`` (per expert, DeepSeek-V3).
        n_group, topk_group: group-limited routing: the E experts form ``n_group`` equal groups,
            ranked by ``group_score``, and a token picks its experts only inside its ``topk_group``
            best groups. ``n_group=1`` turns it off.
        norm_topk_prob: divide the K gate values of a token by their sum.
        routed_scaling_factor: multiplies the gate values (after the normalisation).
        aux_loss_alpha: weight of DeepSeek-V3's sequence-wise balance loss ``α Σ_i f_i P_i``
            (0 disables it; the bias does the balancing).
        group_score: how a group is ranked: ``"top2_sum"``, the sum of its two best biased scores
            (DeepSeek-V3), or ``"max"``, its best one (DeepSeek-V2). DeepSeek-V2 sets the scores of
            the other groups to 0 where eplib excludes them; both pick the same experts, since
            scores are positive and ``top_k`` is at most the experts of the kept groups (V2 has no
            bias that could make a kept score negative).

    Parameters and buffers: ``weight`` float32 ``[E, H]``; ``expert_bias`` float32 ``[E]`` (in the
    state_dict); the non-persistent counters of the Balancer. Scores are computed in float32
    whatever the dtype of ``weight`` (``model.to(torch.bfloat16)`` or ``.double()`` casts it; the
    forward casts it back, as transformers' DeepSeek-V3 gate does).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, aux_loss_alpha: float = 0.0,
                 device: Optional[torch.device] = None, group_score: str = "top2_sum") -> None:
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
        if group_score not in GROUP_SCORES:
            raise ValueError(f"group_score: expected one of {GROUP_SCORES}, got {group_score!r}")
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k: expected at most topk_group * experts per group = "
                             f"{topk_group * (num_experts // n_group)}, got {top_k}")
        for name, value in (("routed_scaling_factor", routed_scaling_factor), ("aux_loss_alpha", aux_loss_alpha)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        self.num_experts, self.top_k, self.score_func = num_experts, top_k, score_func
        self.n_group, self.topk_group, self.group_score = n_group, topk_group, group_score
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, float(routed_scaling_factor)
        self.aux_loss_alpha = float(aux_loss_alpha)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        # Token counts, int64 [E], not saved: this rank's since the last Balancer.step() (pending),
        # and the group's in the last step and since the last reset_load_stats() (accumulated).
        for name in ("pending_counts", "step_counts", "accumulated_counts"):
            self.register_buffer(name, torch.zeros(num_experts, dtype=torch.int64, device=device), persistent=False)
        # For method="quantile" (the Balancer turns it on): each counted forward appends its margins
        # scores - selection_thresholds, float32 [T, E], until the next Balancer.step().
        self.record_margins = False
        self.pending_margins: List[Tensor] = []
        self.reset_parameters()

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """``weight`` ~ U(-1/sqrt(H), 1/sqrt(H)) from ``generator`` (torch's default one when None;
        nothing is drawn on the meta device)."""
        if self.weight.is_meta:
            return
        bound = self.weight.shape[1] ** -0.5
        with torch.no_grad():
            self.weight.copy_(torch.rand(self.weight.shape, generator=generator) * (2 * bound) - bound)

    def scores(self, x: Tensor) -> Tensor:
        """Unbiased scores, float32 ``[T, E]``, of ``x [T, H]`` (any float dtype, as ``weight``)."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()

    def forward(self, x: Tensor, num_sequences: int = 1) -> RouterOutput:
        """Route ``x [T, H]``; the T tokens are ``num_sequences`` sequences of equal length, in order
        (used only by the sequence-wise aux loss).

        While grad is enabled and outside a backward pass (so evaluation and the recompute of
        activation checkpointing are not counted), the chosen experts are added to
        ``pending_counts`` on the device, and with ``record_margins`` the margins
        ``scores - selection_thresholds(biased scores)`` float32 ``[T, E]`` join ``pending_margins``
        (float32 whatever the dtype of ``expert_bias``: the Balancer's radix select reads their bits).
        """
        scores = self.scores(x)
        choice = scores.detach() + self.expert_bias
        topk_idx = self.select_experts(choice)
        topk_weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True).clamp_min(1e-20)
        topk_weights = topk_weights * self.routed_scaling_factor

        if torch.is_grad_enabled() and not _in_backward():
            self.pending_counts.scatter_add_(0, topk_idx.flatten(), torch.ones_like(topk_idx.flatten()))
            if self.record_margins:
                self.pending_margins.append((scores.detach() - self.selection_thresholds(choice)).float())
        aux_loss = (self._sequence_aux_loss(scores, topk_idx, num_sequences) if self.aux_loss_alpha > 0
                    else scores.new_zeros(()))
        return RouterOutput(topk_idx, topk_weights, aux_loss)

    @torch.no_grad()
    def finish_step(self, group_counts: Tensor) -> None:
        """End of a balancing step (the Balancer has moved the bias): ``group_counts`` int64 ``[E]``
        (the pending counts summed over the ranks) become the last step's counts and join the
        accumulated ones; the pending counts and margins restart. Reads nothing back to the host."""
        self.step_counts.copy_(group_counts)
        self.accumulated_counts.add_(group_counts)
        self.pending_counts.zero_()
        self.pending_margins.clear()

    def select_experts(self, choice: Tensor) -> Tensor:
        """The experts chosen from biased scores ``choice`` float32 ``[T, E]``: int64 ``[T, K]``, the
        ``top_k`` best inside the token's ``topk_group`` best groups."""
        if self.n_group > 1:
            choice = self._mask_to_top_groups(choice)
        return choice.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def selection_thresholds(self, choice: Tensor) -> Tensor:
        """θ float32 ``[T, E]`` for biased scores ``choice`` ``[T, E]``: with every other entry of
        its row held fixed, token t picks expert e exactly when ``choice[t, e] >= θ[t, e]`` (up to
        ties). Without group-limited routing θ is the K-th best of the other experts' scores; with
        it, see ``_group_limited_thresholds``. -inf where e is picked whatever it scores.
        """
        num_tokens, num_experts = choice.shape
        if self.n_group > 1:
            return self._group_limited_thresholds(choice)
        padded = torch.cat([choice, choice.new_full((num_tokens, 1), NEG_INF)], -1)  # in range when K = E
        best_values, best_ids = padded.topk(self.top_k + 1, dim=-1)
        return _kth_best_of_others(best_values, best_ids[:, :self.top_k], num_experts)

    def _group_limited_thresholds(self, choice: Tensor) -> Tensor:
        """``selection_thresholds`` with group-limited routing: the larger of two thresholds.
        In-group: the K-th best biased score among the other experts that token t may pick once e's
        group is among its kept groups (e's group and the ``topk_group - 1`` best other groups).
        Group entry: the value at which e lifts its group's score (``group_score``) to the
        ``topk_group``-th best score of the other groups; -inf when the group is kept whatever e
        scores."""
        num_tokens, num_experts = choice.shape
        top_k, n_group, topk_group = self.top_k, self.n_group, self.topk_group
        group_size = num_experts // n_group
        grouped = choice.view(num_tokens, n_group, group_size)
        # K + 1 padding entries per group keep every topk below in range, whatever the group size.
        padded = torch.cat([grouped, grouped.new_full((num_tokens, n_group, top_k + 1), NEG_INF)], -1)

        # The groups a token keeps, best first; `bar` is the topk_group-th best score among the
        # *other* groups (the score e's group must reach).
        group_scores, kept_rank = self._top_groups(grouped)
        kept = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_rank, True)
        if topk_group < n_group:
            ranked = group_scores.topk(topk_group + 1, dim=-1).values
            bar = torch.where(kept, ranked[:, topk_group:], ranked[:, topk_group - 1:topk_group])
        else:  # every group is always kept
            bar = torch.full_like(group_scores, NEG_INF)
        bar = bar.unsqueeze(-1)  # [T, G, 1]

        own_values, own_ids = padded.topk(max(top_k + 1, 3), dim=-1)  # each group's best, [T, G, >= 3]
        if group_size == 1:
            entry = bar
        else:
            local_ids = torch.arange(group_size, device=choice.device)
            is_first, is_second = own_ids[..., :1] == local_ids, own_ids[..., 1:2] == local_ids
            best_other = torch.where(is_first, own_values[..., 1:2], own_values[..., :1])
            if self.group_score == "max":  # e's group scores max(e, best_other)
                entry = torch.where(best_other < bar, bar, NEG_INF)
            else:  # e's group scores best_other + max(e, second_other)
                second_other = torch.where(is_first | is_second, own_values[..., 2:3], own_values[..., 1:2])
                entry = torch.where(best_other + second_other < bar, bar - best_other, NEG_INF)

        # e's companions, the other groups a token keeps once e's group is in, are the kept groups
        # but one: e's own when it is kept, else the weakest kept. Their K best scores, for each kept
        # group left out, come from the K + group_size best kept scores (one group holds at most
        # group_size of them).
        kept_choice = torch.cat([grouped.masked_fill(~kept.unsqueeze(-1), NEG_INF).view(num_tokens, num_experts),
                                 choice.new_full((num_tokens, top_k + group_size), NEG_INF)], -1)
        kept_values, kept_ids = kept_choice.topk(top_k + group_size, dim=-1)  # [T, K + S]
        left_out = (kept_ids // group_size).unsqueeze(1) == kept_rank.unsqueeze(-1)  # [T, kept group, K + S]
        without_group = kept_values.unsqueeze(1).masked_fill(left_out, NEG_INF).topk(top_k, dim=-1).values
        left_out_position = torch.full_like(group_scores, topk_group - 1, dtype=torch.int64)  # the weakest's
        left_out_position.scatter_(1, kept_rank, torch.arange(topk_group, device=choice.device).expand_as(kept_rank))
        companion_values = without_group.gather(1, left_out_position.unsqueeze(-1).expand(-1, -1, top_k))
        own_values, own_ids = own_values[..., :top_k + 1], own_ids[..., :top_k + 1]
        # The K + 1 best of e's group and its companions; those from the companions are no
        # candidate for e's place (id group_size).
        pool_values, pool_pos = torch.cat([own_values, companion_values], -1).topk(top_k + 1, dim=-1)
        best_pos = pool_pos[..., :top_k]
        best_ids = torch.where(best_pos <= top_k, own_ids.gather(-1, best_pos.clamp(max=top_k)), group_size)
        in_group = _kth_best_of_others(pool_values, best_ids, group_size)
        return torch.maximum(entry, in_group).view(num_tokens, num_experts)

    def _top_groups(self, grouped: Tensor) -> Tuple[Tensor, Tensor]:
        """Group scores ``[T, n_group]`` (``group_score`` of each group's biased scores) of
        ``grouped [T, n_group, E / n_group]``, and the ``topk_group`` best groups, best first."""
        if self.group_score == "max":
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        return group_scores, group_scores.topk(self.topk_group, dim=-1).indices

    def _mask_to_top_groups(self, choice: Tensor) -> Tensor:
        """``choice [T, E]`` with the experts outside each token's ``topk_group`` best groups at -inf."""
        num_tokens = choice.shape[0]
        grouped = choice.view(num_tokens, self.n_group, -1)
        group_scores, top_groups = self._top_groups(grouped)
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
