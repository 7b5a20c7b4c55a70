// Low-latency dispatch and combine (decode) over NVSHMEM symmetric memory.
//
// Dispatch sends every token ONCE per destination rank (not once per expert): the message lands
// in the receiver's slot [source rank][token] with a header that carries the token's top-k
// expert ids; the receiver fans it out to its local experts. Per (buffer, source rank) one
// counter grows by one per sending block and call, so nothing needs cleaning between calls; a
// slot is valid in a call when its header's tag equals the call number. The header also carries
// each top-k slot's position among the sender's tokens of that expert, and one sending block
// publishes the per-expert token counts: without shrink mode the receiver places every row from
// these (block of source s in expert e starts at the sum of the counts of sources < s) instead
// of scanning all headers per expert.
//
// Combine, "rows" mode, sends each expert row straight into the home rank's slot
// [token][top-k index]; the home rank waits for one count per sending block of every rank and
// reduces with the weights. "Reduced" mode crosses once per (token, rank) instead: the home rank
// broadcasts its top-k weights, each rank sums its experts' weighted rows per received token (fp32,
// rounded once to bf16) into the home rank's slot [token][rank], and the home rank adds those;
// a rank holding just one of the token's experts sends that row unweighted without waiting for
// the weights, and the home rank weights it. The "weights arrived" counters grow by
// kWeightWarps per call (one per writing warp).
//
// Latency: every phase is a few dependent memory rounds, so each warp issues all the loads of a
// round (a whole FP8 row, or several rows x chunks of a reduction) before using any; the grid
// covers (nearly) every SM; blocks that would idle in a receive share an expert instead.
//
// Peers reachable through nvshmem_ptr are written with plain stores (with
// allow_nvlink_for_low_latency_mode); the others with NVSHMEM puts from the local staging area.
// Where every peer is reachable so, the dispatch assembles each message in shared memory and the
// SM's copy engine writes it to its destinations (dispatch_send_bulk).
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <atomic>

#include "internode_ll_api.cuh"
#include "bulk_copy.cuh"
#include "launch.cuh"
#include "nvshmem_utils.cuh"
#include "phase_trace.cuh"

namespace deep_ep {
namespace ll {

namespace {

constexpr int kNumWarps = kNumThreads / 32;
// Warps that share one token's hidden data in the dispatch send: at 7168 channels (14 chunks of
// 32 FP8 units) every warp casts and stores one chunk, and the grid is sized so that every task
// has its own warp (one load round, then the stores).
constexpr int kWarpsPerToken = 16;
// Chunks (32 units) whose loads a dispatch-send warp issues before converting any.
constexpr int kPrefetch = 2;
// Top-k ids (num_tokens * num_topk, narrowed to int) a dispatch-send block copies into shared
// memory in its first load round (128 tokens x 16 slots, 8 KB); above this the send reads them
// from global memory as before.
constexpr int kSendIdsMax = 2048;
// Warps that share one token in the combine reduction on the home rank.
constexpr int kCombineWarpsPerToken = 16;
// Warps that share one (source rank, token) partial row in the reduced combine's send.
constexpr int kReducedWarpsPerSlot = 4;
// Loads in flight per lane when copying a received dispatch row: a whole FP8 row of 7168
// channels (14 units per lane) in one round.
constexpr int kCopyUnroll = 16;
// Warps per destination that write the combine's top-k weights (a slice each; broadcast_weights),
// and so the count a destination reached by puts gets on its "weights arrived" counter per call.
constexpr int kWeightWarps = 16;
constexpr int kTagInt = 17;
constexpr int kTopkCountInt = 18;
constexpr int kTokenInt = 16;
// Ranks a receiving block can track (shared-memory bookkeeping).
constexpr int kMaxRanks = 1024;

size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

// Pointers of one call into the symmetric heap (local addresses).
struct Geometry {
    char* heap;
    char* buf;                       // this call's buffer
    unsigned long long* signals;     // this call's counters [num_ranks] (dispatch or combine)
    unsigned long long* weight_signals;  // combine only: "weights arrived" counters [num_ranks]
    // Dispatch with the scan-free receive: [num_ranks src][kMaxBlocks] delivery flags (the call a
    // source's sending block has delivered all its data to this rank in), then [num_ranks src]
    // count flags (the call whose per-expert counts the source has written here).
    unsigned long long* block_flags;
    unsigned long long* count_flags;
    size_t msg_bytes;
    size_t dispatch_recv_offset, dispatch_send_offset, combine_recv_offset, combine_send_offset;
    size_t weights_offset, stage_offset, count_offset;
    int combine_slots;               // combine receive slots per token
};

__device__ __forceinline__ char* peer_address(const Context& ctx, const void* local, int pe) {
    const unsigned long long base = ctx.peer_bases[pe];
    if (base == 0) return nullptr;
    return reinterpret_cast<char*>(base) + (reinterpret_cast<const char*>(local) - static_cast<const char*>(ctx.heap));
}

// Adds one to counter `slot` of `signals` on every unmasked rank: this block has delivered
// everything it had for that rank in this call. Called by the whole block after its stores.
__device__ void signal_all_ranks(const Context& ctx, unsigned long long* signals, int trace_kernel) {
    // The barrier orders every thread's direct stores before the signalling threads' release adds,
    // and a release is cumulative: it makes visible everything ordered before it, the other
    // threads' stores included (the pattern of a cooperative grid sync). No fence per thread:
    // sixteen warps each waiting on a system-scope fence of their own cost more than one release.
    trace_mark(trace_kernel, kTraceFenced);
    __syncthreads();
    for (int pe = threadIdx.x; pe < ctx.num_ranks; pe += blockDim.x) {
        if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + pe) != 0) continue;
        unsigned long long* local_counter = signals + ctx.rank;
        char* direct = peer_address(ctx, local_counter, pe);
        if (direct != nullptr) {
            red_add_release_sys(reinterpret_cast<unsigned long long*>(direct), 1ull);
        } else {
            nvshmem_fence();
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(local_counter), 1ull, NVSHMEM_SIGNAL_ADD, pe);
        }
    }
}

// Sets `flag` (a local symmetric address) to `value` on the unmasked ranks first, first + stride,
// ...: a release store where the rank takes direct stores, else an NVSHMEM fence and signal.
__device__ __forceinline__ void set_flag_on_ranks(const Context& ctx, unsigned long long* flag, unsigned long long value,
                                                  int first, int stride) {
    for (int pe = first; pe < ctx.num_ranks; pe += stride) {
        if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + pe) != 0) continue;
        char* direct = peer_address(ctx, flag, pe);
        if (direct != nullptr) {
            st_release_sys_u64(reinterpret_cast<unsigned long long*>(direct), value);
        } else {
            nvshmem_fence();
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(flag), value, NVSHMEM_SIGNAL_SET, pe);
        }
    }
}

// Sets `flag` (a local symmetric address; its copy on every unmasked rank) to `call`: everything
// this block wrote there before is visible first. Called by the whole block after its stores; the
// barrier and the cumulative release as in signal_all_ranks, the releases by the first
// `num_setters` threads (the others go on at once). A set, not an add: a flag holds a call number,
// so a receiver can wait for one sending block (or the counts) of one source.
__device__ void flag_all_ranks(const Context& ctx, unsigned long long* flag, unsigned long long call, int trace_kernel,
                               int num_setters) {
    trace_mark(trace_kernel, kTraceFenced);
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < num_setters) set_flag_on_ranks(ctx, flag, call, threadIdx.x, num_setters);
}

// Lane 0 of every warp completes its NVSHMEM puts (before the block's signal).
__device__ __forceinline__ void quiet_warp_puts(const Context& ctx) {
    if (ctx.any_remote) {
        __syncwarp();
        if (threadIdx.x % 32 == 0) nvshmem_quiet();
    }
}

// The end of every send phase, by the whole block: NVSHMEM puts complete (quiet, one lane per
// warp), then this block's signal to every rank.
__device__ __forceinline__ void finish_send(const Context& ctx, unsigned long long* signals, int trace_kernel) {
    quiet_warp_puts(ctx);
    signal_all_ranks(ctx, signals, trace_kernel);
}

// After a wait on `peer` timed out: in shrink mode the peer is masked (returns 1, skip it),
// otherwise the timeout is recorded for the host (returns 2, abort).
__device__ int give_up_on_peer(const Context& ctx, int peer, int kernel, unsigned long long expected,
                               unsigned long long seen, unsigned long long waited) {
    if (ctx.enable_shrink) {
        atomicExch(ctx.mask + peer, 1);
        return 1;
    }
    report_timeout(ctx.error, ctx.rank, kernel, peer, expected, seen, waited);
    return 2;
}

// Waits (one thread) until `counter` reaches `expected`. Returns 0 ok, 1 skip (peer masked, or
// masked now after a timeout in shrink mode), 2 abort (timeout, error recorded).
__device__ int wait_peer(const Context& ctx, const unsigned long long* counter, unsigned long long expected, int peer,
                         int kernel, int64_t* wait_stats, bool account) {
    if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + peer) != 0) return 1;
    unsigned long long seen = 0, waited = 0;
    const int result = wait_counter_at_least(counter, expected, ctx.timeout_ns, &seen, &waited);
    if (account && wait_stats != nullptr) atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + peer), waited);
    if (result == kWaitOk) return 0;
    return give_up_on_peer(ctx, peer, kernel, expected, seen, waited);
}

// Every thread of the block: waits (one thread per source rank) until every rank's sending
// blocks of this call have signalled. False if a wait timed out (recorded; the host raises);
// masked ranks in shrink mode do not count. The barrier at the end makes the waiting threads'
// acquires order every thread's later reads.
__device__ bool wait_every_source(const Context& ctx, const unsigned long long* signals, unsigned long long expected,
                                  int kernel, int64_t* wait_stats) {
    __shared__ int s_abort;
    if (threadIdx.x == 0) s_abort = 0;
    __syncthreads();
    for (int src = threadIdx.x; src < ctx.num_ranks; src += blockDim.x) {
        if (wait_peer(ctx, signals + src, expected, src, kernel, wait_stats, blockIdx.x == 0) == 2) s_abort = 1;
    }
    __syncthreads();
    return s_abort == 0;
}

// Advances the buffer's call counters (graph replays stay correct). Every block keeps its own copy
// (BufferState), so no block waits on another at the end: block b writes entries b, b + gridDim.x,
// ... (every entry, whatever grid the next call has). Replaces a last-block-done atomic and its
// fences, which cost each kernel about half a microsecond on its tail.
__device__ void finish_call(BufferState* states, unsigned long long BufferState::*counter_a, unsigned long long value_a,
                            unsigned long long BufferState::*counter_b, unsigned long long value_b) {
    __syncthreads();  // every thread of the block has read its counters
    for (int b = blockIdx.x + static_cast<int>(threadIdx.x) * static_cast<int>(gridDim.x); b < kMaxBlocks;
         b += static_cast<int>(blockDim.x * gridDim.x)) {
        if (counter_a != nullptr) states[b].*counter_a = value_a;
        if (counter_b != nullptr) states[b].*counter_b = value_b;
    }
}

// Reads a dispatch header (one load round: five 16-byte loads) and returns the bit mask of its
// top-k slots whose expert lies in [expert_begin, expert_end); 0 if the slot was not written
// in call `seq`.
__device__ __forceinline__ int header_match(const char* msg, unsigned long long seq, int expert_begin, int expert_end) {
    int h[kHeaderInts];
#pragma unroll
    for (int i = 0; i < kHeaderInts / 4; ++i) {
        const int4 v = ld_cg_int4(msg + 16 * i);
        h[4 * i] = v.x;
        h[4 * i + 1] = v.y;
        h[4 * i + 2] = v.z;
        h[4 * i + 3] = v.w;
    }
    if (h[kTagInt] != static_cast<int>(static_cast<unsigned int>(seq))) return 0;
    const int num_topk = min(h[kTopkCountInt], kMaxTopk);
    int kmask = 0;
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k)
        if (k < num_topk && h[k] >= expert_begin && h[k] < expert_end) kmask |= 1 << k;
    return kmask;
}

// For c < kChunks: acc[c][0..8) += sum over the set bits k of `mask`, in increasing k, of
// weight_k * row_k[units[c]], where lane k holds row k's index (rows are `row_bytes` apart from
// `base`) and its weight. Per round the loads of kRows rows x kChunks units are all issued
// before any is used (latency, not bandwidth, bounds these small reductions); the sum order is
// the plain increasing-k order whatever kRows is. Every lane of the warp must call this (the
// shuffles); only lanes with active[c] load unit c.
template <int kRows, int kChunks>
__device__ __forceinline__ void weighted_rows_sum(const char* base, size_t row_bytes, const int* units,
                                                  const bool* active, unsigned int mask, int lane_row,
                                                  float lane_weight, float (*acc)[8]) {
    for (unsigned int rest = mask; rest != 0u;) {  // warp-uniform
        int rows[kRows];
        float w[kRows];
        bool has[kRows];
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            has[j] = rest != 0u;
            const int k = has[j] ? __ffs(static_cast<int>(rest)) - 1 : 0;
            rest &= rest - 1u;  // stays 0 once empty
            rows[j] = __shfl_sync(0xffffffffu, lane_row, k);
            w[j] = __shfl_sync(0xffffffffu, lane_weight, k);
        }
        int4 v[kRows][kChunks];
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                v[j][c] = make_int4(0, 0, 0, 0);
                if (has[j] && active[c])
                    v[j][c] = ld_cg_int4(base + static_cast<size_t>(rows[j]) * row_bytes + static_cast<size_t>(units[c]) * 16);
            }
        }
