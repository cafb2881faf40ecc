"""Forward pass of an expert-parallel MoE layer built on ``eplib.Buffer``, checked against a dense reference.

Run:  torchrun --standalone --nproc_per_node=4 examples/moe_layer.py [--dtype bf16] [--tokens 512] ...

Each rank holds ``--tokens`` tokens and owns ``E / R`` of the ``E`` experts. One forward step:

1. route:    a softmax top-k router picks K experts per token and their gate weights;
2. dispatch: ``Buffer.get_dispatch_layout`` + ``Buffer.dispatch`` send each token once to every rank
             that owns one of its experts;
3. experts:  each rank runs its SwiGLU experts on the rows it received and applies the gate weights;
4. combine:  ``Buffer.combine`` sends the rows back and sums them per token: the layer's output.

The output is compared with the same layer computed densely in float64 on every rank, and the
script exits non-zero when the error is above the tolerance of the dtype.
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from typing import List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import eplib

Tensor = torch.Tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Max abs error against float64 for outputs of magnitude ~1: fp32 rounding is ~1e-7 per operation;
# bf16 rounds the inputs and outputs of each matmul to 8 mantissa bits (~4e-3 relative).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 6e-2}
PHASES = ("router", "dispatch", "experts", "combine")


@dataclass
class MoEWeights:
    """Router and expert weights. ``router`` is float32 ``[H, E]``; the expert weights are in the
    compute dtype: ``w_gate`` and ``w_up`` ``[E, H, F]``, ``w_down`` ``[E, F, H]``."""

    router: Tensor
    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor

    @staticmethod
    def generate(hidden: int, ffn_hidden: int, num_experts: int, dtype: torch.dtype, seed: int) -> "MoEWeights":
        """Draw all weights from ``seed``, so that every rank gets the same ones without communicating.
        Scaled by 1/sqrt(fan-in), which keeps activations and outputs of magnitude ~1."""
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=gen) / shape[-2] ** 0.5

        return MoEWeights(router=draw(hidden, num_experts),
                          w_gate=draw(num_experts, hidden, ffn_hidden).to(dtype),
                          w_up=draw(num_experts, hidden, ffn_hidden).to(dtype),
                          w_down=draw(num_experts, ffn_hidden, hidden).to(dtype))

    def experts(self, first: int, count: int) -> Tuple[Tensor, Tensor, Tensor]:
        """``(w_gate, w_up, w_down)`` of experts ``[first, first + count)``, each with leading dim ``count``."""
        return tuple(w[first:first + count] for w in (self.w_gate, self.w_up, self.w_down))


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """One expert's FFN: ``x [N, H]``, ``w_gate``/``w_up [H, F]``, ``w_down [F, H]`` -> ``[N, H]``, x's dtype."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def route(x: Tensor, router: Tensor, top_k: int) -> Tuple[Tensor, Tensor]:
    """Softmax top-k routing with normalised gate weights (norm_topk_prob).

    Args:
        x: ``[T, H]``, any float dtype.
        router: float32 ``[H, E]``.

    Returns:
        ``topk_idx`` int64 ``[T, K]`` (global expert ids) and ``topk_weights`` float32 ``[T, K]``
        (each row sums to 1), the forms ``Buffer.dispatch`` takes.
    """
    # The router runs in float32 even for bf16 activations: bf16 logits would make near-tied experts
    # flip from one rounding to the next.
    scores = torch.softmax(x.float() @ router, dim=-1)
    topk_weights, topk_idx = scores.topk(top_k, dim=-1)
    return topk_idx, topk_weights / topk_weights.sum(dim=-1, keepdim=True)


