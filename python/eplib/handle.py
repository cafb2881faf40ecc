"""The dispatch handle: everything a cached dispatch and the matching combine reuse."""

from typing import NamedTuple, Optional, Tuple, Union

import torch


class DispatchHandle(NamedTuple):
    """Layout of one dispatch, returned by ``Buffer.dispatch`` and passed back to ``combine`` or to
    a cached ``dispatch``. It is a tuple whose entries 0, 3 and 4 sit where DeepEP's intranode
    handle has the same information.

    Fields:
        rank_prefix_matrix: int32 ``[R, R]``; entry ``[i][j]`` is the number of tokens that source
            ranks ``0..i`` send to rank ``j``. Rows from source ``i`` on rank ``j`` start at
            ``[i-1][j]`` (0 for ``i = 0``).
        send_counts: tokens sent to each rank, on the host (see "Device values" below).
        recv_counts: tokens received from each rank, on the host. Both are derived from
            ``rank_prefix_matrix`` and kept on the host so that cached calls never read the device.
        recv_src_idx: int32 ``[N]``, source token index of each received row; -1 on the padding
            rows of a ``num_worst_tokens`` dispatch (then ``N = num_worst_tokens``).
        is_token_in_rank: bool ``[T, R]``, whether each local token went to each rank.
        send_pos: int32 ``[T, R]``, row of token ``t`` in the send region (grouped by destination
            rank, then token index), or -1. Combine receives the rows back in the same places.
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

    rank_prefix_matrix: torch.Tensor
    send_counts: Union[Tuple[int, ...], torch.Tensor]
    recv_counts: Union[Tuple[int, ...], torch.Tensor]
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_pos: torch.Tensor
    num_recv_tokens: Union[int, torch.Tensor]
    hidden: int
    slot_rows: int = 0
    device_recv_counts: Optional[torch.Tensor] = None
    channel_counts: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        """Tokens on this rank when the handle was made (T)."""
        return self.is_token_in_rank.shape[0]

    @property
    def num_output_rows(self) -> int:
        """Rows of the dispatch output (N), padding included."""
        return self.recv_src_idx.shape[0]
