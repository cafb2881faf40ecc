"""DDP and FSDP2 around eplib.MoE (eplib.moe.ddp, eplib.moe.fully_shard_dense), as the example trains:
three AdamW steps of the example's model on 2 gloo ranks give the same losses, parameters and
routing biases as the hand-written reference (each rank's loss divided by the group size, the
replicated gradients summed over the ranks in one all-reduce). On 4 ranks, MoE layers over groups of
2 with an expert-data-parallel group against the same reference with the expert gradients summed
over the ranks that hold the same experts."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
EXAMPLE_ARGS = ["--layers", "2", "--hidden", "32", "--heads", "2", "--ffn-hidden", "16", "--experts", "4",
                "--seq-len", "16", "--batch", "2"]


def load_example():
    spec = importlib.util.spec_from_file_location("moe_layer_example", ROOT / "examples" / "moe_layer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def sum_replicated_grads(model: nn.Module) -> None:
    """The reference: sum the gradients of every parameter all ranks hold (all but the routed
    experts, whose gradients are already the sum over the ranks' tokens) in one all-reduce."""
    from eplib.moe import expert_parameters

    experts = {id(p) for p in expert_parameters(model)}
    grads = [p.grad for p in model.parameters() if id(p) not in experts and p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))


def job_train(rank, world_size, group, mode, parallel):
    """STEPS steps of the example's training; mode "reference" (by hand), "ddp" or "fsdp"."""
    import torch.nn.functional as F

    from eplib.moe import Balancer

    example = load_example()
    args = example.parse_args(EXAMPLE_ARGS + ["--parallel", parallel])
    torch.manual_seed(args.seed)
    model = example.TinyMoELM(args, torch.device("cpu"))
    module = model if mode == "reference" else example.data_parallel(model, mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    balancer = Balancer(model, bias_update_rate=args.bias_update_rate)
    windows = example.batches(args, torch.device("cpu"))
    losses = []
    for _ in range(STEPS):
        window = next(windows)
        if mode == "reference":
            logits = model(window[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, example.VOCAB), window[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            (loss / world_size).backward()
            sum_replicated_grads(model)
            optimizer.step()
            balancer.step()
        else:
            loss = example.train_step(module, optimizer, balancer, window)
        losses.append(loss.detach())
    # FSDP2 keeps each replicated parameter as a sharded DTensor: compare the whole.
    params = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for name, p in model.named_parameters()}
    biases = [block.moe.router.expert_bias.clone() for block in model.blocks]
    return torch.stack(losses), params, biases


@pytest.mark.parametrize("mode,parallel", [("ddp", "ep"), ("fsdp", "ep"), ("ddp", "tp")])
def test_data_parallel_training_equals_the_hand_summed_reference(pool2, mode, parallel):
    reference = pool2.run(job_train, "reference", parallel)
    wrapped = pool2.run(job_train, mode, parallel)
    for (ref_losses, ref_params, ref_biases), (losses, params, biases) in zip(reference, wrapped):
        torch.testing.assert_close(losses, ref_losses, atol=0, rtol=0)
        assert params.keys() == ref_params.keys()
        for name, value in params.items():
            torch.testing.assert_close(value, ref_params[name], atol=0, rtol=0, msg=name)
        for bias, ref_bias in zip(biases, ref_biases):
            assert torch.equal(bias, ref_bias)
    assert not torch.equal(reference[0][0], reference[1][0])  # the ranks trained on different batches
    assert any(not torch.equal(a, b) for a, b in zip(reference[0][1].values(), reference[1][1].values()))


def job_ignored_state(rank, world_size, group):
    import eplib

    model = nn.Sequential(nn.Linear(8, 8), eplib.MoE(8, 4, 4, 2, group=group))
    return eplib.moe.local_state_names(model)


def test_local_state_names(pool2):
    expected = ["1.experts.w_gate", "1.experts.w_up", "1.experts.w_down", "1.router.expert_bias",
                "1.router.pending_counts", "1.router.step_counts", "1.router.accumulated_counts"]
    assert pool2.run(job_ignored_state) == [expected, expected]


def test_wrappers_reject_a_model_without_moe_layers():
    import eplib

    with pytest.raises(ValueError, match="no eplib.MoE"):
        eplib.moe.local_state_names(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="module"):
        eplib.moe.expert_parameters(None)


def _expert_parallel_groups(rank, world_size, ep_size):
    """(this rank's expert-parallel group: ranks [i·ep_size, (i+1)·ep_size), its expert-data-parallel
    group: the ranks with the same place in theirs). Every rank creates every group, in one order."""
    import torch.distributed as dist

    ep_groups = [dist.new_group(list(range(start, start + ep_size))) for start in range(0, world_size, ep_size)]
    edp_groups = [dist.new_group(list(range(place, world_size, ep_size))) for place in range(ep_size)]
    return ep_groups[rank // ep_size], edp_groups[rank % ep_size]


def job_train_expert_data_parallel(rank, world_size, group, mode, parallel):
    """STEPS SGD steps of a model whose MoE layer spans 2 of the 4 ranks, each expert held twice:
    by hand (each loss divided by the world size, the replicated gradients summed over all ranks,
    the expert gradients over their expert-data-parallel group) or with eplib.moe.ddp."""
    import torch.nn.functional as F

    import eplib
    from eplib.moe import Balancer, expert_parameters

    ep_group, edp_group = _expert_parallel_groups(rank, world_size, 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), eplib.MoE(16, 8, 4, 2, group=ep_group, parallel=parallel, seed=1),
                          nn.Linear(16, 16))
    module = model if mode == "reference" else eplib.moe.ddp(model, expert_data_parallel_group=edp_group)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # plain SGD: a wrong gradient scale shows
    balancer = Balancer(model, bias_update_rate=1e-2, group=group)  # the bias is the same on every rank
    experts = expert_parameters(model)
    generator = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(STEPS):
        x, target = torch.randn(2, 6, 16, generator=generator), torch.randn(2, 6, 16, generator=generator)
        loss = F.mse_loss(module(x), target)
        optimizer.zero_grad(set_to_none=True)
        if mode == "reference":
            (loss / world_size).backward()
            for param in model.parameters():
                dist.all_reduce(param.grad, group=edp_group if any(param is e for e in experts) else None)
        else:
            loss.backward()
        optimizer.step()
        balancer.step()
        losses.append(loss.detach())
    return torch.stack(losses), {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("parallel", ["ep", "tp"])
def test_expert_data_parallel_group_equals_the_hand_summed_reference(pool4, parallel):
    reference = pool4.run(job_train_expert_data_parallel, "reference", parallel)
    wrapped = pool4.run(job_train_expert_data_parallel, "ddp", parallel)
    for (ref_losses, ref_params), (losses, params) in zip(reference, wrapped):
        torch.testing.assert_close(losses, ref_losses, atol=0, rtol=0)
        for name, value in params.items():  # 4 ranks: sums in other orders than the reference's
            torch.testing.assert_close(value, ref_params[name], atol=1e-6, rtol=1e-5, msg=name)
    # Ranks 0 and 2 hold the same experts, trained on different tokens, and end equal.
    assert torch.equal(wrapped[0][1]["1.experts.w_up"], wrapped[2][1]["1.experts.w_up"])
    assert not torch.equal(wrapped[0][1]["1.experts.w_up"], wrapped[1][1]["1.experts.w_up"])


def job_mismatched_groups(rank, world_size, group):
    import eplib

    ep_group, _ = _expert_parallel_groups(rank, world_size, 2)
    model = nn.Sequential(eplib.MoE(8, 4, 4, 2, group=ep_group))
    try:
        eplib.moe.ddp(model)
    except ValueError as error:
        return str(error)


def test_a_layer_group_smaller_than_the_data_parallel_group_needs_the_expert_group(pool4):
    for message in pool4.run(job_mismatched_groups):
        assert message.startswith("expert_data_parallel_group: the data-parallel group has 4 ranks")
