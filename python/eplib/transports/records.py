"""What every transport checks in the per-rank records of a dispatch: the row format all ranks
must share, and receive totals that int32 positions can index. And the header that every call of
the cpu transport exchanges first (``make_header``, ``Headers``, ``check_headers``)."""

import struct
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .._dtypes import INT32_LIMIT, WIRE_DTYPE_IDS
from ..collectives import CollectiveError
from ..exchange import GroupChannel, PeerInputError, describe_ranks

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


def check_format_agreement(column: Callable[[str], List[int]], num_ranks: int,
                            arguments: Mapping[str, str] = FORMAT_FIELDS) -> None:
    """Raises ValueError (on every rank alike) when the ranks' records differ in a format field;
    ``column(name)`` gives that field of every rank's record, in rank order; ``arguments`` names the
    argument to blame for each field."""
    for name, argument in arguments.items():
        values = column(name)
        if len(set(values)) > 1:
            raise ValueError(f"{argument}: all ranks must agree on {name}, but ranks 0..{num_ranks - 1} have {values}")


def check_receive_totals(recv_totals: List[int]) -> None:
    """Raises ValueError (on every rank alike) when a rank would receive more rows than int32
    positions index; ``recv_totals[r]`` is the rows rank r receives from all ranks."""
    for r, total in enumerate(recv_totals):
        if total > INT32_LIMIT:
            raise ValueError(f"x: rank {r} would receive {total} rows; at most {INT32_LIMIT} fit int32 positions")


# ----------------------------------------------------------------------------------------------
# The call header of the cpu transport
# ----------------------------------------------------------------------------------------------
#
# Every call of the cpu transport that communicates starts with one all-gather of a fixed-size int64
# header per rank, the same size in every call, so that a rank whose input failed a check can join
# whatever exchange its peers are in. Words: the op index (exchange.GroupChannel), the call, the
# length of this rank's error message (0: its input passed), num_worst_tokens, the FORMAT_FIELDS,
# R rows this rank sends to each rank, R rows it expects from each rank (-1: not known yet), then
# the error message, UTF-8, cut to MESSAGE_WORDS * 8 bytes.

CALLS = ("dispatch", "cached dispatch", "combine", "get_dispatch_layout")
MESSAGE_WORDS = 48
_MESSAGE_WORDS = struct.Struct(f"<{MESSAGE_WORDS}q")  # the message bytes as little-endian int64 words
_HEAD = ("op", "call", "error_bytes", "num_worst_tokens", *FORMAT_FIELDS)
# Which argument a disagreement on a format field blames, per call (unused fields are 0 everywhere).
_ARGUMENTS = {"dispatch": FORMAT_FIELDS, "cached dispatch": FORMAT_FIELDS,
              "combine": {**FORMAT_FIELDS, "num_topk": "topk_weights"}}

Counts = Union[torch.Tensor, Sequence[int]]


def header_words(num_ranks: int) -> int:
    """int64 words of one rank's header."""
    return len(_HEAD) + 2 * num_ranks + MESSAGE_WORDS


# Where a header holds its error's length (> 0: this rank's input failed), and its count words.
ERROR_WORD = _HEAD.index("error_bytes")


def count_slices(num_ranks: int) -> Tuple[slice, slice]:
    """The words of a header that hold the rows a rank sends to each rank, and those it expects."""
    first = len(_HEAD)
    return slice(first, first + num_ranks), slice(first + num_ranks, first + 2 * num_ranks)


def make_header(num_ranks: int, op: int, call: str, *, error: Optional[BaseException] = None,
                sends: Optional[Counts] = None, expects: Optional[Counts] = None, num_worst_tokens: int = 0,
                **format_fields: int) -> torch.Tensor:
    """This rank's header, int64 [header_words(R)]; ``format_fields`` are FORMAT_FIELDS (0 if absent)."""
    unknown = set(format_fields) - set(FORMAT_FIELDS)
    if unknown:
        raise TypeError(f"make_header: {sorted(unknown)} are not format fields (records.FORMAT_FIELDS)")
    message = b"" if error is None else f"{type(error).__name__}: {error}".encode()
    room = MESSAGE_WORDS * 8
    if len(message) > room:
        message = message[:room - 3].decode(errors="ignore").encode() + "\u2026".encode()
    values = dict(op=op, call=CALLS.index(call), error_bytes=len(message), num_worst_tokens=num_worst_tokens,
                  **format_fields)
    words = [values.get(name, 0) for name in _HEAD]
    words += _int_list(sends) if sends is not None else [0] * num_ranks
    words += _int_list(expects) if expects is not None else [-1] * num_ranks
    words += _MESSAGE_WORDS.unpack(message.ljust(room, b"\0"))
    return torch.tensor(words, dtype=torch.int64)


