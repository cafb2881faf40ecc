"""torch.distributed collectives that never wait forever.

Every wait on another rank goes through here: a collective that has not completed after
``EPLIB_TIMEOUT_S`` seconds (default 100) raises ``RuntimeError`` naming this rank and the phase,
so a rank whose peer raised or died fails instead of hanging.
"""

import datetime
import os
from typing import List, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 100.0


def timeout_seconds() -> float:
    """The wait limit in seconds, read from ``EPLIB_TIMEOUT_S`` at each call."""
    raw = os.environ.get("EPLIB_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"EPLIB_TIMEOUT_S must be a positive number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"EPLIB_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    return value


def _wait(work: dist.Work, group: dist.ProcessGroup, phase: str) -> None:
    limit = timeout_seconds()
    try:
        work.wait(timeout=datetime.timedelta(seconds=limit))
    except RuntimeError as error:  # gloo raises RuntimeError (or a subclass) on timeout or a lost peer
        raise RuntimeError(
            f"eplib: rank {group.rank()} of {group.size()} failed in {phase} (limit EPLIB_TIMEOUT_S={limit:g} s): "
            f"a peer rank raised, exited or never reached this call ({error})"
        ) from error


# torch 2.13 renamed all_gather_into_tensor to all_gather_single; older releases only have the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup, phase: str) -> None:
    """All-gather ``input`` of every rank into ``output`` ([R * n], rank-major)."""
    _wait(_all_gather_single(output, input, group=group, async_op=True), group, phase)


def all_to_all(output: torch.Tensor, input: torch.Tensor, output_split_sizes: Optional[List[int]],
               input_split_sizes: Optional[List[int]], group: dist.ProcessGroup, phase: str) -> None:
    """``all_to_all_single`` over dim 0 with the given split sizes."""
    work = dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True)
    _wait(work, group, phase)
