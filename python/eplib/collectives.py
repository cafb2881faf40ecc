"""torch.distributed collectives that never wait forever.

Every wait on another rank goes through here: a collective that has not completed after
``EPLIB_TIMEOUT_S`` seconds (default 100) raises ``CollectiveError`` (a ``RuntimeError``) naming
this rank and the phase, so a rank whose peer raised or died fails instead of hanging.

Host waits. gloo's ``wait()`` always blocks the host, so on gloo (and for CPU tensors) every
collective is a timed host wait. With CUDA tensors on NCCL a timed wait polls the collective's
completion event, which is a host sync; there, by default (``host_wait=None``), the collectives
only make the current stream wait, so that results that stay on the device (the Balancer's counts,
the tp weight exchange) never stall the host, and a peer that never arrives is left to NCCL's
watchdog (the process group's timeout). Callers that read the result on the host next pass
``host_wait=True`` to get the ``EPLIB_TIMEOUT_S`` limit instead.
"""

import datetime
import math
import os
from typing import List, Optional

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 100.0


class CollectiveError(RuntimeError):
    """A collective timed out or lost a peer. The abandoned operation may still complete later,
    so the group's collectives are out of step from then on (the cpu transport's exchanges settle
    that: see ``eplib.exchange``). ``missing_ranks``: the ranks that never arrived or left the group,
    when known, else None."""

    def __init__(self, message: str, missing_ranks: Optional[List[int]] = None) -> None:
        super().__init__(message)
        self.missing_ranks = missing_ranks


def timeout_seconds() -> float:
    """The wait limit in seconds, read from ``EPLIB_TIMEOUT_S`` at each call."""
    raw = os.environ.get("EPLIB_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"EPLIB_TIMEOUT_S: expected a positive, finite number of seconds, got {raw!r}")
    return value


def _wait(work: dist.Work, limit: float, group: dist.ProcessGroup, phase: str) -> None:
    try:
        work.wait(timeout=datetime.timedelta(seconds=limit))
    except RuntimeError as error:  # gloo raises RuntimeError (or a subclass) on timeout or a lost peer
        raise CollectiveError(
            f"eplib: rank {group.rank()} of {group.size()} failed in {phase} (limit EPLIB_TIMEOUT_S={limit:g} s): "
            f"a peer rank raised, exited or never reached this call ({error})"
        ) from error


# torch 2.13 deprecates all_gather_into_tensor in favour of all_gather_single; older releases lack the latter.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def stream_ordered(tensor: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """True when a collective on ``tensor`` can complete in stream order without a host wait: a
    CUDA tensor on a backend other than gloo or MPI (whose ``wait()`` blocks the host anyway)."""
    if not tensor.is_cuda:
        return False
    backend = str(dist.get_backend(group)).lower()
    return not any(host_backend in backend for host_backend in ("gloo", "mpi"))


def _finish(work: dist.Work, limit: float, group: dist.ProcessGroup, phase: str, tensor: torch.Tensor,
            host_wait: Optional[bool]) -> None:
    if host_wait is None:
        host_wait = not stream_ordered(tensor, group)
    if host_wait:
        _wait(work, limit, group, phase)
    else:
        # NCCL: without a timeout, wait() only makes the current CUDA stream wait for the collective
        # (with one it blocks the host). A peer that never arrives is then caught by NCCL's watchdog
        # after the process group's timeout.
        work.wait()


def all_gather(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup, phase: str,
               host_wait: Optional[bool] = None) -> None:
    """All-gather ``input`` of every rank into ``output`` ([R * n], rank-major). host_wait: see the
    module docstring (None: a host wait unless the collective can complete in stream order)."""
    limit = timeout_seconds()  # read first: a bad setting must not leave a collective in flight
    work = _all_gather_single(output, input, group=group, async_op=True)
    _finish(work, limit, group, phase, input, host_wait)


def all_to_all(output: torch.Tensor, input: torch.Tensor, output_split_sizes: Optional[List[int]],
               input_split_sizes: Optional[List[int]], group: dist.ProcessGroup, phase: str,
               host_wait: Optional[bool] = None) -> None:
    """``all_to_all_single`` over dim 0 with the given split sizes (None: equal splits); host_wait as
    in ``all_gather``."""
    limit = timeout_seconds()
    work = dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group, async_op=True)
    _finish(work, limit, group, phase, input, host_wait)


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, phase: str, host_wait: Optional[bool] = None) -> None:
    """Sums ``tensor`` over the ranks of ``group``, in place; host_wait as in ``all_gather``."""
    limit = timeout_seconds()
    _finish(dist.all_reduce(tensor, group=group, async_op=True), limit, group, phase, tensor, host_wait)


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup, phase: str,
                   host_wait: Optional[bool] = None) -> None:
    """Sums ``input`` ([R * n], rank-major) over the ranks; rank r keeps block r in ``output`` ([n]);
    host_wait as in ``all_gather``."""
    limit = timeout_seconds()
    work = dist.reduce_scatter_tensor(output, input, group=group, async_op=True)
    _finish(work, limit, group, phase, input, host_wait)
