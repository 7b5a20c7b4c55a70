// get_dispatch_layout: per-rank and per-expert token counts and the token-to-rank map.
#include <cstdint>

#include "api.cuh"
#include "launch.cuh"

namespace deep_ep {
namespace {

constexpr int kLayoutThreads = 256;
constexpr int kLayoutMaxRanks = 64;
// Per-expert histograms stay in shared memory up to this many experts, else go to global atomics.
constexpr int kLayoutMaxSharedExperts = 8192;

__global__ void __launch_bounds__(kLayoutThreads) get_dispatch_layout_kernel(LayoutArgs args) {
    extern __shared__ int s_expert_counts[];
    __shared__ int s_rank_counts[kLayoutMaxRanks];
    const bool shared_experts = args.num_experts <= kLayoutMaxSharedExperts;
    if (shared_experts)
        for (int e = threadIdx.x; e < args.num_experts; e += blockDim.x)
            s_expert_counts[e] = 0;
    for (int r = threadIdx.x; r < kLayoutMaxRanks; r += blockDim.x)
        s_rank_counts[r] = 0;
    __syncthreads();

    const int experts_per_rank = args.num_experts / args.num_ranks;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < args.num_tokens; t += gridDim.x * blockDim.x) {
        uint64_t rank_mask = 0;
        for (int k = 0; k < args.num_topk; ++k) {
            const int64_t e = args.topk_idx[static_cast<int64_t>(t) * args.num_topk + k];
            // Out-of-range ids are dropped (Buffer only checks ranges where a host sync is allowed).
            if (e < 0 || e >= args.num_experts)
                continue;
            if (shared_experts)
                atomicAdd(&s_expert_counts[e], 1);
            else
                atomicAdd(&args.num_tokens_per_expert[e], 1);
            rank_mask |= 1ull << (e / experts_per_rank);
        }
        for (int r = 0; r < args.num_ranks; ++r) {
            const bool in_rank = (rank_mask >> r) & 1ull;
            args.is_token_in_rank[static_cast<int64_t>(t) * args.num_ranks + r] = in_rank;
            if (in_rank)
                atomicAdd(&s_rank_counts[r], 1);
        }
    }
    __syncthreads();
    if (shared_experts)
        for (int e = threadIdx.x; e < args.num_experts; e += blockDim.x)
            if (s_expert_counts[e] != 0)
                atomicAdd(&args.num_tokens_per_expert[e], s_expert_counts[e]);
    for (int r = threadIdx.x; r < args.num_ranks; r += blockDim.x)
        if (s_rank_counts[r] != 0)
            atomicAdd(&args.num_tokens_per_rank[r], s_rank_counts[r]);
}

__global__ void __launch_bounds__(kLayoutThreads) check_dispatch_values_kernel(DispatchCheckArgs args) {
    __shared__ int s_rank_counts[kMaxRanks];
    __shared__ int s_bad;
    if (threadIdx.x < kMaxRanks)
        s_rank_counts[threadIdx.x] = 0;
    if (threadIdx.x == 0)
        s_bad = 0;
    __syncthreads();

    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    bool bad = false;
    if (args.topk_idx != nullptr) {
        const int64_t num_ids = static_cast<int64_t>(args.num_tokens) * args.num_topk;
        for (int64_t i = first; i < num_ids; i += stride) {
            const int64_t e = args.topk_idx[i];
            bad |= e < -1 || e >= args.num_experts;
        }
    }
    const int64_t num_cells = static_cast<int64_t>(args.num_tokens) * args.num_ranks;
    for (int64_t i = first; i < num_cells; i += stride)
        if (args.is_token_in_rank[i])
            atomicAdd(&s_rank_counts[i % args.num_ranks], 1);
    if (bad)
        s_bad = 1;  // every writer stores the same value
    __syncthreads();
    if (threadIdx.x == 0 && s_bad != 0)
        args.scratch[0] = kCheckBadTopk;
    if (threadIdx.x < args.num_ranks && s_rank_counts[threadIdx.x] != 0)
        atomicAdd(&args.scratch[1 + threadIdx.x], s_rank_counts[threadIdx.x]);
}

int layout_blocks(int64_t work) {
    const int64_t blocks = ceil_div<int64_t>(work, kLayoutThreads);
    return static_cast<int>(blocks < 132 ? blocks : 132);
}

}  // namespace

void launch_check_dispatch_values(const DispatchCheckArgs& args, cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(args.num_ranks >= 1 && args.num_ranks <= kMaxRanks, "value checks support 1..8 ranks");
    const int64_t work = static_cast<int64_t>(args.num_tokens) *
                         (args.num_topk > args.num_ranks ? args.num_topk : args.num_ranks);
    if (work == 0)
        return;
    check_dispatch_values_kernel<<<layout_blocks(work), kLayoutThreads, 0, stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

void launch_get_dispatch_layout(const LayoutArgs& args, cudaStream_t stream) {
    DEEP_EP_HOST_ASSERT(args.num_ranks >= 1 && args.num_ranks <= kLayoutMaxRanks, "layout supports 1..64 ranks");
    DEEP_EP_HOST_ASSERT(args.num_experts % args.num_ranks == 0, "num_experts must be a multiple of num_ranks");
    DEEP_EP_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_rank, 0, sizeof(int) * args.num_ranks, stream));
    DEEP_EP_CUDA_CHECK(cudaMemsetAsync(args.num_tokens_per_expert, 0, sizeof(int) * args.num_experts, stream));
    if (args.num_tokens == 0)
        return;
    const int num_blocks = layout_blocks(args.num_tokens);
    const size_t shared_bytes =
        args.num_experts <= kLayoutMaxSharedExperts ? sizeof(int) * static_cast<size_t>(args.num_experts) : 0;
    get_dispatch_layout_kernel<<<num_blocks, kLayoutThreads, shared_bytes, stream>>>(args);
    DEEP_EP_LAUNCH_CHECK();
}

}  // namespace deep_ep
