// Internode high-throughput kernels over NVSHMEM: the count exchange (notify) and the two rail
// legs. A "rail" links the ranks of one local index across nodes; every token crosses it at most
// once per destination node, and the NVLink leg inside the node (intranode.cu) fans it out.
//
// Rail dispatch: one block pair per channel (a contiguous range of the sender's tokens). Each
// (channel, peer node) stream is split into sub-streams, one per sender warp and receiver warp
// (RailGeometry::subs; 24 with two nodes), each with its own ring, tail and head, so every warp
// of both blocks moves data. A sender warp writes each token of its sub-stream (data, FP8 scales,
// top-k ids made node-relative, weights, source index, which ranks of the node want it, and its
// index k in the node's stream) into the peer's ring: with plain 16-byte stores through
// nvshmem_ptr when the peer is P2P-reachable (one copy, tail published by a system-scope
// release), else into a local send staging ring and put-with-signal (the signal is the running
// tail; the path between real nodes). The receiver warp drains its ring into the staging rows
// [rail_prefix[source node] + k] (k makes the order of arrival irrelevant), then returns the
// running head with a signal. A marker slot ends each sub-stream, so the receiver needs no
// count. Tokens for the sender's own node go straight into its staging rows, spread over all
// sender warps.
//
// Rail combine runs backwards: the forwarder sends the node-reduced row of each staged token home
// (the home's channel split of its tokens selects the rows; row j of a node's part goes down
// sub-stream j % subs); the home sums, per token, the rows of every node it went to (its own
// node's from its own staging, in place), in fp32, plus the biases.
//
// Only NVSHMEM's public device API crosses nodes (puts with signal, signal ops, fence, quiet,
// nvshmem_ptr for P2P peers).
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
#include "warp_trace.cuh"

namespace deep_ep {
namespace internode {
namespace {

constexpr int kNotifyThreads = 512;
constexpr int kRailThreads = kRailWarps * kWarpSize;
// Loads in flight per lane before their stores in a row copy: a copy is latency-bound (one
// memory round trip per kCopyUnroll * 512 bytes). 6 (3 KB per warp) takes a 14 KB row in 5 round
// trips instead of 7 at 4; at 8 the rail kernels spill heavily at the 80 registers of a
// 768-thread block (544 B of spill stores in rail dispatch, against 216 B at 6).
constexpr int kCopyUnroll = 6;
constexpr int kSumUnroll = 4;  // columns per lane in flight in the combine sum
constexpr int kScalePrefetch = 2;  // FP8 scales per lane loaded before the row copy (64 per token)
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
                                                           int ring) {
    return reinterpret_cast<unsigned long long*>(ctx.heap + ctx.layout.rail_signal_offset) +
           ((static_cast<size_t>(kind) * 2 + signal) * kMaxChannels + channel) * kMaxNodes + ring;
}

// Development trace (warp_trace.cuh): the rail kernels' table, [kind][block][activity].
__device__ int g_rail_trace_enabled;
__device__ unsigned long long g_rail_trace[2][2 * kMaxChannels][kWarpTraceSlots];

__device__ __forceinline__ void st_release_sys_u64(unsigned long long* ptr, unsigned long long value) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Index of `node` among the nodes other than `self`, and back.
__device__ __forceinline__ int other_index(int node, int self) { return node < self ? node : node - 1; }
__device__ __forceinline__ int other_node(int index, int self) { return index < self ? index : index + 1; }

__device__ __forceinline__ uint8_t* recv_ring(const Context& ctx, const RailGeometry& g, int channel, int ring) {
    return ctx.heap + g.recv_offset +
           (static_cast<size_t>(channel) * g.rings + ring) * g.capacity * static_cast<size_t>(g.slot_bytes);
}

__device__ __forceinline__ uint8_t* send_ring(const Context& ctx, const RailGeometry& g, int channel, int ring) {
    return ctx.heap + g.send_offset +
           (static_cast<size_t>(channel) * g.rings + ring) * g.capacity * static_cast<size_t>(g.slot_bytes);
}

// One sub-stream between this rank and its rail peer on `node`. Ring (and warp) q of a channel is
// sub-stream q / peers to the peer of index q % peers among the other nodes, so a (peer, sub)
// pair keeps its ring id, signals and running totals whatever the number of sub-streams of a
// call (it may shrink with a small buffer). `mine` indexes this rank's rings, signals and State
// for it; `theirs` the peer's (the same sub-stream seen from the other end).
struct RailRing {
    int node, sub, pe, mine, theirs;
};

__device__ __forceinline__ RailRing rail_ring(const Context& ctx, const RailGeometry& g, int ring) {
    const int peers = ctx.num_nodes - 1;
    RailRing r;
    r.mine = ring;
    r.sub = ring / peers;
    r.node = other_node(ring % peers, ctx.node);
    r.pe = r.node * ctx.nvl_size + ctx.local_rank;
    r.theirs = other_index(ctx.node, r.node) + peers * r.sub;
    return r;
}

__device__ __forceinline__ int channel_begin(int num_tokens, int channel, int num_channels) {
    return static_cast<int>(static_cast<int64_t>(num_tokens) * channel / num_channels);
}

// Bit j set: token t goes to rank node * L + j. Unrolled to the largest node, so the L loads
// are in flight together (one memory round trip, not L).
__device__ __forceinline__ int node_rank_bits(const bool* is_token_in_rank, int t, int num_ranks, int node, int L) {
    int bits = 0;
    const bool* row = is_token_in_rank + static_cast<int64_t>(t) * num_ranks + node * L;
#pragma unroll
    for (int j = 0; j < kMaxNodeRanks; ++j)
        if (j < L)
            bits |= row[j] ? (1 << j) : 0;
    return bits;
}

// The sending end of one ring, driven by one warp (every lane holds the same copy). A peer that
// nvshmem_ptr reaches (P2P over NVLink) gets its slots stored straight into its receive ring and
// the tail as a system-scope release: one copy per token, no proxy. Any other peer gets the slots
// written into this rank's send staging ring and put with the running tail as the signal (the
// path that runs between real nodes over RDMA). The protocol is the same: write slot
// `sent % capacity` only once `sent - head < capacity`; the tail says how many slots are complete.
struct RingWriter {
    uint8_t* slots;                     // where slot i lives for this warp's stores
    uint8_t* remote_ring;               // the peer's receive ring (symmetric address; put path)
    unsigned long long* remote_tail;    // the peer's tail: mapped pointer (direct) or symmetric address
    const unsigned long long* own_head;  // released by the peer's receiver
    unsigned long long sent, published, head;
    int capacity, slot_bytes, publish_every, pe;
    bool direct;
    WarpTrace trace;