#pragma unroll
        for (int j = 0; j < kRows; ++j) {
            if (!has[j]) continue;  // warp-uniform; no "+ 0 * 0" that could turn a -0 sum into +0
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                float f[8];
                bf16x8_to_floats(v[j][c], f);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[c][i] = fmaf(w[j], f[i], acc[c][i]);
            }
        }
    }
}

// The reductions below give one warp the chunks part, part + parts, ... of a row (a chunk is 32
// units of 8 bf16 channels) and handle kChunks of them per weighted_rows_sum round; this is
// one round's unit per lane and whether the lane has one.
template <int kChunks>
__device__ __forceinline__ void round_units(int first_chunk, int parts, int num_units, int* units, bool* active) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        units[c] = (first_chunk + c * parts) * 32 + lane;
        active[c] = units[c] < num_units;
    }
}

// Splits the grid over `num_items` work items (experts): with at least two blocks per item (and
// `allow`), block b works on item b % num_items as share b / num_items of `shares` (the blocks
// past the last whole multiple sit out); otherwise block b works alone on items b,
// b + gridDim.x, ...
struct BlockShare {
    int first, step, share, shares;
};
__device__ __forceinline__ BlockShare share_blocks(int num_items, bool allow) {
    BlockShare s;
    const int per_item = allow && num_items > 0 ? static_cast<int>(gridDim.x) / num_items : 1;
    if (per_item >= 2) {
        s.shares = per_item;
        s.share = static_cast<int>(blockIdx.x) / num_items;
        s.first = s.share < per_item ? static_cast<int>(blockIdx.x) % num_items : num_items;
        s.step = num_items;  // one item per block
    } else {
        s.shares = 1;
        s.share = 0;
        s.first = blockIdx.x;
        s.step = gridDim.x;
    }
    return s;
}

// out[unit] = bf16(sum over the set bits k of `mask` of weight_k * row_k[unit]) for this warp's
// chunks part, part + parts, ... of a row of `num_units` units (see weighted_rows_sum).
template <int kRows, int kChunks>
__device__ __forceinline__ void reduce_rows(const char* base, size_t row_bytes, int part, int parts, int num_units,
                                            unsigned int mask, int lane_row, float lane_weight, char* out) {
    const int num_chunks = (num_units + 31) / 32;
    for (int chunk = part; chunk < num_chunks; chunk += parts * kChunks) {
        int units[kChunks];
        bool active[kChunks];
        round_units<kChunks>(chunk, parts, num_units, units, active);
        float acc[kChunks][8];
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[c][i] = 0.f;
        weighted_rows_sum<kRows, kChunks>(base, row_bytes, units, active, mask, lane_row, lane_weight, acc);
#pragma unroll
        for (int c = 0; c < kChunks; ++c)
            if (active[c]) st_int4(out + static_cast<size_t>(units[c]) * 16, floats_to_bf16x8(acc[c]));
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------
// Loads the bf16 input of kPrefetch chunks (first, first + parts, ...) of a token: 32 channels
// per lane for FP8 (two 16-byte loads), 8 for bf16; zeros past the row.
template <bool kUseFP8>
__device__ __forceinline__ void load_send_chunks(int4 (*raw)[kUseFP8 ? 2 : 1], const char* token_x, int first, int parts,
                                                 int num_units) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < kPrefetch; ++i) {
        const int unit = (first + i * parts) * 32 + lane;
#pragma unroll
        for (int j = 0; j < (kUseFP8 ? 2 : 1); ++j) raw[i][j] = make_int4(0, 0, 0, 0);
        if (unit < num_units) {
            if constexpr (kUseFP8) {
                raw[i][0] = ld_nc_int4(token_x + static_cast<size_t>(unit) * 32);
                raw[i][1] = ld_nc_int4(token_x + static_cast<size_t>(unit) * 32 + 16);
            } else {
                raw[i][0] = ld_nc_int4(token_x + static_cast<size_t>(unit) * 16);
            }
        }
    }
}

// The header's position words (see kHeaderPosInts): for every top-k slot k of `token`, the number
// of (token', k') pairs before (token, k) in (token, slot) order with the same expert id; lane
// kHeaderInts + i returns the word of slots 2i (low half) and 2i + 1, other lanes garbage.
// Whole warp; `expert` is lane k's expert id (-1 if none, slots of -1 get garbage positions that
// no receiver reads). Only the scan-free receive reads positions, so above kMaxFastExperts experts
// there are none to compute (the word is 0).
// With the block's shared copy of the ids (`s_ids`, narrowed like below), `table` (this warp's [kMaxFastExperts]
// bytes, all zero between calls) and `slot_count` (its [kMaxTopk] ints) make each earlier pair
// cost one table lookup instead of a compare with every top-k id: lane k registers slot k's
// expert (first slot of a repeated id only), the lanes scan the earlier pairs and count the hits
// per slot, then clear their entries. The compare loop made the header of a late token (a
// thousand earlier pairs) the slowest task of the send: its block signalled ~2 us after the rest.
// Without the shared copy (more pairs than kSendIdsMax), every lane compares every 32nd earlier
// pair from global memory against all of this token's ids held in registers.
__device__ __forceinline__ int header_position_word(const int64_t* topk_idx, const int* s_ids, int token, int num_topk,
                                                    int num_experts, int expert, uint8_t* table, int* slot_count) {
    const int lane = threadIdx.x % 32;
    constexpr int kUnroll = 12;  // 16 would spill (the dispatch kernel is at 128 registers)
    if (num_experts > kMaxFastExperts) return 0;
    const int before = token * num_topk;
    if (table != nullptr) {  // warp-uniform: the block has its shared ids and tables
        int ex[kMaxTopk];
#pragma unroll
        for (int k = 0; k < kMaxTopk; ++k) ex[k] = __shfl_sync(0xffffffffu, expert, k);
        const bool valid = lane < num_topk && expert >= 0;
        int same_before = 0;  // earlier slots of this token with the same expert
#pragma unroll
        for (int k = 0; k < kMaxTopk; ++k) same_before += k < lane && ex[k] == expert ? 1 : 0;
        const bool registers = valid && same_before == 0;
        if (lane < kMaxTopk) slot_count[lane] = 0;
        if (registers) table[expert] = static_cast<uint8_t>(lane + 1);
        __syncwarp();
        constexpr int kTableUnroll = 8;
        for (int j0 = lane; j0 < before; j0 += 32 * kTableUnroll) {
            int id[kTableUnroll];
#pragma unroll
            for (int i = 0; i < kTableUnroll; ++i) id[i] = j0 + 32 * i < before ? s_ids[j0 + 32 * i] : -1;
#pragma unroll
            for (int i = 0; i < kTableUnroll; ++i) {
                const int slot = id[i] >= 0 ? table[id[i]] : 0;
                if (slot != 0) atomicAdd(slot_count + slot - 1, 1);
            }
        }
        __syncwarp();
        const int count = valid ? slot_count[table[expert] - 1] + same_before : 0;
        __syncwarp();
        if (registers) table[expert] = 0;
        __syncwarp();
        // Lane kHeaderInts + i packs slots 2i (low half) and 2i + 1.
        const int pair = lane >= kHeaderInts && lane < kHeaderInts + kHeaderPosInts ? 2 * (lane - kHeaderInts) : 0;
        const int low = __shfl_sync(0xffffffffu, count, pair), high = __shfl_sync(0xffffffffu, count, pair + 1);
        return static_cast<int>((static_cast<unsigned int>(low) & 0xFFFFu) | ((static_cast<unsigned int>(high) & 0xFFFFu) << 16));
    }
    int ex[kMaxTopk], count[kMaxTopk];
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k) {
        ex[k] = __shfl_sync(0xffffffffu, expert, k);
        count[k] = 0;
    }
    for (int j0 = lane; j0 < before; j0 += 32 * kUnroll) {
        // Narrowed to int32 as the send does (ids outside [0, num_experts) become -1, which
        // matches only slots without an expert, whose positions nobody reads).
        int id[kUnroll];
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
            const int64_t v = j0 + 32 * i < before ? __ldg(topk_idx + j0 + 32 * i) : -1;
            id[i] = v >= 0 && v < num_experts ? static_cast<int>(v) : -1;
        }
#pragma unroll
        for (int i = 0; i < kUnroll; ++i)
#pragma unroll
            for (int k = 0; k < kMaxTopk; ++k)
                if (k < num_topk) count[k] += id[i] == ex[k] ? 1 : 0;
    }
    unsigned int word = 0u;
#pragma unroll
    for (int k = 0; k < kMaxTopk; ++k) {
        if (k >= num_topk) break;  // warp-uniform
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) count[k] += __shfl_xor_sync(0xffffffffu, count[k], offset);
        // Earlier slots of this token with the same expert (duplicate ids get consecutive rows).
#pragma unroll
        for (int k2 = 0; k2 < k; ++k2) count[k] += ex[k2] == ex[k] ? 1 : 0;
        if (lane == kHeaderInts + k / 2) word |= (static_cast<unsigned int>(count[k]) & 0xFFFFu) << (16 * (k & 1));
    }
    return static_cast<int>(word);
}

// Whether a dispatch uses the scan-free receive (dispatch_recv_direct) and so the delivery and
// count flags instead of the per-source counters. The same on every rank and for every call of
// one layout: enable_shrink is the buffer's, and num_experts is part of the layout's key.
__device__ __forceinline__ bool scan_free_receive(const Context& ctx, const DispatchArgs& a) {
    return !ctx.enable_shrink && a.num_experts <= kMaxFastExperts;
}

// This rank's number of (token, top-k slot) pairs per expert, written into every destination's
// count table row [this rank] (its local experts only), then its count flag set to `call`: the
// scan-free receive's block offsets, which it computes while the tokens are still on the way.
// Ids outside [0, num_experts) count as none, as in the send. Called by one whole block; `s_ids`
// is the block's narrowed shared copy of the ids, or null (read them from global memory). (One
// warp of the bulk send's last block publishing them during the send, measured: its release
// waited behind the SM's copies in flight, counts at ~14 us, dispatch 26.1 vs 20.0 us.)
__device__ void publish_dispatch_counts(const Context& ctx, const Geometry& g, const DispatchArgs& a, const int* s_ids,
                                        unsigned long long call) {
    __shared__ int s_hist[kMaxFastExperts];
    const int warp = threadIdx.x / 32;
    const int num_experts = a.num_experts, num_local = num_experts / ctx.num_ranks;
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x) s_hist[i] = 0;
    __syncthreads();
    const int num_pairs = a.num_tokens * a.num_topk;
    for (int j = threadIdx.x; j < num_pairs; j += blockDim.x) {
        const int64_t id = s_ids != nullptr ? static_cast<int64_t>(s_ids[j]) : __ldg(a.topk_idx + j);
        if (id >= 0 && id < num_experts) atomicAdd(&s_hist[id], 1);
    }
    __syncthreads();
    int* counts = reinterpret_cast<int*>(g.buf + g.count_offset);  // [source][local]
    int* staging = counts + num_experts;                             // [destination][local]
    for (int i = threadIdx.x; i < num_experts; i += blockDim.x) {
        const int d = i / num_local, e = i % num_local;
        if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + d) != 0) continue;
        char* peer = peer_address(ctx, counts + static_cast<size_t>(ctx.rank) * num_local + e, d);
        if (peer != nullptr)
            *reinterpret_cast<int*>(peer) = s_hist[i];
        else
            staging[i] = s_hist[i];
    }
    if (ctx.any_remote) __threadfence();  // the staged counts before the puts that read them
    // Every thread's count stores before the flags (a cumulative release after the barrier, as
    // in signal_all_ranks); a peer reached through puts gets its flag with its counts' put.
    __syncthreads();
    unsigned long long* flag = g.count_flags + ctx.rank;
    for (int d = threadIdx.x; d < ctx.num_ranks; d += blockDim.x) {
        char* peer = peer_address(ctx, flag, d);
        if (peer != nullptr) st_release_sys_u64(reinterpret_cast<unsigned long long*>(peer), call);
    }
    if (ctx.any_remote) {
        for (int d = warp; d < ctx.num_ranks; d += kNumWarps) {
            if (ctx.peer_bases[d] != 0ull) continue;
            nvshmemx_putmem_signal_nbi_warp(counts + static_cast<size_t>(ctx.rank) * num_local,
                                            staging + static_cast<size_t>(d) * num_local, num_local * sizeof(int),
                                            reinterpret_cast<uint64_t*>(flag), call, NVSHMEM_SIGNAL_SET, d);
        }
    }
}

// The staged message's arrival count (stage_arrive): a 64-bit word at the end of the header,
// past every field a receiver reads (it travels with the put, unread).
constexpr int kStageArrivalOffset = kHeaderBytes - 8;
static_assert((kHeaderInts + kHeaderPosInts) * 4 <= kStageArrivalOffset, "the arrival word overlaps the header fields");

// Counts one arrival at a staged message for call `call` (the call in the word's high half, the
// count in its low half, so a count an earlier call left unfinished, e.g. when a destination was
// masked mid-call, cannot carry over) and returns whether it was the `expected`-th. A CAS retry
// loop, not a wait: each failed attempt means another task's arrival succeeded, so it retries at
// most once per other task of the token. The 32-bit tag wraps after 2^32 calls, as the header's.
__device__ __forceinline__ int stage_arrive(unsigned long long* word, unsigned long long call, int expected) {
    const unsigned long long tag = static_cast<unsigned long long>(static_cast<unsigned int>(call)) << 32;
    unsigned long long seen = *reinterpret_cast<volatile unsigned long long*>(word);
    while (true) {
        const unsigned long long next = (seen & 0xFFFFFFFF00000000ull) == tag ? seen + 1 : (tag | 1ull);
        const unsigned long long old = atomicCAS(word, seen, next);
        if (old == seen) return (next & 0xFFFFFFFFull) == static_cast<unsigned long long>(expected) ? 1 : 0;
        seen = old;
    }
}

