// Launchers and host helpers of the low-latency (decode) path. Included by api.cuh, the one list of
// launchers the runtime may call. No torch header here: plain pointers, sizes and streams.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace deep_ep {
namespace ll {

// The header in front of every dispatch message: up to kMaxTopk global expert ids (int32), then
// the source token index, the call tag and the top-k count (kHeaderInts ints), then
// kHeaderPosInts words of positions (two 16-bit halves each: top-k slot k in word k / 2, low
// half for even k): the position of (token, k) among the sender's (token, slot) pairs that chose
// the same expert, in (token, slot) order. The receiver places the row at that position inside
// the source's block of the expert without scanning the other headers. Padded to 128 bytes so
// that the data and the scales start on a 128-byte line (hidden % 128 == 0 keeps every message a
// whole number of lines): the senders' NVLink stores and the receivers' loads then cover whole
// lines, none split between two warps.
constexpr int kMaxTopk = 16;
constexpr int kMaxHidden = 8192;
constexpr int kMaxTokensPerRank = 1024;
constexpr int kHeaderInts = 20;
constexpr int kHeaderPosInts = kMaxTopk / 2;
constexpr int kHeaderBytes = 128;
static_assert(kHeaderBytes >= (kHeaderInts + kHeaderPosInts) * 4 && kHeaderBytes % 128 == 0,
              "header must hold its ints, whole lines");
// Positions are 16-bit: at most kMaxTokensPerRank * kMaxTopk pairs per source.
static_assert(kMaxTokensPerRank * kMaxTopk <= 65536, "header positions must fit 16 bits");
// The scan-free dispatch receive keeps per-(source, expert) tables in shared memory; above this
// many experts the receive falls back to the header scan.
constexpr int kMaxFastExperts = 1024;
constexpr int kNumThreads = 512;
constexpr int kMaxBlocks = 128;

// Phase trace (phase_trace.cuh; development only): per kernel kind, block and point, the summed
// SM cycles from the block's start to the point. Dispatch points: 0 top-k ids in shared memory,
// 1 this warp's send tasks done, 2 counts published, 3 send signalled, 4 every source's counts
// (scan-free receive) or signals (scan) arrived, 5 receive offsets ready, 6 rows placed, 7 end,
// 8 (receive, summed over this warp's tasks) header read, 9 row loaded; the bulk send's 12 stage
// assembled, 13 copies issued, 14 warp 0's first input chunk loaded, 15 header staged, 16 header
// warp started, 17 header positions computed (each summed over the block's tokens). Combine points: 0 weights
// broadcast, 1 send tasks done, 3 send signalled, 4 every source arrived, 6 rows reduced, 7 end.
// Both: 10 send fenced, 11 end of a send-only launch (hook mode; point 7 is then the receive
// launch's end).
constexpr int kTraceKernels = 2;  // 0 dispatch, 1 combine
constexpr int kTracePoints = 18;
// Clears the trace and turns it on or off (for every later launch of this process).
cudaError_t trace_reset(bool enable);
// Copies the trace out: cycles [kTraceKernels][kMaxBlocks][kTracePoints], then the calls per
// kernel kind [kTraceKernels]; `clock_khz` gets the SM clock.
cudaError_t trace_read(unsigned long long* cycles, unsigned long long* calls, int* clock_khz);

// Launch phases: the send half and the receive half of a dispatch or combine. Without a receive
// hook both run in one launch; with it, the hook launches the receive half.
constexpr int kPhaseSend = 1;
constexpr int kPhaseRecv = 2;

// Kernel identifiers in an error record.
enum KernelId : int { kKernelDispatch = 1, kKernelCombine = 2, kKernelRankBarrier = 3 };
// Or'ed into ErrorRecord::kernel when the wait was for a copy-engine sending block's delivery
// flag, whose values pack (call << kDeliveryTokenBits) | tokens delivered (kFlagAllTokens: all of
// them): the host decodes them for the message.
constexpr int kKernelDeliveryFlag = 0x100;
constexpr int kDeliveryTokenBits = 16;
constexpr unsigned long long kFlagAllTokens = (1ull << kDeliveryTokenBits) - 1;

// Written by a kernel that gave up waiting (into host-mapped memory, so the host can read it
// without a device synchronization). flag == 0: no error.
struct ErrorRecord {
    int flag;
    int rank;
    int kernel;
    int peer;
    unsigned long long expected;
    unsigned long long seen;
    unsigned long long waited_ns;
};

// Per-buffer bookkeeping kept in (non-symmetric) device memory by the kernels themselves, so a
// captured CUDA graph replays correctly: the call counters, one copy per block
// ([2 buffers][kMaxBlocks], kStateEntries in all), all equal between calls.
struct BufferState {
    unsigned long long dispatch_send_calls;
    unsigned long long dispatch_recv_calls;
    unsigned long long combine_send_calls;
    unsigned long long combine_recv_calls;
};
constexpr int kStateEntries = 2 * kMaxBlocks;

// Where everything lives inside the symmetric allocation. Computed on the host from the call's
// shape; every rank computes the same offsets.
struct Layout {
    size_t msg_bytes;             // one dispatch message (header + widest token form)
    size_t signal_offset;         // [2 buffers][3 kinds (dispatch, combine, combine weights)][num_ranks] uint64
    size_t buffer_offset[2];      // start of each alternating buffer
    size_t dispatch_recv_offset;  // within a buffer: [num_ranks src][max tokens] messages
    size_t dispatch_send_offset;  // within a buffer: [max tokens] messages (staging for puts)
    size_t dispatch_flag_offset;  // within a buffer: uint64 [ranks src][kMaxBlocks] the call whose data the source's
                                  // sending block has delivered, then [ranks src] the call whose counts are in
                                  // (the scan-free receive's flags; call numbers, so never cleaned between calls)
    size_t combine_recv_offset;   // within a buffer: [max tokens][max(kMaxTopk, ranks)] bf16 rows
    size_t combine_send_offset;   // within a buffer: [local experts][ranks * max tokens] bf16 rows
    size_t weights_offset;        // within a buffer: [ranks][max tokens][kMaxTopk] uint64 call << 32 | fp32 bits
                                  // (combine weights inbox)
    size_t stage_offset;          // within a buffer: [ranks * max tokens] bf16 rows (partial sums to put)
    size_t count_offset;          // within a buffer: int32 [ranks src][local experts] dispatch counts received,
                                  // then [ranks dst][local experts] staging for counts sent with puts
    int combine_slots_per_token;  // max(kMaxTopk, ranks)
    size_t buffer_bytes;
    size_t total_bytes;
};

Layout make_layout(int num_max_tokens, int hidden, int num_ranks, int num_experts);

// Grid size of the dispatch and combine kernels. It must be the same on every rank (receivers
// count one signal per sending block), so it depends only on the call's shape.
int num_blocks(int num_max_tokens, int num_local_experts);

struct DispatchArgs {
    const void* x;                 // bf16 [num_tokens, hidden]
    const int64_t* topk_idx;       // [num_tokens, num_topk]
    void* recv_x;                  // [L, R*M, hidden] e4m3 or bf16
    void* recv_scales;             // fp32 [L, R*M, hidden/128] or int32 [L, R*M, hidden/512]; null for bf16
    int* recv_count;               // [L]
    int* src_info;                 // [L, R*M]: token | topk slot << 16 | source rank << 20
    int64_t* layout_range;         // [L, R]: begin << 32 | count
    int* slot_rows;                // [R*M, kMaxTopk]: row (e * R*M + r) of each local top-k entry of a received slot
    int* cumulative_recv_stats;    // [L] or null
    int64_t* wait_recv_cost_stats; // [R] or null
    int num_tokens, hidden, num_topk, num_experts, num_max_tokens;
    bool use_fp8, round_scale, use_ue8m0;
    int phases;
    // Set by launch_dispatch: the copy-engine send (every peer direct; token t goes from block
    // t % grid) and its shared-memory stages per block.
    bool bulk_send;
    int bulk_stages;
    // Set by launch_dispatch (DEEP_EP_LL_SPLIT_HEADER=0 turns it off): the bulk send copies a
    // token's data and scales once the data warps have staged them, and its header after (in the
    // same bulk group): dispatch 0.2-0.5 us faster in four A/B runs of 2026-11-28 (11th session).
    bool split_header;
};

struct CombineArgs {
    const void* x;                 // bf16 [L, R*M, hidden] (ignored with zero_copy)
    const int64_t* topk_idx;       // [num_tokens, num_topk]
    const float* topk_weights;     // [num_tokens, num_topk]
    const int* src_info;           // from the dispatch
    const int* recv_count;         // from the dispatch
    const int* slot_rows;          // from the dispatch (reduced mode)
    void* out;                     // bf16 [num_tokens, hidden]
    int64_t* wait_recv_cost_stats; // [R] or null
    int num_tokens, hidden, num_topk, num_experts, num_max_tokens;
    bool zero_copy;
    // Reduced mode: each expert rank sums its experts' weighted rows per token and sends one
    // partial row per (token, rank) instead of one row per (token, expert); the home rank first
    // broadcasts its top-k weights. Fewer bytes, one bf16 rounding of each partial sum more.
    bool reduced;
    int phases;
};

// Everything the kernels need to know about this rank's symmetric memory and peers.
struct Context {
    int rank, num_ranks;
    void* heap;                     // local address of the symmetric allocation
    const unsigned long long* peer_bases;  // device [num_ranks]: peer's heap base for direct stores, 0 if none
    bool any_remote;                // some peer needs NVSHMEM puts
    BufferState* state;             // device [2 buffers][kMaxBlocks] (one copy per block)
    int* mask;                      // device [num_ranks], 1 = masked (shrink mode)
    bool enable_shrink;
    ErrorRecord* error;             // host-mapped
    unsigned long long timeout_ns;
};

cudaError_t launch_dispatch(const Context& ctx, const Layout& layout, int buffer_idx, const DispatchArgs& args,
                            cudaStream_t stream);
cudaError_t launch_combine(const Context& ctx, const Layout& layout, int buffer_idx, const CombineArgs& args,
                           cudaStream_t stream);

// A barrier of every unmasked rank on `stream` (nvshmem_rank_barrier.cu) that leaves the ranks
// within about one NVLink latency of each other: benchmarks line up kernel starts with it.
// `flags`: a symmetric allocation of 2 * num_ranks uint64, zeroed once; `call`: this runtime's
// barrier count, 1 for the first call, the same on every rank. A wait past ctx.timeout_ns is
// reported into ctx.error (kKernelRankBarrier).
cudaError_t launch_rank_barrier(const Context& ctx, unsigned long long* flags, unsigned long long call,
                                cudaStream_t stream);

// NVSHMEM host side (nvshmem_runtime.cu). Each returns 0 on success, else an NVSHMEM/CUDA status.
size_t nvshmem_unique_id_bytes();
int nvshmem_get_unique_id(void* out);
int nvshmem_init_with_unique_id(const void* unique_id, int rank, int num_ranks);
void* nvshmem_alloc(size_t bytes);
void nvshmem_release(void* ptr);
void* nvshmem_peer_ptr(void* ptr, int pe);
void nvshmem_barrier_all_host();
void nvshmem_barrier_on_stream(cudaStream_t stream);
void nvshmem_finalize_runtime();
int nvshmem_my_pe_id();

}  // namespace ll
}  // namespace deep_ep
