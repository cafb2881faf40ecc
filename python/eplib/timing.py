"""Opt-in wall-clock accounting of eplib's communication phases.

``with eplib.timing.record() as times:`` makes every dispatch, combine (forward and backward) and
token-parallel weight exchange inside the block add its seconds to ``times.seconds[phase]``.
The phases: ``"dispatch"`` (the forward dispatch and the backward's cached dispatch),
``"combine"`` (the forward combine and the backward's combine), ``"tp all-gather"`` and
``"tp reduce-scatter"`` (the weight exchange of ``MoE(parallel="tp")``).
Outside such a block the accounting costs one global read per call. On CUDA each timed phase
synchronizes the device before and after (so it measures the phase, not the launch): use it to
profile, not in production steps.
"""

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch


class PhaseTimes:
    """Seconds and calls per phase since creation or the last ``reset()``."""

    def __init__(self) -> None:
        self.seconds: Dict[str, float] = defaultdict(float)
        self.calls: Dict[str, int] = defaultdict(int)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


_active: Optional[PhaseTimes] = None


@contextmanager
def record() -> Iterator[PhaseTimes]:
    """Collect phase times for the duration of the block (blocks nest; the innermost collects)."""
    global _active
    previous, times = _active, PhaseTimes()
    _active = times
    try:
        yield times
    finally:
        _active = previous


def _synchronize(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def phase(name: str, device: Optional[torch.device] = None) -> Iterator[None]:
    """Time the block as ``name`` when a ``record()`` block is active; otherwise do nothing."""
    times = _active
    if times is None:
        yield
        return
    _synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _synchronize(device)
        times.seconds[name] += time.perf_counter() - start
        times.calls[name] += 1
