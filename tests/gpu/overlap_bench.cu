// Can a prompt step hide its decode rows' KV reads under its prompt rows' products (issue 9,
// `serve_1024_128`)? Outside tpserve: a prompt step's products (Llama-3-8B's four at 8,192 rows,
// 32 layers, cuBLASLt as worker/src/cuda/blas.rs runs them) on one stream, and a memory-bound
// stand-in for the decode rows' attention (a streaming read of 1.1 GB a layer: 248 rows x 1,024
// keys x 128 KiB / 32 layers, from HBM) on a second stream of higher priority, timed
//   1. each alone, and one after the other (what a step does today);
//   2. side by side, the read on G persistent blocks (one an SM), the products on every SM;
//   3. side by side with the products given only 132 - G SMs (cuBLASLt's SM count target), so
//      that the read's blocks have SMs of their own from the start.
// "saved" is what the side-by-side run saves against today's order (the products on every SM,
// then the read on a full grid), also as a share of that read's time; the products' TFLOP/s
// alone with the SM target show what the SMs given up cost them.
//
// Why: session 47 found that 0.70 needs the decode rows' KV reads (~12 ms of a ~200 ms bf16
// prompt step on an H100, and ~12 ms of each decode-only step) off the critical path; run 61's
// overlap of the decode rows' attention with the prompt rows' attention hid 0.65 ms, because the
// prompt kernel holds every SM until its grid drains. Before restructuring the step
// (NanoFlow-style: the decode rows' attention and o projection beside the prompt rows' products),
// this measures how much a memory-bound kernel can hide under cuBLAS's products at all.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels/cuda tests/gpu/overlap_bench.cu -o /tmp/ob \
//       -lcublasLt
//   /tmp/ob
// Environment: ROWS (prompt rows, default 8192), READ_MB (MB read a layer, default 1100).
// scripts/check-kernels.sh compiles every harness with the CUDA wheels' headers, which have no
// cuBLAS: there the file builds to a main that says so.
#include "harness.cuh"

#if !__has_include(<cublasLt.h>)
int main() {
    printf("overlap_bench: built without cuBLAS's headers (cublasLt.h); nothing to measure\n");
    return 2;
}
#else
static const int LAYERS = 32;

