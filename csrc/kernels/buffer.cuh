// Layout of each rank's NVLink buffer, identical on every rank, and typed views into it.
//
//   [header]   barrier signals (written by peers), local-only state (notify sequence number)
//   [notify]   2 parities x kMaxRanks source slots: counts a source sends to this rank
//   [counters] per (channel, peer, warp): tail, meta count, meta start (written by the peer that
//              sends to this rank), head (written by the peer that receives from this rank)
//   [data]     one slice per source peer; inside it, one ring of `capacity` slots per channel
//
// Every counter a GPU polls lives in that GPU's own memory (KERNELS.md). Slices are fixed per
// source, so a change of channel count or slot size between calls never makes two senders'
// rings overlap.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "exception.cuh"
#ifdef __CUDACC__
#include "utils.cuh"
#endif

namespace deep_ep {

constexpr int kMaxRanks = 8;             // ranks of one NVLink domain
constexpr int kMaxChannels = 64;         // num_sms / 2
constexpr int kMaxWarpsPerPeer = 32;
constexpr int kMaxLocalExperts = 1024;
constexpr int kNotifySlotInts = 2 + kMaxLocalExperts;  // [tokens to me, sender's num_tokens, per local expert]

constexpr size_t kSignalOffset = 0;                      // int[kMaxRanks]
constexpr size_t kNotifySeqOffset = 64;                  // int, local only
constexpr size_t kAbortFlagOffset = 128;                 // int, local only
constexpr size_t kCheckOffset = 192;                     // int[1 + kMaxRanks], local only: dispatch value checks
constexpr size_t kNotifyOffset = 256;
constexpr size_t kNotifyBytes = sizeof(int) * 2 * kMaxRanks * kNotifySlotInts;
constexpr size_t kCounterArrayInts = static_cast<size_t>(kMaxChannels) * kMaxRanks * kMaxWarpsPerPeer;
constexpr size_t kCounterOffset = (kNotifyOffset + kNotifyBytes + 127) / 128 * 128;
constexpr size_t kCounterBytes = 4 * kCounterArrayInts * sizeof(int);
constexpr size_t kDataOffset = (kCounterOffset + kCounterBytes + 4095) / 4096 * 4096;

enum CounterKind : int { kCounterTail = 0, kCounterMetaCount = 1, kCounterMetaStart = 2, kCounterHead = 3 };

struct PeerBuffers {
    uint8_t* ptrs[kMaxRanks];  // every rank's buffer, mapped into this process (own one included)
};

// Ring geometry of one call; the same on every rank because every input to it is.
struct RingGeometry {
    int num_channels;
    int warps_per_peer;  // W: each (channel, peer) ring is W interleaved single-writer sub-rings
    int capacity;        // slots per (channel, peer) ring, a multiple of W
    int slot_bytes;      // multiple of 16
    int publish_every;   // a warp publishes its tail/head after this many of its tokens
    size_t slice_bytes;  // data bytes per source peer
};

__host__ __device__ __forceinline__ int* signal_ptr(uint8_t* buffer, int index) {
    return reinterpret_cast<int*>(buffer + kSignalOffset) + index;
}

__host__ __device__ __forceinline__ int* notify_slot(uint8_t* buffer, int parity, int source) {
    return reinterpret_cast<int*>(buffer + kNotifyOffset) + (parity * kMaxRanks + source) * kNotifySlotInts;
}

__host__ __device__ __forceinline__ int* counter_ptr(uint8_t* buffer, CounterKind kind, int channel, int peer,
                                                     int warp) {
    return reinterpret_cast<int*>(buffer + kCounterOffset) + kind * kCounterArrayInts +
           (static_cast<size_t>(channel) * kMaxRanks + peer) * kMaxWarpsPerPeer + warp;
}

// The ring in `buffer` (the receiver's) that carries channel `channel` from `source`.
__host__ __device__ __forceinline__ uint8_t* ring_ptr(uint8_t* buffer, const RingGeometry& ring, int source,
                                                      int channel) {
    return buffer + kDataOffset + ring.slice_bytes * source +
           static_cast<size_t>(channel) * ring.capacity * ring.slot_bytes;
}

// Cross-rank barrier for one block, self-resetting: each rank adds kTag to its own slot for
// every peer and subtracts kTag from its slot in every peer, then waits until all of its own
// slots are back at or below zero. Ranks can be at most one barrier apart, which keeps the
// sums unambiguous. Returns false (in every thread) if the wait failed.
constexpr int kBarrierTag = 1 << 20;  // deep_ep/utils.py BARRIER_TAG decodes timeouts with it

#ifdef __CUDACC__
__device__ __forceinline__ bool barrier_block(const PeerBuffers& buffers, int rank, int num_ranks,
                                              const FailureContext& fail, int kernel) {
    __shared__ int s_barrier_failed;
    if (threadIdx.x == 0)
        s_barrier_failed = 0;
    __syncthreads();
    const int peer = static_cast<int>(threadIdx.x);
    if (peer < num_ranks) {
        // Orders this block's earlier stores (made visible to this thread by __syncthreads)
        // before the signal the peer waits on.
        __threadfence_system();
        atomicAdd_system(signal_ptr(buffers.ptrs[rank], peer), kBarrierTag);
        atomicSub_system(signal_ptr(buffers.ptrs[peer], rank), kBarrierTag);
        int seen;
        if (!wait_value(fail, signal_ptr(buffers.ptrs[rank], peer), [](int v) { return v <= 0; }, seen, kernel,
                        peer, kWaitBarrier, -1, 0))
            s_barrier_failed = 1;
    }
    __syncthreads();
    return s_barrier_failed == 0;
}
#endif  // __CUDACC__

}  // namespace deep_ep
