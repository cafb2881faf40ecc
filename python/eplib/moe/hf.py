"""transformers MoE blocks and their checkpoints ⇄ ``eplib.MoE`` (``MoE.from_hf``,
``MoE.to_hf_state_dict``). Nothing here imports transformers: a block is read through its
``state_dict()`` and a config through its attributes.

Weights (transformers' names, relative to the block; ``E_local`` experts from ``first`` per rank):

- ``gate.weight [E, H]`` -> ``router.weight``; DeepSeek-V3's ``gate.e_score_correction_bias [E]``
  -> ``router.expert_bias`` (the same role: added to the scores only to choose).
- transformers' fused experts: ``experts.gate_up_proj [E, 2F, H]`` (the F gate rows first) ->
  ``w_gate[e] = gate_up_proj[e, :F].T``, ``w_up[e] = gate_up_proj[e, F:].T``;
  ``experts.down_proj [E, H, F]`` -> ``w_down[e] = down_proj[e].T``. Only rows
  ``[first, first + E_local)`` are read.
- checkpoints' per-expert keys: ``experts.{i}.gate_proj.weight [F, H]``, ``up_proj``,
  ``down_proj [H, F]`` (Mixtral: ``w1``, ``w3``, ``w2``), transposed the same way; only this
  rank's ``i`` are read.
- DeepSeek's shared experts ``shared_experts.{gate,up,down}_proj.weight`` -> ``shared_experts``.

Routing, per ``config.model_type``:

- ``deepseek_v3``: sigmoid scores, groups ranked by the sum of their two best biased scores
  (``n_group``, ``topk_group``), ``norm_topk_prob``, ``routed_scaling_factor``, ``n_shared_experts``.
- ``deepseek_v2``: softmax; ``topk_method="greedy"``, or ``"group_limited_greedy"`` (groups ranked by
  their best score, ``group_score="max"``); no normalisation (as transformers' block);
  ``routed_scaling_factor``, ``n_shared_experts``.
- ``qwen3_moe``: softmax, ``norm_topk_prob``.
- ``mixtral``: softmax over all experts, the top-k renormalised; ``router_jitter_noise`` must be 0.

The router computes in float32, as transformers' blocks do, whatever the experts' dtype.
"""

from types import SimpleNamespace
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from ..collectives import all_gather

Tensor = torch.Tensor

MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral")

# Per-expert checkpoint keys: (gate, up, down) projection names.
_PER_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_PER_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")
_SHARED_NAMES = ("gate_proj", "up_proj", "down_proj")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _read_config(config: Any) -> Any:
    """``config`` with attribute access (a transformers config, or the mapping of its config.json)."""
    return SimpleNamespace(**config) if isinstance(config, Mapping) else config


_REQUIRED = object()


def _first(config: Any, *names: str, default: Any = _REQUIRED) -> Any:
    """The first of ``names`` that ``config`` has, else ``default`` (ValueError without one).
    Several names: transformers versions name some fields differently (the expert count is
    ``num_experts`` in Qwen3-MoE's config.json, ``num_local_experts`` in transformers 5)."""
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    if default is _REQUIRED:
        raise ValueError(f"config: expected a value for {' or '.join(names)}")
    return default


def _model_type(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config: expected a transformers config of model_type in {MODEL_TYPES}, got "
                         f"model_type={model_type!r}")
    return model_type


