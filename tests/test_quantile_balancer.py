"""eplib.moe.Balancer(method="quantile"): the selection thresholds against the router's own choice,
the bias against a float64 sort of every rank's margins (1, 2 and 4 processes), group-limited
routing, several layers, causality, state_dict, the noise floor against Monte Carlo, and balancing
a skewed router to the floor within a few steps."""

import math

import pytest
import torch
import torch.nn as nn

HIDDEN = 16
# (num_experts, top_k, n_group, topk_group): plain, group-limited, one expert per group, and every
# kept expert picked (K = topk_group * group size: some thresholds are -inf).
THRESHOLD_CONFIGS = [(16, 2, 1, 1), (16, 4, 4, 2), (16, 3, 8, 3), (16, 3, 16, 5), (16, 8, 2, 1), (16, 3, 4, 4)]
# The two layers of the multi-layer model: plain and group-limited routing.
LAYERS = [dict(num_experts=8, top_k=2, seed=1), dict(num_experts=16, top_k=4, n_group=4, topk_group=2, seed=2)]


def _router(num_experts, top_k, n_group, topk_group, group_score="top2_sum"):
    from eplib.moe import Router

    return Router(HIDDEN, num_experts, top_k, score_func="sigmoid", n_group=n_group, topk_group=topk_group,
                  group_score=group_score)


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
@pytest.mark.parametrize("num_experts,top_k,n_group,topk_group", THRESHOLD_CONFIGS)
def test_thresholds_are_where_the_routers_choice_flips(num_experts, top_k, n_group, topk_group, group_score):
    """Token t picks e exactly when choice[t, e] >= θ[t, e]: moving choice[t, e] just above θ makes
    the router's own selection pick e, just below does not (the rest of the row unchanged); groups
    ranked by their two best scores (DeepSeek-V3) or by their best one (DeepSeek-V2)."""
    router = _router(num_experts, top_k, n_group, topk_group, group_score)
    generator = torch.Generator().manual_seed(0)
    choice = torch.rand(256, num_experts, generator=generator) + 0.2 * torch.randn(num_experts, generator=generator)
    theta = router.selection_thresholds(choice)
    always = ~torch.isfinite(theta)
    assert not (theta == float("inf")).any()
    if (top_k, n_group) == (8, 2):
        assert always.any()  # the case is exercised
    for expert in range(num_experts):
        for offset, expected in ((1e-4, True), (-1e-4, False)):
            moved = choice.clone()
            # -inf: picked whatever it scores, so a low score must still be picked.
            moved[:, expert] = torch.where(always[:, expert], torch.full_like(theta[:, expert], -5.0),
                                           theta[:, expert] + offset)
            picked = (router.select_experts(moved) == expert).any(-1)
            assert torch.equal(picked, always[:, expert] | expected), (expert, offset)


def _model(group=None):
    import eplib

    model = nn.ModuleList(eplib.MoE(HIDDEN, 4, group=group, score_func="sigmoid", **layer) for layer in LAYERS)
    with torch.no_grad():
        for layer in model:
            layer.router.weight[:2, 0] += 2.0  # feature 0 of every token is 1: experts 0 and 1 win
            layer.router.expert_bias.copy_(0.1 * torch.randn(layer.num_experts,
                                                             generator=torch.Generator().manual_seed(3)))
    return model


def _tokens(rank, micro_batch, num_tokens):
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(100 * rank + micro_batch))
    x[:, 0] = 1.0
    return x


def _micro_batches(rank):
    """Sizes differ between ranks and micro-batches: (micro-batch index, tokens)."""
    return [(0, 24 + 8 * rank), (1, 16 + 4 * rank)]


def _route_and_capture(model, rank):
    """Route this rank's micro-batches through every layer's router; the margins they recorded."""
    for micro_batch, num_tokens in _micro_batches(rank):
        x = _tokens(rank, micro_batch, num_tokens)
        for layer in model:
            layer.router(x)
    return [torch.cat(layer.router.pending_margins).clone() for layer in model]


