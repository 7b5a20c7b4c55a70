// Launchers of the internode high-throughput path (internode.cu): the count exchange over all
// ranks and the two "rail" legs between ranks of the same local index on different nodes. The
// NVLink leg inside a node runs on the intranode kernels (intranode.cu); the runtime
// (csrc/internode.cpp) composes the legs. Plain pointers and sizes only: no torch type here.
//
// Symmetric memory (one NVSHMEM allocation of num_rdma_bytes per rank, same layout everywhere):
//
//   [signals]  notify arrival counters [2 parities] (uint64), rail tails and heads [kind][channel][ring] (uint64)
//   [notify]   receive slots [2 parities][num_ranks][kNotifyInts], send slots [num_ranks][kNotifyInts]
//   [rings]    per kind (dispatch, combine) one half of the rest: receive rings
//              [channel][ring][capacity][slot], then send staging [channel][ring][capacity][slot]
//              (ring = sub-stream * (nodes - 1) + peer node among the others, see RailGeometry; the send
//              staging is used only for peers that nvshmem_ptr cannot reach: P2P peers get
//              their slots stored straight into their receive ring)
//
// Ring positions are running totals kept in device memory (State), so nothing is reset between
// calls and a replayed CUDA graph continues them. Before writing into a ring a sender waits until
// the previous call's data there has been consumed, so geometry may change between calls.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "exception.cuh"
#include "warp_trace.cuh"

