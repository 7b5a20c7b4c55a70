// Launch helpers: every launch is followed by a check of the launch itself.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>

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

// A development switch from the environment: its integer value, or `fallback` when unset. Callers
// read it once (a function-local static); every rank of a job must see the same value.
inline int env_int(const char* name, int fallback) {
    const char* value = std::getenv(name);
    return value != nullptr ? std::atoi(value) : fallback;
}

}  // namespace deep_ep
