// Timing of lora.cu's kernels alone, outside tpserve (issue 10): the shrink and expand of each
// fused product of one Llama-3-8B layer (q|k|v, o, gate|up, down) for ROWS decode rows over
// ADAPTERS adapters (row i uses adapter i mod ADAPTERS, as `bench serve --lora-modules` spreads
// requests) in slots of rank stride R holding adapters of rank RANK. Each product is timed in a
// CUDA graph of 100 applications with programmatic dependent launches (as the decode graphs run
// them), with A and B in LAYERS copies so that they come from HBM, not L2, and then behind a
// 32 MB weight stream standing in for the base product before it. The output is checked against
// a double-precision CPU reference.
//
// Why: the kernels' cost decides LoRA's decode throughput, and the GPU machine has no profiler;
// this times them in seconds instead of a whole server run (docs/PERFORMANCE.md, issue 10).
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90 -std=c++17 -I kernels/cuda tests/gpu/lora_kernels_bench.cu -o /tmp/lb
//   /tmp/lb [ROWS=64] [ADAPTERS=8] [R=16] [RANK=R]
// Environment: LAYERS (default 32). Launch shapes as worker/src/cuda/kernels/lora.rs's lora_delta.
#include "lora.cu"

#include "harness.cuh"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>


// kernels/lora.rs: threads of the expand.
static const int EXPAND_THREADS = 256;

// The base product before a delta: streams `n` 16-byte words once.
extern "C" __global__ void weight_stream(const uint4* w, long long n, unsigned* sink) {
    tpserve::wait_for_inputs();
    unsigned acc = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const uint4 v = w[i];
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) {
        *sink = acc;
    }
}

struct Product {
    const char* name;
    int in, out, groups, bound1, bound2;
};

static float frand(unsigned& s) {
    s = s * 1664525u + 1013904223u;
    return ((s >> 8) & 0xffff) / 65536.0f - 0.5f;
}

static void fill(std::vector<bf>& v, unsigned seed, float scale) {
    for (auto& x : v) x = __float2bfloat16(frand(seed) * scale);
}

static cudaLaunchConfig_t config(cudaStream_t st, cudaLaunchAttribute* pdl, dim3 grid, dim3 block,
                                 size_t smem) {
    cudaLaunchConfig_t c = {};
    pdl->id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl->val.programmaticStreamSerializationAllowed = 1;
    c.attrs = pdl;
    c.numAttrs = 1;
    c.stream = st;
    c.gridDim = grid;
    c.blockDim = block;
    c.dynamicSmemBytes = smem;
    return c;
}

