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
#include <cstdint>
#include <string>

#include <cuda_bf16.h>

#include "api.cuh"
#include "buffer.cuh"
#include "launch.cuh"
#include "utils.cuh"
#include "warp_trace.cuh"

namespace deep_ep {
namespace {

constexpr int kThreads = kIntranodeWarps * kWarpSize;
constexpr int kNotifyThreads = 256;
constexpr int kCopyUnroll = 8;

// Development trace (warp_trace.cuh): the table of the dispatch (0) and combine (1) kernels,
// [kernel][block][activity].
__device__ int g_intranode_trace_enabled;
__device__ unsigned long long g_intranode_trace[2][2 * kMaxChannels][kWarpTraceSlots];

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

// ================================================================ row movers
// Moves one row with the whole warp: 16-byte loads and stores by every lane, kCopyUnroll loads in
// flight before their stores. Ring slots (written by another GPU) are read past L1: kSrcIsRing.
template <bool kSrcIsRing>
__device__ __forceinline__ void copy_row(uint8_t* dst, const uint8_t* src, int bytes) {
    warp_copy_int4<kCopyUnroll, kSrcIsRing>(reinterpret_cast<int4*>(dst), reinterpret_cast<const int4*>(src), bytes / 16,
                                            lane_id());
}

// Publishes `value` to a ring counter in a peer's memory: every lane's stores of the slots first,
// then a release at system scope from lane 0.
__device__ __forceinline__ void publish_tail(int* tail, int value) {
    __syncwarp();
    if (lane_id() == 0)
        st_release_sys(tail, value);
}

// ================================================================ optional row map
// The rows received from one source, split into runs that each move by a constant (see
// DispatchArgs::row_segment_end). Lane j reads the end of run j, so a row finds its run with one
// ballot. The map is a few hundred bytes read by every warp, so these loads hit L1; they are
// made per row instead of holding the runs in registers, which made the kernels spill more.
// Without a map (`ends` null, from the kernel's arguments: warp-uniform) the row stays.
__device__ __forceinline__ int64_t map_row(const int* ends, const int* deltas, int num_runs, int source, int64_t row) {
    if (ends == nullptr)
        return row;
    const int lane = lane_id();
    const int end = lane < num_runs ? __ldg(ends + source * num_runs + lane) : -1;
    // The runs ascend, so the first lane whose run ends past the row holds it; a row past
    // every run stays.
    const unsigned runs = __ballot_sync(0xffffffffu, row < end);
    return runs != 0 ? row + __ldg(deltas + source * num_runs + __ffs(runs) - 1) : row;
}

// ================================================================ dispatch
// A slot's metadata (FP8 scales, top-k ids and weights, source index) travels as 16-byte words:
// every field starts 16-byte aligned (make_dispatch_slot), so the word at metadata offset 16 L
// holds one field only, and lane L builds it. One warp-wide NVLink write of whole words per token
// instead of one small write per field (five for an FP8 token with top-k: two of scales, ids,
// weights, source index). Top-k ids outside [0, num_experts) travel as -1.
__device__ __forceinline__ int4 load_slot_meta_word(const DispatchArgs& args, int token, int offset) {
    const DispatchSlot& layout = args.slot;
    int words[4] = {0, 0, 0, 0};
    if (offset < layout.topk_idx_offset) {
        const int first = (offset - layout.scales_offset) / 4;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (first + j < args.num_scales)
                words[j] = __float_as_int(__ldg(args.x_scales + token * args.scale_token_stride +
                                                (first + j) * args.scale_hidden_stride));
    } else if (offset < layout.topk_weights_offset) {
        const int first = (offset - layout.topk_idx_offset) / 4;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (first + j < args.num_topk) {
                const int64_t expert = __ldg(args.topk_idx + static_cast<int64_t>(token) * args.num_topk + first + j);
                words[j] = (expert < 0 || expert >= args.num_experts) ? -1 : static_cast<int>(expert);
            }
        }
    } else if (offset < layout.src_idx_offset) {
        const int first = (offset - layout.topk_weights_offset) / 4;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (first + j < args.num_topk)
                words[j] = __float_as_int(
                    __ldg(args.topk_weights + static_cast<int64_t>(token) * args.num_topk + first + j));
    } else {
        words[0] = token;
    }
    return make_int4(words[0], words[1], words[2], words[3]);
}

// Stores one lane's metadata word of a slot (see load_slot_meta_word) into the outputs: FP8
// scales and top-k ids remapped to this rank's experts (-1 elsewhere) with their weights (0
// elsewhere) at row `row`, the source index at `src_row` (the leg row under a row map). Whole warp (a shuffle brings each id word its
// weights word, which sits a fixed number of lanes higher: both fields have the same size).
__device__ __forceinline__ void store_slot_meta(const DispatchArgs& args, const int4& word, int offset, int64_t row,
                                                int64_t src_row, int expert_begin, int num_local_experts) {
    const DispatchSlot& layout = args.slot;
    const int lanes_to_weights = (layout.topk_weights_offset - layout.topk_idx_offset) / 16;
    int4 weights;
    weights.x = __shfl_down_sync(0xffffffffu, word.x, lanes_to_weights);
    weights.y = __shfl_down_sync(0xffffffffu, word.y, lanes_to_weights);
    weights.z = __shfl_down_sync(0xffffffffu, word.z, lanes_to_weights);
    weights.w = __shfl_down_sync(0xffffffffu, word.w, lanes_to_weights);
    const int words[4] = {word.x, word.y, word.z, word.w};
    const int weight_words[4] = {weights.x, weights.y, weights.z, weights.w};
    if (offset < layout.topk_idx_offset) {
        const int first = (offset - layout.scales_offset) / 4;
#pragma unroll
        for (int j = 0; j < 4; ++j)
            if (first + j < args.num_scales)
                args.recv_x_scales[row * args.num_scales + first + j] = __int_as_float(words[j]);
    } else if (offset < layout.topk_weights_offset) {
        const int first = (offset - layout.topk_idx_offset) / 4;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (first + j < args.num_topk) {
                const int expert = words[j];
                const bool local = expert >= expert_begin && expert < expert_begin + num_local_experts;
                args.recv_topk_idx[row * args.num_topk + first + j] = local ? expert - expert_begin : -1;
                args.recv_topk_weights[row * args.num_topk + first + j] = local ? __int_as_float(weight_words[j]) : 0.0f;
            }
        }
    } else if (offset == layout.src_idx_offset) {
        args.recv_src_idx[src_row] = words[0];
    }
}

