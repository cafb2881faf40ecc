"""Auxiliary-loss-free load balancing across all MoE layers: DeepSeek-V3's sign rule, or the
quantile controller, which moves each bias toward the value that would have balanced the last batch
exactly."""

import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ..collectives import all_reduce
from .layer import MoE
from .router import Router

Tensor = torch.Tensor

METHODS = ("sign", "quantile")

# The exact distributed quantile is a radix select on the 32-bit order-preserving keys of the
# float32 margins: ROUNDS rounds, each an all-reduced histogram of one DIGIT_BITS-bit digit per
# expert.
DIGIT_BITS = 8
BINS = 1 << DIGIT_BITS
ROUNDS = 32 // DIGIT_BITS


class Balancer:
    """Moves the routing bias of every ``eplib.MoE`` inside ``module`` towards equal load.

    Each router counts, on the device, the experts its tokens chose while grad was enabled.
    ``step()`` (call it once per optimizer step) sums those counts over the group, applies the
    controller to every layer and restarts the counts. The bias that routes a batch therefore
    depends only on earlier batches. Nothing on this path reads the device from the host, so it
    never stalls a CUDA stream.

    ``method="sign"`` (DeepSeek-V3): ``bias += bias_update_rate * sign(mean - count)``, one
    all-reduce of the counts of all layers per step. ``bias_update_rate=0`` freezes the bias but
    keeps the statistics.

    ``method="quantile"`` (J. Su's quantile balancing, 2026): each counted forward also keeps its
    margins ``d[t, e] = s[t, e] - θ[t, e]`` (``Router.selection_thresholds``: token t picks e exactly
    when ``s[t, e] + b[e] >= θ[t, e]``). Over the N tokens of the group since the last step, the
    bias that would have given expert e exactly its share ``n = round(N·K/E)`` is ``-q[e]``, q[e]
    the n-th largest of ``d[:, e]``; ``step()`` moves ``b[e] += damping * (-q[e] - b[e])``. q is
    exact (equal to a sort of all ranks' margins): a radix select whose 4 rounds each all-reduce
    an int64 histogram of 256 bins per expert (the first round carries the counts too), so a step
    costs 4 all-reduces of ``8·(256·ΣE)`` bytes (plus ``8·ΣE``), ΣE the experts of all layers,
    and 4 passes over the ``T×E`` margins; the forward keeps ``T×E`` float32 per layer and
    computes θ (a top-k over ``[T, E]``; a few more with group-limited routing). An expert whose
    share no bias can reach (q infinite: more than n tokens pick it whatever its bias) keeps its
    bias.

    Args:
        module: the model; its ``eplib.MoE`` submodules are found once, here.
        bias_update_rate: γ of the sign rule (DeepSeek-V3 used 1e-3); unused by ``"quantile"``.
        group: the process group to sum the counts over; by default the layers' own group (they
            must share one). None with no distributed group: the counts stay local.
        method: ``"sign"`` or ``"quantile"``.
        damping: the quantile controller's step toward the batch's balancing bias, in (0, 1].
    """

    def __init__(self, module: nn.Module, bias_update_rate: float = 1e-3,
                 group: Optional[dist.ProcessGroup] = None, *, method: str = "sign", damping: float = 0.5) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not (isinstance(bias_update_rate, (int, float)) and math.isfinite(bias_update_rate)
                and bias_update_rate >= 0):
            raise ValueError(f"bias_update_rate: expected a finite number >= 0, got {bias_update_rate!r}")
        if method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
        if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
            raise ValueError(f"damping: expected a number in (0, 1], got {damping!r}")
        self.layers: List[MoE] = [m for m in module.modules() if isinstance(m, MoE)]
        if not self.layers:
            raise ValueError("module: contains no eplib.MoE layer to balance")
        if group is None:
            groups = {id(layer.group): layer.group for layer in self.layers}
            if len(groups) > 1:
                raise ValueError("group: the MoE layers use different process groups; pass the group to sum "
                                 "their counts over")
            group = next(iter(groups.values()))
        self.group = group
        self.bias_update_rate = float(bias_update_rate)
        self.method = method
        self.damping = float(damping)
        for layer in self.layers:
            layer.router.record_margins = method == "quantile"

    def step(self) -> None:
        """Sum every layer's pending counts over the group and update the biases (one all-reduce
        for ``"sign"``, four for ``"quantile"``, whatever the number of layers)."""
        routers = [layer.router for layer in self.layers]
        counts = torch.cat([router.pending_counts for router in routers])
        if self.method == "sign":
            self._all_reduce(counts, "Balancer.step (expert load counts)")
            group_counts = counts.split([router.num_experts for router in routers])
            with torch.no_grad():
                for router, layer_counts in zip(routers, group_counts):
                    if self.bias_update_rate != 0:
                        load = layer_counts.float()
                        router.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.bias_update_rate)
        else:
            group_counts, quantiles = group_margin_quantiles(routers, counts, self._all_reduce)
            with torch.no_grad():
                for router, layer_counts, quantile in zip(routers, group_counts, quantiles):
                    bias = router.expert_bias
                    reachable = (layer_counts.sum() > 0) & torch.isfinite(quantile)
                    target = torch.where(reachable, -quantile, bias)
                    bias.add_(self.damping * (target - bias))
        for router, layer_counts in zip(routers, group_counts):
            router.finish_step(layer_counts)

    def _all_reduce(self, tensor: Tensor, phase: str) -> None:
        if self.group is not None and dist.get_world_size(self.group) > 1:
            all_reduce(tensor, self.group, phase)


