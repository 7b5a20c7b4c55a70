// The fields that the high-throughput dispatch and combine argument structs of the intranode
// (kernels/api.cuh) and internode (kernels/internode_api.cuh) kernels have in common, checked and
// filled one way for both runtimes so that their conventions cannot drift apart. Each runtime
// fills the rest itself: where the rows go (receive buffer or rail staging) and its rings.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <torch/types.h>

#include "kernels/exception.cuh"
#include "tensor_checks.hpp"

namespace deep_ep {

// A dispatch's optional inputs come with their outputs (`recv_*`: the receive buffer of the
// intranode path, the staging rows of the internode rail), and the experts split evenly over the
// ranks.
inline void check_dispatch_options(const std::optional<torch::Tensor>& x_scales,
                                   const std::optional<torch::Tensor>& recv_x_scales,
                                   const std::optional<torch::Tensor>& topk_idx,
                                   const std::optional<torch::Tensor>& topk_weights,
                                   const std::optional<torch::Tensor>& recv_topk_idx,
                                   const std::optional<torch::Tensor>& recv_topk_weights, int num_experts,
                                   int num_ranks) {
    DEEP_EP_HOST_ASSERT(topk_idx.has_value() == topk_weights.has_value() &&
                            topk_idx.has_value() == recv_topk_idx.has_value() &&
                            topk_idx.has_value() == recv_topk_weights.has_value(),
                        "top-k inputs and outputs go together");
    DEEP_EP_HOST_ASSERT(x_scales.has_value() == recv_x_scales.has_value(), "scales in and out go together");
    DEEP_EP_HOST_ASSERT(num_experts >= num_ranks && num_experts % num_ranks == 0,
                        "num_experts must be a multiple of num_ranks");
}

// The sending side of a dispatch: the rows of `x` (any dtype; the kernels move bytes), their
// optional FP8 scales (any strides) and top-k choices, and where each token goes.
template <typename Args>
void set_dispatch_source(Args& args, const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                         const std::optional<torch::Tensor>& topk_idx,
                         const std::optional<torch::Tensor>& topk_weights, const torch::Tensor& is_token_in_rank) {
    args.x = static_cast<const uint8_t*>(x.data_ptr());
    args.num_tokens = static_cast<int>(x.size(0));
    args.hidden_bytes = static_cast<int>(x.size(1) * x.element_size());
    const StridedScales scales = read_strided_scales(x_scales, x.size(0));
    args.x_scales = scales.data;
    args.scale_token_stride = scales.token_stride;
    args.scale_hidden_stride = scales.hidden_stride;
    args.num_scales = scales.num_scales;
    args.topk_idx = optional_ptr<const int64_t>(topk_idx, "topk_idx", torch::kInt64);
    args.topk_weights = optional_ptr<const float>(topk_weights, "topk_weights", torch::kFloat32);
    args.num_topk = topk_idx.has_value() ? static_cast<int>(topk_idx->size(1)) : 0;
    args.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
}

// A combine reduces bf16 rows `x` (called `x_name` in messages) into bf16 `combined_x`
// [num_tokens, hidden] of the same hidden size.
inline void check_combine_rows(const torch::Tensor& x, const char* x_name, const torch::Tensor& combined_x) {
    check_cuda_tensor(x, x_name, torch::kBFloat16);
    check_cuda_tensor(combined_x, "combined_x", torch::kBFloat16);
    DEEP_EP_HOST_ASSERT(x.dim() == 2 && combined_x.dim() == 2 && x.size(1) == combined_x.size(1),
                        std::string(x_name) + " and combined_x must be [rows, hidden] and [num_tokens, hidden]");
}

// The home side of a combine (after check_combine_rows, check_token_rank_map and check_biases):
// the output rows and weights, the biases added to them, and where each token went.
template <typename Args>
void set_combine_home(Args& args, const torch::Tensor& combined_x,
                      const std::optional<torch::Tensor>& combined_topk_weights,
                      const torch::Tensor& is_token_in_rank, const std::optional<torch::Tensor>& bias0,
                      const std::optional<torch::Tensor>& bias1) {
    args.combined_x = static_cast<uint8_t*>(combined_x.data_ptr());
    args.combined_topk_weights = optional_ptr<float>(combined_topk_weights, "combined_topk_weights", torch::kFloat32);
    args.num_tokens = static_cast<int>(combined_x.size(0));
    args.hidden = static_cast<int>(combined_x.size(1));
    args.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    args.bias0 = bias0.has_value() ? static_cast<const uint8_t*>(bias0->data_ptr()) : nullptr;
    args.bias1 = bias1.has_value() ? static_cast<const uint8_t*>(bias1->data_ptr()) : nullptr;
}

}  // namespace deep_ep
