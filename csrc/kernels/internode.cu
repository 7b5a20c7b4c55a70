// Internode high-throughput kernels over NVSHMEM: the count exchange (notify) and the two rail
// legs. A "rail" links the ranks of one local index across nodes; every token crosses it at most
// once per destination node, and the NVLink leg inside the node (intranode.cu) fans it out.
//
// Rail dispatch: one block pair per channel (a contiguous range of the sender's tokens). Sender
// warp m serves destination node m: it copies each token for that node (data, FP8 scales, top-k
// ids made node-relative, weights, source index, which ranks of the node want it) into its send
// staging ring and puts chunks to the receiver's ring with put-with-signal (the signal is the
// running tail). Receiver warp n' drains the ring of source node n' into the staging rows
// [rail_prefix[n'] + stream index], then returns the running head with a signal. A marker slot
// ends each (channel, node) stream, so the receiver needs no per-channel count. Tokens for the
// sender's own node go straight into its staging rows.
//
// Rail combine runs backwards: the forwarder sends the node-reduced row of each staged token home
// (the home's channel split of its tokens selects the rows); the home sums, per token, the rows of
// every node it went to (its own node's from its own staging, in place), in fp32, plus the biases.
//
// Only NVSHMEM's public device API crosses nodes (puts with signal, signal ops, fence, quiet).
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>

#include "internode_api.cuh"
#include "launch.cuh"
#include "utils.cuh"

