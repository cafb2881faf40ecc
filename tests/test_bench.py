"""The benchmark harness: one quick run on 2 ranks (as CI runs it) and the routing generators."""

import json
import os
import subprocess
import sys
from typing import Dict

import pytest
import torch

from eplib.transports.records import header_words

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.join(_ROOT, "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

import routing  # noqa: E402
from routing import RoutingSpec  # noqa: E402

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPS = ("layout", "dispatch", "combine", "end_to_end")
IMPLS = ("eplib", "reference", "framework")


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    """``torchrun --nproc_per_node=2 benchmarks/bench_dispatch.py --quick --json``, once per module."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(_BENCH, "bench_dispatch.py"), "--quick", "--json", str(out)]
    done = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Correctness guard" in done.stdout
    with open(out) as f:
        return json.load(f)


def expected_bytes(point: dict, num_ranks: int, seed: int) -> Dict[str, Dict[str, list]]:
    """Closed form of the bytes each rank sends to other ranks, per implementation and op,
    from the routing regenerated here (payload + metadata; self-sends not counted)."""
    spec = RoutingSpec(point["routing"]["kind"], point["num_experts"], point["top_k"],
                       zipf_s=point["routing"]["zipf_s"], hot_fraction=point["routing"]["hot_fraction"],
                       n_group=point["routing"]["n_group"], topk_group=point["routing"]["topk_group"])
    hidden_bytes = point["hidden"] * ELEMENT_BYTES[point["dtype"]]
    top_k, experts = point["top_k"], point["num_experts"]
    experts_per_rank = experts // num_ranks
    eplib_stride = _align16(_align16(hidden_bytes) + 4 + 8 * top_k)  # x | src idx int32 | ids int32 | weights f32
    # [source, destination]: tokens sent once per rank (eplib, reference) and slots (framework).
    token_rows = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
    slot_rows = torch.zeros(num_ranks, num_ranks, dtype=torch.int64)
    for rank in range(num_ranks):
        topk_idx, _ = routing.generate(spec, point["tokens_per_rank"], seed, rank)
        dest = topk_idx // experts_per_rank
        for d in range(num_ranks):
            token_rows[rank, d] = int((dest == d).any(dim=1).sum())
            slot_rows[rank, d] = int((dest == d).sum())
    token_rows.fill_diagonal_(0)  # self-sends are not counted
    slot_rows.fill_diagonal_(0)
    sent_tokens, returned_tokens = token_rows.sum(1), token_rows.sum(0)  # dispatch sends, combine sends back
    sent_slots, returned_slots = slot_rows.sum(1), slot_rows.sum(0)
    gather = num_ranks - 1
    result = {name: {op: [] for op in OPS} for name in IMPLS}
    for rank in range(num_ranks):
        per_impl = {
            # eplib's cpu transport starts dispatch and combine with its call header (README,
            # "Collectives per call").
            "eplib": (gather * 8 * header_words(num_ranks) + int(sent_tokens[rank]) * eplib_stride,
                      gather * 8 * header_words(num_ranks) + int(returned_tokens[rank]) * hidden_bytes),
            "reference": (gather * 8 * (num_ranks + experts + 1) + int(sent_tokens[rank]) * (hidden_bytes + 12 * top_k),
                          int(returned_tokens[rank]) * hidden_bytes),
            "framework": (8 * (experts - experts_per_rank) + int(sent_slots[rank]) * hidden_bytes,
                          int(returned_slots[rank]) * hidden_bytes),
        }
        for name, (dispatch, combine) in per_impl.items():
            for op, value in (("layout", 0), ("dispatch", dispatch), ("combine", combine),
                              ("end_to_end", dispatch + combine)):
                result[name][op].append(value)
    return result


def test_quick_run_covers_every_point(quick_run):
    from bench_dispatch import QUICK_SWEEP  # benchmarks/ is on sys.path (top of this module)

    points = quick_run["points"]
    assert len(points) == len(QUICK_SWEEP["tokens"]) * len(QUICK_SWEEP["routing"])
    assert {(p["tokens_per_rank"], p["routing"]["kind"]) for p in points} == {
        (t, k) for t in QUICK_SWEEP["tokens"] for k in QUICK_SWEEP["routing"]}
    machine = quick_run["machine"]
    for key in ("cores", "cpu_model", "torch", "date_utc", "command"):
        assert machine[key], key
    assert set(quick_run["rules"]) == {"bytes", "time", "collective_share"}


def test_quick_run_times_are_positive_and_guard_passed(quick_run):
    for point in quick_run["points"]:
        for name in IMPLS:
            assert point["check"][name]["passed"], (name, point["tokens_per_rank"], point["routing"])
            for op in OPS:
                figures = point["results"][name][op]
                assert len(figures["samples_ms"]) == quick_run["settings"]["iters"]
                assert 0 < figures["p10_ms"] <= figures["median_ms"] <= figures["p90_ms"], (name, op)
                assert all(v > 0 for v in figures["samples_ms"])
                assert 0 <= figures["collective_share"] <= 1.0 + 1e-9


def test_quick_run_bytes_match_closed_form(quick_run):
    num_ranks, seed = quick_run["machine"]["ranks"], quick_run["settings"]["seed"]
    for point in quick_run["points"]:
        expected = expected_bytes(point, num_ranks, seed)
        for name in IMPLS:
            for op in OPS:
                figures = point["results"][name][op]
                assert figures["bytes_per_rank"] == expected[name][op], (name, op, point["routing"]["label"])
                assert figures["bytes"] == sum(expected[name][op])
        # Sending a token to a rank once instead of once per slot halves the bytes or better here.
        assert point["ratios"]["eplib_over_framework_bytes"]["combine"] <= 0.6


def test_plot_of_quick_run(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    import report

    report.plot(quick_run, str(tmp_path / "quick.png"))
    assert (tmp_path / "quick.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------
# Routing generators
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", routing.KINDS)
def test_routing_shape_distinct_deterministic(kind):
    spec = RoutingSpec(kind, num_experts=32, top_k=6, n_group=8, topk_group=3)
    topk_idx, topk_weights = routing.generate(spec, 500, seed=3, rank=1)
    assert topk_idx.dtype == torch.int64 and topk_idx.shape == (500, 6)
    assert topk_weights.dtype == torch.float32 and topk_weights.shape == (500, 6)
    assert int(topk_idx.min()) >= 0 and int(topk_idx.max()) < 32
    assert (topk_idx.sort(dim=1).values.diff(dim=1) > 0).all(), "an expert twice in one token"
    torch.testing.assert_close(topk_weights.sum(dim=1), torch.ones(500))
    again, _ = routing.generate(spec, 500, seed=3, rank=1)
    assert torch.equal(topk_idx, again)
    other_rank, _ = routing.generate(spec, 500, seed=3, rank=2)
    assert not torch.equal(topk_idx, other_rank)


def _expert_share(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share of tokens that picked each expert."""
    return torch.bincount(topk_idx.flatten(), minlength=num_experts).double() / topk_idx.shape[0]


def test_zipf_share_falls_with_popularity_rank():
    spec = RoutingSpec("zipf", num_experts=16, top_k=1, zipf_s=1.2)
    topk_idx, _ = routing.generate(spec, 40000, seed=0, rank=0)
    probs = routing.zipf_probabilities(16, 1.2, seed=0)
    share_by_popularity = _expert_share(topk_idx, 16)[probs.argsort(descending=True)]
    # With one slot the share is the probability itself: 1/(i+1)^s, normalized.
    torch.testing.assert_close(share_by_popularity, probs.sort(descending=True).values, atol=0.01, rtol=0)
    assert (share_by_popularity[:-1] - share_by_popularity[1:] > -0.006).all()  # monotone up to noise


def test_zipf_skew_grows_with_s():
    top_shares = []
    for s in (0.0, 0.5, 1.0, 2.0):
        topk_idx, _ = routing.generate(RoutingSpec("zipf", 64, 8, zipf_s=s), 4000, seed=0, rank=0)
        top_shares.append(float(_expert_share(topk_idx, 64).max()))
    assert top_shares == sorted(top_shares) and top_shares[-1] > 0.9 and top_shares[0] < 0.2


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_hot_expert_share(fraction):
    spec = RoutingSpec("hot", num_experts=32, top_k=4, hot_fraction=fraction)
    topk_idx, _ = routing.generate(spec, 20000, seed=5, rank=0)
    shares = _expert_share(topk_idx, 32)
    hot = routing.hot_expert(32, seed=5)
    assert abs(float(shares[hot]) - fraction) < 0.015
    cold = torch.cat([shares[:hot], shares[hot + 1:]])
    # The other slots are uniform over the other 31 experts.
    expected_cold = (4 - fraction) / 31
    assert float((cold - expected_cold).abs().max()) < 0.02


@pytest.mark.parametrize("topk_group", [1, 2, 4])
def test_group_limited_stays_inside_topk_group_groups(topk_group):
    spec = RoutingSpec("group", num_experts=64, top_k=8, n_group=8, topk_group=topk_group)
    topk_idx, _ = routing.generate(spec, 2000, seed=1, rank=0)
    groups = topk_idx // 8
    groups_per_token = torch.tensor([len(set(row)) for row in groups.tolist()])
    assert int(groups_per_token.max()) <= topk_group
    if topk_group == 1:
        assert (groups_per_token == 1).all()


def test_group_limited_with_every_group_is_plain_top_k():
    spec = RoutingSpec("group", num_experts=32, top_k=4, n_group=4, topk_group=4)
    grouped, _ = routing.generate(spec, 300, seed=2, rank=0)
    uniform, _ = routing.generate(RoutingSpec("uniform", 32, 4), 300, seed=2, rank=0)
    assert torch.equal(grouped.sort(dim=1).values, uniform.sort(dim=1).values)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="nope", num_experts=8, top_k=2), "routing kind"),
    (dict(kind="uniform", num_experts=8, top_k=9), "top_k"),
    (dict(kind="hot", num_experts=8, top_k=2, hot_fraction=1.5), "hot_fraction"),
    (dict(kind="group", num_experts=8, top_k=2, n_group=3), "n_group"),
    (dict(kind="group", num_experts=8, top_k=2, n_group=4, topk_group=5), "topk_group"),
    (dict(kind="group", num_experts=8, top_k=5, n_group=4, topk_group=2), "top_k"),
])
def test_routing_spec_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutingSpec(**kwargs)


