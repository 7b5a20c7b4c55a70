// The intranode runtime (NVLink buffer, IPC mapping, host-mapped counters, launches) and the
// Python module deep_ep_cpp.
#include "deep_ep.hpp"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "comm_frame.hpp"
#include "config.hpp"
#include "dispatch_combine_args.hpp"
#include "event.hpp"
#include "host_mapped.hpp"
#include "kernels/api.cuh"
#include "kernels/buffer.cuh"
#include "kernels/exception.cuh"
#include "layout_launch.hpp"
#include "tensor_checks.hpp"

#ifndef DISABLE_NVSHMEM
#if defined(__has_include)
#if __has_include("low_latency.hpp")
#include "low_latency.hpp"
#define DEEP_EP_HAS_LOW_LATENCY 1
#endif
#if __has_include("internode.hpp")
#include "internode.hpp"
#define DEEP_EP_HAS_INTERNODE 1
#endif
#endif
#endif

namespace py = pybind11;

namespace deep_ep {

Buffer::Buffer(int rank, int num_ranks, int64_t num_nvl_bytes, double timeout_s)
    : rank_(rank), num_ranks_(num_ranks), num_nvl_bytes_(num_nvl_bytes) {
    DEEP_EP_HOST_ASSERT(num_ranks >= 1 && num_ranks <= kMaxRanks, "the intranode runtime supports 1..8 ranks");
    DEEP_EP_HOST_ASSERT(rank >= 0 && rank < num_ranks, "rank out of range");
    DEEP_EP_HOST_ASSERT(num_nvl_bytes > static_cast<int64_t>(kDataOffset),
                        "num_nvl_bytes must exceed the control area of " + std::to_string(kDataOffset) + " bytes");
    DEEP_EP_HOST_ASSERT(timeout_s > 0, "timeout must be positive");
    timeout_ns_ = static_cast<uint64_t>(timeout_s * 1e9);
    DEEP_EP_CUDA_CHECK(cudaGetDevice(&device_));
    DEEP_EP_CUDA_CHECK(cudaMalloc(&local_buffer_, static_cast<size_t>(num_nvl_bytes)));
    DEEP_EP_CUDA_CHECK(cudaMemset(local_buffer_, 0, kDataOffset));
    DEEP_EP_CUDA_CHECK(alloc_host_mapped(&error_host_, &error_device_, 1));
    DEEP_EP_CUDA_CHECK(alloc_host_mapped(&counters_host_, &counters_device_, kHostCounterInts));
    DEEP_EP_CUDA_CHECK(cudaDeviceSynchronize());
    for (auto& p : peers_.ptrs)
        p = nullptr;
    peers_.ptrs[rank_] = local_buffer_;
}

Buffer::~Buffer() noexcept {
    if (!destroyed_) {
        try {
            destroy(false);
        } catch (...) {
            // Destructors must not throw; the process is usually exiting here.
        }
    }
}

py::bytes Buffer::get_local_ipc_handle() const {
    cudaIpcMemHandle_t handle;
    DEEP_EP_CUDA_CHECK(cudaIpcGetMemHandle(&handle, local_buffer_));
    return py::bytes(reinterpret_cast<const char*>(&handle), sizeof(handle));
}

void Buffer::sync(const std::vector<std::string>& handles) {
    DEEP_EP_HOST_ASSERT(!available_, "sync() was already called");
    DEEP_EP_HOST_ASSERT(static_cast<int>(handles.size()) == num_ranks_, "need one IPC handle per rank");
    for (int r = 0; r < num_ranks_; ++r) {
        if (r == rank_)
            continue;
        const std::string& bytes = handles[r];
        DEEP_EP_HOST_ASSERT(bytes.size() == sizeof(cudaIpcMemHandle_t), "malformed IPC handle");
        cudaIpcMemHandle_t handle;
        std::memcpy(&handle, bytes.data(), sizeof(handle));
        void* ptr = nullptr;
        DEEP_EP_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess));
        peers_.ptrs[r] = static_cast<uint8_t*>(ptr);
    }
    available_ = true;
}

torch::Tensor Buffer::get_local_buffer_tensor(int64_t offset, int64_t num_bytes) const {
    DEEP_EP_HOST_ASSERT(offset >= 0 && num_bytes >= 0 && offset + num_bytes <= num_nvl_bytes_,
                        "view out of the buffer's bounds");
    return torch::from_blob(local_buffer_ + offset, {num_bytes},
                            torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCUDA, device_));
}

FailureContext Buffer::failure_context() const {
    FailureContext ctx;
    ctx.record = error_device_;
    ctx.abort_flag = reinterpret_cast<int*>(local_buffer_ + kAbortFlagOffset);
    ctx.timeout_ns = timeout_ns_;
    ctx.rank = rank_;
    return ctx;
}

