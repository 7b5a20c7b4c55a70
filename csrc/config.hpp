// Config: the performance knobs of the high-throughput kernels, and the buffer sizes they imply.
// Mirrors deep_ep/config.py (the Python class is what Buffer uses; this one serves C++ callers).
#pragma once

#include <cstdint>
#include <stdexcept>

namespace deep_ep {

struct Config {
    int num_sms;
    int num_max_nvl_chunked_send_tokens;
    int num_max_nvl_chunked_recv_tokens;
    int num_max_rdma_chunked_send_tokens;
    int num_max_rdma_chunked_recv_tokens;

    Config(int num_sms = 20, int nvl_send = 6, int nvl_recv = 256, int rdma_send = 6, int rdma_recv = 256)
        : num_sms(num_sms),
          num_max_nvl_chunked_send_tokens(nvl_send),
          num_max_nvl_chunked_recv_tokens(nvl_recv),
          num_max_rdma_chunked_send_tokens(rdma_send),
          num_max_rdma_chunked_recv_tokens(rdma_recv) {
        if (num_sms <= 0 || num_sms % 2 != 0)
            throw std::invalid_argument("Config: num_sms must be a positive even number");
        if (nvl_send <= 0 || nvl_recv <= 0 || rdma_send <= 0 || rdma_recv <= 0)
            throw std::invalid_argument("Config: chunk sizes must be positive");
    }

    // Same rule as deep_ep/config.py: a slot holds the hidden data, FP8 scales and up to 16
    // top-k entries; rings per (channel, rank); 1 MiB of control space.
    static int64_t slot_bytes(int64_t hidden_bytes) {
        const int64_t meta = 16 * (8 + 4) + 16;
        return (hidden_bytes + hidden_bytes / 64 + meta + 15) / 16 * 16;
    }

    int64_t get_nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const {
        const int64_t channels = num_sms / 2;
        const int64_t rings = channels * num_ranks * num_max_nvl_chunked_recv_tokens * slot_bytes(hidden_bytes);
        const int64_t counters = channels * num_ranks * 4 * 8 + static_cast<int64_t>(num_ranks) * (num_ranks + 256) * 4 * 2;
        const int64_t total = rings + counters + (1 << 20);
        return (total + 127) / 128 * 128;
    }

    int64_t get_rdma_buffer_size_hint(int64_t hidden_bytes, int num_ranks) const {
        const int64_t channels = num_sms / 2;
        const int64_t rings = 2 * channels * num_ranks * num_max_rdma_chunked_recv_tokens * slot_bytes(hidden_bytes);
        const int64_t total = rings + channels * num_ranks * 64 + (1 << 20);
        return (total + 127) / 128 * 128;
    }
};

}  // namespace deep_ep