def _reference_quantile(margins, top_k):
    """The n-th largest margin per expert, n = round(N·K/E), by a float64 sort."""
    num_tokens, num_experts = margins.shape
    n = max(1, math.floor(num_tokens * top_k / num_experts + 0.5))
    return margins.double().sort(0, descending=True).values[n - 1]


def _reference_bias(old_bias, quantile, damping):
    old = old_bias.double()
    return old + damping * (torch.where(torch.isfinite(quantile), -quantile, old) - old)


def job_quantile_step(rank, world_size, group, damping):
    from eplib.collectives import all_reduce
    from eplib.moe import Balancer
    from eplib.moe.balancer import group_margin_quantiles

    model = _model(group)
    balancer = Balancer(model, method="quantile", damping=damping)
    old_biases = [layer.router.expert_bias.clone() for layer in model]
    margins = _route_and_capture(model, rank)
    routers = [layer.router for layer in model]
    counts = torch.cat([router.pending_counts for router in routers])
    _, quantiles = group_margin_quantiles(routers, counts.clone(), lambda t, phase: all_reduce(t, group, phase))
    balancer.step()
    return margins, old_biases, quantiles, [layer.router.expert_bias.clone() for layer in model]


def _single_process_biases(world_size, damping):
    """One process routes every rank's micro-batches (in rank order), then steps once."""
    from eplib.moe import Balancer

    model = _model()
    balancer = Balancer(model, method="quantile", damping=damping)
    for rank in range(world_size):
        _route_and_capture(model, rank)
    balancer.step()
    return [layer.router.expert_bias.clone() for layer in model]


def _check_against_references(per_rank, world_size, damping):
    for index, layer in enumerate(LAYERS):
        margins = torch.cat([result[0][index] for result in per_rank])
        assert margins.shape[0] == sum(n for r in range(world_size) for _, n in _micro_batches(r))
        quantile = _reference_quantile(margins, layer["top_k"])
        for _, old_biases, quantiles, biases in per_rank:
            assert torch.equal(quantiles[index].double(), quantile)  # exact: one of the margins
            expected = _reference_bias(old_biases[index], quantile, damping)
            torch.testing.assert_close(biases[index].double(), expected, rtol=1e-6, atol=1e-6)
        assert not torch.equal(per_rank[0][3][index], per_rank[0][1][index])  # the bias moved


def test_quantile_step_single_process_matches_float64_sort():
    from eplib.moe.balancer import group_margin_quantiles

    model = _model()
    from eplib.moe import Balancer

    balancer = Balancer(model, method="quantile", damping=0.5)
    old_biases = [layer.router.expert_bias.clone() for layer in model]
    margins = _route_and_capture(model, 0)
    routers = [layer.router for layer in model]
    counts = torch.cat([router.pending_counts for router in routers])
    _, quantiles = group_margin_quantiles(routers, counts.clone(), lambda t, phase: None)
    balancer.step()
    result = (margins, old_biases, quantiles, [layer.router.expert_bias.clone() for layer in model])
    _check_against_references([result], 1, 0.5)
    for router in routers:
        assert router.pending_margins == [] and router.pending_counts.sum() == 0


@pytest.mark.parametrize("damping", [0.5, 1.0])
def test_quantile_step_across_ranks_equals_one_process_on_all_tokens(pool, damping):
    per_rank = pool.run(job_quantile_step, damping)
    _check_against_references(per_rank, pool.world_size, damping)
    single = _single_process_biases(pool.world_size, damping)
    for _, _, _, biases in per_rank:
        for got, expected in zip(biases, single):
            assert torch.equal(got, expected)