// Sending tasks per token: its data split over `parts` warps (a chunk is 32 units; a unit is 16
// channels cast to fp8, or 8 bf16 channels) plus one header task. Token t's tasks are
// t * task_parts ... t * task_parts + task_parts - 1, and task q runs on block (q / kNumWarps) %
// gridDim.x (the send's grid-stride loop): the scan-free receive knows from this which sending
// blocks' flags a token waits for.
template <bool kUseFP8>
__device__ __forceinline__ int dispatch_data_parts(int hidden) {
    const int num_units = kUseFP8 ? hidden / 16 : hidden / 8;
    return min(kWarpsPerToken, (num_units + 31) / 32);
}

// Shared memory of the dispatch send (both forms, one allocation): the block's narrowed copy of
// the top-k ids, header_position_word's per-warp expert -> top-k slot tables (zero between uses)
// and its per-warp slot counts.
struct SendShared {
    int ids[kSendIdsMax];
    __align__(16) uint8_t expert_slot[kNumWarps * kMaxFastExperts];
    int slot_count[kNumWarps * kMaxTopk];
};
__shared__ SendShared s_send;

// The block's copy of every top-k id (s_send.ids, narrowed to int; ids outside [0, num_experts),
// unchecked inside graph capture, count as "none": -1). All of a thread's loads go out before its
// shared stores (one round, not one per id); meanwhile the used part of every warp's expert table
// is cleared. Whole block, num_pairs <= kSendIdsMax; the caller's barrier completes it.
__device__ __forceinline__ void stage_send_ids(const DispatchArgs& a, int num_pairs) {
    static_assert(kSendIdsMax % kNumThreads == 0, "whole rounds of ids per thread");
    constexpr int kIdsPerThread = kSendIdsMax / kNumThreads;
    int64_t id[kIdsPerThread];
#pragma unroll
    for (int i = 0; i < kIdsPerThread; ++i) {
        const int j = static_cast<int>(threadIdx.x) + i * kNumThreads;
        id[i] = j < num_pairs ? __ldg(a.topk_idx + j) : -1;
    }
    if (a.num_experts <= kMaxFastExperts) {
        const int per_warp = (a.num_experts + 15) / 16;  // int4 per warp
        for (int i = threadIdx.x; i < kNumWarps * per_warp; i += blockDim.x)
            reinterpret_cast<int4*>(s_send.expert_slot)[(i / per_warp) * (kMaxFastExperts / 16) + i % per_warp] =
                make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kIdsPerThread; ++i) {
        const int j = static_cast<int>(threadIdx.x) + i * kNumThreads;
        if (j < num_pairs) s_send.ids[j] = id[i] >= 0 && id[i] < a.num_experts ? static_cast<int>(id[i]) : -1;
    }
}

// Lane k (< num_topk) of a warp: top-k slot k's expert id of `token` and its destination rank;
// -1 for none (ids outside [0, num_experts), unchecked inside graph capture, count as none) and
// a masked destination is -1 too. `ids`: the block's shared copy (stage_send_ids) or null.
__device__ __forceinline__ void route_token(const Context& ctx, const DispatchArgs& a, const int* ids, int token,
                                            int& expert, int& dst) {
    const int lane = threadIdx.x % 32;
    expert = -1;
    dst = -1;
    if (lane >= a.num_topk) return;
    if (ids != nullptr) {
        expert = ids[token * a.num_topk + lane];
    } else {
        const int64_t id = __ldg(a.topk_idx + static_cast<size_t>(token) * a.num_topk + lane);
        expert = id >= 0 && id < a.num_experts ? static_cast<int>(id) : -1;
    }
    if (expert >= 0) {
        dst = expert / (a.num_experts / ctx.num_ranks);
        if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + dst) != 0) dst = -1;
    }
}

// A dispatch header's int `lane` (lanes < kHeaderInts + kHeaderPosInts write one): the top-k ids
// (route_token's `expert`), token, tag, top-k count and header_position_word's `pos_word`.
__device__ __forceinline__ int header_lane_value(const DispatchArgs& a, int token, unsigned long long tag, int expert,
                                                 int pos_word) {
    const int lane = threadIdx.x % 32;
    if (lane < kMaxTopk) return lane < a.num_topk ? expert : -1;
    if (lane == kTokenInt) return token;
    if (lane == kTagInt) return static_cast<int>(static_cast<unsigned int>(tag));
    if (lane == kTopkCountInt) return a.num_topk;
    return lane >= kHeaderInts ? pos_word : 0;
}

// The lanes that lead a message: one per distinct destination rank, the first top-k slot naming
// it (route_token's `dst`). Whole warp.
__device__ __forceinline__ unsigned int message_leaders(int dst, int num_topk) {
    const int lane = threadIdx.x % 32;
    bool leader = dst >= 0;
    for (int k = 0; k < num_topk; ++k) {
        const int other = __shfl_sync(0xffffffffu, dst, k);
        if (k < lane && other == dst) leader = false;
    }
    return __ballot_sync(0xffffffffu, leader);
}

// Casts one lane's unit (16 bf16 channels in `raw`) to FP8 into `out` and returns the scale its
// 8-lane group (128 channels) shares; groups never straddle a warp. Whole warp (shuffles).
__device__ __forceinline__ float cast_unit_fp8(const int4 (&raw)[2], bool round_scale, int4& out) {
    float f[16];
    bf16x8_to_floats(raw[0], f);
    bf16x8_to_floats(raw[1], f + 8);
    float amax = 0.f;
#pragma unroll
    for (int k = 0; k < 16; ++k) amax = fmaxf(amax, fabsf(f[k]));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
    const float scale = fp8_scale_from_amax(amax, round_scale);
    uint16_t* o = reinterpret_cast<uint16_t*>(&out);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = fp8x2_from_floats(__fdiv_rn(f[2 * k], scale), __fdiv_rn(f[2 * k + 1], scale));
    return scale;
}

template <bool kUseFP8>
__device__ void dispatch_send(const Context& ctx, const Geometry& g, const DispatchArgs& a, unsigned long long tag) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int hidden = a.hidden;
    // A unit is what one lane moves at a time: 16 channels (fp8 out) or 8 channels (bf16).
    const int num_units = kUseFP8 ? hidden / 16 : hidden / 8;
    const int num_chunks = (num_units + 31) / 32;
    // A token's data is split over `parts` warps; for a peer reached through puts they all stage
    // their share and the last to finish puts the whole message (stage_arrive).
    const int parts = dispatch_data_parts<kUseFP8>(hidden);
    const size_t data_bytes = kUseFP8 ? static_cast<size_t>(hidden) + hidden / 32 : static_cast<size_t>(hidden) * 2;
    // The header (with its positions, header_position_word: a few load rounds) is a task of its
    // own, on a warp that would otherwise idle (15 tasks per token fit the 16 warps per token the
    // grid is sized for), so it does not lengthen the data warps: part `parts` of a token.
    const int task_parts = parts + 1;
    const int num_tasks = a.num_tokens * task_parts;
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(a.x);

    // The counts first, from the last block (at 128 tokens it has no token of its own), so the
    // receivers turn them into row offsets while the tokens travel. Before anything below is
    // loaded (its ids from global memory): nothing of the send is live across it, so it costs
    // the other blocks no registers.
    const bool scan_free = scan_free_receive(ctx, a);  // block-uniform
    if (scan_free && blockIdx.x == gridDim.x - 1) publish_dispatch_counts(ctx, g, a, nullptr, tag);
    trace_mark(kTraceDispatch, 2);

    // Every global load the send needs goes out in one round before any store: the first task's
    // input chunks, the block's copy of all top-k ids (the data warps' routing, the header
    // positions and the count histogram read it from shared memory) and the peer bases (lane r
    // holds rank r's; with more than 32 ranks each lane loads its destination's base below, still
    // before this warp's stores). A load issued after stores waits behind them in the SM's
    // memory pipeline, and NVLink drains those stores slowly: before this, every destination of a
    // token cost a dependent load of ctx.peer_bases behind the previous destination's stores, and
    // every header three rounds of top-k loads.
    const int first_task = blockIdx.x * kNumWarps + warp;
    const int num_pairs = a.num_tokens * a.num_topk;
    const bool ids_shared = num_pairs <= kSendIdsMax;  // block-uniform
    const bool lane_bases = ctx.num_ranks <= 32;       // block-uniform
    int4 raw[kPrefetch][kUseFP8 ? 2 : 1];
    // (A header task's chunks are never used: chunk `parts` is past the row or another warp's.)
    if (first_task < num_tasks)
        load_send_chunks<kUseFP8>(raw, reinterpret_cast<const char*>(x + static_cast<size_t>(first_task / task_parts) * hidden),
                                  first_task % task_parts, parts, num_units);
    const unsigned long long lane_base = lane_bases && lane < ctx.num_ranks ? ctx.peer_bases[lane] : 0ull;
    if (ids_shared) stage_send_ids(a, num_pairs);
    const bool use_tables = ids_shared && a.num_experts <= kMaxFastExperts;  // block-uniform
    uint8_t* expert_table = use_tables ? s_send.expert_slot + warp * kMaxFastExperts : nullptr;
    __syncthreads();  // the shared ids complete (the input loads above stay in flight)
    trace_mark(kTraceDispatch, 0);
    const int* ids = ids_shared ? s_send.ids : nullptr;

    for (int task = first_task; task < num_tasks; task += gridDim.x * kNumWarps) {
        const int token = task / task_parts, part = task % task_parts;
        const bool has_data = part < parts;  // warp-uniform; false only for a separate header task
        const char* token_x = reinterpret_cast<const char*>(x + static_cast<size_t>(token) * hidden);
        // The first chunks' input loads go out with the top-k loads (they do not depend on the
        // routing): one load round before the first stores instead of two. The first task's
        // went out before the barrier above.
        if (task != first_task) load_send_chunks<kUseFP8>(raw, token_x, part, parts, num_units);
        int expert, dst;
        route_token(ctx, a, ids, token, expert, dst);
        const unsigned int leaders = message_leaders(dst, a.num_topk);
        if (leaders == 0u) continue;

        // Local (symmetric) address of this token's slot, identical in every rank's heap.
        char* slot = g.buf + g.dispatch_recv_offset + (static_cast<size_t>(ctx.rank) * a.num_max_tokens + token) * g.msg_bytes;
        char* staging = g.buf + g.dispatch_send_offset + static_cast<size_t>(token) * g.msg_bytes;
        const size_t slot_rel = static_cast<size_t>(slot - static_cast<char*>(ctx.heap));
        // Lane k's destination's heap base (ctx.peer_bases[dst], 0: reached through puts), for
        // the store loops below to shuffle from the leader lane instead of loading it there.
        unsigned long long dst_base = __shfl_sync(0xffffffffu, lane_base, dst >= 0 ? dst : 0);  // lane_bases: dst < 32
        if (dst < 0) dst_base = 0ull;
        else if (!lane_bases) dst_base = ctx.peer_bases[dst];
        const bool has_remote = __any_sync(0xffffffffu, ((leaders >> lane) & 1u) != 0u && dst_base == 0ull);

        // Header: the top-k ids, token, tag, count and the positions (header_position_word).
        auto write_header = [&]() {
            const int pos_word = header_position_word(a.topk_idx, ids, token, a.num_topk, a.num_experts, expert,
                                                      expert_table, s_send.slot_count + warp * kMaxTopk);
            const int value = header_lane_value(a, token, tag, expert, pos_word);
            const bool writes = lane < kHeaderInts + kHeaderPosInts;
            for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {
                const unsigned long long base = __shfl_sync(0xffffffffu, dst_base, __ffs(bits) - 1);
                if (base != 0ull && writes) reinterpret_cast<int*>(reinterpret_cast<char*>(base) + slot_rel)[lane] = value;
            }
            if (has_remote && writes) reinterpret_cast<int*>(staging)[lane] = value;
        };
        // For destinations reached by puts every task stages its share of the message; the task
        // that completes the message (data parts and header: task_parts arrivals) puts it, once
        // per such destination. One put per (token, destination), as a NIC wants, while the
        // cast and staging stay split over the token's warps.
        auto arrive_and_put = [&]() {
            __syncwarp();  // every lane's staging stores before lane 0's fence
            int last = 0;
            if (lane == 0) {
                __threadfence();  // this task's share, before its arrival is counted
                last = stage_arrive(reinterpret_cast<unsigned long long*>(staging + kStageArrivalOffset), tag, task_parts);
                if (last) __threadfence();  // the other tasks' shares, before this warp's put reads them
            }
            if (__shfl_sync(0xffffffffu, last, 0) == 0) return;
            __syncwarp();  // a shuffle orders no memory: lane 0's acquire before every lane's put loads
            for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {
                const int d = __shfl_sync(0xffffffffu, dst, __ffs(bits) - 1);
                if (__shfl_sync(0xffffffffu, dst_base, __ffs(bits) - 1) != 0ull) continue;
                nvshmemx_putmem_nbi_warp(slot, staging, kHeaderBytes + data_bytes, d);
            }
        };
        if (!has_data) {  // the token's separate header task
            write_header();
            if (has_remote) arrive_and_put();
            // `raw` flows round the loop (the first task's was loaded before it); overwriting it
            // here shows the compiler it is dead during write_header (16 registers, else spills).
#pragma unroll
            for (int i = 0; i < kPrefetch; ++i)
#pragma unroll
                for (int j = 0; j < (kUseFP8 ? 2 : 1); ++j) raw[i][j] = make_int4(0, 0, 0, 0);
            continue;
        }

        // Loads of kPrefetch chunks are issued before any of them is converted and stored (the
        // first group's loads were issued above).
        for (int first = part; first < num_chunks; first += kPrefetch * parts) {
            if (first != part) load_send_chunks<kUseFP8>(raw, token_x, first, parts, num_units);
#pragma unroll
            for (int i = 0; i < kPrefetch; ++i) {
                const int chunk = first + i * parts;
                if (chunk >= num_chunks) break;  // warp-uniform
                const int unit = chunk * 32 + lane;
                const bool valid = unit < num_units;
                int4 out = raw[i][0];
                float scale = 0.f;
                if constexpr (kUseFP8) scale = cast_unit_fp8(raw[i], a.round_scale, out);
                const size_t data_offset = kHeaderBytes + static_cast<size_t>(unit) * 16;
                const bool writes_scale = kUseFP8 && valid && (lane % 8) == 0;
                const size_t scale_offset = kHeaderBytes + static_cast<size_t>(hidden) + static_cast<size_t>(unit / 8) * 4;
                // The whole warp walks the destinations (the shuffle needs every lane); only
                // lanes with a unit store.
                for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {
                    const unsigned long long base = __shfl_sync(0xffffffffu, dst_base, __ffs(bits) - 1);
                    if (base == 0ull || !valid) continue;
                    char* peer = reinterpret_cast<char*>(base) + slot_rel;
                    st_int4(peer + data_offset, out);
                    if (writes_scale) *reinterpret_cast<float*>(peer + scale_offset) = scale;
                }
                if (has_remote && valid) {
                    st_int4(staging + data_offset, out);
                    if (writes_scale) *reinterpret_cast<float*>(staging + scale_offset) = scale;
                }
            }
        }

        if (has_remote) arrive_and_put();
    }
    trace_mark(kTraceDispatch, 1);
    if (scan_free) {
        // This block's delivery flag on every rank: a receiver places a token once the blocks
        // that sent it have flagged (wait_sending_blocks), not once every block has. When this
        // launch receives too, warp 0 alone sets them (each release waits for the block's NVLink
        // stores to land, microseconds) and the other warps start the receive meanwhile.
        quiet_warp_puts(ctx);
        flag_all_ranks(ctx, g.block_flags + static_cast<size_t>(ctx.rank) * kMaxBlocks + blockIdx.x, tag, kTraceDispatch,
                       (a.phases & kPhaseRecv) ? 32 : static_cast<int>(blockDim.x));
    } else {
        finish_send(ctx, g.signals, kTraceDispatch);
    }
    trace_mark(kTraceDispatch, 3);
}