void Buffer::check_usable() const {
    DEEP_EP_HOST_ASSERT(!destroyed_, "the buffer has been destroyed");
    DEEP_EP_HOST_ASSERT(available_, "sync() has not been called");
    if (error_recorded(error_host_))
        throw std::runtime_error("deep_ep: the buffer failed earlier (see the error record); it cannot be used");
}

int Buffer::warps_per_peer() const {
    int warps = std::min(kIntranodeWarps / num_ranks_, kMaxWarpsPerPeer);
    // Tuning experiments only: fewer concurrent flows per (channel, peer).
    if (const char* value = std::getenv("DEEP_EP_WARPS_PER_PEER"))
        warps = std::max(1, std::min(warps, std::atoi(value)));
    return warps;
}

RingGeometry Buffer::make_ring(int num_sms, int send_chunk, int ring_capacity, int slot_bytes,
                               int min_slots_per_sub_ring) const {
    DEEP_EP_HOST_ASSERT(num_sms >= 2 && num_sms % 2 == 0, "num_sms must be even and >= 2");
    DEEP_EP_HOST_ASSERT(num_sms / 2 <= kMaxChannels, "num_sms must be at most " + std::to_string(2 * kMaxChannels));
    RingGeometry ring;
    ring.num_channels = num_sms / 2;
    ring.warps_per_peer = warps_per_peer();
    ring.slot_bytes = slot_bytes;
    ring.publish_every = std::max(1, send_chunk);
    ring.slice_bytes = (static_cast<size_t>(num_nvl_bytes_) - kDataOffset) / num_ranks_ / 128 * 128;
    const int64_t fit = static_cast<int64_t>(ring.slice_bytes) / (static_cast<int64_t>(ring.num_channels) * slot_bytes);
    int64_t capacity = std::min<int64_t>(ring_capacity, fit);
    capacity -= capacity % ring.warps_per_peer;
    const int64_t need = static_cast<int64_t>(min_slots_per_sub_ring) * ring.warps_per_peer;
    // The config's ring capacity itself below the minimum: the buffer is not what is short.
    if (ring_capacity - ring_capacity % ring.warps_per_peer < need)
        throw std::invalid_argument("deep_ep: num_max_nvl_chunked_recv_tokens (" + std::to_string(ring_capacity) +
                                    ") is too small for " + std::to_string(num_ranks_) + " ranks: this kernel needs " +
                                    std::to_string(need) + " or more tokens per ring (" +
                                    std::to_string(min_slots_per_sub_ring) + " per warp's sub-ring, " +
                                    std::to_string(ring.warps_per_peer) + " sub-rings)");
    if (capacity < need) {
        const int64_t need_bytes = static_cast<int64_t>(kDataOffset) +
                                   need * ring.num_channels * static_cast<int64_t>(slot_bytes) * num_ranks_;
        throw std::invalid_argument("deep_ep: num_nvl_bytes (" + std::to_string(num_nvl_bytes_) +
                                    ") is too small for " + std::to_string(ring.num_channels) +
                                    " channels of " + std::to_string(slot_bytes) + "-byte slots; need at least " +
                                    std::to_string(need_bytes));
    }
    ring.capacity = static_cast<int>(capacity);
    // Publishing less often than a sub-ring holds would only add waits.
    ring.publish_every = std::min(ring.publish_every, ring.capacity / ring.warps_per_peer);
    return ring;
}

void Buffer::get_dispatch_layout(const torch::Tensor& topk_idx, int num_experts,
                                 const torch::Tensor& num_tokens_per_rank, const torch::Tensor& num_tokens_per_expert,
                                 const torch::Tensor& is_token_in_rank) {
    launch_dispatch_layout(topk_idx, num_experts, num_ranks_, num_tokens_per_rank, num_tokens_per_expert,
                           is_token_in_rank);
}

