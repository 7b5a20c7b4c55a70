// One communication call under the stream rules of DESIGN.md §4, on the C++ side: the comm
// stream waits for the compute stream, the call's outputs are allocated and its kernels run on
// the comm stream, its tensors stay alive for both streams, then the compute stream waits for
// the call or its event is returned (async_finish).
//
// The Python side does the same for the calls without a frame here (TorchBackend._on_comm_stream
// / _finish); for an intranode cached dispatch or combine those stream switches, record_stream
// calls and events were ~100 of the ~130 us of host time per call on the lent hosts
// (docs/benchmarks.md).
#pragma once

#include <optional>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/types.h>

#include "event.hpp"

namespace deep_ep {

class CommFrame {
public:
    // With `wait_compute` false the caller has already made the comm stream wait (for the
    // previous_event of the call).
    CommFrame(const at::cuda::CUDAStream& comm, bool wait_compute)
        : compute_(at::cuda::getCurrentCUDAStream()), comm_(comm) {
        if (wait_compute)
            EventHandle(compute_).stream_wait(comm_);
        guard_.emplace(comm_);
    }

    // The call's inputs: their memory is not reused before the comm stream's work on them.
    template <typename... Tensors>
    void keep_for_comm(const Tensors&... tensors) {
        (record(comm_, tensors), ...);
    }

    // The call's outputs (allocated on the comm stream): not reused before the compute stream's
    // work on them.
    template <typename... Tensors>
    void keep_for_compute(const Tensors&... tensors) {
        (record(compute_, tensors), ...);
    }

    // Back on the compute stream: it waits for the call, or the call's event is returned.
    std::optional<EventHandle> finish(bool async_finish) {
        EventHandle done(comm_);
        guard_.reset();
        if (async_finish)
            return done;
        done.current_stream_wait();
        return std::nullopt;
    }

private:
    static void record(const at::cuda::CUDAStream& stream, const torch::Tensor& t) {
        if (t.defined())
            t.record_stream(stream);
    }
    static void record(const at::cuda::CUDAStream& stream, const std::optional<torch::Tensor>& t) {
        if (t.has_value())
            record(stream, *t);
    }

    at::cuda::CUDAStream compute_, comm_;
    std::optional<c10::cuda::CUDAStreamGuard> guard_;
};

}  // namespace deep_ep