// The dispatch send through the copy engine (DispatchArgs::bulk_send: every peer reached by
// direct stores). Block b sends tokens b, b + grid, ...: its warps assemble each message
// (header, data, scales, the layout the receivers read) in a shared-memory stage, and one thread
// hands it to the copy engine once per destination rank. The NVLink stores then leave through the
// copy engine, not the SM's load/store pipeline, and only the flag waits for them (in one
// thread). With more tokens than blocks, a block's first tokens may land while the rest still
// travel: the flag counts the tokens whose copies have completed (bulk_flag), and a receiver
// waits for its token's.
// DispatchArgs::bulk_stages stages (the launcher sizes the dynamic shared memory) let a block
// issue that many tokens before it waits for a stage.

// A stage's size in bytes (the widest message form, 128-byte aligned).
__host__ __device__ __forceinline__ size_t bulk_stage_bytes(size_t msg_bytes) { return (msg_bytes + 127) / 128 * 128; }
constexpr int kMaxBulkStages = 8;

// A bulk-sending block's delivery flag: (call << kDeliveryTokenBits) | its tokens whose copies
// have completed in the call, kFlagAllTokens once all have (at once for a block without tokens).
__device__ __forceinline__ unsigned long long bulk_flag(unsigned long long call, unsigned long long tokens_done) {
    return (call << kDeliveryTokenBits) | tokens_done;
}

// The bulk send's data warps: [0, parts) cast and stage a token, the last warp writes its header.
template <bool kUseFP8>
__device__ __forceinline__ int bulk_data_warps(int hidden) {
    const int num_units = kUseFP8 ? hidden / 16 : hidden / 8;
    return min(kNumWarps - 1, (num_units + 31) / 32);
}

template <bool kUseFP8>
__device__ void dispatch_send_bulk(const Context& ctx, const Geometry& g, const DispatchArgs& a, unsigned long long tag) {
    extern __shared__ __align__(128) uint8_t s_stages[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int hidden = a.hidden;
    const int num_units = kUseFP8 ? hidden / 16 : hidden / 8;
    const int num_chunks = (num_units + 31) / 32;
    // Warps [0, parts) cast and stage the data; the last warp writes the header.
    const int parts = bulk_data_warps<kUseFP8>(hidden);
    const int header_warp = kNumWarps - 1;
    const size_t data_bytes = kUseFP8 ? static_cast<size_t>(hidden) + hidden / 32 : static_cast<size_t>(hidden) * 2;
    const uint32_t copy_bytes = static_cast<uint32_t>((kHeaderBytes + data_bytes + 15) / 16 * 16);  // <= msg_bytes
    const size_t stage_bytes = bulk_stage_bytes(g.msg_bytes);
    const int stages = a.bulk_stages;
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(a.x);
    const bool scan_free = scan_free_receive(ctx, a);  // block-uniform
    unsigned long long* flag = g.block_flags + static_cast<size_t>(ctx.rank) * kMaxBlocks + blockIdx.x;
    // The issuing thread: waits until at most `pending` of its newest tokens' copies are
    // incomplete; their writes are then ordered before its later releases.
    auto wait_copies = [](int pending) {
        bulk_wait_group_at_most(pending);
        fence_proxy_async_global();
    };
    // Warp 0, after lane 0's wait_copies: `value` into this block's flag on every unmasked rank (a
    // release publishes the copy engine's completed writes the releasing thread observed;
    // __syncwarp passes them on to the other lanes).
    auto release_flag = [&](unsigned long long value) {
        __syncwarp();
        set_flag_on_ranks(ctx, flag, value, lane, 32);
    };

    // The counts first, from the last block, as in dispatch_send (published after its token, they
    // arrived with the last data, ~13 us: measured).
    if (scan_free && blockIdx.x == gridDim.x - 1) publish_dispatch_counts(ctx, g, a, nullptr, tag);
    trace_mark(kTraceDispatch, 2);

    // One load round: the first token's input chunks and the block's ids.
    int4 raw[kPrefetch][kUseFP8 ? 2 : 1];
    const int first_token = static_cast<int>(blockIdx.x);
    if (warp < parts && first_token < a.num_tokens)
        load_send_chunks<kUseFP8>(raw, reinterpret_cast<const char*>(x + static_cast<size_t>(first_token) * hidden), warp, parts,
                                  num_units);
    const int num_pairs = a.num_tokens * a.num_topk;
    const bool ids_shared = num_pairs <= kSendIdsMax;  // block-uniform
    if (ids_shared) stage_send_ids(a, num_pairs);
    const bool use_tables = ids_shared && a.num_experts <= kMaxFastExperts;  // block-uniform
    uint8_t* expert_table = use_tables ? s_send.expert_slot + warp * kMaxFastExperts : nullptr;
    const int* ids = ids_shared ? s_send.ids : nullptr;
    __syncthreads();  // the shared ids complete (the input loads stay in flight)
    trace_mark(kTraceDispatch, 0);

    // Tokens issued (`iteration`) and flagged as complete (`released`, warp 0's count).
    int iteration = 0, released = 0;
    for (int token = first_token; token < a.num_tokens; token += gridDim.x, ++iteration) {
        uint8_t* stage = s_stages + static_cast<size_t>(iteration % stages) * stage_bytes;
        // The copies that last read this stage have completed (warp 0 waited after issuing).
        if (iteration >= stages) __syncthreads();
        const char* token_x = reinterpret_cast<const char*>(x + static_cast<size_t>(token) * hidden);
        // Warp 0: the token's destinations (route_token, message_leaders), its slot relative to the
        // heap base (the same on every rank), and the copies of stage bytes [offset, offset + bytes).
        int expert = -1, dst = -1;
        unsigned int leaders = 0u;
        const size_t slot_rel = g.dispatch_recv_offset + (static_cast<size_t>(ctx.rank) * a.num_max_tokens + token) * g.msg_bytes +
                                static_cast<size_t>(g.buf - static_cast<char*>(ctx.heap));
        auto issue_copies = [&](uint32_t offset, uint32_t bytes) {
            for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {  // warp-uniform
                const int d = __shfl_sync(0xffffffffu, dst, __ffs(bits) - 1);
                if (lane == 0)
                    bulk_store_from_shared(reinterpret_cast<char*>(ctx.peer_bases[d]) + slot_rel + offset, stage + offset, bytes);
            }
        };
        if (warp < parts) {
            for (int first = warp; first < num_chunks; first += kPrefetch * parts) {
                if (token != first_token || first != warp) load_send_chunks<kUseFP8>(raw, token_x, first, parts, num_units);
                if (first == warp) trace_mark_loaded(kTraceDispatch, 14, raw[0][0].x);
#pragma unroll
                for (int i = 0; i < kPrefetch; ++i) {
                    const int unit = (first + i * parts) * 32 + lane;
                    if (first + i * parts >= num_chunks) break;  // warp-uniform
                    int4 out = raw[i][0];
                    float scale = 0.f;
                    if constexpr (kUseFP8) scale = cast_unit_fp8(raw[i], a.round_scale, out);
                    if (unit >= num_units) continue;
                    *reinterpret_cast<int4*>(stage + kHeaderBytes + static_cast<size_t>(unit) * 16) = out;
                    if (kUseFP8 && lane % 8 == 0)
                        *reinterpret_cast<float*>(stage + kHeaderBytes + hidden + static_cast<size_t>(unit / 8) * 4) = scale;
                }
            }
            if (a.split_header) {
                // The data warps' part leaves at once (the header warp finishes later: measured
                // ~1.4 us after them); the header's copies follow in the token's group below.
                fence_proxy_async_shared();
                asm volatile("bar.sync 2, %0;" ::"r"(parts * 32) : "memory");
                if (warp == 0) {
                    route_token(ctx, a, ids, token, expert, dst);
                    leaders = message_leaders(dst, a.num_topk);
                    issue_copies(kHeaderBytes, copy_bytes - kHeaderBytes);
                }
            }
        } else if (warp == header_warp) {
            trace_mark(kTraceDispatch, 16, header_warp * 32);
            route_token(ctx, a, ids, token, expert, dst);
            const int pos_word = header_position_word(a.topk_idx, ids, token, a.num_topk, a.num_experts, expert,
                                                      expert_table, s_send.slot_count + warp * kMaxTopk);
            trace_mark_loaded(kTraceDispatch, 17, pos_word, header_warp * 32);
            const int value = header_lane_value(a, token, tag, expert, pos_word);
            if (lane < kHeaderInts + kHeaderPosInts) reinterpret_cast<int*>(stage)[lane] = value;
            trace_mark(kTraceDispatch, 15, header_warp * 32);
        }
        fence_proxy_async_shared();  // this thread's stage stores, before the copy engine reads them
        __syncthreads();
        trace_mark(kTraceDispatch, 12);
        if (warp == 0) {
            if (a.split_header) {
                issue_copies(0, kHeaderBytes);
            } else {
                route_token(ctx, a, ids, token, expert, dst);
                leaders = message_leaders(dst, a.num_topk);
                issue_copies(0, copy_bytes);
            }
            if (lane == 0) bulk_commit_group();
            trace_mark(kTraceDispatch, 13);
            // The next token reuses the stage of the token `stages` back: its copies must have
            // completed (then its flag goes out too: it is due anyway).
            if (token + static_cast<int>(gridDim.x) < a.num_tokens && iteration + 1 >= stages) {
                if (lane == 0) wait_copies(stages - 1);
                ++released;
                if (scan_free) release_flag(bulk_flag(tag, released));
            }
        }
    }
    trace_mark(kTraceDispatch, 1);
    if (scan_free) {
        // The remaining tokens' flags, each once its copies have completed, the last one as
        // kFlagAllTokens; the other warps go on to the receive.
        if (warp != 0) return;
        trace_mark(kTraceDispatch, kTraceFenced);
        const int issued = iteration;
        for (int r = released; r < issued; ++r) {
            if (lane == 0) wait_copies(issued - 1 - r);
            release_flag(bulk_flag(tag, r + 1 == issued ? kFlagAllTokens : static_cast<unsigned long long>(r + 1)));
        }
        if (issued == 0) release_flag(bulk_flag(tag, kFlagAllTokens));
    } else {
        if (threadIdx.x == 0) wait_copies(0);
        finish_send(ctx, g.signals, kTraceDispatch);  // its barrier orders thread 0's wait first
    }
    trace_mark(kTraceDispatch, 3);
}

// A received message's FP8 scales, held by a warp until they are stored to each of the message's
// output rows: fp32 groups `lane` and `lane + 32` (<= 64 groups), or with ue8m0 the packed word
// `lane` (<= 16 words, four exponents each).
struct RowScales {
    float val[2];
    int word;
};

__device__ __forceinline__ RowScales load_row_scales(const char* msg, int hidden, int num_groups, bool ue8m0,
                                                     int lane) {
    RowScales scales{{0.f, 0.f}, 0};
    const float* src = reinterpret_cast<const float*>(msg + kHeaderBytes + hidden);
    if (ue8m0) {
        if (lane < num_groups / 4) {
            const int4 s4 = ld_cg_int4(src + 4 * lane);
            scales.word = ((s4.x >> 23) & 0xFF) | (((s4.y >> 23) & 0xFF) << 8) | (((s4.z >> 23) & 0xFF) << 16) |
                          (((s4.w >> 23) & 0xFF) << 24);
        }
    } else {
#pragma unroll
        for (int j = 0; j < 2; ++j)
            if (lane + 32 * j < num_groups) scales.val[j] = __ldcg(src + lane + 32 * j);
    }
    return scales;
}

__device__ __forceinline__ void store_row_scales(const RowScales& scales, void* recv_scales, size_t out_row,
                                                 int num_groups, bool ue8m0, int lane) {
    if (ue8m0) {
        const int num_packed = num_groups / 4;
        if (lane < num_packed) static_cast<int*>(recv_scales)[out_row * num_packed + lane] = scales.word;
    } else {
#pragma unroll
        for (int j = 0; j < 2; ++j)
            if (lane + 32 * j < num_groups)
                static_cast<float*>(recv_scales)[out_row * num_groups + lane + 32 * j] = scales.val[j];
    }
}

// Receive with the header scan (shrink mode, or more than kMaxFastExperts experts; otherwise
// dispatch_recv_direct): one block per local expert (looping when there are more experts than blocks), or
// several when the grid has at least two blocks per expert: those make the same scan and split
// the copies. Wait for every source rank (one thread each), then scan all [source rank][token]
// slots as one sequence for tokens that chose this expert and copy them to the packed output;
// rows keep (source rank, token, top-k slot) order, so results are deterministic.
template <bool kUseFP8>
__device__ void dispatch_recv(const Context& ctx, const Geometry& g, const DispatchArgs& a, unsigned long long seq) {
    __shared__ int s_abort;
    __shared__ unsigned int s_skip_bits[kMaxRanks / 32];
    __shared__ int s_src_rows[kMaxRanks];
    __shared__ int s_warp_sums[kNumWarps];
    __shared__ int s_list_slot[kNumThreads];
    __shared__ int s_list_row[kNumThreads];
    __shared__ int s_list_kmask[kNumThreads];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_ranks = ctx.num_ranks;
    const int num_local = a.num_experts / num_ranks;
    const int hidden = a.hidden;
    const int num_max = a.num_max_tokens;
    const size_t num_slots = static_cast<size_t>(num_ranks) * num_max;
    const int total_slots = num_ranks * num_max;
    const unsigned long long expected = seq * gridDim.x;
    const int row_bytes = kUseFP8 ? hidden : hidden * 2;
    const int num_units = row_bytes / 16;
    const int num_groups = hidden / 128;
    const char* regions = g.buf + g.dispatch_recv_offset;

    // In shrink mode each block decides on its own which sources timed out: blocks that share
    // an expert could then disagree on its rows, so there every expert keeps one block.
    const BlockShare share = share_blocks(num_local, !ctx.enable_shrink);
    for (int e = share.first; e < num_local; e += share.step) {
        const int global_expert = ctx.rank * num_local + e;
        if (threadIdx.x == 0) s_abort = 0;
        for (int i = threadIdx.x; i < kMaxRanks / 32; i += blockDim.x) s_skip_bits[i] = 0u;
        for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) s_src_rows[i] = 0;
        __syncthreads();
        for (int src = threadIdx.x; src < num_ranks; src += blockDim.x) {
            const int status = wait_peer(ctx, g.signals + src, expected, src, kKernelDispatch, a.wait_recv_cost_stats,
                                         blockIdx.x == 0 && e == share.first);
            if (status == 2) s_abort = 1;
            if (status == 1) atomicOr(&s_skip_bits[src / 32], 1u << (src % 32));
        }
        __syncthreads();
        if (s_abort) return;  // timed out: error recorded, the host raises

        int row = 0;
        for (int base = 0; base < total_slots; base += kNumThreads) {
            const int slot_index = base + threadIdx.x;
            int kmask = 0;
            if (slot_index < total_slots) {
                const int src = slot_index / num_max;
                if (((s_skip_bits[src / 32] >> (src % 32)) & 1u) == 0u) {
                    kmask = header_match(regions + static_cast<size_t>(slot_index) * g.msg_bytes, seq, global_expert,
                                         global_expert + 1);
                    if (kmask != 0) atomicAdd(&s_src_rows[src], __popc(kmask));
                }
            }
            // One scan gives both the row offset (sum of matches) and the list index (count
            // of matching slots): matches in the low 16 bits, slots above.
            const int packed = __popc(kmask) | ((kmask != 0 ? 1 : 0) << 16);
            int warp_total;
            const int warp_prefix = warp_exclusive_scan(packed, &warp_total);
            if (lane == 0) s_warp_sums[warp] = warp_total;
            __syncthreads();
            int before = 0, total = 0;
            for (int w = 0; w < kNumWarps; ++w) {
                const int v = s_warp_sums[w];
                if (w < warp) before += v;
                total += v;
            }
            const int prefix = before + warp_prefix;
            if (kmask != 0) {
                const int index = prefix >> 16;
                s_list_slot[index] = slot_index;
                s_list_row[index] = row + (prefix & 0xFFFF);
                s_list_kmask[index] = kmask;
            }
            __syncthreads();
            const int num_listed = total >> 16;
            // The blocks sharing this expert take every shares-th listed slot, warp by warp.
            for (int i = share.share * kNumWarps + warp; i < num_listed; i += share.shares * kNumWarps) {
                const int slot_i = s_list_slot[i];
                const int src = slot_i / num_max, token = slot_i % num_max;
                const int first_row = s_list_row[i];
                const int kmask_i = s_list_kmask[i];
                const char* msg = regions + static_cast<size_t>(slot_i) * g.msg_bytes;
                // Scales first, then the data, all loads of the row before any store: one load
                // round per row (FP8 up to 8192 channels, bf16 up to 4096; two rounds above).
                RowScales row_scales{};
                if constexpr (kUseFP8)
                    row_scales = load_row_scales(msg, hidden, num_groups, a.use_ue8m0, lane);
                for (int u0 = lane; u0 < num_units; u0 += 32 * kCopyUnroll) {
                    int4 v[kCopyUnroll];
#pragma unroll
                    for (int i = 0; i < kCopyUnroll; ++i) {
                        const int u = u0 + 32 * i;
                        if (u < num_units) v[i] = ld_cg_int4(msg + kHeaderBytes + static_cast<size_t>(u) * 16);
                    }
                    int r = first_row;
                    for (int bits = kmask_i; bits != 0 && r < static_cast<int>(num_slots); bits &= bits - 1, ++r) {
                        char* out = static_cast<char*>(a.recv_x) + (static_cast<size_t>(e) * num_slots + r) * row_bytes;
#pragma unroll
                        for (int i = 0; i < kCopyUnroll; ++i) {
                            const int u = u0 + 32 * i;
                            if (u < num_units) st_int4(out + static_cast<size_t>(u) * 16, v[i]);
                        }
                    }
                }
                if constexpr (kUseFP8) {
                    int r = first_row;
                    for (int bits = kmask_i; bits != 0 && r < static_cast<int>(num_slots); bits &= bits - 1, ++r) {
                        store_row_scales(row_scales, a.recv_scales, static_cast<size_t>(e) * num_slots + r, num_groups,
                                         a.use_ue8m0, lane);
                    }
                }
                if (lane == 0) {
                    int r = first_row;
                    for (int bits = kmask_i; bits != 0 && r < static_cast<int>(num_slots); bits &= bits - 1, ++r) {
                        const int k = __ffs(bits) - 1;
                        a.src_info[static_cast<size_t>(e) * num_slots + r] = token | (k << 16) | (src << 20);
                        a.slot_rows[static_cast<size_t>(slot_i) * kMaxTopk + k] = static_cast<int>(static_cast<size_t>(e) * num_slots + r);
                    }
                }
            }
            row += total & 0xFFFF;
            __syncthreads();
        }
        if (threadIdx.x == 0 && share.share == 0) {
            int begin = 0;
            for (int src = 0; src < num_ranks; ++src) {
                a.layout_range[static_cast<size_t>(e) * num_ranks + src] =
                    (static_cast<int64_t>(begin) << 32) | static_cast<int64_t>(s_src_rows[src]);
                begin += s_src_rows[src];
            }
            a.recv_count[e] = min(row, static_cast<int>(num_slots));
            if (a.cumulative_recv_stats != nullptr) atomicAdd(a.cumulative_recv_stats + e, row);
        }
        __syncthreads();
    }
}
// Scan-free receive (no shrink mode, at most kMaxFastExperts experts). Every block waits for
// every source's counts (published first by one sending block, so they arrive while the tokens
// travel) and turns them into the first row of each (source, expert) block, in source order (the
// rows of expert e from source s start at the sum of the counts of sources < s); the sender's
// header gives each (token, slot) pair its position inside that block. Rows come out exactly where
// the header scan puts them: by (source, token, top-k slot). Then every warp of the grid takes a
// share of one received message: it waits for the delivery flags of the one or two sending blocks
// that wrote the token (not for every block of every source, so tokens are placed while later ones
// still arrive), reads the header and its share of the row once and stores it into every local
// expert the token chose. Shrink mode keeps the scan: a source timing out there is decided by each
// block on its own, and blocks that disagreed would place other sources' rows differently.
constexpr int kRecvMaxParts = 8;  // warps per message when the grid has that many per message
// Loads in flight per lane in the scan-free receive: with two or more warps per message a whole
// FP8 row of 7168 channels (at most 7 units per lane) is one round; 16 would spill.
constexpr int kDirectUnroll = 8;

