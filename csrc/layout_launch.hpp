// get_dispatch_layout as every runtime runs it: the tensor checks, then the layout kernel on the
// current stream (the caller selects the device).
#pragma once

#include <cstdint>

#include <ATen/cuda/CUDAContext.h>
#include <torch/types.h>

#include "kernels/api.cuh"
#include "tensor_checks.hpp"

namespace deep_ep {

inline void launch_dispatch_layout(const torch::Tensor& topk_idx, int num_experts, int num_ranks,
                                   const torch::Tensor& num_tokens_per_rank,
                                   const torch::Tensor& num_tokens_per_expert, const torch::Tensor& is_token_in_rank) {
    check_cuda_tensor(topk_idx, "topk_idx", torch::kInt64);
    check_cuda_tensor(num_tokens_per_rank, "num_tokens_per_rank", torch::kInt32);
    check_cuda_tensor(num_tokens_per_expert, "num_tokens_per_expert", torch::kInt32);
    check_cuda_tensor(is_token_in_rank, "is_token_in_rank", torch::kBool);
    DEEP_EP_HOST_ASSERT(topk_idx.dim() == 2, "topk_idx must be 2-D");
    check_numel(num_tokens_per_rank, num_ranks, "num_tokens_per_rank");
    check_numel(num_tokens_per_expert, num_experts, "num_tokens_per_expert");
    check_numel(is_token_in_rank, topk_idx.size(0) * num_ranks, "is_token_in_rank");
    LayoutArgs args;
    args.topk_idx = topk_idx.data_ptr<int64_t>();
    args.num_tokens = static_cast<int>(topk_idx.size(0));
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.num_experts = num_experts;
    args.num_ranks = num_ranks;
    args.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    args.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    args.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    launch_get_dispatch_layout(args, at::cuda::getCurrentCUDAStream());
}

}  // namespace deep_ep
