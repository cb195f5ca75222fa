// The GEMVs of gemv.cu alone, outside tpserve (issues 9 and 12: decoding's products): Llama-3-8B's
// four products (q|k|v, o, gate|up, down) with E4M3 weights and per-row scales (default), or with
// bf16 weights (WEIGHTS=bf16), every variant (rows a launch M, columns a warp R, chunks in flight
// U; the tensor-core GEMV with 4 or 8 tiles in flight) checked against a double-precision CPU
// reference and timed at 1, 4 and 8 rows. Each measurement is a CUDA graph of 64 launches with
// programmatic dependent launches (as the decode graphs run them), over enough copies of the
// weight that it comes from HBM, not L2; the copy bandwidth is measured in the same run, so each
// figure is also a fraction of it. The FMA variants sum in the same order (gemv.cu): the harness
// requires each to give the first one's bits. The tensor-core variants sum in another order and
// are checked against the CPU only.
//
// Why: the FP8 decode's products run at 59-87% of the copy rate (docs/PERFORMANCE.md, run 29)
// and no harness timed them alone; this one, with ncu on one launch (PROFILE=1), says whether
// they are short of bytes in flight, of issue slots, or of neither; and it compares the FMA
// variants with the tensor-core GEMV at 2 to 8 rows (session 32).
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels/cuda -I tests/gpu tests/gpu/gemv_bench.cu \
//     -o /tmp/gb -lcublas
//   /tmp/gb
// With the GPU machine's toolkit, link cuBLAS (`-lcublas`): bf16 weights are also timed on
// cublasGemmEx, what the worker's warm-up compares the GEMVs with. Rows above 8 (up to 16) run only
// the 16-row tensor-core instance and cuBLAS: would a bucket of 9 to 16 rows pay?
// Environment: ROWS (a comma list, default 1,4,8); WEIGHTS (fp8, default, or bf16); PROFILE=1:
// after the checks, only one launch of the down product's m1 r1 u4 variant and of the qkv
// product's, for `ncu --launch-count`.
#include "gemv.cu"

#include "harness.cuh"

#include <cuda_fp8.h>

// cuBLAS beside the GEMVs for bf16 weights, where its headers are (the GPU machine's toolkit;
// scripts/check-kernels.sh builds the harnesses with the CUDA wheels' headers, which have none)
// and -DGEMV_BENCH_NO_CUBLAS does not leave it out.
#if !defined(GEMV_BENCH_NO_CUBLAS) && __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#define GEMV_BENCH_CUBLAS 1
#else
#define GEMV_BENCH_CUBLAS 0
#endif

#include <cstring>
#include <string>
#include <vector>