def test_ipc_report_prints_the_chunk_configuration(quick_run):
    """bench_dispatch --transport ipc prints the rings' chunk configuration beside its figures (rendered
    here from the quick run's records with the fields an ipc run adds)."""
    import copy

    import report
    from bench_dispatch import chunk_configuration

    import eplib

    result = copy.deepcopy(quick_run)
    result["machine"].update(num_nvl_bytes=123456, ipc_chunks=chunk_configuration(4))
    text = report.render_ipc_tables(result)
    for op, config in (("dispatch", eplib.Buffer.get_dispatch_config(4)), ("combine", eplib.Buffer.get_combine_config(4))):
        assert (f"{op} {config.num_channels} channels, chunks of {config.num_max_nvl_chunked_send_tokens} rows, "
                f"rings of up to {config.num_max_nvl_chunked_recv_tokens} rows") in text, text
    assert "123456 bytes of buffer" in text


def test_quick_low_latency_run(tmp_path):
    """``bench_dispatch.py --mode ll --quick`` on 2 ranks: every point timed in both modes, guard passed."""
    from bench_low_latency import LL_QUICK, OPS as LL_OPS

    out = tmp_path / "ll.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(_BENCH, "bench_dispatch.py"), "--mode", "ll", "--quick", "--json", str(out)]
    done = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Correctness guard: passed at every point" in done.stdout
    with open(out) as f:
        result = json.load(f)
    assert {(p["tokens_per_rank"], p["dtype"]) for p in result["points"]} == {
        (t, d) for t in LL_QUICK["tokens"] for d in LL_QUICK["dtype"]}
    for point in result["points"]:
        for mode in ("ll", "normal"):
            for op in LL_OPS:
                figures = point["results"][mode][op]
                assert 0 < figures["p10_ms"] <= figures["median_ms"] <= figures["p90_ms"], (mode, op)
