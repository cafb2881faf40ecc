"""Data parallelism for models that hold ``eplib.MoE`` layers: torch's DDP or FSDP2 for the
replicated (dense) parameters, with eplib's routed experts left out of both.

Every rank holds its own routed experts, and their gradients already arrive summed over the tokens
of all ranks of the layer's (expert-parallel) group: combine's backward brings them home in ep
mode, the reduce-scatter in tp mode. DDP or FSDP must not reduce them again. DDP and FSDP2 average
the other gradients over the data-parallel ranks, so the objective is the mean of the ranks'
losses; ``reduce_expert_grads`` divides the expert gradients by the data-parallel size to match.
The routers' buffers stay out of DDP's buffer broadcast: the Balancer keeps the bias equal on all
ranks, and the token counts are each rank's own.

The data-parallel group is the layers' group, or, when it is larger (each expert held by several
ranks), ``expert_data_parallel_group`` names this rank's replicas of its experts (the ranks with
the same place in their expert-parallel groups): the expert gradients are then also summed over it.
"""

import inspect
from typing import Any, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..collectives import all_reduce
from .layer import MoE


def _moe_layers(module: nn.Module) -> List[MoE]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("module: contains no eplib.MoE layer")
    return layers


def expert_parameters(module: nn.Module) -> List[nn.Parameter]:
    """The routed experts' parameters of every ``eplib.MoE`` inside ``module``: each rank's own,
    whose gradients are complete without a data-parallel reduction."""
    return [p for layer in _moe_layers(module) for p in layer.experts.parameters()]


def local_state_names(module: nn.Module) -> List[str]:
    """Qualified names (``module.named_parameters()``/``named_buffers()`` form) of what a
    data-parallel wrapper must neither reduce nor broadcast: the routed experts' parameters and
    the MoE layers' buffers (routing bias and token counts)."""
    experts = {id(p) for p in expert_parameters(module)}
    layer_buffers = {id(b) for layer in _moe_layers(module) for b in layer.buffers()}
    return ([name for name, p in module.named_parameters() if id(p) in experts]
            + [name for name, b in module.named_buffers() if id(b) in layer_buffers])


def _reduce_grad(divisor: int, group: Optional[dist.ProcessGroup]):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if group is None:
            return grad / divisor
        grad = grad.contiguous().clone()
        all_reduce(grad, group, "expert gradients (expert-data-parallel all-reduce)")
        return grad.div_(divisor)
    return hook


def reduce_expert_grads(module: nn.Module, expert_data_parallel_group: Optional[dist.ProcessGroup] = None) -> None:
    """A tensor hook on every routed expert's parameter (so that accumulation over micro-batches
    stays right) that sums each gradient over ``expert_data_parallel_group`` (when given: the
    ranks that hold the same experts) and divides it by the data-parallel size, the layer's group
    size times that group's. The expert gradients are then the gradient of the mean of the ranks'
    losses, as DDP and FSDP2 make the others. Applies once per parameter, however often it is
    called."""
    replicas = dist.get_world_size(expert_data_parallel_group) if expert_data_parallel_group is not None else 1
    for layer in _moe_layers(module):
        for param in layer.experts.parameters():
            if layer.num_ranks * replicas > 1 and not getattr(param, "_eplib_grad_reduced", False):
                param.register_hook(_reduce_grad(layer.num_ranks * replicas, expert_data_parallel_group))
                param._eplib_grad_reduced = True


def _check_groups(module: nn.Module, group: Optional[dist.ProcessGroup],
                  expert_data_parallel_group: Optional[dist.ProcessGroup]) -> None:
    size = dist.get_world_size(group)
    replicas = dist.get_world_size(expert_data_parallel_group) if expert_data_parallel_group is not None else 1
    for layer in _moe_layers(module):
        if layer.num_ranks * replicas != size:
            raise ValueError(f"expert_data_parallel_group: the data-parallel group has {size} ranks, an eplib.MoE "
                             f"layer's group {layer.num_ranks} and the expert-data-parallel group {replicas}; "
                             f"expected their product to be {size} (pass the group of the ranks that hold the "
                             f"same experts when the layers' group is smaller than the data-parallel group)")


def ddp(module: nn.Module, expert_data_parallel_group: Optional[dist.ProcessGroup] = None,
        **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``torch.nn.parallel.DistributedDataParallel(module, **kwargs)`` over everything but the
    names of ``local_state_names`` (DDP's ``_set_params_and_buffers_to_ignore_for_model``), with
    ``reduce_expert_grads``. Train as with any DDP model: ``loss.backward()`` on each rank.
    ``expert_data_parallel_group``: see the module's docstring."""
    _check_groups(module, kwargs.get("process_group"), expert_data_parallel_group)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, local_state_names(module))
    reduce_expert_grads(module, expert_data_parallel_group)
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def fully_shard_dense(module: nn.Module, blocks: Iterable[nn.Module] = (),
                      expert_data_parallel_group: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on each of ``blocks`` (e.g. the transformer
    blocks, each its own unit of all-gather and reduce-scatter), then on ``module`` for the rest,
    with the routed experts ignored (``ignored_params``), and ``reduce_expert_grads``. Returns
    ``module``. ``kwargs`` go to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
    ``mp_policy``, ...). ``expert_data_parallel_group``: see the module's docstring."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise RuntimeError(f"fully_shard_dense: needs torch.distributed.fsdp.fully_shard with ignored_params "
                           f"(torch >= 2.7), this is torch {torch.__version__}")

    mesh = kwargs.get("mesh")
    _check_groups(module, mesh.get_group() if mesh is not None else None, expert_data_parallel_group)
    experts = set(expert_parameters(module))
    for block in blocks:
        fully_shard(block, ignored_params=experts & set(block.parameters()), **kwargs)
    fully_shard(module, ignored_params=experts, **kwargs)
    reduce_expert_grads(module, expert_data_parallel_group)
    return module