namespace deep_ep {
namespace internode {
namespace {

constexpr int kNotifyThreads = 512;
constexpr int kRailThreads = kRailWarps * kWarpSize;
constexpr int kCopyUnroll = 4;
constexpr size_t kPage = 4096;

size_t align_bytes(size_t n, size_t a) { return (n + a - 1) / a * a; }

// ================================================================ device helpers
__device__ __forceinline__ unsigned long long ld_acquire_u64(const unsigned long long* ptr) {
    unsigned long long value;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
    return value;
}

// Bounded wait until *ptr >= expected (one thread). Records a timeout in the error record.
__device__ bool wait_at_least(const FailureContext& fail, const unsigned long long* ptr, unsigned long long expected,
                              unsigned long long& seen, int kernel, int peer, int target, int channel) {
    seen = ld_acquire_u64(ptr);
    if (seen >= expected)
        return true;
    const uint64_t start = global_timer_ns();
    while (true) {
        seen = ld_acquire_u64(ptr);
        if (seen >= expected)
            return true;
        if (ld_volatile(fail.abort_flag) != 0)
            return false;
        if (global_timer_ns() - start > fail.timeout_ns) {
            report_failure(fail, kErrorTimeout, kernel, peer, target, channel, static_cast<int64_t>(seen),
                           static_cast<int64_t>(expected));
            return false;
        }
    }
}

// Lane 0 waits; the warp learns the value and the outcome.
__device__ __forceinline__ bool warp_wait_at_least(const FailureContext& fail, const unsigned long long* ptr,
                                                   unsigned long long expected, unsigned long long& seen, int kernel,
                                                   int peer, int target, int channel) {
    bool ok = true;
    if (lane_id() == 0)
        ok = wait_at_least(fail, ptr, expected, seen, kernel, peer, target, channel);
    seen = __shfl_sync(0xffffffffu, seen, 0);
    return __shfl_sync(0xffffffffu, ok ? 1 : 0, 0) != 0;
}

__device__ __forceinline__ unsigned long long* rail_signal(const Context& ctx, int kind, int signal, int channel,
                                                           int node) {
    return reinterpret_cast<unsigned long long*>(ctx.heap + ctx.layout.rail_signal_offset) +
           ((static_cast<size_t>(kind) * 2 + signal) * kMaxChannels + channel) * kMaxNodes + node;
}

__device__ __forceinline__ uint8_t* recv_ring(const Context& ctx, const RailGeometry& g, int channel, int node) {
    return ctx.heap + g.recv_offset +
           (static_cast<size_t>(channel) * ctx.num_nodes + node) * g.capacity * static_cast<size_t>(g.slot_bytes);
}

__device__ __forceinline__ uint8_t* send_ring(const Context& ctx, const RailGeometry& g, int channel, int node) {
    return ctx.heap + g.send_offset +
           (static_cast<size_t>(channel) * ctx.num_nodes + node) * g.capacity * static_cast<size_t>(g.slot_bytes);
}

__device__ __forceinline__ int channel_begin(int num_tokens, int channel, int num_channels) {
    return static_cast<int>(static_cast<int64_t>(num_tokens) * channel / num_channels);
}

// Bit j set: token t goes to rank node * L + j.
__device__ __forceinline__ int node_rank_bits(const bool* is_token_in_rank, int t, int num_ranks, int node, int L) {
    int bits = 0;
    const bool* row = is_token_in_rank + static_cast<int64_t>(t) * num_ranks + node * L;
    for (int j = 0; j < L; ++j)
        bits |= row[j] ? (1 << j) : 0;
    return bits;
}

// Puts the slots [published, sent) of a ring to the rail peer, each contiguous part with its
// running tail as the signal. A fence keeps the parts (and earlier puts) in order.
__device__ void publish_slots(const RailGeometry& g, uint8_t* local_ring, uint8_t* remote_ring,
                              unsigned long long* remote_tail, unsigned long long& published, unsigned long long sent,
                              int pe) {
    // The slot stores of every lane must be visible to the transport before it reads them.
    __threadfence_system();
    __syncwarp();
    while (published < sent) {
        const unsigned long long first = published % g.capacity;
        const unsigned long long count = min(sent - published, g.capacity - first);
        if (lane_id() == 0)
            nvshmem_fence();
        __syncwarp();
        const size_t offset = first * static_cast<size_t>(g.slot_bytes);
        nvshmemx_putmem_signal_nbi_warp(remote_ring + offset, local_ring + offset, count * g.slot_bytes,
                                        reinterpret_cast<uint64_t*>(remote_tail), published + count,
                                        NVSHMEM_SIGNAL_SET, pe);
        published += count;
    }
}

// ================================================================ notify
__global__ void __launch_bounds__(kNotifyThreads, 1) notify_kernel(Context ctx, NotifyArgs a) {
    const int R = ctx.num_ranks, L = ctx.nvl_size, N = ctx.num_nodes;
    const int num_local_experts = a.num_experts / R;
    const int slot_ints = 3 + L + num_local_experts;
    __shared__ int s_node_tokens[kMaxNodes];
    __shared__ int s_failed;
    if (threadIdx.x < kMaxNodes)
        s_node_tokens[threadIdx.x] = 0;
    if (threadIdx.x == 0)
        s_failed = 0;
    __syncthreads();
    // Tokens per destination node: what crosses each rail.
    for (int t = threadIdx.x; t < a.num_tokens; t += blockDim.x)
        for (int m = 0; m < N; ++m)
            if (node_rank_bits(a.is_token_in_rank, t, R, m, L) != 0)
                atomicAdd(&s_node_tokens[m], 1);
    __syncthreads();

    const unsigned long long seq = ctx.state->notify_seq;
    const int parity = static_cast<int>(seq & 1ull);
    int* send = reinterpret_cast<int*>(ctx.heap + ctx.layout.notify_send_offset);
    int* recv = reinterpret_cast<int*>(ctx.heap + ctx.layout.notify_recv_offset);
    // One arrival counter per parity: a rank already in the next call counts on the other one,
    // so an early arrival can never stand in for a late one of this call.
    auto* counter = reinterpret_cast<unsigned long long*>(ctx.heap + ctx.layout.notify_signal_offset) + parity;
    for (int i = threadIdx.x; i < R * slot_ints; i += blockDim.x) {
        const int dest = i / slot_ints, j = i % slot_ints, m = dest / L;
        int value;
        if (j == 0)
            value = a.num_tokens_per_rank[dest];
        else if (j == 1)
            value = a.num_tokens;
        else if (j == 2)
            value = s_node_tokens[m];
        else if (j < 3 + L)
            value = a.num_tokens_per_rank[m * L + (j - 3)];
        else
            value = a.num_tokens_per_expert[dest * num_local_experts + (j - 3 - L)];
        send[dest * kNotifyInts + j] = value;
    }
    __threadfence_system();
    __syncthreads();
    // The parity alternates per call: a peer one call ahead writes the other half. It cannot be
    // two calls ahead, since each call waits for every rank's message of that call.
    for (int dest = threadIdx.x; dest < R; dest += blockDim.x)
        nvshmem_putmem_signal_nbi(recv + (parity * R + ctx.rank) * kNotifyInts, send + dest * kNotifyInts,
                                  sizeof(int) * slot_ints, reinterpret_cast<uint64_t*>(counter), 1ull,
                                  NVSHMEM_SIGNAL_ADD, dest);
    if (threadIdx.x == 0) {
        unsigned long long seen;
        if (!wait_at_least(ctx.fail, counter, ((seq >> 1) + 1) * static_cast<unsigned long long>(R), seen,
                           kKernelInternodeNotify, -1, kWaitNotifyCounts, -1))
            s_failed = 1;
    }
    __syncthreads();
    if (s_failed) {
        if (threadIdx.x < R)
            nvshmem_quiet();
        return;
    }

    const int* slots = recv + parity * R * kNotifyInts;
    if (threadIdx.x == 0) {
        int prefix = 0;
        for (int s = 0; s < R; ++s) {
            const int count = ld_volatile(slots + s * kNotifyInts);
            a.recv_from_rank[s] = count;
            a.recv_rank_prefix[s] = prefix;
            prefix += count;
        }
        a.recv_rank_prefix[R] = prefix;
        int staged = 0;
        for (int n = 0; n < N; ++n) {
            const int* slot = slots + (n * L + ctx.local_rank) * kNotifyInts;
            a.rail_prefix[n] = staged;
            a.rail_src_num_tokens[n] = ld_volatile(slot + 1);
            staged += ld_volatile(slot + 2);
        }
        a.rail_prefix[N] = staged;
        if (a.host_counters != nullptr) {
            a.host_counters[1] = prefix;
            a.host_counters[2] = staged;
        }
    }
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        int count = 0;
        for (int n = 0; n < N; ++n)
            count += ld_volatile(slots + (n * L + ctx.local_rank) * kNotifyInts + 3 + j);
        a.forward_counts[j] = count;
    }
    if (a.host_counters != nullptr) {
        for (int e = threadIdx.x; e < num_local_experts; e += blockDim.x) {
            int count = 0;
            for (int s = 0; s < R; ++s)
                count += ld_volatile(slots + s * kNotifyInts + 3 + L + e);
            a.host_counters[3 + e] = (count + a.expert_alignment - 1) / a.expert_alignment * a.expert_alignment;
        }
    }
    __syncthreads();
    if (threadIdx.x < R)
        nvshmem_quiet();  // the send slots may be rewritten by the next call
    if (threadIdx.x == 0) {
        ctx.state->notify_seq = seq + 1;
        if (a.host_counters != nullptr) {
            __threadfence_system();
            *reinterpret_cast<volatile int*>(a.host_counters) = 1;
            __threadfence_system();
        }
    }
}

// ================================================================ rail dispatch
// Writes token `token` (for node `node`) into a slot or staging row pieces. Whole warp.
struct TokenTarget {
    uint8_t* data;
    float* scales;
    int* topk_idx32;      // slot form
    int64_t* topk_idx64;  // staging form
    float* topk_weights;
};

__device__ __forceinline__ void write_token(const RailDispatchArgs& a, int token, int expert_lo, int expert_hi,
                                            const TokenTarget& target, int lane) {
    warp_copy_int4<kCopyUnroll, false>(reinterpret_cast<int4*>(target.data),
                                       reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(token) * a.hidden_bytes),
                                       a.hidden_bytes / 16, lane);
    if (a.x_scales != nullptr)
        for (int g = lane; g < a.num_scales; g += kWarpSize)
            target.scales[g] = __ldg(a.x_scales + token * a.scale_token_stride + g * a.scale_hidden_stride);
    if (a.topk_idx != nullptr && lane < a.num_topk) {
        const int64_t index = static_cast<int64_t>(token) * a.num_topk + lane;
        const int64_t expert = __ldg(a.topk_idx + index);
        // Node-relative id, -1 for experts elsewhere (and for invalid ids): the intranode leg then
        // remaps to local ids as if this node were the whole group.
        const bool here = expert >= 0 && expert < a.num_experts && expert >= expert_lo && expert < expert_hi;
        const int64_t relative = here ? expert - expert_lo : -1;
        if (target.topk_idx32 != nullptr)
            target.topk_idx32[lane] = static_cast<int>(relative);
        else
            target.topk_idx64[lane] = relative;
        target.topk_weights[lane] = __ldg(a.topk_weights + index);
    }
}

__device__ bool check_staging_row(const Context& ctx, const RailDispatchArgs& a, int64_t row, int peer, int channel) {
    if (row >= 0 && row < a.staging_rows)
        return true;
    if (lane_id() == 0)
        report_failure(ctx.fail, kErrorOverflow, kKernelRailDispatch, peer, kWaitStagingRows, channel, row + 1,
                       a.staging_rows);
    return false;
}

__device__ void rail_dispatch_send(const Context& ctx, const RailDispatchArgs& a, int channel) {
    const RailGeometry& g = a.rail;
    const int R = ctx.num_ranks, L = ctx.nvl_size, N = ctx.num_nodes;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int begin = channel_begin(a.num_tokens, channel, g.num_channels);
    const int end = channel_begin(a.num_tokens, channel + 1, g.num_channels);

    // Tokens each node gets before this channel: the stream index of the channel's first one.
    __shared__ int s_before[kMaxNodes];
    if (threadIdx.x < kMaxNodes)
        s_before[threadIdx.x] = 0;
    __syncthreads();
    for (int t = threadIdx.x; t < begin; t += blockDim.x)
        for (int m = 0; m < N; ++m)
            if (node_rank_bits(a.is_token_in_rank, t, R, m, L) != 0)
                atomicAdd(&s_before[m], 1);
    __syncthreads();

    const int m = warp;
    if (m >= N)
        return;
    const bool local = m == ctx.node;
    const int pe = m * L + ctx.local_rank;
    const int experts_per_node = a.num_experts / N;
    const int expert_lo = m * experts_per_node, expert_hi = expert_lo + experts_per_node;
    uint8_t* ring = send_ring(ctx, g, channel, m);
    uint8_t* remote_ring = recv_ring(ctx, g, channel, ctx.node);
    unsigned long long* remote_tail = rail_signal(ctx, g.kind, kRailTail, channel, ctx.node);
    const unsigned long long* own_head = rail_signal(ctx, g.kind, kRailHead, channel, m);
    const unsigned long long base = ctx.state->sent[g.kind][channel][m];
    unsigned long long sent = base, published = base, head = base;
    if (!local && !warp_wait_at_least(ctx.fail, own_head, base, head, kKernelRailDispatch, pe, kWaitRailHead, channel))
        return;

    // Waits for a free slot (publishing first: the receiver only frees what it was told about).
    auto make_room = [&]() -> bool {
        if (sent - head < static_cast<unsigned long long>(g.capacity))
            return true;
        publish_slots(g, ring, remote_ring, remote_tail, published, sent, pe);
        return warp_wait_at_least(ctx.fail, own_head, sent - g.capacity + 1, head, kKernelRailDispatch, pe,
                                  kWaitRailHead, channel);
    };

    int k = s_before[m];
    for (int window = begin; window < end; window += kWarpSize) {
        const int t = window + lane;
        const int bits = t < end ? node_rank_bits(a.is_token_in_rank, t, R, m, L) : 0;
        unsigned mask = __ballot_sync(0xffffffffu, bits != 0);
        while (mask != 0) {
            const int source_lane = __ffs(mask) - 1;
            mask &= mask - 1;
            const int token = window + source_lane;
            const int token_bits = __shfl_sync(0xffffffffu, bits, source_lane);
            if (local) {
                const int64_t row = static_cast<int64_t>(a.rail_prefix[ctx.node]) + k;
                if (!check_staging_row(ctx, a, row, ctx.rank, channel))
                    return;
                TokenTarget target{a.staging_x + row * a.hidden_bytes,
                                   a.staging_scales != nullptr ? a.staging_scales + row * a.num_scales : nullptr,
                                   nullptr,
                                   a.staging_topk_idx != nullptr ? a.staging_topk_idx + row * a.num_topk : nullptr,
                                   a.staging_topk_weights != nullptr ? a.staging_topk_weights + row * a.num_topk
                                                                     : nullptr};
                write_token(a, token, expert_lo, expert_hi, target, lane);
                if (lane == 0)
                    a.staging_src_token[row] = token;
                if (lane < L)
                    a.forward_in_rank[row * L + lane] = ((token_bits >> lane) & 1) != 0;
            } else {
                if (!make_room())
                    return;
                uint8_t* slot = ring + (sent % g.capacity) * static_cast<size_t>(g.slot_bytes);
                TokenTarget target{slot, reinterpret_cast<float*>(slot + a.slot.scales_offset),
                                   reinterpret_cast<int*>(slot + a.slot.topk_idx_offset), nullptr,
                                   reinterpret_cast<float*>(slot + a.slot.topk_weights_offset)};
                write_token(a, token, expert_lo, expert_hi, target, lane);
                if (lane == 0)
                    *reinterpret_cast<int4*>(slot + a.slot.meta_offset) = make_int4(token, k, token_bits, 0);
                ++sent;
                if (sent - published >= static_cast<unsigned long long>(g.publish_every))
                    publish_slots(g, ring, remote_ring, remote_tail, published, sent, pe);
            }
            ++k;
        }
    }
    if (local)
        return;
    // End of this (channel, node) stream.
    if (!make_room())
        return;
    uint8_t* slot = ring + (sent % g.capacity) * static_cast<size_t>(g.slot_bytes);
    if (lane == 0)
        *reinterpret_cast<int4*>(slot + a.slot.meta_offset) = make_int4(-1, -1, 0, 0);
    ++sent;
    publish_slots(g, ring, remote_ring, remote_tail, published, sent, pe);
    __syncwarp();
    if (lane == 0) {
        nvshmem_quiet();
        ctx.state->sent[g.kind][channel][m] = sent;
    }
}

__device__ void rail_dispatch_receive(const Context& ctx, const RailDispatchArgs& a, int channel) {
    const RailGeometry& g = a.rail;
    const int L = ctx.nvl_size;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int n = warp;
    if (n >= ctx.num_nodes || n == ctx.node)
        return;
    const int pe = n * L + ctx.local_rank;
    const uint8_t* ring = recv_ring(ctx, g, channel, n);
    const unsigned long long* own_tail = rail_signal(ctx, g.kind, kRailTail, channel, n);
    unsigned long long* remote_head = rail_signal(ctx, g.kind, kRailHead, channel, ctx.node);
    const unsigned long long base = ctx.state->received[g.kind][channel][n];
    unsigned long long consumed = base, tail = base, released = base;
    const int first_row = a.rail_prefix[n];
    while (true) {
        if (consumed >= tail &&
            !warp_wait_at_least(ctx.fail, own_tail, consumed + 1, tail, kKernelRailDispatch, pe, kWaitRailTail,
                                channel))
            return;
        const uint8_t* slot = ring + (consumed % g.capacity) * static_cast<size_t>(g.slot_bytes);
        const int4 meta = __ldcg(reinterpret_cast<const int4*>(slot + a.slot.meta_offset));
        ++consumed;
        if (meta.x < 0)
            break;
        const int64_t row = static_cast<int64_t>(first_row) + meta.y;
        if (!check_staging_row(ctx, a, row, pe, channel))
            return;
        warp_copy_int4<kCopyUnroll, true>(reinterpret_cast<int4*>(a.staging_x + row * a.hidden_bytes),
                                          reinterpret_cast<const int4*>(slot), a.hidden_bytes / 16, lane);
        if (a.staging_scales != nullptr) {
            const float* scales = reinterpret_cast<const float*>(slot + a.slot.scales_offset);
            for (int s = lane; s < a.num_scales; s += kWarpSize)
                a.staging_scales[row * a.num_scales + s] = __ldcg(scales + s);
        }
        if (a.staging_topk_idx != nullptr && lane < a.num_topk) {
            a.staging_topk_idx[row * a.num_topk + lane] =
                __ldcg(reinterpret_cast<const int*>(slot + a.slot.topk_idx_offset) + lane);
            a.staging_topk_weights[row * a.num_topk + lane] =
                __ldcg(reinterpret_cast<const float*>(slot + a.slot.topk_weights_offset) + lane);
        }
        if (lane == 0)
            a.staging_src_token[row] = meta.x;
        if (lane < L)
            a.forward_in_rank[row * L + lane] = ((meta.z >> lane) & 1) != 0;
        // The slot's loads have completed (their values are stored above): it may be reused.
        if (consumed == tail || consumed - released >= static_cast<unsigned long long>(g.publish_every)) {
            __syncwarp();
            if (lane == 0)
                nvshmemx_signal_op(reinterpret_cast<uint64_t*>(remote_head), consumed, NVSHMEM_SIGNAL_SET, pe);
            released = consumed;
        }
    }
    __syncwarp();
    if (lane == 0) {
        if (released != consumed)
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(remote_head), consumed, NVSHMEM_SIGNAL_SET, pe);
        nvshmem_quiet();
        ctx.state->received[g.kind][channel][n] = consumed;
    }
}