// Lane L's 16-byte metadata word of a slot (load_slot_meta_word's layout): its offset, the end of
// the metadata, and whether one word per lane covers all of it (else the word-by-word path,
// write_slot_meta, or the per-field loads).
struct SlotMetaLane {
    int offset, end;
    bool one_word;
};

__device__ __forceinline__ SlotMetaLane slot_meta_lane(const DispatchSlot& slot, int lane) {
    const int end = slot.src_idx_offset + 16;
    return SlotMetaLane{slot.scales_offset + lane * 16, end, end - slot.scales_offset <= kWarpSize * 16};
}

// The whole metadata of a slot, word by word (the path for metadata longer than a word per lane).
__device__ __forceinline__ void write_slot_meta(const DispatchArgs& args, uint8_t* slot, int token, int lane) {
    const SlotMetaLane lane_meta = slot_meta_lane(args.slot, lane);
    for (int offset = lane_meta.offset; offset < lane_meta.end; offset += kWarpSize * 16)
        st_int4(reinterpret_cast<int4*>(slot + offset), load_slot_meta_word(args, token, offset));
}

// An own-rank token into its output row `row` (moved by the row map under kRowMap): data, FP8
// scales, top-k remapped to this rank's experts and the source index, without a ring. Whole warp.
// False after a recorded overflow.
template <bool kRowMap>
__device__ __forceinline__ bool stage_own_row(const DispatchArgs& args, int token, int64_t row, int channel,
                                              const WarpTrace& trace) {
    const int lane = lane_id();
    const int num_local_experts = args.num_experts / args.num_ranks;
    const int expert_begin = args.rank * num_local_experts;
    const SlotMetaLane lane_meta = slot_meta_lane(args.slot, lane);
    // Where the row goes (== row without a row map); recv_src_idx stays at `row`.
    const int64_t out =
        kRowMap ? map_row(args.row_segment_end, args.row_segment_delta, args.num_row_segments, args.rank, row) : row;
    if (row >= args.num_recv_rows || (kRowMap && (out < 0 || out >= args.num_recv_rows))) {
        if (lane == 0)
            report_failure(args.fail, kErrorOverflow, kKernelDispatch, args.rank, kWaitRowCapacity, channel,
                           max(row, out) + 1, args.num_recv_rows);
        return false;
    }
    const long long since = trace.now();
    trace.count(kTraceItems);
    if (lane_meta.one_word) {
        // Metadata loads first, so their latency hides behind the row copy's.
        const int4 word = lane_meta.offset < lane_meta.end ? load_slot_meta_word(args, token, lane_meta.offset)
                                                           : make_int4(0, 0, 0, 0);
        copy_row<false>(args.recv_x + out * args.hidden_bytes, args.x + static_cast<int64_t>(token) * args.hidden_bytes,
                        args.hidden_bytes);
        store_slot_meta(args, word, lane_meta.offset, out, row, expert_begin, num_local_experts);
        trace.add(kTraceLocal, since);
        return true;
    }
    // With a map, `row` is stored first so that it is dead during the copy (fewer spills).
    if (kRowMap && lane == 0)
        args.recv_src_idx[row] = token;
    copy_row<false>(args.recv_x + out * args.hidden_bytes, args.x + static_cast<int64_t>(token) * args.hidden_bytes,
                    args.hidden_bytes);
    if (args.x_scales != nullptr)
        for (int g = lane; g < args.num_scales; g += kWarpSize)
            args.recv_x_scales[out * args.num_scales + g] =
                __ldg(args.x_scales + token * args.scale_token_stride + g * args.scale_hidden_stride);
    if (args.topk_idx != nullptr && lane < args.num_topk) {
        const int64_t index = static_cast<int64_t>(token) * args.num_topk + lane;
        const int64_t expert = __ldg(args.topk_idx + index);
        const bool mine = expert >= expert_begin && expert < expert_begin + num_local_experts;
        args.recv_topk_idx[out * args.num_topk + lane] = mine ? expert - expert_begin : -1;
        args.recv_topk_weights[out * args.num_topk + lane] = mine ? __ldg(args.topk_weights + index) : 0.0f;
    }
    if (!kRowMap && lane == 0)
        args.recv_src_idx[row] = token;
    trace.add(kTraceLocal, since);
    return true;
}