def _int_list(counts: Counts) -> List[int]:
    return counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)


class Headers:
    """Every rank's header, as all-gathered: int64 [R, header_words(R)] (``table``), read on the host."""

    def __init__(self, gathered: torch.Tensor) -> None:
        self.num_ranks = gathered.shape[0]
        self.table = gathered
        self._rows = gathered.tolist()

    def column(self, name: str) -> List[int]:
        index = _HEAD.index(name)
        return [row[index] for row in self._rows]

    @property
    def sends(self) -> torch.Tensor:
        """int64 [source, destination]: rows each rank sends to each rank."""
        return self.table[:, len(_HEAD):len(_HEAD) + self.num_ranks]

    @property
    def expects(self) -> torch.Tensor:
        """int64 [rank, source]: rows each rank expects from each rank (-1: not known)."""
        return self.table[:, len(_HEAD) + self.num_ranks:len(_HEAD) + 2 * self.num_ranks]

    def failed(self) -> List[int]:
        """The ranks whose input failed a check."""
        return [r for r, length in enumerate(self.column("error_bytes")) if length]

    def quote(self, ranks: Sequence[int]) -> str:
        """Each of ``ranks``' call and error, for a message."""
        return "; ".join(f"rank {r} in {self.call(r)}: {self.error(r)}" for r in ranks)

    def _counts(self, first: int) -> List[List[int]]:
        return [row[first:first + self.num_ranks] for row in self._rows]

    def call(self, rank: int) -> str:
        return CALLS[self._rows[rank][_HEAD.index("call")]]

    def error(self, rank: int) -> str:
        """Rank ``rank``'s error message (empty when its input passed)."""
        data = _MESSAGE_WORDS.pack(*self._rows[rank][-MESSAGE_WORDS:])
        return data[:self._rows[rank][_HEAD.index("error_bytes")]].decode(errors="replace")

    def pair_mismatch(self) -> Optional[tuple]:
        """The first (source, destination, rows sent, rows expected) where what a rank sends another
        differs from what that one expects from it, or None."""
        sends, expects = self._counts(len(_HEAD)), self._counts(len(_HEAD) + self.num_ranks)
        for source in range(self.num_ranks):
            for destination in range(self.num_ranks):
                if sends[source][destination] != expects[destination][source]:
                    return source, destination, sends[source][destination], expects[destination][source]
        return None


def check_headers(headers: Headers, rank: int, call: str, channel: Optional[GroupChannel]) -> None:
    """Raises on every rank alike, before anything else travels, when a rank's input failed
    (PeerInputError, quoting it), when the ranks are at different op indices (CollectiveError; they
    continue from the highest; only with a ``channel``, which numbers the ops) or in different calls
    (RuntimeError), or disagree on the row format or, in a cached dispatch or combine, on the rows each
    sends the other (ValueError)."""
    failed = headers.failed()
    if failed:
        raise PeerInputError(f"eplib: {call} abandoned on rank {rank}: the input of {describe_ranks(failed)} failed a "
                             f"check ({headers.quote(failed)}). Nothing was exchanged; the Buffer stays usable")
    ops = headers.column("op")
    if channel is not None and len(set(ops)) > 1:
        channel.realign(max(ops) + 1)
        raise CollectiveError(f"eplib: {call} abandoned on rank {rank}: the ranks were out of step (op indices "
                              f"{ops}); they continue together from the next call")
    calls = [headers.call(r) for r in range(headers.num_ranks)]
    if len(set(calls)) > 1:
        raise RuntimeError(f"eplib: {call} abandoned on rank {rank}: the ranks are in different calls ({calls}, in "
                           f"rank order): a rank skipped or repeated a call; the next call works if they agree")
    check_format_agreement(headers.column, headers.num_ranks, _ARGUMENTS[call])
    if call in ("cached dispatch", "combine"):
        mismatch = headers.pair_mismatch()
        if mismatch is not None:
            source, destination, sent, expected = mismatch
            raise ValueError(f"handle: rank {source} sends {sent} rows to rank {destination}, which expects "
                             f"{expected}: the ranks passed the handles of different dispatches")
