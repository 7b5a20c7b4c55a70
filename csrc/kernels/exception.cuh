// Error handling shared by the kernels and the runtime: host-side checks that throw, and the
// error record through which a kernel reports a timeout (or another fatal condition) to the host
// without __trap(), which would kill the whole CUDA context.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

namespace deep_ep {

// Thrown by the host side for any failed CUDA call; pybind11 turns it into RuntimeError.
class CudaError : public std::runtime_error {
public:
    explicit CudaError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace deep_ep

#define DEEP_EP_CUDA_CHECK(call)                                                                    \
    do {                                                                                            \
        const cudaError_t deep_ep_status_ = (call);                                                 \
        if (deep_ep_status_ != cudaSuccess) {                                                       \
            throw ::deep_ep::CudaError(std::string("CUDA error ") + cudaGetErrorString(deep_ep_status_) + \
                                       " at " __FILE__ ":" + std::to_string(__LINE__) + ": " #call); \
        }                                                                                           \
    } while (0)

#define DEEP_EP_HOST_ASSERT(cond, message)                                                           \
    do {                                                                                            \
        if (!(cond)) {                                                                              \
            throw std::invalid_argument(std::string("deep_ep: ") + (message) + " (" #cond ")");      \
        }                                                                                           \
    } while (0)

namespace deep_ep {

// What went wrong. Codes and names are mirrored in deep_ep/cuda_backend.py.
enum ErrorCode : int32_t { kErrorNone = 0, kErrorTimeout = 1, kErrorOverflow = 2 };
enum KernelId : int32_t { kKernelNotify = 1, kKernelDispatch = 2, kKernelCombine = 3, kKernelBarrier = 4 };
enum WaitTarget : int32_t {
    kWaitBarrier = 1,       // a peer's arrival at a cross-rank barrier
    kWaitRingTail = 2,      // data a peer's sender has not published yet
    kWaitRingHead = 3,      // free ring slots a peer's receiver has not released yet
    kWaitRingMeta = 4,      // a peer sender's token count for a ring
    kWaitRingAck = 5,       // a peer receiver's end-of-call acknowledgement
    kWaitRowCapacity = 6,   // (overflow) more received rows than the output holds
};

// Lives in host-mapped (pinned) memory; written once, by the first failing thread.
struct ErrorRecord {
    int32_t code;       // ErrorCode; claimed with a system-scope CAS from 0
    int32_t kernel;     // KernelId
    int32_t rank;       // the rank that observed the failure
    int32_t peer;       // the rank it waited on (-1 if none)
    int32_t target;     // WaitTarget
    int32_t channel;    // channel (block pair) index, -1 if none
    int64_t value_seen; // the last value read
    int64_t expected;   // the value (or bound) it waited for
};

// Per-launch context of every kernel that can fail.
struct FailureContext {
    ErrorRecord* record;         // device pointer of the host-mapped record
    int* abort_flag;             // local device memory: set once any thread of this rank failed
    unsigned long long timeout_ns;
    int rank;
};

}  // namespace deep_ep
