// EventHandle: a CUDA event recorded on a stream, for ordering work between streams.
#pragma once

#include <memory>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>

namespace deep_ep {

class EventHandle {
public:
    // Records on the current stream.
    EventHandle() : event_(std::make_shared<at::cuda::CUDAEvent>()) {
        event_->record(at::cuda::getCurrentCUDAStream());
    }

    explicit EventHandle(const at::cuda::CUDAStream& stream) : event_(std::make_shared<at::cuda::CUDAEvent>()) {
        event_->record(stream);
    }

    void current_stream_wait() const { event_->block(at::cuda::getCurrentCUDAStream()); }

    void stream_wait(const at::cuda::CUDAStream& stream) const { event_->block(stream); }

private:
    std::shared_ptr<at::cuda::CUDAEvent> event_;
};

}  // namespace deep_ep
