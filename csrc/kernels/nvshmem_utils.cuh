// Device helpers of the low-latency kernels: cross-GPU memory ordering, bounded waits, the FP8
// cast rule. Only PTX and NVSHMEM's public device API; no torch header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "internode_ll_api.cuh"

namespace deep_ep {
namespace ll {

__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Counters polled here are written by other GPUs: acquire at system scope so the data they
// published before the counter is visible after it.
__device__ __forceinline__ unsigned long long ld_acquire_sys(const unsigned long long* ptr) {
    unsigned long long v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
    return v;
}

// A 64-bit word written by another GPU with relaxed stores (tagged data: the word is the flag).
__device__ __forceinline__ unsigned long long ld_relaxed_sys_u64(const unsigned long long* ptr) {
    unsigned long long v;
    asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
    return v;
}

// Two tagged 64-bit words in one store; each word is single-copy atomic (a vector access is one
// access per element), so a reader never sees a word's tag without its value.
__device__ __forceinline__ void st_relaxed_sys_v2_u64(unsigned long long* ptr, unsigned long long a,
                                                      unsigned long long b) {
    asm volatile("st.relaxed.sys.global.v2.u64 [%0], {%1, %2};" ::"l"(ptr), "l"(a), "l"(b) : "memory");
}

// Adds to a counter in a peer's memory (mapped through nvshmem_ptr) with release semantics, so
// this thread's earlier stores (and those it synchronized with) are visible before the count.
__device__ __forceinline__ void red_add_release_sys(unsigned long long* ptr, unsigned long long v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// Stores a flag (a call number) in a peer's memory (mapped through nvshmem_ptr) with release
// semantics: this thread's earlier stores, and those it synchronized with, are visible first.
__device__ __forceinline__ void st_release_sys_u64(unsigned long long* ptr, unsigned long long v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// Orders this thread's earlier stores (to peers too) before its later ones, at system scope.
// A release fence is all the "data, then counter" pattern needs; __threadfence_system() is
// fence.sc.sys, a heavier sequentially consistent fence, on the critical path of every signal.
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

// Received data is read once, from L2 (peers write into our L2 over NVLink).
__device__ __forceinline__ int4 ld_cg_int4(const void* ptr) { return __ldcg(reinterpret_cast<const int4*>(ptr)); }

__device__ __forceinline__ int4 ld_nc_int4(const void* ptr) { return __ldg(reinterpret_cast<const int4*>(ptr)); }

__device__ __forceinline__ void st_int4(void* ptr, const int4& v) { *reinterpret_cast<int4*>(ptr) = v; }

// Result of a bounded wait.
enum WaitResult : int { kWaitOk = 0, kWaitTimedOut = 1 };

// Spins until *counter >= expected, or timeout_ns has passed. Returns the nanoseconds waited
// through *waited_ns. Only one thread of a block calls this.
__device__ __forceinline__ int wait_counter_at_least(const unsigned long long* counter, unsigned long long expected,
                                                     unsigned long long timeout_ns, unsigned long long* seen,
                                                     unsigned long long* waited_ns) {
    const unsigned long long start = global_timer_ns();
    unsigned long long value = ld_acquire_sys(counter);
    while (value < expected) {
        const unsigned long long now = global_timer_ns();
        if (now - start > timeout_ns) {
            *seen = value;
            *waited_ns = now - start;
            return kWaitTimedOut;
        }
        value = ld_acquire_sys(counter);
    }
    *seen = value;
    *waited_ns = global_timer_ns() - start;
    return kWaitOk;
}

// First timeout wins the record; the host reads it at its next check and raises.
__device__ __forceinline__ void report_timeout(ErrorRecord* record, int rank, int kernel, int peer,
                                               unsigned long long expected, unsigned long long seen,
                                               unsigned long long waited_ns) {
    if (atomicCAS(&record->flag, 0, -1) == 0) {
        record->rank = rank;
        record->kernel = kernel;
        record->peer = peer;
        record->expected = expected;
        record->seen = seen;
        record->waited_ns = waited_ns;
        __threadfence_system();
        atomicExch(&record->flag, 1);
        __threadfence_system();
    }
}

// ---------------------------------------------------------------------------------------------
// FP8 rule (bit-exact with deep_ep.utils.per_token_cast_to_fp8): per 128 channels,
// amax = max|x| clamped to >= 1e-4, scale = amax / 448 (fp32, RN), optionally rounded up to a
// power of two on the bits, data = x / scale (fp32, RN) -> e4m3 (RN).
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float fp8_scale_from_amax(float amax, bool round_scale) {
    float scale = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
    if (round_scale) {
        const unsigned int bits = __float_as_uint(scale);
        unsigned int exponent = (bits >> 23) & 0xFFu;
        exponent += (bits & 0x7FFFFFu) != 0u ? 1u : 0u;
        scale = __uint_as_float(exponent << 23);
    }
    return scale;
}

// Two floats -> two e4m3 bytes (first in the low byte).
__device__ __forceinline__ uint16_t fp8x2_from_floats(float a, float b) {
    return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ void bf16x8_to_floats(const int4& v, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 p = __bfloat1622float2(h[i]);
        f[2 * i] = p.x;
        f[2 * i + 1] = p.y;
    }
}

__device__ __forceinline__ int4 floats_to_bf16x8(const float* f) {
    int4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
}

// Warp-wide exclusive prefix sum; also returns the warp total.
__device__ __forceinline__ int warp_exclusive_scan(int value, int* total) {
    const int lane = threadIdx.x & 31;
    int inclusive = value;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += other;
    }
    *total = __shfl_sync(0xffffffffu, inclusive, 31);
    return inclusive - value;
}

}  // namespace ll
}  // namespace deep_ep
