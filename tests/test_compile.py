"""torch.compile of a model holding eplib.MoE: no graph break inside the layer, and compiled
training (loss, every gradient, the balancing bias) equal to eager training, on 2 gloo ranks in ep
and tp modes. The custom ops' fake implementations give the received rows an unbacked size, or a
static one with num_worst_tokens."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, FFN, EXPERTS, TOP_K, BATCH, SEQ = 32, 16, 8, 8, 2, 2, 6


class TinyModel(nn.Module):
    """Embedding, one eplib.MoE block with a residual, a linear head."""

    def __init__(self, group, parallel, num_worst_tokens=0):
        import eplib

        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)
        with torch.no_grad():
            for param in (self.embed.weight, self.head.weight, self.head.bias):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        self.moe = eplib.MoE(HIDDEN, FFN, EXPERTS, TOP_K, group=group, parallel=parallel, score_func="sigmoid",
                             n_group=2, topk_group=1, num_shared_experts=1, seed=3, num_worst_tokens=num_worst_tokens)

    def forward(self, ids):
        x = self.embed(ids)
        return self.head(x + self.moe(x))


def _batch(rank, step):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=generator)


def _train(model, forward, steps):
    """(losses, gradients after each step, final expert biases) of ``steps`` SGD steps with a Balancer."""
    from eplib.moe import Balancer

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    balancer = Balancer(model, bias_update_rate=1e-2)
    rank = torch.distributed.get_rank()
    losses, grads = [], []
    for step in range(steps):
        ids = _batch(rank, step)
        loss = F.cross_entropy(forward(ids[:, :-1]).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
        balancer.step()
    return losses, grads, model.moe.router.expert_bias.clone()


def job_compiled_matches_eager(rank, world_size, group, parallel, backend, num_worst_tokens):
    eager = TinyModel(group, parallel, num_worst_tokens)
    compiled = TinyModel(group, parallel, num_worst_tokens)
    return (_train(eager, eager, 2),
            _train(compiled, torch.compile(compiled, fullgraph=True, backend=backend), 2))


def _assert_same_training(results):
    for (eager_losses, eager_grads, eager_bias), (losses, grads, bias) in results:
        # The router computes in float32, where compiled kernels may round differently.
        torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), atol=1e-5, rtol=1e-5)
        for step_grads, eager_step_grads in zip(grads, eager_grads):
            assert step_grads.keys() == eager_step_grads.keys()
            for name, grad in step_grads.items():
                torch.testing.assert_close(grad, eager_step_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        assert torch.equal(bias, eager_bias)  # the same experts chosen, counted and balanced
        assert eager_bias.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ep", "tp"])
def test_compiled_training_matches_eager(pool2, parallel):
    """torch.compile(model, fullgraph=True) with the default backend (inductor)."""
    _assert_same_training(pool2.run(job_compiled_matches_eager, parallel, "inductor", 0, timeout=600))


def test_compiled_training_with_num_worst_tokens(pool2):
    """The padded dispatch (static row count), through dynamo and AOTAutograd (aot_eager backend)."""
    _assert_same_training(pool2.run(job_compiled_matches_eager, "ep", "aot_eager", BATCH * SEQ * 2, timeout=300))


def job_graph_breaks(rank, world_size, group, parallel, num_worst_tokens):
    """Dynamo's graph breaks in the model's forward, and the row counts the dispatch op's outputs
    have in the captured graph (an int, or a symbol)."""
    import torch._dynamo

    model = TinyModel(group, parallel, num_worst_tokens)
    ids = _batch(rank, 0)[:, :-1]
    # Data-dependent output sizes need this flag when the graph may break elsewhere; fullgraph=True
    # sets it, explain() does not.
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        explanation = torch._dynamo.explain(model)(ids)
    dispatch_rows = [str(node.meta["example_value"][0].shape[0]) for graph in explanation.graphs
                     for node in graph.graph.nodes
                     if node.target in (torch.ops.eplib.dispatch, torch.ops.eplib.dispatch.default)]
    return explanation.graph_break_count, explanation.graph_count, dispatch_rows


@pytest.mark.parametrize("parallel,num_worst_tokens", [("ep", 0), ("tp", 0), ("ep", 40)])
def test_no_graph_break_inside_the_moe_layer(pool2, parallel, num_worst_tokens):
    for breaks, graphs, dispatch_rows in pool2.run(job_graph_breaks, parallel, num_worst_tokens):
        assert (breaks, graphs) == (0, 1)
        if parallel == "tp":
            assert dispatch_rows == []
        elif num_worst_tokens:
            assert dispatch_rows == [str(num_worst_tokens)]  # static
        else:
            assert len(dispatch_rows) == 1 and dispatch_rows[0].startswith("u")  # an unbacked symbol


def test_single_process_layer_compiles():
    import eplib

    moe = eplib.MoE(HIDDEN, FFN, EXPERTS, TOP_K, seed=2, dtype=torch.float64)
    x = torch.randn(3, SEQ, HIDDEN, dtype=torch.float64)
    outputs = []
    for run in (moe, torch.compile(moe, fullgraph=True, backend="aot_eager")):
        inputs = x.clone().requires_grad_()
        out = run(inputs)
        out.square().sum().backward()
        outputs.append((out.detach(), inputs.grad, moe.experts.w_down.grad.clone()))
        moe.zero_grad()
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