    __device__ __forceinline__ uint8_t* slot() const {
        return slots + (sent % static_cast<unsigned long long>(capacity)) * static_cast<size_t>(slot_bytes);
    }

    // Makes slots [published, sent) visible to the peer with the tail `sent`. Whole warp.
    __device__ void publish() {
        const long long since = trace.now();
        publish_slots();
        trace.add(kTracePublish, since);
    }

    __device__ void publish_slots() {
        if (direct) {
            // Every lane's slot stores happen before lane 0's release (the warp barrier orders
            // them, as in the intranode kernels' publish_tail); the receiver acquires the tail.
            __syncwarp();
            if (lane_id() == 0)
                st_release_sys_u64(remote_tail, sent);
            published = sent;
            return;
        }
        // The slot stores of every lane must be visible to the transport before it reads them.
        __threadfence_system();
        __syncwarp();
        while (published < sent) {
            const unsigned long long first = published % capacity;
            const unsigned long long count = min(sent - published, capacity - first);
            if (lane_id() == 0)
                nvshmem_fence();  // keeps the parts (and earlier puts) in order
            __syncwarp();
            const size_t offset = first * static_cast<size_t>(slot_bytes);
            nvshmemx_putmem_signal_nbi_warp(remote_ring + offset, slots + offset, count * slot_bytes,
                                            reinterpret_cast<uint64_t*>(remote_tail), published + count,
                                            NVSHMEM_SIGNAL_SET, pe);
            published += count;
        }
    }