int main(int argc, char** argv) {
    const int rows = argc > 1 ? atoi(argv[1]) : 64;
    const int adapters = argc > 2 ? atoi(argv[2]) : 8;
    const int R = argc > 3 ? atoi(argv[3]) : 16;
    const int rank = argc > 4 ? atoi(argv[4]) : R;
    const int layers = getenv("LAYERS") ? atoi(getenv("LAYERS")) : 32;
    const int slots = adapters;
    // The graphs' tile count (LoraSlots::max_tiles), of which the step fills some.
    const int max_tiles = std::min(rows, (rows + 7) / 8 + slots);
    const Product products[4] = {{"qkv", 4096, 6144, 3, 4096, 5120},
                                 {"o", 4096, 4096, 1, 4096, 4096},
                                 {"gate_up", 4096, 28672, 2, 14336, 28672},
                                 {"down", 14336, 4096, 1, 4096, 4096}};
    std::vector<int> tiles(max_tiles * TPSERVE_LORA_TILE_INTS, 0);
    int num_tiles = 0;
    for (int s = 0; s < adapters; ++s) {
        int cur = -1;
        for (int i = s; i < rows; i += adapters) {
            if (cur < 0 || tiles[cur * 16 + 1] == TPSERVE_LORA_TILE_ROWS) {
                cur = num_tiles++;
                tiles[cur * 16] = s;
                tiles[cur * 16 + TPSERVE_LORA_TILE_RANK] = rank;
            }
            tiles[cur * 16 + 2 + tiles[cur * 16 + 1]++] = i;
        }
    }
    printf("%d rows over %d adapters, rank %d in slots of stride %d: %d tiles (%d launched)\n",
           rows, adapters, rank, R, num_tiles, max_tiles);
    int* d_tiles;
    CK(cudaMalloc(&d_tiles, tiles.size() * 4));
    CK(cudaMemcpy(d_tiles, tiles.data(), tiles.size() * 4, cudaMemcpyHostToDevice));
    float* d_t;
    CK(cudaMalloc(&d_t, (size_t)8 * rows * 3 * R * 4));
    const long long stream_words = (32ll << 20) / 16;
    uint4* d_stream;
    unsigned* d_sink;
    CK(cudaMalloc(&d_stream, (size_t)stream_words * 16 * layers));
    CK(cudaMemset(d_stream, 0, (size_t)stream_words * 16 * layers));
    CK(cudaMalloc(&d_sink, 4));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    printf("| product | alone, us | behind a 32 MB stream, +us | adapter bytes, MB | max error "
           "(largest output) |\n| --- | --- | --- | --- | --- |\n");
    double alone_total = 0, behind_total = 0;
    for (const Product& p : products) {
        const int width = p.groups * R;
        const int splits = (p.in + TPSERVE_LORA_SPLIT_LEN - 1) / TPSERVE_LORA_SPLIT_LEN;
        std::vector<bf> x((size_t)rows * p.in), a((size_t)slots * width * p.in),
            b((size_t)slots * p.out * R), y((size_t)rows * p.out);
        fill(x, 1, 2.0f);
        fill(a, 2, 0.1f);
        fill(b, 3, 0.1f);
        fill(y, 4, 1.0f);
        // Zero past the rank, as LoraSlots::load writes the slots.
        for (int s = 0; s < slots; ++s) {
            for (int o = 0; o < width; ++o) {
                if (o % R >= rank) {
                    for (int k = 0; k < p.in; ++k) {
                        a[((size_t)s * width + o) * p.in + k] = __float2bfloat16(0.f);
                    }
                }
            }
            for (int j = 0; j < p.out; ++j) {
                for (int r = rank; r < R; ++r) {
                    b[((size_t)s * p.out + j) * R + r] = __float2bfloat16(0.f);
                }
            }
        }
        bf *dx, *da, *db, *dy;
        CK(cudaMalloc(&dx, x.size() * 2));
        CK(cudaMalloc(&da, a.size() * 2 * layers));
        CK(cudaMalloc(&db, b.size() * 2 * layers));
        CK(cudaMalloc(&dy, y.size() * 2));
        CK(cudaMemcpy(dx, x.data(), x.size() * 2, cudaMemcpyHostToDevice));
        for (int l = 0; l < layers; ++l) {
            CK(cudaMemcpy(da + a.size() * l, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(db + b.size() * l, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
        }
        int layer = 0;
        cudaLaunchAttribute pdl;
        auto delta = [&]() {
            cudaLaunchConfig_t c = config(st, &pdl, dim3(max_tiles, (width + 7) / 8, splits),
                                          dim3(32 * TPSERVE_LORA_SHRINK_WARPS), 0);
            CK(cudaLaunchKernelEx(&c, lora_shrink_bf16, d_t, (const bf*)dx,
                                  (const bf*)(da + a.size() * layer), (const int*)d_tiles, p.in,
                                  R, p.groups, rows));
            const int cols = EXPAND_THREADS * TPSERVE_LORA_EXPAND_COLS;
            c = config(st, &pdl, dim3(max_tiles, (p.out + cols - 1) / cols),
                       dim3(EXPAND_THREADS), (size_t)TPSERVE_LORA_TILE_ROWS * width * 4);
            CK(cudaLaunchKernelEx(&c, lora_expand_bf16, dy, (const float*)d_t,
                                  (const bf*)(db + b.size() * layer), (const int*)d_tiles, p.out,
                                  R, p.groups, p.bound1, p.bound2, splits, rows));
        };
        auto base = [&]() {
            cudaLaunchConfig_t c = config(st, &pdl, dim3(132 * 4), dim3(512), 0);
            CK(cudaLaunchKernelEx(&c, weight_stream,
                                  (const uint4*)(d_stream + stream_words * layer), stream_words,
                                  d_sink));
        };
        // Correctness: one application on the original y.
        CK(cudaMemcpy(dy, y.data(), y.size() * 2, cudaMemcpyHostToDevice));
        delta();
        CK(cudaStreamSynchronize(st));
        std::vector<bf> got(y.size());
        CK(cudaMemcpy(got.data(), dy, y.size() * 2, cudaMemcpyDeviceToHost));
        double err = 0, largest = 0;
        for (int row = 0; row < rows; row += 7) {
            const int slot = row % adapters;
            std::vector<double> t(width, 0.0);
            for (int o = 0; o < width; ++o) {
                double acc = 0;
                for (int k = 0; k < p.in; ++k) {
                    acc += (double)__bfloat162float(x[(size_t)row * p.in + k]) *
                           __bfloat162float(a[((size_t)slot * width + o) * p.in + k]);
                }
                t[o] = acc;
            }
            for (int j = 0; j < p.out; ++j) {
                const int g = (j >= p.bound1) + (j >= p.bound2);
                double want = __bfloat162float(y[(size_t)row * p.out + j]);
                for (int r = 0; r < R; ++r) {
                    want += t[g * R + r] * __bfloat162float(b[((size_t)slot * p.out + j) * R + r]);
                }
                err = fmax(err, fabs(__bfloat162float(got[(size_t)row * p.out + j]) - want));
                largest = fmax(largest, fabs(want));
            }
        }
        // Microseconds per application of `f`, from a graph of 100 over the layers' copies,
        // replayed 5 times.
        auto time = [&](auto f) {
            const double us = graph_us(st, 100, [&](int i) {
                layer = i % layers;
                f();
            });
            layer = 0;
            return us;
        };
        const double alone = time(delta);
        const double stream = time(base);
        const double behind = time([&]() {
            base();
            delta();
        }) - stream;
        alone_total += alone;
        behind_total += behind;
        const double bytes = (double)adapters * (width * (double)p.in + (double)p.out * R) * 2;
        printf("| %s | %.2f | %.2f | %.2f | %.2e (%.2f) |\n", p.name, alone, behind, bytes / 1e6,
               err, largest);
        CK(cudaFree(dx));
        CK(cudaFree(da));
        CK(cudaFree(db));
        CK(cudaFree(dy));
    }
    printf("per layer: %.1f us alone, %.1f us behind base products; x 32 layers: %.2f ms, %.2f ms\n",
           alone_total, behind_total, alone_total * 32 / 1000, behind_total * 32 / 1000);
    return 0;
}
