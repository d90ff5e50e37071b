// The memory side of `bench --emulate`, compiled on first use by nvcc (edge_preattn/emulate.py).
//
// An MPS client share caps a benchmark's SMs but leaves it most of an H100's memory bandwidth; a
// consumer card has a fraction of it. This program is the other MPS client: it keeps the memory busy
// so that the benchmark sees about a consumer card's bandwidth, and it measures what the benchmark sees.
//
//   emulate_load probe          print "sms=N device_copy_GBps=X" for this client (a 256 MiB copy loop)
//   emulate_load load DUTY      copy in a loop, busy DUTY (0..1] of every 2 ms, until killed
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <thread>

static void check(cudaError_t status, const char * what) {
    if (status != cudaSuccess) {
        std::fprintf(stderr, "emulate_load: %s: %s\n", what, cudaGetErrorString(status));
        std::exit(1);
    }
}

__global__ void copy_kernel(const int4 * src, int4 * dst, size_t n) {
    for (size_t i = blockIdx.x * (size_t) blockDim.x + threadIdx.x; i < n; i += (size_t) gridDim.x * blockDim.x) {
        dst[i] = src[i];
    }
}

struct Buffers {
    int4 * src = nullptr;
    int4 * dst = nullptr;
    size_t n   = 0;
    int    sms = 0;  // an MPS client sees its own share of the SMs here

    explicit Buffers(size_t bytes) : n(bytes / sizeof(int4)) {
        check(cudaMalloc(&src, bytes), "cudaMalloc");
        check(cudaMalloc(&dst, bytes), "cudaMalloc");
        check(cudaMemset(src, 1, bytes), "cudaMemset");
        check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), "SM count");
    }

    void copy() const { copy(0, n); }

    // elements [first, first + count) of src into dst
    void copy(size_t first, size_t count) const { copy_kernel<<<sms * 8, 256>>>(src + first, dst + first, count); }
};

static int probe() {
    const size_t bytes = 256u << 20;
    Buffers buffers(bytes);
    for (int i = 0; i < 3; ++i) {
        buffers.copy();
    }
    check(cudaDeviceSynchronize(), "warm-up");
    cudaEvent_t start, stop;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&stop), "cudaEventCreate");
    const int rounds = 40;
    check(cudaEventRecord(start), "cudaEventRecord");
    for (int i = 0; i < rounds; ++i) {
        buffers.copy();
    }
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float elapsed_ms = 0.0f;
    check(cudaEventElapsedTime(&elapsed_ms, start, stop), "cudaEventElapsedTime");
    const double gbps = 2.0 * bytes * rounds / (elapsed_ms * 1e-3) / 1e9;  // read + write
    std::printf("sms=%d device_copy_GBps=%.1f\n", buffers.sms, gbps);
    return 0;
}

static int load(double duty) {
    if (!(duty > 0.0 && duty <= 1.0)) {
        std::fprintf(stderr, "emulate_load: DUTY must be in (0, 1], got %g\n", duty);
        return 2;
    }
    // Far larger than any L2 (an H100 or H200 has 50 MB): a loop over buffers that L2 nearly holds keeps
    // the cache busy, not the memory. Copied in 64 MiB chunks, a few tens of microseconds each, so the
    // duty cycle stays fine-grained, with two chunks queued at a time so the copies leave no gaps.
    Buffers buffers(size_t(1) << 30);
    const size_t chunk = (size_t(64) << 20) / sizeof(int4);
    const auto period = std::chrono::microseconds(2000);
    const auto busy   = std::chrono::duration_cast<std::chrono::microseconds>(period * duty);
    std::printf("ready\n");
    std::fflush(stdout);
    size_t next = 0;
    for (;;) {
        const auto begin = std::chrono::steady_clock::now();
        while (std::chrono::steady_clock::now() - begin < busy) {
            for (int queued = 0; queued < 2; ++queued, next = (next + chunk) % buffers.n) {
                buffers.copy(next, chunk);
            }
            check(cudaStreamSynchronize(0), "copy");
        }
        std::this_thread::sleep_until(begin + period);
    }
}

int main(int argc, char ** argv) {
    if (argc == 2 && std::string_view(argv[1]) == "probe") {
        return probe();
    }
    if (argc == 3 && std::string_view(argv[1]) == "load") {
        return load(std::atof(argv[2]));
    }
    std::fprintf(stderr, "usage: emulate_load probe | emulate_load load DUTY\n");
    return 2;
}
