// NVSHMEM host calls of the low-latency runtime: unique-id bootstrap, symmetric allocation,
// peer mapping, barriers, finalize. Kept in a .cu so the NVSHMEM headers see nvcc.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>

#include "internode_ll_api.cuh"

namespace deep_ep {
namespace ll {

size_t nvshmem_unique_id_bytes() { return sizeof(nvshmemx_uniqueid_t); }

int nvshmem_get_unique_id(void* out) {
    nvshmemx_uniqueid_t unique_id = NVSHMEMX_UNIQUEID_INITIALIZER;
    const int status = nvshmemx_get_uniqueid(&unique_id);
    std::memcpy(out, &unique_id, sizeof(unique_id));
    return status;
}

int nvshmem_init_with_unique_id(const void* unique_id_bytes, int rank, int num_ranks) {
    nvshmemx_uniqueid_t unique_id = NVSHMEMX_UNIQUEID_INITIALIZER;
    std::memcpy(&unique_id, unique_id_bytes, sizeof(unique_id));
    nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
    int status = nvshmemx_set_attr_uniqueid_args(rank, num_ranks, &unique_id, &attr);
    if (status != 0) return status;
    return nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
}

void* nvshmem_alloc(size_t bytes) { return nvshmem_malloc(bytes); }

void nvshmem_release(void* ptr) { nvshmem_free(ptr); }

void* nvshmem_peer_ptr(void* ptr, int pe) { return nvshmem_ptr(ptr, pe); }

void nvshmem_barrier_all_host() { nvshmem_barrier_all(); }

void nvshmem_barrier_on_stream(cudaStream_t stream) { nvshmemx_barrier_all_on_stream(stream); }

void nvshmem_finalize_runtime() { nvshmem_finalize(); }

int nvshmem_my_pe_id() { return nvshmem_my_pe(); }

}  // namespace ll
}  // namespace deep_ep
