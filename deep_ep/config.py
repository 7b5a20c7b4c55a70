"""Kernel tuning knobs and the buffer-size rules that follow from them."""

from __future__ import annotations

from typing import Dict, Tuple

# Bytes of per-token metadata that travel beside the hidden data in the high-throughput rings:
# up to 16 top-k entries (int64 index + fp32 weight), the source index, padding to 16 bytes.
MAX_TOPK = 16
_TOKEN_META_BYTES = MAX_TOPK * (8 + 4) + 16
# Room for counters, prefix sums and the error record beside the rings.
_CONTROL_BYTES = 1 << 20
# Header of one low-latency dispatch message (source token, top-k ids, call tag; 80 bytes used),
# padded to a 128-byte line (kHeaderBytes in csrc/kernels/internode_ll_api.cuh).
_LL_HEADER_BYTES = 128
# ll::kMaxBlocks: the low-latency kernels' largest grid (one dispatch delivery flag per sending block).
_LL_MAX_BLOCKS = 128
_ALIGN = 128


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _slot_bytes(hidden_bytes: int) -> int:
    """Bytes one token takes in a ring slot: data, FP8 scales (one fp32 per 128 fp8 channels,
    i.e. ``hidden_bytes / 2 / 128 * 4`` for the bf16-sized ``hidden_bytes``), metadata."""
    scale_bytes = hidden_bytes // 64
    return _align(hidden_bytes + scale_bytes + _TOKEN_META_BYTES, 16)