// Barrier of the block's warps [first_warp, kNumWarps): the whole block's, or named barrier 1 for
// the receiving warps while warp 0 still sets the block's delivery flags. Orders shared memory
// (and, after acquires, global reads) like __syncthreads among the threads taking part.
__device__ __forceinline__ void recv_barrier(int first_warp) {
    if (first_warp == 0)
        __syncthreads();
    else
        asm volatile("bar.sync 1, %0;" ::"r"((kNumWarps - first_warp) * 32) : "memory");
}

// Whole warp: waits until source `src`'s sending blocks first_block ... first_block + count - 1
// (modulo the grid) have set their delivery flags to `expected` or more (a lane per flag: the
// call, or a bulk sender's bulk_flag). Returns the longest
// wait (ns) of the warp, or -1 after a timeout (recorded for the host). The barrier after the
// lanes' acquires orders every lane's later reads of the data those blocks delivered.
__device__ long long wait_sending_blocks(const Context& ctx, const Geometry& g, int src, int first_block, int count,
                                         unsigned long long expected, bool bulk_flags) {
    const int lane = threadIdx.x % 32;
    const int span = min(count, static_cast<int>(gridDim.x));
    long long waited_max = 0;
    bool failed = false;
    for (int i = lane; i < span; i += 32) {
        const int block = (first_block + i) % static_cast<int>(gridDim.x);
        const unsigned long long* flag = g.block_flags + static_cast<size_t>(src) * kMaxBlocks + block;
        unsigned long long seen = 0, waited = 0;
        if (wait_counter_at_least(flag, expected, ctx.timeout_ns, &seen, &waited) != kWaitOk) {
            report_timeout(ctx.error, ctx.rank, kKernelDispatch | (bulk_flags ? kKernelDeliveryFlag : 0), src, expected,
                           seen, waited);
            failed = true;
            break;  // the source is gone: one timeout, not one per flag
        }
        waited_max = max(waited_max, static_cast<long long>(waited));
    }
    __syncwarp();
    if (__any_sync(0xffffffffu, failed)) return -1;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        waited_max = max(waited_max, __shfl_xor_sync(0xffffffffu, waited_max, offset));
    return waited_max;
}

