"""DeepEP-compatible performance configuration."""

from dataclasses import dataclass
from typing import Optional

from . import _C
from .validation import check_int

# Largest top-k the buffer size hints make room for.
SIZE_HINT_MAX_TOPK = 32


def nvl_buffer_size_hint(num_max_tokens: int, hidden_bytes: int, num_ranks: int,
                         num_topk: int = SIZE_HINT_MAX_TOPK, config: Optional["Config"] = None) -> int:
    """Bytes of ipc buffer (``num_nvl_bytes``) for calls of up to ``num_max_tokens`` tokens per rank of
    ``hidden_bytes`` bytes each (H times the element size of x) and up to ``num_topk`` experts per
    token, with ``config``'s channels and rings (``Config()``, DeepEP's defaults, when None): the
    header, then a ring per (source rank, channel) of ``num_max_nvl_chunked_recv_tokens`` slots, but
    no more than a channel's share of ``num_max_tokens`` (a stream never holds more rows of a call),
    each slot a 16-byte header and the larger of the dispatch row (x, FP8 scales, source index, ids
    and weights) and the combine row (x and weights).

    Rows stream through the rings while they are written, so a call of any size runs through any
    buffer that holds one chunk (``num_max_nvl_chunked_send_tokens`` slots) per ring; smaller
    rings just stream in more steps.
    """
    check_int("num_max_tokens", num_max_tokens, 1)
    check_int("hidden_bytes", hidden_bytes, 1)
    check_int("num_ranks", num_ranks, 1)
    check_int("num_topk", num_topk, 1)
    config = config if config is not None else Config()
    scales_bytes = (hidden_bytes + 127) // 128 * 4
    row_bytes = max(_C.dispatch_row_stride(hidden_bytes, scales_bytes, num_topk),
                    _C.combine_row_stride(hidden_bytes, num_topk))
    channels = config.num_channels
    per_channel = -(-num_max_tokens // channels)
    ring_rows = max(config.num_max_nvl_chunked_send_tokens, min(config.num_max_nvl_chunked_recv_tokens, per_channel))
    return _C.ipc_buffer_bytes(num_ranks, channels, row_bytes, ring_rows)


@dataclass
class Config:
    """Tuning knobs of DeepEP's ``deep_ep.Config``, same positional order.

    The ipc transport streams rows through ``num_sms / 2`` channels (a sender and a receiver block
    each), rings of ``num_max_nvl_chunked_recv_tokens`` slots per (source rank, channel) and chunks of
    ``num_max_nvl_chunked_send_tokens`` rows, as DeepEP's intranode kernels do. The RDMA sizes have
    no effect (eplib goes between nodes over NCCL); they are kept so that DeepEP code runs unchanged.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    @property
    def num_channels(self) -> int:
        """Channels of an ipc dispatch: ``num_sms / 2``, at least 1, at most ``_C.IPC_MAX_CHANNELS``."""
        return max(1, min(self.num_sms // 2, _C.IPC_MAX_CHANNELS))

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                 num_max_tokens: Optional[int] = None) -> int:
        """Bytes of ipc (NVLink) buffer for this config's rings: ``nvl_buffer_size_hint`` with up to
        ``SIZE_HINT_MAX_TOPK`` experts per token. As in DeepEP it does not depend on the token count;
        ``num_max_tokens`` (eplib only) caps each ring at a channel's share of that many tokens."""
        tokens = num_max_tokens if num_max_tokens is not None else self.num_channels * self.num_max_nvl_chunked_recv_tokens
        return nvl_buffer_size_hint(tokens, hidden_bytes, num_ranks, SIZE_HINT_MAX_TOPK, self)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Always 0: eplib has no RDMA buffer; traffic between nodes goes through NCCL."""
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError(f"hidden_bytes and num_ranks must be positive, got {hidden_bytes} and {num_ranks}")
        return 0