class Config:
    """Performance knobs of the high-throughput kernels.

    Args:
        num_sms: SMs the kernels may use (even: half send, half receive).
        num_max_nvl_chunked_send_tokens: tokens a sender moves per step over NVLink (bf16 rows;
            an FP8 dispatch moves twice as many per step, the same bytes).
        num_max_nvl_chunked_recv_tokens: capacity, in tokens, of each NVLink ring.
        num_max_rdma_chunked_send_tokens: tokens a sender moves per step over the inter-node leg.
        num_max_rdma_chunked_recv_tokens: capacity, in tokens, of each inter-node ring.
    """

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        for name, value in (("num_sms", num_sms),
                            ("num_max_nvl_chunked_send_tokens", num_max_nvl_chunked_send_tokens),
                            ("num_max_nvl_chunked_recv_tokens", num_max_nvl_chunked_recv_tokens),
                            ("num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens),
                            ("num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Config: {name} must be a positive int, got {value!r}")
        if num_sms % 2 != 0:
            raise ValueError(f"Config: num_sms must be even (half send, half receive), got {num_sms}")
        if num_max_nvl_chunked_send_tokens > num_max_nvl_chunked_recv_tokens:
            raise ValueError("Config: num_max_nvl_chunked_send_tokens must not exceed "
                             "num_max_nvl_chunked_recv_tokens")
        if num_max_rdma_chunked_send_tokens > num_max_rdma_chunked_recv_tokens:
            raise ValueError("Config: num_max_rdma_chunked_send_tokens must not exceed "
                             "num_max_rdma_chunked_recv_tokens")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = num_max_rdma_chunked_recv_tokens

    @property
    def num_channels(self) -> int:
        """Channels (pairs of one sending and one receiving SM)."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVLink buffer the high-throughput kernels need with this config.

        Args:
            hidden_bytes: bytes of one token's hidden data at its widest (``hidden * 2`` for bf16).
            num_ranks: ranks in the group (the NVLink peers of one domain when internode).
        """
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError("hidden_bytes and num_ranks must be positive")
        rings = self.num_channels * num_ranks * self.num_max_nvl_chunked_recv_tokens * _slot_bytes(hidden_bytes)
        counters = self.num_channels * num_ranks * 4 * 8 + num_ranks * (num_ranks + 256) * 4 * 2
        return _align(rings + counters + _CONTROL_BYTES)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVSHMEM symmetric buffer the internode kernels need with this config.

        Args:
            hidden_bytes: bytes of one token's hidden data at its widest.
            num_ranks: ranks in the group (an upper bound on the inter-node peers).
        """
        if hidden_bytes <= 0 or num_ranks <= 0:
            raise ValueError("hidden_bytes and num_ranks must be positive")
        # One send ring and one receive ring per (channel, inter-node peer).
        rings = 2 * self.num_channels * num_ranks * self.num_max_rdma_chunked_recv_tokens * _slot_bytes(hidden_bytes)
        return _align(rings + self.num_channels * num_ranks * 64 + _CONTROL_BYTES)

    def as_tuple(self) -> Tuple[int, int, int, int, int]:
        return (self.num_sms, self.num_max_nvl_chunked_send_tokens, self.num_max_nvl_chunked_recv_tokens,
                self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens)

    def __repr__(self) -> str:
        return ("Config(num_sms={}, num_max_nvl_chunked_send_tokens={}, num_max_nvl_chunked_recv_tokens={}, "
                "num_max_rdma_chunked_send_tokens={}, num_max_rdma_chunked_recv_tokens={})".format(*self.as_tuple()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.as_tuple() == other.as_tuple()


# Chunk sizes per rank count: (nvl send, nvl recv, rdma send, rdma recv). The SM count comes from
# Buffer.num_sms. Intranode rows (2, 4, 8): in the intranode kernels the send chunk is per warp (a
# warp publishes its ring tail after that many of its tokens); 2 and 4 were measured best in the
# SM/chunk sweep of tests/test_intranode.py --bench on 4 x H200 (docs/benchmarks.md), 8 is an
# estimate until an 8-GPU machine is lent. Rows of 16+ ranks serve the internode kernels (estimates).
DISPATCH_CHUNKS: Dict[int, Tuple[int, int, int, int]] = {
    2: (2, 256, 6, 128), 4: (2, 256, 6, 128), 8: (2, 256, 6, 128),
    16: (36, 288, 20, 128), 24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128),
    64: (32, 288, 8, 128), 96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128),
    160: (28, 720, 12, 128),
}
# Combine on 4 ranks: rings of 64 tokens stay in L2 (24 SMs: 64 -> 383-393 GB/s against 373-383 at
# 256, two runs), enough slots for every receiving warp to have its token's rows in flight.
COMBINE_CHUNKS: Dict[int, Tuple[int, int, int, int]] = {
    2: (2, 256, 6, 128), 4: (2, 64, 6, 128), 8: (2, 256, 6, 128),
    16: (4, 288, 12, 128), 24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128),
    64: (1, 288, 20, 128), 96: (1, 480, 8, 128), 128: (1, 560, 12, 128), 144: (2, 720, 8, 128),
    160: (2, 720, 8, 128),
}


def tuned_config(table: Dict[int, Tuple[int, int, int, int]], num_ranks: int, num_sms: int) -> Config:
    """The table's chunk sizes for ``num_ranks``; rank counts without a row get Config's defaults."""
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks <= 0:
        raise ValueError(f"num_ranks must be a positive int, got {num_ranks!r}")
    if num_ranks not in table:
        return Config(num_sms)
    return Config(num_sms, *table[num_ranks])


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """Bytes of NVSHMEM symmetric memory the low-latency kernels need (both alternating buffers).

    Mirrors ``ll::make_layout`` in ``csrc/kernels/internode_ll.cu`` (tests/test_low_latency.py checks
    that the two agree): a signal area, then two buffers, each holding the dispatch receive slots
    (one message per source rank and token: a 128-byte header plus the token at its widest, bf16),
    the dispatch send staging, the dispatch's delivery flags (one per source rank and sending
    block, and one per source rank for its counts), the combine receive slots (max(16, ranks) per
    token), the combine send rows, the top-k weights, a staging area and the dispatch's
    per-(rank, expert) token counts (received, and staged for puts).
    """
    for name, v in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank),
                    ("hidden", hidden), ("num_ranks", num_ranks), ("num_experts", num_experts)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    page = 4096
    m, h, r = num_max_dispatch_tokens_per_rank, hidden, num_ranks
    num_local = num_experts // num_ranks
    msg_bytes = _align(_LL_HEADER_BYTES + h * 2, 16)
    signal_bytes = _align(2 * 3 * r * 8, page)
    combine_slots_per_token = max(MAX_TOPK, r)
    offset = _align(r * m * msg_bytes, page)                                 # dispatch receive
    offset = _align(offset + m * msg_bytes, page)                            # dispatch send
    offset = _align(offset + r * (_LL_MAX_BLOCKS + 1) * 8, page)             # dispatch flags
    offset = _align(offset + m * combine_slots_per_token * h * 2, page)      # combine receive
    offset = _align(offset + num_local * r * m * h * 2, page)                # combine send
    offset = _align(offset + r * m * MAX_TOPK * 8, page)                     # weights (tagged words)
    offset = _align(offset + r * m * h * 2, page)                            # staging
    buffer_bytes = _align(offset + 2 * r * num_local * 4, page)              # dispatch counts
    return signal_bytes + 2 * buffer_bytes