namespace {

typedef void (*Fp8Kernel)(bf*, const bf*, const E4M3*, const float*, int, int, int, int);
typedef void (*DtypeKernel)(bf*, const bf*, const bf*, int, int, int);

// The FP8 tensor-core GEMV with 16 rows of x in A (gemv.cu has that entry point for weights in T
// only).
extern "C" __global__ void __launch_bounds__(128, 4)
    gemv_fp8_mma_m16_bf16(bf* __restrict__ y, const bf* __restrict__ x, const E4M3* __restrict__ w,
                          const float* __restrict__ w_scale, int w_scale_per_row, int rows,
                          int n_out, int k) {
    gemv_mma_impl<bf, E4M3, 4, 16>(y, x, w, w_scale, w_scale_per_row, rows, n_out, k);
}

struct Variant {
    const char* name;
    Fp8Kernel fp8;      // with FP8 weights
    DtypeKernel dtype;  // with bf16 weights
    int m;              // the kernel's row capacity
    int columns;        // outputs (weight rows) a block of 128 threads: the grid is n_out / columns
    bool any_rows = false;    // runs every row count up to m (else only the smallest fit)
    bool other_bits = false;  // sums in another order than gemv.cu's FMA variants (CPU check only)
    bool cublas = false;      // cublasGemmEx (bf16 weights; kernels null)
};

#define FMA_VARIANT(NAME, M, R, COLUMNS) \
    {NAME, gemv_fp8_##M##_##R##_bf16, gemv_##M##_##R##_bf16, M##_rows, COLUMNS}
#define DEEP_VARIANT(NAME, M, R, U, COLUMNS) \
    {NAME, gemv_fp8_##M##_##R##_##U##_bf16, gemv_##M##_##R##_##U##_bf16, M##_rows, COLUMNS}
// Every bf16-activation variant of gemv.cu, as gemv.rs lists them.
constexpr int m1_rows = 1, m2_rows = 2, m4_rows = 4, m8_rows = 8;
const Variant kVariants[] = {
    FMA_VARIANT("m1 r1", m1, r1, 4),
    FMA_VARIANT("m1 r2", m1, r2, 8),
    FMA_VARIANT("m1 r4", m1, r4, 16),
    DEEP_VARIANT("m1 r1 u4", m1, r1, u4, 4),
    DEEP_VARIANT("m1 r1 u8", m1, r1, u8, 4),
    DEEP_VARIANT("m1 r2 u4", m1, r2, u4, 8),
    DEEP_VARIANT("m1 r2 u8", m1, r2, u8, 8),
    FMA_VARIANT("m2 r1", m2, r1, 4),
    FMA_VARIANT("m2 r2", m2, r2, 8),
    FMA_VARIANT("m2 r4", m2, r4, 16),
    DEEP_VARIANT("m2 r1 u4", m2, r1, u4, 4),
    DEEP_VARIANT("m2 r1 u8", m2, r1, u8, 4),
    DEEP_VARIANT("m2 r2 u4", m2, r2, u4, 8),
    DEEP_VARIANT("m2 r2 u8", m2, r2, u8, 8),
    FMA_VARIANT("m4 r1", m4, r1, 4),
    FMA_VARIANT("m4 r2", m4, r2, 8),
    FMA_VARIANT("m4 r4", m4, r4, 16),
    FMA_VARIANT("m8 r1", m8, r1, 4),
    FMA_VARIANT("m8 r2", m8, r2, 8),
    FMA_VARIANT("m8 r4", m8, r4, 16),
    {"mma", gemv_fp8_mma_bf16, gemv_mma_bf16, 8, 8, true, true},
    {"mma a8", gemv_fp8_mma_a8_bf16, gemv_mma_a8_bf16, 8, 8, true, true},
    {"mma m16", gemv_fp8_mma_m16_bf16, gemv_mma_m16_bf16, 16, 8, true, true},
    {"cuBLAS", nullptr, nullptr, 16, 1, true, true, true},
};

#if GEMV_BENCH_CUBLAS
cublasHandle_t cublas_handle(cudaStream_t st) {
    static cublasHandle_t handle = nullptr;
    static void* workspace = nullptr;
    if (handle == nullptr) {
        if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
            fprintf(stderr, "cublasCreate failed\n");
            exit(1);
        }
        // A workspace of its own, so that graph capture allocates nothing.
        CK(cudaMalloc(&workspace, 32 << 20));
        cublasSetWorkspace(handle, workspace, 32 << 20);
    }
    cublasSetStream(handle, st);
    return handle;
}
#endif


// E4M3's value of byte b (cuda_fp8.h's conversion; no NaN is generated below).
float e4m3_value(unsigned char b) {
    __nv_fp8_e4m3 v;
    v.__x = b;
    return static_cast<float>(v);
}

// w: E4M3 bytes with per-row scales (fp8), or bf16 elements.
void launch(cudaStream_t st, const Variant& v, bool fp8, dim3 grid, bf* y, const bf* x,
            const void* w, const float* scale, int rows, int n, int k) {
    if (v.cublas) {
#if GEMV_BENCH_CUBLAS
        // y^T (n x rows, column-major) = w (k x n column-major, transposed) x^T (k x rows).
        const float one = 1.0f, zero = 0.0f;
        if (cublasGemmEx(cublas_handle(st), CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, &one, w,
                         CUDA_R_16BF, k, x, CUDA_R_16BF, k, &zero, y, CUDA_R_16BF, n,
                         CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS) {
            fprintf(stderr, "cublasGemmEx failed\n");
            exit(1);
        }
#endif
    } else if (fp8) {
        launch_pdl(st, v.fp8, grid, dim3(128), y, x, static_cast<const E4M3*>(w), scale, 1, rows,
                   n, k);
    } else {
        launch_pdl(st, v.dtype, grid, dim3(128), y, x, static_cast<const bf*>(w), rows, n, k);
    }
}

dim3 grid_of(const Variant& v, int n) { return dim3((n + v.columns - 1) / v.columns); }

}  // namespace

int main() {
    const std::vector<int> row_list = env_int_list("ROWS", {1, 4, 8});
    const bool profile = getenv("PROFILE") != nullptr;
    const char* weights_env = getenv("WEIGHTS");
    const bool fp8 = weights_env == nullptr || std::string(weights_env) == "fp8";
    if (!fp8 && std::string(weights_env) != "bf16") {
        fprintf(stderr, "WEIGHTS must be fp8 or bf16\n");
        return 2;
    }
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    const double copy_gbs = profile ? 0.0 : copy_bandwidth_gbs(st);
    if (!profile) {
        printf("copy bandwidth: %.0f GB/s (read + write, as bench_device counts it); %s weights\n",
               copy_gbs, fp8 ? "FP8 E4M3" : "bf16");
        printf("\n| product | rows | variant | us | weight GB/s | of copy | max error |\n"
               "| --- | ---: | --- | ---: | ---: | ---: | ---: |\n");
    }
    int failures = 0;
    std::vector<std::string> best_lines;
    for (const ProductShape& s : LLAMA3_8B_PRODUCTS) {
        unsigned seed = 17 + s.n;
        // The weight as the CPU sees it (E4M3 values, or bf16 ones) and as the GPU gets it.
        std::vector<float> wv((size_t)s.n * s.k);
        std::vector<unsigned char> wq;
        std::vector<bf> wb;
        if (fp8) {
            wq.resize(wv.size());
            for (size_t i = 0; i < wq.size(); ++i) {
                unsigned char b = lcg_next(seed) & 0xff;
                if ((b & 0x7f) == 0x7f) b &= 0xfe;  // 0x7f / 0xff are NaN in E4M3
                wq[i] = b;
                wv[i] = e4m3_value(b);
            }
        } else {
            wb.resize(wv.size());
            for (size_t i = 0; i < wb.size(); ++i) {
                wb[i] = from_f<bf>((lcg_next(seed) % 2001) / 1000.0f - 1.0f);
                wv[i] = to_f(wb[i]);
            }
        }
        std::vector<float> scale(s.n, 1.0f);
        if (fp8) {
            for (auto& v : scale) v = 0.001f + (lcg_next(seed) % 1000) * 1e-6f;
        }
        const double bytes = fp8 ? (double)wq.size() + scale.size() * 4.0 : wb.size() * 2.0;
        const int copies = std::max(2, (int)std::ceil(256e6 / bytes));
        std::vector<void*> dw(copies);
        for (int c = 0; c < copies; ++c) {
            dw[c] = fp8 ? static_cast<void*>(upload(wq)) : static_cast<void*>(upload(wb));
        }
        float* dscale = upload(scale);
        for (int rows : row_list) {
            std::vector<bf> x((size_t)rows * s.k);
            for (auto& v : x) v = from_f<bf>((lcg_next(seed) % 2001) / 1000.0f - 1.0f);
            // The CPU's double-precision product.
            std::vector<double> ref((size_t)rows * s.n, 0.0);
            double ref_max = 0;
            for (int m = 0; m < rows; ++m) {
                for (int n = 0; n < s.n; ++n) {
                    double acc = 0;
                    const float* row = &wv[(size_t)n * s.k];
                    const bf* xm = &x[(size_t)m * s.k];
                    for (int k = 0; k < s.k; ++k) acc += (double)row[k] * to_f(xm[k]);
                    ref[(size_t)m * s.n + n] = acc * scale[n];
                    ref_max = std::max(ref_max, std::fabs(acc * scale[n]));
                }
            }
            bf* dx = upload(x);
            bf* dy;
            CK(cudaMalloc(&dy, (size_t)rows * s.n * sizeof(bf)));
            std::vector<bf> first;
            double best_us = 1e9;
            const char* best_name = "";
            for (const Variant& v : kVariants) {
                // The smallest row capacity that holds the rows, as gemv.rs picks it.
                if (v.m < rows || (!v.any_rows && v.m > 1 && v.m / 2 >= rows)) continue;
                if (v.cublas && (fp8 || !GEMV_BENCH_CUBLAS)) continue;
                if (profile && !(rows == 1 && std::string(v.name) == "m1 r1 u4" &&
                                 (std::string(s.name) == "down" || std::string(s.name) == "qkv"))) {
                    continue;
                }
                CK(cudaMemset(dy, 0xff, (size_t)rows * s.n * sizeof(bf)));
                launch(st, v, fp8, grid_of(v, s.n), dy, dx, dw[0], dscale, rows, s.n, s.k);
                CK(cudaStreamSynchronize(st));
                if (profile) {
                    printf("profiled %s %s\n", s.name, v.name);
                    continue;
                }
                std::vector<bf> y((size_t)rows * s.n);
                CK(cudaMemcpy(y.data(), dy, y.size() * sizeof(bf), cudaMemcpyDeviceToHost));
                double err = 0;
                for (size_t i = 0; i < y.size(); ++i) {
                    err = std::max(err, std::fabs(to_f(y[i]) - ref[i]));
                }
                err /= ref_max;
                const bool bits_same =
                    v.other_bits || first.empty() ||
                    std::memcmp(first.data(), y.data(), y.size() * sizeof(bf)) == 0;
                if (first.empty() && !v.other_bits) first = y;
                const bool ok = err < 0.01 && bits_same;
                failures += !ok;
                const double us = graph_us(st, 64, [&](int i) {
                    launch(st, v, fp8, grid_of(v, s.n), dy, dx, dw[i % copies], dscale, rows, s.n,
                           s.k);
                });
                const double gbs = bytes / (us * 1e-6) / 1e9;
                printf("| %s | %d | %s | %.2f | %.0f | %.3f | %.5f%s%s |\n", s.name, rows, v.name,
                       us, gbs, gbs / copy_gbs, err, bits_same ? "" : " (bits DIFFER)",
                       ok ? "" : " FAIL");
                if (us < best_us) {
                    best_us = us;
                    best_name = v.name;
                }
            }
            if (!profile) {
                char line[160];
                snprintf(line, sizeof line, "rows %d %s: best %s %.2f us (%.3f of copy)", rows,
                         s.name, best_name, best_us, bytes / (best_us * 1e-6) / 1e9 / copy_gbs);
                best_lines.push_back(line);
            }
            CK(cudaFree(dx));
            CK(cudaFree(dy));
        }
        for (int c = 0; c < copies; ++c) CK(cudaFree(dw[c]));
        CK(cudaFree(dscale));
    }
    for (const auto& l : best_lines) printf("%s\n", l.c_str());
    printf("%s: %d failures\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