    // Counts the slot just written; publishes every `publish_every` slots.
    __device__ __forceinline__ void commit() {
        ++sent;
        if (sent - published >= static_cast<unsigned long long>(publish_every))
            publish();
    }
};

// Opens this warp's end of ring `r` of `channel` (kind g.kind): waits until the peer has consumed
// everything of earlier calls in it. False (after a recorded failure) if the wait failed.
__device__ bool open_ring_writer(const Context& ctx, const RailGeometry& g, int channel, const RailRing& r,
                                 int kernel, RingWriter& w, const WarpTrace& trace) {
    w.trace = trace;
    const long long since = trace.now();
    uint8_t* remote_ring = recv_ring(ctx, g, channel, r.theirs);
    unsigned long long* remote_tail = rail_signal(ctx, g.kind, kRailTail, channel, r.theirs);
    auto* mapped_ring = static_cast<uint8_t*>(nvshmem_ptr(remote_ring, r.pe));
    auto* mapped_tail = static_cast<unsigned long long*>(nvshmem_ptr(remote_tail, r.pe));
    w.direct = mapped_ring != nullptr && mapped_tail != nullptr;
    w.slots = w.direct ? mapped_ring : send_ring(ctx, g, channel, r.mine);
    w.remote_ring = remote_ring;
    w.remote_tail = w.direct ? mapped_tail : remote_tail;
    w.own_head = rail_signal(ctx, g.kind, kRailHead, channel, r.mine);
    w.capacity = g.capacity;
    w.slot_bytes = g.slot_bytes;
    // The combine receiver sums one token per warp and needs slot i of every ring for its batch
    // i, so a tail held back for publish_every slots stalls all its warps: at the start (the first
    // batch waited for 4 copies per sender warp, ~55 us) and at the end (the last 4 batches after
    // the sender's end). A direct ring's tail is one release store: published every slot (uniform
    // combine 837 -> 767 us, 4 x H200 as 2 x 2). Puts keep the config's chunk (a NIC wants fewer).
    w.publish_every = w.direct && g.kind == kRailCombine ? 1 : g.publish_every;
    w.pe = r.pe;
    const unsigned long long base = ctx.state->sent[g.kind][channel][r.mine];
    w.sent = w.published = w.head = base;
    const bool ok = warp_wait_at_least(ctx.fail, w.own_head, base, w.head, kernel, r.pe, kWaitRailHead, channel);
    trace.add(kTraceBatch, since);
    return ok;
}

// Waits for a free slot (publishing first: the receiver only frees what it was told about).
__device__ __forceinline__ bool make_room(const Context& ctx, RingWriter& w, int kernel, int channel) {
    if (w.sent - w.head < static_cast<unsigned long long>(w.capacity))
        return true;
    w.publish();
    const long long since = w.trace.now();
    const bool ok = warp_wait_at_least(ctx.fail, w.own_head, w.sent - w.capacity + 1, w.head, kernel, w.pe,
                                       kWaitRailHead, channel);
    w.trace.add(kTraceWait, since);
    return ok;
}

// Publishes the rest and records the running total for the next call (slot `r.mine`).
__device__ void close_ring_writer(const Context& ctx, const RailGeometry& g, int channel, const RailRing& r,
                                  RingWriter& w) {
    w.publish();
    __syncwarp();
    if (lane_id() == 0) {
        if (!w.direct)
            nvshmem_quiet();  // the staging ring may be rewritten by the next call
        ctx.state->sent[g.kind][channel][r.mine] = w.sent;
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
    // The small fields are loaded before the row copy so their round trip overlaps it: loaded
    // after it, each (the scales, then the top-k) added one full memory latency per token, as
    // much as the whole copy of a 7 KB FP8 row.
    float scales[kScalePrefetch];
    const float* token_scales = a.x_scales != nullptr ? a.x_scales + token * a.scale_token_stride : nullptr;
    if (token_scales != nullptr) {
#pragma unroll
        for (int p = 0; p < kScalePrefetch; ++p) {
            const int g = lane + p * kWarpSize;
            scales[p] = g < a.num_scales ? __ldg(token_scales + g * a.scale_hidden_stride) : 0.0f;
        }
    }
    const bool has_topk = a.topk_idx != nullptr && lane < a.num_topk;
    const int64_t topk_index = static_cast<int64_t>(token) * a.num_topk + lane;
    int64_t expert = -1;
    float weight = 0.0f;
    if (has_topk) {
        expert = __ldg(a.topk_idx + topk_index);
        weight = __ldg(a.topk_weights + topk_index);
    }
    warp_copy_int4<kCopyUnroll, false>(reinterpret_cast<int4*>(target.data),
                                       reinterpret_cast<const int4*>(a.x + static_cast<int64_t>(token) * a.hidden_bytes),
                                       a.hidden_bytes / 16, lane);
    if (token_scales != nullptr) {
#pragma unroll
        for (int p = 0; p < kScalePrefetch; ++p) {
            const int g = lane + p * kWarpSize;
            if (g < a.num_scales)
                target.scales[g] = scales[p];
        }
        for (int g = lane + kScalePrefetch * kWarpSize; g < a.num_scales; g += kWarpSize)
            target.scales[g] = __ldg(token_scales + g * a.scale_hidden_stride);
    }
    if (has_topk) {
        // Node-relative id, -1 for experts elsewhere (and for invalid ids): the intranode leg then
        // remaps to local ids as if this node were the whole group.
        const bool here = expert >= 0 && expert < a.num_experts && expert >= expert_lo && expert < expert_hi;
        const int64_t relative = here ? expert - expert_lo : -1;
        if (target.topk_idx32 != nullptr)
            target.topk_idx32[lane] = static_cast<int>(relative);
        else
            target.topk_idx64[lane] = relative;
        target.topk_weights[lane] = weight;
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

// Whole block: the tokens in [0, end_token) that go to some rank of `node` (block_count: *s_count
// zeroed by the caller before a barrier; ends with a barrier).
__device__ __forceinline__ int count_node_tokens(const bool* is_token_in_rank, int end_token, int num_ranks, int node,
                                                 int node_size, int* s_count) {
    return block_count(
        end_token, [&](int t) { return node_rank_bits(is_token_in_rank, t, num_ranks, node, node_size) != 0; },
        s_count);
}

// Own-node token k of a channel is staged by warp k % kRailWarps of the sender block when
// k % (2 * kRailWarps) < kRailWarps, else by that warp of the receiver block: these local copies
// took 40 % of the sender's time while the receiver waited for its ring 2/3 of the time.
__device__ __forceinline__ bool stages_own_token(int k, int warp, bool receiver) {
    return k % (2 * kRailWarps) == warp + (receiver ? kRailWarps : 0);
}

// Own-node token `token` (index k in this node's stream) into this rank's staging row: data,
// scales, top-k, source index and which ranks of the node want it (`token_bits`). Whole warp.
// False after a recorded failure.
__device__ __forceinline__ bool stage_own_token(const Context& ctx, const RailDispatchArgs& a, int token,
                                                int token_bits, int k, int channel, const WarpTrace& trace) {
    const int lane = lane_id();
    const int experts_per_node = a.num_experts / ctx.num_nodes;
    const int64_t row = static_cast<int64_t>(a.rail_prefix[ctx.node]) + k;
    if (!check_staging_row(ctx, a, row, ctx.rank, channel))
        return false;
    TokenTarget target{a.staging_x + row * a.hidden_bytes,
                       a.staging_scales != nullptr ? a.staging_scales + row * a.num_scales : nullptr, nullptr,
                       a.staging_topk_idx != nullptr ? a.staging_topk_idx + row * a.num_topk : nullptr,
                       a.staging_topk_weights != nullptr ? a.staging_topk_weights + row * a.num_topk : nullptr};
    const long long since = trace.now();
    write_token(a, token, ctx.node * experts_per_node, (ctx.node + 1) * experts_per_node, target, lane);
    trace.add(kTraceLocal, since);
    if (lane == 0)
        a.staging_src_token[row] = token;
    if (lane < ctx.nvl_size)
        a.forward_in_rank[row * ctx.nvl_size + lane] = ((token_bits >> lane) & 1) != 0;
    return true;
}

// One window of kWarpSize tokens (lane i: the own-node rank bits of token window + i, 0 if none):
// stages this warp's share of the window's own-node tokens (stages_own_token; `receiver`: which
// block this warp is in) and advances `k`, the stream index of the window's first own-node token,
// past the window. Whole warp. False after a recorded failure.
__device__ __forceinline__ bool stage_own_window(const Context& ctx, const RailDispatchArgs& a, int window, int bits,
                                                 int& k, bool receiver, int channel, const WarpTrace& trace) {
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const unsigned mask = __ballot_sync(0xffffffffu, bits != 0);
    const int lane_k = k + __popc(mask & ((1u << lane) - 1u));
    unsigned todo = __ballot_sync(0xffffffffu, bits != 0 && stages_own_token(lane_k, warp, receiver));
    k += __popc(mask);
    while (todo != 0) {
        const int source_lane = __ffs(todo) - 1;
        todo &= todo - 1;
        if (!stage_own_token(ctx, a, window + source_lane, __shfl_sync(0xffffffffu, bits, source_lane),
                             __shfl_sync(0xffffffffu, lane_k, source_lane), channel, trace))
            return false;
    }
    return true;
}

// Stream numbering: the tokens of the channel that go to node m, in token order, continue the
// count of the tokens before the channel (s_before[m]); stream index k fixes the staging row at
// the receiver (rail_prefix[source node] + k), so sub-streams may arrive in any order. Own-node
// token k is staged by one warp of this block or of the receiver block (stages_own_token); remote
// token k to node m goes down sub-stream k % subs of m, which one warp owns.
__device__ void rail_dispatch_send(const Context& ctx, const RailDispatchArgs& a, int channel, const WarpTrace& trace) {
    const RailGeometry& g = a.rail;
    const int R = ctx.num_ranks, L = ctx.nvl_size, N = ctx.num_nodes;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int begin = channel_begin(a.num_tokens, channel, g.num_channels);
    const int end = channel_begin(a.num_tokens, channel + 1, g.num_channels);
    const unsigned lanes_below = (1u << lane) - 1u;

    // Tokens each node gets before this channel: the stream index of the channel's first one.
    // Per-lane counts and one shared atomic per warp and node (not one per token).
    __shared__ int s_before[kMaxNodes];
    if (threadIdx.x < kMaxNodes)
        s_before[threadIdx.x] = 0;
    __syncthreads();
    for (int m = 0; m < N; ++m) {
        int count = 0;
        for (int t = threadIdx.x; t < begin; t += blockDim.x)
            count += node_rank_bits(a.is_token_in_rank, t, R, m, L) != 0 ? 1 : 0;
        count = warp_sum(count);
        if (lane == 0 && count != 0)
            atomicAdd(&s_before[m], count);
    }
    __syncthreads();

    const int experts_per_node = a.num_experts / N;
    // This warp's sub-stream to a remote node, if it has one (warp-uniform).
    const bool has_ring = warp < g.rings;
    RailRing r{};
    RingWriter w{};
    if (has_ring) {
        r = rail_ring(ctx, g, warp);
        if (!open_ring_writer(ctx, g, channel, r, kKernelRailDispatch, w, trace))
            return;
    }
    const int remote_lo = has_ring ? r.node * experts_per_node : 0;
    int k_local = s_before[ctx.node];
    int k_remote = has_ring ? s_before[r.node] : 0;
    for (int window = begin; window < end; window += kWarpSize) {
        const int t = window + lane;
        // Both routings of the window are read first: their loads are in flight together.
        const int local_bits = t < end ? node_rank_bits(a.is_token_in_rank, t, R, ctx.node, L) : 0;
        const int remote_bits = has_ring && t < end ? node_rank_bits(a.is_token_in_rank, t, R, r.node, L) : 0;
        // Own node: straight into the staging rows (this block's share).
        if (!stage_own_window(ctx, a, window, local_bits, k_local, false, channel, trace))
            return;
        if (!has_ring)
            continue;
        // This warp's sub-stream to node r.node: into the peer's ring.
        const unsigned remote_mask = __ballot_sync(0xffffffffu, remote_bits != 0);
        const int lane_k_remote = k_remote + __popc(remote_mask & lanes_below);
        unsigned todo = __ballot_sync(0xffffffffu, remote_bits != 0 && lane_k_remote % g.subs == r.sub);
        k_remote += __popc(remote_mask);
        while (todo != 0) {
            const int source_lane = __ffs(todo) - 1;
            todo &= todo - 1;
            const int token = window + source_lane;
            const int token_bits = __shfl_sync(0xffffffffu, remote_bits, source_lane);
            const int k = __shfl_sync(0xffffffffu, lane_k_remote, source_lane);
            if (!make_room(ctx, w, kKernelRailDispatch, channel))
                return;
            uint8_t* slot = w.slot();
            TokenTarget target{slot, reinterpret_cast<float*>(slot + a.slot.scales_offset),
                               reinterpret_cast<int*>(slot + a.slot.topk_idx_offset), nullptr,
                               reinterpret_cast<float*>(slot + a.slot.topk_weights_offset)};
            const long long since = trace.now();
            write_token(a, token, remote_lo, remote_lo + experts_per_node, target, lane);
            trace.add(kTraceData, since);
            trace.count(kTraceItems);
            if (lane == 0)
                *reinterpret_cast<int4*>(slot + a.slot.meta_offset) = make_int4(token, k, token_bits, 0);
            w.commit();
        }
    }
    if (!has_ring)
        return;
    // End of this sub-stream.
    if (!make_room(ctx, w, kKernelRailDispatch, channel))
        return;
    if (lane == 0)
        *reinterpret_cast<int4*>(w.slot() + a.slot.meta_offset) = make_int4(-1, -1, 0, 0);
    ++w.sent;
    close_ring_writer(ctx, g, channel, r, w);
}

// The receiver block's share of the channel's own-node tokens (stages_own_token), first: the
// sender needs a few slots' time before the rings have anything to drain.
__device__ bool stage_own_share(const Context& ctx, const RailDispatchArgs& a, int channel, const WarpTrace& trace) {
    const int R = ctx.num_ranks, L = ctx.nvl_size;
    const int begin = channel_begin(a.num_tokens, channel, a.rail.num_channels);
    const int end = channel_begin(a.num_tokens, channel + 1, a.rail.num_channels);
    // Own-node tokens before this channel: the stream index of its first one.
    __shared__ int s_before;
    if (threadIdx.x == 0)
        s_before = 0;
    __syncthreads();
    int k = count_node_tokens(a.is_token_in_rank, begin, R, ctx.node, L, &s_before);
    for (int window = begin; window < end; window += kWarpSize) {
        const int t = window + lane_id();
        const int bits = t < end ? node_rank_bits(a.is_token_in_rank, t, R, ctx.node, L) : 0;
        if (!stage_own_window(ctx, a, window, bits, k, true, channel, trace))
            return false;
    }
    return true;
}

// Receiver warp w stages its share of the own-node tokens, then drains ring w (one sub-stream of
// one source node) into the staging rows.
__device__ void rail_dispatch_receive(const Context& ctx, const RailDispatchArgs& a, int channel,
                                      const WarpTrace& trace) {
    const RailGeometry& g = a.rail;
    const int L = ctx.nvl_size;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    if (!stage_own_share(ctx, a, channel, trace) || warp >= g.rings)
        return;
    const RailRing r = rail_ring(ctx, g, warp);
    const int pe = r.pe;
    const uint8_t* ring = recv_ring(ctx, g, channel, r.mine);
    const unsigned long long* own_tail = rail_signal(ctx, g.kind, kRailTail, channel, r.mine);
    unsigned long long* remote_head = rail_signal(ctx, g.kind, kRailHead, channel, r.theirs);
    const unsigned long long base = ctx.state->received[g.kind][channel][r.mine];
    unsigned long long consumed = base, tail = base, released = base;
    const int first_row = a.rail_prefix[r.node];
    while (true) {
        if (consumed >= tail) {
            const long long since = trace.now();
            const bool ok = warp_wait_at_least(ctx.fail, own_tail, consumed + 1, tail, kKernelRailDispatch, pe,
                                               kWaitRailTail, channel);
            trace.add(kTraceWait, since);
            if (!ok)
                return;
        }
        const uint8_t* slot = ring + (consumed % g.capacity) * static_cast<size_t>(g.slot_bytes);
        const int4 meta = __ldcg(reinterpret_cast<const int4*>(slot + a.slot.meta_offset));
        ++consumed;
        if (meta.x < 0)
            break;
        const int64_t row = static_cast<int64_t>(first_row) + meta.y;
        if (!check_staging_row(ctx, a, row, pe, channel))
            return;
        // The slot's small fields are loaded before the row copy, so their round trip overlaps
        // it (loaded after it, each added one memory latency per token; see write_token).
        const float* slot_scales = reinterpret_cast<const float*>(slot + a.slot.scales_offset);
        float scales[kScalePrefetch];
        if (a.staging_scales != nullptr) {
#pragma unroll
            for (int p = 0; p < kScalePrefetch; ++p) {
                const int s = lane + p * kWarpSize;
                scales[p] = s < a.num_scales ? __ldcg(slot_scales + s) : 0.0f;
            }
        }
        const bool has_topk = a.staging_topk_idx != nullptr && lane < a.num_topk;
        int expert = -1;
        float weight = 0.0f;
        if (has_topk) {
            expert = __ldcg(reinterpret_cast<const int*>(slot + a.slot.topk_idx_offset) + lane);
            weight = __ldcg(reinterpret_cast<const float*>(slot + a.slot.topk_weights_offset) + lane);
        }
        const long long since = trace.now();
        warp_copy_int4<kCopyUnroll, true>(reinterpret_cast<int4*>(a.staging_x + row * a.hidden_bytes),
                                          reinterpret_cast<const int4*>(slot), a.hidden_bytes / 16, lane);
        trace.add(kTraceData, since);
        trace.count(kTraceItems);
        if (a.staging_scales != nullptr) {
#pragma unroll
            for (int p = 0; p < kScalePrefetch; ++p) {
                const int s = lane + p * kWarpSize;
                if (s < a.num_scales)
                    a.staging_scales[row * a.num_scales + s] = scales[p];
            }
            for (int s = lane + kScalePrefetch * kWarpSize; s < a.num_scales; s += kWarpSize)
                a.staging_scales[row * a.num_scales + s] = __ldcg(slot_scales + s);
        }
        if (has_topk) {
            a.staging_topk_idx[row * a.num_topk + lane] = expert;
            a.staging_topk_weights[row * a.num_topk + lane] = weight;
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
        ctx.state->received[g.kind][channel][r.mine] = consumed;
    }
}

__global__ void __launch_bounds__(kRailThreads, 1) rail_dispatch_kernel(Context ctx, RailDispatchArgs args) {
    __shared__ unsigned long long s_trace[kRailWarps][kWarpTraceSlots];
    const WarpTrace trace = open_warp_trace(s_trace, g_rail_trace_enabled != 0);
    const long long start = trace.now();
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        rail_dispatch_send(ctx, args, channel, trace);
    else
        rail_dispatch_receive(ctx, args, channel, trace);
    trace.add(kTraceTotal, start);
    close_warp_trace(trace, g_rail_trace[kRailDispatch][blockIdx.x]);
}

// ================================================================ rail combine
// Sender warp w returns, through ring w, sub-stream r.sub of the rows staged for home node
// r.node in this channel: the home's channel split of its tokens selects rows [first, last) of
// that node's staging block, and row first + j goes down sub-stream j % subs.
__device__ void rail_combine_send(const Context& ctx, const RailCombineArgs& a, int channel, const WarpTrace& trace) {
    const RailGeometry& g = a.rail;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    if (warp >= g.rings)
        return;
    const RailRing r = rail_ring(ctx, g, warp);
    const int n = r.node;  // the home node of the rows this warp returns
    const int home_tokens = a.rail_src_num_tokens[n];
    const int begin = channel_begin(home_tokens, channel, g.num_channels);
    const int end = channel_begin(home_tokens, channel + 1, g.num_channels);
    const int first = warp_lower_bound(a.staging_src_token, a.rail_prefix[n], a.rail_prefix[n + 1], begin);
    const int last = warp_lower_bound(a.staging_src_token, first, a.rail_prefix[n + 1], end);

    RingWriter w{};
    if (!open_ring_writer(ctx, g, channel, r, kKernelRailCombine, w, trace))
        return;
    const int row_bytes = a.hidden * 2;
    const int weights_offset = combine_weights_offset(a.hidden);
    for (int row = first + r.sub; row < last; row += g.subs) {
        if (!make_room(ctx, w, kKernelRailCombine, channel))
            return;
        uint8_t* slot = w.slot();
        // The weights are loaded before the row copy so their round trip overlaps it.
        const bool has_weights = a.partial_weights != nullptr && lane < a.num_topk;
        const float weight = has_weights ? __ldg(a.partial_weights + static_cast<int64_t>(row) * a.num_topk + lane)
                                         : 0.0f;
        const long long since = trace.now();
        warp_copy_int4<kCopyUnroll, false>(reinterpret_cast<int4*>(slot),
                                           reinterpret_cast<const int4*>(a.partial + static_cast<int64_t>(row) * row_bytes),
                                           row_bytes / 16, lane);
        trace.add(kTraceData, since);
        trace.count(kTraceItems);
        if (has_weights)
            reinterpret_cast<float*>(slot + weights_offset)[lane] = weight;
        w.commit();
    }
    close_ring_writer(ctx, g, channel, r, w);
}

// Sums the rows of one token (at most two, nodes ascending; null = absent) in fp32 plus the
// biases and stores the bf16 result. Whole warp. Both rows' loads of a pass are in flight
// together (2 * kSumUnroll 16-byte words per lane): the general loop below waits one memory
// latency per row and pass, so with two nodes this halves the round trips of a token. The
// additions happen in the same order as in the general loop (0, then the rows by node, then
// the biases), so both give the same bits.
__device__ __forceinline__ void sum_two_rows(const RailCombineArgs& a, const int4* row0, const int4* row1,
                                             int64_t out_offset, int hidden_int4, int lane) {
    for (int column0 = lane; column0 < hidden_int4; column0 += kWarpSize * kSumUnroll) {
        int4 values0[kSumUnroll], values1[kSumUnroll];
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u) {
            const int column = column0 + u * kWarpSize;
            const bool in_row = column < hidden_int4;
            values0[u] = in_row && row0 != nullptr ? __ldcg(row0 + column) : make_int4(0, 0, 0, 0);
            values1[u] = in_row && row1 != nullptr ? __ldcg(row1 + column) : make_int4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < kSumUnroll; ++u) {
            const int column = column0 + u * kWarpSize;
            if (column < hidden_int4) {
                float acc[8];
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    acc[j] = 0.0f;
                if (row0 != nullptr)
                    accumulate_bf16x8(acc, values0[u]);
                if (row1 != nullptr)
                    accumulate_bf16x8(acc, values1[u]);
                accumulate_biases(acc, a.bias0, a.bias1, out_offset, column);
                store_bf16x8(a.combined_x + out_offset, column, acc);
            }
        }
    }
}

// The home walks its channel's tokens in batches of one token per warp: warp 0 numbers each
// (token, node) pair inside its node's stream (index i of node m's stream is slot i / subs of
// sub-stream i % subs), every warp sums its token's rows, then warp 0 releases the consumed
// slots of every ring. Which nodes each token went to is read by the whole block once per
// kRailThreads tokens (32 batches) into shared memory: read by warp 0 in every batch, it cost
// one memory round trip per node per batch while the other 23 warps waited at the barrier.
__device__ void rail_combine_receive(const Context& ctx, const RailCombineArgs& a, int channel,
                                     const WarpTrace& trace) {
    const RailGeometry& g = a.rail;
    const int R = ctx.num_ranks, L = ctx.nvl_size, N = ctx.num_nodes;
    const int warp = threadIdx.x / kWarpSize, lane = lane_id();
    const int begin = channel_begin(a.num_tokens, channel, g.num_channels);
    const int end = channel_begin(a.num_tokens, channel + 1, g.num_channels);

    __shared__ int s_index[kRailWarps][kMaxNodes];
    __shared__ unsigned s_node_mask[kRailThreads];  // bit m: token fill_base + i went to node m
    __shared__ int s_count[kMaxNodes];
    __shared__ unsigned long long s_base[kMaxNodes];  // per ring
    __shared__ unsigned long long s_tail[kMaxNodes];  // per ring: the highest tail acquired so far
    __shared__ int s_own_before;
    __shared__ int s_failed;
    static_assert(kMaxNodes <= 32, "node masks are 32-bit");
    if (threadIdx.x < kMaxNodes) {
        s_count[threadIdx.x] = 0;
        s_tail[threadIdx.x] = 0;
        s_base[threadIdx.x] = threadIdx.x < g.rings ? ctx.state->received[g.kind][channel][threadIdx.x] : 0ull;
    }
    if (threadIdx.x == 0) {
        s_own_before = 0;
        s_failed = 0;
    }
    __syncthreads();
    count_node_tokens(a.is_token_in_rank, begin, R, ctx.node, L, &s_own_before);

    const int row_bytes = a.hidden * 2;
    const int hidden_int4 = a.hidden / 8;
    const int weights_offset = combine_weights_offset(a.hidden);
    const int subs = g.subs;
    const int64_t own_first_row = static_cast<int64_t>(a.rail_prefix[ctx.node]) + s_own_before;
    // Thread q < rings (all in warp 0) releases ring q; `released` is its slots consumed so far.
    const bool release_thread = static_cast<int>(threadIdx.x) < g.rings;
    RailRing released_ring{};
    if (release_thread)
        released_ring = rail_ring(ctx, g, threadIdx.x);
    int released = 0;
    // Ring and slot of entry `index` of node m's stream (m != own node).
    auto ring_of = [&](int m, int index) { return other_index(m, ctx.node) + (N - 1) * (index % subs); };
    auto slot_of = [&](int m, int index) -> const uint8_t* {
        const int ring = ring_of(m, index);
        return recv_ring(ctx, g, channel, ring) +
               ((s_base[ring] + index / subs) % g.capacity) * static_cast<size_t>(g.slot_bytes);
    };
    // Where entry `index` of node m's stream is: the ring slot, or this rank's own staging row.
    auto row_of = [&](int m, int index) -> const uint8_t* {
        return m == ctx.node ? a.partial + (own_first_row + index) * row_bytes : slot_of(m, index);
    };
    int fill_base = begin;
    for (int batch = begin; batch < end; batch += kRailWarps) {
        long long since = trace.now();
        if ((batch - begin) % kRailThreads == 0) {
            // Block-uniform: one token per thread. The last batch's readers of s_node_mask
            // (warp 0) are behind the barrier that ended that batch.
            fill_base = batch;
            const int t = batch + static_cast<int>(threadIdx.x);
            unsigned node_mask = 0;
            if (t < end)
                for (int m = 0; m < N; ++m)
                    node_mask |= node_rank_bits(a.is_token_in_rank, t, R, m, L) != 0 ? (1u << m) : 0u;
            s_node_mask[threadIdx.x] = node_mask;
            __syncthreads();
        }
        if (warp == 0) {
            __syncwarp();  // the release lanes' reads of s_count (last batch) come before these writes
            const int t = batch + lane;
            const bool valid = lane < kRailWarps && t < end;
            // batch - fill_base <= 31 * kRailWarps, so the index stays below kRailThreads.
            const unsigned node_mask = valid ? s_node_mask[batch - fill_base + lane] : 0u;
            number_batch_in_streams(
                N, kRailWarps, [&](int m) { return ((node_mask >> m) & 1u) != 0; }, s_count, s_index);
        }
        __syncthreads();
        trace.add(kTraceBatch, since);
        since = trace.now();
        const int token = batch + warp;
        if (token < end) {
            bool ok = true;
            if (lane < N && lane != ctx.node && s_index[warp][lane] >= 0) {
                const int index = s_index[warp][lane];
                const int ring = ring_of(lane, index);
                const unsigned long long needed = s_base[ring] + index / subs + 1;
                // A tail that another warp of this block acquired may already cover the slot
                // (the sender publishes several slots of a ring at once): then no round trip.
                // Their release (fence, then the shared max) and this acquire (the shared read,
                // then a fence) extend that warp's system-scope acquire to this warp's loads.
                if (*reinterpret_cast<volatile unsigned long long*>(&s_tail[ring]) >= needed) {
                    __threadfence_block();
                } else {
                    unsigned long long seen;
                    ok = wait_at_least(ctx.fail, rail_signal(ctx, g.kind, kRailTail, channel, ring), needed, seen,
                                       kKernelRailCombine, lane * L + ctx.local_rank, kWaitRailTail, channel);
                    if (ok) {
                        __threadfence_block();
                        atomicMax(&s_tail[ring], seen);
                    }
                }
            }
            const bool failed = __ballot_sync(0xffffffffu, !ok) != 0;
            trace.add(kTraceWait, since);
            since = trace.now();
            if (failed) {
                if (lane == 0)
                    s_failed = 1;
            } else {
                // Orders the other lanes' row loads after the acquiring lane's acquire.
                __syncwarp();
                const int64_t out_offset = static_cast<int64_t>(token) * row_bytes;
                // The token's first two rows (nodes ascending) and how many it has (named
                // pointers, not an array indexed at run time, which would live in local memory).
                const uint8_t* row0 = nullptr;
                const uint8_t* row1 = nullptr;
                int num_rows = 0;
                for (int m = 0; m < N; ++m) {
                    const int index = s_index[warp][m];
                    if (index < 0)
                        continue;
                    if (num_rows == 0)
                        row0 = row_of(m, index);
                    else if (num_rows == 1)
                        row1 = row_of(m, index);
                    ++num_rows;
                }
                if (num_rows <= 2) {
                    sum_two_rows(a, reinterpret_cast<const int4*>(row0), reinterpret_cast<const int4*>(row1),
                                 out_offset, hidden_int4, lane);
                } else {
                    // More than two nodes: kSumUnroll columns per lane and pass, one row at a
                    // time. Each element is summed in order: nodes ascending, then the biases.
                    for (int column0 = lane; column0 < hidden_int4; column0 += kWarpSize * kSumUnroll) {
                        float acc[kSumUnroll][8];
#pragma unroll
                        for (int u = 0; u < kSumUnroll; ++u)
#pragma unroll
                            for (int j = 0; j < 8; ++j)
                                acc[u][j] = 0.0f;
                        for (int m = 0; m < N; ++m) {
                            const int index = s_index[warp][m];
                            if (index < 0)
                                continue;
                            const int4* row = reinterpret_cast<const int4*>(row_of(m, index));
                            int4 values[kSumUnroll];
#pragma unroll
                            for (int u = 0; u < kSumUnroll; ++u) {
                                const int column = column0 + u * kWarpSize;
                                values[u] = column < hidden_int4 ? __ldcg(row + column) : make_int4(0, 0, 0, 0);
                            }
#pragma unroll
                            for (int u = 0; u < kSumUnroll; ++u)
                                accumulate_bf16x8(acc[u], values[u]);
                        }
#pragma unroll
                        for (int u = 0; u < kSumUnroll; ++u) {
                            const int column = column0 + u * kWarpSize;
                            if (column < hidden_int4) {
                                accumulate_biases(acc[u], a.bias0, a.bias1, out_offset, column);
                                store_bf16x8(a.combined_x + out_offset, column, acc[u]);
                            }
                        }
                    }
                }
                if (a.combined_topk_weights != nullptr && lane < a.num_topk) {
                    float sum = 0.0f;
                    for (int m = 0; m < N; ++m) {
                        const int index = s_index[warp][m];
                        if (index < 0)
                            continue;
                        const float* weights =
                            m == ctx.node ? a.partial_weights + (own_first_row + index) * a.num_topk
                                          : reinterpret_cast<const float*>(slot_of(m, index) + weights_offset);
                        sum += __ldcg(weights + lane);
                    }
                    a.combined_topk_weights[static_cast<int64_t>(token) * a.num_topk + lane] = sum;
                }
                trace.add(kTraceData, since);
                trace.count(kTraceItems);
            }
        }
        since = trace.now();
        __syncthreads();
        if (s_failed)
            return;
        // Release what this batch consumed (its loads have completed: the sums are stored). The
        // first s_count[m] entries of node m's stream are consumed; sub-stream s holds those
        // with index % subs == s.
        if (release_thread) {
            const int count = s_count[released_ring.node];
            const int consumed = count > released_ring.sub ? (count - released_ring.sub + subs - 1) / subs : 0;
            if (consumed != released) {
                released = consumed;
                nvshmemx_signal_op(
                    reinterpret_cast<uint64_t*>(rail_signal(ctx, g.kind, kRailHead, channel, released_ring.theirs)),
                    s_base[threadIdx.x] + released, NVSHMEM_SIGNAL_SET, released_ring.pe);
            }
        }
        trace.add(kTracePublish, since);
    }
    if (release_thread) {
        nvshmem_quiet();
        ctx.state->received[g.kind][channel][threadIdx.x] = s_base[threadIdx.x] + released;
    }
}

__global__ void __launch_bounds__(kRailThreads, 1) rail_combine_kernel(Context ctx, RailCombineArgs args) {
    __shared__ unsigned long long s_trace[kRailWarps][kWarpTraceSlots];
    const WarpTrace trace = open_warp_trace(s_trace, g_rail_trace_enabled != 0);
    const long long start = trace.now();
    const int channel = blockIdx.x / 2;
    if (blockIdx.x % 2 == 0)
        rail_combine_send(ctx, args, channel, trace);
    else
        rail_combine_receive(ctx, args, channel, trace);
    trace.add(kTraceTotal, start);
    close_warp_trace(trace, g_rail_trace[kRailCombine][blockIdx.x]);
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
    DEEP_EP_HOST_ASSERT(num_sms >= 2 && num_sms % 2 == 0, "num_sms must be even and >= 2");
    DEEP_EP_HOST_ASSERT(num_sms / 2 <= kMaxChannels, "num_sms must be at most " + std::to_string(2 * kMaxChannels));
    DEEP_EP_HOST_ASSERT(num_nodes >= 2 && num_nodes <= kMaxNodes, "the rail legs need 2.." +
                                                                      std::to_string(kMaxNodes) + " nodes");
    RailGeometry g;
    g.kind = kind;
    g.num_channels = num_sms / 2;
    g.slot_bytes = slot_bytes;
    const int peers = num_nodes - 1;
    // The combine receiver takes up to one token per warp from a peer's stream before it releases
    // slots, i.e. up to ceil(kRailWarps / subs) from one ring.
    auto min_capacity_of = [&](int subs) { return kind == kRailCombine ? (kRailWarps + subs - 1) / subs + 1 : 2; };
    // One receive ring and one send staging ring per (channel, ring); slots that fit per ring.
    auto per_slot_of = [&](int subs) {
        return 2 * static_cast<size_t>(g.num_channels) * static_cast<size_t>(peers * subs) * slot_bytes;
    };
    auto fit_of = [&](int subs) { return layout.kind_bytes / per_slot_of(subs); };
    // Every warp of the block pair owns one sub-stream; fewer when the buffer cannot give each ring
    // a few slots (the result depends only on arguments every rank of the rail shares).
    int subs = std::max(1, kRailWarps / peers);
    while (subs > 1 && fit_of(subs) < static_cast<size_t>(std::max(min_capacity_of(subs), 4)))
        subs /= 2;
    g.subs = subs;
    g.rings = peers * subs;
    DEEP_EP_HOST_ASSERT(g.rings <= kMaxNodes && g.rings <= kRailWarps, "too many rail rings per channel");
    const int min_capacity = min_capacity_of(subs);
    // The config's slots per (channel, peer) are shared by the sub-streams, with a few each at least.
    const int wanted = std::max({min_capacity, (ring_capacity + subs - 1) / subs, 8});
    g.capacity = static_cast<int>(std::min<size_t>(static_cast<size_t>(wanted), fit_of(subs)));
    if (g.capacity < min_capacity)
        throw std::invalid_argument("deep_ep: num_rdma_bytes (" + std::to_string(layout.total_bytes) +
                                    ") is too small for " + std::to_string(g.num_channels) + " channels of " +
                                    std::to_string(slot_bytes) + "-byte slots over " + std::to_string(num_nodes) +
                                    " nodes; need at least " +
                                    std::to_string(layout.data_offset + 2 * min_capacity * per_slot_of(subs) +
                                                   2 * kPage) +
                                    " bytes");
    g.publish_every = std::max(1, std::min(send_chunk, g.capacity / 2));
    g.recv_offset = layout.data_offset + static_cast<size_t>(kind) * layout.kind_bytes;
    g.send_offset = g.recv_offset + static_cast<size_t>(g.capacity) * (per_slot_of(subs) / 2);
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

cudaError_t rail_trace_reset(bool enable) { return reset_warp_trace(g_rail_trace, g_rail_trace_enabled, enable); }

cudaError_t rail_trace_read(unsigned long long* cycles, int* clock_khz) {
    return read_warp_trace(g_rail_trace, cycles, clock_khz);
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