def test_balancing_bias_gives_an_expert_exactly_its_share():
    """-q[e] is the bias that, the other biases unchanged, would have given expert e exactly
    n = round(N·K/E) of the batch's tokens: route the same batch again with it. (q[e] is the n-th
    largest margin, so that token sits on the threshold; the check moves the bias up by half the
    gap to the next margin, where float rounding cannot flip it.)"""
    from eplib.moe.balancer import group_margin_quantiles

    for layer, spec in zip(_model(), LAYERS):
        router = layer.router
        router.record_margins = True
        x = _tokens(0, 0, 200)
        router(x)
        share = math.floor(200 * spec["top_k"] / spec["num_experts"] + 0.5)
        _, (quantile,) = group_margin_quantiles([router], router.pending_counts.clone(), lambda t, phase: None)
        ranked = router.pending_margins[0].sort(0, descending=True).values
        assert torch.equal(quantile, ranked[share - 1])
        scores = router.scores(x)
        for expert in range(spec["num_experts"]):
            bias = router.expert_bias.clone()
            bias[expert] = -quantile[expert] + (ranked[share - 1, expert] - ranked[share, expert]) / 2
            chosen = router.select_experts(scores + bias)
            assert int((chosen == expert).sum()) == share, expert


def test_bias_routing_a_batch_comes_from_earlier_batches_only():
    """Each batch is routed with the bias the previous step left, and a later batch's scores
    never change the bias an earlier batch saw."""
    import eplib
    from eplib.moe import Balancer

    def run(last_batch_seed):
        moe = eplib.MoE(HIDDEN, 4, 8, 2, score_func="sigmoid", seed=1)
        with torch.no_grad():
            moe.router.weight[:2, 0] += 2.0
        balancer = Balancer(moe, method="quantile")
        seen = []
        for step, seed in enumerate([10, 11, 12, last_batch_seed]):
            x = _tokens(seed, 0, 128)
            bias = moe.router.expert_bias.clone()
            routed = moe.router(x)
            assert torch.equal(routed.topk_idx, moe.router.select_experts(moe.router.scores(x) + bias)), step
            balancer.step()
            seen.append(bias)
        return seen, moe.router.expert_bias.clone()

    seen_a, final_a = run(13)
    seen_b, final_b = run(14)
    assert all(torch.equal(a, b) for a, b in zip(seen_a, seen_b))
    assert not torch.equal(seen_a[1], seen_a[0]) and not torch.equal(final_a, final_b)


def test_quantile_state_is_the_bias_in_the_state_dict():
    """Save mid-run, load into a fresh model and Balancer: both continue identically."""
    import io

    import eplib
    from eplib.moe import Balancer

    def fresh():
        moe = eplib.MoE(HIDDEN, 4, 8, 2, score_func="sigmoid", n_group=4, topk_group=2, seed=1)
        with torch.no_grad():
            moe.router.weight[:2, 0] += 2.0
        return moe, Balancer(moe, method="quantile", damping=0.3)

    moe, balancer = fresh()
    for step in range(4):
        moe.router(_tokens(step, 0, 96))
        balancer.step()
    stream = io.BytesIO()
    torch.save(moe.state_dict(), stream)
    stream.seek(0)
    restored, restored_balancer = fresh()
    restored.load_state_dict(torch.load(stream))
    for step in range(4, 7):
        x = _tokens(step, 0, 96)
        assert torch.equal(moe.router(x).topk_idx, restored.router(x).topk_idx)
        balancer.step()
        restored_balancer.step()
    assert torch.equal(moe.router.expert_bias, restored.router.expert_bias)


def job_train_two_layers(rank, world_size, group, parallel):
    """A few training steps through whole MoE layers (dispatch and combine in ep mode, the weight
    exchange in tp mode): one margin tensor per layer and forward, and a step that moves the bias."""
    import eplib
    from eplib.moe import Balancer

    model = nn.Sequential(*(eplib.MoE(HIDDEN, 4, 8, 2, group=group, parallel=parallel, score_func="sigmoid",
                                      seed=layer) for layer in range(2)))
    balancer = Balancer(model, method="quantile")
    recorded = []
    for step in range(3):
        x = _tokens(rank, step, 24).requires_grad_()
        model(x).square().sum().backward()
        recorded.append([len(layer.router.pending_margins) for layer in model])
        before = [layer.router.expert_bias.clone() for layer in model]
        balancer.step()
        assert all(not torch.equal(b, layer.router.expert_bias) for b, layer in zip(before, model))
    return recorded, [float(layer.load_stats()["max_vio_floor"]) for layer in model]


