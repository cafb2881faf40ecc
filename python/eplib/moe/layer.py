"""``eplib.MoE``: a routed MoE layer of gated-FFN (SwiGLU by default) experts with expert-parallel,
token-parallel or automatic placement of the work across the ranks of a process group."""

import math
import weakref
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import ops
from ..buffer import Buffer
from ..collectives import all_reduce
from ..validation import check_int, check_num_experts
from . import hf
from .experts import Experts, SharedExperts, gather_expert_weights, run_experts
from .router import Router, max_violation, max_violation_floor

Tensor = torch.Tensor

PARALLEL_MODES = ("ep", "tp", "auto")


def ep_bytes(rows_per_rank: float, hidden_size: int, element_bytes: int) -> float:
    """Bytes one rank moves in an expert-parallel forward: each of its token copies (a token goes
    once to each rank that owns one of its experts: ``rows = T·K̄``) travels out in dispatch and
    back in combine, ``2·T·K̄·H·b``. The backward moves as much again."""
    return 2.0 * rows_per_rank * hidden_size * element_bytes


def tp_bytes(num_experts: int, params_per_expert: int, element_bytes: int) -> float:
    """Bytes one rank receives in a token-parallel forward: the weights of all experts,
    ``E·P·b``. The backward's reduce-scatter of their gradients moves as much again."""
    return float(num_experts) * params_per_expert * element_bytes


