// The one list of kernel launchers the runtime may call, with their argument structs.
// Plain pointers and sizes only: no torch type crosses this line.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "buffer.cuh"
#include "exception.cuh"
// The low-latency launchers (namespace deep_ep::ll) live in their own header; listed here so that
// this file stays the one index of every launcher.
#include "internode_ll_api.cuh"
// The internode high-throughput launchers (namespace deep_ep::internode).
#include "internode_api.cuh"

namespace deep_ep {

// Warps per block of the dispatch and combine kernels (one block per SM).
constexpr int kIntranodeWarps = 24;

// ---------------------------------------------------------------- layout.cu
struct LayoutArgs {
    const int64_t* topk_idx;     // [num_tokens, num_topk]
    int num_tokens, num_topk, num_experts, num_ranks;
    int* num_tokens_per_rank;    // [num_ranks], written
    int* num_tokens_per_expert;  // [num_experts], written
    bool* is_token_in_rank;      // [num_tokens, num_ranks], written
};
void launch_get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream);

// The value checks of a non-cached dispatch (DESIGN.md §5), done on the device so that the host
// learns the outcome together with the receive counts it waits for anyway: no extra host sync.
// Accumulates into `scratch` ([0] flags, [1 + r] column sums of is_token_in_rank); the notify
// kernel that follows on the stream compares the sums, publishes the flags and zeroes `scratch`.
constexpr int kCheckBadTopk = 1;    // a top-k id outside [-1, num_experts)
constexpr int kCheckBadCounts = 2;  // num_tokens_per_rank differs from the column sums of is_token_in_rank
constexpr int kCheckScratchInts = 1 + kMaxRanks;
struct DispatchCheckArgs {
    const int64_t* topk_idx;        // [num_tokens, num_topk], or nullptr
    const bool* is_token_in_rank;   // [num_tokens, num_ranks]
    int num_tokens, num_topk, num_experts, num_ranks;
    int* scratch;                   // [kCheckScratchInts], zero on entry
};
void launch_check_dispatch_values(const DispatchCheckArgs& args, cudaStream_t stream);

// ---------------------------------------------------------------- runtime.cu
void launch_intranode_barrier(const PeerBuffers& buffers, int rank, int num_ranks, const FailureContext& fail,
                              cudaStream_t stream);

// ---------------------------------------------------------------- intranode.cu
struct NotifyArgs {
    const int* num_tokens_per_rank;    // [num_ranks]
    const int* num_tokens_per_expert;  // [num_experts]
    int num_tokens, num_experts, expert_alignment;
    int rank, num_ranks;
    PeerBuffers buffers;
    int* recv_rank_prefix;     // [num_ranks + 1], written: first received row of each source, then the total
    int* recv_src_num_tokens;  // [num_ranks], written: each source's num_tokens (combine's channel split)
    int* host_counters;        // host-mapped, kHostCounterInts: see the kHostCounter* indices
    bool write_host;
    int* check_scratch;        // launch_check_dispatch_values' result to publish (needs write_host), or nullptr
    FailureContext fail;
};
// Indices into NotifyArgs::host_counters: the ready flag, the total rows, the value-check flags,
// then the aligned count of each local expert.
constexpr int kHostCounterReady = 0, kHostCounterRows = 1, kHostCounterChecks = 2, kHostCounterExperts = 3;
constexpr int kHostCounterInts = kHostCounterExperts + kMaxLocalExperts;
void launch_notify_dispatch(const NotifyArgs& args, cudaStream_t stream);

// Byte offsets inside one dispatch ring slot; hidden data comes first.
struct DispatchSlot {
    int scales_offset, topk_idx_offset, topk_weights_offset, src_idx_offset, bytes;
};
DispatchSlot make_dispatch_slot(int hidden_bytes, int num_scales, int num_topk);

struct DispatchArgs {
    const uint8_t* x;  // [num_tokens, hidden_bytes]
    const float* x_scales;  // nullable; element (t, g) at t * scale_token_stride + g * scale_hidden_stride
    int64_t scale_token_stride, scale_hidden_stride;
    int num_scales;
    const int64_t* topk_idx;     // nullable, [num_tokens, num_topk]
    const float* topk_weights;   // nullable, [num_tokens, num_topk]
    int num_topk;
    const bool* is_token_in_rank;  // [num_tokens, num_ranks]
    int num_tokens, hidden_bytes;
    const int* recv_rank_prefix;   // [num_ranks + 1]
    uint8_t* recv_x;               // [num_recv_rows, hidden_bytes]
    float* recv_x_scales;          // nullable, [num_recv_rows, num_scales]
    int64_t* recv_topk_idx;        // nullable, [num_recv_rows, num_topk]
    float* recv_topk_weights;      // nullable, [num_recv_rows, num_topk]
    int* recv_src_idx;             // [num_recv_rows]
    int num_recv_rows;             // rows allocated (guards every write)
    bool fill_padding;             // num_worst_tokens: rows past the real count get zeros / -1
    // Optional row map (nullptr: none; the internode path uses it to write its rows straight in
    // the contract's order). The received rows of source s form num_row_segments runs (at most
    // 32); run j ends (exclusive) at row_segment_end[s * num_row_segments + j], ascending in j,
    // and a row r of it is written to row r + row_segment_delta[same index]. recv_src_idx stays
    // at r; rows past a source's last run (padding) stay where they are.
    const int* row_segment_end;
    const int* row_segment_delta;
    int num_row_segments;
    int num_experts, rank, num_ranks;
    DispatchSlot slot;
    RingGeometry ring;
    PeerBuffers buffers;
    FailureContext fail;
};
void launch_intranode_dispatch(const DispatchArgs& args, cudaStream_t stream);

struct CombineArgs {
    const uint8_t* x;            // [>= received rows, hidden] bf16, the rows this rank received
    const float* topk_weights;   // nullable, [>= received rows, num_topk]
    int num_topk;
    const uint8_t* bias0;        // nullable, [num_tokens, hidden] bf16
    const uint8_t* bias1;        // nullable
    const bool* is_token_in_rank;   // [num_tokens, num_ranks] of this (home) rank
    const int* recv_src_idx;        // [received rows]
    const int* recv_rank_prefix;    // [num_ranks + 1]
    const int* recv_src_num_tokens; // [num_ranks]
    int num_tokens, hidden;
    uint8_t* combined_x;         // [num_tokens, hidden] bf16
    float* combined_topk_weights;  // nullable, [num_tokens, num_topk]
    int weights_offset;          // byte offset of the weights in a slot
    // Optional row map of the dispatch (DispatchArgs::row_segment_end): received row r of x and
    // topk_weights is read at r + delta of its run (recv_src_idx is indexed by r).
    const int* row_segment_end;
    const int* row_segment_delta;
    int num_row_segments;
    int rank, num_ranks;
    RingGeometry ring;
    PeerBuffers buffers;
    FailureContext fail;
};
void launch_intranode_combine(const CombineArgs& args, cudaStream_t stream);

// Development trace of the intranode dispatch (0) and combine (1) kernels (warp_trace.cuh;
// tests/test_intranode.py --bench with DEEP_EP_INTRANODE_TRACE=1 on a KERNEL_TRACE=1 build):
// zeroes it and turns it on or off; copies it out ([2][2 * kMaxChannels blocks][kWarpTraceSlots]
// SM cycles) with the SM clock. Current device.
cudaError_t intranode_trace_reset(bool enable);
cudaError_t intranode_trace_read(unsigned long long* cycles, int* clock_khz);

}  // namespace deep_ep
