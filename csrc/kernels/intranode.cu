// Intranode high-throughput kernels over NVLink: notify (count exchange), dispatch, combine.
//
// Data path: one block pair per channel (a contiguous range of the sender's tokens). Between a
// sender block and a receiver block of every rank pair there is a ring in the receiver's
// memory, split into W single-writer sub-rings: sender warp w of the group for peer p writes
// only sub-ring w, and receiver warp w of the group for source p reads only sub-ring w. So the
// warps never synchronise with each other: each pair of warps runs its own flow control (tail
// in the receiver's memory, head in the sender's memory, both polled locally).
//
// Rows a rank sends to itself skip the rings: in dispatch the sender writes them straight into
// their output rows, in combine the receiver reads them in place. Ring slots are whole 128-byte
// lines, so every warp-wide 512-byte store over NVLink covers whole lines.
//
// Every call leaves all counters at zero: the receiver zeroes its tail/meta words and then
// acknowledges with head = count + 1; the sender waits for that acknowledgement and zeroes its
// head. Hence no barrier is needed between calls, and a cached dispatch or a combine is one
// kernel launch.
//
// Rows move in one of two ways, chosen per call (IntranodeCopy, env DEEP_EP_INTRANODE_COPY):
// 16-byte loads and stores by every lane (SIMT, the default), or bulk copies issued by lane 0
// through a warp-private shared-memory pipeline (BulkRowCopier): global -> shared on an mbarrier,
// shared -> global (the peer's ring, or the output) as bulk groups. The bulk path keeps the ring
// format and every counter protocol; it adds only what the async proxy needs: a proxy fence after
// acquiring a counter and before copying the slots it guards, and a wait for the bulk stores to
// complete before the release that publishes them.
#include <cstdint>
#include <string>

#include <cuda_bf16.h>

#include "api.cuh"
#include "buffer.cuh"
#include "launch.cuh"
#include "utils.cuh"

