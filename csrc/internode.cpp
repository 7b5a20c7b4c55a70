// The internode runtime (see internode.hpp). Host side only: argument checks, the NVSHMEM
// allocation, launches on the caller's current stream.
#include "internode.hpp"

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "dispatch_combine_args.hpp"
#include "host_mapped.hpp"
#include "kernels/exception.cuh"
#include "layout_launch.hpp"
#include "tensor_checks.hpp"

namespace deep_ep {

InternodeRuntime::InternodeRuntime(int rank, int num_ranks, int nvl_domain_size, const std::string& unique_id,
                                   int64_t num_rdma_bytes, double timeout_s)
    : rank_(rank), num_ranks_(num_ranks), nvl_size_(nvl_domain_size), num_rdma_bytes_(num_rdma_bytes) {
    DEEP_EP_HOST_ASSERT(rank >= 0 && rank < num_ranks, "rank out of range");
    DEEP_EP_HOST_ASSERT(nvl_domain_size >= 1 && nvl_domain_size <= internode::kMaxNodeRanks &&
                            num_ranks % nvl_domain_size == 0,
                        "nvl_domain_size must divide num_ranks and be at most 8");
    num_nodes_ = num_ranks / nvl_domain_size;
    DEEP_EP_HOST_ASSERT(num_nodes_ >= 2 && num_nodes_ <= internode::kMaxNodes,
                        "the internode kernels need 2.." + std::to_string(internode::kMaxNodes) + " nodes");
    DEEP_EP_HOST_ASSERT(timeout_s > 0, "timeout must be positive");
    timeout_ns_ = static_cast<uint64_t>(timeout_s * 1e9);
    layout_ = internode::make_layout(num_ranks, static_cast<size_t>(num_rdma_bytes));
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device_));

    if (!unique_id.empty()) {
        DEEP_EP_HOST_ASSERT(unique_id.size() == ll::nvshmem_unique_id_bytes(), "malformed NVSHMEM unique id");
        const int status = ll::nvshmem_init_with_unique_id(unique_id.data(), rank, num_ranks);
        if (status != 0)
            throw std::runtime_error("deep_ep internode: NVSHMEM initialization failed with status " +
                                     std::to_string(status));
        owns_nvshmem_ = true;
    }
    DEEP_EP_HOST_ASSERT(ll::nvshmem_my_pe_id() == rank, "the NVSHMEM PE differs from the rank");
    heap_ = static_cast<uint8_t*>(ll::nvshmem_alloc(static_cast<size_t>(num_rdma_bytes)));
    if (heap_ == nullptr)
        throw std::runtime_error("deep_ep internode: nvshmem_malloc of " + std::to_string(num_rdma_bytes) +
                                 " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE)");
    DEEP_EP_CUDA_CHECK(cudaMemset(heap_, 0, layout_.data_offset));
    DEEP_EP_CUDA_CHECK(cudaMalloc(&state_, sizeof(internode::State)));
    DEEP_EP_CUDA_CHECK(cudaMemset(state_, 0, sizeof(internode::State)));
    DEEP_EP_CUDA_CHECK(cudaMalloc(&abort_flag_, sizeof(int)));
    DEEP_EP_CUDA_CHECK(cudaMemset(abort_flag_, 0, sizeof(int)));
    DEEP_EP_CUDA_CHECK(alloc_host_mapped(&error_host_, &error_device_, 1));
    DEEP_EP_CUDA_CHECK(alloc_host_mapped(&counters_host_, &counters_device_, internode::kHostCounterInts));
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    // Nobody writes into a peer before that peer has zeroed its control area.
    ll::nvshmem_barrier_all_host();
}

InternodeRuntime::~InternodeRuntime() noexcept {
    if (!destroyed_) {
        try {
            destroy(false);
        } catch (...) {
            // Destructors must not throw; destroy() is normally called explicitly.
        }
    }
}