template <bool kUseFP8>
__device__ void dispatch_recv_direct(const Context& ctx, const Geometry& g, const DispatchArgs& a, unsigned long long seq,
                                     int first_warp) {
    // [source][local expert] first row of the block, [local expert] rows before the num_slots
    // clamp; a timed-out count wait, a timed-out task wait.
    __shared__ int s_offset[kMaxFastExperts];
    __shared__ int s_total[kMaxFastExperts];
    __shared__ int s_counts_abort, s_abort;

    // The receiving warps: [first_warp, kNumWarps) of the block (warp 0 may still be setting the
    // block's delivery flags, see dispatch_kernel); tid / warp count from the first of them.
    const int tid = static_cast<int>(threadIdx.x) - first_warp * 32;
    const int num_threads = (kNumWarps - first_warp) * 32;
    const int num_warps = kNumWarps - first_warp;
    const int warp = tid / 32, lane = tid % 32;
    const int marker = first_warp * 32;  // the thread that records trace marks
    const int num_ranks = ctx.num_ranks;
    const int num_local = a.num_experts / num_ranks;
    const int hidden = a.hidden;
    const int num_max = a.num_max_tokens;
    const int num_slots = num_ranks * num_max;

    // Every source's counts (without shrink mode, this path's condition, a wait either succeeds
    // or times out). The barrier after the waiting threads' acquires orders every thread's reads.
    // A receive-only launch (the hook) comes when the data is most likely in already: it waits for
    // every delivery flag here too, in the same load round, so its tasks need no wait of their own
    // (a dependent round trip each). After this launch's own send, tasks wait for their token's
    // senders only, to place tokens while others still travel.
    const bool flags_first = first_warp == 0;
    // A sending block's flag once all its data is here (bulk_flag counts a bulk sender's tokens).
    const unsigned long long all_sent = a.bulk_send ? bulk_flag(seq, kFlagAllTokens) : seq;
    // Block 0 measures the wait per source (wait_recv_cost_stats) below, so there it waits for
    // the delivery flags there, not here (the statistic would read zero).
    const bool stats_block = blockIdx.x == 0 && a.wait_recv_cost_stats != nullptr;
    if (tid == 0) {
        s_counts_abort = 0;
        s_abort = 0;  // read only after the barrier below the scan
    }
    recv_barrier(first_warp);
    const int num_flags = num_ranks + (flags_first && !stats_block ? num_ranks * static_cast<int>(gridDim.x) : 0);
    for (int i = tid; i < num_flags; i += num_threads) {
        if (*reinterpret_cast<volatile int*>(&s_counts_abort) != 0) break;  // one timeout is enough
        // [0, num_ranks): count flags; then the delivery flags [source][sending block].
        const int src = i < num_ranks ? i : (i - num_ranks) / static_cast<int>(gridDim.x);
        const unsigned long long* flag =
            i < num_ranks ? g.count_flags + i
                          : g.block_flags + static_cast<size_t>(src) * kMaxBlocks + (i - num_ranks) % static_cast<int>(gridDim.x);
        // Without shrink mode wait_peer returns 0 (in) or 2 (timed out, recorded).
        const int kernel = kKernelDispatch | (i >= num_ranks && a.bulk_send ? kKernelDeliveryFlag : 0);
        if (wait_peer(ctx, flag, i < num_ranks ? seq : all_sent, src, kernel, nullptr, false) != 0)
            s_counts_abort = 1;
    }
    recv_barrier(first_warp);
    if (s_counts_abort != 0) return;  // the host raises
    trace_mark(kTraceDispatch, 4, marker);

    const int row_bytes = kUseFP8 ? hidden : hidden * 2;
    const int num_units = row_bytes / 16;
    const int num_groups = hidden / 128;
    const int total_warps = static_cast<int>(gridDim.x) * num_warps;
    const int parts = max(1, min(kRecvMaxParts, total_warps / num_slots));
    const int num_tasks = num_slots * parts;
    const int expert_begin = ctx.rank * num_local;
    const char* regions = g.buf + g.dispatch_recv_offset;
    const int stride = 32 * parts;
    // One round of a task's share of the row.
    int4 v[kDirectUnroll];
    auto load_chunk = [&](const char* msg, int c0) {
#pragma unroll
        for (int i = 0; i < kDirectUnroll; ++i) {
            const int u = c0 + lane + stride * i;
            if (u < num_units) v[i] = ld_cg_int4(msg + kHeaderBytes + static_cast<size_t>(u) * 16);
        }
    };

    // Each source's last sending block wrote its counts before its count flag (publish_dispatch_counts).
    // The exclusive scan over the sources, per local expert. Up to kScanInRegisters ranks: one
    // thread per expert, the loads of all sources in one round, the sums in registers (no
    // barrier between load and scan: the warp-per-expert scan below took ~3 us at 2 ranks).
    // More ranks: counts staged in shared memory, one warp per expert scanning 32 sources a step.
    const int* counts = reinterpret_cast<const int*>(g.buf + g.count_offset);
    const int num_pairs = num_ranks * num_local;
    constexpr int kScanInRegisters = 16;
    if (num_ranks <= kScanInRegisters) {
        for (int e = tid; e < num_local; e += num_threads) {
            int c[kScanInRegisters];
#pragma unroll
            for (int i = 0; i < kScanInRegisters; ++i)
                c[i] = i < num_ranks ? __ldcg(counts + static_cast<size_t>(i) * num_local + e) : 0;
            int running = 0;
#pragma unroll
            for (int i = 0; i < kScanInRegisters; ++i) {
                if (i < num_ranks) s_offset[i * num_local + e] = running;
                running += c[i];
            }
            s_total[e] = running;
        }
    } else {
        for (int i = tid; i < num_pairs; i += num_threads) s_offset[i] = __ldcg(counts + i);
        recv_barrier(first_warp);
        for (int e = warp; e < num_local; e += num_warps) {
            int running = 0;
            for (int s0 = 0; s0 < num_ranks; s0 += 32) {
                // Each lane reads and rewrites only its own entry.
                const int src = s0 + lane;
                const int c = src < num_ranks ? s_offset[src * num_local + e] : 0;
                int total;
                const int prefix = warp_exclusive_scan(c, &total);
                if (src < num_ranks) s_offset[src * num_local + e] = running + prefix;
                running += total;
            }
            if (lane == 0) s_total[e] = running;
        }
    }
    recv_barrier(first_warp);
    trace_mark(kTraceDispatch, 5, marker);

    // Block 0 writes the per-expert bookkeeping (the same values as the scan: counts and block
    // starts unclamped, recv_count clamped to the slots).
    if (blockIdx.x == 0) {
        for (int i = tid; i < num_pairs; i += num_threads) {
            const int src = i / num_local, e = i % num_local;
            const int begin = s_offset[i];
            const int end = src + 1 < num_ranks ? s_offset[i + num_local] : s_total[e];
            a.layout_range[static_cast<size_t>(e) * num_ranks + src] =
                (static_cast<int64_t>(begin) << 32) | static_cast<int64_t>(end - begin);
        }
        for (int e = tid; e < num_local; e += num_threads) {
            a.recv_count[e] = min(s_total[e], num_slots);
            if (a.cumulative_recv_stats != nullptr) atomicAdd(a.cumulative_recv_stats + e, s_total[e]);
        }
        // The wait per source: how long until all its data was here, a warp per source (block 0
        // only, and only when asked: its own tasks then start after every source's data is in,
        // no later than the last token's placement anyway).
        if (stats_block) {
            for (int src = warp; src < num_ranks; src += num_warps) {
                // One timeout is enough; one lane's read decides for the warp (whole-warp wait below).
                if (__any_sync(0xffffffffu, *reinterpret_cast<volatile int*>(&s_abort) != 0)) break;
                const long long waited = wait_sending_blocks(ctx, g, src, 0, static_cast<int>(gridDim.x), all_sent, a.bulk_send);
                if (waited < 0) s_abort = 1;
                else if (lane == 0) atomicAdd(reinterpret_cast<unsigned long long*>(a.wait_recv_cost_stats + src),
                                              static_cast<unsigned long long>(waited));
            }
            // A receive-only launch's tasks wait for no flag of their own: every source's data
            // must be in (the loop above) before any of this block's tasks reads it.
            if (flags_first) recv_barrier(first_warp);
        }
    }

    const int send_parts = dispatch_data_parts<kUseFP8>(hidden) + 1;  // the sender's tasks per token
    // Tasks are dealt round the blocks (task t on block t % grid), so every SM places a share of
    // the rows: filling block after block left the last blocks idle and the first ones with
    // every warp storing (at 128 tokens on 4 ranks, 1536 tasks: 15 per block on 103 blocks
    // against 12 on each of 128; dispatch 0.4-0.7 us faster, measured).
    const int first_task = warp * static_cast<int>(gridDim.x) + static_cast<int>(blockIdx.x);
    for (int task = first_task; task < num_tasks; task += total_warps) {
        const int slot = task / parts, part = task % parts;
        const int src = slot / num_max, token = slot % num_max;
        const char* msg = regions + static_cast<size_t>(slot) * g.msg_bytes;
        // A timed-out wait ends the receive (the host raises); this warp's next tasks wait no more.
        // One lane's read decides for the warp: the shuffles and ballots below need every lane.
        if (__any_sync(0xffffffffu, *reinterpret_cast<volatile int*>(&s_abort) != 0)) break;
        // The sending blocks of this token: its tasks' blocks, or with the bulk send block
        // token % grid alone (dispatch_send_bulk).
        const int first_send_task = token * send_parts;
        const int first_block = a.bulk_send ? token % static_cast<int>(gridDim.x) : first_send_task / kNumWarps;
        const int num_senders = a.bulk_send ? 1 : (first_send_task + send_parts - 1) / kNumWarps - first_block + 1;
        // A bulk sender's token is in once its flag counts the token's turn in the block.
        const unsigned long long sent = a.bulk_send ? bulk_flag(seq, token / static_cast<int>(gridDim.x) + 1) : seq;
        if (!flags_first && wait_sending_blocks(ctx, g, src, first_block, num_senders, sent, a.bulk_send) < 0) {
            if (lane == 0) s_abort = 1;
            break;
        }
        // One load round: the header (lane k < kMaxTopk reads slot k's expert and position word)
        // and this share of the row, loaded before the header says whether any of the token's
        // experts is here (a wasted load for a skipped slot costs less than a second round). Not
        // before the offsets above: queued ahead of the count loads there, they delayed them.
        const int* header = reinterpret_cast<const int*>(msg);
        const int tag = __ldcg(header + kTagInt);
        const int num_topk = __ldcg(header + kTopkCountInt);
        int id = -1, pos_word = 0;
        if (lane < kMaxTopk) {
            id = __ldcg(header + lane);
            pos_word = __ldcg(header + kHeaderInts + lane / 2);
        }
        load_chunk(msg, part * 32);
        // Not written in this call (tag of an older one), or none of the token's slots here.
        const bool mine = tag == static_cast<int>(static_cast<unsigned int>(seq)) && lane < min(num_topk, kMaxTopk) &&
                          id >= expert_begin && id < expert_begin + num_local;
        const unsigned int kmask = __ballot_sync(0xffffffffu, mine);
        trace_mark(kTraceDispatch, 8, marker);
        if (kmask == 0u) continue;  // warp-uniform
        int local_e = 0, row = num_slots;
        if (mine) {
            local_e = id - expert_begin;
            row = s_offset[src * num_local + local_e] +
                  static_cast<int>((static_cast<unsigned int>(pos_word) >> (16 * (lane & 1))) & 0xFFFFu);
        }
        // Rows past the slots (only with repeated ids in one token) are dropped, as in the scan.
        const bool stores = mine && row < num_slots;
        const unsigned int smask = __ballot_sync(0xffffffffu, stores);

        // Scales (share 0), then this share's data, all loads before any store.
        RowScales row_scales{};
        if constexpr (kUseFP8) {
            if (part == 0)
                row_scales = load_row_scales(msg, hidden, num_groups, a.use_ue8m0, lane);
        }
        // The loop bound is the same for every lane (the shuffles below need the whole warp);
        // lanes past the row's end are masked inside. The first round was loaded with the header.
        for (int c0 = part * 32; c0 < num_units; c0 += stride * kDirectUnroll) {
            const int u0 = c0 + lane;
            if (c0 != part * 32) load_chunk(msg, c0);
            trace_mark_loaded(kTraceDispatch, 9, v[0].x, marker);
            for (unsigned int bits = smask; bits != 0u; bits &= bits - 1u) {  // warp-uniform
                const int k = __ffs(static_cast<int>(bits)) - 1;
                const size_t out_row = static_cast<size_t>(__shfl_sync(0xffffffffu, local_e, k)) * num_slots +
                                       __shfl_sync(0xffffffffu, row, k);
                char* out = static_cast<char*>(a.recv_x) + out_row * row_bytes;
#pragma unroll
                for (int i = 0; i < kDirectUnroll; ++i) {
                    const int u = u0 + stride * i;
                    if (u < num_units) st_int4(out + static_cast<size_t>(u) * 16, v[i]);
                }
            }
        }
        if (part != 0) continue;
        if constexpr (kUseFP8) {
            for (unsigned int bits = smask; bits != 0u; bits &= bits - 1u) {  // warp-uniform
                const int k = __ffs(static_cast<int>(bits)) - 1;
                const size_t out_row = static_cast<size_t>(__shfl_sync(0xffffffffu, local_e, k)) * num_slots +
                                       __shfl_sync(0xffffffffu, row, k);
                store_row_scales(row_scales, a.recv_scales, out_row, num_groups, a.use_ue8m0, lane);
            }
        }
        if (stores) {
            const size_t out_row = static_cast<size_t>(local_e) * num_slots + row;
            a.src_info[out_row] = token | (lane << 16) | (src << 20);
            a.slot_rows[static_cast<size_t>(slot) * kMaxTopk + lane] = static_cast<int>(out_row);
        }
    }
    trace_mark(kTraceDispatch, 6, marker);
}

template <bool kUseFP8>
__global__ void __launch_bounds__(kNumThreads, 1) dispatch_kernel(Context ctx, Geometry g, DispatchArgs a, int buffer_idx) {
    BufferState* states = ctx.state + static_cast<size_t>(buffer_idx) * kMaxBlocks;
    const BufferState* state = states + blockIdx.x;
    const unsigned long long send_call = state->dispatch_send_calls + 1;
    const unsigned long long recv_call = state->dispatch_recv_calls + 1;
    trace_start();
    if (a.phases & kPhaseSend) {
        if (a.bulk_send)
            dispatch_send_bulk<kUseFP8>(ctx, g, a, send_call);
        else
            dispatch_send<kUseFP8>(ctx, g, a, send_call);
    }
    if (a.phases & kPhaseRecv) {
        // The senders publish counts and delivery flags exactly when the receive is scan-free.
        // After this launch's send, warp 0 is still setting the block's delivery flags: the
        // other warps receive without it (named barriers); a receive-only launch uses them all.
        if (scan_free_receive(ctx, a)) {
            const int first_warp = (a.phases & kPhaseSend) ? 1 : 0;
            if (static_cast<int>(threadIdx.x) >= first_warp * 32)
                dispatch_recv_direct<kUseFP8>(ctx, g, a, recv_call, first_warp);
        } else {
            dispatch_recv<kUseFP8>(ctx, g, a, recv_call);
        }
    }
    finish_call(states, (a.phases & kPhaseSend) ? &BufferState::dispatch_send_calls : nullptr, send_call,
                (a.phases & kPhaseRecv) ? &BufferState::dispatch_recv_calls : nullptr, recv_call);
    // A send-only launch (hook mode) ends at point 11; calls count the launches that receive.
    trace_mark(kTraceDispatch, (a.phases & kPhaseRecv) ? 7 : 11);
    if (a.phases & kPhaseRecv) trace_call_done(kTraceDispatch);
}