namespace deep_ep {
namespace {

constexpr int kThreads = kIntranodeWarps * kWarpSize;
constexpr int kNotifyThreads = 256;
constexpr int kCopyUnroll = 8;

// ================================================================ notify
__global__ void __launch_bounds__(kNotifyThreads) notify_dispatch_kernel(NotifyArgs args) {
    uint8_t* own = args.buffers.ptrs[args.rank];
    int* sequence = reinterpret_cast<int*>(own + kNotifySeqOffset);
    // The parity alternates per call (device-side, so a replayed CUDA graph alternates too): a
    // peer that is already one call ahead writes the other parity.
    const int parity = ld_volatile(sequence) & 1;
    const int num_local_experts = args.num_experts / args.num_ranks;
    const int slot_ints = 2 + num_local_experts;

    for (int i = threadIdx.x; i < args.num_ranks * slot_ints; i += blockDim.x) {
        const int dest = i / slot_ints, j = i % slot_ints;
        const int value = j == 0   ? args.num_tokens_per_rank[dest]
                          : j == 1 ? args.num_tokens
                                   : args.num_tokens_per_expert[dest * num_local_experts + (j - 2)];
        notify_slot(args.buffers.ptrs[dest], parity, args.rank)[j] = value;
    }
    if (!barrier_block(args.buffers, args.rank, args.num_ranks, args.fail, kKernelNotify))
        return;

    if (threadIdx.x == 0) {
        int prefix = 0;
        for (int s = 0; s < args.num_ranks; ++s) {
            const int* slot = notify_slot(own, parity, s);
            args.recv_rank_prefix[s] = prefix;
            args.recv_src_num_tokens[s] = ld_volatile(slot + 1);
            prefix += ld_volatile(slot);
        }
        args.recv_rank_prefix[args.num_ranks] = prefix;
        if (args.write_host)
            args.host_counters[kHostCounterRows] = prefix;
        if (args.check_scratch != nullptr) {
            // The check kernel ran before this one on the stream: its sums are complete.
            int flags = args.check_scratch[0];
            for (int r = 0; r < args.num_ranks; ++r) {
                if (args.check_scratch[1 + r] != args.num_tokens_per_rank[r])
                    flags |= kCheckBadCounts;
                args.check_scratch[1 + r] = 0;
            }
            args.check_scratch[0] = 0;
            args.host_counters[kHostCounterChecks] = flags;
        }
    }
    if (args.write_host) {
        for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) {
            int count = 0;
            for (int s = 0; s < args.num_ranks; ++s)
                count += ld_volatile(notify_slot(own, parity, s) + 2 + e);
            args.host_counters[kHostCounterExperts + e] = (count + args.expert_alignment - 1) / args.expert_alignment *
                                        args.expert_alignment;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        *sequence = ld_volatile(sequence) + 1;
        if (args.write_host) {
            __threadfence_system();
            reinterpret_cast<volatile int*>(args.host_counters)[kHostCounterReady] = 1;
            __threadfence_system();
        }
    }
}

// ================================================================ shared pieces
__device__ __forceinline__ int channel_begin(int num_tokens, int channel, int num_channels) {
    return static_cast<int>(static_cast<int64_t>(num_tokens) * channel / num_channels);
}

// Tokens of sub-ring `w` among `n` tokens dealt round-robin to W sub-rings.
__device__ __forceinline__ int sub_ring_count(int n, int w, int num_warps) {
    return n > w ? (n - w + num_warps - 1) / num_warps : 0;
}

// Lane 0 waits; the whole warp learns the outcome. Returns false if the wait failed.
template <typename Done>
__device__ __forceinline__ bool warp_wait(const FailureContext& fail, const int* ptr, Done done, int& value,
                                          int kernel, int peer, int target, int channel, int64_t expected) {
    bool ok = true;
    if (lane_id() == 0)
        ok = wait_value(fail, ptr, done, value, kernel, peer, target, channel, expected);
    value = __shfl_sync(0xffffffffu, value, 0);
    return __shfl_sync(0xffffffffu, ok ? 1 : 0, 0) != 0;
}

// ================================================================ row movers (SIMT or bulk)
// Bulk variant: every warp owns kBulkWarpBytes of the block's dynamic shared memory (192 KB for
// 24 warps, one block per SM), cut into plan.bulk_stages stages, plus kMaxBulkStages mbarriers.
// Several small stages rather than two large ones by default (4 x 2 KB, 2 loads ahead): on sm_90
// cp.async.bulk.wait_group.read assembles to the same scoreboard wait as the full wait, so a
// stage may be reloaded only once its store has completed, and the stages bound the stores in
// flight per warp.
constexpr int kBulkWarpBytes = 8192;
using RowCopier = BulkRowCopier<kMaxBulkStages>;
constexpr int kBulkBarrierBytes = align_up(kIntranodeWarps * kMaxBulkStages * 8, 128);
constexpr int kBulkSharedBytes = kBulkBarrierBytes + kIntranodeWarps * kBulkWarpBytes;

// This warp's copier over its slice of the block's dynamic shared memory (set up in lane 0, the
// only lane that uses it). The SIMT variant never calls this and launches without that memory.
__device__ __forceinline__ RowCopier make_warp_copier(const IntranodeCopyPlan& plan) {
    extern __shared__ __align__(128) uint8_t bulk_shared[];
    const int warp = threadIdx.x / kWarpSize;
    const int stage_bytes = kBulkWarpBytes / plan.bulk_stages / 16 * 16;
    RowCopier copier;
    if (lane_id() == 0)
        copier.init(bulk_shared + kBulkBarrierBytes + warp * kBulkWarpBytes,
                    reinterpret_cast<uint64_t*>(bulk_shared) + warp * kMaxBulkStages,
                    BulkPipelineShape{plan.bulk_stages, plan.bulk_lookahead, stage_bytes});
    return copier;
}

// The shape the kernels derive from `plan` must be one the copier accepts, and bulk copies need
// 16-byte aligned rows (the SIMT path's int4 accesses assume it too, but fault instead of saying so).
void check_copy_plan(const IntranodeCopyPlan& plan, const void* src_rows, const void* dst_rows) {
    DEEP_EP_HOST_ASSERT(plan.bulk_stages >= 1 && plan.bulk_stages <= kMaxBulkStages,
                        "bulk_stages must be in 1.." + std::to_string(kMaxBulkStages));
    DEEP_EP_HOST_ASSERT(plan.bulk_lookahead >= 1 && plan.bulk_lookahead <= plan.bulk_stages,
                        "bulk_lookahead must be in 1..bulk_stages");
    if (plan.variant != IntranodeCopy::kSimt)
        DEEP_EP_HOST_ASSERT(reinterpret_cast<uintptr_t>(src_rows) % 16 == 0 &&
                                reinterpret_cast<uintptr_t>(dst_rows) % 16 == 0,
                            "the bulk copy variants need 16-byte aligned row tensors");
}

// Moves one row of `bytes` with the whole warp; src has been read when it returns. SIMT: every
// lane loads and stores 16-byte words. Bulk: lane 0 issues the copies (its stores may still be in
// flight on return) and every lane learns whether they landed. Returns false after a recorded
// failure.
template <bool kBulk, bool kSrcIsRing>
__device__ __forceinline__ bool copy_row(RowCopier& copier, uint8_t* dst, const uint8_t* src, int bytes,
                                         const FailureContext& fail, int kernel, int peer, int channel) {
    if constexpr (kBulk) {
        bool ok = true;
        if (lane_id() == 0)
            ok = copier.copy(dst, src, bytes, fail, kernel, peer, channel);
        return __shfl_sync(0xffffffffu, ok ? 1 : 0, 0) != 0;
    } else {
        warp_copy_int4<kCopyUnroll, kSrcIsRing>(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(src),
                                                bytes / 16, lane_id());
        return true;
    }
}

// Bulk variant: waits (lane 0) until this warp's bulk stores have completed. Needed before a
// release that publishes them, and before the warp exits (the stages must outlive the stores).
template <bool kBulk>
__device__ __forceinline__ void complete_bulk_stores(const RowCopier& copier) {
    if constexpr (kBulk) {
        if (lane_id() == 0) {
            copier.complete();
            // Completion already implies a generic-async proxy fence (PTX ISA, "Async Proxy"); the
            // explicit one costs an instruction per publish and keeps the order plain for a reader
            // on another GPU.
            fence_proxy_async_global();
        }
    }
}

// Publishes `value` to a ring counter in a peer's memory: the warp's rows first, then a release at
// system scope from lane 0.
template <bool kBulk>
__device__ __forceinline__ void publish_tail(const RowCopier& copier, int* tail, int value) {
    complete_bulk_stores<kBulk>(copier);
    __syncwarp();
    if (lane_id() == 0)
        st_release_sys(tail, value);
}

// Bulk variant: lane 0 acquired a ring counter through an ordinary load; its next bulk copies of
// the slots that counter guards (reads of new data, or writes over consumed slots) run in the async
// proxy and must come after it.
template <bool kBulk>
__device__ __forceinline__ void order_bulk_after_acquire() {
    if constexpr (kBulk) {
        if (lane_id() == 0)
            fence_proxy_async_global();
    }
}

// ================================================================ dispatch
template <bool kBulk>
__device__ void dispatch_send(const DispatchArgs& args, int channel) {
    const RingGeometry& ring = args.ring;
    const int num_ranks = args.num_ranks, W = ring.warps_per_peer;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int begin = channel_begin(args.num_tokens, channel, ring.num_channels);
    const int end = channel_begin(args.num_tokens, channel + 1, ring.num_channels);

    // Tokens each destination gets before this channel (its first row) and inside it.
    __shared__ int s_before[kMaxRanks], s_inside[kMaxRanks];
    if (threadIdx.x < kMaxRanks)
        s_before[threadIdx.x] = s_inside[threadIdx.x] = 0;
    __syncthreads();
    for (int dest = 0; dest < num_ranks; ++dest) {
        int before = 0, inside = 0;
        for (int t = threadIdx.x; t < end; t += blockDim.x)
            if (args.is_token_in_rank[static_cast<int64_t>(t) * num_ranks + dest])
                (t < begin ? before : inside) += 1;
        before = warp_sum(before);
        inside = warp_sum(inside);
        if (lane == 0) {
            atomicAdd(&s_before[dest], before);
            atomicAdd(&s_inside[dest], inside);
        }
    }
    __syncthreads();

    const int dest = warp / W, w = warp % W;
    if (dest >= num_ranks)
        return;
    RowCopier copier;
    if constexpr (kBulk)
        copier = make_warp_copier(args.copy);
    const int n = s_inside[dest];
    const int my_count = sub_ring_count(n, w, W);
    uint8_t* peer = args.buffers.ptrs[dest];
    uint8_t* own = args.buffers.ptrs[args.rank];
    int* peer_tail = counter_ptr(peer, kCounterTail, channel, args.rank, w);
    int* own_head = counter_ptr(own, kCounterHead, channel, dest, w);
    uint8_t* ring_base = ring_ptr(peer, ring, args.rank, channel);
    // Tokens for this rank itself skip the ring: the sender writes them straight to their rows.
    const bool local = dest == args.rank;
    const int64_t local_first_row = local ? static_cast<int64_t>(args.recv_rank_prefix[args.rank]) + s_before[dest] : 0;
    const int num_local_experts = args.num_experts / num_ranks;
    const int expert_begin = args.rank * num_local_experts;
    if (!local && lane == 0) {
        st_relaxed_sys(counter_ptr(peer, kCounterMetaStart, channel, args.rank, w), s_before[dest]);
        st_release_sys(counter_ptr(peer, kCounterMetaCount, channel, args.rank, w), -my_count - 1);
    }

    const int sub_capacity = ring.capacity / W;
    int sent = 0, published = 0, head = 0, seq = 0;
    bool ok = true;
    for (int window = begin; window < end && ok; window += kWarpSize) {
        const int t = window + lane;
        const bool in_rank = t < end && args.is_token_in_rank[static_cast<int64_t>(t) * num_ranks + dest];
        unsigned mask = __ballot_sync(0xffffffffu, in_rank);
        // Token number `seq` (in this channel, for this destination) belongs to sub-ring seq % W.
        const int first = (w - seq % W + W) % W;
        const int count = __popc(mask);
        for (int j = first; j < count; j += W) {
            // The j-th set bit of mask.
            unsigned m = mask;
            for (int skip = 0; skip < j; ++skip)
                m &= m - 1;
            const int token = window + __ffs(m) - 1;
            const int k = seq + j;
            if (local) {
                const int64_t row = local_first_row + k;
                if (row >= args.num_recv_rows) {
                    if (lane == 0)
                        report_failure(args.fail, kErrorOverflow, kKernelDispatch, args.rank, kWaitRowCapacity,
                                       channel, row + 1, args.num_recv_rows);
                    ok = false;
                    break;
                }
                if (!copy_row<kBulk, false>(copier, args.recv_x + row * args.hidden_bytes,
                                            args.x + static_cast<int64_t>(token) * args.hidden_bytes,
                                            args.hidden_bytes, args.fail, kKernelDispatch, dest, channel)) {
                    ok = false;
                    break;
                }
                if (args.x_scales != nullptr)
                    for (int g = lane; g < args.num_scales; g += kWarpSize)
                        args.recv_x_scales[row * args.num_scales + g] =
                            __ldg(args.x_scales + token * args.scale_token_stride + g * args.scale_hidden_stride);
                if (args.topk_idx != nullptr && lane < args.num_topk) {
                    const int64_t index = static_cast<int64_t>(token) * args.num_topk + lane;
                    const int64_t expert = __ldg(args.topk_idx + index);
                    const bool mine = expert >= expert_begin && expert < expert_begin + num_local_experts;
                    args.recv_topk_idx[row * args.num_topk + lane] = mine ? expert - expert_begin : -1;
                    args.recv_topk_weights[row * args.num_topk + lane] = mine ? __ldg(args.topk_weights + index) : 0.0f;
                }
                if (lane == 0)
                    args.recv_src_idx[row] = token;
                continue;
            }
            if (sent - head >= sub_capacity) {
                // Publish what is written before waiting for room: the receiver can only free
                // slots it has been told about.
                if (sent != published) {
                    publish_tail<kBulk>(copier, peer_tail, sent);
                    published = sent;
                }
                if (!warp_wait(args.fail, own_head, [&](int v) { return sent - v < sub_capacity; }, head,
                               kKernelDispatch, dest, kWaitRingHead, channel, sent - sub_capacity + 1)) {
                    ok = false;
                    break;
                }
                order_bulk_after_acquire<kBulk>();
            }
            uint8_t* slot = ring_base + static_cast<size_t>(k % ring.capacity) * ring.slot_bytes;
            if (!copy_row<kBulk, false>(copier, slot, args.x + static_cast<int64_t>(token) * args.hidden_bytes,
                                        args.hidden_bytes, args.fail, kKernelDispatch, dest, channel)) {
                ok = false;
                break;
            }
            if (args.x_scales != nullptr) {
                float* slot_scales = reinterpret_cast<float*>(slot + args.slot.scales_offset);
                for (int g = lane; g < args.num_scales; g += kWarpSize)
                    slot_scales[g] = __ldg(args.x_scales + token * args.scale_token_stride +
                                           g * args.scale_hidden_stride);
            }
            if (args.topk_idx != nullptr && lane < args.num_topk) {
                const int64_t index = static_cast<int64_t>(token) * args.num_topk + lane;
                const int64_t expert = __ldg(args.topk_idx + index);
                reinterpret_cast<int*>(slot + args.slot.topk_idx_offset)[lane] =
                    (expert < 0 || expert >= args.num_experts) ? -1 : static_cast<int>(expert);
                reinterpret_cast<float*>(slot + args.slot.topk_weights_offset)[lane] = __ldg(args.topk_weights + index);
            }
            if (lane == 0)
                *reinterpret_cast<int*>(slot + args.slot.src_idx_offset) = token;
            ++sent;
            if (sent - published >= ring.publish_every) {
                publish_tail<kBulk>(copier, peer_tail, sent);
                published = sent;
            }
        }
        seq += count;
    }
    complete_bulk_stores<kBulk>(copier);
    if (!ok || local)
        return;
    __syncwarp();
    if (lane == 0 && sent != published)
        st_release_sys(peer_tail, sent);
    // The receiver acknowledges with count + 1 once it has consumed everything and zeroed its
    // counters; only then may this head word be zeroed for the next call.
    int seen;
    if (!warp_wait(args.fail, own_head, [&](int v) { return v == my_count + 1; }, seen, kKernelDispatch, dest,
                   kWaitRingAck, channel, my_count + 1))
        return;
    if (lane == 0)
        *own_head = 0;
}

template <bool kBulk>
__device__ void dispatch_receive(const DispatchArgs& args, int channel) {
    const RingGeometry& ring = args.ring;
    const int W = ring.warps_per_peer;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int source = warp / W, w = warp % W;
    if (source < args.num_ranks && source != args.rank) {
        uint8_t* own = args.buffers.ptrs[args.rank];
        int* own_tail = counter_ptr(own, kCounterTail, channel, source, w);
        int* own_meta_count = counter_ptr(own, kCounterMetaCount, channel, source, w);
        int* own_meta_start = counter_ptr(own, kCounterMetaStart, channel, source, w);
        int* peer_head = counter_ptr(args.buffers.ptrs[source], kCounterHead, channel, args.rank, w);
        const uint8_t* ring_base = ring_ptr(own, ring, source, channel);
        RowCopier copier;
        if constexpr (kBulk)
            copier = make_warp_copier(args.copy);

        int meta;
        bool ok = warp_wait(args.fail, own_meta_count, [](int v) { return v != 0; }, meta, kKernelDispatch, source,
                            kWaitRingMeta, channel, -1);
        const int my_count = -meta - 1;
        const int first_row = args.recv_rank_prefix[source] + (ok ? ld_relaxed_sys(own_meta_start) : 0);
        const int num_local_experts = args.num_experts / args.num_ranks;
        const int expert_begin = args.rank * num_local_experts;
        int tail = 0;
        for (int i = 0; ok && i < my_count; ++i) {
            if (i >= tail) {
                if (!warp_wait(args.fail, own_tail, [&](int v) { return v > i; }, tail, kKernelDispatch, source,
                               kWaitRingTail, channel, i + 1)) {
                    ok = false;
                    break;
                }
                order_bulk_after_acquire<kBulk>();
            }
            const int k = w + i * W;
            const uint8_t* slot = ring_base + static_cast<size_t>(k % ring.capacity) * ring.slot_bytes;
            const int64_t row = first_row + k;
            if (row >= args.num_recv_rows) {
                if (lane == 0)
                    report_failure(args.fail, kErrorOverflow, kKernelDispatch, source, kWaitRowCapacity, channel,
                                   row + 1, args.num_recv_rows);
                ok = false;
                break;
            }
            if (!copy_row<kBulk, true>(copier, args.recv_x + row * args.hidden_bytes, slot, args.hidden_bytes,
                                       args.fail, kKernelDispatch, source, channel)) {
                ok = false;
                break;
            }
            if (args.recv_x_scales != nullptr) {
                const float* slot_scales = reinterpret_cast<const float*>(slot + args.slot.scales_offset);
                for (int g = lane; g < args.num_scales; g += kWarpSize)
                    args.recv_x_scales[row * args.num_scales + g] = __ldcg(slot_scales + g);
            }
            if (args.recv_topk_idx != nullptr && lane < args.num_topk) {
                const int expert = __ldcg(reinterpret_cast<const int*>(slot + args.slot.topk_idx_offset) + lane);
                const float weight =
                    __ldcg(reinterpret_cast<const float*>(slot + args.slot.topk_weights_offset) + lane);
                const bool local = expert >= expert_begin && expert < expert_begin + num_local_experts;
                args.recv_topk_idx[row * args.num_topk + lane] = local ? expert - expert_begin : -1;
                args.recv_topk_weights[row * args.num_topk + lane] = local ? weight : 0.0f;
            }
            if (lane == 0)
                args.recv_src_idx[row] = __ldcg(reinterpret_cast<const int*>(slot + args.slot.src_idx_offset));
            // Release the slots once consumption has caught up with what was published, or
            // every publish_every tokens. The slot loads have completed: their values were
            // stored above, before this store is issued (bulk: copy_row waited for its loads to
            // land, and their completion orders them before this ordinary store).
            if (i + 1 == tail || (i + 1) % ring.publish_every == 0) {
                __syncwarp();
                if (lane == 0)
                    st_relaxed_sys(peer_head, i + 1);
            }
        }
        complete_bulk_stores<kBulk>(copier);
        __syncwarp();
        if (ok && lane == 0) {
            *own_tail = 0;
            *own_meta_count = 0;
            *own_meta_start = 0;
            st_release_sys(peer_head, my_count + 1);
        }
    }

    // num_worst_tokens: the rows past the real count read as zeros, top-k -1, weight 0.
    if (args.fill_padding) {
        const int total = args.recv_rank_prefix[args.num_ranks];
        const int stride = ring.num_channels * kIntranodeWarps;
        const int hidden_int4 = args.hidden_bytes / 16;
        for (int64_t row = total + channel * kIntranodeWarps + warp; row < args.num_recv_rows; row += stride) {
            int4* dst = reinterpret_cast<int4*>(args.recv_x + row * args.hidden_bytes);
            for (int i = lane; i < hidden_int4; i += kWarpSize)
                dst[i] = make_int4(0, 0, 0, 0);
            if (args.recv_x_scales != nullptr)
                for (int g = lane; g < args.num_scales; g += kWarpSize)
                    args.recv_x_scales[row * args.num_scales + g] = 0.0f;
            if (args.recv_topk_idx != nullptr && lane < args.num_topk) {
                args.recv_topk_idx[row * args.num_topk + lane] = -1;
                args.recv_topk_weights[row * args.num_topk + lane] = 0.0f;
            }
            if (lane == 0)
                args.recv_src_idx[row] = -1;
        }
    }
}

template <bool kBulkSend, bool kBulkReceive>
__global__ void __launch_bounds__(kThreads, 1) intranode_dispatch_kernel(DispatchArgs args) {
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        dispatch_send<kBulkSend>(args, channel);
    else
        dispatch_receive<kBulkReceive>(args, channel);
}

// ================================================================ combine
// Sender: the rows this rank received from `home` in dispatch go back to it, in the channels
// of home's token split. Those rows are sorted by source token, so the rows of one channel are
// a contiguous run, found by a warp-wide search.
__device__ __forceinline__ int warp_lower_bound(const int* values, int lo, int hi, int target) {
    const int lane = lane_id();
    while (hi - lo > kWarpSize) {
        const int step = (hi - lo + kWarpSize - 1) / kWarpSize;
        const int probe = lo + lane * step;
        const bool valid = probe < hi;
        const unsigned ge = __ballot_sync(0xffffffffu, valid && __ldg(values + probe) >= target);
        const unsigned in_range = __ballot_sync(0xffffffffu, valid);
        if (ge == 0) {
            const int last = kWarpSize - __clz(in_range) - 1;  // highest valid lane
            lo = lo + last * step + 1;
        } else {
            const int first = __ffs(ge) - 1;
            const int new_hi = lo + first * step;
            lo = first > 0 ? lo + (first - 1) * step + 1 : lo;
            hi = new_hi;
        }
    }
    const int probe = lo + lane;
    const unsigned ge = __ballot_sync(0xffffffffu, probe < hi && __ldg(values + probe) >= target);
    return ge == 0 ? hi : lo + __ffs(ge) - 1;
}

template <bool kBulk>
__device__ void combine_send(const CombineArgs& args, int channel) {
    const RingGeometry& ring = args.ring;
    const int W = ring.warps_per_peer;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int home = warp / W, w = warp % W;
    // Rows of this rank's own tokens are read in place by the receiver.
    if (home >= args.num_ranks || home == args.rank)
        return;
    const int home_tokens = args.recv_src_num_tokens[home];
    const int begin = channel_begin(home_tokens, channel, ring.num_channels);
    const int end = channel_begin(home_tokens, channel + 1, ring.num_channels);
    const int rows_lo = args.recv_rank_prefix[home], rows_hi = args.recv_rank_prefix[home + 1];
    const int first = warp_lower_bound(args.recv_src_idx, rows_lo, rows_hi, begin);
    const int last = warp_lower_bound(args.recv_src_idx, first, rows_hi, end);
    const int my_count = sub_ring_count(last - first, w, W);

    uint8_t* peer = args.buffers.ptrs[home];
    int* peer_tail = counter_ptr(peer, kCounterTail, channel, args.rank, w);
    int* own_head = counter_ptr(args.buffers.ptrs[args.rank], kCounterHead, channel, home, w);
    uint8_t* ring_base = ring_ptr(peer, ring, args.rank, channel);
    RowCopier copier;
    if constexpr (kBulk)
        copier = make_warp_copier(args.copy);
    const int sub_capacity = ring.capacity / W;
    const int row_bytes = args.hidden * 2;
    int head = 0, published = 0;
    for (int i = 0; i < my_count; ++i) {
        if (i - head >= sub_capacity) {
            if (i != published) {  // publish before waiting for room (see dispatch_send)
                publish_tail<kBulk>(copier, peer_tail, i);
                published = i;
            }
            if (!warp_wait(args.fail, own_head, [&](int v) { return i - v < sub_capacity; }, head, kKernelCombine,
                           home, kWaitRingHead, channel, i - sub_capacity + 1)) {
                complete_bulk_stores<kBulk>(copier);
                return;
            }
            order_bulk_after_acquire<kBulk>();
        }
        const int k = w + i * W;
        const int64_t row = first + k;
        uint8_t* slot = ring_base + static_cast<size_t>(k % ring.capacity) * ring.slot_bytes;
        if (!copy_row<kBulk, false>(copier, slot, args.x + row * row_bytes, row_bytes, args.fail, kKernelCombine,
                                    home, channel)) {
            complete_bulk_stores<kBulk>(copier);
            return;
        }
        if (args.topk_weights != nullptr && lane < args.num_topk)
            reinterpret_cast<float*>(slot + args.weights_offset)[lane] =
                __ldg(args.topk_weights + row * args.num_topk + lane);
        if (i + 1 - published >= ring.publish_every) {
            publish_tail<kBulk>(copier, peer_tail, i + 1);
            published = i + 1;
        }
    }
    complete_bulk_stores<kBulk>(copier);
    __syncwarp();
    if (lane == 0 && published != my_count)
        st_release_sys(peer_tail, my_count);
    int seen;
    if (!warp_wait(args.fail, own_head, [&](int v) { return v == my_count + 1; }, seen, kKernelCombine, home,
                   kWaitRingAck, channel, my_count + 1))
        return;
    if (lane == 0)
        *own_head = 0;
}

// Sums one 16-byte column (8 bf16) of every present row, adds the biases, stores bf16.
template <int kRanks>
__device__ __forceinline__ void sum_column_store(const int4 (&loaded)[kRanks], unsigned present,
                                                 const CombineArgs& args, int64_t out_offset, int column) {
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
        acc[j] = 0.0f;
#pragma unroll
    for (int peer = 0; peer < kRanks; ++peer) {
        if (((present >> peer) & 1u) == 0)
            continue;
        accumulate_bf16x8(acc, loaded[peer]);
    }
    accumulate_biases(acc, args.bias0, args.bias1, out_offset, column);
    store_bf16x8(args.combined_x + out_offset, column, acc);
}

// Receiver: the block walks its channel's tokens in batches of one token per warp. Warp 0 first
// assigns each (token, source rank) its slot by a ballot prefix sum; then every warp sums its
// token's rows in fp32; then warp 0 releases the consumed slots of every sub-ring. The rows of
// this rank's own tokens are read in place from x (they never went through a ring).
template <int kRanks>
__device__ void combine_receive(const CombineArgs& args, int channel) {
    const RingGeometry& ring = args.ring;
    const int W = ring.warps_per_peer;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int begin = channel_begin(args.num_tokens, channel, ring.num_channels);
    const int end = channel_begin(args.num_tokens, channel + 1, ring.num_channels);
    uint8_t* own = args.buffers.ptrs[args.rank];

    __shared__ int s_slot[kIntranodeWarps][kMaxRanks];
    __shared__ int s_count[kMaxRanks];
    __shared__ int s_failed;
    __shared__ int s_local_first;
    if (threadIdx.x < kMaxRanks)
        s_count[threadIdx.x] = 0;
    if (threadIdx.x == 0)
        s_failed = 0;
    if (warp == 0) {
        const int first = warp_lower_bound(args.recv_src_idx, args.recv_rank_prefix[args.rank],
                                           args.recv_rank_prefix[args.rank + 1], begin);
        if (lane == 0)
            s_local_first = first;
    }
    // Warp 0, lane (peer * W + sub-ring): the head value last released to that peer.
    int released = 0;
    const int my_peer = lane / W, my_sub = lane % W;
    const bool head_lane = warp == 0 && lane < kRanks * W && my_peer != args.rank;
    __syncthreads();
    const int64_t local_first = s_local_first;
    const int64_t row_bytes = static_cast<int64_t>(args.hidden) * 2;

    const int hidden_int4 = args.hidden / 8;
    for (int batch = begin; batch < end; batch += kIntranodeWarps) {
        if (warp == 0) {
            const int t = batch + lane;
            const bool valid = lane < kIntranodeWarps && t < end;
#pragma unroll
            for (int peer = 0; peer < kRanks; ++peer) {
                const bool in_rank = valid && args.is_token_in_rank[static_cast<int64_t>(t) * kRanks + peer];
                const unsigned mask = __ballot_sync(0xffffffffu, in_rank);
                const int base = s_count[peer];
                if (lane < kIntranodeWarps)
                    s_slot[lane][peer] = in_rank ? base + __popc(mask & ((1u << lane) - 1)) : -1;
                __syncwarp();
                if (lane == 0)
                    s_count[peer] = base + __popc(mask);
                __syncwarp();
            }
        }
        __syncthreads();

        const int token = batch + warp;
        if (token < end) {
            // Each lane < kRanks waits for its peer's row of this token.
            bool ok = true;
            if (lane < kRanks && lane != args.rank) {
                const int k = s_slot[warp][lane];
                if (k >= 0) {
                    int seen;
                    ok = wait_value(args.fail, counter_ptr(own, kCounterTail, channel, lane, k % W),
                                    [&](int v) { return v > k / W; }, seen, kKernelCombine, lane, kWaitRingTail,
                                    channel, k / W + 1);
                }
            }
            if (__ballot_sync(0xffffffffu, !ok) != 0) {
                if (lane == 0)
                    s_failed = 1;
            } else {
                const uint8_t* rows[kRanks];
                const float* weights[kRanks];
#pragma unroll
                for (int peer = 0; peer < kRanks; ++peer) {
                    const int k = s_slot[warp][peer];
                    if (k < 0) {
                        rows[peer] = nullptr;
                        weights[peer] = nullptr;
                    } else if (peer == args.rank) {
                        rows[peer] = args.x + (local_first + k) * row_bytes;
                        weights[peer] = args.topk_weights != nullptr
                                            ? args.topk_weights + (local_first + k) * args.num_topk
                                            : nullptr;
                    } else {
                        rows[peer] = ring_ptr(own, ring, peer, channel) +
                                     static_cast<size_t>(k % ring.capacity) * ring.slot_bytes;
                        weights[peer] = reinterpret_cast<const float*>(rows[peer] + args.weights_offset);
                    }
                }
                const int64_t out_offset = static_cast<int64_t>(token) * row_bytes;
                unsigned present = 0;
#pragma unroll
                for (int peer = 0; peer < kRanks; ++peer)
                    present |= rows[peer] != nullptr ? (1u << peer) : 0u;
                // kColumns 16-byte columns per lane and step: kColumns * kRanks loads in flight.
                constexpr int kColumns = kRanks <= 4 ? 2 : 1;
                for (int i = lane; i < hidden_int4; i += kColumns * kWarpSize) {
                    int4 cols[kColumns][kRanks];
#pragma unroll
                    for (int c = 0; c < kColumns; ++c) {
                        const int column = i + c * kWarpSize;
#pragma unroll
                        for (int peer = 0; peer < kRanks; ++peer)
                            if (((present >> peer) & 1u) != 0 && column < hidden_int4)
                                cols[c][peer] = ld_ring_int4(reinterpret_cast<const int4*>(rows[peer]) + column);
                    }
#pragma unroll
                    for (int c = 0; c < kColumns; ++c)
                        if (i + c * kWarpSize < hidden_int4)
                            sum_column_store<kRanks>(cols[c], present, args, out_offset, i + c * kWarpSize);
                }
                if (args.combined_topk_weights != nullptr && lane < args.num_topk) {
                    float sum = 0.0f;
#pragma unroll
                    for (int peer = 0; peer < kRanks; ++peer)
                        if (weights[peer] != nullptr)
                            sum += __ldcg(weights[peer] + lane);
                    args.combined_topk_weights[static_cast<int64_t>(token) * args.num_topk + lane] = sum;
                }
            }
        }
        __syncthreads();
        if (s_failed)
            return;
        // Release what this batch consumed (the loads above have completed: their sums are stored).
        if (head_lane) {
            const int consumed = sub_ring_count(s_count[my_peer], my_sub, W);
            if (consumed != released) {
                st_relaxed_sys(counter_ptr(args.buffers.ptrs[my_peer], kCounterHead, channel, args.rank, my_sub),
                               consumed);
                released = consumed;
            }
        }
    }
    // Zero this call's tails, then acknowledge every sub-ring (also those that carried nothing).
    if (head_lane) {
        const int consumed = sub_ring_count(s_count[my_peer], my_sub, W);
        *counter_ptr(own, kCounterTail, channel, my_peer, my_sub) = 0;
        st_release_sys(counter_ptr(args.buffers.ptrs[my_peer], kCounterHead, channel, args.rank, my_sub),
                       consumed + 1);
    }
}

template <int kRanks, bool kBulkSend>
__global__ void __launch_bounds__(kThreads, 1) intranode_combine_kernel(CombineArgs args) {
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        combine_send<kBulkSend>(args, channel);
    else
        combine_receive<kRanks>(args, channel);
}

// Every (rank count) instance of the combine kernel with a SIMT or a bulk sender.
template <bool kBulkSend>
void launch_combine_kernel(const CombineArgs& args, cudaStream_t stream) {
    const dim3 grid(args.ring.num_channels * 2);
    const size_t shared_bytes = kBulkSend ? kBulkSharedBytes : 0;
    switch (args.num_ranks) {
    case 1: intranode_combine_kernel<1, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    case 2: intranode_combine_kernel<2, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    case 3: intranode_combine_kernel<3, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    case 4: intranode_combine_kernel<4, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    case 5: intranode_combine_kernel<5, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    case 6: intranode_combine_kernel<6, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    case 7: intranode_combine_kernel<7, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    case 8: intranode_combine_kernel<8, kBulkSend><<<grid, kThreads, shared_bytes, stream>>>(args); break;
    default: DEEP_EP_HOST_ASSERT(false, "intranode supports 1..8 ranks");
    }
}

// Lets a bulk kernel take kBulkSharedBytes of dynamic shared memory (above the 48 KB default).
template <typename Kernel>
void allow_bulk_shared_memory(Kernel kernel, int device) {
    cudaFuncAttributes attributes;
    DEEP_EP_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    int limit = 0;
    DEEP_EP_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const size_t need = attributes.sharedSizeBytes + kBulkSharedBytes;
    DEEP_EP_HOST_ASSERT(need <= static_cast<size_t>(limit),
                        "the bulk copy variant needs " + std::to_string(need) +
                            " bytes of shared memory per block; this GPU allows " + std::to_string(limit));
    DEEP_EP_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBulkSharedBytes));
}

}  // namespace

