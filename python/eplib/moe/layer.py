"""``eplib.MoE``: a routed SwiGLU MoE layer with expert-parallel, token-parallel or automatic
placement of the work across the ranks of a process group."""

import weakref
from typing import Dict, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import ops
from ..buffer import Buffer
from ..collectives import all_reduce
from ..validation import check_int, check_num_experts
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
    """Routed MoE layer: ``y = Σ_k g_k(x) · expert_k(x) + shared(x)``, with SwiGLU experts.

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
        score_func, n_group, topk_group, norm_topk_prob, routed_scaling_factor, aux_loss_alpha: the
            router's (``eplib.moe.Router``).
        num_shared_experts: always-on experts, replicated on every rank (0: none).
        seed: weights are drawn from it per global expert id, so that they do not depend on R.
        dtype: of the experts and the activations (the router computes in float32).
        buffer: the ``eplib.Buffer`` to use in ep mode; by default one Buffer per group, shared by
            all layers.

    Attributes: ``router``, ``experts`` (this rank's ``Experts``), ``shared_experts`` (or None),
    ``aux_loss`` (the last forward's aux loss, a scalar tensor), ``last_parallel`` (the mode the last
    forward used).
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
                 buffer: Optional[Buffer] = None) -> None:
        super().__init__()
        check_int("ffn_hidden_size", ffn_hidden_size, 1)
        check_int("num_shared_experts", num_shared_experts, 0)
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
        self.dtype = dtype
        self.router = Router(hidden_size, num_experts, top_k, score_func, n_group, topk_group, norm_topk_prob,
                             routed_scaling_factor, aux_loss_alpha, device=device)
        self.router.reset_parameters(torch.Generator().manual_seed(seed))
        num_local = num_experts // num_ranks
        self.experts = Experts(num_local, hidden_size, ffn_hidden_size, rank * num_local, seed, dtype, device)
        self.shared_experts = (SharedExperts(num_shared_experts, hidden_size, ffn_hidden_size, seed, dtype, device)
                               if num_shared_experts else None)
        if buffer is not None and not isinstance(buffer, Buffer):
            raise TypeError(f"buffer: expected an eplib.Buffer or None, got {type(buffer).__name__}")
        self._buffer = buffer
        self.aux_loss: Optional[Tensor] = None
        self.last_parallel: Optional[str] = None

    # ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """``x [T, H]`` or ``[B, S, H]`` (B sequences, for the sequence-wise aux loss) in the
        layer's dtype -> the same shape and dtype."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a tensor [T, H] or [B, S, H], got {type(x).__name__}")
        if x.dim() not in (2, 3) or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected shape [T, {self.hidden_size}] or [B, S, {self.hidden_size}], "
                             f"got {list(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"x: expected dtype {self.dtype} (the layer's), got {x.dtype}")
        tokens = x.reshape(-1, self.hidden_size).contiguous()
        routed = self.router(tokens, x.shape[0] if x.dim() == 3 else 1)
        mode, layout = self._choose_mode(routed.topk_idx)
        if self.group is None:
            out = run_experts(tokens, routed.topk_idx, routed.topk_weights, self.experts.weights())
        elif mode == "ep":
            out = self._forward_ep(tokens, routed.topk_idx, routed.topk_weights, layout)
        else:
            out = run_experts(tokens, routed.topk_idx, routed.topk_weights,
                              gather_expert_weights(self.experts, self.group))
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        self.aux_loss, self.last_parallel = routed.aux_loss, mode
        return out.view(x.shape)

    def _forward_ep(self, tokens: Tensor, topk_idx: Tensor, topk_weights: Tensor, layout: Optional[tuple]) -> Tensor:
        buffer = self.buffer()
        recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle = ops.dispatch(
            buffer, tokens, topk_idx, topk_weights, self.num_experts, layout=layout)
        expert_out = run_experts(recv_x, recv_topk_idx, recv_topk_weights, self.experts.weights(), tokens_per_expert)
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
        """The ``eplib.Buffer`` of ep mode (created on first use, one per group)."""
        if self._buffer is None:
            buffer = MoE._buffers_by_group.get(id(self.group))
            if buffer is None:
                buffer = Buffer(self.group)
                MoE._buffers_by_group[id(self.group)] = buffer
            self._buffer = buffer
        return self._buffer

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
