// PTX helpers: memory ordering across GPUs, timers, vector copies, warp reductions.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "exception.cuh"

namespace deep_ep {

constexpr int kWarpSize = 32;

// ---------------------------------------------------------------- cross-GPU ordering
// A peer GPU sees our stores in any order unless the flag that publishes them is a release at
// system scope and the reader polls with an acquire at system scope (KERNELS.md).
__device__ __forceinline__ int ld_acquire_sys(const int* ptr) {
    int value;
    asm volatile("ld.acquire.sys.global.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ int ld_relaxed_sys(const int* ptr) {
    int value;
    asm volatile("ld.relaxed.sys.global.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ void st_release_sys(int* ptr, int value) {
    asm volatile("st.release.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ void st_relaxed_sys(int* ptr, int value) {
    asm volatile("st.relaxed.sys.global.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Raises a counter in a peer's memory to at least `value` (never lowers it: writers in any order).
__device__ __forceinline__ void red_max_relaxed_sys(int* ptr, int value) {
    asm volatile("red.relaxed.sys.global.max.s32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

// Hand-offs between the warps of a block through shared memory (generic addresses).
__device__ __forceinline__ void st_release_cta(int* ptr, int value) {
    asm volatile("st.release.cta.b32 [%0], %1;" ::"l"(ptr), "r"(value) : "memory");
}

__device__ __forceinline__ int ld_acquire_cta(const int* ptr) {
    int value;
    asm volatile("ld.acquire.cta.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ int ld_volatile_any(const int* ptr) { return *reinterpret_cast<const volatile int*>(ptr); }

__device__ __forceinline__ int ld_volatile(const int* ptr) {
    int value;
    asm volatile("ld.volatile.global.b32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
    return value;
}

__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// ---------------------------------------------------------------- 16-byte loads and stores
// Input tensors are read-only while a kernel runs: the non-coherent path is safe for them.
__device__ __forceinline__ int4 ld_input_int4(const int4* ptr) {
#ifdef DISABLE_AGGRESSIVE_PTX_INSTRS
    return __ldg(ptr);
#else
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.s32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(ptr));
    return v;
#endif
}

// Ring slots are rewritten by a peer GPU during the kernel: bypass L1 so no stale line is read.
__device__ __forceinline__ int4 ld_ring_int4(const int4* ptr) { return __ldcg(ptr); }

__device__ __forceinline__ void st_int4(int4* ptr, const int4& v) { *ptr = v; }

// Copies `num_int4` 16-byte words with a whole warp, `kUnroll` loads in flight per lane before
// the first store, so one warp keeps kUnroll * 512 bytes moving. The last, partial stride is
// predicated rather than copied word by word: a word-at-a-time tail would wait one full load
// latency per 512 bytes (for a 7 KB FP8 row, 6 of the row's 7 round trips).
template <int kUnroll, bool kSrcIsRing>
__device__ __forceinline__ void warp_copy_int4(int4* __restrict__ dst, const int4* __restrict__ src, int num_int4,
                                               int lane) {
    constexpr int kStride = kWarpSize * kUnroll;
    for (int base = 0; base < num_int4; base += kStride) {
        int4 values[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kWarpSize + lane;
            if (i < num_int4)
                values[u] = kSrcIsRing ? ld_ring_int4(src + i) : ld_input_int4(src + i);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * kWarpSize + lane;
            if (i < num_int4)
                st_int4(dst + i, values[u]);
        }
    }
}

// ---------------------------------------------------------------- warp helpers
// Position (0-31) of set bit number j (from 0, lowest first) of `mask`; needs j < popc(mask).
__device__ __forceinline__ int nth_set_bit(unsigned mask, int j) {
    for (int skip = 0; skip < j; ++skip)
        mask &= mask - 1;
    return __ffs(mask) - 1;
}

__device__ __forceinline__ int warp_sum(int value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarpSize; }

// Whole block: how many t in [0, end) satisfy pred(t) (a count per thread, then one shared atomic
// per warp into *s_count, which the caller zeroed before a barrier). Ends with a barrier.
template <typename Pred>
__device__ __forceinline__ int block_count(int end, Pred pred, int* s_count) {
    int count = 0;
    for (int t = threadIdx.x; t < end; t += blockDim.x)
        count += pred(t) ? 1 : 0;
    count = warp_sum(count);
    if (lane_id() == 0 && count != 0)
        atomicAdd(s_count, count);
    __syncthreads();
    return *s_count;
}

// First index in [lo, hi) of the ascending `values` that is >= target (hi if none), found by the
// whole warp: each round probes 32 evenly spaced entries, so a range of n entries takes about
// log32(n) rounds of one load per lane.
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

// One warp numbers a batch of tokens (lane i: the batch's token i) in each of num_streams streams,
// in token order: lane i < num_lanes writes index[i][s] = count[s] + the number of earlier batch
// tokens in stream s if its token is in s, else -1; count[s] then advances by the batch's tokens
// in s. `in_stream(s)`: whether this lane's token is in stream s (false past the batch). Used
// where a token's position in a peer's stream must be known before its warp moves it.
template <int kIndexStride, typename InStream>
__device__ __forceinline__ void number_batch_in_streams(int num_streams, int num_lanes, InStream in_stream, int* count,
                                                        int (*index)[kIndexStride]) {
    const int lane = lane_id();
    const unsigned lanes_below = (1u << lane) - 1;
#pragma unroll
    for (int s = 0; s < num_streams; ++s) {
        const bool in = in_stream(s);
        const unsigned mask = __ballot_sync(0xffffffffu, in);
        const int base = count[s];
        if (lane < num_lanes)
            index[lane][s] = in ? base + __popc(mask & lanes_below) : -1;
        __syncwarp();
        if (lane == 0)
            count[s] = base + __popc(mask);
        __syncwarp();
    }
}

// ---------------------------------------------------------------- failure reporting
// Records the first failure of this rank in host-mapped memory and raises the local abort flag,
// so every other wait of this rank's kernels gives up at once instead of running to its own
// timeout.
__device__ __forceinline__ void report_failure(const FailureContext& ctx, int code, int kernel, int peer,
                                               int target, int channel, int64_t value_seen, int64_t expected) {
    if (atomicCAS_system(&ctx.record->code, 0, -1) == 0) {
        volatile ErrorRecord* rec = ctx.record;
        rec->kernel = kernel;
        rec->rank = ctx.rank;
        rec->peer = peer;
        rec->target = target;
        rec->channel = channel;
        rec->value_seen = value_seen;
        rec->expected = expected;
        __threadfence_system();
        rec->code = code;
        __threadfence_system();
    }
    atomicExch(ctx.abort_flag, 1);
}

// A bounded spin: polls `ptr` (acquire, system scope) until `done(value)` holds. Returns false
// on timeout or when another thread of this rank has already failed; on timeout the failure is
// recorded. `done` must be a cheap pure predicate.
template <typename Done>
__device__ __forceinline__ bool wait_value(const FailureContext& ctx, const int* ptr, Done done, int& value,
                                           int kernel, int peer, int target, int channel, int64_t expected) {
    value = ld_acquire_sys(ptr);
    if (done(value))
        return true;
    const uint64_t start = global_timer_ns();
    while (true) {
        value = ld_acquire_sys(ptr);
        if (done(value))
            return true;
        if (ld_volatile(ctx.abort_flag) != 0)
            return false;
        if (global_timer_ns() - start > ctx.timeout_ns) {
            report_failure(ctx, kErrorTimeout, kernel, peer, target, channel, value, expected);
            return false;
        }
    }
}

// ---------------------------------------------------------------- fp32 sums of bf16 rows (combine)
// Adds the 8 bf16 values of one 16-byte vector to `acc`.
__device__ __forceinline__ void accumulate_bf16x8(float (&acc)[8], const int4& raw) {
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j)
        acc[j] += __bfloat162float(v[j]);
}

// Adds 16-byte column `column` of the row at `row_offset` of each given bias (bf16 [T, H]; null = none).
__device__ __forceinline__ void accumulate_biases(float (&acc)[8], const uint8_t* bias0, const uint8_t* bias1,
                                                  int64_t row_offset, int column) {
    const uint8_t* biases[2] = {bias0, bias1};
#pragma unroll
    for (int b = 0; b < 2; ++b) {
        if (biases[b] == nullptr)
            continue;
        accumulate_bf16x8(acc, __ldg(reinterpret_cast<const int4*>(biases[b] + row_offset) + column));
    }
}

// Rounds `acc` to bf16 (nearest) and stores it as 16-byte column `column` of `row`.
__device__ __forceinline__ void store_bf16x8(uint8_t* row, int column, const float (&acc)[8]) {
    int4 packed;
    __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(&packed);
#pragma unroll
    for (int j = 0; j < 8; ++j)
        out[j] = __float2bfloat16_rn(acc[j]);
    reinterpret_cast<int4*>(row)[column] = packed;
}

}  // namespace deep_ep
