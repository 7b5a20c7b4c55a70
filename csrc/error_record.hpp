// Host side of the kernels' error record (csrc/kernels/exception.cuh): the one reader that every
// runtime uses, so that the Python layer sees the same tuple from each.
#pragma once

#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>

#include "kernels/exception.cuh"

namespace deep_ep {

// (code, kernel, rank, peer, target, channel, value_seen, expected)
using ErrorRecordTuple = std::tuple<int, int, int, int, int, int, int64_t, int64_t>;

// Whether any kernel has written the record (a runtime refuses further work after that, as a peer
// may have given up on this rank mid-call).
inline bool error_recorded(const ErrorRecord* host_record) {
    const volatile ErrorRecord* record = host_record;
    return record->code != 0;
}

// A kernel fills the record, then publishes `code` last behind a system-scope fence; a positive
// code means the fields before it are complete.
inline std::optional<ErrorRecordTuple> read_error_record(const ErrorRecord* host_record) {
    if (host_record == nullptr)
        return std::nullopt;
    const volatile ErrorRecord* record = host_record;
    const int code = record->code;
    if (code <= 0)
        return std::nullopt;
    std::atomic_thread_fence(std::memory_order_acquire);
    return std::make_tuple(code, static_cast<int>(record->kernel), static_cast<int>(record->rank),
                           static_cast<int>(record->peer), static_cast<int>(record->target),
                           static_cast<int>(record->channel), static_cast<int64_t>(record->value_seen),
                           static_cast<int64_t>(record->expected));
}

}  // namespace deep_ep
