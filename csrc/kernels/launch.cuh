// Launch helpers: every launch is followed by a check of the launch itself.
#pragma once

#include <cuda_runtime.h>

#include "exception.cuh"

#define DEEP_EP_LAUNCH_CHECK() DEEP_EP_CUDA_CHECK(cudaGetLastError())

namespace deep_ep {

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

template <typename T>
__host__ __device__ constexpr T align_up(T a, T b) {
    return ceil_div(a, b) * b;
}

}  // namespace deep_ep
