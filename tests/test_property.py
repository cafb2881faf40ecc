"""Property tests: random shapes, skews, masked slots, empty ranks and hot experts.

Cases are drawn in the test process and run on the rank pool. For each case, on every rank:
dispatch then combine with identity experts gives x * (number of destination ranks) exactly
(small integer payloads, exact in every dtype; FP8 is dispatched only), every output matches the closed form, and
eplib.Buffer equals the reference bit for bit.
"""

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from dist_harness import job_closed_form, job_compare

# Random exploration on developer machines; a fixed sequence in CI (CI=true), so that a red CI run
# replays exactly.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=bool(os.environ.get("CI")), print_blob=True)


@st.composite
def cases(draw, R: int) -> dict:
    E = R * draw(st.integers(1, 4))
    K = draw(st.integers(1, min(E, 4)))
    Ts = draw(st.lists(st.integers(0, 24), min_size=R, max_size=R))
    num_worst = 0
    if draw(st.booleans()):
        # Enough for any rank: a token reaches a rank at most once.
        num_worst = sum(Ts) + draw(st.integers(0, 5)) or 1
    dtype = draw(st.sampled_from(["fp32", "bf16", "fp16", "fp8"]))
    return dict(
        seed=draw(st.integers(0, 2**20)),
        Ts=Ts,
        # FP8 carries one float32 scale per 128 columns; its combine check runs in bf16.
        H=128 if dtype == "fp8" else draw(st.sampled_from([3, 8, 24])),
        K=K,
        E=E,
        skew=draw(st.sampled_from(["uniform", "zipf", "hot", "masked", "dup", "all_masked", "one"])),
        dtype=dtype,
        alignment=draw(st.sampled_from([1, 2, 8])),
        num_worst=num_worst,
        with_topk=draw(st.booleans()) or draw(st.booleans()),  # mostly with topk
        bias=draw(st.integers(0, 2)),
    )


def job_property(rank, R, group, case):
    """Closed-form checks on the reference and on eplib.Buffer, then eplib vs reference."""
    return (job_closed_form(rank, R, group, "ref", case) + job_closed_form(rank, R, group, "eplib", case)
            + job_compare(rank, R, group, case))


def job_property_reference(rank, R, group, case):
    return job_closed_form(rank, R, group, "ref", case)


def _run(pool, job, data):
    case = data.draw(cases(pool.world_size), label="case")
    errs = pool.run(job, case, timeout=60)
    assert not any(errs), f"case {case}:\n" + "\n".join(e for rank_errs in errs for e in rank_errs)


@SETTINGS
@given(data=st.data())
def test_property_reference(pool, data):
    _run(pool, job_property_reference, data)


@SETTINGS
@given(data=st.data())
def test_property_buffer(pool, data):
    _run(pool, job_property, data)
