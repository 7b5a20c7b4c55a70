// The runtime of the internode high-throughput path: the NVSHMEM symmetric allocation of the rail
// legs (the NVLink leg runs on a node-local deep_ep::Buffer, composed on the Python side), device
// state, host-mapped counters and error record, and the launches of internode.cu on the current
// stream. NVSHMEM is initialized here only when no low-latency runtime of this process did it
// already (one NVSHMEM initialization per process).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <pybind11/pybind11.h>
#include <torch/types.h>

#include "error_record.hpp"
#include "kernels/api.cuh"

namespace deep_ep {

class InternodeRuntime {
public:
    // Collective over all ranks. With a non-empty `unique_id` (from get_unique_id() on rank 0)
    // NVSHMEM is initialized here and finalized by destroy(); with an empty one it must already be
    // initialized in this process (by the low-latency runtime). Allocates `num_rdma_bytes` of
    // symmetric memory either way.
    InternodeRuntime(int rank, int num_ranks, int nvl_domain_size, const std::string& unique_id,
                     int64_t num_rdma_bytes, double timeout_s);
    ~InternodeRuntime() noexcept;

    InternodeRuntime(const InternodeRuntime&) = delete;
    InternodeRuntime& operator=(const InternodeRuntime&) = delete;

    static pybind11::bytes get_unique_id();

    // Layout over all ranks (num_tokens_per_rdma_rank is derived on the Python side).
    void get_dispatch_layout(const torch::Tensor& topk_idx, int num_experts, const torch::Tensor& num_tokens_per_rank,
                             const torch::Tensor& num_tokens_per_expert, const torch::Tensor& is_token_in_rank);

    // Count exchange over all ranks. With `write_host`, wait_notify() then returns the counts.
    void notify(const torch::Tensor& num_tokens_per_rank, const torch::Tensor& num_tokens_per_expert,
                const torch::Tensor& is_token_in_rank, int expert_alignment, const torch::Tensor& recv_from_rank,
                const torch::Tensor& recv_rank_prefix, const torch::Tensor& rail_prefix,
                const torch::Tensor& rail_src_num_tokens, const torch::Tensor& forward_counts, bool write_host);
    // (ok, received rows, staged rows, aligned per-local-expert counts); ok is false on a device
    // error or after the host timeout.
    std::tuple<bool, int, int, std::vector<int>> wait_notify(int num_local_experts);

    void rail_dispatch(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                       const std::optional<torch::Tensor>& topk_idx, const std::optional<torch::Tensor>& topk_weights,
                       const torch::Tensor& is_token_in_rank, const torch::Tensor& rail_prefix,
                       const torch::Tensor& staging_x, const std::optional<torch::Tensor>& staging_scales,
                       const std::optional<torch::Tensor>& staging_topk_idx,
                       const std::optional<torch::Tensor>& staging_topk_weights, const torch::Tensor& staging_src_token,
                       const torch::Tensor& forward_in_rank, int num_experts, int num_sms, int send_chunk,
                       int ring_capacity);

    void rail_combine(const torch::Tensor& partial, const std::optional<torch::Tensor>& partial_weights,
                      const torch::Tensor& rail_prefix, const torch::Tensor& rail_src_num_tokens,
                      const torch::Tensor& staging_src_token, const torch::Tensor& is_token_in_rank,
                      const std::optional<torch::Tensor>& bias0, const std::optional<torch::Tensor>& bias1,
                      const torch::Tensor& combined_x, const std::optional<torch::Tensor>& combined_topk_weights,
                      int num_sms, int send_chunk, int ring_capacity);

    // (code, kernel, rank, peer, target, channel, value_seen, expected) of the first failure, or None.
    std::optional<ErrorRecordTuple> get_error() const;

    // Frees the symmetric memory (collective) and finalizes NVSHMEM if this runtime initialized it.
    // With `failed` (a peer may be stuck or still writing) nothing collective is attempted.
    void destroy(bool failed);

private:
    internode::Context context() const;
    void check_usable() const;

    int rank_, num_ranks_, nvl_size_, num_nodes_;
    int64_t num_rdma_bytes_;
    uint64_t timeout_ns_;
    int device_ = 0;
    bool owns_nvshmem_ = false;
    bool destroyed_ = false;
    uint8_t* heap_ = nullptr;
    internode::Layout layout_{};
    internode::State* state_ = nullptr;  // device
    int* abort_flag_ = nullptr;          // device
    ErrorRecord* error_host_ = nullptr;
    ErrorRecord* error_device_ = nullptr;
    int* counters_host_ = nullptr;
    int* counters_device_ = nullptr;
};

// Registers InternodeRuntime on the extension module.
void register_internode(pybind11::module_& m);

}  // namespace deep_ep
