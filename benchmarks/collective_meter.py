"""A timing and byte-counting shim around the torch.distributed collectives.

While installed, every ``all_to_all_single`` and all-gather that any implementation issues (eplib's
transport, ``eplib.reference``, the framework baseline) goes through a wrapper that, when the
meter is recording, waits for the collective to finish, adds its wall time to ``collective_ns``
and adds to ``bytes_to_others`` the bytes this rank sends to OTHER ranks:

    all_to_all_single   input bytes minus the split this rank sends to itself;
    all-gather          input bytes x (R - 1) (a copy goes to each other rank).

Payload and metadata (counts, records) alike; self-sends are not counted. With
``time_collectives`` (CPU), the wrapper waits inside an ``async_op=True`` call so that the time
lands in the collective; the caller's own wait then returns at once. On CUDA a collective only
enqueues work, so the meter counts bytes only and never blocks the host.
"""

import datetime
import inspect
import time
from types import ModuleType
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import eplib.collectives

# Modules whose attributes name the collectives: torch.distributed, and eplib.collectives, which
# binds its all-gather function at import time.
_PATCH_SITES: Tuple[ModuleType, ...] = (dist, eplib.collectives)
_ALL_TO_ALL = ("all_to_all_single",)
_ALL_GATHER = ("all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_single")


class CollectiveMeter:
    """Install once with ``install()``; ``start()`` resets the counters and records until ``stop()``."""

    def __init__(self, wait_timeout_s: float, time_collectives: bool) -> None:
        self.time_collectives = time_collectives
        self.collective_ns = 0
        self.bytes_to_others = 0
        self.recording = False
        self._timeout = datetime.timedelta(seconds=wait_timeout_s)
        self._originals: List[Tuple[ModuleType, str, Callable]] = []

    def start(self) -> None:
        self.collective_ns = 0
        self.bytes_to_others = 0
        self.recording = True

    def stop(self) -> Tuple[int, int]:
        """Stops recording; returns (collective_ns, bytes_to_others) since ``start()``."""
        self.recording = False
        return self.collective_ns, self.bytes_to_others

    def install(self) -> None:
        for module in _PATCH_SITES:
            for name in _ALL_TO_ALL + _ALL_GATHER:
                original = getattr(module, name, None)
                if original is None or getattr(original, "_bench_meter_wrapped", False):
                    continue
                count_bytes = _all_to_all_bytes if name in _ALL_TO_ALL else _all_gather_bytes
                setattr(module, name, self._wrap(original, count_bytes))
                self._originals.append((module, name, original))

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def _wrap(self, original: Callable, count_bytes: Callable[[Dict[str, object]], int]) -> Callable:
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            if not self.recording:
                return original(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            start = time.perf_counter_ns()
            work = original(*args, **kwargs)
            if self.time_collectives:
                if bound.arguments.get("async_op") and work is not None:
                    work.wait(timeout=self._timeout)
                self.collective_ns += time.perf_counter_ns() - start
            self.bytes_to_others += count_bytes(bound.arguments)
            return work

        wrapper._bench_meter_wrapped = True
        return wrapper


def _group_rank_size(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _all_to_all_bytes(arguments: Dict[str, object]) -> int:
    send: torch.Tensor = arguments["input"]
    rank, size = _group_rank_size(arguments["group"])
    splits = arguments["input_split_sizes"]
    if not splits:
        return send.nbytes * (size - 1) // size
    row_bytes = send.nbytes // max(1, send.shape[0]) if send.dim() > 0 else 0
    return send.nbytes - splits[rank] * row_bytes


def _all_gather_bytes(arguments: Dict[str, object]) -> int:
    send = arguments.get("tensor", arguments.get("input_tensor"))
    _, size = _group_rank_size(arguments["group"])
    return send.nbytes * (size - 1)
