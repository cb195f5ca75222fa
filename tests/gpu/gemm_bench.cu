// The prompt steps' dense products outside tpserve (issue 9): how fast cuBLAS runs Llama-3-8B's
// four products at prompt-step sizes, against the GEMM floor that tests/gpu/bench.sh divides by
// (cublasGemmEx on 8192^3, worker/src/cuda/floors.rs), and what the choices around them are
// worth:
//   1. algorithms: cublasGemmEx's default (what worker/src/cuda/blas.rs calls) against every
//      algorithm cuBLASLt's heuristic offers for the shape, each timed;
//   2. sustained rate: a layer's four products 32 times back to back (a prompt step's GEMMs),
//      against the floor's 8192^3 product repeated for as long, so that a clock drop under a
//      long load shows in both;
//   3. the MLP in row chunks: gate_up, SiLU-mul (kernels/cuda/silu_mul.cu) and down over the
//      step's rows at once against the same over chunks of rows, whose gate_up output fits the
//      L2 cache, so that SiLU-mul reads it from there.
// Products are worker/src/cuda/blas.rs's: y[n, m] = x[n, k] W[m, k]^T, bf16 in and out, f32
// accumulation, a 32 MiB workspace. Operands are uniform in [-1, 1] as the floor's are.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels/cuda tests/gpu/gemm_bench.cu -o /tmp/gb \
//       -lcublas -lcublasLt
//   /tmp/gb
// scripts/check-kernels.sh compiles every harness with the CUDA wheels' headers, which have no
// cuBLAS (its wheel is 444 MB): there the file builds to a main that says so.
#include "common.cuh"
#include "silu_mul.cu"

#include "harness.cuh"

#if !__has_include(<cublasLt.h>)
int main() {
    printf("gemm_bench: built without cuBLAS's headers (cublasLt.h); nothing to measure\n");
    return 2;
}
#else
#include <cublasLt.h>
#include <cublas_v2.h>

#include <cstdint>
#include <cstring>
#include <string>

static cublasHandle_t blas;
static cublasLtHandle_t lt;
static void* workspace;

// y[n, m] = x[n, k] W[m, k]^T through cublasGemmEx's default algorithm (blas.rs's call).
static void gemm_default(bf* y, const bf* x, const bf* w, int n, int m, int k) {
    const float alpha = 1.f, beta = 0.f;
    CB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w, CUDA_R_16BF, k, x,
                    CUDA_R_16BF, k, &beta, y, CUDA_R_16BF, m, CUBLAS_COMPUTE_32F,
                    CUBLAS_GEMM_DEFAULT));
}

// One timed region: `f` run once after 2 untimed runs, by events, in microseconds.
template <typename F> static double time_once_us(F f) {
    f();
    f();
    return event_us(f);
}

static void silu_mul(bf* out, const bf* gate_up, int rows, int d) {
    const int block = 256;
    const int y = std::max(1, std::min(8, d / (8 * block)));
    silu_mul_bf16<<<dim3(rows, y), block>>>(out, gate_up, d);
}