def moe_settings(config: Any) -> Dict[str, Any]:
    """The ``eplib.MoE`` constructor arguments that reproduce ``config``'s MoE block (a transformers
    config, or the mapping of its config.json)."""
    config = _read_config(config)
    model_type = _model_type(config)

    def get(*names: str, default: Any = _REQUIRED) -> Any:
        return _first(config, *names, default=default)

    settings = dict(hidden_size=get("hidden_size"), top_k=get("num_experts_per_tok"),
                    hidden_act=get("hidden_act", default="silu"))
    if model_type == "deepseek_v3":
        settings.update(ffn_hidden_size=get("moe_intermediate_size"),
                        num_experts=get("n_routed_experts", "num_local_experts"), score_func="sigmoid",
                        n_group=get("n_group", default=1), topk_group=get("topk_group", default=1),
                        norm_topk_prob=bool(get("norm_topk_prob")),
                        routed_scaling_factor=float(get("routed_scaling_factor", default=1.0)),
                        num_shared_experts=get("n_shared_experts", default=0))
    elif model_type == "deepseek_v2":
        topk_method = get("topk_method", default="greedy")
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"config: topk_method {topk_method!r} is not one of transformers' DeepSeek-V2 "
                             f"methods ('greedy', 'group_limited_greedy')")
        grouped = topk_method == "group_limited_greedy"
        settings.update(ffn_hidden_size=get("moe_intermediate_size"),
                        num_experts=get("n_routed_experts", "num_experts"), score_func="softmax",
                        n_group=get("n_group") if grouped else 1, topk_group=get("topk_group") if grouped else 1,
                        group_score="max", norm_topk_prob=False,
                        routed_scaling_factor=float(get("routed_scaling_factor", default=1.0)),
                        num_shared_experts=get("n_shared_experts", default=0))
    elif model_type == "qwen3_moe":
        settings.update(ffn_hidden_size=get("moe_intermediate_size"),
                        num_experts=get("num_experts", "num_local_experts"), score_func="softmax",
                        norm_topk_prob=bool(get("norm_topk_prob", default=False)))
    else:  # mixtral
        if get("router_jitter_noise", default=0):
            raise ValueError(f"config: router_jitter_noise={config.router_jitter_noise}; eplib.MoE has no input "
                             f"jitter, set it to 0")
        settings.update(ffn_hidden_size=get("intermediate_size"),
                        num_experts=get("num_local_experts", "num_experts"), score_func="softmax",
                        norm_topk_prob=True)
    return settings


# ------------------------------------------------------------------------------------------------
# Reading a state dict
# ------------------------------------------------------------------------------------------------


def _shape(value: Any) -> Tuple[int, ...]:
    """A tensor's shape, or a safetensors slice's (``get_shape()``)."""
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value.get_shape())


class _Reader:
    """Reads keys (with ``prefix``) of a state dict whose values are tensors or lazy slices; a
    slice ``value[a:b]`` reads only those rows."""

    def __init__(self, source: Mapping[str, Any], prefix: str) -> None:
        self.source, self.prefix = source, prefix

    def has(self, key: str) -> bool:
        return self.prefix + key in self.source

    def read(self, key: str, shape: Tuple[int, ...], rows: Optional[range] = None) -> Tensor:
        """The value of ``key`` (rows ``rows`` of its first dimension only), checked against ``shape``
        (the whole value's)."""
        name = self.prefix + key
        if name not in self.source:
            raise ValueError(f"source: no key {name!r} (expected a {list(shape)} tensor)")
        value = self.source[name]
        if _shape(value) != tuple(shape):
            raise ValueError(f"source: {name!r} has shape {list(_shape(value))}, expected {list(shape)}")
        tensor = value[rows.start:rows.stop] if rows is not None else value[:]
        if tensor.dtype in _FP8_DTYPES:
            raise ValueError(f"source: {name!r} is {tensor.dtype}; dequantize FP8 checkpoints (weight_scale_inv) "
                             f"to bf16 or fp32 first")
        return tensor


def _local_experts(reader: _Reader, model_type: str, num_experts: int, hidden: int, ffn: int,
                   experts: range) -> Tuple[Tensor, Tensor, Tensor]:
    """(w_gate [E_local, H, F], w_up [E_local, H, F], w_down [E_local, F, H]) of the experts in
    ``experts``, from the fused layout or the per-expert keys, whichever the source has."""
    if reader.has("experts.gate_up_proj"):
        gate_up = reader.read("experts.gate_up_proj", (num_experts, 2 * ffn, hidden), experts)
        down = reader.read("experts.down_proj", (num_experts, hidden, ffn), experts)
        return gate_up[:, :ffn].transpose(1, 2), gate_up[:, ffn:].transpose(1, 2), down.transpose(1, 2)
    gate_name, up_name, down_name = _PER_EXPERT_NAMES.get(model_type, _DEFAULT_PER_EXPERT_NAMES)
    parts: List[List[Tensor]] = [[], [], []]
    for expert in experts:
        for part, name, shape in ((parts[0], gate_name, (ffn, hidden)), (parts[1], up_name, (ffn, hidden)),
                                  (parts[2], down_name, (hidden, ffn))):
            part.append(reader.read(f"experts.{expert}.{name}.weight", shape).T)
    return tuple(torch.stack(part) for part in parts)


