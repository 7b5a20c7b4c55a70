// NVLink ceiling probe: how many bytes per second can each GPU push to (or pull from) all its
// peers at once, driven by SMs (16-byte loads/stores) or by the copy engines? Gives the ceiling
// the intranode kernels are measured against (docs/benchmarks.md). One process drives every GPU
// through peer access; every GPU sends `bytes_per_pair` to every other GPU concurrently.
//
//   nvcc -O3 -arch=sm_90 -o /tmp/nvlink_probe scripts/nvlink_probe.cu && /tmp/nvlink_probe
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                              \
    do {                                                                                         \
        cudaError_t e_ = (call);                                                                 \
        if (e_ != cudaSuccess) {                                                                 \
            std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            std::exit(1);                                                                        \
        }                                                                                        \
    } while (0)

constexpr int kMaxGpus = 8;
struct Peers {
    int4* src[kMaxGpus];  // what this GPU reads: its own buffer (push) or a peer's (pull)
    int4* dst[kMaxGpus];  // where it writes: a peer's buffer (push) or its own (pull)
};

// Block b serves peer (b % num_peers); the blocks of one peer stride over its bytes. Four 16-byte
// loads are in flight per thread before the stores.
__global__ void __launch_bounds__(512) copy_kernel(Peers peers, int num_peers, size_t num_int4) {
    const int peer = blockIdx.x % num_peers;
    const int blocks_per_peer = gridDim.x / num_peers;
    const int block_in_peer = blockIdx.x / num_peers;
    const int4* __restrict__ src = peers.src[peer];
    int4* __restrict__ dst = peers.dst[peer];
    const size_t stride = size_t(blocks_per_peer) * blockDim.x;
    size_t i = size_t(block_in_peer) * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < num_int4; i += 4 * stride) {
        int4 v0 = src[i], v1 = src[i + stride], v2 = src[i + 2 * stride], v3 = src[i + 3 * stride];
        dst[i] = v0;
        dst[i + stride] = v1;
        dst[i + 2 * stride] = v2;
        dst[i + 3 * stride] = v3;
    }
    for (; i < num_int4; i += stride) dst[i] = src[i];
}