// ---------------------------------------------------------------------------------------------
// Combine
// ---------------------------------------------------------------------------------------------
__device__ void combine_send(const Context& ctx, const Geometry& g, const CombineArgs& a) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_local = a.num_experts / ctx.num_ranks;
    const size_t num_slots = static_cast<size_t>(ctx.num_ranks) * a.num_max_tokens;
    const size_t row_bytes = static_cast<size_t>(a.hidden) * 2;
    const int num_units = a.hidden / 8;
    // A 7168-channel bf16 row is 28 units per lane: four load rounds of 8 (more would spill:
    // the combine kernel is at its 128-register bound).
    constexpr int kUnroll = 8;

    // Blocks that share an expert take every shares-th of its rows, warp by warp.
    // Rows are independent here (each checks its own destination's mask).
    const BlockShare share = share_blocks(num_local, true);
    for (int e = share.first; e < num_local; e += share.step) {
        const int count = a.recv_count[e];
        for (int r = share.share * kNumWarps + warp; r < count; r += share.shares * kNumWarps) {
            const size_t row_index = static_cast<size_t>(e) * num_slots + r;
            const int info = a.src_info[row_index];
            const int token = info & 0xFFFF, k = (info >> 16) & 0xF, src = static_cast<int>(static_cast<unsigned int>(info) >> 20);
            if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + src) != 0) continue;
            char* send_row = g.buf + g.combine_send_offset + row_index * row_bytes;
            const char* row = a.zero_copy ? send_row : static_cast<const char*>(a.x) + row_index * row_bytes;
            char* dst_local = g.buf + g.combine_recv_offset + (static_cast<size_t>(token) * g.combine_slots + k) * row_bytes;
            char* peer = peer_address(ctx, dst_local, src);
            if (peer != nullptr) {
                for (int u0 = 0; u0 < num_units; u0 += 32 * kUnroll) {
                    int4 v[kUnroll];
#pragma unroll
                    for (int i = 0; i < kUnroll; ++i) {
                        const int u = u0 + i * 32 + lane;
                        if (u < num_units) v[i] = ld_nc_int4(row + static_cast<size_t>(u) * 16);
                    }
#pragma unroll
                    for (int i = 0; i < kUnroll; ++i) {
                        const int u = u0 + i * 32 + lane;
                        if (u < num_units) st_int4(peer + static_cast<size_t>(u) * 16, v[i]);
                    }
                }
            } else {
                if (!a.zero_copy) {
                    for (int u = lane; u < num_units; u += 32)
                        st_int4(send_row + static_cast<size_t>(u) * 16, ld_nc_int4(row + static_cast<size_t>(u) * 16));
                    __threadfence();
                    __syncwarp();
                }
                nvshmemx_putmem_nbi_warp(dst_local, send_row, row_bytes, src);
            }
        }
    }
    trace_mark(kTraceCombine, 1);
    finish_send(ctx, g.signals, kTraceCombine);
    trace_mark(kTraceCombine, 3);
}

// The receive side of both combine modes: wait for every rank's blocks, then split the tokens'
// rows over the grid's warps (up to kCombineWarpsPerToken parts per token). Each warp hands
// `reduce` its token, part and slots, and per lane < num_topk the rank that holds that top-k
// entry's expert (-1: none, out of range, or masked) and its weight.
template <typename ReduceToken>
__device__ void combine_recv_tokens(const Context& ctx, const Geometry& g, const CombineArgs& a, unsigned long long seq,
                                    ReduceToken reduce) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_local = a.num_experts / ctx.num_ranks;
    const unsigned long long expected = seq * gridDim.x;
    if (!wait_every_source(ctx, g.signals, expected, kKernelCombine, a.wait_recv_cost_stats)) return;
    trace_mark(kTraceCombine, 4);

    const size_t row_bytes = static_cast<size_t>(a.hidden) * 2;
    const int num_units = a.hidden / 8;
    const int num_chunks = (num_units + 31) / 32;
    const int parts = min(kCombineWarpsPerToken, num_chunks);
    const int num_tasks = a.num_tokens * parts;
    for (int task = blockIdx.x * kNumWarps + warp; task < num_tasks; task += gridDim.x * kNumWarps) {
        const int token = task / parts, part = task % parts;
        int rank_of = -1;
        float weight = 0.f;
        if (lane < a.num_topk) {
            const int64_t expert = __ldg(a.topk_idx + static_cast<size_t>(token) * a.num_topk + lane);
            weight = __ldg(a.topk_weights + static_cast<size_t>(token) * a.num_topk + lane);
            if (expert >= 0 && expert < a.num_experts) {
                rank_of = static_cast<int>(expert / num_local);
                if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + rank_of) != 0) rank_of = -1;
            }
        }
        const char* slots = g.buf + g.combine_recv_offset + static_cast<size_t>(token) * g.combine_slots * row_bytes;
        char* out = static_cast<char*>(a.out) + static_cast<size_t>(token) * row_bytes;
        reduce(slots, out, row_bytes, part, parts, num_units, rank_of, weight);
    }
    trace_mark(kTraceCombine, 6);
}

// Rows mode: the weighted sum of the token's top-k rows (slot k holds top-k entry k's row).
__device__ void combine_recv(const Context& ctx, const Geometry& g, const CombineArgs& a, unsigned long long seq) {
    const int lane = threadIdx.x % 32;
    combine_recv_tokens(ctx, g, a, seq,
                        [&](const char* slots, char* out, size_t row_bytes, int part, int parts, int num_units,
                            int rank_of, float weight) {
                            const unsigned int valid_mask = __ballot_sync(0xffffffffu, rank_of >= 0);
                            // Up to 8 top-k rows x 2 chunks per load round: one round at top-8 and
                            // 7168 channels.
                            reduce_rows<8, 2>(slots, row_bytes, part, parts, num_units, valid_mask, lane, weight, out);
                        });
}

// ---------------------------------------------------------------------------------------------
// Combine, reduced mode: the home rank broadcasts its top-k weights; each rank sums, per
// received token, the weighted rows of its local experts and sends that one partial row into
// the home rank's slot [token][this rank]; the home rank adds the partial rows.
// ---------------------------------------------------------------------------------------------
// A combine weight in the inbox: the call's number above the fp32 bits, one 64-bit word, so the
// word itself says whether it is this call's (no fence and no counter on the P2P path).
__device__ __forceinline__ unsigned long long tagged_weight(unsigned long long call, float w) {
    return (static_cast<unsigned long long>(static_cast<unsigned int>(call)) << 32) | __float_as_uint(w);
}

// This rank's top-k weights [token][kMaxTopk] (tagged_weight words) into every unmasked rank's
// inbox row [this rank]. kWeightWarps warps per destination each write a slice (16-byte stores,
// one round at 128 tokens). A P2P destination polls the words' tags: the weights are usable the
// moment they land, with no fence behind the NVLink traffic of the rows (that fence and the
// counter took ~6 us of the combine's critical path). A destination reached by puts gets a
// "weights arrived" count per warp after the put, so a call adds kWeightWarps there.
__device__ void broadcast_weights(const Context& ctx, const Geometry& g, const CombineArgs& a, unsigned long long call) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    // A put destination costs a put, a fence and a signal per item: those items go round the
    // blocks first, so no block's own sends wait behind several of them.
    const int global_warp = ctx.any_remote ? warp * gridDim.x + blockIdx.x : blockIdx.x * kNumWarps + warp;
    const int num_warps = gridDim.x * kNumWarps;
    const int num_ranks = ctx.num_ranks, num_max = a.num_max_tokens;
    unsigned long long* own_inbox =
        reinterpret_cast<unsigned long long*>(g.buf + g.weights_offset) + static_cast<size_t>(ctx.rank) * num_max * kMaxTopk;
    // kMaxTopk (16) words per token: eight 16-byte groups.
    constexpr int kGroupsPerToken = kMaxTopk / 2;
    const int num_groups = a.num_tokens * kGroupsPerToken;
    // Each warp writes one contiguous slice (64 groups at 128 tokens: two stores per lane).
    const int per_warp = (num_groups + kWeightWarps - 1) / kWeightWarps;
    for (int item = global_warp; item < num_ranks * kWeightWarps; item += num_warps) {
        const int dst = item / kWeightWarps, sub = item % kWeightWarps;
        if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + dst) != 0) continue;
        char* peer = peer_address(ctx, own_inbox, dst);
        unsigned long long* target = peer != nullptr ? reinterpret_cast<unsigned long long*>(peer) : own_inbox;
        const int begin = min(sub * per_warp, num_groups), end = min(begin + per_warp, num_groups);
        for (int q = begin + lane; q < end; q += 32) {
            const int t = q / kGroupsPerToken, k0 = (q % kGroupsPerToken) * 2;
            float w[2];
#pragma unroll
            for (int j = 0; j < 2; ++j)
                w[j] = k0 + j < a.num_topk ? __ldg(a.topk_weights + static_cast<size_t>(t) * a.num_topk + k0 + j) : 0.f;
            st_relaxed_sys_v2_u64(target + static_cast<size_t>(q) * 2, tagged_weight(call, w[0]), tagged_weight(call, w[1]));
        }
        if (peer != nullptr) continue;
        fence_acq_rel_sys();  // the staged words before the put that reads them (any transport)
        __syncwarp();
        if (end > begin)
            nvshmemx_putmem_nbi_warp(own_inbox + static_cast<size_t>(begin) * 2, own_inbox + static_cast<size_t>(begin) * 2,
                                     static_cast<size_t>(end - begin) * 2 * sizeof(unsigned long long), dst);
        if (lane == 0) {
            nvshmem_fence();
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(g.weight_signals + ctx.rank), 1ull, NVSHMEM_SIGNAL_ADD, dst);
        }
    }
}

__device__ void combine_send_reduced(const Context& ctx, const Geometry& g, const CombineArgs& a,
                                     unsigned long long weights_call, unsigned long long dispatch_call) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // With puts a slot is one task: those go round the blocks first, so every block sends a share
    // instead of the first few sending all.
    const int global_warp = ctx.any_remote ? warp * gridDim.x + blockIdx.x : blockIdx.x * kNumWarps + warp;
    const int num_warps = gridDim.x * kNumWarps;
    const int num_ranks = ctx.num_ranks, num_max = a.num_max_tokens;
    const int num_local = a.num_experts / num_ranks;
    const size_t num_slots = static_cast<size_t>(num_ranks) * num_max;
    const size_t row_bytes = static_cast<size_t>(a.hidden) * 2;
    const int num_units = a.hidden / 8;
    const int num_chunks = (num_units + 31) / 32;

    // One partial row per received (source rank, token) with local experts.
    const int parts = ctx.any_remote ? 1 : min(kReducedWarpsPerSlot, num_chunks);
    const int num_tasks = num_ranks * num_max * parts;
    const char* regions = g.buf + g.dispatch_recv_offset;
    const char* x = a.zero_copy ? g.buf + g.combine_send_offset : static_cast<const char*>(a.x);
    int ready_src = -1;   // the last source whose weights this warp has seen arrive
    int failed_src = -1;  // a source whose weights this warp gave up on (recorded): skip its tasks
    // Every weight warp of the source adds one per call (broadcast_weights).
    const unsigned long long weights_expected = weights_call * kWeightWarps;
    for (int task = global_warp; task < num_tasks; task += num_warps) {
        const int slot = task / parts, part = task % parts;
        const int src = slot / num_max, token = slot % num_max;
        if (src == failed_src || (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + src) != 0)) continue;
        // The rows of the slot's local top-k entries (written by this handle's dispatch receive)
        // load in the same round as the header: only the entries of `kmask` are used.
        const int row = lane < kMaxTopk ? __ldcg(a.slot_rows + static_cast<size_t>(slot) * kMaxTopk + lane) : 0;
        const int kmask = header_match(regions + static_cast<size_t>(slot) * g.msg_bytes, dispatch_call,
                                       ctx.rank * num_local, (ctx.rank + 1) * num_local);
        if (kmask == 0) continue;  // warp-uniform: every lane read the same header
        // With just one of the token's top-k experts here the row goes out unweighted and the
        // home rank applies the weight (combine_recv_reduced): no wait for the home rank's
        // weights, so these rows (about a third at top-8 of 256 on 4 ranks) start the NVLink
        // traffic while the weights are still on their way.
        const bool single = __popc(kmask) == 1;
        // Its weights came by put: count first. (Reachability by direct stores is symmetric, as
        // NVLink P2P mappings are: the source chose its protocol from its own peer_bases entry.)
        const bool put_source = ctx.peer_bases[src] == 0ull;
        if (!single && put_source && src != ready_src) {
            int status = 0;
            if (lane == 0) status = wait_peer(ctx, g.weight_signals + src, weights_expected, src, kKernelCombine, nullptr, false);
            status = __shfl_sync(0xffffffffu, status, 0);
            __syncwarp();  // lane 0's acquire orders the other lanes' reads of the weights too
            if (status != 0) {
                failed_src = src;
                continue;
            }
            ready_src = src;
        }
        const unsigned long long* inbox = reinterpret_cast<const unsigned long long*>(g.buf + g.weights_offset) +
                                          (static_cast<size_t>(src) * num_max + token) * kMaxTopk;
        float weight = single ? 1.f : 0.f;
        int status = 0;
        if (!single && lane < kMaxTopk && ((kmask >> lane) & 1)) {
            // The word carries its call (tagged_weight): wait (bounded) until this call's is here.
            const unsigned int want = static_cast<unsigned int>(weights_call);
            unsigned long long word = ld_relaxed_sys_u64(inbox + lane);
            if (static_cast<unsigned int>(word >> 32) != want) {
                const unsigned long long start = global_timer_ns();
                while (static_cast<unsigned int>(word >> 32) != want) {
                    const unsigned long long now = global_timer_ns();
                    if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + src) != 0) {
                        status = 1;  // masked meanwhile (another warp timed out on it)
                        break;
                    }
                    if (now - start > ctx.timeout_ns) {
                        status = give_up_on_peer(ctx, src, kKernelCombine, want, word >> 32, now - start);
                        break;
                    }
                    word = ld_relaxed_sys_u64(inbox + lane);
                }
            }
            weight = __uint_as_float(static_cast<unsigned int>(word));
        }
        if (__any_sync(0xffffffffu, status != 0)) {
            failed_src = src;
            continue;
        }
        char* dst_local = g.buf + g.combine_recv_offset + (static_cast<size_t>(token) * g.combine_slots + ctx.rank) * row_bytes;
        char* peer = peer_address(ctx, dst_local, src);
        char* stage = g.buf + g.stage_offset + static_cast<size_t>(slot) * row_bytes;
        char* target = peer != nullptr ? peer : stage;
        // This rank's experts of the token (about 2 at top-8 of 256 on 4 ranks) x 4 chunks per
        // load round: two rounds for a warp's 7 chunks of a 7168-channel row.
        reduce_rows<2, 4>(x, row_bytes, part, parts, num_units, static_cast<unsigned int>(kmask), row, weight, target);
        if (peer == nullptr) {
            __threadfence();
            __syncwarp();
            nvshmemx_putmem_nbi_warp(dst_local, stage, row_bytes, src);
        }
    }
    (void)num_slots;
    trace_mark(kTraceCombine, 1);
    finish_send(ctx, g.signals, kTraceCombine);
    trace_mark(kTraceCombine, 3);
}

