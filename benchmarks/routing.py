"""Routing generators shared by every implementation the benchmark compares.

Each generator returns ``topk_idx`` int64 ``[T, K]`` with K distinct expert ids per token (no
masked slots) and ``topk_weights`` float32 ``[T, K]`` (a softmax over the chosen slots). They are
deterministic: the expert popularity (which experts are hot) depends on ``seed`` only, so it is
the same on every rank, and the tokens of rank ``r`` are drawn from ``seed * 1000 + r``, so each
rank routes its own tokens and a rerun routes them identically.

Kinds:
    uniform  every expert equally likely;
    zipf     expert of popularity rank i has probability proportional to ``1 / (i + 1) ** zipf_s``
             (popularity ranks are a seeded permutation of the experts, so hot experts are spread
             over the ranks); K distinct experts drawn without replacement;
    hot      one seeded hot expert is chosen by a ``hot_fraction`` of the tokens, the other slots
             uniform over the remaining experts;
    group    DeepSeek-V3 group-limited routing: experts form ``n_group`` groups of consecutive
             ids, a group scores the sum of its top-2 expert scores, each token keeps its
             ``topk_group`` best groups and picks its top K experts inside them.
"""

from dataclasses import dataclass
from typing import Tuple

import torch

KINDS = ("uniform", "zipf", "hot", "group")


@dataclass(frozen=True)
class RoutingSpec:
    """What to generate; the parameters of the kinds that do not use them are ignored."""

    kind: str
    num_experts: int
    top_k: int
    zipf_s: float = 1.0
    hot_fraction: float = 0.5
    n_group: int = 8
    topk_group: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"routing kind: expected one of {KINDS}, got {self.kind!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k: expected 1..{self.num_experts} (num_experts), got {self.top_k}")
        if self.kind == "hot" and not 0.0 <= self.hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction: expected a fraction in [0, 1], got {self.hot_fraction}")
        if self.kind == "group":
            if self.num_experts % self.n_group != 0:
                raise ValueError(f"n_group: expected a divisor of num_experts={self.num_experts}, got {self.n_group}")
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(f"topk_group: expected 1..{self.n_group} (n_group), got {self.topk_group}")
            if self.top_k > self.topk_group * (self.num_experts // self.n_group):
                raise ValueError(f"top_k: {self.top_k} experts do not fit in topk_group={self.topk_group} groups of "
                                 f"{self.num_experts // self.n_group}")

    def label(self) -> str:
        """Short name for tables: the kind and its parameter."""
        if self.kind == "zipf":
            return f"zipf(s={self.zipf_s:g})"
        if self.kind == "hot":
            return f"hot({self.hot_fraction:g})"
        if self.kind == "group":
            return f"group({self.topk_group}/{self.n_group})"
        return self.kind


def rank_generator(seed: int, rank: int) -> torch.Generator:
    """The generator of rank ``rank``'s tokens (per-rank seed offset)."""
    return torch.Generator().manual_seed(seed * 1000 + rank)


def zipf_probabilities(num_experts: int, s: float, seed: int) -> torch.Tensor:
    """float64 ``[E]``: Zipf(s) over popularity ranks, assigned to experts by a seeded permutation."""
    by_rank = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    order = torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))
    probs = torch.empty(num_experts, dtype=torch.float64)
    probs[order] = by_rank / by_rank.sum()
    return probs


def hot_expert(num_experts: int, seed: int) -> int:
    """The hot expert of the ``hot`` routing (same on every rank)."""
    return int(torch.randint(num_experts, (1,), generator=torch.Generator().manual_seed(seed)))


def _sample_without_replacement(log_probs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Gumbel-top-k: per row, k distinct columns drawn without replacement from softmax(log_probs)."""
    uniform = torch.rand(log_probs.shape, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    gumbel = -torch.log(-torch.log(uniform))
    return (log_probs + gumbel).topk(k, dim=1).indices


def _group_limited(scores: torch.Tensor, spec: RoutingSpec) -> torch.Tensor:
    """DeepSeek-V3 selection from scores ``[T, E]``: top K experts inside the topk_group best groups."""
    num_tokens = scores.shape[0]
    grouped = scores.view(num_tokens, spec.n_group, -1)
    group_scores = grouped.topk(min(2, grouped.shape[2]), dim=2).values.sum(dim=2)
    best_groups = group_scores.topk(spec.topk_group, dim=1).indices
    group_mask = torch.zeros(num_tokens, spec.n_group, dtype=torch.bool)
    group_mask.scatter_(1, best_groups, True)
    expert_mask = group_mask.repeat_interleave(spec.num_experts // spec.n_group, dim=1)
    return scores.masked_fill(~expert_mask, float("-inf")).topk(spec.top_k, dim=1).indices


def generate(spec: RoutingSpec, num_tokens: int, seed: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx int64 [T, K], topk_weights float32 [T, K]) for rank ``rank``'s tokens."""
    generator = rank_generator(seed, rank)
    shape = (num_tokens, spec.num_experts)
    if spec.kind == "uniform":
        topk_idx = torch.rand(shape, generator=generator).topk(spec.top_k, dim=1).indices
    elif spec.kind == "zipf":
        log_probs = zipf_probabilities(spec.num_experts, spec.zipf_s, seed).log().expand(shape)
        topk_idx = _sample_without_replacement(log_probs, spec.top_k, generator)
    elif spec.kind == "hot":
        hot = hot_expert(spec.num_experts, seed)
        scores = torch.rand(shape, generator=generator)
        scores[:, hot] = -1.0  # the other slots come from the remaining experts
        takes_hot = torch.rand(num_tokens, generator=generator) < spec.hot_fraction
        scores[takes_hot, hot] = 2.0  # above every uniform score: always in the top K
        topk_idx = scores.topk(spec.top_k, dim=1).indices
    else:
        topk_idx = _group_limited(torch.rand(shape, generator=generator), spec)
    topk_weights = torch.randn(num_tokens, spec.top_k, generator=generator).softmax(dim=1)
    return topk_idx.to(torch.int64).contiguous(), topk_weights.to(torch.float32).contiguous()