@pytest.mark.parametrize("parallel", ["ep", "tp"])
def test_quantile_balances_whole_layers_in_training(pool2, parallel):
    from eplib.moe import max_violation_floor

    expected_floor = float(max_violation_floor(torch.tensor(48), 2, 8))  # 24 tokens on each of 2 ranks
    for recorded, floors in pool2.run(job_train_two_layers, parallel):
        assert recorded == [[1, 1]] * 3
        assert floors == [expected_floor] * 2


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(512, 8, 64), (2048, 2, 8)])
def test_max_vio_floor_matches_monte_carlo(num_tokens, top_k, num_experts):
    """The closed form against 300 draws of the ideal router (K distinct uniform experts per token);
    the Monte-Carlo mean's standard error is about 1.5% here, the tolerance 6%."""
    from eplib.moe import max_violation, max_violation_floor

    generator = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(300):
        chosen = torch.rand(num_tokens, num_experts, generator=generator).topk(top_k, dim=-1).indices
        draws.append(float(max_violation(torch.bincount(chosen.flatten(), minlength=num_experts))))
    closed_form = float(max_violation_floor(torch.tensor(num_tokens), top_k, num_experts))
    assert closed_form == pytest.approx(sum(draws) / len(draws), rel=0.06)
    assert float(max_violation_floor(torch.tensor(0), top_k, num_experts)) == 0.0


def _balance(method, steps, num_tokens, **kwargs):
    """8 experts, top-2, sigmoid router skewed towards 2 experts (DESIGN.md's setting)."""
    import eplib
    from eplib.moe import Balancer

    moe = eplib.MoE(HIDDEN, 4, 8, 2, score_func="sigmoid", seed=0)
    with torch.no_grad():
        moe.router.weight[:2, 0] += 3.0
    balancer = Balancer(moe, method=method, **kwargs)
    generator = torch.Generator().manual_seed(1)
    batch, floor = [], 0.0
    for step in range(steps):
        if step == steps // 2:
            moe.reset_load_stats()
        x = torch.randn(num_tokens, HIDDEN, generator=generator)
        x[:, 0] = 1.0
        moe.router(x)
        balancer.step()
        stats = moe.load_stats()
        batch.append(float(stats["max_vio_batch"]))
        floor = float(stats["max_vio_floor"])
    return batch, float(moe.load_stats()["max_vio_accumulated"]), floor


def test_quantile_balances_a_skewed_router_to_the_noise_floor_in_a_few_steps():
    """From batch MaxVio ~3: below 0.3 within 6 steps (the sign rule at 1e-3 needs ~100 here), then
    near the floor. With damping 0.5 the steady batch MaxVio is expected at ~1.15x the floor (the
    bias carries a third of one batch's sampling noise); over 30 steps its mean wanders by ~8%."""
    batch, accumulated, floor = _balance("quantile", 60, 2048, damping=0.5)
    assert batch[0] > 2.5
    assert min(step for step, value in enumerate(batch, 1) if value < 0.3) <= 6
    steady = sum(batch[30:]) / 30
    assert 0.8 * floor < steady < 1.4 * floor, (steady, floor)
    assert accumulated < 0.015, accumulated  # 30 steps; a single batch at the floor is ~0.058
    sign_batch, _, _ = _balance("sign", 20, 2048, bias_update_rate=1e-3)
    assert min(sign_batch) > 1.0  # side by side: the sign rule is still far from balanced


def test_quantile_rejects_bad_damping():
    from eplib.moe import Balancer

    moe = _model()
    for damping in (0.0, 1.5, -0.1, "0.5"):
        with pytest.raises(ValueError, match="damping"):
            Balancer(moe, method="quantile", damping=damping)
    with pytest.raises(ValueError, match="method"):
        Balancer(moe, method="median")
