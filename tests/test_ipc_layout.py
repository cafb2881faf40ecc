"""Row placement of the ipc transport, on the CPU: the shifts that its CUDA send kernels apply
(eplib/layout.h, called here through _C.dispatch_row_shifts / _C.combine_row_shifts) put every row
where the receiving kernel reads it. The expectation is built independently, by walking each rank's
tokens in order."""

from typing import Optional, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eplib import _C


def _dispatch_row_shifts(rank_prefix_matrix: Optional[torch.Tensor], rank: int, num_ranks: int,
                         slot_rows: int) -> list:
    shifts = torch.empty(num_ranks, dtype=torch.int64)
    matrix = rank_prefix_matrix.to(torch.int32).contiguous() if rank_prefix_matrix is not None else None
    _C.dispatch_row_shifts(matrix.data_ptr() if matrix is not None else 0, rank, num_ranks, slot_rows,
                           shifts.data_ptr())
    return shifts.tolist()


def _combine_row_shifts(rank_prefix_matrix: Optional[torch.Tensor], rank: int, num_ranks: int, slot_rows: int,
                        starts: Sequence[int]) -> list:
    shifts = torch.empty(num_ranks, dtype=torch.int64)
    compact_start = torch.tensor(list(starts), dtype=torch.int64)
    matrix = rank_prefix_matrix.to(torch.int32).contiguous() if rank_prefix_matrix is not None else None
    _C.combine_row_shifts(matrix.data_ptr() if matrix is not None else 0, rank, num_ranks, slot_rows,
                          compact_start.data_ptr(), shifts.data_ptr())
    return shifts.tolist()


def _send_pos(in_rank: torch.Tensor, slot_rows: int) -> list:
    """send_pos[t][r] as the send_positions kernels number rows: grouped by destination then token
    (slot_rows == 0), or r * slot_rows + index (slot layout; rows past a slot are not sent: -1)."""
    num_tokens, num_ranks = in_rank.shape
    counts = in_rank.sum(0).tolist()
    starts = [sum(counts[:r]) for r in range(num_ranks)]
    pos = [[-1] * num_ranks for _ in range(num_tokens)]
    seen = [0] * num_ranks
    for t in range(num_tokens):
        for r in range(num_ranks):
            if in_rank[t, r]:
                index = seen[r]
                seen[r] += 1
                if slot_rows == 0:
                    pos[t][r] = starts[r] + index
                elif index < slot_rows:
                    pos[t][r] = r * slot_rows + index
    return pos


@settings(max_examples=60, deadline=None)
@given(num_ranks=st.integers(1, 8), tokens=st.lists(st.integers(0, 9), min_size=8, max_size=8),
       density=st.floats(0.0, 1.0), slot_rows=st.sampled_from([0, 0, 3, 12]), seed=st.integers(0, 2**16))
def test_ipc_rows_land_where_receivers_read(num_ranks, tokens, density, slot_rows, seed):
    g = torch.Generator().manual_seed(seed)
    in_rank = [torch.rand(tokens[s], num_ranks, generator=g) < density for s in range(num_ranks)]
    send_pos = [_send_pos(in_rank[s], slot_rows) for s in range(num_ranks)]
    # Rows sent, [source][destination]: clipped to the slot in the slot layout.
    sent = [[sum(1 for t in range(tokens[s]) if send_pos[s][t][r] >= 0) for r in range(num_ranks)]
            for s in range(num_ranks)]
    counts = torch.tensor(sent, dtype=torch.int32).reshape(num_ranks, num_ranks)
    prefix = counts.cumsum(0).to(torch.int32).contiguous()

    # Dispatch: source s's k-th row for r goes where r's unpack reads it.
    for s in range(num_ranks):
        shift = _dispatch_row_shifts(prefix, s, num_ranks, slot_rows)
        index = [0] * num_ranks
        for t in range(tokens[s]):
            for r in range(num_ranks):
                if send_pos[s][t][r] < 0:
                    continue
                before = slot_rows * s if slot_rows else sum(sent[q][r] for q in range(s))
                assert send_pos[s][t][r] + shift[r] == before + index[r], (s, t, r)
                index[r] += 1

    # Combine: rank r sends compacted row i (source order) back to where source s's reduce reads
    # it, send_pos[s][t][r] for the token t that row came from.
    for r in range(num_ranks):
        received = [sent[s][r] for s in range(num_ranks)]
        compact_start = [sum(received[:s]) for s in range(num_ranks)]
        shift = _combine_row_shifts(prefix, r, num_ranks, slot_rows, compact_start)
        for s in range(num_ranks):
            tokens_to_r = [t for t in range(tokens[s]) if send_pos[s][t][r] >= 0]
            for k, t in enumerate(tokens_to_r):
                i = compact_start[s] + k
                assert i + shift[s] == send_pos[s][t][r], (r, s, t)


@pytest.mark.parametrize("slot_rows", [0, 5])
def test_ipc_rows_of_one_rank_stay_in_place(slot_rows):
    """R = 1: rows go to the rank's own region, unshifted."""
    prefix = torch.tensor([[4]], dtype=torch.int32)
    assert _dispatch_row_shifts(prefix, 0, 1, slot_rows) == [0]
    assert _combine_row_shifts(prefix, 0, 1, slot_rows, [0]) == [0]