void Buffer::notify_dispatch(const torch::Tensor& num_tokens_per_rank, const torch::Tensor& num_tokens_per_expert,
                             int num_tokens, int expert_alignment, const torch::Tensor& recv_rank_prefix,
                             const torch::Tensor& recv_src_num_tokens, bool write_host,
                             const std::optional<torch::Tensor>& check_topk_idx,
                             const std::optional<torch::Tensor>& check_is_token_in_rank) {
    check_usable();
    check_cuda_tensor(num_tokens_per_rank, "num_tokens_per_rank", torch::kInt32);
    check_cuda_tensor(num_tokens_per_expert, "num_tokens_per_expert", torch::kInt32);
    check_cuda_tensor(recv_rank_prefix, "recv_rank_prefix", torch::kInt32);
    check_cuda_tensor(recv_src_num_tokens, "recv_src_num_tokens", torch::kInt32);
    DEEP_EP_HOST_ASSERT(num_tokens_per_rank.numel() == num_ranks_, "num_tokens_per_rank must have num_ranks entries");
    DEEP_EP_HOST_ASSERT(recv_rank_prefix.numel() == num_ranks_ + 1, "recv_rank_prefix must have num_ranks + 1 entries");
    DEEP_EP_HOST_ASSERT(recv_src_num_tokens.numel() == num_ranks_, "recv_src_num_tokens must have num_ranks entries");
    DEEP_EP_HOST_ASSERT(expert_alignment >= 1, "expert_alignment must be >= 1");
    const int num_experts = static_cast<int>(num_tokens_per_expert.numel());
    DEEP_EP_HOST_ASSERT(num_experts % num_ranks_ == 0, "num_experts must be a multiple of num_ranks");
    DEEP_EP_HOST_ASSERT(num_experts / num_ranks_ <= kMaxLocalExperts,
                        "at most " + std::to_string(kMaxLocalExperts) + " local experts");
    NotifyArgs args;
    args.num_tokens_per_rank = num_tokens_per_rank.data_ptr<int>();
    args.num_tokens_per_expert = num_tokens_per_expert.data_ptr<int>();
    args.num_tokens = num_tokens;
    args.num_experts = num_experts;
    args.expert_alignment = expert_alignment;
    args.rank = rank_;
    args.num_ranks = num_ranks_;
    args.buffers = peers_;
    args.recv_rank_prefix = recv_rank_prefix.data_ptr<int>();
    args.recv_src_num_tokens = recv_src_num_tokens.data_ptr<int>();
    args.host_counters = counters_device_;
    args.write_host = write_host;
    args.check_scratch = nullptr;
    args.fail = failure_context();
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    if (check_is_token_in_rank.has_value()) {
        DEEP_EP_HOST_ASSERT(write_host, "the value checks report through the host counters (write_host)");
        check_token_rank_map(*check_is_token_in_rank, num_tokens, num_ranks_);
        DispatchCheckArgs check;
        check.topk_idx = nullptr;
        check.num_topk = 0;
        if (check_topk_idx.has_value()) {
            check_cuda_tensor(*check_topk_idx, "topk_idx", torch::kInt64);
            DEEP_EP_HOST_ASSERT(check_topk_idx->dim() == 2 && check_topk_idx->size(0) == num_tokens,
                                "topk_idx must be [num_tokens, num_topk]");
            check.topk_idx = check_topk_idx->data_ptr<int64_t>();
            check.num_topk = static_cast<int>(check_topk_idx->size(1));
        }
        check.is_token_in_rank = check_is_token_in_rank->data_ptr<bool>();
        check.num_tokens = num_tokens;
        check.num_experts = num_experts;
        check.num_ranks = num_ranks_;
        check.scratch = reinterpret_cast<int*>(local_buffer_ + kCheckOffset);
        launch_check_dispatch_values(check, stream);
        args.check_scratch = check.scratch;
    }
    if (write_host) {
        volatile int* counters = counters_host_;
        counters[kHostCounterReady] = 0;
        counters[kHostCounterChecks] = 0;
    }
    launch_notify_dispatch(args, stream);
}

std::tuple<bool, int, std::vector<int>, int> Buffer::wait_notify(int num_local_experts) {
    DEEP_EP_HOST_ASSERT(num_local_experts >= 0 && num_local_experts <= kMaxLocalExperts, "bad num_local_experts");
    {
        py::gil_scoped_release release;
        const auto start = std::chrono::steady_clock::now();
        // The device reports its own timeouts; the host allows a little more before giving up.
        const auto limit = std::chrono::nanoseconds(timeout_ns_) + std::chrono::seconds(5);
        volatile int* flag = counters_host_;
        volatile ErrorRecord* record = error_host_;
        uint64_t polls = 0;
        while (*flag != 1) {
            if (record->code > 0)
                return {false, 0, {}, 0};
            if ((++polls & 1023) == 0 && std::chrono::steady_clock::now() - start > limit)
                return {false, -1, {}, 0};
        }
        std::atomic_thread_fence(std::memory_order_acquire);
    }
    volatile int* counters = counters_host_;
    std::vector<int> per_expert(num_local_experts);
    for (int e = 0; e < num_local_experts; ++e)
        per_expert[e] = counters[kHostCounterExperts + e];
    return {true, counters[kHostCounterRows], per_expert, counters[kHostCounterChecks]};
}

namespace {
// The optional row map of dispatch and combine (deep_ep.hpp): int32 [2, num_ranks * S], S <= 32
// runs per source (one per lane of a warp in the kernels).
void set_row_map(const std::optional<torch::Tensor>& row_segments, int num_ranks, const int*& ends,
                 const int*& deltas, int& num_runs) {
    ends = deltas = nullptr;
    num_runs = 0;
    if (!row_segments.has_value())
        return;
    check_cuda_tensor(*row_segments, "row_segments", torch::kInt32);
    DEEP_EP_HOST_ASSERT(row_segments->dim() == 2 && row_segments->size(0) == 2 && row_segments->size(1) > 0 &&
                            row_segments->size(1) % num_ranks == 0 && row_segments->size(1) / num_ranks <= 32,
                        "row_segments must be int32 [2, num_ranks * S] with 1 <= S <= 32");
    num_runs = static_cast<int>(row_segments->size(1) / num_ranks);
    ends = row_segments->data_ptr<int>();
    deltas = ends + row_segments->size(1);
}
}  // namespace