class MoE(nn.Module):
    """Routed MoE layer: ``y = Σ_k g_k(x) · expert_k(x) + shared(x)``, with gated-FFN experts
    ``(act(x W_gate) * (x W_up)) W_down`` (SwiGLU with the default ``hidden_act="silu"``).

    Args:
        hidden_size: H.
        ffn_hidden_size: F, the intermediate size of each expert.
        num_experts: E, a multiple of the group size R; rank r owns experts ``[r·E/R, (r+1)·E/R)``.
        top_k: K.
        group: the expert-parallel process group; by default the world group when
            ``torch.distributed`` is initialised, else none (every expert local).
        parallel: ``"ep"``: tokens travel to their experts' ranks (``eplib.ops.dispatch`` /
            ``combine``) and each rank runs its experts on expert-major groups. ``"tp"``
            (token-parallel): tokens stay; each rank all-gathers the expert weights, runs every
            expert on its own tokens, and the backward reduce-scatters the weight gradients to
            their owners. ``"auto"``: per call, the mode that moves fewer bytes (``ep_bytes`` vs
            ``tp_bytes``, agreed over the group with one small all-reduce). The same weights and
            inputs give the same function in every mode.
        score_func, n_group, topk_group, norm_topk_prob, routed_scaling_factor, aux_loss_alpha,
            group_score: the router's (``eplib.moe.Router``).
        num_shared_experts: always-on experts, replicated on every rank (0: none).
        seed: weights are drawn from it per global expert id, so that they do not depend on R.
        dtype: of the experts and the activations (the router computes in float32). ``.to()``,
            ``.double()`` and ``.bfloat16()`` change it, as for any module: it is the experts' dtype.
        buffer: the ``eplib.Buffer`` of the group (dispatch and combine in ep mode, the weight
            exchange in tp mode); by default one Buffer per group, shared by all layers.
        hidden_act: the experts' activation, by transformers' names (``eplib.moe.ACTIVATIONS``).
        num_worst_tokens: 0, or the rows every rank receives in ep mode whatever the routing
            (``Buffer.dispatch``): each rank then receives at most this many token copies, and
            under ``torch.compile`` the received rows have this static size.

    ``MoE.from_hf`` builds a layer from a transformers MoE block or its state dict, and
    ``to_hf_state_dict`` writes one back (``eplib.moe.hf``).

    Attributes: ``router``, ``experts`` (this rank's ``Experts``), ``shared_experts`` (or None),
    ``aux_loss`` (the last forward's aux loss, a scalar tensor), ``last_parallel`` (the mode the last
    forward used), ``dtype`` (the experts').
    """

    # One Buffer per group, shared by the layers that use it. Weak values, keyed by id(group): the
    # entry (and with it the Buffer's reference to the group) goes when the last layer goes, so no
    # process group outlives its users (a gloo group destroyed at interpreter exit can abort).
    _buffers_by_group: "weakref.WeakValueDictionary[int, Buffer]" = weakref.WeakValueDictionary()

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, top_k: int,
                 group: Optional[dist.ProcessGroup] = None, parallel: str = "ep", *, score_func: str = "softmax",
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, aux_loss_alpha: float = 0.0, num_shared_experts: int = 0,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: Optional[Union[str, torch.device]] = None,
                 buffer: Optional[Buffer] = None, hidden_act: str = "silu", group_score: str = "top2_sum",
                 num_worst_tokens: int = 0) -> None:
        super().__init__()
        check_int("ffn_hidden_size", ffn_hidden_size, 1)
        check_int("num_shared_experts", num_shared_experts, 0)
        self.num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, 0)
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel: expected one of {PARALLEL_MODES}, got {parallel!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"dtype: expected torch.float32, bfloat16, float16 or float64, got {dtype}")
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        num_ranks = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        check_num_experts(num_experts, num_ranks)
        self.group, self.num_ranks, self.rank = group, num_ranks, rank
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.parallel = parallel
        self.router = Router(hidden_size, num_experts, top_k, score_func, n_group, topk_group, norm_topk_prob,
                             routed_scaling_factor, aux_loss_alpha, device=device, group_score=group_score)
        self.router.reset_parameters(torch.Generator().manual_seed(seed))
        num_local = num_experts // num_ranks
        self.experts = Experts(num_local, hidden_size, ffn_hidden_size, rank * num_local, seed, dtype, device,
                               hidden_act)
        self.shared_experts = (SharedExperts(num_shared_experts, hidden_size, ffn_hidden_size, seed, dtype, device,
                                             hidden_act) if num_shared_experts else None)
        if buffer is not None and not isinstance(buffer, Buffer):
            raise TypeError(f"buffer: expected an eplib.Buffer or None, got {type(buffer).__name__}")
        # Made and registered with eplib.ops here, not at the first forward, so that a compiled forward
        # finds it ready. A Buffer's constructor starts no collective on the cpu and nccl transports.
        self._buffer = buffer if buffer is not None or group is None else self._shared_buffer(group)
        if self._buffer is not None:
            ops.buffer_key(self._buffer)
        self.aux_loss: Optional[Tensor] = None
        self.last_parallel: Optional[str] = None

    # ------------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the experts, which inputs must have (it follows ``.to()``)."""
        return self.experts.w_gate.dtype

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., H]`` in the layer's dtype -> the same shape and dtype. For the sequence-wise aux
        loss, ``x [..., S, H]`` with three or more dimensions holds sequences of S tokens; ``[T, H]``
        is one sequence."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a tensor [..., H], got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape [..., {self.hidden_size}], got {list(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"x: expected dtype {self.dtype} (the layer's), got {x.dtype}")
        tokens = x.reshape(-1, self.hidden_size).contiguous()
        routed = self.router(tokens, math.prod(x.shape[:-2]) if x.dim() >= 3 else 1)
        mode, layout = self._choose_mode(routed.topk_idx)
        hidden_act = self.experts.hidden_act
        if self.group is None:
            out = run_experts(tokens, routed.topk_idx, routed.topk_weights, self.experts.weights(),
                              hidden_act=hidden_act)
        elif mode == "ep":
            out = self._forward_ep(tokens, routed.topk_idx, routed.topk_weights, layout)
        else:
            out = run_experts(tokens, routed.topk_idx, routed.topk_weights,
                              gather_expert_weights(self.experts, self.buffer()), hidden_act=hidden_act)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        self.aux_loss, self.last_parallel = routed.aux_loss, mode
        return out.view(x.shape)

    def _forward_ep(self, tokens: Tensor, topk_idx: Tensor, topk_weights: Tensor, layout: Optional[tuple]) -> Tensor:
        buffer = self.buffer()
        recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = ops.dispatch(
            buffer, tokens, topk_idx, topk_weights, self.num_experts, layout=layout,
            num_worst_tokens=self.num_worst_tokens)
        # A num_worst_tokens dispatch leaves the per-expert counts on the device (its list is empty).
        known_counts = tokens_per_expert if self.num_worst_tokens == 0 else None
        expert_out = run_experts(recv_x, recv_topk_idx, recv_topk_weights, self.experts.weights(), known_counts,
                                 self.experts.hidden_act)
        return ops.combine(buffer, expert_out, handle)

    def _choose_mode(self, topk_idx: Tensor) -> Tuple[str, Optional[tuple]]:
        """(mode, the dispatch layout when computing the mode needed it, else None)."""
        if self.parallel != "auto":
            return self.parallel, None
        if self.group is None:
            return "ep", None
        # Every rank must take the same branch (their collectives differ), so the estimate is the
        # group's: one all-reduce of the token copies, then one host read.
        layout = self.buffer().get_dispatch_layout(topk_idx, self.num_experts)
        num_tokens_per_rank = layout[0]
        rows = num_tokens_per_rank.sum().reshape(1).to(torch.int64)
        all_reduce(rows, self.group, "MoE auto (token copies)", host_wait=True)  # read next
        element_bytes = torch.empty((), dtype=self.dtype).element_size()
        params_per_expert = sum(w[0].numel() for w in self.experts.weights())
        ep = ep_bytes(rows.item() / self.num_ranks, self.hidden_size, element_bytes)
        tp = tp_bytes(self.num_experts, params_per_expert, element_bytes)
        return ("tp" if tp < ep else "ep"), layout

    def buffer(self) -> Buffer:
        """The ``eplib.Buffer`` of the layer's group (one per group unless given); ValueError
        without a group."""
        if self._buffer is None:
            raise ValueError("buffer: this MoE has no process group, so no Buffer")
        return self._buffer

    @staticmethod
    def _shared_buffer(group: dist.ProcessGroup) -> Buffer:
        buffer = MoE._buffers_by_group.get(id(group))
        if buffer is None:
            buffer = Buffer(group)
            MoE._buffers_by_group[id(group)] = buffer
        return buffer

    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, source: Union[nn.Module, Mapping[str, Any]], config: Any,
                group: Optional[dist.ProcessGroup] = None, parallel: str = "ep", *, prefix: str = "",
                dtype: Optional[torch.dtype] = None, device: Optional[Union[str, torch.device]] = None,
                **kwargs: Any) -> "MoE":
        """The layer of a transformers MoE block (DeepSeek-V3, DeepSeek-V2, Qwen3-MoE, Mixtral), with
        this rank's experts only.

        Args:
            source: the block (``DeepseekV3MoE``, ``DeepseekV2Moe``, ``Qwen3MoeSparseMoeBlock``,
                ``MixtralSparseMoeBlock``), or a state dict holding its weights: transformers'
                fused layout (``experts.gate_up_proj``) or the checkpoints' per-expert layout
                (``experts.{i}.gate_proj.weight``, Mixtral's ``experts.{i}.w1.weight``). Values may
                be tensors or lazy slices (``safetensors.safe_open(...).get_slice(key)``): only the
                rows of this rank's experts are read.
            config: the model's transformers config, or the mapping of its config.json (its
                ``model_type`` picks the mapping).
            group, parallel: as in the constructor.
            prefix: prepended to every key (a whole model's state dict: ``"model.layers.3.mlp."``).
            dtype: of the experts; by default the checkpoint's.
            device: where the layer lives.
            **kwargs: other constructor arguments (``num_worst_tokens``, ``buffer``, ``aux_loss_alpha``).

        The layer computes what the block computes (``eplib.moe.hf`` lists the mapping).
        """
        return hf.from_hf(cls, source, config, group=group, parallel=parallel, prefix=prefix, dtype=dtype,
                          device=device, **kwargs)

    def to_hf_state_dict(self, config: Any, *, all_experts: bool = True, prefix: str = "") -> Dict[str, Tensor]:
        """This layer's weights in transformers' layout for ``config``'s model type (the inverse of
        ``from_hf``). ``all_experts=True``: the fused layout of every expert
        (``experts.gate_up_proj [E, 2F, H]``), all-gathered over the group (a collective: every rank
        calls it); ``False``: the checkpoints' per-expert keys of this rank's experts only, under
        their global ids (no communication), for a writer that merges the ranks' files."""
        return hf.to_hf_state_dict(self, config, all_experts=all_experts, prefix=prefix)

    # ------------------------------------------------------------------------------------------

    def load_stats(self) -> Dict[str, Union[Tensor, Optional[str]]]:
        """Expert load, summed over the group by ``Balancer.step()``; device tensors, no host read.

        Returns:
            ``tokens_per_expert`` int64 ``[E]`` (since the last ``reset_load_stats()``),
            ``max_vio_batch`` float32 scalar (MaxVio = max load / mean load - 1 of the last
            Balancer step, i.e. the last batch when it steps every batch), ``max_vio_floor``
            (float32 scalar: the expected batch MaxVio of an ideal router that picks K distinct
            experts uniformly at random for as many tokens as that step counted, the sampling-noise
            floor; ``eplib.moe.max_violation_floor``), ``max_vio_accumulated`` (of
            ``tokens_per_expert``), and ``parallel``: the mode the last forward used.
        """
        router = self.router
        return {"tokens_per_expert": router.accumulated_counts.clone(),
                "max_vio_batch": max_violation(router.step_counts),
                "max_vio_floor": max_violation_floor(router.step_counts.sum() // router.top_k, router.top_k,
                                                     router.num_experts),
                "max_vio_accumulated": max_violation(router.accumulated_counts),
                "parallel": self.last_parallel}

    def reset_load_stats(self) -> None:
        """Restart ``tokens_per_expert`` and ``max_vio_accumulated``."""
        self.router.accumulated_counts.zero_()
