"""Data parallelism for models that hold ``eplib.MoE`` layers: torch's DDP or FSDP2 for the
replicated (dense) parameters, with eplib's routed experts left out of both.

Every rank holds its own routed experts, and their gradients already arrive summed over all ranks'
tokens (combine's backward brings them home in ep mode, the reduce-scatter in tp mode): DDP or FSDP
must not reduce them again. DDP and FSDP2 average the other gradients over the ranks, so the
objective is the mean of the ranks' losses; ``scale_expert_grads`` divides the expert gradients
by the group size to match it. The routers' buffers stay out of DDP's buffer broadcast: the
Balancer keeps the bias equal on all ranks, and the token counts are each rank's own.

The layers' group must be the data-parallel group (every rank holds different experts).
"""

import inspect
from typing import Any, Iterable, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

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


def _divide_grad(divisor: int):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad / divisor
    return hook


def scale_expert_grads(module: nn.Module) -> None:
    """Divides every routed expert's gradient by its layer's group size R (a tensor hook on each
    expert parameter, so accumulation over micro-batches stays right). With it, expert gradients
    are the gradient of the mean of the ranks' losses, as DDP and FSDP2 make the others. Applies
    once per parameter, however often it is called."""
    for layer in _moe_layers(module):
        for param in layer.experts.parameters():
            if layer.num_ranks > 1 and not getattr(param, "_eplib_grad_scaled", False):
                param.register_hook(_divide_grad(layer.num_ranks))
                param._eplib_grad_scaled = True


def _check_group(module: nn.Module, group: Optional[dist.ProcessGroup]) -> None:
    size = dist.get_world_size(group)
    for layer in _moe_layers(module):
        if layer.num_ranks != size:
            raise ValueError(f"group: the data-parallel group has {size} ranks but an eplib.MoE layer's group has "
                             f"{layer.num_ranks}; its experts would need an expert-data-parallel reduction")


def ddp(module: nn.Module, **kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``torch.nn.parallel.DistributedDataParallel(module, **kwargs)`` over everything but the
    names of ``local_state_names`` (DDP's ``_set_params_and_buffers_to_ignore_for_model``), with
    ``scale_expert_grads``. Train as with any DDP model: ``loss.backward()`` on each rank."""
    _check_group(module, kwargs.get("process_group"))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, local_state_names(module))
    scale_expert_grads(module)
    return nn.parallel.DistributedDataParallel(module, **kwargs)


def fully_shard_dense(module: nn.Module, blocks: Iterable[nn.Module] = (), **kwargs: Any) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) on each of ``blocks`` (e.g. the transformer
    blocks, each its own unit of all-gather and reduce-scatter), then on ``module`` for the rest,
    with the routed experts ignored (``ignored_params``), and ``scale_expert_grads``. Returns
    ``module``. ``kwargs`` go to every ``fully_shard`` call (``mesh``, ``reshard_after_forward``,
    ``mp_policy``, ...)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        fully_shard = None
    if fully_shard is None or "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise RuntimeError(f"fully_shard_dense: needs torch.distributed.fsdp.fully_shard with ignored_params "
                           f"(torch >= 2.7), this is torch {torch.__version__}")

    mesh = kwargs.get("mesh")
    _check_group(module, mesh.get_group() if mesh is not None else None)
    experts = set(expert_parameters(module))
    for block in blocks:
        fully_shard(block, ignored_params=experts & set(block.parameters()), **kwargs)
    fully_shard(module, ignored_params=experts, **kwargs)
    scale_expert_grads(module)
    return module