void Buffer::dispatch(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                      const std::optional<torch::Tensor>& topk_idx, const std::optional<torch::Tensor>& topk_weights,
                      const torch::Tensor& is_token_in_rank, const torch::Tensor& recv_rank_prefix,
                      const torch::Tensor& recv_x, const std::optional<torch::Tensor>& recv_x_scales,
                      const std::optional<torch::Tensor>& recv_topk_idx,
                      const std::optional<torch::Tensor>& recv_topk_weights, const torch::Tensor& recv_src_idx,
                      int num_experts, bool fill_padding, int num_sms, int send_chunk, int ring_capacity,
                      const std::optional<torch::Tensor>& row_segments) {
    check_usable();
    DEEP_EP_HOST_ASSERT(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
    DEEP_EP_HOST_ASSERT(recv_x.is_cuda() && recv_x.dim() == 2 && recv_x.is_contiguous() &&
                            recv_x.scalar_type() == x.scalar_type() && recv_x.size(1) == x.size(1),
                        "recv_x must be contiguous [rows, hidden] of x's dtype");
    check_token_rank_map(is_token_in_rank, x.size(0), num_ranks_);
    check_cuda_tensor(recv_rank_prefix, "recv_rank_prefix", torch::kInt32);
    check_cuda_tensor(recv_src_idx, "recv_src_idx", torch::kInt32);
    DEEP_EP_HOST_ASSERT(recv_src_idx.numel() == recv_x.size(0), "recv_src_idx must have one entry per row");
    check_dispatch_options(x_scales, recv_x_scales, topk_idx, topk_weights, recv_topk_idx, recv_topk_weights,
                           num_experts, num_ranks_);

    DispatchArgs args;
    set_dispatch_source(args, x, x_scales, topk_idx, topk_weights, is_token_in_rank);
    args.recv_x_scales = nullptr;
    if (x_scales.has_value()) {
        check_cuda_tensor(*recv_x_scales, "recv_x_scales", torch::kFloat32);
        DEEP_EP_HOST_ASSERT(recv_x_scales->dim() == 2 && recv_x_scales->size(0) == recv_x.size(0) &&
                                recv_x_scales->size(1) == args.num_scales,
                            "recv_x_scales must be [rows, num_scales]");
        args.recv_x_scales = recv_x_scales->data_ptr<float>();
    }
    args.recv_topk_idx = optional_ptr<int64_t>(recv_topk_idx, "recv_topk_idx", torch::kInt64);
    args.recv_topk_weights = optional_ptr<float>(recv_topk_weights, "recv_topk_weights", torch::kFloat32);
    if (topk_idx.has_value()) {
        DEEP_EP_HOST_ASSERT(topk_idx->size(0) == x.size(0) && topk_weights->sizes() == topk_idx->sizes() &&
                                recv_topk_idx->size(0) == recv_x.size(0) && recv_topk_idx->size(1) == args.num_topk &&
                                recv_topk_weights->sizes() == recv_topk_idx->sizes(),
                            "top-k shapes disagree");
    }
    args.recv_rank_prefix = recv_rank_prefix.data_ptr<int>();
    args.recv_x = static_cast<uint8_t*>(recv_x.data_ptr());
    args.recv_src_idx = recv_src_idx.data_ptr<int>();
    args.num_recv_rows = static_cast<int>(recv_x.size(0));
    args.fill_padding = fill_padding;
    set_row_map(row_segments, num_ranks_, args.row_segment_end, args.row_segment_delta, args.num_row_segments);
    args.num_experts = num_experts;
    args.rank = rank_;
    args.num_ranks = num_ranks_;
    args.slot = make_dispatch_slot(args.hidden_bytes, args.num_scales, args.num_topk);
    // A step is send_chunk rows of bf16 width: FP8 rows (half the bytes) publish every 2 x send_chunk
    // tokens, so a tail update covers the same bytes (4 x H200, 24 SMs: FP8 best at chunk 4 where
    // bf16 is best at 2, in every sweep; docs/benchmarks.md).
    const int step_tokens = send_chunk * std::max(1, 2 / static_cast<int>(x.element_size()));
    args.ring = make_ring(num_sms, step_tokens, ring_capacity, args.slot.bytes, 1);
    args.buffers = peers_;
    args.fail = failure_context();
    launch_intranode_dispatch(args, at::cuda::getCurrentCUDAStream());
}

void Buffer::combine(const torch::Tensor& x, const std::optional<torch::Tensor>& topk_weights,
                     const std::optional<torch::Tensor>& bias0, const std::optional<torch::Tensor>& bias1,
                     const torch::Tensor& is_token_in_rank, const torch::Tensor& recv_src_idx,
                     const torch::Tensor& recv_rank_prefix, const torch::Tensor& recv_src_num_tokens,
                     const torch::Tensor& combined_x, const std::optional<torch::Tensor>& combined_topk_weights,
                     int num_sms, int send_chunk, int ring_capacity,
                     const std::optional<torch::Tensor>& row_segments) {
    check_usable();
    check_combine_rows(x, "x", combined_x);
    check_cuda_tensor(recv_src_idx, "recv_src_idx", torch::kInt32);
    check_cuda_tensor(recv_rank_prefix, "recv_rank_prefix", torch::kInt32);
    check_cuda_tensor(recv_src_num_tokens, "recv_src_num_tokens", torch::kInt32);
    check_token_rank_map(is_token_in_rank, combined_x.size(0), num_ranks_);
    DEEP_EP_HOST_ASSERT(recv_src_idx.numel() <= x.size(0), "x has fewer rows than the handle received");
    DEEP_EP_HOST_ASSERT(topk_weights.has_value() == combined_topk_weights.has_value(),
                        "topk_weights and combined_topk_weights go together");
    check_biases(bias0, bias1, combined_x);

    CombineArgs args;
    args.x = static_cast<const uint8_t*>(x.data_ptr());
    args.topk_weights = optional_ptr<const float>(topk_weights, "topk_weights", torch::kFloat32);
    set_combine_home(args, combined_x, combined_topk_weights, is_token_in_rank, bias0, bias1);
    args.num_topk = topk_weights.has_value() ? static_cast<int>(topk_weights->size(1)) : 0;
    if (topk_weights.has_value()) {
        DEEP_EP_HOST_ASSERT(topk_weights->dim() == 2 && topk_weights->size(0) >= recv_src_idx.numel() &&
                                combined_topk_weights->dim() == 2 &&
                                combined_topk_weights->size(0) == combined_x.size(0) &&
                                combined_topk_weights->size(1) == args.num_topk,
                            "top-k weight shapes disagree");
    }
    args.recv_src_idx = recv_src_idx.data_ptr<int>();
    args.recv_rank_prefix = recv_rank_prefix.data_ptr<int>();
    args.recv_src_num_tokens = recv_src_num_tokens.data_ptr<int>();
    args.weights_offset = (args.hidden * 2 + 15) / 16 * 16;
    set_row_map(row_segments, num_ranks_, args.row_segment_end, args.row_segment_delta, args.num_row_segments);
    args.rank = rank_;
    args.num_ranks = num_ranks_;
    // Whole 128-byte lines per slot, as in dispatch (line-aligned NVLink stores).
    const int slot_bytes = (args.weights_offset + args.num_topk * 4 + 127) / 128 * 128;
    // One receiver batch (one token per warp) may need that many rows of one sub-ring at once.
    const int min_slots = (kIntranodeWarps + warps_per_peer() - 1) / warps_per_peer() + 1;
    args.ring = make_ring(num_sms, send_chunk, ring_capacity, slot_bytes, min_slots);
    args.buffers = peers_;
    args.fail = failure_context();
    launch_intranode_combine(args, at::cuda::getCurrentCUDAStream());
}

void Buffer::set_comm_stream(int64_t stream_id, int64_t device_index, int64_t device_type) {
    const c10::Stream stream = c10::Stream::unpack3(static_cast<c10::StreamId>(stream_id),
                                                    static_cast<c10::DeviceIndex>(device_index),
                                                    static_cast<c10::DeviceType>(device_type));
    DEEP_EP_HOST_ASSERT(stream.device_type() == c10::DeviceType::CUDA && stream.device_index() == device_,
                        "the comm stream must be a CUDA stream of the buffer's device");
    comm_stream_.emplace(stream);
}

CommFrame Buffer::comm_frame(bool wait_compute) const {
    DEEP_EP_HOST_ASSERT(comm_stream_.has_value(), "set_comm_stream() has not been called");
    return CommFrame(*comm_stream_, wait_compute);
}

Buffer::DispatchRows Buffer::empty_dispatch_rows(const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales,
                                                 const std::optional<torch::Tensor>& topk_idx, int64_t rows) {
    DispatchRows out;
    out.x = torch::empty({rows, x.size(1)}, x.options());
    if (x_scales.has_value()) {
        DEEP_EP_HOST_ASSERT(x_scales->dim() == 2, "x_scales must be 2-D");
        out.x_scales = torch::empty({rows, x_scales->size(1)}, x.options().dtype(torch::kFloat32));
    }
    if (topk_idx.has_value()) {
        DEEP_EP_HOST_ASSERT(topk_idx->dim() == 2, "topk_idx must be 2-D");
        out.topk_idx = torch::empty({rows, topk_idx->size(1)}, x.options().dtype(torch::kInt64));
        out.topk_weights = torch::empty({rows, topk_idx->size(1)}, x.options().dtype(torch::kFloat32));
    }
    out.src_idx = torch::empty({rows}, x.options().dtype(torch::kInt32));
    return out;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, std::optional<EventHandle>>
Buffer::dispatch_layout_on_comm_stream(const torch::Tensor& topk_idx, int num_experts, bool wait_compute,
                                       bool async_finish) {
    DEEP_EP_HOST_ASSERT(topk_idx.dim() == 2, "topk_idx must be 2-D");
    CommFrame frame = comm_frame(wait_compute);
    const auto int32 = topk_idx.options().dtype(torch::kInt32);
    torch::Tensor per_rank = torch::empty({num_ranks_}, int32);
    torch::Tensor per_expert = torch::empty({num_experts}, int32);
    torch::Tensor is_token_in_rank = torch::empty({topk_idx.size(0), num_ranks_}, topk_idx.options().dtype(torch::kBool));
    get_dispatch_layout(topk_idx, num_experts, per_rank, per_expert, is_token_in_rank);
    frame.keep_for_comm(topk_idx);
    frame.keep_for_compute(per_rank, per_expert, is_token_in_rank);
    return {per_rank, per_expert, is_token_in_rank, frame.finish(async_finish)};
}

Buffer::DispatchResult Buffer::dispatch_on_comm_stream(
    const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales, const std::optional<torch::Tensor>& topk_idx,
    const std::optional<torch::Tensor>& topk_weights, const torch::Tensor& num_tokens_per_rank,
    const torch::Tensor& num_tokens_per_expert, const torch::Tensor& is_token_in_rank, int expert_alignment,
    int num_worst_tokens, int num_sms, int send_chunk, int ring_capacity, bool wait_compute, bool async_finish) {
    check_usable();
    DEEP_EP_HOST_ASSERT(x.dim() == 2 && num_worst_tokens >= 0, "x must be 2-D and num_worst_tokens non-negative");
    DEEP_EP_HOST_ASSERT(topk_idx.has_value() == topk_weights.has_value(), "topk_idx and topk_weights go together");
    CommFrame frame = comm_frame(wait_compute);
    const auto int32 = x.options().dtype(torch::kInt32);
    torch::Tensor recv_rank_prefix = torch::empty({num_ranks_ + 1}, int32);
    torch::Tensor recv_src_num_tokens = torch::empty({num_ranks_}, int32);
    const bool padded = num_worst_tokens > 0;
    const int num_experts = static_cast<int>(num_tokens_per_expert.numel());
    // Without num_worst_tokens the host waits for the counts: the layout values are checked on
    // the device on the way (Buffer then skips its own, synchronizing check).
    notify_dispatch(num_tokens_per_rank, num_tokens_per_expert, static_cast<int>(x.size(0)), expert_alignment,
                    recv_rank_prefix, recv_src_num_tokens, !padded, padded ? std::nullopt : topk_idx,
                    padded ? std::nullopt : std::optional<torch::Tensor>(is_token_in_rank));
    int64_t rows = num_worst_tokens;
    int num_recv = -1;
    std::vector<int> per_expert;
    const auto failed = [&](int status, int flags) {
        return DispatchResult{status, flags, -1, {}, torch::Tensor(), std::nullopt, std::nullopt, std::nullopt,
                              torch::Tensor(), recv_rank_prefix, recv_src_num_tokens, std::nullopt};
    };
    if (!padded) {
        auto [ok, total, counts, check_flags] = wait_notify(num_experts / num_ranks_);
        if (!ok)
            return failed(kDispatchWaitFailed, 0);
        if (check_flags != 0)  // nothing dispatched; every rank given the same bad layout stops here too
            return failed(kDispatchBadLayout, check_flags);
        rows = num_recv = total;
        per_expert = std::move(counts);
    }
    const DispatchRows out = empty_dispatch_rows(x, x_scales, topk_idx, rows);
    dispatch(x, x_scales, topk_idx, topk_weights, is_token_in_rank, recv_rank_prefix, out.x, out.x_scales,
             out.topk_idx, out.topk_weights, out.src_idx, num_experts, padded, num_sms, send_chunk, ring_capacity,
             std::nullopt);
    frame.keep_for_comm(x, x_scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_rank,
                        num_tokens_per_expert);
    frame.keep_for_compute(out.x, out.x_scales, out.topk_idx, out.topk_weights, out.src_idx);
    return DispatchResult{kDispatchOk, 0, num_recv, std::move(per_expert), out.x, out.x_scales, out.topk_idx,
                          out.topk_weights, out.src_idx, recv_rank_prefix, recv_src_num_tokens,
                          frame.finish(async_finish)};
}

std::tuple<torch::Tensor, std::optional<torch::Tensor>, std::optional<EventHandle>> Buffer::cached_dispatch(
    const torch::Tensor& x, const std::optional<torch::Tensor>& x_scales, const torch::Tensor& is_token_in_rank,
    const torch::Tensor& recv_rank_prefix, int64_t num_rows, int num_experts, bool fill_padding, int num_sms,
    int send_chunk, int ring_capacity, bool wait_compute, bool async_finish) {
    check_usable();
    DEEP_EP_HOST_ASSERT(x.dim() == 2 && num_rows >= 0, "x must be 2-D and num_rows non-negative");
    CommFrame frame = comm_frame(wait_compute);
    // The source indices are the handle's already; the kernel writes them anyway.
    const DispatchRows out = empty_dispatch_rows(x, x_scales, std::nullopt, num_rows);
    dispatch(x, x_scales, std::nullopt, std::nullopt, is_token_in_rank, recv_rank_prefix, out.x, out.x_scales,
             std::nullopt, std::nullopt, out.src_idx, num_experts, fill_padding, num_sms, send_chunk, ring_capacity,
             std::nullopt);
    frame.keep_for_comm(x, x_scales, is_token_in_rank, recv_rank_prefix);
    frame.keep_for_compute(out.x, out.x_scales);
    return {out.x, out.x_scales, frame.finish(async_finish)};
}

std::tuple<torch::Tensor, std::optional<torch::Tensor>, std::optional<EventHandle>> Buffer::combine_on_comm_stream(
    const torch::Tensor& x, const std::optional<torch::Tensor>& topk_weights, const std::optional<torch::Tensor>& bias0,
    const std::optional<torch::Tensor>& bias1, const torch::Tensor& is_token_in_rank, const torch::Tensor& recv_src_idx,
    const torch::Tensor& recv_rank_prefix, const torch::Tensor& recv_src_num_tokens, int64_t num_tokens, int num_sms,
    int send_chunk, int ring_capacity, bool wait_compute, bool async_finish) {
    check_usable();
    DEEP_EP_HOST_ASSERT(x.dim() == 2 && num_tokens >= 0, "x must be 2-D and num_tokens non-negative");
    CommFrame frame = comm_frame(wait_compute);
    torch::Tensor combined_x = torch::empty({num_tokens, x.size(1)}, x.options().dtype(torch::kBFloat16));
    std::optional<torch::Tensor> combined_topk_weights;
    if (topk_weights.has_value()) {
        DEEP_EP_HOST_ASSERT(topk_weights->dim() == 2, "topk_weights must be 2-D");
        combined_topk_weights = torch::empty({num_tokens, topk_weights->size(1)}, x.options().dtype(torch::kFloat32));
    }
    combine(x, topk_weights, bias0, bias1, is_token_in_rank, recv_src_idx, recv_rank_prefix, recv_src_num_tokens,
            combined_x, combined_topk_weights, num_sms, send_chunk, ring_capacity, std::nullopt);
    frame.keep_for_comm(x, topk_weights, bias0, bias1, is_token_in_rank, recv_src_idx, recv_rank_prefix,
                        recv_src_num_tokens);
    frame.keep_for_compute(combined_x, combined_topk_weights);
    return {combined_x, combined_topk_weights, frame.finish(async_finish)};
}

void Buffer::barrier() {
    check_usable();
    launch_intranode_barrier(peers_, rank_, num_ranks_, failure_context(), at::cuda::getCurrentCUDAStream());
}

std::optional<ErrorRecordTuple> Buffer::get_error() const {
    return read_error_record(error_host_);
}

void Buffer::destroy(bool leak_memory) {
    if (destroyed_)
        return;
    destroyed_ = true;
    if (leak_memory)
        return;
    for (int r = 0; r < num_ranks_; ++r)
        if (r != rank_ && peers_.ptrs[r] != nullptr)
            DEEP_EP_CUDA_CHECK(cudaIpcCloseMemHandle(peers_.ptrs[r]));
    DEEP_EP_CUDA_CHECK(cudaFree(local_buffer_));
    DEEP_EP_CUDA_CHECK(free_host_mapped(&error_host_, &error_device_));
    DEEP_EP_CUDA_CHECK(free_host_mapped(&counters_host_, &counters_device_));
    local_buffer_ = nullptr;
    available_ = false;
}

}  // namespace deep_ep

PYBIND11_MODULE(deep_ep_cpp, m) {
    m.doc() = "deep_ep CUDA extension: intranode runtime and kernels";
    m.def("version", []() { return std::string("0.1.0"); });
    m.def("is_sm90_compiled", []() { return true; });
    m.attr("NVL_CONTROL_BYTES") = static_cast<int64_t>(deep_ep::kDataOffset);
    m.attr("INTRANODE_WARPS") = deep_ep::kIntranodeWarps;
    m.attr("CHECK_BAD_TOPK") = deep_ep::kCheckBadTopk;
    m.attr("CHECK_BAD_COUNTS") = deep_ep::kCheckBadCounts;
    m.attr("DISPATCH_OK") = deep_ep::Buffer::kDispatchOk;
    m.attr("DISPATCH_WAIT_FAILED") = deep_ep::Buffer::kDispatchWaitFailed;
    m.attr("DISPATCH_BAD_LAYOUT") = deep_ep::Buffer::kDispatchBadLayout;

    py::class_<deep_ep::Config>(m, "Config")
        .def(py::init<int, int, int, int, int>(), py::arg("num_sms") = 20,
             py::arg("num_max_nvl_chunked_send_tokens") = 6, py::arg("num_max_nvl_chunked_recv_tokens") = 256,
             py::arg("num_max_rdma_chunked_send_tokens") = 6, py::arg("num_max_rdma_chunked_recv_tokens") = 256)
        .def_readwrite("num_sms", &deep_ep::Config::num_sms)
        .def_readwrite("num_max_nvl_chunked_send_tokens", &deep_ep::Config::num_max_nvl_chunked_send_tokens)
        .def_readwrite("num_max_nvl_chunked_recv_tokens", &deep_ep::Config::num_max_nvl_chunked_recv_tokens)
        .def_readwrite("num_max_rdma_chunked_send_tokens", &deep_ep::Config::num_max_rdma_chunked_send_tokens)
        .def_readwrite("num_max_rdma_chunked_recv_tokens", &deep_ep::Config::num_max_rdma_chunked_recv_tokens)
        .def("get_nvl_buffer_size_hint", &deep_ep::Config::get_nvl_buffer_size_hint)
        .def("get_rdma_buffer_size_hint", &deep_ep::Config::get_rdma_buffer_size_hint);

    py::class_<deep_ep::EventHandle>(m, "EventHandle")
        .def(py::init<>())
        .def("current_stream_wait", &deep_ep::EventHandle::current_stream_wait);

    py::class_<deep_ep::Buffer>(m, "Buffer")
        .def(py::init<int, int, int64_t, double>(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_nvl_bytes"),
             py::arg("timeout_s"))
        .def("get_rank", &deep_ep::Buffer::get_rank)
        .def("get_num_ranks", &deep_ep::Buffer::get_num_ranks)
        .def("get_num_nvl_bytes", &deep_ep::Buffer::get_num_nvl_bytes)
        .def("is_available", &deep_ep::Buffer::is_available)
        .def("get_local_ipc_handle", &deep_ep::Buffer::get_local_ipc_handle)
        .def("sync", &deep_ep::Buffer::sync)
        .def("get_local_buffer_tensor", &deep_ep::Buffer::get_local_buffer_tensor)
        .def("notify_dispatch", &deep_ep::Buffer::notify_dispatch)
        .def("dispatch", &deep_ep::Buffer::dispatch)
        .def("combine", &deep_ep::Buffer::combine)
        .def("set_comm_stream", &deep_ep::Buffer::set_comm_stream)
        .def("dispatch_layout_on_comm_stream", &deep_ep::Buffer::dispatch_layout_on_comm_stream)
        .def("dispatch_on_comm_stream", &deep_ep::Buffer::dispatch_on_comm_stream)
        .def("cached_dispatch", &deep_ep::Buffer::cached_dispatch)
        .def("combine_on_comm_stream", &deep_ep::Buffer::combine_on_comm_stream)
        .def("barrier", &deep_ep::Buffer::barrier)
        .def("get_error", &deep_ep::Buffer::get_error)
        .def("destroy", &deep_ep::Buffer::destroy);

    // Development: the intranode kernels' trace (kernels/warp_trace.cuh; recorded only in an
    // extension built with KERNEL_TRACE=1), on the current device.
    m.def("intranode_trace_reset", [](bool enable) { DEEP_EP_CUDA_CHECK(deep_ep::intranode_trace_reset(enable)); },
          py::arg("enable"));
    m.def("intranode_trace_read", []() {
        std::vector<unsigned long long> cycles(static_cast<size_t>(2) * 2 * deep_ep::kMaxChannels *
                                               deep_ep::kWarpTraceSlots);
        int clock_khz = 0;
        DEEP_EP_CUDA_CHECK(deep_ep::intranode_trace_read(cycles.data(), &clock_khz));
        return py::make_tuple(cycles, clock_khz);
    });

#ifdef DEEP_EP_HAS_LOW_LATENCY
    deep_ep::register_low_latency(m);
#endif
#ifdef DEEP_EP_HAS_INTERNODE
    deep_ep::register_internode(m);
#endif
}
