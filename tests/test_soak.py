"""benchmarks/soak.py with a few hundred rounds on 2 ranks: every round right, and no file
descriptor or thread added from the middle to the end (leaks show there first); RSS is reported,
and bounded loosely (allocator noise over a few hundred rounds)."""

import os
import sys

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

ROUNDS = 300


def job_soak(rank, R, group):
    import soak

    return soak.soak(group, ROUNDS)


def test_soak(pool2):
    for figures in pool2.run(job_soak, timeout=300):
        assert figures["end"]["fds"] == figures["middle"]["fds"], figures
        assert figures["end"]["threads"] == figures["middle"]["threads"], figures
        assert figures["growth_per_1000_rounds"]["rss_mib"] < 64, figures
