"""eplib.MoE.from_hf / to_hf_state_dict against transformers' own MoE blocks (DeepSeek-V3, DeepSeek-V2,
Qwen3-MoE, Mixtral) in float64, on 1, 2 and 4 ranks, in ep and tp modes: the chosen experts, the
outputs and the gradients of input, router, experts and shared experts. Tiny random configs, built
here; nothing is downloaded. Skipped without transformers (the `test` extra installs it).

transformers runs in the test process only: the rank processes get the config as the plain mapping
of its config.json and the block's state dict, as a checkpoint loader would."""

import pytest
import torch

pytest.importorskip("transformers", minversion="5")

HIDDEN, FFN, EXPERTS, BATCH, SEQ = 16, 8, 8, 2, 5
FAMILIES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral")
# DeepSeek's gate computes its logits in float32, as eplib's router does: the float64 results
# agree to rounding. Qwen3-MoE and Mixtral compute the logits in the model's dtype before their
# float32 softmax, so their gates differ from eplib's by float32 rounding.
TOLERANCE = {"deepseek_v3": 1e-12, "deepseek_v2": 1e-12, "qwen3_moe": 1e-5, "mixtral": 1e-5}


def hf_block(family):
    """(config, transformers block in float64 with seeded random weights and routing bias)."""
    import transformers
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    sizes = dict(hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=2, num_experts_per_tok=3)
    if family == "deepseek_v3":  # sigmoid, groups ranked by their two best, a routing bias, a shared expert
        config = transformers.DeepseekV3Config(**sizes, moe_intermediate_size=FFN, n_routed_experts=EXPERTS,
                                               n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5)
        block = DeepseekV3MoE(config)
    elif family == "deepseek_v2":  # softmax, groups ranked by their best, two shared experts
        config = transformers.DeepseekV2Config(**sizes, moe_intermediate_size=FFN, n_routed_experts=EXPERTS,
                                               n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                               n_shared_experts=2, routed_scaling_factor=1.5)
        block = DeepseekV2Moe(config)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**sizes, moe_intermediate_size=FFN, num_experts=EXPERTS,
                                             norm_topk_prob=True)
        block = Qwen3MoeSparseMoeBlock(config)
    else:  # Mixtral with a GELU: hidden_act is honoured
        config = transformers.MixtralConfig(**sizes, intermediate_size=FFN, num_local_experts=EXPERTS,
                                            hidden_act="gelu")
        block = MixtralSparseMoeBlock(config)
    generator = torch.Generator().manual_seed(FAMILIES.index(family))
    with torch.no_grad():
        for _, param in sorted(block.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        for _, buffer in sorted(block.named_buffers()):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)
    config._experts_implementation = "eager"  # the reference loop (and no warning about a standalone block)
    return config, block.double()


def block_data(family):
    """(config.json mapping, state dict) of the family's block: what the rank processes get."""
    config, block = hf_block(family)
    return config.to_dict(), block.state_dict()


def rank_inputs(rank):
    """(x, upstream gradient) of one rank, [BATCH, SEQ, HIDDEN] float64."""
    generator = torch.Generator().manual_seed(100 + rank)
    return (torch.randn(BATCH, SEQ, HIDDEN, generator=generator, dtype=torch.float64),
            torch.randn(BATCH, SEQ, HIDDEN, generator=generator, dtype=torch.float64))


def _expert_grads(moe):
    """The gradients of this rank's experts in transformers' layout: (gate_up [E_local, 2F, H], down)."""
    w_gate, w_up, w_down = (w.grad for w in moe.experts.weights())
    return torch.cat([w_gate.transpose(1, 2), w_up.transpose(1, 2)], 1), w_down.transpose(1, 2)


def job_eplib_step(rank, world_size, group, config, state, parallel):
    """eplib's layer from the block's state dict, one forward and backward on this rank's tokens."""
    import eplib

    moe = eplib.MoE.from_hf(state, config, group=group, parallel=parallel)
    assert moe.dtype == torch.float64 and moe.router.weight.dtype == torch.float32
    x, upstream = rank_inputs(rank)
    x.requires_grad_()
    out = moe(x)
    (out * upstream).sum().backward()
    with torch.no_grad():
        chosen = moe.router(x.detach().reshape(-1, HIDDEN)).topk_idx
    shared = moe.shared_experts
    return {"out": out.detach(), "grad_x": x.grad, "chosen": chosen.sort(-1).values,
            "grad_router": moe.router.weight.grad, "grad_experts": _expert_grads(moe),
            "grad_shared": None if shared is None else [w.grad.T for w in (shared.w_gate, shared.w_up, shared.w_down)],
            "parallel": moe.last_parallel}