// ================================================================ launchers
void launch_notify_dispatch(const NotifyArgs& args, cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(args.num_ranks >= 1 && args.num_ranks <= kMaxRanks, "intranode supports 1..8 ranks");
    DEEP_EP_HOST_ASSERT(args.num_experts / args.num_ranks <= kMaxLocalExperts, "too many local experts");
    notify_dispatch_kernel<<<1, kNotifyThreads, 0, stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

DispatchSlot make_dispatch_slot(int hidden_bytes, int num_scales, int num_topk) {
    DispatchSlot slot;
    slot.scales_offset = align_up(hidden_bytes, 16);
    slot.topk_idx_offset = slot.scales_offset + align_up(num_scales * 4, 16);
    slot.topk_weights_offset = slot.topk_idx_offset + align_up(num_topk * 4, 16);
    slot.src_idx_offset = slot.topk_weights_offset + align_up(num_topk * 4, 16);
    // Whole 128-byte lines per slot: every slot then starts line-aligned, so a warp's 512-byte
    // stores over NVLink never straddle a partial line.
    slot.bytes = align_up(slot.src_idx_offset + 16, 128);
    return slot;
}

void prepare_intranode_copy(IntranodeCopy copy) {
    if (copy == IntranodeCopy::kSimt)
        return;
    int device = 0;
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device));
    allow_bulk_shared_memory(intranode_dispatch_kernel<true, true>, device);
    allow_bulk_shared_memory(intranode_dispatch_kernel<true, false>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<1, true>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<2, true>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<3, true>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<4, true>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<5, true>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<6, true>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<7, true>, device);
    allow_bulk_shared_memory(intranode_combine_kernel<8, true>, device);
}

