"""eplib.moe.Balancer: the sign rule on the group's counts, no host synchronisation (both
methods), state_dict, and balancing a skewed router (batch MaxVio below 0.2 with the bias, above 1
without). The quantile controller's own tests are in test_quantile_balancer.py."""

import io

import pytest
import torch

HIDDEN, EXPERTS, TOP_K = 16, 8, 2
# What reads a device tensor on the host (a CUDA stream sync): the explicit reads, and the Python
# conversions and data-dependent shapes that read implicitly.
FORBIDDEN = ("item", "cpu", "tolist", "__bool__", "__int__", "__float__", "nonzero")


def _skewed_moe(seed=0, **kwargs):
    import eplib

    moe = eplib.MoE(HIDDEN, 4, EXPERTS, TOP_K, score_func="sigmoid", seed=seed, **kwargs)
    with torch.no_grad():
        moe.router.weight[:2, 0] += 3.0  # feature 0 of every token is 1: experts 0 and 1 win
    return moe


def _tokens(generator, num_tokens):
    x = torch.randn(num_tokens, HIDDEN, generator=generator)
    x[:, 0] = 1.0
    return x


def _run_balancing(rate, steps, num_tokens=4096):
    from eplib.moe import Balancer

    moe = _skewed_moe()
    balancer = Balancer(moe, bias_update_rate=rate)
    generator = torch.Generator().manual_seed(1)
    batch_max_vio = []
    for step in range(steps):
        if step == steps - 100:
            moe.reset_load_stats()
        moe.router(_tokens(generator, num_tokens))
        balancer.step()
        batch_max_vio.append(float(moe.load_stats()["max_vio_batch"]))
    return batch_max_vio, float(moe.load_stats()["max_vio_accumulated"])


def test_bias_balances_a_skewed_router_and_rate_zero_does_not():
    # 8 experts, top-2, sigmoid router skewed towards 2 experts, 4096 tokens a batch. In this setup
    # the sign rule at 1e-3 reaches ~0.05 after ~220 steps (0.02..0.10 over the last 50).
    balanced, balanced_accumulated = _run_balancing(1e-3, 300)
    frozen, frozen_accumulated = _run_balancing(0.0, 300)
    assert balanced[0] > 2.0, "the router is not skewed to begin with"
    assert max(balanced[-50:]) < 0.2, balanced[-50:]
    assert balanced_accumulated < 0.05
    assert min(frozen) > 1.0 and frozen_accumulated > 1.0


def job_step_uses_group_counts(rank, world_size, group, rate):
    import torch.distributed as dist

    from eplib.moe import Balancer

    moe = _skewed_moe(group=group)
    balancer = Balancer(moe, bias_update_rate=rate)
    assert balancer.group is group
    generator = torch.Generator().manual_seed(10 + rank)
    topk_idx = moe.router(_tokens(generator, 64 * (rank + 1))).topk_idx
    local = torch.bincount(topk_idx.flatten(), minlength=EXPERTS)
    with torch.no_grad():
        moe.router(_tokens(generator, 5))  # evaluation does not count
    gathered = [torch.zeros_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    balancer.step()
    stats = moe.load_stats()
    return (sum(gathered), moe.router.expert_bias.clone(), moe.router.pending_counts.clone(),
            stats["tokens_per_expert"], float(stats["max_vio_batch"]))


@pytest.mark.parametrize("rate", [1e-3, 0.0])
def test_step_applies_sign_rule_to_group_counts(pool, rate):
    for total, bias, pending, tokens_per_expert, max_vio in pool.run(job_step_uses_group_counts, rate):
        load = total.double()
        expected_bias = (rate * torch.sign(load.mean() - load)).float()
        torch.testing.assert_close(bias, expected_bias, atol=0, rtol=0)
        assert pending.sum() == 0
        assert torch.equal(tokens_per_expert, total)
        assert max_vio == pytest.approx(float(load.max() / load.mean() - 1), rel=1e-6)


def job_no_host_sync(rank, world_size, group, method, routing):
    from eplib.moe import Balancer

    moe = _skewed_moe(group=group, **routing)
    balancer = Balancer(moe, bias_update_rate=1e-3, method=method)
    x = _tokens(torch.Generator().manual_seed(rank), 32).requires_grad_()

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}() on the balancing path")
        return fail

    saved = {name: getattr(torch.Tensor, name) for name in FORBIDDEN}
    intercepted = {}
    try:
        for name in saved:
            setattr(torch.Tensor, name, forbidden(name))
        # The patches really intercept: each forbidden method raises here, in the rank process.
        for name in saved:
            try:
                getattr(torch.zeros(1), name)()
                intercepted[name] = "missed"
            except AssertionError as error:
                intercepted[name] = str(error)
        bias_before = moe.router.expert_bias.clone()
        for _ in range(2):  # two micro-batches (forward: counts and margins on the device)
            routed = moe.router(x)
            (routed.topk_weights * torch.arange(TOP_K)).sum().backward()
        balancer.step()
        stats = moe.load_stats()
        moe.reset_load_stats()
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
    return (x.grad is not None and moe.router.weight.grad is not None, sorted(stats), intercepted,
            not torch.equal(bias_before, moe.router.expert_bias))


@pytest.mark.parametrize("method,routing", [("sign", {}), ("quantile", {}),
                                            ("quantile", dict(n_group=4, topk_group=2))],
                         ids=["sign", "quantile", "quantile-grouped"])
def test_balancing_path_never_reads_the_device(pool2, method, routing):
    for grads_flowed, keys, intercepted, bias_moved in pool2.run(job_no_host_sync, method, routing):
        assert intercepted == {name: f"host synchronisation: Tensor.{name}() on the balancing path"
                               for name in FORBIDDEN}
        assert grads_flowed and bias_moved
        assert keys == ["max_vio_accumulated", "max_vio_batch", "max_vio_floor", "parallel", "tokens_per_expert"]


def test_bias_is_fp32_in_state_dict_and_survives_reload():
    from eplib.moe import Balancer

    moe = _skewed_moe()
    balancer = Balancer(moe, bias_update_rate=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        moe.router(_tokens(generator, 256))
        balancer.step()
    state = moe.state_dict()
    assert state["router.expert_bias"].dtype == torch.float32
    assert state["router.expert_bias"].abs().sum() > 0
    assert "router.pending_counts" not in state
    stream = io.BytesIO()
    torch.save(state, stream)
    stream.seek(0)
    fresh = _skewed_moe()
    fresh.load_state_dict(torch.load(stream))
    assert torch.equal(fresh.router.expert_bias, moe.router.expert_bias)
    x = _tokens(generator, 64)
    assert torch.equal(fresh.router(x).topk_idx, moe.router(x).topk_idx)


def test_balancer_rejects_bad_arguments():
    from eplib.moe import Balancer

    with pytest.raises(ValueError, match="bias_update_rate"):
        Balancer(_skewed_moe(), bias_update_rate=-1.0)
    with pytest.raises(ValueError, match="no eplib.MoE"):
        Balancer(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="module"):
        Balancer("model")