// Reduced mode: slot r holds rank r's partial row of the token; the home rank adds them.
__device__ void combine_recv_reduced(const Context& ctx, const Geometry& g, const CombineArgs& a, unsigned long long seq) {
    const int lane = threadIdx.x % 32;
    combine_recv_tokens(ctx, g, a, seq, [&](const char* slots, char* out, size_t row_bytes, int part, int parts,
                                            int num_units, int rank_of, float weight) {
        // One partial row per distinct rank: the first top-k slot naming it leads.
        bool leader = rank_of >= 0;
        for (int k = 0; k < a.num_topk; ++k) {
            const int other = __shfl_sync(0xffffffffu, rank_of, k);
            if (k < lane && other == rank_of) leader = false;
        }
        const unsigned int leaders = __ballot_sync(0xffffffffu, leader);
        // A rank that holds just one of the token's top-k entries sent that expert's row
        // unweighted (combine_send_reduced: it did not wait for our weights), so the weight is
        // applied here; a rank holding several sent their weighted sum (weight 1 here).
        const unsigned int same_rank = __match_any_sync(0xffffffffu, rank_of);
        const float row_weight = leader && __popc(same_rank) == 1 ? weight : 1.f;
        // Up to 4 ranks' partial rows x 2 chunks per load round: one round at 4 ranks.
        reduce_rows<4, 2>(slots, row_bytes, part, parts, num_units, leaders, rank_of, row_weight, out);
    });
}

__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(Context ctx, Geometry g, CombineArgs a, int buffer_idx) {
    BufferState* states = ctx.state + static_cast<size_t>(buffer_idx) * kMaxBlocks;
    const BufferState* state = states + blockIdx.x;
    const unsigned long long send_call = state->combine_send_calls + 1;
    const unsigned long long recv_call = state->combine_recv_calls + 1;
    // The dispatch of this handle was the last one received on this buffer.
    const unsigned long long dispatch_call = state->dispatch_recv_calls;
    trace_start();
    if (a.phases & kPhaseSend) {
        // The weights go out in both modes, so the "weights arrived" counters count calls.
        broadcast_weights(ctx, g, a, send_call);
        trace_mark(kTraceCombine, 0);
        if (a.reduced)
            combine_send_reduced(ctx, g, a, send_call, dispatch_call);
        else
            combine_send(ctx, g, a);
    }
    if (a.phases & kPhaseRecv) {
        if (a.reduced)
            combine_recv_reduced(ctx, g, a, recv_call);
        else
            combine_recv(ctx, g, a, recv_call);
    }
    finish_call(states, (a.phases & kPhaseSend) ? &BufferState::combine_send_calls : nullptr, send_call,
                (a.phases & kPhaseRecv) ? &BufferState::combine_recv_calls : nullptr, recv_call);
    // A send-only launch (hook mode) ends at point 11; calls count the launches that receive.
    trace_mark(kTraceCombine, (a.phases & kPhaseRecv) ? 7 : 11);
    if (a.phases & kPhaseRecv) trace_call_done(kTraceCombine);
}

Geometry make_geometry(const Context& ctx, const Layout& layout, int buffer_idx, int kind) {
    Geometry g;
    g.heap = static_cast<char*>(ctx.heap);
    g.buf = g.heap + layout.buffer_offset[buffer_idx];
    unsigned long long* signal_base = reinterpret_cast<unsigned long long*>(g.heap + layout.signal_offset);
    g.signals = signal_base + static_cast<size_t>(buffer_idx * 3 + kind) * ctx.num_ranks;
    g.weight_signals = signal_base + static_cast<size_t>(buffer_idx * 3 + 2) * ctx.num_ranks;
    g.block_flags = reinterpret_cast<unsigned long long*>(g.buf + layout.dispatch_flag_offset);
    g.count_flags = g.block_flags + static_cast<size_t>(ctx.num_ranks) * kMaxBlocks;
    g.msg_bytes = layout.msg_bytes;
    g.dispatch_recv_offset = layout.dispatch_recv_offset;
    g.dispatch_send_offset = layout.dispatch_send_offset;
    g.combine_recv_offset = layout.combine_recv_offset;
    g.combine_send_offset = layout.combine_send_offset;
    g.weights_offset = layout.weights_offset;
    g.stage_offset = layout.stage_offset;
    g.count_offset = layout.count_offset;
    g.combine_slots = layout.combine_slots_per_token;
    return g;
}

}  // namespace

Layout make_layout(int num_max_tokens, int hidden, int num_ranks, int num_experts) {
    constexpr size_t kAlign = 4096;
    const size_t m = static_cast<size_t>(num_max_tokens), h = static_cast<size_t>(hidden);
    const size_t r = static_cast<size_t>(num_ranks);
    const size_t num_local = static_cast<size_t>(num_experts / num_ranks);
    Layout layout{};
    // bf16 is the widest form: fp8 data plus fp32 scales take hidden + hidden / 32 bytes.
    layout.msg_bytes = align_up(kHeaderBytes + h * 2, 16);
    layout.signal_offset = 0;
    const size_t signal_bytes = align_up(2 * 3 * r * sizeof(unsigned long long), kAlign);
    layout.combine_slots_per_token = std::max(kMaxTopk, num_ranks);
    layout.dispatch_recv_offset = 0;
    layout.dispatch_send_offset = align_up(layout.dispatch_recv_offset + r * m * layout.msg_bytes, kAlign);
    layout.dispatch_flag_offset = align_up(layout.dispatch_send_offset + m * layout.msg_bytes, kAlign);
    layout.combine_recv_offset =
        align_up(layout.dispatch_flag_offset + r * (kMaxBlocks + 1) * sizeof(unsigned long long), kAlign);
    layout.combine_send_offset =
        align_up(layout.combine_recv_offset + m * static_cast<size_t>(layout.combine_slots_per_token) * h * 2, kAlign);
    layout.weights_offset = align_up(layout.combine_send_offset + num_local * r * m * h * 2, kAlign);
    layout.stage_offset = align_up(layout.weights_offset + r * m * kMaxTopk * sizeof(unsigned long long), kAlign);
    layout.count_offset = align_up(layout.stage_offset + r * m * h * 2, kAlign);
    layout.buffer_bytes = align_up(layout.count_offset + 2 * r * num_local * sizeof(int), kAlign);
    layout.buffer_offset[0] = signal_bytes;
    layout.buffer_offset[1] = signal_bytes + layout.buffer_bytes;
    layout.total_bytes = signal_bytes + 2 * layout.buffer_bytes;
    return layout;
}

int num_blocks(int num_max_tokens, int num_local_experts) {
    // Enough warps for every token's share of the send (128 blocks at 128 tokens: every SM of
    // an H100/H200 but four, so the latency-bound phases have the most loads and stores in
    // flight), at least one block per local expert for the receive, never more blocks than can
    // be resident at once (receivers spin; one 512-thread block per SM is assumed). The SM count
    // is the same on every rank of a homogeneous job, which the signal counts rely on.
    const int for_send = (num_max_tokens * kWarpsPerToken + kNumWarps - 1) / kNumWarps;
    int device = 0, num_sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || num_sms <= 0) {
        (void)cudaGetLastError();  // not this call's launch error
        num_sms = kMaxBlocks;
    }
    const int limit = std::min(kMaxBlocks, num_sms);
    // DEEP_EP_LL_NUM_BLOCKS (read once; the same on every rank) fixes the grid, for measuring
    // other geometries: every loop of the kernels is grid-stride, any grid size is correct.
    static const int forced = env_int("DEEP_EP_LL_NUM_BLOCKS", 0);
    if (forced > 0) return std::min(limit, forced);
    return std::max(1, std::min(limit, std::max(for_send, num_local_experts)));
}

cudaError_t trace_reset(bool enable) {
    static unsigned long long zeros[kTraceKernels][kMaxBlocks][kTracePoints] = {};
    static unsigned long long zero_calls[kTraceKernels] = {};
    const int flag = enable ? 1 : 0;
    cudaError_t status = cudaMemcpyToSymbol(g_trace_cycles, zeros, sizeof(zeros));
    if (status == cudaSuccess) status = cudaMemcpyToSymbol(g_trace_calls, zero_calls, sizeof(zero_calls));
    if (status == cudaSuccess) status = cudaMemcpyToSymbol(g_trace_enabled, &flag, sizeof(flag));
    return status;
}

cudaError_t trace_read(unsigned long long* cycles, unsigned long long* calls, int* clock_khz) {
    cudaError_t status = cudaMemcpyFromSymbol(cycles, g_trace_cycles, sizeof(g_trace_cycles));
    if (status == cudaSuccess) status = cudaMemcpyFromSymbol(calls, g_trace_calls, sizeof(g_trace_calls));
    int device = 0;
    if (status == cudaSuccess) status = cudaGetDevice(&device);
    if (status == cudaSuccess) status = cudaDeviceGetAttribute(clock_khz, cudaDevAttrClockRate, device);
    return status;
}

// Raises a kernel's dynamic shared memory limit to `bytes` (the bulk send's stages on top of the
// kernel's 40+ KB of static shared memory pass the default 48 KB). The limit belongs to the
// current device's context: `allowed` holds the largest set so far per device, so a launch makes
// the driver call only when it needs more.
constexpr int kMaxDevices = 64;
template <typename Kernel>
cudaError_t allow_dynamic_shared(Kernel kernel, size_t bytes, std::atomic<size_t> (&allowed)[kMaxDevices]) {
    if (bytes == 0) return cudaSuccess;
    int device = 0;
    const bool cached = cudaGetDevice(&device) == cudaSuccess && device >= 0 && device < kMaxDevices;
    if (cached && allowed[device].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
    const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (status == cudaSuccess && cached) {
        size_t seen = allowed[device].load(std::memory_order_relaxed);
        while (seen < bytes && !allowed[device].compare_exchange_weak(seen, bytes, std::memory_order_relaxed)) {
        }
    }
    return status;
}
static std::atomic<size_t> g_dispatch_shared_allowed[2][kMaxDevices];  // [use_fp8][device]

cudaError_t launch_dispatch(const Context& ctx, const Layout& layout, int buffer_idx, const DispatchArgs& args,
                            cudaStream_t stream) {
    const int grid = num_blocks(args.num_max_tokens, args.num_experts / ctx.num_ranks);
    const Geometry g = make_geometry(ctx, layout, buffer_idx, 0);
    // The bulk send (dispatch_send_bulk) where every peer takes direct stores; DEEP_EP_LL_BULK_SEND=0
    // keeps the stores of the SM (read once; every rank of a job must see the same value, as the
    // receivers derive each token's sending block from it).
    static const bool bulk_wanted = env_int("DEEP_EP_LL_BULK_SEND", 1) != 0;
    // For A/B measurements, on unless set to 0 (DispatchArgs::split_header).
    static const bool split_header_wanted = env_int("DEEP_EP_LL_SPLIT_HEADER", 1) != 0;
    DispatchArgs a = args;
    a.bulk_send = bulk_wanted && !ctx.any_remote;
    a.split_header = split_header_wanted;
    // Enough stages for a block's every token (up to kMaxBulkStages): then no block waits for a
    // stage and all its copies are issued at once.
    a.bulk_stages = std::min(kMaxBulkStages, std::max(1, (a.num_max_tokens + grid - 1) / grid));
    const size_t shared_bytes = a.bulk_send && (a.phases & kPhaseSend) ? a.bulk_stages * bulk_stage_bytes(layout.msg_bytes) : 0;
    const auto kernel = a.use_fp8 ? dispatch_kernel<true> : dispatch_kernel<false>;
    const cudaError_t status = allow_dynamic_shared(kernel, shared_bytes, g_dispatch_shared_allowed[a.use_fp8 ? 1 : 0]);
    if (status != cudaSuccess) return status;
    kernel<<<grid, kNumThreads, shared_bytes, stream>>>(ctx, g, a, buffer_idx);
    return cudaGetLastError();
}

cudaError_t launch_combine(const Context& ctx, const Layout& layout, int buffer_idx, const CombineArgs& args,
                           cudaStream_t stream) {
    const int grid = num_blocks(args.num_max_tokens, args.num_experts / ctx.num_ranks);
    const Geometry g = make_geometry(ctx, layout, buffer_idx, 1);
    combine_kernel<<<grid, kNumThreads, 0, stream>>>(ctx, g, args, buffer_idx);
    return cudaGetLastError();
}

}  // namespace ll
}  // namespace deep_ep
