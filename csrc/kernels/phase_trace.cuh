// Phase trace of the low-latency kernels: a development tool that says where a kernel's time goes
// (which no profiler shows across ranks). Off unless the host enables it (ll::trace_reset); then
// one thread of every block (thread 0, or the `marker` a mark names: the first receiving thread
// while warp 0 still sends) adds, at each marked point, the SM cycles since its block started into
// g_trace_cycles[kernel][block][point], and block 0 counts the calls at the end. Costs one cached
// load per mark when off. Not for production use: process-wide, one kernel of a kind at a time.
#pragma once

#include "internode_ll_api.cuh"

namespace deep_ep {
namespace ll {

constexpr int kTraceDispatch = 0;
constexpr int kTraceCombine = 1;
// Point marked by every send (both kernels), before the block barrier that precedes its signals.
constexpr int kTraceFenced = 10;

// Internal to the one translation unit that includes this header (the kernels are built with
// -rdc: external symbols would clash if a second one did).
namespace {
__device__ int g_trace_enabled;
__device__ unsigned long long g_trace_cycles[kTraceKernels][kMaxBlocks][kTracePoints];
__device__ unsigned long long g_trace_calls[kTraceKernels];
__shared__ long long s_trace_start;
}  // namespace

// First thing of a traced kernel, by every thread (thread 0 takes the time; the kernel's first
// barrier publishes it).
__device__ __forceinline__ void trace_start() {
    if (threadIdx.x == 0) s_trace_start = clock64();
}

__device__ __forceinline__ void trace_mark(int kernel, int point, int marker = 0) {
    if (static_cast<int>(threadIdx.x) == marker && g_trace_enabled != 0)
        g_trace_cycles[kernel][blockIdx.x][point] += static_cast<unsigned long long>(clock64() - s_trace_start);
}

// A mark that waits for a load: `value` must be used for the time to include its arrival.
__device__ __forceinline__ void trace_mark_loaded(int kernel, int point, int value, int marker = 0) {
    if (static_cast<int>(threadIdx.x) == marker && g_trace_enabled != 0) {
        asm volatile("" ::"r"(value));
        g_trace_cycles[kernel][blockIdx.x][point] += static_cast<unsigned long long>(clock64() - s_trace_start);
    }
}

__device__ __forceinline__ void trace_call_done(int kernel) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && g_trace_enabled != 0) g_trace_calls[kernel] += 1ull;
}

}  // namespace ll
}  // namespace deep_ep
