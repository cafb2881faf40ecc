"""What every transport checks in the per-rank records of a dispatch: the row format all ranks
must share."""

from typing import Callable, List

# Format fields of a dispatch record, and the argument to blame when the ranks disagree on one.
FORMAT_FIELDS = {"num_experts": "num_tokens_per_expert", "num_topk": "topk_idx", "x_dtype": "x", "hidden": "x",
                 "scales_per_token": "x[1]"}


def check_format_agreement(column: Callable[[str], List[int]], num_ranks: int) -> None:
    """Raises ValueError (on every rank alike) when the ranks' records differ in a format field;
    ``column(name)`` gives that field of every rank's record, in rank order."""
    for name, argument in FORMAT_FIELDS.items():
        values = column(name)
        if len(set(values)) > 1:
            raise ValueError(f"{argument}: all ranks must agree on {name}, but ranks 0..{num_ranks - 1} have {values}")
