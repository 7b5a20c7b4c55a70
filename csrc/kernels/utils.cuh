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
// the first store, so one warp keeps kUnroll * 512 bytes moving.
template <int kUnroll, bool kSrcIsRing>
__device__ __forceinline__ void warp_copy_int4(int4* __restrict__ dst, const int4* __restrict__ src, int num_int4,
                                               int lane) {
    constexpr int kStride = kWarpSize * kUnroll;
    int base = 0;
    for (; base + kStride <= num_int4; base += kStride) {
        int4 values[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            values[u] = kSrcIsRing ? ld_ring_int4(src + base + u * kWarpSize + lane)
                                   : ld_input_int4(src + base + u * kWarpSize + lane);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
            st_int4(dst + base + u * kWarpSize + lane, values[u]);
    }
    for (int i = base + lane; i < num_int4; i += kWarpSize)
        st_int4(dst + i, kSrcIsRing ? ld_ring_int4(src + i) : ld_input_int4(src + i));
}

// ---------------------------------------------------------------- bulk copies (sm_90 copy engine)
// One `cp.async.bulk` moves a whole block of bytes on behalf of one thread; the SM's copy engine
// issues it as large transactions, so a warp spends a few instructions per kilobyte instead of
// one load and one store per 16 bytes and lane. Sizes and both addresses must be multiples of 16.
// The copies run in the async proxy: see PTX ISA "Async Proxy" for when a proxy fence is needed.
__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void mbarrier_init(uint32_t barrier, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(barrier), "r"(arrivals) : "memory");
}

// The copy engine completes transactions on barriers that ordinary stores just initialised.
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Arrives (the one expected arrival) and announces `bytes` that copies will complete on it.
__device__ __forceinline__ void mbarrier_arrive_expect_bytes(uint32_t barrier, uint32_t bytes) {
    asm volatile(
        "{\n\t.reg .b64 state;\n\t"
        "mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 state, [%0], %1;\n\t}"
        ::"r"(barrier), "r"(bytes)
        : "memory");
}

// True once the phase of parity `parity` has completed (the hardware may suspend a while first).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint32_t barrier, uint32_t parity) {
    uint32_t done;
    asm volatile(
        "{\n\t.reg .pred done;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%1], %2;\n\t"
        "selp.b32 %0, 1, 0, done;\n\t}"
        : "=r"(done)
        : "r"(barrier), "r"(parity)
        : "memory");
    return done != 0;
}

// global -> shared; completion (the bytes landed) is counted on `barrier`.
__device__ __forceinline__ void bulk_load_to_shared(uint32_t dst, const void* src, uint32_t bytes, uint32_t barrier) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(barrier)
                 : "memory");
}