__global__ void __launch_bounds__(kRailThreads, 1) rail_dispatch_kernel(Context ctx, RailDispatchArgs args) {
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        rail_dispatch_send(ctx, args, channel);
    else
        rail_dispatch_receive(ctx, args, channel);
}

// ================================================================ rail combine
// First index in [lo, hi) of the ascending `values` that is >= target (whole warp).
__device__ int warp_lower_bound(const int* values, int lo, int hi, int target) {
    const int lane = lane_id();
    while (hi - lo > kWarpSize) {
        const int step = (hi - lo + kWarpSize - 1) / kWarpSize;
        const int probe = lo + lane * step;
        const bool valid = probe < hi;
        const unsigned ge = __ballot_sync(0xffffffffu, valid && __ldg(values + probe) >= target);
        const unsigned in_range = __ballot_sync(0xffffffffu, valid);
        if (ge == 0) {
            lo = lo + (kWarpSize - __clz(in_range) - 1) * step + 1;
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

__device__ void rail_combine_send(const Context& ctx, const RailCombineArgs& a, int channel) {
    const RailGeometry& g = a.rail;
    const int L = ctx.nvl_size;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int n = warp;  // the home node of the rows this warp returns
    if (n >= ctx.num_nodes || n == ctx.node)
        return;
    const int pe = n * L + ctx.local_rank;
    const int home_tokens = a.rail_src_num_tokens[n];
    const int begin = channel_begin(home_tokens, channel, g.num_channels);
    const int end = channel_begin(home_tokens, channel + 1, g.num_channels);
    const int first = warp_lower_bound(a.staging_src_token, a.rail_prefix[n], a.rail_prefix[n + 1], begin);
    const int last = warp_lower_bound(a.staging_src_token, first, a.rail_prefix[n + 1], end);

    uint8_t* ring = send_ring(ctx, g, channel, n);
    uint8_t* remote_ring = recv_ring(ctx, g, channel, ctx.node);
    unsigned long long* remote_tail = rail_signal(ctx, g.kind, kRailTail, channel, ctx.node);
    const unsigned long long* own_head = rail_signal(ctx, g.kind, kRailHead, channel, n);
    const unsigned long long base = ctx.state->sent[g.kind][channel][n];
    unsigned long long sent = base, published = base, head = base;
    if (!warp_wait_at_least(ctx.fail, own_head, base, head, kKernelRailCombine, pe, kWaitRailHead, channel))
        return;
    const int row_bytes = a.hidden * 2;
    const int weights_offset = combine_weights_offset(a.hidden);
    for (int row = first; row < last; ++row) {
        if (sent - head >= static_cast<unsigned long long>(g.capacity)) {
            publish_slots(g, ring, remote_ring, remote_tail, published, sent, pe);
            if (!warp_wait_at_least(ctx.fail, own_head, sent - g.capacity + 1, head, kKernelRailCombine, pe,
                                    kWaitRailHead, channel))
                return;
        }
        uint8_t* slot = ring + (sent % g.capacity) * static_cast<size_t>(g.slot_bytes);
        warp_copy_int4<kCopyUnroll, false>(reinterpret_cast<int4*>(slot),
                                           reinterpret_cast<const int4*>(a.partial + static_cast<int64_t>(row) * row_bytes),
                                           row_bytes / 16, lane);
        if (a.partial_weights != nullptr && lane < a.num_topk)
            reinterpret_cast<float*>(slot + weights_offset)[lane] =
                __ldg(a.partial_weights + static_cast<int64_t>(row) * a.num_topk + lane);
        ++sent;
        if (sent - published >= static_cast<unsigned long long>(g.publish_every))
            publish_slots(g, ring, remote_ring, remote_tail, published, sent, pe);
    }
    publish_slots(g, ring, remote_ring, remote_tail, published, sent, pe);
    __syncwarp();
    if (lane == 0) {
        nvshmem_quiet();
        ctx.state->sent[g.kind][channel][n] = sent;
    }
}

// The home walks its channel's tokens in batches of one token per warp: warp 0 numbers each
// (token, node) pair inside its node's stream, every warp sums its token's rows, then warp 0
// releases the consumed slots.
__device__ void rail_combine_receive(const Context& ctx, const RailCombineArgs& a, int channel) {
    const RailGeometry& g = a.rail;
    const int R = ctx.num_ranks, L = ctx.nvl_size, N = ctx.num_nodes;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int begin = channel_begin(a.num_tokens, channel, g.num_channels);
    const int end = channel_begin(a.num_tokens, channel + 1, g.num_channels);

    __shared__ int s_index[kRailWarps][kMaxNodes];
    __shared__ int s_count[kMaxNodes];
    __shared__ unsigned long long s_base[kMaxNodes];
    __shared__ int s_own_before;
    __shared__ int s_failed;
    if (threadIdx.x < kMaxNodes) {
        s_count[threadIdx.x] = 0;
        s_base[threadIdx.x] = threadIdx.x < N ? ctx.state->received[g.kind][channel][threadIdx.x] : 0ull;
    }
    if (threadIdx.x == 0) {
        s_own_before = 0;
        s_failed = 0;
    }
    __syncthreads();
    int own_before = 0;
    for (int t = threadIdx.x; t < begin; t += blockDim.x)
        own_before += node_rank_bits(a.is_token_in_rank, t, R, ctx.node, L) != 0 ? 1 : 0;
    own_before = warp_sum(own_before);
    if (lane == 0 && own_before != 0)
        atomicAdd(&s_own_before, own_before);
    __syncthreads();

    const int row_bytes = a.hidden * 2;
    const int hidden_int4 = a.hidden / 8;
    const int weights_offset = combine_weights_offset(a.hidden);
    const int64_t own_first_row = static_cast<int64_t>(a.rail_prefix[ctx.node]) + s_own_before;
    const bool head_lane = warp == 0 && lane < N && lane != ctx.node;
    int released = 0;
    for (int batch = begin; batch < end; batch += kRailWarps) {
        if (warp == 0) {
            const int t = batch + lane;
            const bool valid = lane < kRailWarps && t < end;
            for (int m = 0; m < N; ++m) {
                const bool in_node = valid && node_rank_bits(a.is_token_in_rank, t, R, m, L) != 0;
                const unsigned mask = __ballot_sync(0xffffffffu, in_node);
                const int base = s_count[m];
                if (lane < kRailWarps)
                    s_index[lane][m] = in_node ? base + __popc(mask & ((1u << lane) - 1)) : -1;
                __syncwarp();
                if (lane == 0)
                    s_count[m] = base + __popc(mask);
                __syncwarp();
            }
        }
        __syncthreads();
        const int token = batch + warp;
        if (token < end) {
            bool ok = true;
            if (lane < N && lane != ctx.node && s_index[warp][lane] >= 0) {
                unsigned long long seen;
                ok = wait_at_least(ctx.fail, rail_signal(ctx, g.kind, kRailTail, channel, lane),
                                   s_base[lane] + s_index[warp][lane] + 1, seen, kKernelRailCombine,
                                   lane * L + ctx.local_rank, kWaitRailTail, channel);
            }
            if (__ballot_sync(0xffffffffu, !ok) != 0) {
                if (lane == 0)
                    s_failed = 1;
            } else {
                const int64_t out_offset = static_cast<int64_t>(token) * row_bytes;
                for (int column = lane; column < hidden_int4; column += kWarpSize) {
                    float acc[8];
#pragma unroll
                    for (int j = 0; j < 8; ++j)
                        acc[j] = 0.0f;
                    for (int m = 0; m < N; ++m) {
                        const int index = s_index[warp][m];
                        if (index < 0)
                            continue;
                        const uint8_t* row =
                            m == ctx.node ? a.partial + (own_first_row + index) * row_bytes
                                          : recv_ring(ctx, g, channel, m) +
                                                ((s_base[m] + index) % g.capacity) * static_cast<size_t>(g.slot_bytes);
                        accumulate_bf16x8(acc, __ldcg(reinterpret_cast<const int4*>(row) + column));
                    }
                    accumulate_biases(acc, a.bias0, a.bias1, out_offset, column);
                    store_bf16x8(a.combined_x + out_offset, column, acc);
                }
                if (a.combined_topk_weights != nullptr && lane < a.num_topk) {
                    float sum = 0.0f;
                    for (int m = 0; m < N; ++m) {
                        const int index = s_index[warp][m];
                        if (index < 0)
                            continue;
                        const float* weights =
                            m == ctx.node
                                ? a.partial_weights + (own_first_row + index) * a.num_topk
                                : reinterpret_cast<const float*>(
                                      recv_ring(ctx, g, channel, m) +
                                      ((s_base[m] + index) % g.capacity) * static_cast<size_t>(g.slot_bytes) +
                                      weights_offset);
                        sum += __ldcg(weights + lane);
                    }
                    a.combined_topk_weights[static_cast<int64_t>(token) * a.num_topk + lane] = sum;
                }
            }
        }
        __syncthreads();
        if (s_failed)
            return;
        // Release what this batch consumed (its loads have completed: the sums are stored).
        if (head_lane && s_count[lane] != released) {
            released = s_count[lane];
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(rail_signal(ctx, g.kind, kRailHead, channel, ctx.node)),
                               s_base[lane] + released, NVSHMEM_SIGNAL_SET, lane * L + ctx.local_rank);
        }
    }
    if (head_lane) {
        nvshmem_quiet();
        ctx.state->received[g.kind][channel][lane] = s_base[lane] + s_count[lane];
    }
}

__global__ void __launch_bounds__(kRailThreads, 1) rail_combine_kernel(Context ctx, RailCombineArgs args) {
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        rail_combine_send(ctx, args, channel);
    else
        rail_combine_receive(ctx, args, channel);
}

void check_context(const Context& ctx) {
    DEEP_EP_HOST_ASSERT(ctx.nvl_size >= 1 && ctx.nvl_size <= kMaxNodeRanks, "nvl_domain_size must be in 1..8");
    DEEP_EP_HOST_ASSERT(ctx.num_nodes >= 1 && ctx.num_nodes <= kMaxNodes,
                        "the internode kernels support up to " + std::to_string(kMaxNodes) + " nodes");
    DEEP_EP_HOST_ASSERT(ctx.num_nodes * ctx.nvl_size == ctx.num_ranks, "num_nodes * nvl_domain_size != num_ranks");
}

}  // namespace

// ================================================================ host helpers and launchers
Layout make_layout(int num_ranks, size_t total_bytes) {
    Layout layout;
    layout.notify_signal_offset = 0;
    layout.rail_signal_offset = 128;
    const size_t rail_signal_bytes = sizeof(unsigned long long) * 2 * 2 * kMaxChannels * kMaxNodes;
    layout.notify_recv_offset = align_bytes(layout.rail_signal_offset + rail_signal_bytes, 128);
    layout.notify_send_offset =
        align_bytes(layout.notify_recv_offset + sizeof(int) * 2 * static_cast<size_t>(num_ranks) * kNotifyInts, 128);
    layout.data_offset =
        align_bytes(layout.notify_send_offset + sizeof(int) * static_cast<size_t>(num_ranks) * kNotifyInts, kPage);
    if (total_bytes < layout.data_offset)
        throw std::invalid_argument("deep_ep: num_rdma_bytes (" + std::to_string(total_bytes) +
                                    ") is smaller than the internode control area (" +
                                    std::to_string(layout.data_offset) + " bytes)");
    layout.kind_bytes = (total_bytes - layout.data_offset) / 2 / kPage * kPage;
    layout.total_bytes = total_bytes;
    return layout;
}

RailGeometry make_rail_geometry(const Layout& layout, int kind, int num_nodes, int num_sms, int send_chunk,
                                int ring_capacity, int slot_bytes) {
    // The combine receiver takes up to one token per warp from a ring before it releases slots.
    const int min_capacity = kind == kRailCombine ? kRailWarps + 1 : 2;
    DEEP_EP_HOST_ASSERT(num_sms >= 2 && num_sms % 2 == 0, "num_sms must be even and >= 2");
    DEEP_EP_HOST_ASSERT(num_sms / 2 <= kMaxChannels, "num_sms must be at most " + std::to_string(2 * kMaxChannels));
    RailGeometry g;
    g.kind = kind;
    g.num_channels = num_sms / 2;
    g.slot_bytes = slot_bytes;
    // One receive ring and one send staging ring per (channel, peer node).
    const size_t per_slot = 2 * static_cast<size_t>(g.num_channels) * num_nodes * slot_bytes;
    const size_t fit = layout.kind_bytes / per_slot;
    g.capacity = static_cast<int>(
        std::min<size_t>(static_cast<size_t>(std::max(ring_capacity, min_capacity)), fit));
    if (g.capacity < min_capacity)
        throw std::invalid_argument("deep_ep: num_rdma_bytes (" + std::to_string(layout.total_bytes) +
                                    ") is too small for " + std::to_string(g.num_channels) + " channels of " +
                                    std::to_string(slot_bytes) + "-byte slots over " + std::to_string(num_nodes) +
                                    " nodes; need at least " +
                                    std::to_string(layout.data_offset + 2 * min_capacity * per_slot + 2 * kPage) + " bytes");
    g.publish_every = std::max(1, std::min(send_chunk, g.capacity / 2));
    g.recv_offset = layout.data_offset + static_cast<size_t>(kind) * layout.kind_bytes;
    g.send_offset = g.recv_offset + static_cast<size_t>(g.capacity) * (per_slot / 2);
    return g;
}

DispatchSlot make_dispatch_slot(int hidden_bytes, int num_scales, int num_topk) {
    DispatchSlot slot;
    slot.scales_offset = align_up(hidden_bytes, 16);
    slot.topk_idx_offset = slot.scales_offset + align_up(num_scales * 4, 16);
    slot.topk_weights_offset = slot.topk_idx_offset + align_up(num_topk * 4, 16);
    slot.meta_offset = slot.topk_weights_offset + align_up(num_topk * 4, 16);
    slot.bytes = align_up(slot.meta_offset + 16, 128);
    return slot;
}

void launch_notify(const Context& ctx, const NotifyArgs& args, cudaStream_t stream) {
    check_context(ctx);
    DEEP_EP_HOST_ASSERT(args.num_experts % ctx.num_ranks == 0 && args.num_experts / ctx.num_ranks <= kMaxLocalExperts,
                        "num_experts must be a multiple of num_ranks with at most " +
                            std::to_string(kMaxLocalExperts) + " local experts");
    DEEP_EP_HOST_ASSERT(args.expert_alignment >= 1, "expert_alignment must be >= 1");
    notify_kernel<<<1, kNotifyThreads, 0, stream>>>(ctx, args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_rail_dispatch(const Context& ctx, const RailDispatchArgs& args, cudaStream_t stream) {
    check_context(ctx);
    DEEP_EP_HOST_ASSERT(args.hidden_bytes % 16 == 0, "hidden bytes must be a multiple of 16");
    DEEP_EP_HOST_ASSERT(args.num_topk <= kMaxTopk, "num_topk must be at most 32");
    DEEP_EP_HOST_ASSERT(args.num_experts % ctx.num_nodes == 0, "num_experts must be a multiple of the node count");
    DEEP_EP_HOST_ASSERT(args.rail.kind == kRailDispatch && args.rail.slot_bytes >= args.slot.bytes,
                        "dispatch ring slots too small");
    rail_dispatch_kernel<<<args.rail.num_channels * 2, kRailThreads, 0, stream>>>(ctx, args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_rail_combine(const Context& ctx, const RailCombineArgs& args, cudaStream_t stream) {
    check_context(ctx);
    DEEP_EP_HOST_ASSERT(args.hidden % 8 == 0, "hidden must be a multiple of 8");
    DEEP_EP_HOST_ASSERT(args.num_topk <= kMaxTopk, "num_topk must be at most 32");
    DEEP_EP_HOST_ASSERT(args.rail.kind == kRailCombine &&
                            args.rail.slot_bytes >= combine_slot_bytes(args.hidden, args.num_topk),
                        "combine ring slots too small");
    rail_combine_kernel<<<args.rail.num_channels * 2, kRailThreads, 0, stream>>>(ctx, args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace internode
}  // namespace deep_ep