def run_local_experts(recv_x: Tensor, recv_topk_idx: Tensor, recv_topk_weights: Tensor,
                      tokens_per_expert: List[int], experts: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Expert side of the layer: ``out[n] = sum_k recv_topk_weights[n, k] * expert_{recv_topk_idx[n, k]}(recv_x[n])``
    over the slots ``k`` whose expert is local (``recv_topk_idx != -1``).

    Args:
        recv_x: ``[N, H]`` received rows, compute dtype.
        recv_topk_idx: int64 ``[N, K]``, local expert ids, -1 for experts on other ranks.
        recv_topk_weights: float32 ``[N, K]``, 0 where the id is -1.
        tokens_per_expert: ``E_local`` ints, the (row, slot) pairs of each local expert (dispatch's
            ``num_recv_tokens_per_expert_list``).
        experts: ``(w_gate [E_local, H, F], w_up [E_local, H, F], w_down [E_local, F, H])``.

    Returns:
        ``[N, H]`` in recv_x's dtype, one row per received row: what combine sends back.
    """
    num_topk = recv_topk_idx.shape[1]
    slot_expert = recv_topk_idx.flatten()
    # Sorting the (row, slot) pairs by expert gives each expert one contiguous block for its matmuls
    # (what a grouped GEMM wants); the masked slots (-1) sort first and are dropped.
    num_masked = slot_expert.numel() - sum(tokens_per_expert)
    order = torch.argsort(slot_expert, stable=True)[num_masked:]
    rows = order // num_topk
    blocks = recv_x[rows].split(tokens_per_expert)
    expert_out = torch.cat([swiglu(block, *weights) for block, *weights in zip(blocks, *experts)])
    # Apply the gate here, before combine: combine only sums what comes back. A row with two local
    # experts gets both contributions, accumulated in float32.
    weighted = expert_out.float() * recv_topk_weights.flatten()[order].unsqueeze(1)
    out = torch.zeros(recv_x.shape, dtype=torch.float32).index_add_(0, rows, weighted)
    return out.to(recv_x.dtype)


def moe_forward(buffer: eplib.Buffer, x: Tensor, weights: MoEWeights, top_k: int,
                timings: List[float]) -> Tuple[Tensor, Tensor]:
    """One expert-parallel forward step.

    Args:
        x: ``[T, H]`` this rank's tokens, contiguous, compute dtype.
        timings: receives the seconds spent in each of ``PHASES``. The dispatch and combine times
            include waiting for the slowest rank, since those calls are collectives.

    Returns:
        The layer output ``[T, H]`` in x's dtype, and ``topk_idx`` int64 ``[T, K]`` (for the check).
    """
    num_experts = weights.router.shape[1]
    num_local = num_experts // buffer.group_size
    clock = time.perf_counter()

    def lap() -> None:
        nonlocal clock
        now = time.perf_counter()
        timings.append(now - clock)
        clock = now

    topk_idx, topk_weights = route(x, weights.router, top_k)
    lap()
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
    lap()
    expert_out = run_local_experts(recv_x, recv_topk_idx, recv_topk_weights, tokens_per_expert,
                                   weights.experts(buffer.rank * num_local, num_local))
    lap()
    combined_x, _, _ = buffer.combine(expert_out, handle)
    lap()
    return combined_x, topk_idx


def dense_reference(x: Tensor, topk_idx: Tensor, weights: MoEWeights) -> Tensor:
    """The same layer on one process, every expert local, in float64: ``x [T, H]`` -> float64 ``[T, H]``.

    It takes the expert choice ``topk_idx`` (int64 ``[T, K]``) from the distributed run: a near-tie
    between the K-th and (K+1)-th score can rank differently in float64, a discrete flip that is not
    an error of the layer. Gate weights and experts are recomputed here.
    """
    x = x.double()
    scores = torch.softmax(x @ weights.router.double(), dim=-1)
    gates = scores.gather(1, topk_idx)
    gates = gates / gates.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for expert in range(weights.router.shape[1]):
        token, slot = (topk_idx == expert).nonzero(as_tuple=True)
        w_gate, w_up, w_down = (w[expert].double() for w in (weights.w_gate, weights.w_up, weights.w_down))
        out.index_add_(0, token, gates[token, slot].unsqueeze(1) * swiglu(x[token], w_gate, w_up, w_down))
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn-hidden", type=int, default=512, help="intermediate size of each expert")
    parser.add_argument("--experts", type=int, default=8, help="a multiple of the number of ranks")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after 2 warm-up steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    args = parser.parse_args()
    if min(args.tokens, args.hidden, args.ffn_hidden, args.steps) < 1 or not 1 <= args.top_k <= args.experts:
        parser.error("--tokens, --hidden, --ffn-hidden and --steps must be >= 1, and 1 <= --top-k <= --experts")
    return args


def main() -> int:
    args = parse_args()
    # CPU ranks over gloo; torchrun's environment gives rank, world size and rendezvous.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.experts % world != 0:
        raise SystemExit(f"--experts {args.experts} must be a multiple of the number of ranks {world}")
    dtype = DTYPES[args.dtype]

    weights = MoEWeights.generate(args.hidden, args.ffn_hidden, args.experts, dtype, args.seed)
    # Inputs differ per rank and are drawn from a seed other than the weights' (up to 9999 ranks).
    x_gen = torch.Generator().manual_seed(args.seed * 10_000 + 1 + rank)
    x = torch.randn(args.tokens, args.hidden, generator=x_gen).to(dtype)
    buffer = eplib.Buffer(dist.group.WORLD)

    step_times, phase_times = [], []
    for step in range(2 + args.steps):
        timings: List[float] = []
        start = time.perf_counter()
        out, topk_idx = moe_forward(buffer, x, weights, args.top_k, timings)
        if step >= 2:
            step_times.append(time.perf_counter() - start)
            phase_times.append(timings)

    error = (out.double() - dense_reference(x, topk_idx, weights)).abs().max()
    errors = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(errors, error.float())
    max_error = max(e.item() for e in errors)
    # Per-rank medians, then the slowest rank: a step is as slow as its slowest rank.
    medians = torch.tensor([statistics.median(step_times)]
                           + [statistics.median(t[i] for t in phase_times) for i in range(len(PHASES))])
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)

    tolerance = TOLERANCES[dtype]
    passed = max_error <= tolerance
    if rank == 0:
        print(f"config: ranks={world} tokens/rank={args.tokens} hidden={args.hidden} ffn_hidden={args.ffn_hidden} "
              f"experts={args.experts} top_k={args.top_k} dtype={args.dtype} seed={args.seed}")
        print("max abs error per rank: " + " ".join(f"{e.item():.3e}" for e in errors))
        print(f"max abs error: {max_error:.3e} (tolerance {tolerance:.0e}) {'PASS' if passed else 'FAIL'}")
        step_ms, *phase_ms = (1e3 * t for t in medians.tolist())
        print(f"time/step: {step_ms:.2f} ms (median of {args.steps} steps, max over ranks); "
              + ", ".join(f"{name} {ms:.2f} ms" for name, ms in zip(PHASES, phase_ms)))
        comm_ms, compute_ms = phase_ms[1] + phase_ms[3], phase_ms[0] + phase_ms[2]
        print(f"dispatch+combine {comm_ms:.2f} ms vs router+experts {compute_ms:.2f} ms")
    dist.destroy_process_group()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