int main() {
    CB(cublasCreate(&blas));
    CB(cublasLtCreate(&lt));
    CK(cudaMalloc(&workspace, LT_WORKSPACE));
    CB(cublasSetWorkspace(blas, workspace, LT_WORKSPACE));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s, %d SMs; copy %.0f GB/s\n", prop.name, prop.multiProcessorCount,
           copy_bandwidth_gbs(0));

    const int MAX_ROWS = 8192;
    bf* w[4];
    for (int p = 0; p < 4; ++p) {
        w[p] = random_buffer((size_t)LLAMA3_8B_PRODUCTS[p].n * LLAMA3_8B_PRODUCTS[p].k, p + 1);
    }
    bf* x = random_buffer((size_t)MAX_ROWS * 14336, 11);
    bf* y = random_buffer((size_t)MAX_ROWS * 28672, 12);
    bf* act = random_buffer((size_t)MAX_ROWS * 14336, 13);
    bf* sq = random_buffer(8192ull * 8192, 14);
    bf* sq_out = random_buffer(8192ull * 8192, 15);
    CK(cudaDeviceSynchronize());

    // The floor as floors.rs measures it: 3 warm-up products, then 20 timed together.
    const double sq_flop = 2.0 * 8192.0 * 8192.0 * 8192.0;
    for (int i = 0; i < 3; ++i) gemm_default(sq_out, sq, sq, 8192, 8192, 8192);
    const double floor_us = time_once_us([&] {
        for (int i = 0; i < 20; ++i) gemm_default(sq_out, sq, sq, 8192, 8192, 8192);
    });
    const double floor_tflops = sq_flop * 20 / floor_us / 1e6;
    printf("GEMM floor (8192^3, 20 in a row, floors.rs): %.0f TFLOP/s\n\n", floor_tflops);

    // 1. Algorithms per shape.
    printf("| rows | product | default us (TFLOP/s) | heuristic #0 | best of the heuristic's "
           "(index) | best / default |\n");
    printf("| ---: | --- | ---: | ---: | ---: | ---: |\n");
    const int ROWS[] = {512, 1024, 2048, 4096, 8192};
    int best_algo[5][4];
    std::vector<LtShape> shapes;
    for (int r = 0; r < 5; ++r) {
        const int n = ROWS[r];
        for (int p = 0; p < 4; ++p) {
            const ProductShape& pr = LLAMA3_8B_PRODUCTS[p];
            const double flop = 2.0 * n * pr.n * pr.k;
            const double d = time_us([&] { gemm_default(y, x, w[p], n, pr.n, pr.k); }, 10);
            LtShape s = lt_shape(lt, n, pr.n, pr.k, 24);
            double h0 = 0, best = 1e30;
            int bi = -1;
            for (int a = 0; a < (int)s.algos.size(); ++a) {
                const double t = time_us([&] { gemm_lt(lt, s, a, y, x, w[p], workspace, 0); }, 10);
                if (a == 0) h0 = t;
                if (t < best) best = t, bi = a;
            }
            best_algo[r][p] = bi;
            shapes.push_back(s);
            printf("| %d | %s | %.1f (%.0f) | %.1f (%.0f) | %.1f (%.0f) (#%d of %zu) | %.3f |\n", n,
                   pr.name, d, flop / d / 1e6, h0, flop / h0 / 1e6, best, flop / best / 1e6, bi,
                   s.algos.size(), d / best);
        }
    }

    // 2. Sustained: a prompt step's products (32 layers of the four) against the floor's
    // product for about as long.
    printf("\n| rows | 32 layers' products, default: ms (TFLOP/s) | best algorithms | "
           "8192^3 x as long |\n");
    printf("| ---: | ---: | ---: | ---: |\n");
    for (int r = 1; r < 5; ++r) {
        const int n = ROWS[r];
        double flop = 0;
        for (const ProductShape& pr : LLAMA3_8B_PRODUCTS) flop += 2.0 * n * pr.n * pr.k * 32;
        const double d = time_once_us([&] {
            for (int l = 0; l < 32; ++l)
                for (int p = 0; p < 4; ++p)
                    gemm_default(y, x, w[p], n, LLAMA3_8B_PRODUCTS[p].n, LLAMA3_8B_PRODUCTS[p].k);
        });
        const double b = time_once_us([&] {
            for (int l = 0; l < 32; ++l)
                for (int p = 0; p < 4; ++p)
                    gemm_lt(lt, shapes[r * 4 + p], best_algo[r][p], y, x, w[p], workspace, 0);
        });
        const int reps = std::max(1, (int)(flop / sq_flop + 0.5));
        const double f = time_once_us([&] {
            for (int i = 0; i < reps; ++i) gemm_default(sq_out, sq, sq, 8192, 8192, 8192);
        });
        printf("| %d | %.2f (%.0f) | %.2f (%.0f) | %d products: %.0f TFLOP/s |\n", n, d / 1e3,
               flop / d / 1e6, b / 1e3, flop / b / 1e6, reps, sq_flop * reps / f / 1e6);
    }

    // 3. The MLP (gate_up, SiLU-mul, down) of one layer, whole against row chunks.
    printf("\n| rows | MLP whole: us | chunks of 256 | 512 | 1024 | 2048 |\n");
    printf("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    const int D = 14336;
    for (int r = 2; r < 5; ++r) {
        const int n = ROWS[r];
        auto mlp = [&](int chunk) {
            for (int r0 = 0; r0 < n; r0 += chunk) {
                const int c = std::min(chunk, n - r0);
                gemm_default(y + (size_t)r0 * 2 * D, x + (size_t)r0 * 4096, w[2], c, 2 * D, 4096);
                silu_mul(act + (size_t)r0 * D, y + (size_t)r0 * 2 * D, c, D);
                gemm_default(x + (size_t)MAX_ROWS * 4096 + (size_t)r0 * 4096,
                             act + (size_t)r0 * D, w[3], c, 4096, D);
            }
        };
        // Chunked gate_up outputs reuse one buffer region, as a worker's workspace would.
        auto mlp_reuse = [&](int chunk) {
            for (int r0 = 0; r0 < n; r0 += chunk) {
                const int c = std::min(chunk, n - r0);
                gemm_default(y, x + (size_t)r0 * 4096, w[2], c, 2 * D, 4096);
                silu_mul(act, y, c, D);
                gemm_default(x + (size_t)MAX_ROWS * 4096 + (size_t)r0 * 4096, act, w[3], c, 4096,
                             D);
            }
        };
        printf("| %d | %.0f", n, time_us([&] { mlp(n); }, 10));
        for (int c : {256, 512, 1024, 2048})
            printf(" | %.0f / %.0f", time_us([&] { mlp(c); }, 10),
                   time_us([&] { mlp_reuse(c); }, 10));
        printf(" |\n");
        const double g = time_us([&] { gemm_default(y, x, w[2], n, 2 * D, 4096); }, 10);
        const double s = time_us([&] { silu_mul(act, y, n, D); }, 10);
        const double dn = time_us([&] { gemm_default(x, act, w[3], n, 4096, D); }, 10);
        printf("|  | (gate_up %.0f + silu_mul %.0f + down %.0f) | | | | |\n", g, s, dn);
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
#endif  // __has_include(<cublasLt.h>)
