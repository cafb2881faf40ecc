"""Gated-FFN experts (SwiGLU by default): the routed experts a rank owns, the shared experts, and
the grouped computation that every parallel mode runs on expert-major rows.

The grouped computation is one ``torch.library`` custom op, ``eplib::experts`` (with its backward
``eplib::experts_backward``; defined as ``eplib.ops`` defines its ops), so that ``torch.compile`` traces an MoE layer without graph breaks:
the rows each expert gets are known only at run time, and inside the op they are plain host
integers. The fake implementation gives the expert-major row count an unbacked size.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..buffer import Buffer
from ..permute import PermuteHandle, permute_by_expert, unpermute_by_expert

Tensor = torch.Tensor
ExpertWeights = Tuple[Tensor, Tensor, Tensor]

class Activation(NamedTuple):
    """An activation and its derivative: ``backward(grad_out, input, output)`` -> grad of the input
    (aten's own backward ops, the ones autograd runs)."""

    forward: Callable[[Tensor], Tensor]
    backward: Callable[[Tensor, Tensor, Tensor], Tensor]


_aten = torch.ops.aten

#: Activations of the gate projection, by the names transformers' ``hidden_act`` uses.
ACTIVATIONS: Dict[str, Activation] = {
    "silu": Activation(F.silu, lambda grad, x, y: _aten.silu_backward(grad, x)),
    "swish": Activation(F.silu, lambda grad, x, y: _aten.silu_backward(grad, x)),
    "gelu": Activation(F.gelu, lambda grad, x, y: _aten.gelu_backward(grad, x)),
    "gelu_pytorch_tanh": Activation(lambda x: F.gelu(x, approximate="tanh"),
                                    lambda grad, x, y: _aten.gelu_backward(grad, x, approximate="tanh")),
    "gelu_new": Activation(lambda x: F.gelu(x, approximate="tanh"),
                           lambda grad, x, y: _aten.gelu_backward(grad, x, approximate="tanh")),
    "relu": Activation(F.relu, lambda grad, x, y: _aten.threshold_backward(grad, y, 0)),
    "sigmoid": Activation(torch.sigmoid, lambda grad, x, y: _aten.sigmoid_backward(grad, y)),
    "tanh": Activation(torch.tanh, lambda grad, x, y: _aten.tanh_backward(grad, y)),
}


def check_activation(hidden_act: str) -> str:
    """``hidden_act`` if it names an entry of ``ACTIVATIONS``, else ValueError."""
    if hidden_act not in ACTIVATIONS:
        raise ValueError(f"hidden_act: expected one of {sorted(ACTIVATIONS)}, got {hidden_act!r}")
    return hidden_act


def gated_ffn(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, hidden_act: str = "silu") -> Tensor:
    """One gated FFN: ``(act(x @ w_gate) * (x @ w_up)) @ w_down``; ``x [N, H]``, ``w_gate``/``w_up
    [H, F]``, ``w_down [F, H]`` -> ``[N, H]``. SwiGLU with the default ``"silu"``."""
    return (ACTIVATIONS[hidden_act].forward(x @ w_gate) * (x @ w_up)) @ w_down


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """One SwiGLU FFN: ``x [N, H]``, ``w_gate``/``w_up [H, F]``, ``w_down [F, H]`` -> ``[N, H]``."""
    return gated_ffn(x, w_gate, w_up, w_down, "silu")


def expert_weights_init(seed: int, expert: int, hidden_size: int, ffn_hidden_size: int) -> ExpertWeights:
    """Float32 ``(w_gate [H, F], w_up [H, F], w_down [F, H])`` of global expert ``expert``, drawn
    from its own generator: the same experts come out whatever the number of ranks or the mode."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + expert)
    w_gate = torch.randn(hidden_size, ffn_hidden_size, generator=generator) * hidden_size ** -0.5
    w_up = torch.randn(hidden_size, ffn_hidden_size, generator=generator) * hidden_size ** -0.5
    w_down = torch.randn(ffn_hidden_size, hidden_size, generator=generator) * ffn_hidden_size ** -0.5
    return w_gate, w_up, w_down


class Experts(nn.Module):
    """The routed experts ``[first_expert, first_expert + num_local_experts)`` of one rank.

    Parameters: ``w_gate [E_local, H, F]``, ``w_up [E_local, H, F]``, ``w_down [E_local, F, H]``.
    ``local_expert_range`` is the range of global expert ids they hold; ``hidden_act`` the
    activation of the gate projection (a key of ``ACTIVATIONS``).
    """

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int, first_expert: int = 0,
                 seed: int = 0, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 hidden_act: str = "silu") -> None:
        super().__init__()
        self.local_expert_range = range(first_expert, first_expert + num_local_experts)
        self.hidden_act = check_activation(hidden_act)
        shapes = {"w_gate": (hidden_size, ffn_hidden_size), "w_up": (hidden_size, ffn_hidden_size),
                  "w_down": (ffn_hidden_size, hidden_size)}
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.empty(num_local_experts, *shape, dtype=dtype,
                                                                   device=device)))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Each expert from ``expert_weights_init(seed, its global id, ...)`` (nothing is drawn on
        the meta device)."""
        if self.w_gate.is_meta:
            return
        hidden_size, ffn_hidden_size = self.w_gate.shape[1:]
        for local, expert in enumerate(self.local_expert_range):
            for param, value in zip(self.weights(), expert_weights_init(seed, expert, hidden_size, ffn_hidden_size)):
                param[local].copy_(value)

    def weights(self) -> ExpertWeights:
        return self.w_gate, self.w_up, self.w_down


class SharedExperts(nn.Module):
    """``num_shared_experts`` always-on experts fused into one gated FFN of width
    ``num_shared_experts * F`` (as DeepSeek-V3 does), replicated on every rank."""

    def __init__(self, num_shared_experts: int, hidden_size: int, ffn_hidden_size: int, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 hidden_act: str = "silu") -> None:
        super().__init__()
        self.hidden_act = check_activation(hidden_act)
        width = num_shared_experts * ffn_hidden_size
        self.w_gate = nn.Parameter(torch.empty(hidden_size, width, dtype=dtype, device=device))
        self.w_up = nn.Parameter(torch.empty(hidden_size, width, dtype=dtype, device=device))
        self.w_down = nn.Parameter(torch.empty(width, hidden_size, dtype=dtype, device=device))
        self.reset_parameters(seed, num_shared_experts)

    @torch.no_grad()
    def reset_parameters(self, seed: int, num_shared_experts: int) -> None:
        """Shared expert i from ``expert_weights_init(seed, -1 - i, ...)``: ids past any routed
        one, so their weights differ from all of them (nothing is drawn on the meta device)."""
        if self.w_gate.is_meta:
            return
        hidden_size, ffn_hidden_size = self.w_gate.shape[0], self.w_gate.shape[1] // num_shared_experts
        parts = [expert_weights_init(seed, -1 - i, hidden_size, ffn_hidden_size) for i in range(num_shared_experts)]
        self.w_gate.copy_(torch.cat([p[0] for p in parts], 1))
        self.w_up.copy_(torch.cat([p[1] for p in parts], 1))
        self.w_down.copy_(torch.cat([p[2] for p in parts], 0))

    def forward(self, x: Tensor) -> Tensor:
        """``x [T, H]`` -> ``[T, H]``."""
        return gated_ffn(x, self.w_gate, self.w_up, self.w_down, self.hidden_act)


# ----------------------------------------------------------------------------------------------
# The grouped computation: eplib::experts and its backward
# ----------------------------------------------------------------------------------------------


def _block_matmuls(rows: Tensor, split_sizes: List[int], weights: Tensor, out_columns: int) -> Tensor:
    """``[M, out_columns]``: the block of ``rows`` of expert e (``split_sizes[e]`` rows, in order)
    times ``weights[e]``, written in place (no concatenation copy)."""
    out = rows.new_empty(rows.shape[0], out_columns)
    start = 0
    for expert, size in enumerate(split_sizes):
        torch.mm(rows[start:start + size], weights[expert], out=out[start:start + size])
        start += size
    return out


def _blockwise_outer(left: Tensor, right: Tensor, split_sizes: List[int]) -> Tensor:
    """``[E, A, B]``: per expert e, ``left_e^T @ right_e`` over its block of rows (``left [M, A]``,
    ``right [M, B]``); zero for an expert without rows."""
    out = left.new_empty(len(split_sizes), left.shape[1], right.shape[1])
    start = 0
    for expert, size in enumerate(split_sizes):
        torch.mm(left[start:start + size].T, right[start:start + size], out=out[expert])
        start += size
    return out


def _experts_impl(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,
                  hidden_act: str, tokens_per_expert: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """-> (out [N, H], and for the backward: permuted_x [M, H], the gate and up projections
    [M, F], the expert outputs [M, H], and the rows per expert, int64 [E] on the CPU)."""
    permuted_x, num_tokens_per_expert, handle = permute_by_expert(x, topk_idx, w_gate.shape[0])
    split_sizes = (tokens_per_expert if tokens_per_expert is not None else num_tokens_per_expert.cpu()).clone()
    sizes = split_sizes.tolist()
    gate = _block_matmuls(permuted_x, sizes, w_gate, w_gate.shape[2])
    up = _block_matmuls(permuted_x, sizes, w_up, w_up.shape[2])
    expert_out = _block_matmuls(ACTIVATIONS[hidden_act].forward(gate) * up, sizes, w_down, w_down.shape[2])
    return unpermute_by_expert(expert_out, handle, topk_weights), permuted_x, gate, up, expert_out, split_sizes


def _experts_fake(x, topk_idx, topk_weights, w_gate, w_up, w_down, hidden_act, tokens_per_expert):
    rows = torch.library.get_ctx().new_dynamic_size()
    num_experts, hidden, ffn = w_gate.shape
    return (x.new_empty(x.shape), x.new_empty(rows, hidden), x.new_empty(rows, ffn), x.new_empty(rows, ffn),
            x.new_empty(rows, hidden), torch.empty(num_experts, dtype=torch.int64, device="cpu"))


def _unpermute_adjoint(grad_out: Tensor, topk_idx: Tensor, topk_weights: Tensor, expert_out: Tensor,
                       num_experts: int) -> Tuple[Tensor, Tensor, PermuteHandle]:
    """The backward of ``out = unpermute_by_expert(expert_out, handle, topk_weights)``:
    (grad of expert_out [M, H]: row (n, k) gets ``topk_weights[n, k] * grad_out[n]``; grad of
    topk_weights [N, K]: ``dot(grad_out[n], expert_out[row (n, k)])``, 0 for a masked slot; and the
    permutation's handle). In float32 (float64 for float64 rows), as the permutation kernels."""
    grad_rows, _, handle = permute_by_expert(grad_out, topk_idx, num_experts)  # grad_out[n] at each of n's rows
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    num_rows = grad_rows.shape[0]
    # Masked slots point at an extra row past the end, dropped (or read as 0) below.
    row_of_pair = torch.where(handle.pair_pos >= 0, handle.pair_pos.long(), num_rows).flatten()
    pair_weight = torch.zeros(num_rows + 1, dtype=acc, device=grad_out.device)
    pair_weight.scatter_(0, row_of_pair, topk_weights.flatten().to(acc))
    grad_expert_out = (grad_rows.to(acc) * pair_weight[:num_rows, None]).to(grad_out.dtype)
    dots = (grad_rows.to(acc) * expert_out.to(acc)).sum(-1)
    grad_weights = torch.cat([dots, dots.new_zeros(1)])[row_of_pair].view(topk_idx.shape).to(topk_weights.dtype)
    return grad_expert_out, grad_weights, handle


def _experts_backward_impl(grad_out: Tensor, topk_idx: Tensor, topk_weights: Tensor, w_gate: Tensor, w_up: Tensor,
                           w_down: Tensor, permuted_x: Tensor, gate: Tensor, up: Tensor, expert_out: Tensor,
                           split_sizes: Tensor, hidden_act: str) -> Tuple[Tensor, ...]:
    """-> (grad_x [N, H], grad_topk_weights [N, K], grad_w_gate, grad_w_up, grad_w_down)."""
    sizes = split_sizes.tolist()
    grad_expert_out, grad_weights, handle = _unpermute_adjoint(grad_out, topk_idx, topk_weights, expert_out,
                                                               w_gate.shape[0])
    activation = ACTIVATIONS[hidden_act]
    activated = activation.forward(gate)
    grad_down = _blockwise_outer(activated * up, grad_expert_out, sizes)
    grad_hidden = _block_matmuls(grad_expert_out, sizes, w_down.transpose(1, 2), w_down.shape[1])
    grad_gate = activation.backward(grad_hidden * up, gate, activated)
    grad_up = grad_hidden * activated
    grad_permuted = _block_matmuls(grad_gate, sizes, w_gate.transpose(1, 2), w_gate.shape[1])
    grad_permuted += _block_matmuls(grad_up, sizes, w_up.transpose(1, 2), w_up.shape[1])
    grad_x = unpermute_by_expert(grad_permuted, handle)  # the permutation's adjoint: each row's copies summed
    return (grad_x, grad_weights, _blockwise_outer(permuted_x, grad_gate, sizes),
            _blockwise_outer(permuted_x, grad_up, sizes), grad_down)


def _experts_backward_fake(grad_out, topk_idx, topk_weights, w_gate, w_up, w_down, permuted_x, gate, up, expert_out,
                           split_sizes, hidden_act):
    return (grad_out.new_empty(grad_out.shape), topk_weights.new_empty(topk_weights.shape),
            w_gate.new_empty(w_gate.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape))


def _experts_setup_context(ctx, inputs, output) -> None:
    x, topk_idx, topk_weights, w_gate, w_up, w_down, hidden_act, tokens_per_expert = inputs
    ctx.hidden_act = hidden_act
    ctx.save_for_backward(topk_idx, topk_weights, w_gate, w_up, w_down, *output[1:])


def _experts_backward(ctx, grad_out, *unused_grads):
    grads = torch.ops.eplib.experts_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.hidden_act)
    grad_x, grad_weights, grad_gate, grad_up, grad_down = grads
    return grad_x, None, grad_weights, grad_gate, grad_up, grad_down, None, None


ops.define("experts(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor w_gate, Tensor w_up, Tensor w_down, "
           "str hidden_act, Tensor? tokens_per_expert) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
           _experts_impl, _experts_fake, _experts_backward, _experts_setup_context)
ops.define("experts_backward(Tensor grad_out, Tensor topk_idx, Tensor topk_weights, Tensor w_gate, Tensor w_up, "
           "Tensor w_down, Tensor permuted_x, Tensor gate, Tensor up, Tensor expert_out, Tensor split_sizes, "
           "str hidden_act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _experts_backward_impl,
           _experts_backward_fake)


def run_experts(x: Tensor, topk_idx: Tensor, topk_weights: Tensor, weights: ExpertWeights,
                tokens_per_expert: Optional[Tensor] = None, hidden_act: str = "silu") -> Tensor:
    """``out[n] = Σ_k topk_weights[n, k] · expert_{topk_idx[n, k]}(x[n])`` over the slots with an id >= 0.

    The (row, slot) pairs are permuted into expert-major groups (``eplib.permute_by_expert``) so
    that each expert runs one matmul chain on a contiguous block, then the results are weighted
    and summed back per row (``eplib.unpermute_by_expert``). Differentiable in x, topk_weights and
    the weights; one custom op (``eplib::experts``), so ``torch.compile`` does not break the graph.

    Args:
        x: ``[N, H]`` rows, the experts' dtype.
        topk_idx: int64 ``[N, K]`` ids into ``weights`` (``-1``: not here).
        topk_weights: float ``[N, K]`` gate values.
        weights: ``(w_gate [E, H, F], w_up [E, H, F], w_down [E, F, H])``.
        tokens_per_expert: int64 ``[E]`` on the CPU, the pairs of each expert when the host already
            knows them (``eplib.ops.dispatch`` returns them); otherwise read from the device once.
        hidden_act: the gate's activation, a key of ``ACTIVATIONS``.

    Returns:
        ``[N, H]`` in x's dtype.
    """
    return torch.ops.eplib.experts(x.contiguous(), topk_idx, topk_weights, *weights, hidden_act, tokens_per_expert)[0]


def gather_expert_weights(experts: Experts, buffer: Buffer) -> ExpertWeights:
    """All ranks' experts, ``(w_gate [E, H, F], w_up [E, H, F], w_down [E, F, H])``, with one
    all-gather over the Buffer's group forward and one reduce-scatter backward
    (``eplib.ops.all_gather_rows``)."""
    local = experts.weights()
    flat = torch.cat([w.flatten(1) for w in local], 1)
    gathered = ops.all_gather_rows(buffer, flat)
    sizes = [w[0].numel() for w in local]
    return tuple(part.reshape(-1, *w.shape[1:]) for part, w in zip(gathered.split(sizes, 1), local))
