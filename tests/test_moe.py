"""eplib.MoE: ep, tp and auto modes compute one function, checked against a dense single-process
float64 computation in plain torch, on 2 and 4 real rank processes."""

import pytest
import torch
import torch.nn.functional as F

HIDDEN, FFN, EXPERTS, TOP_K, SHARED = 8, 6, 8, 3, 1
BATCH, SEQ = 2, 5


def _moe_kwargs(seed):
    return dict(hidden_size=HIDDEN, ffn_hidden_size=FFN, num_experts=EXPERTS, top_k=TOP_K, score_func="sigmoid",
                num_shared_experts=SHARED, routed_scaling_factor=1.5, seed=seed, dtype=torch.float64)


def _rank_inputs(seed, rank):
    gen = torch.Generator().manual_seed(seed * 7 + rank)
    return torch.randn(BATCH, SEQ, HIDDEN, generator=gen, dtype=torch.float64), \
        torch.randn(BATCH, SEQ, HIDDEN, generator=gen, dtype=torch.float64)


def job_moe_step(rank, world_size, group, seed, parallel):
    import eplib

    moe = eplib.MoE(group=group, parallel=parallel, **_moe_kwargs(seed))
    assert list(moe.experts.local_expert_range) == list(range(rank * EXPERTS // world_size,
                                                              (rank + 1) * EXPERTS // world_size))
    x, upstream = _rank_inputs(seed, rank)
    x.requires_grad_()
    out = moe(x)
    (out * upstream).sum().backward()
    return {"out": out.detach(), "grad_x": x.grad, "parallel": moe.last_parallel,
            "grad_router": moe.router.weight.grad,
            "grad_experts": [w.grad for w in moe.experts.weights()],
            "grad_shared": [w.grad for w in (moe.shared_experts.w_gate, moe.shared_experts.w_up,
                                             moe.shared_experts.w_down)]}


def _dense_reference(seed, world_size):
    """Every rank's tokens through every expert, one process, plain torch, float64."""
    import eplib

    # Only the parameter values are taken from an unsharded layer; the computation is this test's.
    weights_source = eplib.MoE(**_moe_kwargs(seed))
    router_weight = weights_source.router.weight.detach().double().requires_grad_()
    experts = [w.detach().clone().requires_grad_() for w in weights_source.experts.weights()]
    shared = [w.detach().clone().requires_grad_() for w in (weights_source.shared_experts.w_gate,
                                                            weights_source.shared_experts.w_up,
                                                            weights_source.shared_experts.w_down)]
    results = []
    for rank in range(world_size):
        x, upstream = _rank_inputs(seed, rank)
        x = x.reshape(-1, HIDDEN).requires_grad_()
        scores = torch.sigmoid(x @ router_weight.T)
        chosen = scores.detach().topk(TOP_K, dim=-1).indices  # the bias is zero: choice by score
        gates = scores.gather(1, chosen)
        gates = 1.5 * gates / gates.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(TOP_K):
                e = int(chosen[t, k])
                h = x[t] @ experts[0][e], x[t] @ experts[1][e]
                out[t] = out[t] + gates[t, k] * ((F.silu(h[0]) * h[1]) @ experts[2][e])
        out = out + (F.silu(x @ shared[0]) * (x @ shared[1])) @ shared[2]
        (out * upstream.reshape(-1, HIDDEN)).sum().backward()
        results.append((out.detach().view(BATCH, SEQ, HIDDEN), x.grad.view(BATCH, SEQ, HIDDEN)))
    return results, router_weight.grad, [w.grad for w in experts], [w.grad for w in shared]


@pytest.mark.parametrize("parallel", ["ep", "tp", "auto"])
def test_modes_match_dense_reference(pool, parallel):
    world_size = pool.world_size
    seed = 11
    per_rank = pool.run(job_moe_step, seed, parallel)
    dense, grad_router, grad_experts, grad_shared = _dense_reference(seed, world_size)
    num_local = EXPERTS // world_size
    for rank, (result, (ref_out, ref_grad_x)) in enumerate(zip(per_rank, dense)):
        # The router runs in float32 (as DeepSeek-V3's gate), so gates carry ~1e-7 relative error.
        torch.testing.assert_close(result["out"], ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["grad_x"], ref_grad_x, atol=1e-5, rtol=1e-5)
        for got, ref in zip(result["grad_experts"], grad_experts):
            torch.testing.assert_close(got, ref[rank * num_local:(rank + 1) * num_local], atol=1e-5, rtol=1e-5)
        if parallel != "auto":
            assert result["parallel"] == parallel
    # Replicated parameters: each rank holds the gradient of its own tokens; their sum is the total.
    torch.testing.assert_close(sum(r["grad_router"] for r in per_rank).double(), grad_router, atol=1e-4, rtol=1e-4)
    for i, ref in enumerate(grad_shared):
        torch.testing.assert_close(sum(r["grad_shared"][i] for r in per_rank), ref, atol=1e-6, rtol=1e-6)


def test_ep_and_tp_agree_to_float64_rounding(pool):
    ep = pool.run(job_moe_step, 12, "ep")
    tp = pool.run(job_moe_step, 12, "tp")
    for a, b in zip(ep, tp):
        for key in ("out", "grad_x", "grad_router"):
            torch.testing.assert_close(a[key], b[key], atol=1e-12, rtol=1e-12)
        for got, ref in zip(a["grad_experts"] + a["grad_shared"], b["grad_experts"] + b["grad_shared"]):
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def job_auto_choice(rank, world_size, group, hidden, ffn, num_tokens):
    import eplib

    moe = eplib.MoE(hidden, ffn, 8, 2, group=group, parallel="auto")
    moe(torch.randn(num_tokens, hidden))
    return moe.last_parallel, moe.load_stats()["parallel"]


def test_auto_picks_the_mode_that_moves_fewer_bytes(pool2):
    # Many tokens, small experts: moving the weights is cheaper (tp). Few tokens, large experts: ep.
    assert pool2.run(job_auto_choice, 8, 2, 512) == [("tp", "tp")] * 2
    assert pool2.run(job_auto_choice, 32, 256, 4) == [("ep", "ep")] * 2


def test_bytes_formulas():
    from eplib.moe import ep_bytes, tp_bytes

    assert ep_bytes(rows_per_rank=100, hidden_size=16, element_bytes=2) == 2 * 100 * 16 * 2
    assert tp_bytes(num_experts=8, params_per_expert=3 * 16 * 32, element_bytes=2) == 8 * 3 * 16 * 32 * 2


def test_single_process_layer_and_shapes():
    import eplib

    moe = eplib.MoE(8, 16, 4, 2, seed=1)
    assert moe.group is None and list(moe.experts.local_expert_range) == [0, 1, 2, 3]
    assert tuple(moe.experts.w_gate.shape) == (4, 8, 16) and tuple(moe.experts.w_down.shape) == (4, 16, 8)
    x = torch.randn(3, 5, 8)
    out = moe(x)
    assert out.shape == x.shape
    torch.testing.assert_close(moe(x.reshape(15, 8)), out.reshape(15, 8))


@pytest.mark.parametrize("bad,error,match", [
    (lambda: torch.randn(4, 7), ValueError, "x: expected shape"),
    (lambda: torch.tensor(1.0), ValueError, "x: expected shape"),
    (lambda: torch.randn(4, 8, dtype=torch.float64), TypeError, "x: expected dtype"),
    (lambda: [1.0], TypeError, "x: expected a tensor"),
])
def test_moe_rejects_bad_input(bad, error, match):
    import eplib

    with pytest.raises(error, match=match):
        eplib.MoE(8, 16, 4, 2)(bad())


def test_moe_rejects_bad_arguments():
    import eplib

    with pytest.raises(ValueError, match="parallel"):
        eplib.MoE(8, 16, 4, 2, parallel="dp")
    with pytest.raises(TypeError, match="dtype"):
        eplib.MoE(8, 16, 4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="hidden_act"):
        eplib.MoE(8, 16, 4, 2, hidden_act="softplus")
    with pytest.raises(ValueError, match="group_score"):
        eplib.MoE(8, 16, 4, 2, n_group=2, group_score="sum")
    with pytest.raises(ValueError, match="num_worst_tokens"):
        eplib.MoE(8, 16, 4, 2, num_worst_tokens=-1)


def test_any_leading_shape():
    import eplib

    moe = eplib.MoE(8, 16, 4, 2, seed=1, aux_loss_alpha=0.01)
    x = torch.randn(2, 3, 5, 8)
    out = moe(x)
    aux_loss = moe.aux_loss
    assert out.shape == x.shape
    torch.testing.assert_close(moe(x.reshape(30, 8)), out.reshape(30, 8))
    torch.testing.assert_close(moe(x[0, 0, 0]), out[0, 0, 0])  # one token, [H]
    # [..., S, H]: 2 * 3 sequences of 5 tokens for the sequence-wise aux loss.
    torch.testing.assert_close(aux_loss, moe.router(x.reshape(30, 8), 6).aux_loss)
    assert not torch.allclose(aux_loss, moe.router(x.reshape(30, 8), 1).aux_loss)


def job_model_to_dtype(rank, world_size, group, parallel):
    """A model holding the layer, cast whole with .to(torch.bfloat16), .float() and .double():
    forward and backward run and the router keeps computing in float32. Cast to bfloat16 first, so
    that every later dtype holds the same (bf16-representable) weights and inputs, routes the same
    tokens to the same experts, and differs only by the experts' arithmetic."""
    import eplib

    torch.manual_seed(0)
    model = torch.nn.Sequential(eplib.MoE(16, 8, 8, 2, group=group, parallel=parallel, num_shared_experts=1, seed=4),
                                torch.nn.Linear(16, 16))
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    results = {}
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        model.to(dtype)
        inputs = x.to(dtype, copy=True).requires_grad_()
        out = model(inputs)
        out.float().square().sum().backward()
        assert model[0].dtype == dtype and model[0].router.weight.dtype == dtype
        results[str(dtype)] = (model[0].router(inputs.detach().reshape(-1, 16)).topk_idx, out.float().detach(),
                               inputs.grad.float(), model[0].experts.w_up.grad.float())
        model.zero_grad()
    return results


@pytest.mark.parametrize("parallel", ["ep", "tp"])
def test_whole_model_to_dtype(pool2, parallel):
    for results in pool2.run(job_model_to_dtype, parallel):
        reference = results["torch.float64"]
        for dtype, tolerance in (("torch.float32", 1e-5), ("torch.bfloat16", 5e-2)):
            chosen, *values = results[dtype]
            assert torch.equal(chosen, reference[0])
            for got, want in zip(values, reference[1:]):
                torch.testing.assert_close(got, want, atol=tolerance * want.abs().max(), rtol=tolerance)


def _dense_experts(x, topk_idx, topk_weights, weights, hidden_act):
    """Every (row, slot) through its expert, one at a time: the plain-torch reference."""
    from eplib.moe import gated_ffn

    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(topk_idx.shape[1]):
            e = int(topk_idx[n, k])
            if e >= 0:
                out[n] = out[n] + topk_weights[n, k] * gated_ffn(x[n:n + 1], *(w[e] for w in weights), hidden_act)[0]
    return out


@pytest.mark.parametrize("hidden_act", ["silu", "gelu", "gelu_pytorch_tanh", "relu", "sigmoid", "tanh"])
def test_run_experts_gradients_match_autograd(hidden_act):
    """The experts op's hand-written backward against autograd through a per-row loop, float64:
    masked slots, an expert without rows, a row with two slots on one expert."""
    from eplib.moe import run_experts

    generator = torch.Generator().manual_seed(7)
    num_rows, num_experts, hidden, ffn = 9, 4, 6, 5
    topk_idx = torch.randint(0, num_experts - 1, (num_rows, 3), generator=generator)  # expert 3 gets none
    topk_idx[::3, 1] = -1
    topk_idx[1] = torch.tensor([2, 2, 0])
    inputs = [torch.randn(num_rows, hidden, generator=generator, dtype=torch.float64),
              torch.rand(num_rows, 3, generator=generator, dtype=torch.float64),
              torch.randn(num_experts, hidden, ffn, generator=generator, dtype=torch.float64),
              torch.randn(num_experts, hidden, ffn, generator=generator, dtype=torch.float64),
              torch.randn(num_experts, ffn, hidden, generator=generator, dtype=torch.float64)]
    upstream = torch.randn(num_rows, hidden, generator=generator, dtype=torch.float64)
    results = []
    for fn in (run_experts, _dense_experts):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(leaves[0], topk_idx, leaves[1], tuple(leaves[2:]), hidden_act=hidden_act)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert results[0][3][3].abs().sum() == 0  # the expert without rows has a zero gradient


def job_bf16_modes(rank, world_size, group):
    import eplib

    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16)
    outputs = []
    for parallel in ("ep", "tp"):
        moe = eplib.MoE(32, 16, 8, 2, group=group, parallel=parallel, seed=3, dtype=torch.bfloat16)
        inputs = x.clone().requires_grad_()
        out = moe(inputs)
        out.float().square().sum().backward()
        outputs.append((out.float(), inputs.grad.float(), moe.experts.w_down.grad.float()))
    return outputs


def test_bf16_layer_runs_in_both_modes(pool2):
    for (ep_out, ep_grad, ep_wgrad), (tp_out, tp_grad, tp_wgrad) in pool2.run(job_bf16_modes):
        assert ep_out.abs().sum() > 0 and ep_wgrad.abs().sum() > 0
        torch.testing.assert_close(ep_out, tp_out, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(ep_grad, tp_grad, atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(ep_wgrad, tp_wgrad, atol=5e-2, rtol=5e-2)