// shared -> global (a peer's memory mapped over NVLink included); completion through bulk groups.
__device__ __forceinline__ void bulk_store_from_shared(void* dst, uint32_t src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                 ::"l"(__cvta_generic_to_global(dst)), "r"(src), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until at most N of this thread's newest bulk groups still read their shared source.
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// Waits until every bulk group of this thread has completed, its writes included. Completion is
// followed by an implicit generic-async proxy fence (PTX ISA, "Async Proxy").
__device__ __forceinline__ void bulk_wait_all_complete() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// Orders this thread's generic-proxy accesses (e.g. an acquired ring counter) with its later
// async-proxy copies of global memory, and the other way round.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// ---------------------------------------------------------------- warp helpers
__device__ __forceinline__ int warp_sum(int value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarpSize; }

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

// ---------------------------------------------------------------- warp-private bulk copy pipeline
// Shape of one warp's pipeline: `stages` shared-memory stages of `stage_bytes` each, and loads
// issued up to `lookahead` chunks ahead of the next store. So at most `lookahead` loads and
// `stages - lookahead` stores hold a stage at any time.
struct BulkPipelineShape {
    int stages, lookahead, stage_bytes;
};

// Moves rows global -> shared -> global through the stages of one warp; only its lane 0 may call
// it. A row is cut into chunks of stage_bytes. Chunk number c (counted over every row this warp
// copies) uses stage c % stages: its load completes on that stage's mbarrier in phase
// c / stages, and its store is bulk group number c (one group per chunk, committed in chunk
// order). Loads of the next chunks, of the next row too, overlap the stores still streaming out.
// kMaxStages bounds `stages` (cp.async.bulk.wait_group takes an immediate).
template <int kMaxStages>
class BulkRowCopier {
public:
    // `stages`: shape.stages * shape.stage_bytes bytes of shared memory, 16-byte aligned;
    // `barriers`: shape.stages words. The shape must satisfy 1 <= lookahead <= stages <=
    // kMaxStages and stage_bytes % 16 == 0 (the launcher checks it).
    __device__ __forceinline__ void init(uint8_t* stages, uint64_t* barriers, const BulkPipelineShape& shape) {
        shape_ = shape;
        stages_ = shared_address(stages);
        barriers_ = shared_address(barriers);
        stored_ = 0;
        for (int s = 0; s < shape_.stages; ++s)
            mbarrier_init(barrier(s), 1);
        fence_barrier_init();
        // Ring slots this warp writes were last read by a peer before this kernel started; keep the
        // copy engine's writes behind everything this thread has observed so far.
        fence_proxy_async_global();
    }

    // Copies `bytes` (a multiple of 16) from src to dst. On return every byte of src has been read
    // (a ring slot may be released to its writer), while stores may still be in flight
    // (complete() waits for them). Returns false after a timeout, which it has recorded; the copier
    // must not be used again then.
    __device__ bool copy(void* dst, const void* src, int bytes, const FailureContext& fail, int kernel, int peer,
                         int channel) {
        auto* dst_bytes = static_cast<uint8_t*>(dst);
        const auto* src_bytes = static_cast<const uint8_t*>(src);
        const int num_chunks = (bytes + shape_.stage_bytes - 1) / shape_.stage_bytes;
        const int first = stored_;  // every chunk of earlier rows has been stored
        for (int j = 0; j < shape_.lookahead && j < num_chunks; ++j)
            load(first + j, src_bytes, j, bytes);
        for (int i = 0; i < num_chunks; ++i) {
            if (!wait_loaded(first + i, fail, kernel, peer, channel))
                return false;
            store(first + i, dst_bytes, i, bytes);
            if (i + shape_.lookahead < num_chunks)
                load(first + i + shape_.lookahead, src_bytes, i + shape_.lookahead, bytes);
        }
        return true;
    }

    // Waits until every store has completed; their data is then visible to this thread's ordinary
    // accesses, so a release by this thread publishes it. Also required before the warp exits:
    // the stages must outlive the stores that read them.
    __device__ __forceinline__ void complete() const { bulk_wait_all_complete(); }

private:
    __device__ __forceinline__ uint32_t barrier(int stage) const { return barriers_ + 8u * stage; }
    __device__ __forceinline__ uint32_t stage_address(int stage) const {
        return stages_ + static_cast<uint32_t>(shape_.stage_bytes * stage);
    }
    __device__ __forceinline__ int chunk_bytes(int index, int row_bytes) const {
        return min(shape_.stage_bytes, row_bytes - index * shape_.stage_bytes);
    }

    // Loads chunk `index` of a row as global chunk `c`.
    __device__ __forceinline__ void load(int c, const uint8_t* src, int index, int row_bytes) {
        const int stage = c % shape_.stages;
        // The store of chunk c - stages read this stage last; stored_ - 1 - (c - stages) groups
        // were committed after it (stages - lookahead inside a row, more at a row's start).
        if (c >= shape_.stages)
            wait_stage_read<kMaxStages - 1>(stored_ - 1 - (c - shape_.stages));
        const int size = chunk_bytes(index, row_bytes);
        mbarrier_arrive_expect_bytes(barrier(stage), static_cast<uint32_t>(size));
        bulk_load_to_shared(stage_address(stage), src + static_cast<size_t>(index) * shape_.stage_bytes,
                            static_cast<uint32_t>(size), barrier(stage));
    }

    __device__ __forceinline__ void store(int c, uint8_t* dst, int index, int row_bytes) {
        bulk_store_from_shared(dst + static_cast<size_t>(index) * shape_.stage_bytes,
                               stage_address(c % shape_.stages), static_cast<uint32_t>(chunk_bytes(index, row_bytes)));
        bulk_commit_group();
        ++stored_;
    }

    // cp.async.bulk.wait_group takes an immediate: the instance for `newer` newer groups, or for N
    // when more are allowed (waiting a little longer is always correct).
    template <int N>
    __device__ __forceinline__ static void wait_stage_read(int newer) {
        if constexpr (N > 0) {
            if (newer < N) {
                wait_stage_read<N - 1>(newer);
                return;
            }
        }
        bulk_wait_group_read<N>();
    }

    // A bounded wait for the load of chunk `c` (local memory only: it can stall only on a fault).
    __device__ bool wait_loaded(int c, const FailureContext& fail, int kernel, int peer, int channel) const {
        const uint32_t bar = barrier(c % shape_.stages);
        const uint32_t parity = static_cast<uint32_t>(c / shape_.stages) & 1u;
        if (mbarrier_try_wait_parity(bar, parity))
            return true;
        const uint64_t start = global_timer_ns();
        while (!mbarrier_try_wait_parity(bar, parity)) {
            if (global_timer_ns() - start > fail.timeout_ns) {
                report_failure(fail, kErrorTimeout, kernel, peer, kWaitBulkCopy, channel, c, parity);
                return false;
            }
        }
        return true;
    }

    BulkPipelineShape shape_{1, 1, 16};
    uint32_t stages_ = 0, barriers_ = 0;
    int stored_ = 0;  // chunks stored so far = bulk groups committed
};

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