pybind11::bytes InternodeRuntime::get_unique_id() {
    std::string bytes(ll::nvshmem_unique_id_bytes(), '\0');
    const int status = ll::nvshmem_get_unique_id(bytes.data());
    if (status != 0)
        throw std::runtime_error("deep_ep internode: nvshmemx_get_uniqueid failed with status " +
                                 std::to_string(status));
    return pybind11::bytes(bytes);
}

internode::Context InternodeRuntime::context() const {
    internode::Context ctx;
    ctx.rank = rank_;
    ctx.num_ranks = num_ranks_;
    ctx.nvl_size = nvl_size_;
    ctx.num_nodes = num_nodes_;
    ctx.node = rank_ / nvl_size_;
    ctx.local_rank = rank_ % nvl_size_;
    ctx.heap = heap_;
    ctx.layout = layout_;
    ctx.state = state_;
    ctx.fail.record = error_device_;
    ctx.fail.abort_flag = abort_flag_;
    ctx.fail.timeout_ns = timeout_ns_;
    ctx.fail.rank = rank_;
    return ctx;
}

void InternodeRuntime::check_usable() const {
    DEEP_EP_HOST_ASSERT(!destroyed_, "the internode runtime has been destroyed");
    if (error_recorded(error_host_))
        throw std::runtime_error("deep_ep: the internode buffer failed earlier (see the error record); it cannot be used");
}

void InternodeRuntime::get_dispatch_layout(const torch::Tensor& topk_idx, int num_experts,
                                           const torch::Tensor& num_tokens_per_rank,
                                           const torch::Tensor& num_tokens_per_expert,
                                           const torch::Tensor& is_token_in_rank) {
    const c10::cuda::CUDAGuard guard(device_);
    launch_dispatch_layout(topk_idx, num_experts, num_ranks_, num_tokens_per_rank, num_tokens_per_expert,
                           is_token_in_rank);
}

void InternodeRuntime::notify(const torch::Tensor& num_tokens_per_rank, const torch::Tensor& num_tokens_per_expert,
                              const torch::Tensor& is_token_in_rank, int expert_alignment,
                              const torch::Tensor& recv_from_rank, const torch::Tensor& recv_rank_prefix,
                              const torch::Tensor& rail_prefix, const torch::Tensor& rail_src_num_tokens,
                              const torch::Tensor& forward_counts, bool write_host) {
    check_usable();
    check_cuda_tensor(num_tokens_per_rank, "num_tokens_per_rank", torch::kInt32);
    check_cuda_tensor(num_tokens_per_expert, "num_tokens_per_expert", torch::kInt32);
    check_cuda_tensor(is_token_in_rank, "is_token_in_rank", torch::kBool);
    check_cuda_tensor(recv_from_rank, "recv_from_rank", torch::kInt32);
    check_cuda_tensor(recv_rank_prefix, "recv_rank_prefix", torch::kInt32);
    check_cuda_tensor(rail_prefix, "rail_prefix", torch::kInt32);
    check_cuda_tensor(rail_src_num_tokens, "rail_src_num_tokens", torch::kInt32);
    check_cuda_tensor(forward_counts, "forward_counts", torch::kInt32);
    check_numel(num_tokens_per_rank, num_ranks_, "num_tokens_per_rank");
    DEEP_EP_HOST_ASSERT(is_token_in_rank.dim() == 2 && is_token_in_rank.size(1) == num_ranks_,
                        "is_token_in_rank must be [num_tokens, num_ranks]");
    check_numel(recv_from_rank, num_ranks_, "recv_from_rank");
    check_numel(recv_rank_prefix, num_ranks_ + 1, "recv_rank_prefix");
    check_numel(rail_prefix, num_nodes_ + 1, "rail_prefix");
    check_numel(rail_src_num_tokens, num_nodes_, "rail_src_num_tokens");
    check_numel(forward_counts, nvl_size_, "forward_counts");
    const c10::cuda::CUDAGuard guard(device_);
    internode::NotifyArgs args;
    args.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    args.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    args.is_token_in_rank = is_token_in_rank.data_ptr<bool>();
    args.num_tokens = static_cast<int>(is_token_in_rank.size(0));
    args.num_experts = static_cast<int>(num_tokens_per_expert.numel());
    args.expert_alignment = expert_alignment;
    args.recv_from_rank = recv_from_rank.data_ptr<int>();
    args.recv_rank_prefix = recv_rank_prefix.data_ptr<int>();
    args.rail_prefix = rail_prefix.data_ptr<int>();
    args.rail_src_num_tokens = rail_src_num_tokens.data_ptr<int>();
    args.forward_counts = forward_counts.data_ptr<int>();
    args.host_counters = write_host ? counters_device_ : nullptr;
    if (write_host)
        reinterpret_cast<volatile int*>(counters_host_)[0] = 0;
    launch_notify(context(), args, at::cuda::getCurrentCUDAStream());
}

