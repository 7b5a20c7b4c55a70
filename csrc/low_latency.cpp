// The low-latency runtime (see low_latency.hpp). Host side only: argument checks, the NVSHMEM
// lifecycle, launches on the caller's current stream.
#include "low_latency.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <atomic>
#include <vector>

#include "host_mapped.hpp"

namespace deep_ep {

namespace {

#define LL_CUDA_CHECK(call)                                                                            \
    do {                                                                                               \
        const cudaError_t ll_status_ = (call);                                                         \
        TORCH_CHECK(ll_status_ == cudaSuccess, "deep_ep low-latency: CUDA error ",                      \
                    cudaGetErrorString(ll_status_), " at " __FILE__ ":", __LINE__, ": " #call);         \
    } while (0)

void check_tensor(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
    TORCH_CHECK(t.is_cuda(), "deep_ep low-latency: ", name, " must be a CUDA tensor");
    TORCH_CHECK(t.scalar_type() == dtype, "deep_ep low-latency: ", name, " has dtype ", t.scalar_type(),
                ", expected ", dtype);
    TORCH_CHECK(t.is_contiguous(), "deep_ep low-latency: ", name, " must be contiguous");
}

// The symmetric allocation holds two alternating buffers (low_latency.hpp).
void check_buffer_idx(int buffer_idx) {
    TORCH_CHECK(buffer_idx == 0 || buffer_idx == 1, "deep_ep low-latency: buffer_idx must be 0 or 1");
}

// The kernels keep at most kMaxTopk entries per token (the columns of slot_rows).
void check_num_topk(const torch::Tensor& topk_idx) {
    TORCH_CHECK(topk_idx.size(1) >= 1 && topk_idx.size(1) <= ll::kMaxTopk, "deep_ep low-latency: num_topk must be in [1, ",
                ll::kMaxTopk, "]");
}

// The dispatch's row map of each received slot, which the combine reads back.
void check_slot_rows(const torch::Tensor& slot_rows, int num_ranks, int num_max_tokens) {
    check_tensor(slot_rows, "slot_rows", torch::kInt32);
    TORCH_CHECK(slot_rows.numel() == static_cast<int64_t>(num_ranks) * num_max_tokens * ll::kMaxTopk,
                "deep_ep low-latency: slot_rows has the wrong size");
}

// An optional statistics output (checked by the caller): its data, or null when absent.
template <typename T>
T* data_or_null(const std::optional<torch::Tensor>& t) {
    return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// The fields that ll::DispatchArgs and ll::CombineArgs share: the home rank's top-k choices, the
// dispatch's receive bookkeeping, and the call's shape and phases.
template <typename Args>
void set_common_args(Args& args, const torch::Tensor& topk_idx, const torch::Tensor& recv_count,
                     const torch::Tensor& src_info, const torch::Tensor& slot_rows,
                     const std::optional<torch::Tensor>& wait_recv_cost_stats, int hidden, int num_experts,
                     int num_max_tokens, int phases) {
    args.topk_idx = topk_idx.data_ptr<int64_t>();
    args.recv_count = recv_count.data_ptr<int>();
    args.src_info = src_info.data_ptr<int>();
    args.slot_rows = slot_rows.data_ptr<int>();
    args.wait_recv_cost_stats = data_or_null<int64_t>(wait_recv_cost_stats);
    args.num_tokens = static_cast<int>(topk_idx.size(0));
    args.hidden = hidden;
    args.num_topk = static_cast<int>(topk_idx.size(1));
    args.num_experts = num_experts;
    args.num_max_tokens = num_max_tokens;
    args.phases = phases;
}

const char* kernel_name(int kernel) {
    switch (kernel) {
        case ll::kKernelDispatch: return "low_latency_dispatch";
        case ll::kKernelCombine: return "low_latency_combine";
        case ll::kKernelRankBarrier: return "the rank barrier (LowLatencyRuntime.barrier)";
        default: return "low-latency kernel";
    }
}

}  // namespace

LowLatencyRuntime::LowLatencyRuntime(int rank, int num_ranks, const std::string& unique_id, int64_t num_rdma_bytes,
                                     bool allow_nvlink, bool enable_shrink, double timeout_s)
    : rank_(rank), num_ranks_(num_ranks), num_rdma_bytes_(num_rdma_bytes), enable_shrink_(enable_shrink) {
    TORCH_CHECK(num_rdma_bytes > 0, "deep_ep low-latency: num_rdma_bytes must be positive");
    TORCH_CHECK(unique_id.size() == ll::nvshmem_unique_id_bytes(), "deep_ep low-latency: unique id has ",
                unique_id.size(), " bytes, expected ", ll::nvshmem_unique_id_bytes());
    set_timeout(timeout_s);
    LL_CUDA_CHECK(cudaGetDevice(&device_));

    const int status = ll::nvshmem_init_with_unique_id(unique_id.data(), rank, num_ranks);
    TORCH_CHECK(status == 0, "deep_ep low-latency: NVSHMEM initialization failed with status ", status);
    TORCH_CHECK(ll::nvshmem_my_pe_id() == rank, "deep_ep low-latency: NVSHMEM PE ", ll::nvshmem_my_pe_id(),
                " differs from rank ", rank);

    heap_ = ll::nvshmem_alloc(static_cast<size_t>(num_rdma_bytes));
    TORCH_CHECK(heap_ != nullptr, "deep_ep low-latency: nvshmem_malloc of ", num_rdma_bytes,
                " bytes failed (raise NVSHMEM_SYMMETRIC_SIZE)");
    LL_CUDA_CHECK(cudaMemset(heap_, 0, static_cast<size_t>(num_rdma_bytes)));
    // The rank barrier's flags: their own symmetric allocation, so clean() and the layout never touch them.
    const size_t barrier_bytes = sizeof(unsigned long long) * 2 * static_cast<size_t>(num_ranks);
    barrier_flags_ = static_cast<unsigned long long*>(ll::nvshmem_alloc(barrier_bytes));
    TORCH_CHECK(barrier_flags_ != nullptr, "deep_ep low-latency: nvshmem_malloc of the barrier flags failed");
    LL_CUDA_CHECK(cudaMemset(barrier_flags_, 0, barrier_bytes));

    host_peer_bases_.assign(num_ranks, 0ull);
    for (int pe = 0; pe < num_ranks; ++pe) {
        void* mapped = ll::nvshmem_peer_ptr(heap_, pe);
        // Our own memory is always written directly; peers only when NVLink stores are allowed.
        if (mapped != nullptr && (allow_nvlink || pe == rank)) host_peer_bases_[pe] = reinterpret_cast<unsigned long long>(mapped);
        if (host_peer_bases_[pe] == 0ull) any_remote_ = true;
    }
    LL_CUDA_CHECK(cudaMalloc(&peer_bases_, sizeof(unsigned long long) * num_ranks));
    LL_CUDA_CHECK(cudaMemcpy(peer_bases_, host_peer_bases_.data(), sizeof(unsigned long long) * num_ranks,
                             cudaMemcpyHostToDevice));
    LL_CUDA_CHECK(cudaMalloc(&state_, sizeof(ll::BufferState) * ll::kStateEntries));
    LL_CUDA_CHECK(cudaMemset(state_, 0, sizeof(ll::BufferState) * ll::kStateEntries));
    LL_CUDA_CHECK(cudaMalloc(&mask_, sizeof(int) * num_ranks));
    LL_CUDA_CHECK(cudaMemset(mask_, 0, sizeof(int) * num_ranks));
    LL_CUDA_CHECK(alloc_host_mapped(&error_host_, &error_device_, 1));
    LL_CUDA_CHECK(cudaDeviceSynchronize());
    ll::nvshmem_barrier_all_host();
}

LowLatencyRuntime::~LowLatencyRuntime() {
    try {
        destroy();
    } catch (...) {
        // Destructors must not throw; destroy() is normally called explicitly.
    }
}

pybind11::bytes LowLatencyRuntime::get_unique_id() {
    std::string bytes(ll::nvshmem_unique_id_bytes(), '\0');
    const int status = ll::nvshmem_get_unique_id(bytes.data());
    TORCH_CHECK(status == 0, "deep_ep low-latency: nvshmemx_get_uniqueid failed with status ", status);
    return pybind11::bytes(bytes);
}

int64_t LowLatencyRuntime::required_bytes(int num_max_tokens, int hidden, int num_ranks, int num_experts) {
    return static_cast<int64_t>(ll::make_layout(num_max_tokens, hidden, num_ranks, num_experts).total_bytes);
}

ll::Context LowLatencyRuntime::context(int num_max_tokens, int hidden, int num_experts) {
    TORCH_CHECK(!destroyed_, "deep_ep low-latency: the runtime has been destroyed");
    ensure_layout(num_max_tokens, hidden, num_experts);
    return base_context();
}

ll::Context LowLatencyRuntime::base_context() const {
    ll::Context ctx;
    ctx.rank = rank_;
    ctx.num_ranks = num_ranks_;
    ctx.heap = heap_;
    ctx.peer_bases = peer_bases_;
    ctx.any_remote = any_remote_;
    ctx.state = state_;
    ctx.mask = mask_;
    ctx.enable_shrink = enable_shrink_;
    ctx.error = error_device_;
    ctx.timeout_ns = timeout_ns_;
    return ctx;
}

void LowLatencyRuntime::ensure_layout(int num_max_tokens, int hidden, int num_experts) {
    TORCH_CHECK(num_max_tokens >= 1 && num_max_tokens <= ll::kMaxTokensPerRank,
                "deep_ep low-latency: num_max_dispatch_tokens_per_rank must be in [1, ", ll::kMaxTokensPerRank,
                "], got ", num_max_tokens);
    TORCH_CHECK(hidden > 0 && hidden % 128 == 0 && hidden <= ll::kMaxHidden,
                "deep_ep low-latency: hidden must be a multiple of 128 up to ", ll::kMaxHidden, ", got ", hidden);
    TORCH_CHECK(num_ranks_ <= 1024, "deep_ep low-latency: at most 1024 ranks");
    TORCH_CHECK(num_experts > 0 && num_experts % num_ranks_ == 0, "deep_ep low-latency: num_experts (", num_experts,
                ") must be a positive multiple of the rank count (", num_ranks_, ")");
    const auto key = std::make_tuple(num_max_tokens, hidden, num_experts);
    if (key == layout_key_) return;
    const int64_t need = required_bytes(num_max_tokens, hidden, num_ranks_, num_experts);
    TORCH_CHECK(need <= num_rdma_bytes_, "deep_ep low-latency: num_rdma_bytes (", num_rdma_bytes_,
                ") is too small for num_max_dispatch_tokens_per_rank=", num_max_tokens, ", hidden=", hidden,
                ", num_experts=", num_experts, ": need ", need, " bytes");
    // A new shape moves the slots: forget every tag and count of the old one (collective, as
    // every rank makes the same call).
    clean(num_max_tokens, hidden, num_experts);
    layout_key_ = key;
}

void LowLatencyRuntime::barrier() {
    TORCH_CHECK(!destroyed_, "deep_ep low-latency: the runtime has been destroyed");
    const c10::cuda::CUDAGuard guard(device_);
    LL_CUDA_CHECK(ll::launch_rank_barrier(base_context(), barrier_flags_, ++barrier_calls_,
                                          at::cuda::getCurrentCUDAStream()));
}

void LowLatencyRuntime::clean(int num_max_tokens, int hidden, int num_experts) {
    TORCH_CHECK(!destroyed_, "deep_ep low-latency: the runtime has been destroyed");
    const ll::Layout layout = ll::make_layout(num_max_tokens, hidden, num_ranks_, num_experts);
    TORCH_CHECK(static_cast<int64_t>(layout.total_bytes) <= num_rdma_bytes_, "deep_ep low-latency: num_rdma_bytes (",
                num_rdma_bytes_, ") is too small: need ", layout.total_bytes, " bytes");
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    // Nobody may still be writing into our buffers, nor start before we are clean.
    ll::nvshmem_barrier_on_stream(stream);
    char* heap = static_cast<char*>(heap_);
    LL_CUDA_CHECK(cudaMemsetAsync(heap + layout.signal_offset, 0, layout.buffer_offset[0] - layout.signal_offset, stream));
    // Everything that says which call wrote it must match none of the restarted calls: the received
    // messages' tags and the staged messages' arrival words (stage_arrive), two adjacent regions,
    // and the combine weights (tagged words).
    for (int b = 0; b < 2; ++b) {
        char* buffer = heap + layout.buffer_offset[b];
        LL_CUDA_CHECK(cudaMemsetAsync(buffer + layout.dispatch_recv_offset, 0,
                                      layout.combine_recv_offset - layout.dispatch_recv_offset, stream));
        LL_CUDA_CHECK(cudaMemsetAsync(buffer + layout.weights_offset, 0, layout.stage_offset - layout.weights_offset,
                                      stream));
    }
    LL_CUDA_CHECK(cudaMemsetAsync(state_, 0, sizeof(ll::BufferState) * ll::kStateEntries, stream));
    ll::nvshmem_barrier_on_stream(stream);
    layout_key_ = std::make_tuple(num_max_tokens, hidden, num_experts);
}

template <typename Args>
void LowLatencyRuntime::launch(const Args& args, int buffer_idx,
                               cudaError_t (*kernel)(const ll::Context&, const ll::Layout&, int, const Args&,
                                                     cudaStream_t)) {
    const c10::cuda::CUDAGuard guard(device_);
    // May re-lay out (and so clean, collectively) the buffers when the shape changed.
    const ll::Context ctx = context(args.num_max_tokens, args.hidden, args.num_experts);
    const ll::Layout layout = ll::make_layout(args.num_max_tokens, args.hidden, num_ranks_, args.num_experts);
    LL_CUDA_CHECK(kernel(ctx, layout, buffer_idx, args, at::cuda::getCurrentCUDAStream()));
}

std::tuple<torch::Tensor, std::optional<torch::Tensor>, torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor>
LowLatencyRuntime::dispatch_outputs(int num_max_tokens, int hidden, int num_experts, bool use_fp8, bool use_ue8m0) const {
    TORCH_CHECK(num_max_tokens > 0 && hidden > 0 && num_experts > 0 && num_experts % num_ranks_ == 0,
                "deep_ep low-latency: bad dispatch output sizes");
    const int64_t num_local = num_experts / num_ranks_;
    const int64_t num_slots = static_cast<int64_t>(num_ranks_) * num_max_tokens;
    const auto on_device = torch::TensorOptions().device(torch::kCUDA, device_);
    torch::Tensor recv_x =
        torch::empty({num_local, num_slots, hidden}, on_device.dtype(use_fp8 ? torch::kFloat8_e4m3fn : torch::kBFloat16));
    std::optional<torch::Tensor> recv_scales;
    if (use_fp8)
        recv_scales = use_ue8m0 ? torch::empty({num_local, num_slots, hidden / 512}, on_device.dtype(torch::kInt32))
                                : torch::empty({num_local, num_slots, hidden / 128}, on_device.dtype(torch::kFloat32));
    return {recv_x,
            recv_scales,
            torch::empty({num_local}, on_device.dtype(torch::kInt32)),
            torch::empty({num_local, num_slots}, on_device.dtype(torch::kInt32)),
            torch::empty({num_local, static_cast<int64_t>(num_ranks_)}, on_device.dtype(torch::kInt64)),
            torch::empty({num_slots, static_cast<int64_t>(ll::kMaxTopk)}, on_device.dtype(torch::kInt32))};
}

void LowLatencyRuntime::dispatch(const torch::Tensor& x, const torch::Tensor& topk_idx, const torch::Tensor& recv_x,
                                 const std::optional<torch::Tensor>& recv_scales, const torch::Tensor& recv_count,
                                 const torch::Tensor& src_info, const torch::Tensor& layout_range,
                                 const torch::Tensor& slot_rows,
                                 const std::optional<torch::Tensor>& cumulative_recv_stats,
                                 const std::optional<torch::Tensor>& wait_recv_cost_stats, int num_max_tokens,
                                 int num_experts, int buffer_idx, bool use_fp8, bool round_scale, bool use_ue8m0,
                                 int phases) {
    check_tensor(x, "x", torch::kBFloat16);
    check_tensor(topk_idx, "topk_idx", torch::kInt64);
    TORCH_CHECK(x.dim() == 2 && topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0),
                "deep_ep low-latency: x must be [T, H] and topk_idx [T, K]");
    check_num_topk(topk_idx);
    TORCH_CHECK(x.size(0) <= num_max_tokens, "deep_ep low-latency: more tokens than num_max_dispatch_tokens_per_rank");
    check_buffer_idx(buffer_idx);
    const int hidden = static_cast<int>(x.size(1));
    const int num_local = num_experts / num_ranks_;
    check_tensor(recv_x, "recv_x", use_fp8 ? torch::kFloat8_e4m3fn : torch::kBFloat16);
    TORCH_CHECK(recv_x.numel() == static_cast<int64_t>(num_local) * num_ranks_ * num_max_tokens * hidden,
                "deep_ep low-latency: recv_x has the wrong size");
    if (use_fp8) {
        TORCH_CHECK(recv_scales.has_value(), "deep_ep low-latency: FP8 dispatch needs recv_scales");
        check_tensor(*recv_scales, "recv_scales", use_ue8m0 ? torch::kInt32 : torch::kFloat32);
        TORCH_CHECK(!use_ue8m0 || hidden % 512 == 0, "deep_ep low-latency: use_ue8m0 needs hidden % 512 == 0");
    }
    check_tensor(recv_count, "recv_count", torch::kInt32);
    check_tensor(src_info, "src_info", torch::kInt32);
    check_tensor(layout_range, "layout_range", torch::kInt64);
    check_slot_rows(slot_rows, num_ranks_, num_max_tokens);
    if (cumulative_recv_stats.has_value()) check_tensor(*cumulative_recv_stats, "cumulative_local_expert_recv_stats", torch::kInt32);
    if (wait_recv_cost_stats.has_value()) check_tensor(*wait_recv_cost_stats, "dispatch_wait_recv_cost_stats", torch::kInt64);

    ll::DispatchArgs args;
    set_common_args(args, topk_idx, recv_count, src_info, slot_rows, wait_recv_cost_stats, hidden, num_experts,
                    num_max_tokens, phases);
    args.x = x.data_ptr();
    args.recv_x = recv_x.data_ptr();
    args.recv_scales = use_fp8 ? recv_scales->data_ptr() : nullptr;
    args.layout_range = layout_range.data_ptr<int64_t>();
    args.cumulative_recv_stats = data_or_null<int>(cumulative_recv_stats);
    args.use_fp8 = use_fp8;
    args.round_scale = round_scale || use_ue8m0;
    args.use_ue8m0 = use_ue8m0;
    launch(args, buffer_idx, ll::launch_dispatch);
}

void LowLatencyRuntime::combine(const std::optional<torch::Tensor>& x, const torch::Tensor& topk_idx,
                                const torch::Tensor& topk_weights, const torch::Tensor& src_info,
                                const torch::Tensor& recv_count, const torch::Tensor& slot_rows, const torch::Tensor& out,
                                const std::optional<torch::Tensor>& wait_recv_cost_stats, int num_max_tokens, int hidden,
                                int num_experts, int buffer_idx, bool zero_copy, bool reduced, int phases) {
    const int num_local = num_experts / num_ranks_;
    if (!zero_copy) {
        TORCH_CHECK(x.has_value(), "deep_ep low-latency: combine needs x unless zero_copy");
        check_tensor(*x, "x", torch::kBFloat16);
        TORCH_CHECK(x->numel() == static_cast<int64_t>(num_local) * num_ranks_ * num_max_tokens * hidden,
                    "deep_ep low-latency: combine x has the wrong size");
    }
    check_tensor(topk_idx, "topk_idx", torch::kInt64);
    check_tensor(topk_weights, "topk_weights", torch::kFloat32);
    TORCH_CHECK(topk_idx.sizes() == topk_weights.sizes() && topk_idx.dim() == 2,
                "deep_ep low-latency: topk_idx and topk_weights must both be [T, K]");
    check_num_topk(topk_idx);
    check_tensor(src_info, "src_info", torch::kInt32);
    check_tensor(recv_count, "recv_count", torch::kInt32);
    check_slot_rows(slot_rows, num_ranks_, num_max_tokens);
    check_tensor(out, "out", torch::kBFloat16);
    TORCH_CHECK(out.dim() == 2 && out.size(0) == topk_idx.size(0) && out.size(1) == hidden,
                "deep_ep low-latency: out must be [T, H]");
    if (wait_recv_cost_stats.has_value()) check_tensor(*wait_recv_cost_stats, "combine_wait_recv_cost_stats", torch::kInt64);
    check_buffer_idx(buffer_idx);

    ll::CombineArgs args;
    set_common_args(args, topk_idx, recv_count, src_info, slot_rows, wait_recv_cost_stats, hidden, num_experts,
                    num_max_tokens, phases);
    args.x = zero_copy ? nullptr : x->data_ptr();
    args.topk_weights = topk_weights.data_ptr<float>();
    args.out = out.data_ptr();
    args.zero_copy = zero_copy;
    args.reduced = reduced;
    launch(args, buffer_idx, ll::launch_combine);
}

torch::Tensor LowLatencyRuntime::combine_buffer(int buffer_idx, int num_max_tokens, int hidden, int num_experts) {
    TORCH_CHECK(!destroyed_, "deep_ep low-latency: the runtime has been destroyed");
    check_buffer_idx(buffer_idx);
    const ll::Layout layout = ll::make_layout(num_max_tokens, hidden, num_ranks_, num_experts);
    TORCH_CHECK(static_cast<int64_t>(layout.total_bytes) <= num_rdma_bytes_, "deep_ep low-latency: num_rdma_bytes too small");
    char* base = static_cast<char*>(heap_) + layout.buffer_offset[buffer_idx] + layout.combine_send_offset;
    const int64_t num_local = num_experts / num_ranks_;
    return torch::from_blob(base, {num_local, static_cast<int64_t>(num_ranks_) * num_max_tokens, hidden},
                            torch::TensorOptions().dtype(torch::kBFloat16).device(torch::kCUDA, device_));
}

torch::Tensor LowLatencyRuntime::rdma_buffer() {
    TORCH_CHECK(!destroyed_, "deep_ep low-latency: the runtime has been destroyed");
    return torch::from_blob(heap_, {num_rdma_bytes_}, torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCUDA, device_));
}

void LowLatencyRuntime::update_mask(int rank_to_mask, bool mask) {
    TORCH_CHECK(rank_to_mask >= 0 && rank_to_mask < num_ranks_, "deep_ep low-latency: rank_to_mask out of range");
    const int value = mask ? 1 : 0;
    const c10::cuda::CUDAGuard guard(device_);
    LL_CUDA_CHECK(cudaMemcpyAsync(mask_ + rank_to_mask, &value, sizeof(int), cudaMemcpyHostToDevice,
                                  at::cuda::getCurrentCUDAStream()));
    LL_CUDA_CHECK(cudaStreamSynchronize(at::cuda::getCurrentCUDAStream()));
}

void LowLatencyRuntime::query_mask(const torch::Tensor& mask_status) {
    check_tensor(mask_status, "mask_status", torch::kInt32);
    TORCH_CHECK(mask_status.numel() == num_ranks_, "deep_ep low-latency: mask_status must have num_ranks entries");
    const c10::cuda::CUDAGuard guard(device_);
    LL_CUDA_CHECK(cudaMemcpyAsync(mask_status.data_ptr<int>(), mask_, sizeof(int) * num_ranks_, cudaMemcpyDeviceToDevice,
                                  at::cuda::getCurrentCUDAStream()));
}

void LowLatencyRuntime::clean_mask() {
    const c10::cuda::CUDAGuard guard(device_);
    LL_CUDA_CHECK(cudaMemsetAsync(mask_, 0, sizeof(int) * num_ranks_, at::cuda::getCurrentCUDAStream()));
}

std::optional<std::tuple<int, std::string, int, int64_t, int64_t, int64_t>> LowLatencyRuntime::error_record() const {
    if (error_host_ == nullptr) return std::nullopt;
    const volatile ll::ErrorRecord* record = error_host_;
    if (record->flag != 1) return std::nullopt;  // the kernel sets it to 1 after the fields
    std::atomic_thread_fence(std::memory_order_acquire);
    const int kernel = record->kernel;
    unsigned long long seen = record->seen, expected = record->expected;
    std::string name = kernel_name(kernel & ~ll::kKernelDeliveryFlag);
    if (kernel & ll::kKernelDeliveryFlag) {
        // A sending block's delivery flag: report call numbers, and the tokens in the name.
        const unsigned long long token_mask = ll::kFlagAllTokens;
        auto tokens = [&](unsigned long long v) {
            return (v & token_mask) == token_mask ? std::string("all its tokens") : std::to_string(v & token_mask) + " token(s)";
        };
        name += " (a sending block's delivery flag: it had delivered " + tokens(seen) + " of call " +
                std::to_string(seen >> ll::kDeliveryTokenBits) + ", the receive waited for " + tokens(expected) +
                " of call " + std::to_string(expected >> ll::kDeliveryTokenBits) + ")";
        seen >>= ll::kDeliveryTokenBits;
        expected >>= ll::kDeliveryTokenBits;
    }
    return std::make_tuple(static_cast<int>(record->rank), name, static_cast<int>(record->peer),
                           static_cast<int64_t>(seen), static_cast<int64_t>(expected),
                           static_cast<int64_t>(record->waited_ns));
}

void LowLatencyRuntime::set_timeout(double timeout_s) {
    TORCH_CHECK(timeout_s > 0, "deep_ep low-latency: timeout must be positive");
    timeout_ns_ = static_cast<unsigned long long>(timeout_s * 1e9);
}

bool LowLatencyRuntime::is_direct_peer(int pe) const {
    TORCH_CHECK(pe >= 0 && pe < num_ranks_, "deep_ep low-latency: pe out of range");
    return host_peer_bases_[pe] != 0ull;
}

void LowLatencyRuntime::destroy() {
    if (destroyed_) return;
    destroyed_ = true;
    const c10::cuda::CUDAGuard guard(device_);
    LL_CUDA_CHECK(cudaDeviceSynchronize());
    ll::nvshmem_barrier_all_host();
    ll::nvshmem_release(barrier_flags_);
    barrier_flags_ = nullptr;
    ll::nvshmem_release(heap_);
    heap_ = nullptr;
    ll::nvshmem_finalize_runtime();
    LL_CUDA_CHECK(cudaFree(peer_bases_));
    LL_CUDA_CHECK(cudaFree(state_));
    LL_CUDA_CHECK(cudaFree(mask_));
    LL_CUDA_CHECK(free_host_mapped(&error_host_, &error_device_));
}

void register_low_latency(pybind11::module_& m) {
    namespace py = pybind11;
    py::class_<LowLatencyRuntime>(m, "LowLatencyRuntime")
        .def(py::init<int, int, const std::string&, int64_t, bool, bool, double>(), py::arg("rank"),
             py::arg("num_ranks"), py::arg("unique_id"), py::arg("num_rdma_bytes"), py::arg("allow_nvlink"),
             py::arg("enable_shrink"), py::arg("timeout_s"))
        .def_static("get_unique_id", &LowLatencyRuntime::get_unique_id)
        .def_static("required_bytes", &LowLatencyRuntime::required_bytes)
        .def("dispatch_outputs", &LowLatencyRuntime::dispatch_outputs)
        .def("dispatch", &LowLatencyRuntime::dispatch)
        .def("combine", &LowLatencyRuntime::combine)
        .def("clean", &LowLatencyRuntime::clean)
        .def("barrier", &LowLatencyRuntime::barrier)
        .def("combine_buffer", &LowLatencyRuntime::combine_buffer)
        .def("rdma_buffer", &LowLatencyRuntime::rdma_buffer)
        .def("update_mask", &LowLatencyRuntime::update_mask)
        .def("query_mask", &LowLatencyRuntime::query_mask)
        .def("clean_mask", &LowLatencyRuntime::clean_mask)
        .def("error_record", &LowLatencyRuntime::error_record)
        .def("set_timeout", &LowLatencyRuntime::set_timeout)
        .def("is_direct_peer", &LowLatencyRuntime::is_direct_peer)
        .def("destroy", &LowLatencyRuntime::destroy);
    m.attr("LL_PHASE_SEND") = ll::kPhaseSend;
    m.attr("LL_PHASE_RECV") = ll::kPhaseRecv;
    m.def("ll_num_blocks", &ll::num_blocks, py::arg("num_max_tokens"), py::arg("num_local_experts"));
    // Development: the kernels' phase trace (kernels/phase_trace.cuh), on the current device.
    m.def("ll_trace_reset", [](bool enable) { LL_CUDA_CHECK(ll::trace_reset(enable)); }, py::arg("enable"));
    m.def("ll_trace_read", []() {
        std::vector<unsigned long long> cycles(static_cast<size_t>(ll::kTraceKernels) * ll::kMaxBlocks * ll::kTracePoints);
        std::vector<unsigned long long> calls(ll::kTraceKernels);
        int clock_khz = 0;
        LL_CUDA_CHECK(ll::trace_read(cycles.data(), calls.data(), &clock_khz));
        return py::make_tuple(cycles, calls, clock_khz);
    });
}

}  // namespace deep_ep