int main(int argc, char** argv) {
    int n = 0;
    CHECK(cudaGetDeviceCount(&n));
    n = std::min(n, kMaxGpus);
    if (n < 2) {
        std::printf("nvlink_probe: needs 2+ GPUs, found %d\n", n);
        return 0;
    }
    const size_t bytes_per_pair = (argc > 1 ? std::atol(argv[1]) : 64) << 20;
    const size_t num_int4 = bytes_per_pair / sizeof(int4);
    const int peers_per_gpu = n - 1;
    // buf[g][p]: on GPU g, the slot for peer index p (send data and receive area alike).
    std::vector<std::vector<int4*>> send(n, std::vector<int4*>(n)), recv(n, std::vector<int4*>(n));
    std::vector<cudaStream_t> streams(n * n);
    std::vector<cudaEvent_t> begin(n), end(n);
    for (int g = 0; g < n; ++g) {
        CHECK(cudaSetDevice(g));
        for (int p = 0; p < n; ++p) {
            if (p != g) {
                int ok = 0;
                CHECK(cudaDeviceCanAccessPeer(&ok, g, p));
                if (!ok) {
                    std::printf("nvlink_probe: GPU %d cannot reach GPU %d by P2P\n", g, p);
                    return 0;
                }
                CHECK(cudaDeviceEnablePeerAccess(p, 0));
            }
            CHECK(cudaMalloc(&send[g][p], bytes_per_pair));
            CHECK(cudaMalloc(&recv[g][p], bytes_per_pair));
            CHECK(cudaMemset(send[g][p], 0x5a + g + p, bytes_per_pair));  // not zeros
            CHECK(cudaStreamCreateWithFlags(&streams[g * n + p], cudaStreamNonBlocking));
        }
        CHECK(cudaEventCreate(&begin[g]));
        CHECK(cudaEventCreate(&end[g]));
    }
    for (int g = 0; g < n; ++g) {
        CHECK(cudaSetDevice(g));
        CHECK(cudaDeviceSynchronize());
    }
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    std::printf("nvlink_probe: %d x %s, %zu MiB per ordered pair, egress = %d x that per GPU\n", n, prop.name,
                bytes_per_pair >> 20, peers_per_gpu);

    // mode 0: SM push (local read, remote write); 1: SM pull (remote read, local write); 2: copy engines.
    // rail: every GPU g exchanges with GPU g ^ (n / 2) only (the rail leg of the internode kernels
    // as 2 nodes x n/2), else with every other GPU. count: 16-byte words per ordered pair.
    auto run_once = [&](int mode, int blocks, bool rail, size_t count) {
        for (int g = 0; g < n; ++g) {
            CHECK(cudaSetDevice(g));
            cudaStream_t s = streams[g * n + g];
            CHECK(cudaEventRecord(begin[g], s));
            if (mode < 2) {
                Peers peers{};
                int k = 0;
                for (int p = 0; p < n; ++p) {
                    if (p == g || (rail && p != (g ^ (n / 2)))) continue;
                    peers.src[k] = mode == 0 ? send[g][p] : send[p][g];
                    peers.dst[k] = mode == 0 ? recv[p][g] : recv[g][p];
                    ++k;
                }
                copy_kernel<<<blocks, 512, 0, s>>>(peers, k, count);
                CHECK(cudaGetLastError());
            } else {
                for (int p = 0; p < n; ++p) {
                    if (p == g) continue;
                    cudaStream_t ps = streams[g * n + p];
                    CHECK(cudaStreamWaitEvent(ps, begin[g], 0));
                    CHECK(cudaMemcpyPeerAsync(recv[p][g], p, send[g][p], g, count * sizeof(int4), ps));
                    cudaEvent_t done;
                    CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
                    CHECK(cudaEventRecord(done, ps));
                    CHECK(cudaStreamWaitEvent(s, done, 0));
                    CHECK(cudaEventDestroy(done));
                }
            }
            CHECK(cudaEventRecord(end[g], s));
        }
        float worst = 0;
        for (int g = 0; g < n; ++g) {
            CHECK(cudaSetDevice(g));
            CHECK(cudaEventSynchronize(end[g]));
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, begin[g], end[g]));
            worst = std::max(worst, ms);
        }
        return worst;
    };
    auto median_ms = [&](int mode, int blocks, bool rail, size_t count) {
        std::vector<float> times;
        for (int it = 0; it < 12; ++it) {
            float ms = run_once(mode, blocks, rail, count);
            if (it >= 2) times.push_back(ms);
        }
        std::sort(times.begin(), times.end());
        return times[times.size() / 2];
    };
    const char* names[] = {"SM push", "SM pull", "copy engines"};
    const int block_counts[] = {6, 12, 24, 48, 96, 132, 264};
    for (int mode = 0; mode < 3; ++mode) {
        for (int blocks : block_counts) {
            if (mode == 2 && blocks != block_counts[0]) break;
            const float ms = median_ms(mode, blocks, false, num_int4);
            const double egress = double(bytes_per_pair) * peers_per_gpu / (ms * 1e-3) / 1e9;
            if (mode == 2)
                std::printf("%-12s            : %8.1f us  egress %6.1f GB/s per GPU (logical x%d/%d: %6.1f)\n",
                            names[mode], ms * 1e3, egress, n, n - 1, egress * n / (n - 1));
            else
                std::printf("%-12s blocks=%4d : %8.1f us  egress %6.1f GB/s per GPU (logical x%d/%d: %6.1f)\n",
                            names[mode], blocks, ms * 1e3, egress, n, n - 1, egress * n / (n - 1));
        }
    }
    // The rail leg alone: each GPU pushes to one peer (GPU g ^ n/2) while that peer pushes back.
    if (n % 2 == 0) {
        for (int blocks : {6, 12, 24, 48, 132}) {
            const float ms = median_ms(0, blocks, true, num_int4);
            std::printf("SM push, rail pairs only, blocks=%4d : %8.1f us  egress %6.1f GB/s per GPU\n", blocks,
                        ms * 1e3, double(bytes_per_pair) / (ms * 1e-3) / 1e9);
        }
    }
    // A burst the size of the low-latency dispatch's (128 tokens x ~7.4 KB, to each other GPU
    // ~85 % of tokens): the event time of one kernel launch, launch and ramp included.
    for (size_t kib : {256, 896, 4096}) {
        const size_t count = std::min(num_int4, kib * 1024 / sizeof(int4));
        for (int blocks : {32, 64, 128}) {
            const float ms = median_ms(0, blocks, false, count);
            std::printf("SM push burst %5zu KiB per pair, blocks=%4d : %7.2f us  egress %6.1f GB/s per GPU\n", kib,
                        blocks, ms * 1e3, double(count * sizeof(int4)) * peers_per_gpu / (ms * 1e-3) / 1e9);
        }
    }
    return 0;
}