namespace deep_ep {
namespace internode {

constexpr int kMaxNodes = 24;          // rail rings per channel, and nodes (one warp each at least)
constexpr int kMaxNodeRanks = 8;       // ranks of one NVLink domain (intranode kMaxRanks)
constexpr int kMaxChannels = 64;
constexpr int kMaxLocalExperts = 1024;
constexpr int kMaxTopk = 32;
// One notify message: [tokens to the receiver, sender's num_tokens, sender's tokens for the
// receiver's node, sender's tokens for each rank of the receiver's node, per receiver-local expert].
constexpr int kNotifyInts = 3 + kMaxNodeRanks + kMaxLocalExperts;
constexpr int kHostCounterInts = 3 + kMaxLocalExperts;  // [ready, rows, staging rows, per local expert]
constexpr int kRailWarps = 24;

// Kernel and wait-target ids in the shared ErrorRecord, continuing exception.cuh's lists (names
// in deep_ep/cuda_internode.py).
enum : int32_t { kKernelInternodeNotify = 5, kKernelRailDispatch = 6, kKernelRailCombine = 7 };
enum : int32_t {
    kWaitNotifyCounts = 7,   // every rank's counts of this call
    kWaitRailTail = 8,       // ring data a rail peer has not delivered yet
    kWaitRailHead = 9,       // free ring slots a rail peer has not released yet
    kWaitStagingRows = 10,   // (overflow) more forwarded tokens than the staging area holds
};

enum RailKind : int { kRailDispatch = 0, kRailCombine = 1 };
enum RailSignal : int { kRailTail = 0, kRailHead = 1 };

// Running ring totals and the notify call number, in ordinary device memory of this rank.
struct State {
    unsigned long long notify_seq;
    unsigned long long sent[2][kMaxChannels][kMaxNodes];      // [kind][channel][ring], sender side
    unsigned long long received[2][kMaxChannels][kMaxNodes];  // [kind][channel][ring], receiver side
};

// Development trace of the rail kernels (warp_trace.cuh; tests/test_internode.py with
// DEEP_EP_RAIL_TRACE=1 on a KERNEL_TRACE=1 build): zeroes it and turns it on or off; copies it out
// ([2 kinds][2 * kMaxChannels blocks][kWarpTraceSlots] SM cycles) with the SM clock. Current device.
cudaError_t rail_trace_reset(bool enable);
cudaError_t rail_trace_read(unsigned long long* cycles, int* clock_khz);

struct Layout {
    size_t notify_signal_offset;  // uint64 [2 parities]
    size_t rail_signal_offset;    // uint64 [2 kinds][2 signals][kMaxChannels][kMaxNodes]
    size_t notify_recv_offset;    // int [2][num_ranks][kNotifyInts]
    size_t notify_send_offset;    // int [num_ranks][kNotifyInts]
    size_t data_offset;           // rings of both kinds
    size_t kind_bytes;            // bytes of rings per kind
    size_t total_bytes;
};
// Throws std::invalid_argument if `total_bytes` cannot hold the control area.
Layout make_layout(int num_ranks, size_t total_bytes);

// Each (channel, peer node) stream is split into `subs` sub-streams, one per warp pair (sender
// warp, receiver warp), each with its own ring, tail, head and running totals: a rank's rail
// traffic then moves with every warp of the channel's blocks instead of one warp per peer. Ring
// ids inside a channel: the sub-stream times (num_nodes - 1), plus the peer's index among the
// other nodes (node ids skipping one's own). Both ranks of a rail compute the same geometry.
struct RailGeometry {
    int kind;
    int num_channels;
    int subs;           // sub-streams per (channel, peer node)
    int rings;          // rings per channel: (num_nodes - 1) * subs, at most kRailWarps
    int capacity;       // slots per ring (one sub-stream)
    int slot_bytes;     // multiple of 128
    int publish_every;  // tokens between two tail (or head) updates
    size_t recv_offset;  // heap offsets of this kind's receive rings and send staging
    size_t send_offset;
};
// The rings of one call; throws std::invalid_argument (with the bytes needed) if not even the
// minimum of slots per ring fits with one sub-stream per peer. `ring_capacity` is the config's
// slots per (channel, peer node), shared by its sub-streams.
RailGeometry make_rail_geometry(const Layout& layout, int kind, int num_nodes, int num_sms, int send_chunk,
                                int ring_capacity, int slot_bytes);

// Byte offsets inside one dispatch ring slot (hidden data first).
struct DispatchSlot {
    int scales_offset, topk_idx_offset, topk_weights_offset, meta_offset, bytes;
};
DispatchSlot make_dispatch_slot(int hidden_bytes, int num_scales, int num_topk);
// Combine slot: bf16 row, then the top-k weights; whole 128-byte lines.
__host__ __device__ inline int combine_weights_offset(int hidden) { return (hidden * 2 + 15) / 16 * 16; }
__host__ __device__ inline int combine_slot_bytes(int hidden, int num_topk) {
    return (combine_weights_offset(hidden) + num_topk * 4 + 127) / 128 * 128;
}

struct Context {
    int rank, num_ranks, nvl_size, num_nodes, node, local_rank;
    uint8_t* heap;  // this rank's address of the symmetric allocation
    Layout layout;
    State* state;
    FailureContext fail;
};

struct NotifyArgs {
    const int* num_tokens_per_rank;    // [R]
    const int* num_tokens_per_expert;  // [E]
    const bool* is_token_in_rank;      // [T, R]
    int num_tokens, num_experts, expert_alignment;
    int* recv_from_rank;       // [R], written: rows this rank receives from each source
    int* recv_rank_prefix;     // [R + 1], written: first output row of each source, then the total
    int* rail_prefix;          // [N + 1], written: first staging row of each source node, then the total
    int* rail_src_num_tokens;  // [N], written: num_tokens of the rail peer on each node
    int* forward_counts;       // [L], written: staged tokens this rank forwards to each rank of its node
    int* host_counters;        // nullable, host-mapped [kHostCounterInts]
};
void launch_notify(const Context& ctx, const NotifyArgs& args, cudaStream_t stream);

struct RailDispatchArgs {
    const uint8_t* x;  // [T, hidden_bytes]
    int hidden_bytes;
    const float* x_scales;  // nullable; (t, g) at t * scale_token_stride + g * scale_hidden_stride
    int64_t scale_token_stride, scale_hidden_stride;
    int num_scales;
    const int64_t* topk_idx;    // nullable [T, K]
    const float* topk_weights;  // nullable [T, K]
    int num_topk;
    const bool* is_token_in_rank;  // [T, R]
    int num_tokens, num_experts;
    const int* rail_prefix;  // [N + 1]
    // Staging of the tokens this rank forwards inside its node, ordered by source node, then token.
    uint8_t* staging_x;            // [staging_rows, hidden_bytes]
    float* staging_scales;         // nullable [staging_rows, num_scales]
    int64_t* staging_topk_idx;     // nullable [staging_rows, K]: node-relative expert ids, -1 off this node
    float* staging_topk_weights;   // nullable [staging_rows, K]
    int* staging_src_token;        // [staging_rows]: token index at the source
    bool* forward_in_rank;         // [staging_rows, L]: which ranks of this node get the token (pre-zeroed)
    int staging_rows;
    DispatchSlot slot;
    RailGeometry rail;
};
void launch_rail_dispatch(const Context& ctx, const RailDispatchArgs& args, cudaStream_t stream);

struct RailCombineArgs {
    const uint8_t* partial;         // [staging_rows, hidden] bf16: node-reduced rows of the staged tokens
    const float* partial_weights;   // nullable [staging_rows, K]
    int num_topk, hidden;
    const int* rail_prefix;          // [N + 1] (from the dispatch)
    const int* rail_src_num_tokens;  // [N]
    const int* staging_src_token;    // [staging_rows]
    int staging_rows;
    const bool* is_token_in_rank;    // [T, R] of this (home) rank
    int num_tokens;
    const uint8_t* bias0;  // nullable [T, hidden] bf16
    const uint8_t* bias1;  // nullable
    uint8_t* combined_x;             // [T, hidden] bf16
    float* combined_topk_weights;    // nullable [T, K]
    RailGeometry rail;
};
void launch_rail_combine(const Context& ctx, const RailCombineArgs& args, cudaStream_t stream);

}  // namespace internode
}  // namespace deep_ep
