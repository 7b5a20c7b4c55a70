// Bulk stores through the SM's copy engine (sm_90 `cp.async.bulk`, shared -> global). One thread
// hands a whole message to the copy engine, which writes it to global memory (a peer's, mapped
// over NVLink, included) as large transactions outside the SM's load/store pipeline: the SM's own
// loads do not queue behind those stores, while plain stores to a slow link hold them up.
// Sizes and both addresses must be multiples of 16. The copies run in the async proxy (PTX ISA,
// "Async Proxy"): shared memory written by ordinary stores needs fence_proxy_async_shared() by the
// writing threads before the copy is issued.
#pragma once

#include <cstdint>

namespace deep_ep {

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// Makes this thread's ordinary stores to shared memory visible to later async-proxy reads (a
// barrier then orders them before the thread that issues the copy).
__device__ __forceinline__ void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// Orders this thread's async-proxy writes of global memory with its later ordinary accesses.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;" ::: "memory"); }

// shared -> global; completion is tracked by bulk groups (bulk_commit_group).
__device__ __forceinline__ void bulk_store_from_shared(void* dst, const void* src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(__cvta_generic_to_global(dst)),
                 "r"(shared_address(src)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void bulk_commit_group() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until at most N of this thread's newest bulk groups are incomplete: the older ones have
// completed, their writes included, and a release by this thread afterwards publishes them (with
// fence_proxy_async_global() between).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// bulk_wait_group with a run-time count (the instruction takes an immediate): counts above
// kMaxBulkPending wait for more than asked, which is always correct.
constexpr int kMaxBulkPending = 7;
__device__ __forceinline__ void bulk_wait_group_at_most(int pending) {
    switch (pending < kMaxBulkPending ? pending : kMaxBulkPending) {
        case 0: bulk_wait_group<0>(); break;
        case 1: bulk_wait_group<1>(); break;
        case 2: bulk_wait_group<2>(); break;
        case 3: bulk_wait_group<3>(); break;
        case 4: bulk_wait_group<4>(); break;
        case 5: bulk_wait_group<5>(); break;
        case 6: bulk_wait_group<6>(); break;
        default: bulk_wait_group<7>(); break;
    }
}

}  // namespace deep_ep