def from_hf(cls: type, source: Union[nn.Module, Mapping[str, Any]], config: Any, *,
            group: Optional[dist.ProcessGroup], parallel: str, prefix: str, dtype: Optional[torch.dtype],
            device: Optional[Union[str, torch.device]], **kwargs: Any) -> nn.Module:
    """``MoE.from_hf``: see its docstring. The layer is built on the meta device (no weights are
    drawn), then allocated and filled from ``source``."""
    settings = moe_settings(config)
    if isinstance(source, nn.Module):
        source = source.state_dict()
    if not isinstance(source, Mapping):
        raise TypeError(f"source: expected a transformers MoE block or a state dict, got {type(source).__name__}")
    model_type = _model_type(_read_config(config))
    moe = cls(**settings, group=group, parallel=parallel, dtype=dtype or torch.float32, device="meta", **kwargs)
    moe.to_empty(device=device if device is not None else torch.get_default_device())
    reader = _Reader(source, prefix)
    hidden, ffn, num_experts = settings["hidden_size"], settings["ffn_hidden_size"], settings["num_experts"]
    experts = moe.experts.local_expert_range
    local = _local_experts(reader, model_type, num_experts, hidden, ffn, experts)
    if dtype is None:  # the checkpoint's; the router stays in float32
        for module in (moe.experts, moe.shared_experts):
            if module is not None:
                module.to(local[0].dtype)
    with torch.no_grad():
        for buffer in moe.buffers():  # counters and the bias start at zero
            buffer.zero_()
        for param, value in zip(moe.experts.weights(), local):
            param.copy_(value)
        moe.router.weight.copy_(reader.read("gate.weight", (num_experts, hidden)))
        if model_type == "deepseek_v3":
            moe.router.expert_bias.copy_(reader.read("gate.e_score_correction_bias", (num_experts,)))
        if moe.shared_experts is not None:
            width = settings["num_shared_experts"] * ffn
            shared = moe.shared_experts
            for param, name, shape in ((shared.w_gate, "gate_proj", (width, hidden)),
                                       (shared.w_up, "up_proj", (width, hidden)),
                                       (shared.w_down, "down_proj", (hidden, width))):
                param.copy_(reader.read(f"shared_experts.{name}.weight", shape).T)
    return moe


# ------------------------------------------------------------------------------------------------
# Writing a state dict
# ------------------------------------------------------------------------------------------------


def _all_experts(moe: nn.Module, local: Tensor) -> Tensor:
    """``local [E_local, ...]`` of every rank of the layer's group, ``[E, ...]`` (a collective)."""
    if moe.group is None:
        return local
    gathered = local.new_empty(moe.num_ranks * local.shape[0], *local.shape[1:])
    all_gather(gathered.view(-1), local.reshape(-1), moe.group, "MoE.to_hf_state_dict (experts all-gather)")
    return gathered


def to_hf_state_dict(moe: nn.Module, config: Any, *, all_experts: bool, prefix: str) -> Dict[str, Tensor]:
    """``MoE.to_hf_state_dict``: see its docstring."""
    model_type = _model_type(_read_config(config))
    settings = moe_settings(config)
    hidden, ffn = moe.hidden_size, moe.experts.w_gate.shape[2]
    expected = (settings["hidden_size"], settings["ffn_hidden_size"], settings["num_experts"])
    if (hidden, ffn, moe.num_experts) != expected:
        raise ValueError(f"config: describes (hidden, ffn, experts) = {expected}, the layer has "
                         f"{(hidden, ffn, moe.num_experts)}")
    router = moe.router
    state = {"gate.weight": router.weight.detach().float().clone()}
    if model_type == "deepseek_v3":
        state["gate.e_score_correction_bias"] = router.expert_bias.detach().float().clone()
    elif bool((router.expert_bias != 0).any()):
        raise ValueError(f"config: {model_type} blocks have no routing bias, but this layer's expert_bias is "
                         f"non-zero (a Balancer moved it); export to deepseek_v3 or reset the bias")
    w_gate, w_up, w_down = (w.detach() for w in moe.experts.weights())
    if all_experts:
        gate_up = torch.cat([w_gate.transpose(1, 2), w_up.transpose(1, 2)], 1).contiguous()
        state["experts.gate_up_proj"] = _all_experts(moe, gate_up)
        state["experts.down_proj"] = _all_experts(moe, w_down.transpose(1, 2).contiguous())
    else:
        names = _PER_EXPERT_NAMES.get(model_type, _DEFAULT_PER_EXPERT_NAMES)
        for local, expert in enumerate(moe.experts.local_expert_range):
            for name, weight in zip(names, (w_gate, w_up, w_down)):
                state[f"experts.{expert}.{name}.weight"] = weight[local].T.contiguous()
    if moe.shared_experts is not None:
        shared = moe.shared_experts
        for name, weight in zip(_SHARED_NAMES, (shared.w_gate, shared.w_up, shared.w_down)):
            state[f"shared_experts.{name}.weight"] = weight.detach().T.contiguous()
    return {prefix + key: value for key, value in state.items()}
