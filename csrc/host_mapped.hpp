// Host-mapped (zero-copy) memory: the error records and counters that kernels write through a
// device alias and the host polls without a copy. Every runtime allocates them the same way; each
// reports a failed call through its own error macro, so these return the CUDA status.
#pragma once

#include <cstddef>
#include <cstring>

#include <cuda_runtime.h>

namespace deep_ep {

// Allocates `count` zeroed T on the host, mapped for the device; `*device` is the kernels' alias.
template <typename T>
cudaError_t alloc_host_mapped(T** host, T** device, size_t count) {
    cudaError_t status = cudaHostAlloc(reinterpret_cast<void**>(host), sizeof(T) * count, cudaHostAllocMapped);
    if (status != cudaSuccess)
        return status;
    // Zeroed before any kernel can see it: a zero record or counter means "nothing yet".
    std::memset(*host, 0, sizeof(T) * count);
    return cudaHostGetDevicePointer(reinterpret_cast<void**>(device), *host, 0);
}

// Frees an allocation of alloc_host_mapped; both pointers are cleared once it is gone.
template <typename T>
cudaError_t free_host_mapped(T** host, T** device) {
    const cudaError_t status = cudaFreeHost(*host);
    if (status == cudaSuccess)
        *host = *device = nullptr;
    return status;
}

}  // namespace deep_ep
