"""The dispatch handle: everything a cached dispatch and the matching combine reuse."""

from operator import itemgetter
from typing import Optional, Tuple, Union

import torch


class DispatchHandle(tuple):
    """Layout of one dispatch, returned by ``Buffer.dispatch`` and passed back to ``combine`` or to
    a cached ``dispatch``.

    It unpacks like DeepEP's intranode handle, a tuple of six in DeepEP's order, read as if eplib
    had one channel per rank pair:

    0. ``rank_prefix_matrix``: int32 ``[R, R]``; entry ``[i][j]`` is the number of tokens that source
       ranks ``0..i`` send to rank ``j``. Rows from source ``i`` on rank ``j`` start at ``[i-1][j]``
       (0 for ``i = 0``).
    1. ``channel_prefix_matrix``: int32 ``[R, 1]``, the rows this rank sends to each rank (DeepEP's
       per-channel prefix sums of the sending side, with one channel).
    2. ``recv_channel_prefix_matrix``: int32 ``[R, 1]`` of zeros (where the one channel of each source
       starts within that source's rows).
    3. ``recv_src_idx``: int32 ``[N]``, source token index of each received row; -1 on the padding
       rows of a ``num_worst_tokens`` dispatch (then ``N = num_worst_tokens``).
    4. ``is_token_in_rank``: bool ``[T, R]``, whether each local token went to each rank.
    5. ``send_pos`` (DeepEP's ``send_head``): int32 ``[T, R]``, row of token ``t`` in the send region
       (grouped by destination rank, then token index), or -1. Combine receives the rows back in the
       same places.

    The tensors of entries 1, 2 and 5 are eplib's own; DeepEP code only passes them back. eplib's
    other fields are attributes:

        send_counts: tokens sent to each rank, on the host (see "Device values" below).
        recv_counts: tokens received from each rank, on the host. Both are derived from
            ``rank_prefix_matrix`` and kept on the host so that cached calls never read the device.
        num_recv_tokens: rows that really arrived (``<= N``).
        hidden: H of the dispatched x; cached dispatches and combines must use the same.
        slot_rows: 0, or (CUDA transports, ``num_worst_tokens`` dispatch) the rows per peer of the
            padded exchange: rows for rank ``r`` sit at ``[r * slot_rows, (r + 1) * slot_rows)`` of
            the send region, and ``send_pos`` holds those places.
        device_recv_counts: CUDA transports only: int32 ``[R]`` tokens received from each rank, on
            the device (the kernels of cached dispatch and combine read it).
        channel_counts: ipc transport only: int32 ``[R, C]`` on the device, the rows that came from
            each source through each of the dispatch's C channels (the combine sends them back the
            same way); None on the other transports.

    Device values in padded mode: when ``slot_rows > 0`` the host never learns the counts, so
    ``send_counts``, ``recv_counts`` (int32 ``[R]``) and ``num_recv_tokens`` (int32 ``[1]``) are
    tensors on the device instead of host ints. Everywhere else they are host ints.
    """

    rank_prefix_matrix = property(itemgetter(0))
    channel_prefix_matrix = property(itemgetter(1))
    recv_channel_prefix_matrix = property(itemgetter(2))
    recv_src_idx = property(itemgetter(3))
    is_token_in_rank = property(itemgetter(4))
    send_pos = property(itemgetter(5))

    send_counts: Union[Tuple[int, ...], torch.Tensor]
    recv_counts: Union[Tuple[int, ...], torch.Tensor]
    num_recv_tokens: Union[int, torch.Tensor]
    hidden: int
    slot_rows: int
    device_recv_counts: Optional[torch.Tensor]
    channel_counts: Optional[torch.Tensor]

    def __new__(cls, *, rank_prefix_matrix: torch.Tensor, device_send_counts: torch.Tensor,
                send_counts: Union[Tuple[int, ...], torch.Tensor], recv_counts: Union[Tuple[int, ...], torch.Tensor],
                recv_src_idx: torch.Tensor, is_token_in_rank: torch.Tensor, send_pos: torch.Tensor,
                num_recv_tokens: Union[int, torch.Tensor], hidden: int, slot_rows: int = 0,
                device_recv_counts: Optional[torch.Tensor] = None,
                channel_counts: Optional[torch.Tensor] = None) -> "DispatchHandle":
        """``device_send_counts``: int32 ``[R]`` rows sent to each rank, on x's device (entry 1 views it)."""
        channel_prefix_matrix = device_send_counts.view(-1, 1)
        handle = super().__new__(cls, (rank_prefix_matrix, channel_prefix_matrix,
                                       torch.zeros_like(channel_prefix_matrix), recv_src_idx, is_token_in_rank,
                                       send_pos))
        handle.send_counts = send_counts
        handle.recv_counts = recv_counts
        handle.num_recv_tokens = num_recv_tokens
        handle.hidden = hidden
        handle.slot_rows = slot_rows
        handle.device_recv_counts = device_recv_counts
        handle.channel_counts = channel_counts
        return handle

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        """Every tensor the handle holds, entries and attributes (for keeping them alive on a stream)."""
        values = (*self, self.send_counts, self.recv_counts, self.num_recv_tokens, self.device_recv_counts,
                  self.channel_counts)
        return tuple(value for value in values if isinstance(value, torch.Tensor))

    @property
    def num_tokens(self) -> int:
        """Tokens on this rank when the handle was made (T)."""
        return self.is_token_in_rank.shape[0]

    @property
    def num_output_rows(self) -> int:
        """Rows of the dispatch output (N), padding included."""
        return self.recv_src_idx.shape[0]
