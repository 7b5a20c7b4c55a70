// The runtime of the intranode kernels: one NVLink buffer per rank, mapped by every peer through
// CUDA IPC; host-mapped counters and error record; kernel launches on the current stream. The
// *_on_comm_stream calls and cached_dispatch (the Buffer calls of the cuda backend) switch to the
// comm stream and allocate their outputs here (CommFrame, comm_frame.hpp); the internode path
// drives notify_dispatch / dispatch / combine from Python on its own comm stream.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <pybind11/pybind11.h>
#include <torch/types.h>

#include "comm_frame.hpp"
#include "error_record.hpp"
#include "event.hpp"
#include "kernels/api.cuh"

namespace deep_ep {

class Buffer {
public:
    // Allocates `num_nvl_bytes` on the current device (collective across the group in the sense
    // that every rank must then exchange handles and call sync()).
    Buffer(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s);
    ~Buffer() noexcept;

    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;

    int get_rank() const { return rank_; }
    int get_num_ranks() const { return num_ranks_; }
    int64_t get_num_nvl_bytes() const { return num_nvl_bytes_; }
    bool is_available() const { return available_; }

    pybind11::bytes get_local_ipc_handle() const;
    // Maps every peer's buffer; `handles[r]` is rank r's IPC handle (ours included).
    void sync(const std::vector<std::string>& handles);

    // uint8 view of this rank's own buffer, bytes [offset, offset + num_bytes).
    torch::Tensor get_local_buffer_tensor(int64_t offset, int64_t num_bytes) const;

    void get_dispatch_layout(const torch::Tensor& topk_idx, int num_experts, const torch::Tensor& num_tokens_per_rank,
                             const torch::Tensor& num_tokens_per_expert, const torch::Tensor& is_token_in_rank);

    // Launches the count exchange. With `write_host`, wait_notify() then returns the counts. With
    // `check_is_token_in_rank` (and optionally `check_topk_idx`), a kernel first checks the
    // dispatch's layout values (DESIGN.md §5) and wait_notify() reports the outcome.
    void notify_dispatch(const torch::Tensor& num_tokens_per_rank, const torch::Tensor& num_tokens_per_expert,
                         int num_tokens, int expert_alignment, const torch::Tensor& recv_rank_prefix,
                         const torch::Tensor& recv_src_num_tokens, bool write_host,
                         const std::optional<torch::Tensor>& check_topk_idx,
                         const std::optional<torch::Tensor>& check_is_token_in_rank);
    // Host wait for the counts of the last notify_dispatch(write_host=true). Returns
    // (ok, total received rows, aligned per-local-expert counts, value-check flags: kCheckBad*);
    // ok is false on a device error or after the host timeout (the caller then reads get_error()).
    std::tuple<bool, int, std::vector<int>, int> wait_notify(int num_local_experts);

    // row_segments (optional, int32 [2, num_ranks * S], S <= 32): the row map of DispatchArgs
    // (row [0]: run ends, row [1]: deltas, runs of source s at [s * S, (s + 1) * S)); combine
    // takes the same map as the dispatch whose handle it uses.
    void dispatch(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                  const std::optional<torch::Tensor>& topk_idx, const std::optional<torch::Tensor>& topk_weights,
                  const torch::Tensor& is_token_in_rank, const torch::Tensor& recv_rank_prefix,
                  const torch::Tensor& recv_x, const std::optional<torch::Tensor>& recv_x_scales,
                  const std::optional<torch::Tensor>& recv_topk_idx,
                  const std::optional<torch::Tensor>& recv_topk_weights, const torch::Tensor& recv_src_idx,
                  int num_experts, bool fill_padding, int num_sms, int send_chunk, int ring_capacity,
                  const std::optional<torch::Tensor>& row_segments);

    void combine(const torch::Tensor& x, const std::optional<torch::Tensor>& topk_weights,
                 const std::optional<torch::Tensor>& bias0, const std::optional<torch::Tensor>& bias1,
                 const torch::Tensor& is_token_in_rank, const torch::Tensor& recv_src_idx,
                 const torch::Tensor& recv_rank_prefix, const torch::Tensor& recv_src_num_tokens,
                 const torch::Tensor& combined_x, const std::optional<torch::Tensor>& combined_topk_weights,
                 int num_sms, int send_chunk, int ring_capacity, const std::optional<torch::Tensor>& row_segments);

