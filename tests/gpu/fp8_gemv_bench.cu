// The FP8 GEMVs of gemv.cu alone, outside tpserve (issue 12: `--quantization fp8` decoding):
// Llama-3-8B's four products (q|k|v, o, gate|up, down) with E4M3 weights and per-row scales,
// every variant (rows a launch M, columns a warp R, chunks in flight U) checked against a
// double-precision CPU reference and timed at 1, 4 and 8 rows. Each measurement is a CUDA graph of
// 64 launches with programmatic dependent launches (as the decode graphs run them), over enough
// copies of the weight that it comes from HBM, not L2; the copy bandwidth is measured in the same
// run, so each figure is also a fraction of it. All variants sum in the same order (gemv.cu): the
// harness requires each to give the first one's bits.
//
// Why: the FP8 decode's products run at 59-87% of the copy rate (docs/PERFORMANCE.md, run 29)
// and no harness timed them alone; this one, with ncu on one launch (FP8_ONLY=variant), says
// whether they are short of bytes in flight, of issue slots, or of neither.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels/cuda -I tests/gpu tests/gpu/fp8_gemv_bench.cu -o /tmp/fg
//   /tmp/fg
// Environment: ROWS (a comma list, default 1,4,8); PROFILE=1: after the checks, only one launch of
// the down product's gemv_fp8_m1_r1_u4 and of the qkv product's, for `ncu --launch-count`.
// The tensor-core variant (gemv_fp8_mma, for 1 to 8 rows) sums in another order than the FMA
// variants: it is checked against the CPU only.
#include "gemv.cu"

#include "harness.cuh"

#include <cuda_fp8.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

typedef void (*Fp8Kernel)(bf*, const bf*, const E4M3*, const float*, int, int, int, int);

struct Variant {
    const char* name;
    Fp8Kernel kernel;
    int m;        // the kernel's row capacity
    int columns;  // outputs (weight rows) a block of 128 threads: the grid is n_out / columns
    bool any_rows = false;    // runs every row count up to m (else only the smallest fit)
    bool other_bits = false;  // sums in another order than gemv.cu's (CPU check only)
};

// Every bf16 FP8 variant of gemv.cu, as gemv.rs lists them.
const Variant kVariants[] = {
    {"m1 r1", gemv_fp8_m1_r1_bf16, 1, 4},
    {"m1 r2", gemv_fp8_m1_r2_bf16, 1, 8},
    {"m1 r4", gemv_fp8_m1_r4_bf16, 1, 16},
    {"m1 r1 u4", gemv_fp8_m1_r1_u4_bf16, 1, 4},
    {"m1 r1 u8", gemv_fp8_m1_r1_u8_bf16, 1, 4},
    {"m1 r2 u4", gemv_fp8_m1_r2_u4_bf16, 1, 8},
    {"m1 r2 u8", gemv_fp8_m1_r2_u8_bf16, 1, 8},
    {"m2 r1", gemv_fp8_m2_r1_bf16, 2, 4},
    {"m2 r2", gemv_fp8_m2_r2_bf16, 2, 8},
    {"m2 r4", gemv_fp8_m2_r4_bf16, 2, 16},
    {"m2 r1 u4", gemv_fp8_m2_r1_u4_bf16, 2, 4},
    {"m2 r1 u8", gemv_fp8_m2_r1_u8_bf16, 2, 4},
    {"m2 r2 u4", gemv_fp8_m2_r2_u4_bf16, 2, 8},
    {"m2 r2 u8", gemv_fp8_m2_r2_u8_bf16, 2, 8},
    {"m4 r1", gemv_fp8_m4_r1_bf16, 4, 4},
    {"m4 r2", gemv_fp8_m4_r2_bf16, 4, 8},
    {"m4 r4", gemv_fp8_m4_r4_bf16, 4, 16},
    {"m8 r1", gemv_fp8_m8_r1_bf16, 8, 4},
    {"m8 r2", gemv_fp8_m8_r2_bf16, 8, 8},
    {"m8 r4", gemv_fp8_m8_r4_bf16, 8, 16},
    {"mma", gemv_fp8_mma_bf16, 8, 8, true, true},
};

struct Shape {
    const char* name;
    int n, k;
};
const Shape kShapes[4] = {
    {"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}};

// E4M3's value of byte b (cuda_fp8.h's conversion; no NaN is generated below).
float e4m3_value(unsigned char b) {
    __nv_fp8_e4m3 v;
    v.__x = b;
    return static_cast<float>(v);
}

void launch(cudaStream_t st, const Variant& v, dim3 grid, bf* y, const bf* x, const E4M3* w,
            const float* scale, int rows, int n, int k) {
    launch_pdl(st, v.kernel, grid, dim3(128), y, x, w, scale, 1, rows, n, k);
}

dim3 grid_of(const Variant& v, int n) { return dim3((n + v.columns - 1) / v.columns); }

}  // namespace

int main() {
    const std::vector<int> row_list = env_int_list("ROWS", {1, 4, 8});
    const bool profile = getenv("PROFILE") != nullptr;
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    const double copy_gbs = profile ? 0.0 : copy_bandwidth_gbs(st);
    if (!profile) {
        printf("copy bandwidth: %.0f GB/s (read + write, as bench_device counts it)\n", copy_gbs);
        printf("\n| product | rows | variant | us | weight GB/s | of copy | max error |\n"
               "| --- | ---: | --- | ---: | ---: | ---: | ---: |\n");
    }
    int failures = 0;
    std::vector<std::string> best_lines;
    for (const Shape& s : kShapes) {
        unsigned seed = 17 + s.n;
        std::vector<unsigned char> wq((size_t)s.n * s.k);
        for (auto& b : wq) {
            b = lcg_next(seed) & 0xff;
            if ((b & 0x7f) == 0x7f) b &= 0xfe;  // 0x7f / 0xff are NaN in E4M3
        }
        std::vector<float> scale(s.n);
        for (auto& v : scale) v = 0.001f + (lcg_next(seed) % 1000) * 1e-6f;
        const double bytes = (double)wq.size() + scale.size() * 4.0;
        const int copies = std::max(2, (int)std::ceil(256e6 / bytes));
        std::vector<E4M3*> dw(copies);
        for (int c = 0; c < copies; ++c) {
            dw[c] = reinterpret_cast<E4M3*>(upload(wq));
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
                    const unsigned char* row = &wq[(size_t)n * s.k];
                    const bf* xm = &x[(size_t)m * s.k];
                    for (int k = 0; k < s.k; ++k) acc += (double)e4m3_value(row[k]) * to_f(xm[k]);
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
                if (profile && !(rows == 1 && std::string(v.name) == "m1 r1 u4" &&
                                 (std::string(s.name) == "down" || std::string(s.name) == "qkv"))) {
                    continue;
                }
                CK(cudaMemset(dy, 0xff, (size_t)rows * s.n * sizeof(bf)));
                launch(st, v, grid_of(v, s.n), dy, dx, dw[0], dscale, rows, s.n, s.k);
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
                    launch(st, v, grid_of(v, s.n), dy, dx, dw[i % copies], dscale, rows, s.n, s.k);
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