std::tuple<bool, int, int, std::vector<int>> InternodeRuntime::wait_notify(int num_local_experts) {
    DEEP_EP_HOST_ASSERT(num_local_experts >= 0 && num_local_experts <= internode::kMaxLocalExperts,
                        "too many local experts");
    volatile int* counters = counters_host_;
    const auto start = std::chrono::steady_clock::now();
    const auto limit = std::chrono::nanoseconds(timeout_ns_);
    while (counters[0] == 0) {
        if (error_recorded(error_host_) || std::chrono::steady_clock::now() - start > limit)
            return std::make_tuple(false, 0, 0, std::vector<int>());
        std::this_thread::yield();
    }
    std::atomic_thread_fence(std::memory_order_acquire);
    std::vector<int> per_expert(num_local_experts);
    for (int e = 0; e < num_local_experts; ++e)
        per_expert[e] = counters[3 + e];
    return std::make_tuple(true, static_cast<int>(counters[1]), static_cast<int>(counters[2]), per_expert);
}

void InternodeRuntime::rail_dispatch(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                                     const std::optional<torch::Tensor>& topk_idx,
                                     const std::optional<torch::Tensor>& topk_weights,
                                     const torch::Tensor& is_token_in_rank, const torch::Tensor& rail_prefix,
                                     const torch::Tensor& staging_x, const std::optional<torch::Tensor>& staging_scales,
                                     const std::optional<torch::Tensor>& staging_topk_idx,
                                     const std::optional<torch::Tensor>& staging_topk_weights,
                                     const torch::Tensor& staging_src_token, const torch::Tensor& forward_in_rank,
                                     int num_experts, int num_sms, int send_chunk, int ring_capacity) {
    check_usable();
    DEEP_EP_HOST_ASSERT(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CUDA [T, H] tensor");
    DEEP_EP_HOST_ASSERT(staging_x.is_cuda() && staging_x.is_contiguous() && staging_x.dim() == 2 &&
                            staging_x.size(1) == x.size(1) && staging_x.scalar_type() == x.scalar_type(),
                        "staging_x must be [rows, H] like x");
    check_token_rank_map(is_token_in_rank, x.size(0), num_ranks_);
    check_cuda_tensor(rail_prefix, "rail_prefix", torch::kInt32);
    check_cuda_tensor(staging_src_token, "staging_src_token", torch::kInt32);
    check_cuda_tensor(forward_in_rank, "forward_in_rank", torch::kBool);
    check_numel(rail_prefix, num_nodes_ + 1, "rail_prefix");
    const int64_t rows = staging_x.size(0);
    check_numel(staging_src_token, rows, "staging_src_token");
    check_numel(forward_in_rank, rows * nvl_size_, "forward_in_rank");
    check_dispatch_options(x_scales, staging_scales, topk_idx, topk_weights, staging_topk_idx, staging_topk_weights,
                           num_experts, num_ranks_);

    internode::RailDispatchArgs args;
    set_dispatch_source(args, x, x_scales, topk_idx, topk_weights, is_token_in_rank);
    args.staging_scales = nullptr;
    if (x_scales.has_value()) {
        check_cuda_tensor(*staging_scales, "staging_scales", torch::kFloat32);
        check_numel(*staging_scales, rows * args.num_scales, "staging_scales");
        args.staging_scales = staging_scales->data_ptr<float>();
    }
    args.staging_topk_idx = optional_ptr<int64_t>(staging_topk_idx, "staging_topk_idx", torch::kInt64);
    args.staging_topk_weights = optional_ptr<float>(staging_topk_weights, "staging_topk_weights", torch::kFloat32);
    if (topk_idx.has_value()) {
        DEEP_EP_HOST_ASSERT(topk_idx->dim() == 2 && topk_idx->size(0) == x.size(0) &&
                                topk_weights->sizes() == topk_idx->sizes(),
                            "topk_idx and topk_weights must be [num_tokens, num_topk]");
        check_numel(*staging_topk_idx, rows * args.num_topk, "staging_topk_idx");
        check_numel(*staging_topk_weights, rows * args.num_topk, "staging_topk_weights");
    }
    args.num_experts = num_experts;
    args.rail_prefix = rail_prefix.data_ptr<int>();
    args.staging_x = static_cast<uint8_t*>(staging_x.data_ptr());
    args.staging_src_token = staging_src_token.data_ptr<int>();
    args.forward_in_rank = forward_in_rank.data_ptr<bool>();
    args.staging_rows = static_cast<int>(rows);
    args.slot = internode::make_dispatch_slot(args.hidden_bytes, args.num_scales, args.num_topk);
    args.rail = internode::make_rail_geometry(layout_, internode::kRailDispatch, num_nodes_, num_sms, send_chunk,
                                              ring_capacity, args.slot.bytes);
    const c10::cuda::CUDAGuard guard(device_);
    internode::launch_rail_dispatch(context(), args, at::cuda::getCurrentCUDAStream());
}

void InternodeRuntime::rail_combine(const torch::Tensor& partial, const std::optional<torch::Tensor>& partial_weights,
                                    const torch::Tensor& rail_prefix, const torch::Tensor& rail_src_num_tokens,
                                    const torch::Tensor& staging_src_token, const torch::Tensor& is_token_in_rank,
                                    const std::optional<torch::Tensor>& bias0,
                                    const std::optional<torch::Tensor>& bias1, const torch::Tensor& combined_x,
                                    const std::optional<torch::Tensor>& combined_topk_weights, int num_sms,
                                    int send_chunk, int ring_capacity) {
    check_usable();
    check_combine_rows(partial, "partial", combined_x);
    check_cuda_tensor(rail_prefix, "rail_prefix", torch::kInt32);
    check_cuda_tensor(rail_src_num_tokens, "rail_src_num_tokens", torch::kInt32);
    check_cuda_tensor(staging_src_token, "staging_src_token", torch::kInt32);
    const int64_t rows = partial.size(0);
    check_numel(staging_src_token, rows, "staging_src_token");
    check_numel(rail_prefix, num_nodes_ + 1, "rail_prefix");
    check_numel(rail_src_num_tokens, num_nodes_, "rail_src_num_tokens");
    check_token_rank_map(is_token_in_rank, combined_x.size(0), num_ranks_);
    DEEP_EP_HOST_ASSERT(partial_weights.has_value() == combined_topk_weights.has_value(),
                        "partial_weights and combined_topk_weights go together");
    check_biases(bias0, bias1, combined_x);
    internode::RailCombineArgs args;
    args.partial = static_cast<const uint8_t*>(partial.data_ptr());
    args.partial_weights = optional_ptr<const float>(partial_weights, "partial_weights", torch::kFloat32);
    set_combine_home(args, combined_x, combined_topk_weights, is_token_in_rank, bias0, bias1);
    args.num_topk = partial_weights.has_value() ? static_cast<int>(partial_weights->size(1)) : 0;
    if (partial_weights.has_value()) {
        DEEP_EP_HOST_ASSERT(partial_weights->dim() == 2 && partial_weights->size(0) == rows &&
                                combined_topk_weights->dim() == 2 &&
                                combined_topk_weights->size(0) == combined_x.size(0) &&
                                combined_topk_weights->size(1) == args.num_topk,
                            "top-k weight shapes disagree");
    }
    args.rail_prefix = rail_prefix.data_ptr<int>();
    args.rail_src_num_tokens = rail_src_num_tokens.data_ptr<int>();
    args.staging_src_token = staging_src_token.data_ptr<int>();
    args.staging_rows = static_cast<int>(rows);
    args.rail = internode::make_rail_geometry(layout_, internode::kRailCombine, num_nodes_, num_sms, send_chunk,
                                              ring_capacity, internode::combine_slot_bytes(args.hidden, args.num_topk));
    const c10::cuda::CUDAGuard guard(device_);
    internode::launch_rail_combine(context(), args, at::cuda::getCurrentCUDAStream());
}

std::optional<ErrorRecordTuple> InternodeRuntime::get_error() const {
    return read_error_record(error_host_);
}

void InternodeRuntime::destroy(bool failed) {
    if (destroyed_)
        return;
    destroyed_ = true;
    if (failed)
        return;  // a peer may still write into our memory, or never reach a collective
    const c10::cuda::CUDAGuard guard(device_);
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    ll::nvshmem_barrier_all_host();
    ll::nvshmem_release(heap_);
    heap_ = nullptr;
    if (owns_nvshmem_)
        ll::nvshmem_finalize_runtime();
    DEEP_EP_CUDA_CHECK(cudaFree(state_));
    DEEP_EP_CUDA_CHECK(cudaFree(abort_flag_));
    DEEP_EP_CUDA_CHECK(free_host_mapped(&error_host_, &error_device_));
    DEEP_EP_CUDA_CHECK(free_host_mapped(&counters_host_, &counters_device_));
    state_ = nullptr;
    abort_flag_ = nullptr;
}

void register_internode(pybind11::module_& m) {
    namespace py = pybind11;
    py::class_<InternodeRuntime>(m, "InternodeRuntime")
        .def(py::init<int, int, int, const std::string&, int64_t, double>(), py::arg("rank"), py::arg("num_ranks"),
             py::arg("nvl_domain_size"), py::arg("unique_id"), py::arg("num_rdma_bytes"), py::arg("timeout_s"))
        .def_static("get_unique_id", &InternodeRuntime::get_unique_id)
        .def("get_dispatch_layout", &InternodeRuntime::get_dispatch_layout)
        .def("notify", &InternodeRuntime::notify)
        .def("wait_notify", &InternodeRuntime::wait_notify)
        .def("rail_dispatch", &InternodeRuntime::rail_dispatch)
        .def("rail_combine", &InternodeRuntime::rail_combine)
        .def("get_error", &InternodeRuntime::get_error)
        .def("destroy", &InternodeRuntime::destroy);
    m.attr("INTERNODE_MAX_NODES") = internode::kMaxNodes;
    m.attr("RAIL_WARPS") = internode::kRailWarps;
    // Development: the rail kernels' trace (kernels/warp_trace.cuh; recorded only in an extension
    // built with KERNEL_TRACE=1), on the current device.
    m.def("rail_trace_reset", [](bool enable) { DEEP_EP_CUDA_CHECK(internode::rail_trace_reset(enable)); },
          py::arg("enable"));
    m.def("rail_trace_read", []() {
        std::vector<unsigned long long> cycles(static_cast<size_t>(2) * 2 * internode::kMaxChannels *
                                               kWarpTraceSlots);
        int clock_khz = 0;
        DEEP_EP_CUDA_CHECK(internode::rail_trace_read(cycles.data(), &clock_khz));
        return py::make_tuple(cycles, clock_khz);
    });
}

}  // namespace deep_ep
