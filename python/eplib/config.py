"""DeepEP-compatible performance configuration."""

from dataclasses import dataclass

# Largest top-k the buffer size hints make room for.
SIZE_HINT_MAX_TOPK = 32


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass
class Config:
    """Tuning knobs of DeepEP's ``deep_ep.Config``, same positional order.

    ``num_sms`` bounds the SMs that GPU kernels use. The chunk sizes describe the ring buffers of
    peer-memory transports. The cpu transport moves data with gloo collectives and ignores all of
    them; they are kept so that DeepEP code runs unchanged.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of peer (NVLink) buffer for rows of ``hidden_bytes``.

        One receive queue of ``num_max_nvl_chunked_recv_tokens`` packed rows per (channel, peer),
        a channel being a pair of SMs; a row holds x, FP8 scales, the source index and up to
        ``SIZE_HINT_MAX_TOPK`` ids and weights; plus int32 head/tail counters per (channel, peer).
        Rounded up to 128 bytes. The cpu transport allocates no such buffer.
        """
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError(f"hidden_bytes and num_ranks must be positive, got {hidden_bytes} and {num_ranks}")
        num_channels = max(1, self.num_sms // 2)
        scales_bytes = (hidden_bytes + 127) // 128 * 4
        row_bytes = (_round_up(hidden_bytes, 16) + _round_up(scales_bytes, 16)
                     + _round_up(4 + 8 * SIZE_HINT_MAX_TOPK, 16))
        queue_bytes = num_channels * num_ranks * self.num_max_nvl_chunked_recv_tokens * row_bytes
        counter_bytes = num_channels * num_ranks * 2 * 4
        return _round_up(queue_bytes + counter_bytes, 128)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Always 0: eplib has no RDMA buffer; traffic between nodes goes through NCCL."""
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError(f"hidden_bytes and num_ranks must be positive, got {hidden_bytes} and {num_ranks}")
        return 0
