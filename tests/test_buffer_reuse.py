"""One Buffer across many calls of changing size: the cpu transport keeps its staging bytes between
calls (grown on demand), so a large call followed by smaller ones must leave no stale rows behind."""

from dist_harness import _compare_sequence, base_case, describe_diff, fill_case, make_buffer, same

# Sizes go up, down and up again; dtypes, top-k and padding change between rounds.
ROUNDS = [
    dict(Ts=[40], H=64, K=4, E_per_rank=4, dtype="bf16", skew="zipf", bias=2),
    dict(Ts=[3, 0], H=8, K=1, dtype="fp32"),
    dict(Ts=[120, 60], H=96, K=6, E_per_rank=3, dtype="fp16", skew="masked", num_worst=400),
    dict(Ts=[0], H=16, K=2, dtype="fp32"),
    dict(Ts=[9, 14], H=128, K=2, dtype="fp8", with_topk=False),
    dict(Ts=[1], H=24, K=3, dtype="bf16", skew="hot", alignment=4),
    dict(Ts=[150, 30], H=40, K=4, E_per_rank=4, dtype="fp32", skew="dup", bias=1),
    dict(Ts=[2, 5], H=4, K=2, dtype="fp16"),
]


def job_rounds(rank, R, group, cases):
    """All rounds on one eplib.Buffer and one ReferenceBuffer; returns mismatch descriptions."""
    eplib_buffer, reference_buffer = make_buffer("eplib", group), make_buffer("ref", group)
    errors = []
    for round_index, case in enumerate(cases):
        got = _compare_sequence(eplib_buffer, rank, R, case)
        want = _compare_sequence(reference_buffer, rank, R, case)
        errors += [f"rank {rank} round {round_index}: " + describe_diff(k, got[k], want[k])
                   for k in want if not same(got[k], want[k])]
    return errors


def test_one_buffer_many_changing_calls(pool):
    cases = [fill_case(base_case(seed=10 + i, **round_), pool.world_size) for i, round_ in enumerate(ROUNDS * 3)]
    errors = pool.run(job_rounds, cases, timeout=120)
    assert not any(errors), "\n".join(e for rank_errors in errors for e in rank_errors)