    // The comm stream (a torch.cuda.Stream's stream_id, device_index, device_type) of the calls
    // below that run under a CommFrame (comm_frame.hpp).
    void set_comm_stream(int64_t stream_id, int64_t device_index, int64_t device_type);
    // get_dispatch_layout() as one call under a CommFrame: allocates its three outputs on the comm
    // stream. Returns (num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, the event if
    // async_finish).
    std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, std::optional<EventHandle>> dispatch_layout_on_comm_stream(
        const torch::Tensor& topk_idx, int num_experts, bool wait_compute, bool async_finish);
    // A dispatch with a layout (not cached) as one call under a CommFrame: the count exchange
    // (notify_dispatch, with the layout value checks unless num_worst_tokens > 0), the host wait
    // for the counts (none with num_worst_tokens > 0: then num_worst_tokens rows), the outputs
    // allocated on the comm stream, the dispatch. Returns
    // (status, check flags, received rows (-1 with num_worst_tokens), per-local-expert counts,
    //  recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, recv_rank_prefix,
    //  recv_src_num_tokens, the event if async_finish); status kDispatchOk, kDispatchWaitFailed
    // (a kernel recorded a failure or the host wait timed out: nothing else ran) or
    // kDispatchBadLayout (the value checks failed, see the flags: nothing was dispatched).
    using DispatchResult =
        std::tuple<int, int, int, std::vector<int>, torch::Tensor, std::optional<torch::Tensor>,
                   std::optional<torch::Tensor>, std::optional<torch::Tensor>, torch::Tensor, torch::Tensor,
                   torch::Tensor, std::optional<EventHandle>>;
    static constexpr int kDispatchOk = 0, kDispatchWaitFailed = 1, kDispatchBadLayout = 2;
    DispatchResult dispatch_on_comm_stream(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                                           const std::optional<torch::Tensor>& topk_idx,
                                           const std::optional<torch::Tensor>& topk_weights,
                                           const torch::Tensor& num_tokens_per_rank,
                                           const torch::Tensor& num_tokens_per_expert,
                                           const torch::Tensor& is_token_in_rank, int expert_alignment,
                                           int num_worst_tokens, int num_sms, int send_chunk, int ring_capacity,
                                           bool wait_compute, bool async_finish);
    // A cached dispatch (a handle's layout: no top-k) as one call under a CommFrame: allocates
    // recv_x [num_rows, hidden] (and the FP8 scales) on the comm stream and dispatches there.
    // Returns (recv_x, recv_x_scales, the call's event if async_finish).
    std::tuple<torch::Tensor, std::optional<torch::Tensor>, std::optional<EventHandle>> cached_dispatch(
        const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales, const torch::Tensor& is_token_in_rank,
        const torch::Tensor& recv_rank_prefix, int64_t num_rows, int num_experts, bool fill_padding, int num_sms,
        int send_chunk, int ring_capacity, bool wait_compute, bool async_finish);
    // combine() as one call under a CommFrame: allocates combined_x [num_tokens, hidden] (and the
    // combined top-k weights) on the comm stream. Returns them and the event if async_finish.
    std::tuple<torch::Tensor, std::optional<torch::Tensor>, std::optional<EventHandle>> combine_on_comm_stream(
        const torch::Tensor& x, const std::optional<torch::Tensor>& topk_weights,
        const std::optional<torch::Tensor>& bias0, const std::optional<torch::Tensor>& bias1,
        const torch::Tensor& is_token_in_rank, const torch::Tensor& recv_src_idx, const torch::Tensor& recv_rank_prefix,
        const torch::Tensor& recv_src_num_tokens, int64_t num_tokens, int num_sms, int send_chunk, int ring_capacity,
        bool wait_compute, bool async_finish);
    // A cross-rank barrier on the current stream.
    void barrier();

    // The first failure recorded by any kernel of this rank, or None:
    // (code, kernel, rank, peer, target, channel, value_seen, expected).
    std::optional<ErrorRecordTuple> get_error() const;

    // Closes peer mappings and frees memory. With `leak_memory` (after a failure, when a peer
    // may still write into our buffer) the device buffer is left allocated.
    void destroy(bool leak_memory);

private:
    RingGeometry make_ring(int num_sms, int send_chunk, int ring_capacity, int slot_bytes,
                           int min_slots_per_sub_ring) const;
    FailureContext failure_context() const;
    // A CommFrame on the comm stream (set_comm_stream).
    CommFrame comm_frame(bool wait_compute) const;
    // A dispatch's outputs for `rows` rows: x's dtype and width, the FP8 scales with x_scales, the
    // top-k ids and weights with topk_idx, the source indices.
    struct DispatchRows {
        torch::Tensor x;
        std::optional<torch::Tensor> x_scales, topk_idx, topk_weights;
        torch::Tensor src_idx;
    };
    static DispatchRows empty_dispatch_rows(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                                            const std::optional<torch::Tensor>& topk_idx, int64_t rows);
    int warps_per_peer() const;
    void check_usable() const;

    int rank_, num_ranks_, device_;
    int64_t num_nvl_bytes_;
    uint64_t timeout_ns_;
    bool available_ = false;
    bool destroyed_ = false;
    uint8_t* local_buffer_ = nullptr;
    PeerBuffers peers_{};
    ErrorRecord* error_host_ = nullptr;   // host view of the host-mapped record
    ErrorRecord* error_device_ = nullptr; // device view of it
    int* counters_host_ = nullptr;        // host-mapped notify results
    int* counters_device_ = nullptr;
    std::optional<at::cuda::CUDAStream> comm_stream_;
};

}  // namespace deep_ep