def hf_reference(family, world_size):
    """transformers' block on each rank's tokens (out, grad x, chosen experts, router and shared
    gradients of that rank's tokens) and the expert gradients of all ranks' tokens together."""
    config, block = hf_block(family)
    per_rank = []
    for rank in range(world_size):
        x, upstream = rank_inputs(rank)
        x.requires_grad_()
        for module in (block.gate, getattr(block, "shared_experts", None)):
            if module is not None:
                module.zero_grad()
        out = block(x)
        (out * upstream).sum().backward()
        chosen = block.gate(x.detach().reshape(-1, HIDDEN))[-1]
        shared = getattr(block, "shared_experts", None)
        per_rank.append({"out": out.detach(), "grad_x": x.grad, "chosen": chosen.sort(-1).values,
                         "grad_router": block.gate.weight.grad.clone(),
                         "grad_shared": None if shared is None else [
                             p.weight.grad.clone() for p in (shared.gate_proj, shared.up_proj, shared.down_proj)]})
    return per_rank, (block.experts.gate_up_proj.grad, block.experts.down_proj.grad)


def _check_against_reference(family, results, parallel):
    reference, (grad_gate_up, grad_down) = hf_reference(family, len(results))
    tol = dict(atol=TOLERANCE[family], rtol=TOLERANCE[family])
    num_local = EXPERTS // len(results)
    for rank, (got, want) in enumerate(zip(results, reference)):
        assert torch.equal(got["chosen"], want["chosen"]), f"rank {rank}: different experts chosen"
        for key in ("out", "grad_x", "grad_router"):
            torch.testing.assert_close(got[key].double(), want[key].double(), **tol, msg=f"rank {rank}: {key}")
        rows = slice(rank * num_local, (rank + 1) * num_local)
        torch.testing.assert_close(got["grad_experts"][0], grad_gate_up[rows], **tol)
        torch.testing.assert_close(got["grad_experts"][1], grad_down[rows], **tol)
        assert (got["grad_shared"] is None) == (want["grad_shared"] is None)
        for a, b in zip(got["grad_shared"] or [], want["grad_shared"] or []):
            torch.testing.assert_close(a, b, **tol)
        if results[0]["parallel"] is not None:  # a single process has no mode
            assert got["parallel"] == parallel


@pytest.mark.parametrize("family", FAMILIES)
def test_single_process_matches_transformers(family):
    config, block = hf_block(family)
    _check_against_reference(family, [job_eplib_step(0, 1, None, config, block, "ep")], "ep")


