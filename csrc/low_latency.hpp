// The low-latency runtime: NVSHMEM bootstrap from a unique id, the symmetric allocation of
// num_rdma_bytes holding two alternating buffers, kernel launches, shrink-mode masks, finalize.
#pragma once

#include <pybind11/pybind11.h>
#include <torch/types.h>

#include <optional>
#include <string>
#include <tuple>

#include "kernels/internode_ll_api.cuh"

namespace deep_ep {

class LowLatencyRuntime {
public:
    // Collective over all ranks: initializes NVSHMEM with `unique_id` (from rank 0's
    // get_unique_id), allocates `num_rdma_bytes` of symmetric memory and maps the peers.
    LowLatencyRuntime(int rank, int num_ranks, const std::string& unique_id, int64_t num_rdma_bytes,
                      bool allow_nvlink, bool enable_shrink, double timeout_s);
    ~LowLatencyRuntime();

    static pybind11::bytes get_unique_id();

    // Launches the dispatch phases (kPhaseSend | kPhaseRecv) on the current stream.
    void dispatch(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& recv_x,
                  const std::optional<torch::Tensor>& recv_scales, const torch::Tensor& recv_count,
                  const torch::Tensor& src_info, const torch::Tensor& layout_range, const torch::Tensor& slot_rows,
                  const std::optional<torch::Tensor>& cumulative_recv_stats,
                  const std::optional<torch::Tensor>& wait_recv_cost_stats, int num_max_tokens, int num_experts,
                  int buffer_idx, bool use_fp8, bool round_scale, bool use_ue8m0, int phases);

    // The tensors one dispatch writes, allocated here (from Python each allocation costs several
    // microseconds of host time per call): recv_x (FP8 or bf16) [num_local, num_ranks * M, hidden],
    // recv_scales (FP8 only: fp32 [.., hidden / 128], or int32 [.., hidden / 512] with ue8m0),
    // recv_count [num_local], src_info [num_local, num_ranks * M], layout_range (int64)
    // [num_local, num_ranks], slot_rows [num_ranks * M, kMaxTopk].
    std::tuple<torch::Tensor, std::optional<torch::Tensor>, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
    dispatch_outputs(int num_max_tokens, int hidden, int num_experts, bool use_fp8, bool use_ue8m0) const;

    // Launches the combine phases on the current stream. `x` may be empty with zero_copy.
    void combine(const std::optional<torch::Tensor>& x, const torch::Tensor& topk_idx,
                 const torch::Tensor& topk_weights, const torch::Tensor& src_info, const torch::Tensor& recv_count,
                 const torch::Tensor& slot_rows, const torch::Tensor& out,
                 const std::optional<torch::Tensor>& wait_recv_cost_stats, int num_max_tokens, int hidden,
                 int num_experts, int buffer_idx, bool zero_copy, bool reduced, int phases);

    // Collective: resets counters, call numbers and slot tags of both buffers.
    void clean(int num_max_tokens, int hidden, int num_experts);
    // Collective: a device-side barrier of all ranks on the current stream (ll::launch_rank_barrier):
    // the ranks leave it within about one NVLink latency of each other, where NCCL's all-reduce or
    // NVSHMEM's barrier leave microseconds between them. Benchmarks line up kernel starts with it.
    void barrier();

    // bf16 [num_local_experts, num_ranks * num_max_tokens, hidden] view of a buffer's combine area.
    torch::Tensor combine_buffer(int buffer_idx, int num_max_tokens, int hidden, int num_experts);
    // uint8 view of the whole symmetric allocation.
    torch::Tensor rdma_buffer();

    void update_mask(int rank_to_mask, bool mask);
    void query_mask(const torch::Tensor& mask_status);
    void clean_mask();

    // None when no kernel reported a timeout, else (rank, kernel name, peer, counter seen,
    // expected, waited ns) of the first one; the Python layer words the message. A copy-engine
    // sending block's delivery flag comes decoded: seen / expected as call numbers, the tokens in
    // the kernel name.
    std::optional<std::tuple<int, std::string, int, int64_t, int64_t, int64_t>> error_record() const;
    void set_timeout(double timeout_s);
    bool is_direct_peer(int pe) const;
    static int64_t required_bytes(int num_max_tokens, int hidden, int num_ranks, int num_experts);
    void destroy();

private:
    ll::Context context(int num_max_tokens, int hidden, int num_experts);
    // The context without a layout (calls that touch no buffer: the rank barrier).
    ll::Context base_context() const;
    // Launches `kernel` (ll::launch_dispatch or ll::launch_combine) on this runtime's device and
    // current stream, with the buffers laid out for the shape in `args`.
    template <typename Args>
    void launch(const Args& args, int buffer_idx,
                cudaError_t (*kernel)(const ll::Context&, const ll::Layout&, int, const Args&, cudaStream_t));
    void ensure_layout(int num_max_tokens, int hidden, int num_experts);

    int rank_, num_ranks_;
    int64_t num_rdma_bytes_;
    bool enable_shrink_;
    bool destroyed_ = false;
    bool any_remote_ = false;
    unsigned long long timeout_ns_;
    int device_ = 0;
    void* heap_ = nullptr;
    unsigned long long* barrier_flags_ = nullptr;  // symmetric [2 rounds][num_ranks], see barrier()
    unsigned long long barrier_calls_ = 0;
    unsigned long long* peer_bases_ = nullptr;  // device
    ll::BufferState* state_ = nullptr;          // device [2][kMaxBlocks]
    int* mask_ = nullptr;                       // device [num_ranks]
    ll::ErrorRecord* error_host_ = nullptr;     // host-mapped
    ll::ErrorRecord* error_device_ = nullptr;
    std::vector<unsigned long long> host_peer_bases_;
    std::tuple<int, int, int> layout_key_{-1, -1, -1};
};

// Registers LowLatencyRuntime and the low-latency helpers on the extension module.
void register_low_latency(pybind11::module_& m);

}  // namespace deep_ep
