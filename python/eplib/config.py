"""DeepEP-compatible performance configuration."""

from dataclasses import dataclass

from . import _C
from .validation import check_int

# Largest top-k the buffer size hints make room for.
SIZE_HINT_MAX_TOPK = 32


def nvl_buffer_size_hint(num_max_tokens: int, hidden_bytes: int, num_ranks: int,
                         num_topk: int = SIZE_HINT_MAX_TOPK) -> int:
    """Bytes of ipc buffer (``num_nvl_bytes``) that the ipc transport needs for any call of up to
    ``num_max_tokens`` tokens per rank of ``hidden_bytes`` bytes each (H times the element size of x)
    and up to ``num_topk`` experts per token: the header, then a receive region of ``num_ranks *
    num_max_tokens`` rows (every token of every rank sent to this rank, the worst case; combine sends
    back at most as many) of the larger of the dispatch row (x, FP8 scales, source index, ids and
    weights) and the combine row (x and weights). For a known routing a smaller buffer may do: a call
    that does not fit raises ValueError with the bytes it needs.
    """
    check_int("num_max_tokens", num_max_tokens, 1)
    check_int("hidden_bytes", hidden_bytes, 1)
    check_int("num_ranks", num_ranks, 1)
    check_int("num_topk", num_topk, 1)
    scales_bytes = (hidden_bytes + 127) // 128 * 4
    row_bytes = max(_C.dispatch_row_stride(hidden_bytes, scales_bytes, num_topk),
                    _C.combine_row_stride(hidden_bytes, num_topk))
    return _C.ipc_header_bytes() + num_ranks * num_max_tokens * row_bytes


@dataclass
class Config:
    """Tuning knobs of DeepEP's ``deep_ep.Config``, same positional order.

    ``num_sms`` bounds the blocks (so the SMs) of the ipc transport's send and receive kernels. The
    chunk sizes describe DeepEP's ring buffers; eplib's transports have none and ignore them, and
    they are kept so that DeepEP code runs unchanged.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, num_max_tokens: int = 4096) -> int:
        """Bytes of ipc (NVLink) buffer for the ipc transport: ``nvl_buffer_size_hint(num_max_tokens,
        hidden_bytes, num_ranks)`` with up to ``SIZE_HINT_MAX_TOPK`` experts per token.

        DeepEP's signature has no token count, because its ring buffers do not depend on it; eplib's
        receive region holds a whole call, so its size does: ``num_max_tokens`` (eplib only) is the
        most tokens a rank dispatches in one call.
        """
        return nvl_buffer_size_hint(num_max_tokens, hidden_bytes, num_ranks, SIZE_HINT_MAX_TOPK)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Always 0: eplib has no RDMA buffer; traffic between nodes goes through NCCL."""
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError(f"hidden_bytes and num_ranks must be positive, got {hidden_bytes} and {num_ranks}")
        return 0
