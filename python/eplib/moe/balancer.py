"""Auxiliary-loss-free load balancing: the bias update of DeepSeek-V3 across all MoE layers."""

import math
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..collectives import all_reduce
from .layer import MoE


class Balancer:
    """Moves the routing bias of every ``eplib.MoE`` inside ``module`` towards equal load.

    Each router counts, on the device, the experts its tokens chose while grad was enabled.
    ``step()`` (call it once per optimizer step) sums those counts over the group with **one**
    all-reduce for all layers, then per layer applies ``bias += bias_update_rate * sign(mean -
    count)`` and restarts the counts. Nothing on this path reads the device from the host, so it
    never stalls a CUDA stream. ``bias_update_rate=0`` freezes the bias but keeps the statistics.

    Args:
        module: the model; its ``eplib.MoE`` submodules are found once, here.
        bias_update_rate: γ of the update rule (DeepSeek-V3 used 1e-3).
        group: the process group to sum the counts over; by default the layers' own group (they
            must share one). None with no distributed group: the counts stay local.
    """

    def __init__(self, module: nn.Module, bias_update_rate: float = 1e-3,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not (isinstance(bias_update_rate, (int, float)) and math.isfinite(bias_update_rate)
                and bias_update_rate >= 0):
            raise ValueError(f"bias_update_rate: expected a finite number >= 0, got {bias_update_rate!r}")
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

    def step(self) -> None:
        """Sum every layer's pending counts over the group (one all-reduce) and update the biases."""
        routers = [layer.router for layer in self.layers]
        counts = torch.cat([router.pending_counts for router in routers])
        if self.group is not None and dist.get_world_size(self.group) > 1:
            all_reduce(counts, self.group, "Balancer.step (expert load counts)")
        for router, group_counts in zip(routers, counts.split([r.num_experts for r in routers])):
            router.apply_load(group_counts, self.bias_update_rate)
