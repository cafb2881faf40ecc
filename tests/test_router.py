"""eplib.moe.Router against a per-token float64 re-implementation of DeepSeek-V3's gate."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from eplib.moe import Router, max_violation


def reference_route(x, weight, bias, top_k, score_func, n_group, topk_group, norm, scale, group_score="top2_sum"):
    """One token at a time, in float64, with Python lists: (sorted expert ids, {id: gate}). Groups
    rank by the sum of their two best biased scores, or by their best one ("max")."""
    results = []
    for row in x.double():
        logits = weight.detach().double() @ row
        scores = torch.softmax(logits, 0) if score_func == "softmax" else torch.sigmoid(logits)
        choice = [float(s) + float(b) for s, b in zip(scores, bias)]
        per_group = len(choice) // n_group
        best = 1 if group_score == "max" else 2
        group_rank = sorted(range(n_group), key=lambda g: -sum(sorted(choice[g * per_group:(g + 1) * per_group],
                                                                      reverse=True)[:best]))
        allowed = [e for g in group_rank[:topk_group] for e in range(g * per_group, (g + 1) * per_group)]
        chosen = sorted(sorted(allowed, key=lambda e: -choice[e])[:top_k])
        gates = {e: float(scores[e]) for e in chosen}
        if norm:
            total = sum(gates.values())
            gates = {e: g / total for e, g in gates.items()}
        results.append((chosen, {e: g * scale for e, g in gates.items()}))
    return results


CONFIGS = [
    dict(score_func="softmax", top_k=2, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0),
    dict(score_func="softmax", top_k=3, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(score_func="sigmoid", top_k=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
    dict(score_func="sigmoid", top_k=1, n_group=8, topk_group=3, norm_topk_prob=False, routed_scaling_factor=1.0),
    dict(score_func="softmax", top_k=3, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5,
         group_score="max"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c['score_func']}-k{c['top_k']}-g{c['n_group']}"
                                                          f"-{c.get('group_score', 'top2_sum')}")
def test_router_matches_reference(config):
    torch.manual_seed(0)
    router = Router(16, 16, **config)
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(16) * 0.05)
    x = torch.randn(64, 16)
    out = router(x)
    expected = reference_route(x, router.weight, router.expert_bias, config["top_k"], config["score_func"],
                               config["n_group"], config["topk_group"], config["norm_topk_prob"],
                               config["routed_scaling_factor"], config.get("group_score", "top2_sum"))
    assert out.topk_idx.dtype == torch.int64 and out.topk_weights.dtype == torch.float32
    for t, (chosen, gates) in enumerate(expected):
        ids = out.topk_idx[t].tolist()
        assert sorted(ids) == chosen, f"token {t}"
        for k, e in enumerate(ids):
            assert math.isclose(out.topk_weights[t, k].item(), gates[e], rel_tol=1e-5, abs_tol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_router_computes_in_float32_whatever_its_weight_dtype(dtype):
    """After model.to(dtype) the weight (and bias) have that dtype; the forward casts them to
    float32, as transformers' DeepSeek-V3 gate does: the scores are those of the rounded weight."""
    torch.manual_seed(5)
    router = Router(8, 8, 2, score_func="sigmoid")
    rounded = router.weight.detach().to(dtype).float()
    router.to(dtype)
    x = torch.randn(10, 8, dtype=dtype)
    scores = router.scores(x)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.sigmoid(x.float() @ rounded.T))
    out = router(x)
    out.topk_weights.sum().backward()
    assert router.weight.grad.dtype == dtype


def test_bias_changes_choice_but_not_gate_values():
    torch.manual_seed(1)
    router = Router(8, 8, 2, score_func="sigmoid", norm_topk_prob=False)
    x = torch.randn(32, 8)
    with torch.no_grad():
        router.expert_bias.zero_()
        router.expert_bias[5] = 10.0  # expert 5 is chosen for every token
    out = router(x)
    assert (out.topk_idx == 5).any(-1).all()
    scores = torch.sigmoid(x @ router.weight.T)
    torch.testing.assert_close(out.topk_weights, scores.gather(1, out.topk_idx))


def test_gradient_reaches_router_weight_through_gates_only():
    torch.manual_seed(2)
    router = Router(8, 8, 2)
    out = router(torch.randn(16, 8))
    out.topk_weights.sum().backward()  # normalised gates sum to 1 per token: gradient ~ 0
    assert router.weight.grad.abs().max() < 1e-6
    router.weight.grad = None
    router(torch.randn(16, 8)).topk_weights[:, 0].sum().backward()
    assert router.weight.grad.abs().max() > 1e-4
    assert router.expert_bias.grad is None


def test_sequence_aux_loss_matches_formula():
    torch.manual_seed(3)
    num_experts, top_k, batch, seq = 8, 2, 3, 10
    router = Router(8, num_experts, top_k, score_func="sigmoid", aux_loss_alpha=0.01)
    x = torch.randn(batch * seq, 8)
    out = router(x, num_sequences=batch)
    scores = torch.sigmoid(x.double() @ router.weight.detach().double().T).view(batch, seq, num_experts)
    chosen = out.topk_idx.view(batch, seq, top_k)
    expected = 0.0
    for b in range(batch):
        counts = torch.bincount(chosen[b].flatten(), minlength=num_experts).double()
        f = counts * num_experts / (top_k * seq)
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        expected += 0.01 * float((f * p).sum()) / batch
    assert math.isclose(out.aux_loss.item(), expected, rel_tol=1e-5)
    out.aux_loss.backward()
    assert router.weight.grad.abs().max() > 0
    assert Router(8, num_experts, top_k)(x).aux_loss.item() == 0.0


def test_counts_only_while_grad_enabled_and_not_in_recompute():
    torch.manual_seed(4)
    router = Router(8, 8, 2)
    x = torch.randn(20, 8, requires_grad=True)
    with torch.no_grad():
        router(x)
    assert router.pending_counts.sum() == 0
    out = router(x)
    assert router.pending_counts.sum() == 40
    expected = torch.bincount(out.topk_idx.flatten(), minlength=8)
    assert torch.equal(router.pending_counts, expected)
    # Activation checkpointing reruns the forward inside backward: that rerun must not count again.
    weights = checkpoint(lambda t: router(t).topk_weights, x, use_reentrant=False)
    weights[:, 0].sum().backward()
    assert router.pending_counts.sum() == 80
    assert x.grad is not None


def test_max_violation():
    assert max_violation(torch.tensor([2, 2, 2, 2])).item() == 0
    assert math.isclose(max_violation(torch.tensor([4, 2, 1, 1])).item(), 4 / 2 - 1)
    assert max_violation(torch.zeros(4, dtype=torch.int64)).item() == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=9), "top_k"), (dict(score_func="relu"), "score_func"), (dict(n_group=3), "n_group"),
    (dict(n_group=2, topk_group=3), "topk_group"), (dict(top_k=5, n_group=4, topk_group=2), "top_k"),
    (dict(aux_loss_alpha=-1.0), "aux_loss_alpha"), (dict(routed_scaling_factor=float("nan")), "routed_scaling"),
    (dict(group_score="mean"), "group_score"),
])
def test_router_rejects_bad_arguments(kwargs, match):
    args = dict(hidden_size=4, num_experts=8, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Router(**args)
