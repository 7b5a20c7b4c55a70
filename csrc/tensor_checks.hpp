// Host-side checks of the tensors a runtime hands to the kernels, shared by every runtime that
// reports through DEEP_EP_HOST_ASSERT.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include <torch/types.h>

#include "kernels/exception.cuh"

namespace deep_ep {

inline void check_cuda_tensor(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
    DEEP_EP_HOST_ASSERT(t.is_cuda(), std::string(name) + " must be a CUDA tensor");
    DEEP_EP_HOST_ASSERT(t.scalar_type() == dtype, std::string(name) + " has the wrong dtype");
    DEEP_EP_HOST_ASSERT(t.is_contiguous(), std::string(name) + " must be contiguous");
}

// The data pointer of an optional tensor (null when absent), after the checks above.
template <typename T>
T* optional_ptr(const std::optional<torch::Tensor>& t, const char* name, torch::ScalarType dtype) {
    if (!t.has_value())
        return nullptr;
    check_cuda_tensor(*t, name, dtype);
    return reinterpret_cast<T*>(t->data_ptr());
}

inline void check_numel(const torch::Tensor& t, int64_t numel, const char* name) {
    DEEP_EP_HOST_ASSERT(t.numel() == numel, std::string(name) + " must have " + std::to_string(numel) + " elements");
}

// The routing map of a dispatch or combine: bool [num_tokens, num_ranks].
inline void check_token_rank_map(const torch::Tensor& is_token_in_rank, int64_t num_tokens, int num_ranks) {
    check_cuda_tensor(is_token_in_rank, "is_token_in_rank", torch::kBool);
    DEEP_EP_HOST_ASSERT(is_token_in_rank.dim() == 2 && is_token_in_rank.size(0) == num_tokens &&
                            is_token_in_rank.size(1) == num_ranks,
                        "is_token_in_rank must be [num_tokens, num_ranks]");
}

// The optional bf16 biases a combine adds to its output rows, each shaped like `combined_x`.
inline void check_biases(const std::optional<torch::Tensor>& bias0, const std::optional<torch::Tensor>& bias1,
                         const torch::Tensor& combined_x) {
    for (const auto* bias : {&bias0, &bias1}) {
        if (bias->has_value()) {
            check_cuda_tensor(**bias, "bias", torch::kBFloat16);
            DEEP_EP_HOST_ASSERT((*bias)->sizes() == combined_x.sizes(), "bias must be [num_tokens, hidden]");
        }
    }
}

// FP8 scales as the kernels read them: any strides, element (t, g) at
// t * token_stride + g * hidden_stride. All zero / null without scales.
struct StridedScales {
    const float* data = nullptr;
    int64_t token_stride = 0, hidden_stride = 0;
    int num_scales = 0;
};

inline StridedScales read_strided_scales(const std::optional<torch::Tensor>& x_scales, int64_t num_tokens) {
    StridedScales scales;
    if (!x_scales.has_value())
        return scales;
    DEEP_EP_HOST_ASSERT(x_scales->is_cuda() && x_scales->scalar_type() == torch::kFloat32 && x_scales->dim() == 2 &&
                            x_scales->size(0) == num_tokens,
                        "x_scales must be float32 [num_tokens, num_scales]");
    scales.data = x_scales->data_ptr<float>();
    scales.token_stride = x_scales->stride(0);
    scales.hidden_stride = x_scales->stride(1);
    scales.num_scales = static_cast<int>(x_scales->size(1));
    return scales;
}

}  // namespace deep_ep