def ordered_keys(values: Tensor) -> Tensor:
    """int64 keys in ``[0, 2^32)`` of float32 ``values``, in the same order as the values (-0 just
    below +0)."""
    bits = values.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + 2 ** 31, -1 - bits)


def values_of_keys(keys: Tensor) -> Tensor:
    """The float32 values of ``ordered_keys``' keys."""
    bits = torch.where(keys >= 2 ** 31, keys - 2 ** 31, -1 - keys)
    return bits.to(torch.int32).view(torch.float32)


def _digit_histogram(keys: Tensor, prefix: Tensor, shift: int) -> Tensor:
    """int64 ``[E, BINS]``: per expert, how many of its keys (column of ``keys [N, E]``) start with
    ``prefix[e]`` and have each value of the digit at ``shift``. No host read (no boolean indexing)."""
    num_experts = keys.shape[1]
    high = keys >> shift
    matches = (high >> DIGIT_BITS) == prefix
    slots = (high & (BINS - 1)) + torch.arange(num_experts, device=keys.device) * BINS
    histogram = torch.zeros(num_experts * BINS, dtype=torch.int64, device=keys.device)
    return histogram.scatter_add_(0, slots.flatten(), matches.flatten().to(torch.int64)).view(num_experts, BINS)


def _next_digit(histogram: Tensor, rank: Tensor) -> Tuple[Tensor, Tensor]:
    """The digit where the ``rank``-th largest key (1-based, per expert) lies, and its rank among
    the keys with that digit."""
    at_or_above = histogram.flip(-1).cumsum(-1)  # [E, BINS]: keys whose digit is >= BINS-1-j
    j = (at_or_above < rank.unsqueeze(-1)).sum(-1).clamp(max=BINS - 1)
    above = torch.where(j > 0, at_or_above.gather(1, (j - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), 0)
    return BINS - 1 - j, rank - above


def group_margin_quantiles(routers: List[Router], counts: Tensor,
                           all_reduce_fn: Callable[[Tensor, str], None]) -> Tuple[List[Tensor], List[Tensor]]:
    """Per router: its pending counts summed over the group, int64 ``[E]``, and ``q`` float32
    ``[E]``, the n-th largest of its pending margins of all ranks per expert, ``n = round(N·K/E)``
    (at least 1) for the group's N counted tokens. ``counts``: the concatenated pending counts,
    summed in place.

    Radix select: ROUNDS rounds fix the keys' digits from the top; each all-reduces (with
    ``all_reduce_fn``) the histograms of the next digit among the keys that share the fixed prefix,
    for all routers at once. Returns garbage q (to be ignored) for a router that counted no token.
    """
    keys = []
    for router in routers:
        margins = router.pending_margins
        keys.append(ordered_keys(torch.cat(margins)) if margins else
                    torch.empty(0, router.num_experts, dtype=torch.int64, device=counts.device))
    prefixes = [torch.zeros(router.num_experts, dtype=torch.int64, device=counts.device) for router in routers]
    ranks: List[Tensor] = []
    group_counts: List[Tensor] = []
    for round_index in range(ROUNDS):
        shift = 32 - DIGIT_BITS * (round_index + 1)
        histograms = [_digit_histogram(layer_keys, prefix, shift) for layer_keys, prefix in zip(keys, prefixes)]
        head = [counts] if round_index == 0 else []
        flat = torch.cat(head + [histogram.flatten() for histogram in histograms])
        all_reduce_fn(flat, f"Balancer.step (expert load counts, margin histograms, round {round_index + 1})")
        if round_index == 0:
            counts.copy_(flat[:counts.numel()])
            flat = flat[counts.numel():]
            group_counts = list(counts.split([router.num_experts for router in routers]))
            for router, layer_counts in zip(routers, group_counts):
                # N·K counted choices; the share of one expert is N·K/E, rounded half up.
                share = (2 * layer_counts.sum() + router.num_experts) // (2 * router.num_experts)
                ranks.append(share.clamp_min(1).expand(router.num_experts))
        for index, histogram in enumerate(flat.split([h.numel() for h in histograms])):
            digit, ranks[index] = _next_digit(histogram.view(-1, BINS), ranks[index])
            prefixes[index] = prefixes[index] * BINS + digit
    return group_counts, [values_of_keys(prefix) for prefix in prefixes]
