// Low-latency dispatch and combine (decode) over NVSHMEM symmetric memory.
//
// Dispatch sends every token ONCE per destination rank (not once per expert): the message lands
// in the receiver's slot [source rank][token] with a header that carries the token's top-k
// expert ids; the receiver fans it out to its local experts. Per (buffer, source rank) one
// counter grows by one per sending block and call, so nothing needs cleaning between calls; a
// slot is valid in a call when its header's tag equals the call number.
//
// Combine, "rows" mode, sends each expert row straight into the home rank's slot
// [token][top-k index]; the home rank waits for one count per sending block of every rank and
// reduces with the weights. "Reduced" mode crosses once per (token, rank) instead: the home rank
// broadcasts its top-k weights, each rank sums its experts' weighted rows per received token (fp32,
// rounded once to bf16) into the home rank's slot [token][rank], and the home rank adds those.
//
// Peers reachable through nvshmem_ptr are written with plain stores (with
// allow_nvlink_for_low_latency_mode); the others with NVSHMEM puts from the local staging area.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>

#include "internode_ll_api.cuh"
#include "nvshmem_utils.cuh"

namespace deep_ep {
namespace ll {

namespace {

constexpr int kNumWarps = kNumThreads / 32;
// Warps that share one token's hidden data in the dispatch send (more bytes in flight).
constexpr int kWarpsPerToken = 8;
// Chunks (32 units) whose loads a dispatch-send warp issues before converting any.
constexpr int kPrefetch = 2;
// Warps that share one token in the combine reduction.
constexpr int kCombineWarpsPerToken = 8;
// Loads in flight per lane when copying a received row.
constexpr int kCopyUnroll = 4;
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
    size_t msg_bytes;
    size_t dispatch_recv_offset, dispatch_send_offset, combine_recv_offset, combine_send_offset;
    size_t weights_offset, stage_offset;
    int combine_slots;               // combine receive slots per token
};

__device__ __forceinline__ char* peer_address(const Context& ctx, const void* local, int pe) {
    const unsigned long long base = ctx.peer_bases[pe];
    if (base == 0) return nullptr;
    return reinterpret_cast<char*>(base) + (reinterpret_cast<const char*>(local) - static_cast<const char*>(ctx.heap));
}

// Adds one to counter `slot` of `signals` on every unmasked rank: this block has delivered
// everything it had for that rank in this call. Called by the whole block after its stores.
__device__ void signal_all_ranks(const Context& ctx, unsigned long long* signals) {
    // Each thread publishes its own direct stores system-wide before the block signals.
    __threadfence_system();
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

// Waits (thread 0 of the block) until `counter` reaches `expected`. Returns 0 ok, 1 skip (peer
// masked, or masked now after a timeout in shrink mode), 2 abort (timeout, error recorded).
__device__ int wait_peer(const Context& ctx, const unsigned long long* counter, unsigned long long expected, int peer,
                         int kernel, int64_t* wait_stats, bool account) {
    if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + peer) != 0) return 1;
    unsigned long long seen = 0, waited = 0;
    const int result = wait_counter_at_least(counter, expected, ctx.timeout_ns, &seen, &waited);
    if (account && wait_stats != nullptr) atomicAdd(reinterpret_cast<unsigned long long*>(wait_stats + peer), waited);
    if (result == kWaitOk) return 0;
    if (ctx.enable_shrink) {
        atomicExch(ctx.mask + peer, 1);
        return 1;
    }
    report_timeout(ctx.error, ctx.rank, kernel, peer, expected, seen, waited);
    return 2;
}

// The last block to finish advances the buffer's call counters (graph replays stay correct).
__device__ void finish_call(unsigned int* blocks_done, unsigned long long* counter_a, unsigned long long value_a,
                            unsigned long long* counter_b, unsigned long long value_b) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned int previous = atomicAdd(blocks_done, 1u);
        if (previous == gridDim.x - 1) {
            if (counter_a != nullptr) *counter_a = value_a;
            if (counter_b != nullptr) *counter_b = value_b;
            *blocks_done = 0u;
            __threadfence();
        }
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

// acc[0..8) += sum over the set bits k of `mask` of weight_k * row_k[unit], where lane k holds
// row k's index (rows are `row_bytes` apart from `base`) and its weight. Loads go four at a
// time. Every lane of the warp must call this (the shuffles); only `active` lanes load.
__device__ __forceinline__ void weighted_row_sum(const char* base, size_t row_bytes, int unit, bool active,
                                                 unsigned int mask, int lane_row, float lane_weight, float* acc) {
#pragma unroll
    for (int k0 = 0; k0 < kMaxTopk; k0 += 4) {
        if (((mask >> k0) & 0xFu) == 0u) continue;  // warp-uniform
        int4 v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int row = __shfl_sync(0xffffffffu, lane_row, k0 + j);
            if (active && ((mask >> (k0 + j)) & 1u))
                v[j] = ld_cg_int4(base + static_cast<size_t>(row) * row_bytes + static_cast<size_t>(unit) * 16);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float w = __shfl_sync(0xffffffffu, lane_weight, k0 + j);
            if (active && ((mask >> (k0 + j)) & 1u)) {
                float f[8];
                bf16x8_to_floats(v[j], f);
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] = fmaf(w, f[i], acc[i]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------
template <bool kUseFP8>
__device__ void dispatch_send(const Context& ctx, const Geometry& g, const DispatchArgs& a, unsigned long long tag) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_local = a.num_experts / ctx.num_ranks;
    const int hidden = a.hidden;
    // A unit is what one lane moves at a time: 16 channels (fp8 out) or 8 channels (bf16).
    const int num_units = kUseFP8 ? hidden / 16 : hidden / 8;
    const int num_chunks = (num_units + 31) / 32;
    // Tokens with a peer reached through puts are handled by one warp, which then puts the
    // whole staged message.
    const int parts = ctx.any_remote ? 1 : min(kWarpsPerToken, num_chunks);
    const size_t data_bytes = kUseFP8 ? static_cast<size_t>(hidden) + hidden / 32 : static_cast<size_t>(hidden) * 2;
    const int num_tasks = a.num_tokens * parts;
    const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(a.x);

    for (int task = blockIdx.x * kNumWarps + warp; task < num_tasks; task += gridDim.x * kNumWarps) {
        const int token = task / parts, part = task % parts;
        int expert = -1, dst = -1;
        if (lane < a.num_topk) {
            const int64_t id = __ldg(a.topk_idx + static_cast<size_t>(token) * a.num_topk + lane);
            // Ids outside [0, num_experts) (unchecked inside graph capture) count as "none".
            expert = id >= 0 && id < a.num_experts ? static_cast<int>(id) : -1;
            if (expert >= 0) {
                dst = expert / num_local;
                if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + dst) != 0) dst = -1;
            }
        }
        // One message per distinct destination rank: the first top-k slot naming it leads.
        bool leader = dst >= 0;
        for (int k = 0; k < a.num_topk; ++k) {
            const int other = __shfl_sync(0xffffffffu, dst, k);
            if (k < lane && other == dst) leader = false;
        }
        const unsigned int leaders = __ballot_sync(0xffffffffu, leader);
        if (leaders == 0u) continue;

        // Local (symmetric) address of this token's slot, identical in every rank's heap.
        char* slot = g.buf + g.dispatch_recv_offset + (static_cast<size_t>(ctx.rank) * a.num_max_tokens + token) * g.msg_bytes;
        char* staging = g.buf + g.dispatch_send_offset + static_cast<size_t>(token) * g.msg_bytes;
        bool has_remote = false;
        for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {
            const int d = __shfl_sync(0xffffffffu, dst, __ffs(bits) - 1);
            has_remote |= ctx.peer_bases[d] == 0ull;
        }

        if (part == 0 && lane < kHeaderInts) {
            int value = 0;
            if (lane < kMaxTopk) value = lane < a.num_topk ? expert : -1;
            else if (lane == kTokenInt) value = token;
            else if (lane == kTagInt) value = static_cast<int>(static_cast<unsigned int>(tag));
            else if (lane == kTopkCountInt) value = a.num_topk;
            for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {
                const int d = __shfl_sync(0x000fffffu, dst, __ffs(bits) - 1);
                char* peer = peer_address(ctx, slot, d);
                if (peer != nullptr) reinterpret_cast<int*>(peer)[lane] = value;
            }
            if (has_remote) reinterpret_cast<int*>(staging)[lane] = value;
        }
        __syncwarp();

        const char* token_x = reinterpret_cast<const char*>(x + static_cast<size_t>(token) * hidden);
        // Loads of kPrefetch chunks are issued before any of them is converted and stored.
        for (int first = part; first < num_chunks; first += kPrefetch * parts) {
            int4 raw[kPrefetch][kUseFP8 ? 2 : 1];
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
#pragma unroll
            for (int i = 0; i < kPrefetch; ++i) {
                const int chunk = first + i * parts;
                if (chunk >= num_chunks) break;  // warp-uniform
                const int unit = chunk * 32 + lane;
                const bool valid = unit < num_units;
                int4 out = raw[i][0];
                float scale = 0.f;
                if constexpr (kUseFP8) {
                    float f[16];
                    bf16x8_to_floats(raw[i][0], f);
                    bf16x8_to_floats(raw[i][1], f + 8);
                    float amax = 0.f;
#pragma unroll
                    for (int k = 0; k < 16; ++k) amax = fmaxf(amax, fabsf(f[k]));
                    // 8 lanes (128 channels) share one scale; groups never straddle a warp.
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
                    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
                    scale = fp8_scale_from_amax(amax, a.round_scale);
                    uint16_t* o = reinterpret_cast<uint16_t*>(&out);
#pragma unroll
                    for (int k = 0; k < 8; ++k) o[k] = fp8x2_from_floats(__fdiv_rn(f[2 * k], scale), __fdiv_rn(f[2 * k + 1], scale));
                }
                const size_t data_offset = kHeaderBytes + static_cast<size_t>(unit) * 16;
                const bool writes_scale = kUseFP8 && valid && (lane % 8) == 0;
                const size_t scale_offset = kHeaderBytes + static_cast<size_t>(hidden) + static_cast<size_t>(unit / 8) * 4;
                // The whole warp walks the destinations (the shuffle needs every lane); only
                // lanes with a unit store.
                for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {
                    const int d = __shfl_sync(0xffffffffu, dst, __ffs(bits) - 1);
                    char* peer = peer_address(ctx, slot, d);
                    if (peer == nullptr || !valid) continue;
                    st_int4(peer + data_offset, out);
                    if (writes_scale) *reinterpret_cast<float*>(peer + scale_offset) = scale;
                }
                if (has_remote && valid) {
                    st_int4(staging + data_offset, out);
                    if (writes_scale) *reinterpret_cast<float*>(staging + scale_offset) = scale;
                }
            }
        }

        if (has_remote) {
            __threadfence();
            __syncwarp();
            for (unsigned int bits = leaders; bits != 0u; bits &= bits - 1u) {
                const int d = __shfl_sync(0xffffffffu, dst, __ffs(bits) - 1);
                if (ctx.peer_bases[d] != 0ull) continue;
                nvshmemx_putmem_nbi_warp(slot, staging, kHeaderBytes + data_bytes, d);
            }
        }
    }
    if (ctx.any_remote) {
        __syncwarp();
        if (lane == 0) nvshmem_quiet();
    }
    signal_all_ranks(ctx, g.signals);
}

// Receive: one block per local expert (looping when there are more experts than blocks). Wait
// for every source rank (one thread each), then scan all [source rank][token] slots as one
// sequence for tokens that chose this expert and copy them to the packed output; rows keep
// (source rank, token, top-k slot) order, so results are deterministic.
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

