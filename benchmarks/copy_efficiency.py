"""Copy efficiency of the IPC transport on one GPU (``bench_dispatch.py --transport ipc``, one rank).

With one rank every row stays on the GPU, so dispatch and combine are device-to-device copies
through the Buffer's peer region, and their speed can be set against the plainest copy there is:
torch ``copy_`` between two preallocated uint8 tensors, timed the same way in the same process.

    traffic    the bytes an operation reads and writes in device memory (TRAFFIC_RULE);
    op GB/s    traffic / the operation's median time;
    copy GB/s  (read + write) / median time of a copy_ of traffic / 2 bytes, i.e. the same traffic;
    efficiency op GB/s / copy GB/s (= copy time / op time).

Goals (issue 4): dispatch and combine at >= 70% of the copy bandwidth at T=4096, H=7168, bf16,
top-8; a normal-mode dispatch (notify, its host sync and the launches) returns in <= 20 us at T=128.
"""

from typing import Any, Dict, List

import torch

from collective_meter import CollectiveMeter
from eplib import _C
from eplib.transports.tensors import row_bytes
from timing import copy_samples_ms, summarize

EFFICIENCY_OPS = ("dispatch", "cached_dispatch", "combine")
EFFICIENCY_GOAL = 0.85
LAUNCH_GOAL_US = 20.0
GOAL_SHAPE = {"hidden": 7168, "top_k": 8, "dtype": "bf16"}
EFFICIENCY_GOAL_TOKENS, LAUNCH_GOAL_TOKENS = 4096, 128

TRAFFIC_RULE = (
    "traffic (one rank: every row stays on the GPU) = bytes the operation must read and write in device "
    "memory, each once: dispatch reads x, topk_idx and topk_weights, writes and reads back one row per received "
    "token in the peer region (stride _C.dispatch_row_stride(H*b, 0, K): x, source index, ids, weights, 16-byte "
    "aligned segments) and writes recv_x, recv_topk_idx and recv_topk_weights; cached dispatch the same with x "
    "alone (stride _C.dispatch_row_stride(H*b, 0, 0)); combine reads the expert output [N, H], writes and reads "
    "back N rows of H*b bytes in the peer region and writes combined_x [T, H]. Layout data (is_token_in_rank, "
    "counts, the handle's index tensors) is not counted.")
EFFICIENCY_RULE = (
    "copy efficiency = (traffic / median time of the operation) / (copy GB/s); copy GB/s = (read + write bytes) / "
    "median time of torch copy_ between two preallocated uint8 tensors of traffic / 2 bytes (the same traffic), "
    "timed like the operation (barrier, CUDA events, device idle at the start) in the same process. "
    "launch: host wall time of a normal-mode dispatch call until it returns (notify kernel, its host sync, the "
    "send and receive launches), median.")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.nbytes for t in tensors)


def traffic_bytes(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  dispatched: Any) -> Dict[str, int]:
    """TRAFFIC_RULE's bytes of each of EFFICIENCY_OPS, from the inputs and one dispatch's outputs (one rank)."""
    recv_x, recv_topk_idx, recv_topk_weights = dispatched[:3]
    x_bytes, top_k = row_bytes(x), topk_idx.shape[1]
    region = 2 * recv_x.shape[0]  # each received row: written by the send kernel, read by the receive kernel
    return {
        "dispatch": _nbytes(x, topk_idx, topk_weights) + region * _C.dispatch_row_stride(x_bytes, 0, top_k)
        + _nbytes(recv_x, recv_topk_idx, recv_topk_weights),
        "cached_dispatch": _nbytes(x) + region * _C.dispatch_row_stride(x_bytes, 0, 0) + _nbytes(recv_x),
        "combine": _nbytes(recv_x) + region * _C.combine_row_stride(x_bytes, 0) + _nbytes(x),
    }


def figures(traffic: Dict[str, int], results: Dict[str, dict], warmup: int, iters: int, meter: CollectiveMeter,
            device: torch.device) -> Dict[str, dict]:
    """Per op of EFFICIENCY_OPS: traffic, its GB/s at the op's median time (from ``results``, the
    point record's eplib figures), the copy baseline of the same traffic and the efficiency."""
    out = {}
    for op in EFFICIENCY_OPS:
        copy_bytes = traffic[op] // 2
        copy_ms = summarize(copy_samples_ms(copy_bytes, warmup, iters, meter, device))["median_ms"]
        op_ms = results[op]["median_ms"]
        gb_per_s = traffic[op] / 1e9 / (op_ms / 1e3)
        copy_gb_per_s = 2 * copy_bytes / 1e9 / (copy_ms / 1e3)
        out[op] = {"traffic_bytes": traffic[op], "median_ms": op_ms, "host_median_ms": results[op]["host_median_ms"],
                   "gb_per_s": gb_per_s, "copy_bytes": copy_bytes, "copy_median_ms": copy_ms,
                   "copy_gb_per_s": copy_gb_per_s, "efficiency": gb_per_s / copy_gb_per_s}
    return out


def goals(point_fields: dict, efficiency: Dict[str, dict]) -> List[dict]:
    """The issue's goals that this point measures (none unless it has GOAL_SHAPE)."""
    if any(point_fields[key] != value for key, value in GOAL_SHAPE.items()):
        return []
    out = []
    if point_fields["tokens_per_rank"] == EFFICIENCY_GOAL_TOKENS:
        for op in ("dispatch", "combine"):
            value = efficiency[op]["efficiency"]
            out.append({"goal": f"{op} copy efficiency at T={EFFICIENCY_GOAL_TOKENS}", "value": round(value, 3),
                        "target": f">= {EFFICIENCY_GOAL}", "met": value >= EFFICIENCY_GOAL})
    if point_fields["tokens_per_rank"] == LAUNCH_GOAL_TOKENS:
        value = efficiency["dispatch"]["host_median_ms"] * 1e3
        out.append({"goal": f"normal dispatch launch (host wall time, us) at T={LAUNCH_GOAL_TOKENS}",
                    "value": round(value, 1), "target": f"<= {LAUNCH_GOAL_US:g}", "met": value <= LAUNCH_GOAL_US})
    return out
