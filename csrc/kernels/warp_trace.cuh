// Development trace of the high-throughput kernels (intranode and the internode rail legs): where
// each warp's time goes, which no profiler shows across ranks (a wait for a peer looks like work).
// Built in only with KERNEL_TRACE=1 (build_config.py: -DDEEP_EP_KERNEL_TRACE); without it
// WarpTrace is an empty type whose marks are no-ops, so they cost nothing, even across calls the
// compiler does not inline. When built
// in and enabled by the host, lane 0 of every warp adds the SM cycles of each activity into the
// block's shared row, and the warp adds that row into the kernel family's global table at its end
// (summed over the warps of a block and over the calls). Process-wide, one call at a time.
#pragma once

namespace deep_ep {

// Activities (columns of a block's row). Which ones a kernel marks, and what a "wait" or a
// "publish" is for it, is listed where its table is printed (tests/test_intranode.py,
// tests/test_internode.py).
constexpr int kWarpTraceSlots = 8;
constexpr int kTraceTotal = 0;    // the warp's lifetime in the kernel
constexpr int kTraceWait = 1;     // waits for a peer (free ring slots, ring data, metadata)
constexpr int kTraceData = 2;     // row copies (sender: into the ring; receiver: out of it) or sums
constexpr int kTracePublish = 3;  // tail publishes, head releases (and the barrier before them)
constexpr int kTraceBatch = 4;    // opening waits, batch numbering and its barrier
constexpr int kTraceLocal = 5;    // rows that stay on the GPU (own-rank / own-node copies)
constexpr int kTraceItems = 6;    // rows moved (a count, not cycles)

}  // namespace deep_ep

#ifdef __CUDACC__
#include "utils.cuh"

namespace deep_ep {

#ifdef DEEP_EP_KERNEL_TRACE
struct WarpTrace {
    unsigned long long* row;  // this warp's accumulators in shared memory; null when off
    __device__ __forceinline__ long long now() const { return row != nullptr ? clock64() : 0; }
    __device__ __forceinline__ void add(int slot, long long since) const {
        if (row != nullptr && lane_id() == 0)
            row[slot] += static_cast<unsigned long long>(clock64() - since);
    }
    __device__ __forceinline__ void count(int slot) const {
        if (row != nullptr && lane_id() == 0)
            row[slot] += 1ull;
    }
};

// The kernel's start, by every warp: its trace (a zeroed row of `rows`, [warps][kWarpTraceSlots]
// in shared memory), or a null one when the host has not enabled tracing.
__device__ __forceinline__ WarpTrace open_warp_trace(unsigned long long (*rows)[kWarpTraceSlots], bool on) {
    const int warp = threadIdx.x / kWarpSize;
    if (on && lane_id() < kWarpTraceSlots)
        rows[warp][lane_id()] = 0ull;
    __syncwarp();
    return WarpTrace{on ? rows[warp] : nullptr};
}

// The kernel's end, by every warp: its sums into `block_row` (the block's row of the global table).
__device__ __forceinline__ void close_warp_trace(const WarpTrace& trace, unsigned long long* block_row) {
    __syncwarp();
    if (trace.row != nullptr && lane_id() < kWarpTraceSlots)
        atomicAdd(block_row + lane_id(), trace.row[lane_id()]);
}
#else
// Not built in: every mark is a no-op.
struct WarpTrace {
    __device__ __forceinline__ long long now() const { return 0; }
    __device__ __forceinline__ void add(int, long long) const {}
    __device__ __forceinline__ void count(int) const {}
};
__device__ __forceinline__ WarpTrace open_warp_trace(unsigned long long (*)[kWarpTraceSlots], bool) { return {}; }
__device__ __forceinline__ void close_warp_trace(const WarpTrace&, unsigned long long*) {}
#endif

// Host: zeroes a kernel family's table (a __device__ array of unsigned long long) and sets its
// "enabled" flag (a __device__ int); copies the table out with the SM clock (current device).
template <typename Table>
cudaError_t reset_warp_trace(Table& table, int& enabled, bool enable) {
    static const Table zeros = {};
    const int flag = enable ? 1 : 0;
    cudaError_t status = cudaMemcpyToSymbol(table, zeros, sizeof(Table));
    if (status == cudaSuccess)
        status = cudaMemcpyToSymbol(enabled, &flag, sizeof(flag));
    return status;
}

template <typename Table>
cudaError_t read_warp_trace(Table& table, unsigned long long* cycles, int* clock_khz) {
    cudaError_t status = cudaMemcpyFromSymbol(cycles, table, sizeof(Table));
    int device = 0;
    if (status == cudaSuccess)
        status = cudaGetDevice(&device);
    if (status == cudaSuccess)
        status = cudaDeviceGetAttribute(clock_khz, cudaDevAttrClockRate, device);
    return status;
}

}  // namespace deep_ep
#endif  // __CUDACC__