void launch_intranode_dispatch(const DispatchArgs& args, cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(args.hidden_bytes % 16 == 0, "hidden bytes must be a multiple of 16");
    DEEP_EP_HOST_ASSERT(args.num_topk <= kWarpSize, "num_topk must be at most 32");
    DEEP_EP_HOST_ASSERT(args.ring.warps_per_peer * args.num_ranks <= kIntranodeWarps, "too many warps per peer");
    check_copy_plan(args.copy, args.x, args.recv_x);
    const int blocks = args.ring.num_channels * 2;
    switch (args.copy.variant) {
    case IntranodeCopy::kSimt: intranode_dispatch_kernel<false, false><<<blocks, kThreads, 0, stream>>>(args); break;
    case IntranodeCopy::kBulk:
        intranode_dispatch_kernel<true, true><<<blocks, kThreads, kBulkSharedBytes, stream>>>(args);
        break;
    case IntranodeCopy::kBulkSend:
        intranode_dispatch_kernel<true, false><<<blocks, kThreads, kBulkSharedBytes, stream>>>(args);
        break;
    default: DEEP_EP_HOST_ASSERT(false, "unknown intranode copy variant");
    }
    DEEP_EP_LAUNCH_CHECK();
}

void launch_intranode_combine(const CombineArgs& args, cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(args.hidden % 8 == 0, "hidden must be a multiple of 8");
    DEEP_EP_HOST_ASSERT(args.num_topk <= kWarpSize, "num_topk must be at most 32");
    DEEP_EP_HOST_ASSERT(args.ring.warps_per_peer * args.num_ranks <= kWarpSize, "too many sub-rings per channel");
    check_copy_plan(args.copy, args.x, args.combined_x);
    switch (args.copy.variant) {
    case IntranodeCopy::kSimt: launch_combine_kernel<false>(args, stream); break;
    case IntranodeCopy::kBulk:
    case IntranodeCopy::kBulkSend: launch_combine_kernel<true>(args, stream); break;
    default: DEEP_EP_HOST_ASSERT(false, "unknown intranode copy variant");
    }
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