// The decode rows' KV reads stand-in: `blocks` persistent blocks of kReadThreads threads stream
// `n16` 16-byte words, kReadUnroll loads in flight a thread (128 KiB a block: a few SMs must
// be able to pull a large share of the bandwidth, as a decode kernel built to run beside the
// products would), and fold them so the loads are not removed.
constexpr int kReadThreads = 1024;
constexpr int kReadUnroll = 8;
__global__ void __launch_bounds__(kReadThreads) stream_read(const uint4* __restrict__ p,
                                                            size_t n16,
                                                            unsigned* __restrict__ sink) {
    unsigned acc = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i + (kReadUnroll - 1) * stride < n16; i += kReadUnroll * stride) {
        uint4 v[kReadUnroll];
#pragma unroll
        for (int u = 0; u < kReadUnroll; ++u) v[u] = __ldcs(p + i + u * stride);
#pragma unroll
        for (int u = 0; u < kReadUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    for (; i < n16; i += stride) {
        const uint4 v = __ldcs(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) *sink = acc;
}

int main() {
    const int rows = getenv("ROWS") ? atoi(getenv("ROWS")) : 8192;
    const size_t read_mb = getenv("READ_MB") ? atoi(getenv("READ_MB")) : 1100;
    const size_t read_bytes = read_mb * 1000000;
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cublasLtHandle_t lt;
    CB(cublasLtCreate(&lt));
    void* workspace;
    CK(cudaMalloc(&workspace, LT_WORKSPACE));

    // Weights and activations uniform in [-1, 1] as the floor's are (the products run near the
    // power limit, so their values matter: zeros would run cooler and faster), and two read
    // buffers, alternated so that each layer's read comes from HBM.
    bf* w[4];
    size_t max_in = 0, max_out = 0;
    for (int p = 0; p < 4; ++p) {
        const ProductShape& s = LLAMA3_8B_PRODUCTS[p];
        w[p] = random_buffer((size_t)s.n * s.k, 11 + p);
        max_in = std::max(max_in, (size_t)rows * s.k);
        max_out = std::max(max_out, (size_t)rows * s.n);
    }
    bf* x = random_buffer(max_in, 7);
    bf* y;
    CK(cudaMalloc(&y, max_out * sizeof(bf)));
    uint4* kv[2];
    for (auto& b : kv) {
        CK(cudaMalloc(&b, read_bytes));
        CK(cudaMemset(b, 0, read_bytes));
    }
    unsigned* sink;
    CK(cudaMalloc(&sink, sizeof(unsigned)));

    int lo, hi;
    CK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    cudaStream_t sa, sb;
    CK(cudaStreamCreateWithPriority(&sa, cudaStreamNonBlocking, lo));
    CK(cudaStreamCreateWithPriority(&sb, cudaStreamNonBlocking, hi));
    cudaEvent_t start, b_done, end;
    CK(cudaEventCreate(&start));
    CK(cudaEventCreate(&b_done));
    CK(cudaEventCreate(&end));

    double flops = 0;
    for (const ProductShape& p : LLAMA3_8B_PRODUCTS) flops += 2.0 * rows * p.n * p.k * LAYERS;

    // A layer's products on `sa` (the heuristic's first algorithm of each plan), 32 times.
    auto products = [&](const LtShape (&plan)[4]) {
        for (int l = 0; l < LAYERS; ++l) {
            for (int p = 0; p < 4; ++p) gemm_lt(lt, plan[p], 0, y, x, w[p], workspace, sa);
        }
    };
    // A layer's read on `sb` on `blocks` blocks (0: one on every SM), 32 times.
    auto reads = [&](int blocks) {
        const int grid = blocks > 0 ? blocks : sms;
        for (int l = 0; l < LAYERS; ++l) {
            stream_read<<<grid, kReadThreads, 0, sb>>>(kv[l % 2], read_bytes / 16, sink);
        }
        CK(cudaGetLastError());
    };
    // Milliseconds of the products and/or the reads, side by side when both, from a common start
    // (median of 3 after one untimed run).
    auto run_ms = [&](const LtShape(*plan)[4], int blocks) {
        std::vector<double> t;
        for (int rep = 0; rep < 4; ++rep) {
            CK(cudaEventRecord(start, sa));
            CK(cudaStreamWaitEvent(sb, start));
            if (plan) products(*plan);
            if (blocks >= 0) reads(blocks);
            CK(cudaEventRecord(b_done, sb));
            CK(cudaStreamWaitEvent(sa, b_done));
            CK(cudaEventRecord(end, sa));
            CK(cudaEventSynchronize(end));
            float ms;
            CK(cudaEventElapsedTime(&ms, start, end));
            if (rep > 0) t.push_back(ms);
        }
        std::sort(t.begin(), t.end());
        return t[t.size() / 2];
    };

    LtShape full[4];
    for (int p = 0; p < 4; ++p) {
        full[p] = lt_shape(lt, rows, LLAMA3_8B_PRODUCTS[p].n, LLAMA3_8B_PRODUCTS[p].k, 1);
    }
    const double gemm_ms = run_ms(&full, -1);
    const double read_ms = run_ms(nullptr, 0);
    printf("%d SMs; %d prompt rows, 32 layers' products %.2f ms (%.0f TFLOP/s); reads of %.0f MB "
           "a layer on a full grid %.2f ms (%.0f GB/s); one after the other %.2f ms\n\n",
           sms, rows, gemm_ms, flops / gemm_ms / 1e9, read_bytes / 1e6, read_ms,
           read_bytes * (double)LAYERS / read_ms / 1e6, gemm_ms + read_ms);
    printf("| read blocks (one an SM) | products' SMs | products alone, ms (TFLOP/s) | reads "
           "alone, ms | side by side, ms | saved against one after the other, ms (of the reads) "
           "|\n| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for (int blocks : {4, 8, 16, 24, 32, 48, 66}) {
        const double alone_read = run_ms(nullptr, blocks);
        for (int target : {0, sms - blocks}) {
            LtShape plan[4];
            for (int p = 0; p < 4; ++p) {
                const ProductShape& s = LLAMA3_8B_PRODUCTS[p];
                plan[p] = target ? lt_shape(lt, rows, s.n, s.k, 1, target) : full[p];
            }
            const double alone_gemm = target ? run_ms(&plan, -1) : gemm_ms;
            const double both = run_ms(&plan, blocks);
            const double saved = gemm_ms + read_ms - both;
            printf("| %d | %d | %.2f (%.0f) | %.2f | %.2f | %.2f (%.0f%%) |\n", blocks,
                   target ? target : sms, alone_gemm, flops / alone_gemm / 1e9, alone_read, both,
                   saved, 100.0 * saved / read_ms);
        }
    }
    return 0;
}
#endif