// kRowMap: the kernel instance for a row map (DispatchArgs::row_segment_end); the one without
// compiles to the code it had before maps existed. kOwnRowsByReceiver: the rows this rank sends to
// itself are copied by the receiver block's warps of that source (idle otherwise) instead of the
// sender's, so the sender block's memory pipeline carries NVLink stores only (the default;
// DEEP_EP_OWN_ROWS_BY_RECEIVER=0 selects the sender copy, see launch_intranode_dispatch; docs/benchmarks.md has the A/B).
template <bool kRowMap, bool kOwnRowsByReceiver>
__device__ void dispatch_send(const DispatchArgs& args, int channel, const WarpTrace& trace) {
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
    const int n = s_inside[dest];
    const int my_count = sub_ring_count(n, w, W);
    uint8_t* peer = args.buffers.ptrs[dest];
    uint8_t* own = args.buffers.ptrs[args.rank];
    int* peer_tail = counter_ptr(peer, kCounterTail, channel, args.rank, w);
    int* own_head = counter_ptr(own, kCounterHead, channel, dest, w);
    uint8_t* ring_base = ring_ptr(peer, ring, args.rank, channel);
    // Tokens for this rank itself skip the ring: the sender writes them straight to their rows
    // (stage_own_row), or with kOwnRowsByReceiver the receiver block does (dispatch_receive).
    const bool local = dest == args.rank;
    if (kOwnRowsByReceiver && local)
        return;
    const int64_t local_first_row = local ? static_cast<int64_t>(args.recv_rank_prefix[args.rank]) + s_before[dest] : 0;
    const SlotMetaLane lane_meta = slot_meta_lane(args.slot, lane);
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
            const int token = window + nth_set_bit(mask, j);
            const int k = seq + j;
            if (local) {
                if (!stage_own_row<kRowMap>(args, token, local_first_row + k, channel, trace)) {
                    ok = false;
                    break;
                }
                continue;
            }
            if (sent - head >= sub_capacity) {
                // Publish what is written before waiting for room: the receiver can only free
                // slots it has been told about.
                long long since = trace.now();
                if (sent != published) {
                    publish_tail(peer_tail, sent);
                    published = sent;
                }
                trace.add(kTracePublish, since);
                since = trace.now();
                if (!warp_wait(args.fail, own_head, [&](int v) { return sent - v < sub_capacity; }, head,
                               kKernelDispatch, dest, kWaitRingHead, channel, sent - sub_capacity + 1)) {
                    ok = false;
                    break;
                }
                trace.add(kTraceWait, since);
            }
            uint8_t* slot = ring_base + static_cast<size_t>(k % ring.capacity) * ring.slot_bytes;
            long long since = trace.now();
            trace.count(kTraceItems);
            if (lane_meta.one_word) {
                const int4 word = lane_meta.offset < lane_meta.end ? load_slot_meta_word(args, token, lane_meta.offset)
                                                                   : make_int4(0, 0, 0, 0);
                copy_row<false>(slot, args.x + static_cast<int64_t>(token) * args.hidden_bytes, args.hidden_bytes);
                if (lane_meta.offset < lane_meta.end)
                    st_int4(reinterpret_cast<int4*>(slot + lane_meta.offset), word);
            } else {
                copy_row<false>(slot, args.x + static_cast<int64_t>(token) * args.hidden_bytes, args.hidden_bytes);
                write_slot_meta(args, slot, token, lane);
            }
            trace.add(kTraceData, since);
            ++sent;
            if (sent - published >= ring.publish_every) {
                since = trace.now();
                publish_tail(peer_tail, sent);
                published = sent;
                trace.add(kTracePublish, since);
            }
        }
        seq += count;
    }
    if (!ok || local)
        return;
    __syncwarp();
    if (lane == 0 && sent != published)
        st_release_sys(peer_tail, sent);
    // The receiver acknowledges with count + 1 once it has consumed everything and zeroed its
    // counters; only then may this head word be zeroed for the next call.
    int seen;
    const long long since = trace.now();
    if (!warp_wait(args.fail, own_head, [&](int v) { return v == my_count + 1; }, seen, kKernelDispatch, dest,
                   kWaitRingAck, channel, my_count + 1))
        return;
    trace.add(kTraceWait, since);
    if (lane == 0)
        *own_head = 0;
}

