"""What every transport checks in the per-rank records of a dispatch: the row format all ranks
must share, and receive totals that int32 positions can index."""

from typing import Callable, Dict, List, Optional

import torch

from .._dtypes import INT32_LIMIT, WIRE_DTYPE_IDS

# Format fields of a dispatch record, and the argument to blame when the ranks disagree on one.
# "scales": FP8 scales per token, negative for int32 (UE8M0-packed) scales, 0 without scales.
FORMAT_FIELDS = {"num_experts": "num_tokens_per_expert", "num_topk": "topk_idx", "x_dtype": "x", "hidden": "x",
                 "scales": "x[1]"}


def format_values(x: torch.Tensor, x_scales: Optional[torch.Tensor], num_experts: int,
                  num_topk: int) -> Dict[str, int]:
    """This rank's values of the FORMAT_FIELDS, in their order."""
    return {"num_experts": num_experts, "num_topk": num_topk, "x_dtype": WIRE_DTYPE_IDS[x.dtype], "hidden": x.shape[1],
            "scales": _scales_format(x_scales)}


def _scales_format(x_scales: Optional[torch.Tensor]) -> int:
    if x_scales is None:
        return 0
    return -x_scales.shape[1] if x_scales.dtype == torch.int32 else x_scales.shape[1]


def check_format_agreement(column: Callable[[str], List[int]], num_ranks: int) -> None:
    """Raises ValueError (on every rank alike) when the ranks' records differ in a format field;
    ``column(name)`` gives that field of every rank's record, in rank order."""
    for name, argument in FORMAT_FIELDS.items():
        values = column(name)
        if len(set(values)) > 1:
            raise ValueError(f"{argument}: all ranks must agree on {name}, but ranks 0..{num_ranks - 1} have {values}")


def check_receive_totals(recv_totals: List[int]) -> None:
    """Raises ValueError (on every rank alike) when a rank would receive more rows than int32
    positions index; ``recv_totals[r]`` is the rows rank r receives from all ranks."""
    for r, total in enumerate(recv_totals):
        if total > INT32_LIMIT:
            raise ValueError(f"x: rank {r} would receive {total} rows; at most {INT32_LIMIT} fit int32 positions")