@pytest.mark.parametrize("parallel", ["ep", "tp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_ranks_match_transformers(pool, family, parallel):
    _check_against_reference(family, pool.run(job_eplib_step, *block_data(family), parallel), parallel)


class RecordingSlices(dict):
    """A state dict of lazy values that records what is read: key -> the (start, stop) row ranges."""

    def __init__(self, values):
        super().__init__(values)
        self.reads = {}

    def __getitem__(self, key):
        value, reads = super().__getitem__(key), self.reads

        class Recorder:
            shape = tuple(value.shape)

            def __getitem__(self, rows):
                reads.setdefault(key, []).append((rows.start, rows.stop))
                return value[rows]

        return Recorder()


def per_expert_state_dict(family, state):
    """The block's ``state`` as a checkpoint stores it: one key per expert and projection."""
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    per_expert = {k: v for k, v in state.items() if not k.startswith("experts.")}
    gate_up, down = state["experts.gate_up_proj"], state["experts.down_proj"]
    for expert in range(EXPERTS):
        for name, weight in zip(names, (gate_up[expert, :FFN], gate_up[expert, FFN:], down[expert])):
            per_expert[f"experts.{expert}.{name}.weight"] = weight.clone()
    return per_expert


def job_load_lazily(rank, world_size, group, config, state, family, layout):
    """from_hf on a state dict (keys under a model prefix) whose values record their reads: only
    this rank's experts are read, and the layer equals the one built from the plain state dict."""
    import eplib

    prefix = "model.layers.1.mlp."
    values = per_expert_state_dict(family, state) if layout == "per_expert" else state
    source = RecordingSlices({prefix + key: value for key, value in values.items()})
    moe = eplib.MoE.from_hf(source, config, group=group, prefix=prefix)
    plain = eplib.MoE.from_hf(state, config, group=group)
    same = all(torch.equal(a, b) for a, b in zip(moe.state_dict().values(), plain.state_dict().values()))
    return same, {key.removeprefix(prefix): reads for key, reads in source.reads.items()}


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_state_dict_loads_only_the_local_experts(pool2, family, layout):
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for rank, (same, reads) in enumerate(pool2.run(job_load_lazily, *block_data(family), family, layout)):
        assert same
        local = range(rank * EXPERTS // 2, (rank + 1) * EXPERTS // 2)
        expert_reads = {key: rows for key, rows in reads.items() if key.startswith("experts.")}
        if layout == "fused":
            assert expert_reads == {"experts.gate_up_proj": [(local.start, local.stop)],
                                    "experts.down_proj": [(local.start, local.stop)]}
        else:
            assert expert_reads == {f"experts.{e}.{name}.weight": [(None, None)] for e in local for name in names}


def job_export(rank, world_size, group, config, state):
    import eplib

    moe = eplib.MoE.from_hf(state, config, group=group, parallel="tp")
    return moe.to_hf_state_dict(config), moe.to_hf_state_dict(config, all_experts=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_is_the_inverse_of_from_hf(pool2, family):
    config, block = hf_block(family)
    original = block.state_dict()
    per_expert = per_expert_state_dict(family, original)
    merged = {}
    for full, local in pool2.run(job_export, config.to_dict(), original):
        assert full.keys() == original.keys()
        for key, value in original.items():
            assert torch.equal(full[key].to(value.dtype), value), key
        merged.update(local)
    assert merged.keys() == per_expert.keys()
    for key, value in per_expert.items():
        assert torch.equal(merged[key].to(value.dtype), value), key
    type(block)(config).double().load_state_dict(full)  # loads into transformers' own block


def test_safetensors_file_and_errors(tmp_path):
    import eplib

    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    config, block = hf_block("deepseek_v3")
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in block.state_dict().items()}, str(path))
    with safetensors.safe_open(str(path), framework="pt") as checkpoint:
        lazy = {key: checkpoint.get_slice(key) for key in checkpoint.keys()}
        moe = eplib.MoE.from_hf(lazy, config)
    x = rank_inputs(0)[0]
    torch.testing.assert_close(moe(x), block(x), atol=1e-12, rtol=1e-12)

    with pytest.raises(ValueError, match="model_type"):
        eplib.MoE.from_hf(block, type("Config", (), {"model_type": "llama"})())
    with pytest.raises(ValueError, match="no key 'gate.weight'"):
        eplib.MoE.from_hf({k: v for k, v in block.state_dict().items() if k != "gate.weight"}, config)
    wrong = dict(block.state_dict(), **{"experts.down_proj": torch.zeros(EXPERTS, HIDDEN, FFN + 1)})
    with pytest.raises(ValueError, match="experts.down_proj.*shape"):
        eplib.MoE.from_hf(wrong, config)
    fp8 = dict(block.state_dict(), **{"experts.down_proj": block.experts.down_proj.to(torch.float8_e4m3fn)})
    with pytest.raises(ValueError, match="dequantize"):
        eplib.MoE.from_hf(fp8, config)
    qwen_config, qwen_block = hf_block("qwen3_moe")
    biased = eplib.MoE.from_hf(qwen_block, qwen_config)
    biased.router.expert_bias.fill_(0.1)
    with pytest.raises(ValueError, match="no routing bias"):
        biased.to_hf_state_dict(qwen_config)


def test_bf16_checkpoint_keeps_a_float32_router():
    import eplib

    config, block = hf_block("deepseek_v3")
    moe = eplib.MoE.from_hf(block.to(torch.bfloat16), config)
    assert moe.dtype == torch.bfloat16 and moe.router.weight.dtype == torch.float32
    x = rank_inputs(0)[0].to(torch.bfloat16)
    torch.testing.assert_close(moe(x).float(), block(x).float(), atol=3e-2, rtol=3e-2)
