// Runtime kernels: the cross-rank barrier over the NVLink buffers.
#include "api.cuh"
#include "buffer.cuh"
#include "launch.cuh"

namespace deep_ep {
namespace {

__global__ void intranode_barrier_kernel(PeerBuffers buffers, int rank, int num_ranks, FailureContext fail) {
    barrier_block(buffers, rank, num_ranks, fail, kKernelBarrier);
}

}  // namespace

void launch_intranode_barrier(const PeerBuffers& buffers, int rank, int num_ranks, const FailureContext& fail,
                              cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(num_ranks >= 1 && num_ranks <= kMaxRanks, "intranode supports 1..8 ranks");
    intranode_barrier_kernel<<<1, kWarpSize, 0, stream>>>(buffers, rank, num_ranks, fail);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
