"""Errors that the CUDA transports find on the device, and how the host reports them.

Argument checks that need the values (expert ids in range, finite weights, the layout tensors
agreeing with each other, rows beyond num_worst_tokens) run on the device and OR bits into the
transport's device error flag (int32 [1]) instead of stopping the host. The flag travels in the
record of the next normal-mode dispatch and is read at its host sync: the rank whose flag is set
raises ValueError naming the problem (then clears the flag), every other rank raises RuntimeError,
and no payload moves, so the group stays usable. Calls that never sync (get_dispatch_layout,
num_worst_tokens and cached dispatch, combine) therefore report bad input at the next normal-mode
dispatch; inputs flagged bad are treated as masked (-1 ids) or dropped (rows past W), never read
out of bounds.

Two marks say that a rank's input failed a host check (an argument). ``REJECTED`` (the host's): the
record of such a rank, which joined the exchange only to say so; the others raise ``PeerInputError``
quoting its message at once. ``ERR_PEER_INPUT``: set in the error flag of a rank whose call without a
host sync learned that another rank's input failed (nccl: the host ORs it into the next normal-mode
record, from the call heads; ipc: the exchange kernel ORs it into the flag when it finds a stream
closed as rejected, csrc/cuda/ipc.h); that rank raises ``PeerInputError`` quoting it at its next
normal-mode dispatch, and the others RuntimeError naming that rank.
"""

from typing import Callable, List, Optional

import torch

from .. import _C
from ..exchange import PeerInputError, describe_ranks
from .records import FORMAT_FIELDS, check_format_agreement

# Error bits of csrc/include/eplib/errors.h.
ERR_EXPERT_ID = _C.ERR_EXPERT_ID
ERR_WEIGHT = _C.ERR_WEIGHT
ERR_OVERFLOW = _C.ERR_OVERFLOW
ERR_RANK_COUNTS = _C.ERR_RANK_COUNTS
ERR_EXPERT_COUNTS = _C.ERR_EXPERT_COUNTS
ERR_LL_MESSAGE = _C.ERR_LL_MESSAGE

# Above every kernel's bit (csrc/include/eplib/errors.h), in the int32 flag word of a record.
REJECTED = 1 << 30
ERR_PEER_INPUT = _C.ERR_PEER_INPUT

_ERROR_MESSAGES = {
    ERR_EXPERT_ID: "topk_idx: an expert id outside [-1, num_experts)",
    ERR_WEIGHT: "topk_weights: a weight that is not finite",
    ERR_OVERFLOW: "num_worst_tokens: a num_worst_tokens dispatch had more rows for one rank than "
                  "num_worst_tokens (the extra rows were dropped)",
    ERR_RANK_COUNTS: "num_tokens_per_rank: differs from the per-rank counts of is_token_in_rank",
    ERR_EXPERT_COUNTS: "num_tokens_per_expert: differs from the per-expert counts of topk_idx (or, without "
                       "topk_idx, holds a negative count)",
    ERR_LL_MESSAGE: "low-latency call: a message from another rank was rejected by its sender or made for a call "
                    "of another format (num_max_dispatch_tokens_per_rank, hidden, num_experts, top-k, FP8 options); "
                    "it was counted as empty",
    ERR_PEER_INPUT: "another rank's input failed a check in an earlier call without a host sync (num_worst_tokens "
                    "or cached dispatch, combine), which was abandoned",
}
assert not (REJECTED | ERR_PEER_INPUT) & (ERR_EXPERT_ID | ERR_WEIGHT | ERR_OVERFLOW | ERR_RANK_COUNTS
                                         | ERR_EXPERT_COUNTS | ERR_LL_MESSAGE), "a host mark collides with a kernel's error bit"

# Fields at the head of each rank's normal-mode record: each rank's own error flag, then the format
# fields that must agree on all ranks (records.FORMAT_FIELDS). Then R send counts, then per-expert counts.
RECORD_FIELDS = ("error_flag", *FORMAT_FIELDS)


def describe_error_flag(flag: int) -> str:
    """The problems named by the bits of a device error flag, joined with '; '."""
    known = [message for bit, message in _ERROR_MESSAGES.items() if flag & bit]
    unknown = flag & ~sum(_ERROR_MESSAGES)
    if unknown:
        known.append(f"unknown error bits {unknown:#x}")
    return "; ".join(known)


def check_records(records: torch.Tensor, rank: int, error_flag: torch.Tensor,
                  quote: Callable[[int], str], peer_input: Optional[Callable[[], str]] = None,
                  check_format: bool = True) -> None:
    """Raises on every rank alike when a rank rejected its input, a rank's error flag is set or the
    ranks' formats differ (unless ``check_format`` is False: the caller checked them).

    records: host int64 [R, L] starting with RECORD_FIELDS (or at least the error flag). A rank whose
    record is REJECTED: every other rank raises PeerInputError quoting ``quote(rank)`` (the rejecting
    rank raised its own error already). The rank whose own flag is set raises ValueError, or
    PeerInputError quoting ``peer_input()`` for ERR_PEER_INPUT (and its device flag is cleared:
    reported now, the next call starts clean); the others raise RuntimeError naming it.
    """
    def column(name: str) -> List[int]:
        return records[:, RECORD_FIELDS.index(name)].tolist()

    flags = column("error_flag")
    rejected = [r for r, flag in enumerate(flags) if flag & REJECTED]
    if rejected:
        quotes = "; ".join(f"rank {r}: {quote(r)}" for r in rejected)
        raise PeerInputError(f"eplib: dispatch abandoned on rank {rank}: the input of {describe_ranks(rejected)} "
                             f"failed a check ({quotes}). Nothing was exchanged; the Buffer stays usable")
    if flags[rank]:
        error_flag.zero_()
        if flags[rank] == ERR_PEER_INPUT and peer_input is not None:
            raise PeerInputError(f"eplib: dispatch abandoned on rank {rank}: {peer_input()}; its outputs on this "
                                 f"rank were not valid. Nothing was exchanged now; the Buffer stays usable")
        raise ValueError(f"{describe_error_flag(flags[rank])} (found on the device by this or an earlier "
                         f"call of this Buffer on rank {rank} since the last normal-mode dispatch)")
    flagged = [r for r, flag in enumerate(flags) if flag]
    if flagged:
        reports = "; ".join(f"rank {r}: {describe_error_flag(flags[r])}" for r in flagged)
        raise RuntimeError(f"eplib: dispatch abandoned on rank {rank}: rank(s) {flagged} reported errors found "
                           f"on the device ({reports})")
    if check_format:
        check_format_agreement(column, records.shape[0])
