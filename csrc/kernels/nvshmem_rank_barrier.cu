// A device-side barrier of the low-latency runtime's ranks, for lining up kernel starts.
//
// NVSHMEM's barrier on a stream leaves its ranks microseconds apart (measured: one rank left it
// ~2 us after the others, as the NCCL all-reduce did), and a benchmark whose ranks start apart
// times the latest rank's lateness into the earliest rank's kernel. Here every rank sets its
// flag on every rank and waits for all of them, twice: after the first round the ranks leave
// within one flag latency of each other (the last to arrive sees the others' flags at once);
// in the second they all arrive within that spread, and each leaves once the flags of the
// others, sent at about the same time, have crossed once.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "internode_ll_api.cuh"
#include "nvshmem_utils.cuh"

namespace deep_ep {
namespace ll {
namespace {

constexpr int kRounds = 2;
constexpr int kBarrierThreads = 32;

__global__ void rank_barrier_kernel(Context ctx, unsigned long long* flags, unsigned long long call) {
    __shared__ int s_failed;
    if (threadIdx.x == 0) s_failed = 0;
    __syncthreads();
    for (int round = 0; round < kRounds; ++round) {
        unsigned long long* row = flags + static_cast<size_t>(round) * ctx.num_ranks;  // [source rank]
        for (int pe = threadIdx.x; pe < ctx.num_ranks; pe += blockDim.x) {
            if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + pe) != 0) continue;
            nvshmemx_signal_op(reinterpret_cast<uint64_t*>(row + ctx.rank), call, NVSHMEM_SIGNAL_SET, pe);
        }
        for (int pe = threadIdx.x; pe < ctx.num_ranks; pe += blockDim.x) {
            if (ctx.enable_shrink && *reinterpret_cast<volatile int*>(ctx.mask + pe) != 0) continue;
            unsigned long long seen = 0, waited = 0;
            if (wait_counter_at_least(row + pe, call, ctx.timeout_ns, &seen, &waited) != kWaitOk) {
                report_timeout(ctx.error, ctx.rank, kKernelRankBarrier, pe, call, seen, waited);
                s_failed = 1;
                break;  // one timeout is enough
            }
        }
        __syncthreads();  // every flag of this round seen before the next round's are set
        if (s_failed != 0) return;  // the host raises
    }
}

}  // namespace

cudaError_t launch_rank_barrier(const Context& ctx, unsigned long long* flags, unsigned long long call,
                                cudaStream_t stream) {
    rank_barrier_kernel<<<1, kBarrierThreads, 0, stream>>>(ctx, flags, call);
    return cudaGetLastError();
}

}  // namespace ll
}  // namespace deep_ep
