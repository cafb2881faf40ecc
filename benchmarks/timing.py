"""Timing one collective operation on every rank, and summarizing samples.

Each timed operation starts right after a barrier, so all ranks start it together. On CPU the
time is ``time.perf_counter_ns`` around the call (every eplib CPU call is synchronous); on CUDA it
is the time between two CUDA events recorded on the current stream around the call. Beside it,
the host time: ``time.perf_counter_ns`` from the call until it returns (on CUDA before waiting for
the device, so it holds the launches and any host sync inside the call, such as the wait for the
counts of a normal-mode dispatch).
"""

import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

from collective_meter import CollectiveMeter

T = TypeVar("T")


class Sample(NamedTuple):
    elapsed_ms: float  # wall time of the operation on this rank
    collective_ms: float  # of which inside collectives (meaningful on CPU only)
    bytes_to_others: int  # bytes this rank sent to other ranks through the collectives
    host_ms: float  # wall time until the call returned (CUDA: without waiting for the device)


def time_operation(fn: Callable[[], T], meter: CollectiveMeter, device: torch.device) -> Tuple[T, Sample]:
    """Barrier, then run ``fn`` once and measure it; returns (fn's result, Sample)."""
    dist.barrier()
    meter.start()
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter_ns()
    result = fn()
    host_ms = (time.perf_counter_ns() - start) / 1e6
    if device.type == "cuda":
        end.record()
        end.synchronize()
        elapsed_ms = begin.elapsed_time(end)
    else:
        elapsed_ms = host_ms
    collective_ns, sent = meter.stop()
    return result, Sample(elapsed_ms, collective_ns / 1e6, sent, host_ms)


def copy_samples_ms(num_bytes: int, warmup: int, iters: int, meter: CollectiveMeter,
                    device: torch.device) -> List[float]:
    """Times of torch ``copy_`` of ``num_bytes`` between two preallocated uint8 tensors on ``device``,
    each timed as ``time_operation`` times an operation; ``iters`` of them after ``warmup``. The
    device-to-device copy bandwidth that the IPC transport's copy efficiency is measured against."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    times = [time_operation(lambda: target.copy_(source), meter, device)[1].elapsed_ms
             for _ in range(warmup + iters)]
    return times[warmup:]


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted values (q in [0, 1])."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples_ms: List[float]) -> Dict[str, float]:
    """Median and p10/p90 of per-iteration times."""
    ordered = sorted(samples_ms)
    return {"median_ms": statistics.median(ordered), "p10_ms": percentile(ordered, 0.1),
            "p90_ms": percentile(ordered, 0.9)}
