"""Megatron-core's DeepEP path on eplib: its flex token dispatcher with the deepep backend
(``megatron/core/transformer/moe/fused_a2a.py``), unchanged, on CPU gloo ranks.

``eplib.deep_ep.register()`` makes ``import deep_ep`` inside Megatron find eplib; nothing else is
replaced. The experts are a per-expert scale applied by the test between Megatron's dispatch and
combine; the output and the gradients of the input and of the router probabilities are compared
with a float64 computation in plain torch on the rank's own tokens. Optional: skipped without
megatron-core.
"""

import importlib.util

import pytest
import torch

# Not imported here: importing megatron.core imports fused_a2a, which must find deep_ep, so the rank
# processes (which import this module) register eplib.deep_ep first.
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None,
                       reason="megatron-core is not installed (pip install megatron-core)"),
    pytest.mark.skipif(importlib.util.find_spec("deep_ep") is not None,
                       reason="a real DeepEP is installed here: Megatron uses it, not eplib"),
]

T, H, K, EXPERTS_PER_RANK = 24, 16, 3, 2


def expert_scale(expert):
    """The test's expert e multiplies its tokens by e + 1."""
    return expert.to(torch.float64) + 1


def job_megatron_flex_dispatcher(rank, R, group):
    import eplib
    import eplib.deep_ep

    registered = eplib.deep_ep.register()
    # Megatron wraps dispatch_preprocess in torch.compile; its own switch turns that off (a CPU
    # compile of it takes longer than the whole test).
    from megatron.core import jit
    jit.disable_jit_fuser()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe import fused_a2a
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher
    from megatron.core.transformer.transformer_config import TransformerConfig

    E = EXPERTS_PER_RANK * R
    config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1, num_moe_experts=E,
                               moe_router_topk=K, moe_token_dispatcher_type="flex",
                               moe_flex_dispatcher_backend="deepep", expert_model_parallel_size=R,
                               moe_router_dtype="fp32")
    local_experts = list(range(rank * EXPERTS_PER_RANK, (rank + 1) * EXPERTS_PER_RANK))
    dispatcher = MoEFlexTokenDispatcher(EXPERTS_PER_RANK, local_experts, config,
                                        pg_collection=ProcessGroupCollection(ep=group, expt_tp=None, tp_ep=group))

    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(T, H, generator=generator, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(T, E, generator=generator, dtype=torch.float64)
    chosen = torch.topk(scores, K, dim=-1).indices
    if rank == 0:
        chosen[:3] = torch.arange(K)  # some tokens whose experts all live on rank 0
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, chosen, True)
    gates = torch.rand(T, E, generator=generator) + 0.1
    probs = (gates * routing_map).requires_grad_()

    # Megatron's MoE layer between dispatch and combine, with the experts as scales.
    hidden, dispatched_probs = dispatcher.dispatch_preprocess(x, routing_map, probs)
    hidden, dispatched_probs = dispatcher.token_dispatch(hidden, dispatched_probs)
    hidden, tokens_per_expert, permuted_probs = dispatcher.dispatch_postprocess(hidden, dispatched_probs)
    segment_experts = torch.repeat_interleave(torch.arange(EXPERTS_PER_RANK) + rank * EXPERTS_PER_RANK,
                                              tokens_per_expert)
    expert_out = hidden * expert_scale(segment_experts)[:, None] * permuted_probs[:, None]
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(expert_out)))
    upstream = torch.randn(T, H, generator=generator, dtype=torch.float64)
    (out * upstream).sum().backward()

    # The same function in float64 on this rank's tokens alone.
    ref_x = x.detach().clone().requires_grad_()
    ref_probs = probs.detach().clone().requires_grad_()
    weights = (ref_probs.double() * expert_scale(torch.arange(E))).masked_fill(~routing_map, 0)
    ref_out = ref_x * weights.sum(1, keepdim=True)
    (ref_out * upstream).sum().backward()

    def close(a, b):
        return bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6))

    return {
        "registered": registered,
        "megatron found deep_ep": fused_a2a.HAVE_DEEP_EP,
        "megatron's Buffer is eplib's": fused_a2a.Buffer is eplib.Buffer,
        "tokens per expert": tokens_per_expert.tolist() == [int(n) for n in _received_per_expert(rank, R, E)],
        "output": close(out, ref_out),
        "grad x": close(x.grad, ref_x.grad),
        "grad probs": close(probs.grad, ref_probs.grad),
    }


def _received_per_expert(rank, R, E):
    """(token, expert) pairs of every rank that choose this rank's experts, recomputed from the seeds."""
    counts = torch.zeros(E, dtype=torch.int64)
    for source in range(R):
        generator = torch.Generator().manual_seed(100 + source)
        torch.randn(T, H, generator=generator, dtype=torch.float64)
        chosen = torch.topk(torch.randn(T, E, generator=generator, dtype=torch.float64), K, dim=-1).indices
        if source == 0:
            chosen[:3] = torch.arange(K)
        counts += torch.bincount(chosen.flatten(), minlength=E)
    return counts[rank * EXPERTS_PER_RANK:(rank + 1) * EXPERTS_PER_RANK].tolist()


def test_megatron_flex_dispatcher_deepep_backend(pool2):
    # 2 ranks only: each rank process imports megatron.core, which is most of the test's time.
    for rank, checks in enumerate(pool2.run(job_megatron_flex_dispatcher, timeout=120)):
        assert all(checks.values()), f"rank {rank}: {checks}"