    for (int e = blockIdx.x; e < num_local; e += gridDim.x) {
        const int global_expert = ctx.rank * num_local + e;
        if (threadIdx.x == 0) s_abort = 0;
        for (int i = threadIdx.x; i < kMaxRanks / 32; i += blockDim.x) s_skip_bits[i] = 0u;
        for (int i = threadIdx.x; i < num_ranks; i += blockDim.x) s_src_rows[i] = 0;
        __syncthreads();
        for (int src = threadIdx.x; src < num_ranks; src += blockDim.x) {
            const int status = wait_peer(ctx, g.signals + src, expected, src, kKernelDispatch, a.wait_recv_cost_stats,
                                         blockIdx.x == 0 && e == 0);
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
            for (int i = warp; i < num_listed; i += kNumWarps) {
                const int slot_i = s_list_slot[i];
                const int src = slot_i / num_max, token = slot_i % num_max;
                const int first_row = s_list_row[i];
                const int kmask_i = s_list_kmask[i];
                const char* msg = regions + static_cast<size_t>(slot_i) * g.msg_bytes;
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
                    const float* scales = reinterpret_cast<const float*>(msg + kHeaderBytes + hidden);
                    if (a.use_ue8m0) {
                        const int num_packed = num_groups / 4;
                        for (int p = lane; p < num_packed; p += 32) {
                            const int4 s4 = ld_cg_int4(scales + 4 * p);
                            const int word = ((s4.x >> 23) & 0xFF) | (((s4.y >> 23) & 0xFF) << 8) |
                                             (((s4.z >> 23) & 0xFF) << 16) | (((s4.w >> 23) & 0xFF) << 24);
                            int r = first_row;
                            for (int bits = kmask_i; bits != 0 && r < static_cast<int>(num_slots); bits &= bits - 1, ++r)
                                static_cast<int*>(a.recv_scales)[(static_cast<size_t>(e) * num_slots + r) * num_packed + p] = word;
                        }
                    } else {
                        for (int gi = lane; gi < num_groups; gi += 32) {
                            const float s = __ldcg(scales + gi);
                            int r = first_row;
                            for (int bits = kmask_i; bits != 0 && r < static_cast<int>(num_slots); bits &= bits - 1, ++r)
                                static_cast<float*>(a.recv_scales)[(static_cast<size_t>(e) * num_slots + r) * num_groups + gi] = s;
                        }
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
        if (threadIdx.x == 0) {
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
template <bool kUseFP8>
__global__ void __launch_bounds__(kNumThreads, 1) dispatch_kernel(Context ctx, Geometry g, DispatchArgs a, int buffer_idx) {
    BufferState* state = ctx.state + buffer_idx;
    const unsigned long long send_call = state->dispatch_send_calls + 1;
    const unsigned long long recv_call = state->dispatch_recv_calls + 1;
    if (a.phases & kPhaseSend) dispatch_send<kUseFP8>(ctx, g, a, send_call);
    if (a.phases & kPhaseRecv) dispatch_recv<kUseFP8>(ctx, g, a, recv_call);
    finish_call(&state->dispatch_blocks_done, (a.phases & kPhaseSend) ? &state->dispatch_send_calls : nullptr, send_call,
                (a.phases & kPhaseRecv) ? &state->dispatch_recv_calls : nullptr, recv_call);
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
    constexpr int kUnroll = 4;

    for (int e = blockIdx.x; e < num_local; e += gridDim.x) {
        const int count = a.recv_count[e];
        for (int r = warp; r < count; r += kNumWarps) {
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
    if (ctx.any_remote) {
        __syncwarp();
        if (lane == 0) nvshmem_quiet();
    }
    signal_all_ranks(ctx, g.signals);
}

// Receive: wait for every rank's blocks, then one warp per token sums the weighted rows.
__device__ void combine_recv(const Context& ctx, const Geometry& g, const CombineArgs& a, unsigned long long seq) {
    __shared__ int s_abort;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_local = a.num_experts / ctx.num_ranks;
    const unsigned long long expected = seq * gridDim.x;
    if (threadIdx.x == 0) s_abort = 0;
    __syncthreads();
    for (int src = threadIdx.x; src < ctx.num_ranks; src += blockDim.x) {
        if (wait_peer(ctx, g.signals + src, expected, src, kKernelCombine, a.wait_recv_cost_stats, blockIdx.x == 0) == 2)
            s_abort = 1;
    }
    __syncthreads();
    if (s_abort) return;

    const size_t row_bytes = static_cast<size_t>(a.hidden) * 2;
    const int num_units = a.hidden / 8;
    const int num_chunks = (num_units + 31) / 32;
    const int parts = min(kCombineWarpsPerToken, num_chunks);
    const int num_tasks = a.num_tokens * parts;
    for (int task = blockIdx.x * kNumWarps + warp; task < num_tasks; task += gridDim.x * kNumWarps) {
        const int token = task / parts, part = task % parts;
        bool valid = false;
        float weight = 0.f;
        if (lane < a.num_topk) {
            const int64_t expert = __ldg(a.topk_idx + static_cast<size_t>(token) * a.num_topk + lane);
            weight = __ldg(a.topk_weights + static_cast<size_t>(token) * a.num_topk + lane);
            valid = expert >= 0 && expert < a.num_experts;
            if (valid && ctx.enable_shrink)
                valid = *reinterpret_cast<volatile int*>(ctx.mask + static_cast<int>(expert / num_local)) == 0;
        }
        const unsigned int valid_mask = __ballot_sync(0xffffffffu, valid);
        const char* slots = g.buf + g.combine_recv_offset + static_cast<size_t>(token) * g.combine_slots * row_bytes;
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out) + static_cast<size_t>(token) * a.hidden;
        for (int chunk = part; chunk < num_chunks; chunk += parts) {
            const int u = chunk * 32 + lane;
            const bool active = u < num_units;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            weighted_row_sum(slots, row_bytes, u, active, valid_mask, lane, weight, acc);
            if (active) st_int4(out + static_cast<size_t>(u) * 8, floats_to_bf16x8(acc));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Combine, reduced mode: the home rank broadcasts its top-k weights; each rank sums, per
// received token, the weighted rows of its local experts and sends that one partial row into
// the home rank's slot [token][this rank]; the home rank adds the partial rows.
// ---------------------------------------------------------------------------------------------
// This rank's top-k weights [token][kMaxTopk] into every unmasked rank's inbox row [this rank],
// then one count on that rank's "weights arrived" counter [this rank].
__device__ void broadcast_weights(const Context& ctx, const Geometry& g, const CombineArgs& a) {
    const int lane = threadIdx.x % 32;
    const int global_warp = blockIdx.x * kNumWarps + threadIdx.x / 32, num_warps = gridDim.x * kNumWarps;
    const int num_ranks = ctx.num_ranks, num_max = a.num_max_tokens;
    float* own_inbox = reinterpret_cast<float*>(g.buf + g.weights_offset) + static_cast<size_t>(ctx.rank) * num_max * kMaxTopk;
    const int num_weights = a.num_tokens * kMaxTopk;
    for (int dst = global_warp; dst < num_ranks; dst += num_warps) {
        if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + dst) != 0) continue;
        char* peer = peer_address(ctx, own_inbox, dst);
        float* target = peer != nullptr ? reinterpret_cast<float*>(peer) : own_inbox;
        for (int i = lane; i < num_weights; i += 32) {
            const int t = i / kMaxTopk, k = i % kMaxTopk;
            target[i] = k < a.num_topk ? __ldg(a.topk_weights + static_cast<size_t>(t) * a.num_topk + k) : 0.f;
        }
        __threadfence_system();
        __syncwarp();
        unsigned long long* counter = g.weight_signals + ctx.rank;
        if (peer != nullptr) {
            if (lane == 0) red_add_release_sys(reinterpret_cast<unsigned long long*>(peer_address(ctx, counter, dst)), 1ull);
        } else {
            nvshmemx_putmem_nbi_warp(own_inbox, own_inbox, static_cast<size_t>(num_weights) * sizeof(float), dst);
            if (lane == 0) {
                nvshmem_fence();
                nvshmemx_signal_op(reinterpret_cast<uint64_t*>(counter), 1ull, NVSHMEM_SIGNAL_ADD, dst);
            }
        }
    }
}

__device__ void combine_send_reduced(const Context& ctx, const Geometry& g, const CombineArgs& a,
                                     unsigned long long weights_call, unsigned long long dispatch_call) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int global_warp = blockIdx.x * kNumWarps + warp, num_warps = gridDim.x * kNumWarps;
    const int num_ranks = ctx.num_ranks, num_max = a.num_max_tokens;
    const int num_local = a.num_experts / num_ranks;
    const size_t num_slots = static_cast<size_t>(num_ranks) * num_max;
    const size_t row_bytes = static_cast<size_t>(a.hidden) * 2;
    const int num_units = a.hidden / 8;
    const int num_chunks = (num_units + 31) / 32;

    // One partial row per received (source rank, token) with local experts.
    const int parts = ctx.any_remote ? 1 : min(kCombineWarpsPerToken / 2, num_chunks);
    const int num_tasks = num_ranks * num_max * parts;
    const char* regions = g.buf + g.dispatch_recv_offset;
    const char* x = a.zero_copy ? g.buf + g.combine_send_offset : static_cast<const char*>(a.x);
    int ready_src = -1;  // the last source whose weights this warp has seen arrive
    for (int task = global_warp; task < num_tasks; task += num_warps) {
        const int slot = task / parts, part = task % parts;
        const int src = slot / num_max, token = slot % num_max;
        if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + src) != 0) continue;
        const int kmask = header_match(regions + static_cast<size_t>(slot) * g.msg_bytes, dispatch_call,
                                       ctx.rank * num_local, (ctx.rank + 1) * num_local);
        if (kmask == 0) continue;  // warp-uniform: every lane read the same header
        if (src != ready_src) {
            int status = 0;
            if (lane == 0) {
                unsigned long long seen = 0, waited = 0;
                if (wait_counter_at_least(g.weight_signals + src, weights_call, ctx.timeout_ns, &seen, &waited) != kWaitOk) {
                    if (ctx.enable_shrink) {
                        atomicExch(ctx.mask + src, 1);
                        status = 1;
                    } else {
                        report_timeout(ctx.error, ctx.rank, kKernelCombine, src, weights_call, seen, waited);
                        status = 2;
                    }
                }
            }
            status = __shfl_sync(0xffffffffu, status, 0);
            __syncwarp();  // lane 0's acquire orders the other lanes' reads of the weights too
            if (status != 0) continue;
            ready_src = src;
        }
        const float* inbox = reinterpret_cast<const float*>(g.buf + g.weights_offset) +
                             (static_cast<size_t>(src) * num_max + token) * kMaxTopk;
        float weight = 0.f;
        int row = 0;
        if (lane < kMaxTopk && ((kmask >> lane) & 1)) {
            weight = __ldcg(inbox + lane);
            row = __ldcg(a.slot_rows + static_cast<size_t>(slot) * kMaxTopk + lane);
        }
        char* dst_local = g.buf + g.combine_recv_offset + (static_cast<size_t>(token) * g.combine_slots + ctx.rank) * row_bytes;
        char* peer = peer_address(ctx, dst_local, src);
        char* stage = g.buf + g.stage_offset + static_cast<size_t>(slot) * row_bytes;
        char* target = peer != nullptr ? peer : stage;
        for (int chunk = part; chunk < num_chunks; chunk += parts) {
            const int u = chunk * 32 + lane;
            const bool active = u < num_units;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            weighted_row_sum(x, row_bytes, u, active, static_cast<unsigned int>(kmask), row, weight, acc);
            if (active) st_int4(target + static_cast<size_t>(u) * 16, floats_to_bf16x8(acc));
        }
        if (peer == nullptr) {
            __threadfence();
            __syncwarp();
            nvshmemx_putmem_nbi_warp(dst_local, stage, row_bytes, src);
        }
    }
    (void)num_slots;
    if (ctx.any_remote) {
        __syncwarp();
        if (lane == 0) nvshmem_quiet();
    }
    signal_all_ranks(ctx, g.signals);
}

__device__ void combine_recv_reduced(const Context& ctx, const Geometry& g, const CombineArgs& a, unsigned long long seq) {
    __shared__ int s_abort;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int num_local = a.num_experts / ctx.num_ranks;
    const unsigned long long expected = seq * gridDim.x;
    if (threadIdx.x == 0) s_abort = 0;
    __syncthreads();
    for (int src = threadIdx.x; src < ctx.num_ranks; src += blockDim.x) {
        if (wait_peer(ctx, g.signals + src, expected, src, kKernelCombine, a.wait_recv_cost_stats, blockIdx.x == 0) == 2)
            s_abort = 1;
    }
    __syncthreads();
    if (s_abort) return;

    const size_t row_bytes = static_cast<size_t>(a.hidden) * 2;
    const int num_units = a.hidden / 8;
    const int num_chunks = (num_units + 31) / 32;
    const int parts = min(kCombineWarpsPerToken, num_chunks);
    const int num_tasks = a.num_tokens * parts;
    for (int task = blockIdx.x * kNumWarps + warp; task < num_tasks; task += gridDim.x * kNumWarps) {
        const int token = task / parts, part = task % parts;
        int rank_of = -1;
        if (lane < a.num_topk) {
            const int64_t expert = __ldg(a.topk_idx + static_cast<size_t>(token) * a.num_topk + lane);
            if (expert >= 0 && expert < a.num_experts) {
                rank_of = static_cast<int>(expert / num_local);
                if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + rank_of) != 0) rank_of = -1;
            }
        }
        // One partial row per distinct rank: the first top-k slot naming it leads.
        bool leader = rank_of >= 0;
        for (int k = 0; k < a.num_topk; ++k) {
            const int other = __shfl_sync(0xffffffffu, rank_of, k);
            if (k < lane && other == rank_of) leader = false;
        }
        const unsigned int leaders = __ballot_sync(0xffffffffu, leader);
        const char* slots = g.buf + g.combine_recv_offset + static_cast<size_t>(token) * g.combine_slots * row_bytes;
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out) + static_cast<size_t>(token) * a.hidden;
        for (int chunk = part; chunk < num_chunks; chunk += parts) {
            const int u = chunk * 32 + lane;
            const bool active = u < num_units;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            weighted_row_sum(slots, row_bytes, u, active, leaders, rank_of, 1.f, acc);
            if (active) st_int4(out + static_cast<size_t>(u) * 8, floats_to_bf16x8(acc));
        }
    }
}

__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(Context ctx, Geometry g, CombineArgs a, int buffer_idx) {
    BufferState* state = ctx.state + buffer_idx;
    const unsigned long long send_call = state->combine_send_calls + 1;
    const unsigned long long recv_call = state->combine_recv_calls + 1;
    // The dispatch of this handle was the last one received on this buffer.
    const unsigned long long dispatch_call = state->dispatch_recv_calls;
    if (a.phases & kPhaseSend) {
        // The weights go out in both modes, so the "weights arrived" counters count calls.
        broadcast_weights(ctx, g, a);
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
    finish_call(&state->combine_blocks_done, (a.phases & kPhaseSend) ? &state->combine_send_calls : nullptr, send_call,
                (a.phases & kPhaseRecv) ? &state->combine_recv_calls : nullptr, recv_call);
}

Geometry make_geometry(const Context& ctx, const Layout& layout, int buffer_idx, int kind) {
    Geometry g;
    g.heap = static_cast<char*>(ctx.heap);
    g.buf = g.heap + layout.buffer_offset[buffer_idx];
    unsigned long long* signal_base = reinterpret_cast<unsigned long long*>(g.heap + layout.signal_offset);
    g.signals = signal_base + static_cast<size_t>(buffer_idx * 3 + kind) * ctx.num_ranks;
    g.weight_signals = signal_base + static_cast<size_t>(buffer_idx * 3 + 2) * ctx.num_ranks;
    g.msg_bytes = layout.msg_bytes;
    g.dispatch_recv_offset = layout.dispatch_recv_offset;
    g.dispatch_send_offset = layout.dispatch_send_offset;
    g.combine_recv_offset = layout.combine_recv_offset;
    g.combine_send_offset = layout.combine_send_offset;
    g.weights_offset = layout.weights_offset;
    g.stage_offset = layout.stage_offset;
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
    layout.combine_recv_offset = align_up(layout.dispatch_send_offset + m * layout.msg_bytes, kAlign);
    layout.combine_send_offset =
        align_up(layout.combine_recv_offset + m * static_cast<size_t>(layout.combine_slots_per_token) * h * 2, kAlign);
    layout.weights_offset = align_up(layout.combine_send_offset + num_local * r * m * h * 2, kAlign);
    layout.stage_offset = align_up(layout.weights_offset + r * m * kMaxTopk * sizeof(float), kAlign);
    layout.buffer_bytes = align_up(layout.stage_offset + r * m * h * 2, kAlign);
    layout.buffer_offset[0] = signal_bytes;
    layout.buffer_offset[1] = signal_bytes + layout.buffer_bytes;
    layout.total_bytes = signal_bytes + 2 * layout.buffer_bytes;
    return layout;
}

int num_blocks(int num_max_tokens, int num_local_experts) {
    // Enough warps for every token's share of the send, one block per local expert for the
    // receive, never more blocks than can be resident at once (receivers spin).
    const int for_send = (num_max_tokens * kWarpsPerToken + kNumWarps - 1) / kNumWarps;
    return std::max(1, std::min(kMaxBlocks, std::max(for_send, num_local_experts)));
}

cudaError_t launch_dispatch(const Context& ctx, const Layout& layout, int buffer_idx, const DispatchArgs& args,
                            cudaStream_t stream) {
    const int grid = num_blocks(args.num_max_tokens, args.num_experts / ctx.num_ranks);
    const Geometry g = make_geometry(ctx, layout, buffer_idx, 0);
    if (args.use_fp8)
        dispatch_kernel<true><<<grid, kNumThreads, 0, stream>>>(ctx, g, args, buffer_idx);
    else
        dispatch_kernel<false><<<grid, kNumThreads, 0, stream>>>(ctx, g, args, buffer_idx);
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