// This rank's own tokens of the channel, sub-stream w of W (the numbering of dispatch_send's
// group for itself): each into its output row. Whole warp; false after a recorded overflow.
template <bool kRowMap>
__device__ bool stage_own_rows(const DispatchArgs& args, int channel, int w, int64_t first_row,
                               const WarpTrace& trace) {
    const int W = args.ring.warps_per_peer, lane = lane_id();
    const int begin = channel_begin(args.num_tokens, channel, args.ring.num_channels);
    const int end = channel_begin(args.num_tokens, channel + 1, args.ring.num_channels);
    int seq = 0;
    for (int window = begin; window < end; window += kWarpSize) {
        const int t = window + lane;
        const bool in_rank = t < end && args.is_token_in_rank[static_cast<int64_t>(t) * args.num_ranks + args.rank];
        const unsigned mask = __ballot_sync(0xffffffffu, in_rank);
        const int count = __popc(mask);
        for (int j = (w - seq % W + W) % W; j < count; j += W) {
            if (!stage_own_row<kRowMap>(args, window + nth_set_bit(mask, j), first_row + seq + j, channel, trace))
                return false;
        }
        seq += count;
    }
    return true;
}

template <bool kRowMap, bool kOwnRowsByReceiver>
__device__ void dispatch_receive(const DispatchArgs& args, int channel, const WarpTrace& trace) {
    const RingGeometry& ring = args.ring;
    const int W = ring.warps_per_peer;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int source = warp / W, w = warp % W;
    if (kOwnRowsByReceiver) {
        // This rank's tokens before the channel: the first row of its own part of the channel.
        __shared__ int s_own_before;
        if (threadIdx.x == 0)
            s_own_before = 0;
        __syncthreads();
        const int begin = channel_begin(args.num_tokens, channel, ring.num_channels);
        const int own_before = block_count(
            begin, [&](int t) { return args.is_token_in_rank[static_cast<int64_t>(t) * args.num_ranks + args.rank]; },
            &s_own_before);
        if (source == args.rank)
            stage_own_rows<kRowMap>(args, channel, w,
                                    static_cast<int64_t>(args.recv_rank_prefix[args.rank]) + own_before, trace);
    }
    if (source < args.num_ranks && source != args.rank) {
        uint8_t* own = args.buffers.ptrs[args.rank];
        int* own_tail = counter_ptr(own, kCounterTail, channel, source, w);
        int* own_meta_count = counter_ptr(own, kCounterMetaCount, channel, source, w);
        int* own_meta_start = counter_ptr(own, kCounterMetaStart, channel, source, w);
        int* peer_head = counter_ptr(args.buffers.ptrs[source], kCounterHead, channel, args.rank, w);
        const uint8_t* ring_base = ring_ptr(own, ring, source, channel);

        int meta;
        long long since = trace.now();
        bool ok = warp_wait(args.fail, own_meta_count, [](int v) { return v != 0; }, meta, kKernelDispatch, source,
                            kWaitRingMeta, channel, -1);
        trace.add(kTraceWait, since);
        const int my_count = -meta - 1;
        const int first_row = args.recv_rank_prefix[source] + (ok ? ld_relaxed_sys(own_meta_start) : 0);
        const int num_local_experts = args.num_experts / args.num_ranks;
        const int expert_begin = args.rank * num_local_experts;
        const SlotMetaLane lane_meta = slot_meta_lane(args.slot, lane);
        int tail = 0;
        for (int i = 0; ok && i < my_count; ++i) {
            if (i >= tail) {
                since = trace.now();
                if (!warp_wait(args.fail, own_tail, [&](int v) { return v > i; }, tail, kKernelDispatch, source,
                               kWaitRingTail, channel, i + 1)) {
                    ok = false;
                    break;
                }
                trace.add(kTraceWait, since);
            }
            const int k = w + i * W;
            const uint8_t* slot = ring_base + static_cast<size_t>(k % ring.capacity) * ring.slot_bytes;
            const int64_t row = first_row + k;
            // Where the row goes (== row without a row map); recv_src_idx stays at `row`.
            const int64_t out =
                kRowMap ? map_row(args.row_segment_end, args.row_segment_delta, args.num_row_segments, source, row)
                        : row;
            if (row >= args.num_recv_rows || (kRowMap && (out < 0 || out >= args.num_recv_rows))) {
                if (lane == 0)
                    report_failure(args.fail, kErrorOverflow, kKernelDispatch, source, kWaitRowCapacity, channel,
                                   max(row, out) + 1, args.num_recv_rows);
                ok = false;
                break;
            }
            since = trace.now();
            trace.count(kTraceItems);
            if (lane_meta.one_word) {
                // The metadata load goes out before the row copy, so its latency hides behind the
                // copy's instead of adding round trips per token.
                const int4 word = lane_meta.offset < lane_meta.end
                                      ? ld_ring_int4(reinterpret_cast<const int4*>(slot + lane_meta.offset))
                                      : make_int4(0, 0, 0, 0);
                copy_row<true>(args.recv_x + out * args.hidden_bytes, slot, args.hidden_bytes);
                store_slot_meta(args, word, lane_meta.offset, out, row, expert_begin, num_local_experts);
            } else {
                // With a map, `row` is stored first so that it is dead during the copy (fewer spills).
                if (kRowMap && lane == 0)
                    args.recv_src_idx[row] = __ldcg(reinterpret_cast<const int*>(slot + args.slot.src_idx_offset));
                copy_row<true>(args.recv_x + out * args.hidden_bytes, slot, args.hidden_bytes);
                if (args.recv_x_scales != nullptr) {
                    const float* slot_scales = reinterpret_cast<const float*>(slot + args.slot.scales_offset);
                    for (int g = lane; g < args.num_scales; g += kWarpSize)
                        args.recv_x_scales[out * args.num_scales + g] = __ldcg(slot_scales + g);
                }
                if (args.recv_topk_idx != nullptr && lane < args.num_topk) {
                    const int expert = __ldcg(reinterpret_cast<const int*>(slot + args.slot.topk_idx_offset) + lane);
                    const float weight =
                        __ldcg(reinterpret_cast<const float*>(slot + args.slot.topk_weights_offset) + lane);
                    const bool local = expert >= expert_begin && expert < expert_begin + num_local_experts;
                    args.recv_topk_idx[out * args.num_topk + lane] = local ? expert - expert_begin : -1;
                    args.recv_topk_weights[out * args.num_topk + lane] = local ? weight : 0.0f;
                }
                if (!kRowMap && lane == 0)
                    args.recv_src_idx[row] = __ldcg(reinterpret_cast<const int*>(slot + args.slot.src_idx_offset));
            }
            trace.add(kTraceData, since);
            // Release the slots once consumption has caught up with what was published, or
            // every publish_every tokens. The slot loads have completed: their values were
            // stored above, before this store is issued.
            if (i + 1 == tail || (i + 1) % ring.publish_every == 0) {
                __syncwarp();
                if (lane == 0)
                    st_relaxed_sys(peer_head, i + 1);
            }
        }
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

template <bool kRowMap, bool kOwnRowsByReceiver>
__global__ void __launch_bounds__(kThreads, 1) intranode_dispatch_kernel(DispatchArgs args) {
    __shared__ unsigned long long s_trace[kIntranodeWarps][kWarpTraceSlots];
    const WarpTrace trace = open_warp_trace(s_trace, g_intranode_trace_enabled != 0);
    const long long start = trace.now();
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        dispatch_send<kRowMap, kOwnRowsByReceiver>(args, channel, trace);
    else
        dispatch_receive<kRowMap, kOwnRowsByReceiver>(args, channel, trace);
    trace.add(kTraceTotal, start);
    close_warp_trace(trace, g_intranode_trace[0][blockIdx.x]);
}

// ================================================================ combine
// Sender: the rows this rank received from `home` in dispatch go back to it, in the channels
// of home's token split. Those rows are sorted by source token, so the rows of one channel are
// a contiguous run, found by a warp-wide search (warp_lower_bound).

__device__ void combine_send(const CombineArgs& args, int channel, const WarpTrace& trace) {
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
    const int sub_capacity = ring.capacity / W;
    const int row_bytes = args.hidden * 2;
    int head = 0, published = 0;
    for (int i = 0; i < my_count; ++i) {
        if (i - head >= sub_capacity) {
            long long since = trace.now();
            if (i != published) {  // publish before waiting for room (see dispatch_send)
                publish_tail(peer_tail, i);
                published = i;
            }
            trace.add(kTracePublish, since);
            since = trace.now();
            if (!warp_wait(args.fail, own_head, [&](int v) { return i - v < sub_capacity; }, head, kKernelCombine,
                           home, kWaitRingHead, channel, i - sub_capacity + 1))
                return;
            trace.add(kTraceWait, since);
        }
        const int k = w + i * W;
        // Where dispatch wrote received row first + k.
        const int64_t row =
            map_row(args.row_segment_end, args.row_segment_delta, args.num_row_segments, home, first + k);
        uint8_t* slot = ring_base + static_cast<size_t>(k % ring.capacity) * ring.slot_bytes;
        long long since = trace.now();
        trace.count(kTraceItems);
        copy_row<false>(slot, args.x + row * row_bytes, row_bytes);
        if (args.topk_weights != nullptr && lane < args.num_topk)
            reinterpret_cast<float*>(slot + args.weights_offset)[lane] =
                __ldg(args.topk_weights + row * args.num_topk + lane);
        trace.add(kTraceData, since);
        if (i + 1 - published >= ring.publish_every) {
            since = trace.now();
            publish_tail(peer_tail, i + 1);
            published = i + 1;
            trace.add(kTracePublish, since);
        }
    }
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

// values[i] of a register array (an unrolled select: a run-time index would put it in local memory).
template <int N>
__device__ __forceinline__ int pick(const int (&values)[N], int i) {
    int v = 0;
#pragma unroll
    for (int j = 0; j < N; ++j)
        v = j == i ? values[j] : v;
    return v;
}

// The token's sum, row by row of `rows` (present ones), into combined_x at out_offset: each step
// loads kColumns 16-byte columns of every present row into registers, then sums and stores them.
// Whole warp.
template <int kRanks>
__device__ __forceinline__ void sum_rows_direct(const CombineArgs& args, const uint8_t* const (&rows)[kRanks],
                                                unsigned present, int64_t out_offset, int hidden_int4) {
    // kColumns 16-byte columns per lane and step: kColumns * kRanks loads in flight.
    constexpr int kColumns = kRanks <= 4 ? 2 : 1;
    for (int i = lane_id(); i < hidden_int4; i += kColumns * kWarpSize) {
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
}

// Boundaries of batches whose per-peer row counts a combine receiver block keeps (see
// combine_receive): a warp runs at most this many batches ahead of the last released boundary.
constexpr int kCombineCountDepth = 32;

// Receiver: the block walks its channel's tokens in batches of one token per warp (token batch +
// warp). Every warp numbers the batch itself (a ballot per source over the batch's tokens, the
// running counts in registers: the k-th row from a source in token order sits in sub-ring k % W,
// slot k / W), waits for its token's rows and sums them in fp32; no warp waits for another. A warp
// that finishes a batch records its progress; when the slowest warp's progress passes a batch
// boundary, the warp that sees it releases the slots consumed before it (a max on the sender's
// head, so releases from several warps never move it back). The rows of this rank's own tokens
// are read in place from x (they never went through a ring). (Before, two block barriers per
// batch made every warp wait for the batch's slowest token: ~35 % of the receiver's time.)
template <int kRanks>
__device__ void combine_receive(const CombineArgs& args, int channel, const WarpTrace& trace) {
    const RingGeometry& ring = args.ring;
    const int W = ring.warps_per_peer;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int begin = channel_begin(args.num_tokens, channel, ring.num_channels);
    const int end = channel_begin(args.num_tokens, channel + 1, ring.num_channels);
    uint8_t* own = args.buffers.ptrs[args.rank];

    __shared__ int s_progress[kIntranodeWarps];               // batches each warp has finished
    __shared__ int s_cum[kCombineCountDepth][kMaxRanks];      // rows per source before boundary b (entry b % depth)
    __shared__ int s_released;                                // boundary up to which slots are released
    __shared__ int s_failed;
    __shared__ int s_local_first;
    if (threadIdx.x < kIntranodeWarps)
        s_progress[threadIdx.x] = 0;
    if (threadIdx.x < kMaxRanks)
        s_cum[0][threadIdx.x] = 0;
    if (threadIdx.x == 0) {
        s_released = 0;
        s_failed = 0;
    }
    if (warp == 0) {
        const int first = warp_lower_bound(args.recv_src_idx, args.recv_rank_prefix[args.rank],
                                           args.recv_rank_prefix[args.rank + 1], begin);
        if (lane == 0)
            s_local_first = first;
    }
    // Lane (peer * W + sub-ring) of a releasing warp writes that sub-ring's head.
    const int my_peer = lane / W, my_sub = lane % W;
    const bool head_lane = lane < kRanks * W && my_peer != args.rank;
    __syncthreads();
    const int64_t local_first = s_local_first;
    const int64_t row_bytes = static_cast<int64_t>(args.hidden) * 2;
    const int hidden_int4 = args.hidden / 8;
    const int num_batches = (end - begin + kIntranodeWarps - 1) / kIntranodeWarps;

    int count[kRanks];  // rows from each source before the current batch (warp-uniform)
#pragma unroll
    for (int peer = 0; peer < kRanks; ++peer)
        count[peer] = 0;
    bool failed = false;
    for (int b = 0; b < num_batches && !failed; ++b) {
        long long since = trace.now();
        // Entry (b + 1) % depth is about to be rewritten: its last use (boundary b + 1 - depth)
        // must be released. Waits only when this warp is a whole depth ahead of the slowest one.
        if (b + 1 - kCombineCountDepth > 0) {
            const uint64_t start = global_timer_ns();
            while (ld_volatile_any(&s_released) < b + 1 - kCombineCountDepth) {
                if (ld_volatile_any(&s_failed) != 0 || ld_volatile(args.fail.abort_flag) != 0) {
                    failed = true;
                    break;
                }
                if (global_timer_ns() - start > args.fail.timeout_ns) {
                    if (lane == 0)
                        report_failure(args.fail, kErrorTimeout, kKernelCombine, -1, kWaitRingTail, channel,
                                       ld_volatile_any(&s_released), b + 1 - kCombineCountDepth);
                    failed = true;
                    break;
                }
            }
            if (__any_sync(0xffffffffu, failed)) {
                if (lane == 0)
                    s_failed = 1;  // no acknowledgement below: this call has failed
                break;
            }
        }
        // Number the batch: this warp's token's slot in each source's stream.
        const int batch = begin + b * kIntranodeWarps;
        const int t = batch + lane;
        const bool valid = lane < kIntranodeWarps && t < end;
        int slot[kRanks];
#pragma unroll
        for (int peer = 0; peer < kRanks; ++peer) {
            const bool in = valid && args.is_token_in_rank[static_cast<int64_t>(t) * kRanks + peer];
            const unsigned mask = __ballot_sync(0xffffffffu, in);
            slot[peer] = ((mask >> warp) & 1u) != 0 ? count[peer] + __popc(mask & ((1u << warp) - 1u)) : -1;
            count[peer] += __popc(mask);
        }
        // Every warp writes the same counts (benign): boundary b + 1.
        if (lane < kRanks)
            s_cum[(b + 1) % kCombineCountDepth][lane] = pick<kRanks>(count, lane);
        trace.add(kTraceBatch, since);
        since = trace.now();

        const int token = batch + warp;
        if (token < end) {
            // Each lane < kRanks waits for its peer's row of this token.
            bool ok = true;
            if (lane < kRanks && lane != args.rank) {
                const int k = pick<kRanks>(slot, lane);
                if (k >= 0) {
                    int seen;
                    ok = wait_value(args.fail, counter_ptr(own, kCounterTail, channel, lane, k % W),
                                    [&](int v) { return v > k / W; }, seen, kKernelCombine, lane, kWaitRingTail,
                                    channel, k / W + 1);
                }
            }
            failed = __ballot_sync(0xffffffffu, !ok) != 0;
            trace.add(kTraceWait, since);
            since = trace.now();
            if (!failed) {
                const uint8_t* rows[kRanks];
                const float* weights[kRanks];
#pragma unroll
                for (int peer = 0; peer < kRanks; ++peer) {
                    const int k = slot[peer];
                    if (k < 0) {
                        rows[peer] = nullptr;
                        weights[peer] = nullptr;
                    } else if (peer == args.rank) {
                        // Where dispatch wrote it (== local_first + k without a row map).
                        const int64_t row = map_row(args.row_segment_end, args.row_segment_delta,
                                                    args.num_row_segments, args.rank, local_first + k);
                        rows[peer] = args.x + row * row_bytes;
                        weights[peer] = args.topk_weights != nullptr ? args.topk_weights + row * args.num_topk
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
                sum_rows_direct<kRanks>(args, rows, present, out_offset, hidden_int4);
                if (args.combined_topk_weights != nullptr && lane < args.num_topk) {
                    float sum = 0.0f;
#pragma unroll
                    for (int peer = 0; peer < kRanks; ++peer)
                        if (weights[peer] != nullptr)
                            sum += __ldcg(weights[peer] + lane);
                    args.combined_topk_weights[static_cast<int64_t>(token) * args.num_topk + lane] = sum;
                }
                trace.add(kTraceData, since);
                trace.count(kTraceItems);
            }
        }
        if (failed) {
            if (lane == 0)
                s_failed = 1;
            break;
        }
        since = trace.now();
        // This warp's loads of batch b have completed (their sums are stored): its progress, then
        // the release of every boundary the slowest warp has passed.
        __syncwarp();
        if (lane == 0)
            st_release_cta(&s_progress[warp], b + 1);
        __syncwarp();
        int reached = lane < kIntranodeWarps ? ld_acquire_cta(&s_progress[lane]) : num_batches;
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
            reached = min(reached, __shfl_xor_sync(0xffffffffu, reached, offset));
        // (The barrier orders the lanes' acquires above before every lane's reads below; lane 0's
        // read of the released boundary decides for the warp: the barrier and shuffle below need
        // every lane.)
        __syncwarp();
        if (reached > __shfl_sync(0xffffffffu, ld_volatile_any(&s_released), 0)) {
            // The counts at boundary `reached` are read before the max: their entry is rewritten
            // only by a warp a whole depth ahead, which waits until a release has reached them, so
            // a warp that wins the max below read them intact.
            const int rows_before = head_lane ? s_cum[reached % kCombineCountDepth][my_peer] : 0;
            __syncwarp();
            int previous = 0;
            if (lane == 0)
                previous = atomicMax(&s_released, reached);
            previous = __shfl_sync(0xffffffffu, previous, 0);
            if (previous < reached && head_lane)
                red_max_relaxed_sys(counter_ptr(args.buffers.ptrs[my_peer], kCounterHead, channel, args.rank, my_sub),
                                    sub_ring_count(rows_before, my_sub, W));
        }
        trace.add(kTracePublish, since);
    }
    // Zero this call's tails, then acknowledge every sub-ring (also those that carried nothing):
    // every warp's releases come first (the barrier; the acknowledgement is a cumulative release).
    __syncthreads();
    if (s_failed)
        return;
    if (warp == 0 && head_lane) {
        const int consumed = sub_ring_count(pick<kRanks>(count, my_peer), my_sub, W);
        *counter_ptr(own, kCounterTail, channel, my_peer, my_sub) = 0;
        st_release_sys(counter_ptr(args.buffers.ptrs[my_peer], kCounterHead, channel, args.rank, my_sub),
                       consumed + 1);
    }
}

template <int kRanks>
__global__ void __launch_bounds__(kThreads, 1) intranode_combine_kernel(CombineArgs args) {
    __shared__ unsigned long long s_trace[kIntranodeWarps][kWarpTraceSlots];
    const WarpTrace trace = open_warp_trace(s_trace, g_intranode_trace_enabled != 0);
    const long long start = trace.now();
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        combine_send(args, channel, trace);
    else
        combine_receive<kRanks>(args, channel, trace);
    trace.add(kTraceTotal, start);
    close_warp_trace(trace, g_intranode_trace[1][blockIdx.x]);
}

}  // namespace

// ================================================================ launchers
cudaError_t intranode_trace_reset(bool enable) {
    return reset_warp_trace(g_intranode_trace, g_intranode_trace_enabled, enable);
}

cudaError_t intranode_trace_read(unsigned long long* cycles, int* clock_khz) {
    return read_warp_trace(g_intranode_trace, cycles, clock_khz);
}

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

void launch_intranode_dispatch(const DispatchArgs& args, cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(args.hidden_bytes % 16 == 0, "hidden bytes must be a multiple of 16");
    DEEP_EP_HOST_ASSERT(args.num_topk <= kWarpSize, "num_topk must be at most 32");
    DEEP_EP_HOST_ASSERT(args.ring.warps_per_peer * args.num_ranks <= kIntranodeWarps, "too many warps per peer");
    // The receiver block copies the rows this rank sends to itself, so every sender warp pushes
    // over NVLink (4 x H200, 24 SMs: bf16 / FP8 dispatch +6 % / +4 % over the sender copying them,
    // three A/B runs; docs/benchmarks.md). DEEP_EP_OWN_ROWS_BY_RECEIVER=0 (read once; the same on
    // every rank) selects the sender copy, for measuring against it (it was ahead at 20 SMs).
    static const bool own_rows_by_receiver = env_int("DEEP_EP_OWN_ROWS_BY_RECEIVER", 1) != 0;
    const int grid = args.ring.num_channels * 2;
    if (args.row_segment_end != nullptr) {
        if (own_rows_by_receiver)
            intranode_dispatch_kernel<true, true><<<grid, kThreads, 0, stream>>>(args);
        else
            intranode_dispatch_kernel<true, false><<<grid, kThreads, 0, stream>>>(args);
    } else if (own_rows_by_receiver) {
        intranode_dispatch_kernel<false, true><<<grid, kThreads, 0, stream>>>(args);
    } else {
        intranode_dispatch_kernel<false, false><<<grid, kThreads, 0, stream>>>(args);
    }
    DEEP_EP_LAUNCH_CHECK();
}

void launch_intranode_combine(const CombineArgs& args, cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(args.hidden % 8 == 0, "hidden must be a multiple of 8");
    DEEP_EP_HOST_ASSERT(args.num_topk <= kWarpSize, "num_topk must be at most 32");
    DEEP_EP_HOST_ASSERT(args.ring.warps_per_peer * args.num_ranks <= kWarpSize, "too many sub-rings per channel");
    const dim3 grid(args.ring.num_channels * 2);
    switch (args.num_ranks) {
    case 1: intranode_combine_kernel<1><<<grid, kThreads, 0, stream>>>(args); break;
    case 2: intranode_combine_kernel<2><<<grid, kThreads, 0, stream>>>(args); break;
    case 3: intranode_combine_kernel<3><<<grid, kThreads, 0, stream>>>(args); break;
    case 4: intranode_combine_kernel<4><<<grid, kThreads, 0, stream>>>(args); break;
    case 5: intranode_combine_kernel<5><<<grid, kThreads, 0, stream>>>(args); break;
    case 6: intranode_combine_kernel<6><<<grid, kThreads, 0, stream>>>(args); break;
    case 7: intranode_combine_kernel<7><<<grid, kThreads, 0, stream>>>(args); break;
    case 8: intranode_combine_kernel<8><<<grid, kThreads, 0, stream>>>(args); break;
    default: DEEP_EP_HOST_ASSERT(false, "intranode supports 1..8 ranks");
    }
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
