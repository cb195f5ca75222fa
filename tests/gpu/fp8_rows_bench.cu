// The kernels that quantize activations to FP8 per row on their way out (issue 12): the narrow
// RMSNorm (plain and with the residual add) and the SiLU-mul, each against its unfused pair
// (the kernel, then fp8.cu's fp8_quantize_rows), bit for bit: the dtype output, the E4M3 bytes
// and the row scales. Then the time of each path for a prompt step's rows, and of the
// per-tensor quantization (partial maxima, then the conversion) the per-row one replaced.
//
//   nvcc -O3 -std=c++17 -arch=sm_90a -I kernels/cuda tests/gpu/fp8_rows_bench.cu -o /tmp/fr
//   /tmp/fr            # Llama-3-8B's hidden 4,096 and intermediate 14,336; rows 9 to 8,192
//
// Prints one line per check (PASS/FAIL) and per timing; exits 1 on a mismatch.
#include "common.cuh"

#include "fp8.cu"
#include "rms_norm.cu"
#include "silu_mul.cu"

#include "harness.cuh"

#include <cstring>
#include <random>

namespace {

int failures = 0;

template <typename E> std::vector<E> download(const E* d, size_t n) {
    std::vector<E> h(n);
    CK(cudaMemcpy(h.data(), d, n * sizeof(E), cudaMemcpyDeviceToHost));
    return h;
}

// Whether the n elements at a and b (device) have the same bytes; prints the check.
template <typename E> void same_bits(const char* what, int rows, const E* a, const E* b, size_t n) {
    const std::vector<E> ha = download(a, n), hb = download(b, n);
    size_t diff = 0;
    for (size_t i = 0; i < n; ++i) {
        diff += std::memcmp(&ha[i], &hb[i], sizeof(E)) != 0;
    }
    printf("%s  %-44s rows %5d: %zu of %zu elements differ\n", diff ? "FAIL" : "PASS", what, rows,
           diff, n);
    failures += diff != 0;
}

template <typename E> E* device_random(size_t n, float scale, std::mt19937& rng) {
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<E> h(n);
    for (auto& v : h) v = from_f<E>(dist(rng));
    E* d;
    CK(cudaMalloc(&d, n * sizeof(E)));
    CK(cudaMemcpy(d, h.data(), n * sizeof(E), cudaMemcpyHostToDevice));
    return d;
}

unsigned norm_threads(int hidden) { return std::min(1024, (hidden / 8 + 31) / 32 * 32); }

void check_and_time(int rows, int hidden, int inter, std::mt19937& rng, bool timed) {
    const size_t nx = (size_t)rows * hidden, na = (size_t)rows * inter;
    bf* x = device_random<bf>(nx, 1.0f, rng);
    bf* sub = device_random<bf>(nx, 0.5f, rng);
    bf* weight = device_random<bf>(hidden, 1.0f, rng);
    bf* gate_up = device_random<bf>(2 * na, 2.0f, rng);
    bf *x1, *x2, *out1, *out2, *act1, *act2;
    unsigned char *q1, *q2;
    float *s1, *s2, *stats;
    for (bf** p : {&x1, &x2, &out1, &out2}) CK(cudaMalloc(p, nx * sizeof(bf)));
    for (bf** p : {&act1, &act2}) CK(cudaMalloc(p, na * sizeof(bf)));
    for (unsigned char** p : {&q1, &q2}) CK(cudaMalloc(p, na));
    for (float** p : {&s1, &s2}) CK(cudaMalloc(p, rows * sizeof(float)));
    CK(cudaMalloc(&stats, 265 * sizeof(float)));
    const float eps = 1e-5f;
    const unsigned nt = norm_threads(hidden);
    const size_t silu_smem = (size_t)inter * sizeof(bf);
    CK(cudaFuncSetAttribute(silu_mul_fp8_rows_bf16, cudaFuncAttributeMaxDynamicSharedMemorySize,
                            64 << 10));

    // The plain norm.
    rms_norm_bf16<<<rows, nt>>>(out1, x, weight, hidden, eps);
    fp8_quantize_rows_bf16<<<rows, 256>>>(q1, s1, out1, hidden);
    rms_norm_fp8_rows_bf16<<<rows, nt>>>(out2, x, weight, hidden, eps, q2, s2);
    CK(cudaDeviceSynchronize());
    same_bits("rms_norm_fp8_rows: dtype output", rows, out1, out2, nx);
    same_bits("rms_norm_fp8_rows: E4M3", rows, q1, q2, nx);
    same_bits("rms_norm_fp8_rows: row scales", rows, s1, s2, rows);
    CK(cudaMemset(q2, 0, nx));
    rms_norm_fp8_rows_bf16<<<rows, nt>>>(nullptr, x, weight, hidden, eps, q2, s2);
    CK(cudaDeviceSynchronize());
    same_bits("rms_norm_fp8_rows, no dtype output: E4M3", rows, q1, q2, nx);

    // With the residual add (x updated in place: two copies).
    CK(cudaMemcpy(x1, x, nx * sizeof(bf), cudaMemcpyDeviceToDevice));
    CK(cudaMemcpy(x2, x, nx * sizeof(bf), cudaMemcpyDeviceToDevice));
    rms_norm_residual_bf16<<<rows, nt>>>(out1, x1, sub, weight, hidden, eps);
    fp8_quantize_rows_bf16<<<rows, 256>>>(q1, s1, out1, hidden);
    rms_norm_residual_fp8_rows_bf16<<<rows, nt>>>(out2, x2, sub, weight, hidden, eps, q2, s2);
    CK(cudaDeviceSynchronize());
    same_bits("rms_norm_residual_fp8_rows: residual stream", rows, x1, x2, nx);
    same_bits("rms_norm_residual_fp8_rows: dtype output", rows, out1, out2, nx);
    same_bits("rms_norm_residual_fp8_rows: E4M3", rows, q1, q2, nx);
    same_bits("rms_norm_residual_fp8_rows: row scales", rows, s1, s2, rows);

    // The SiLU-mul.
    const dim3 silu_grid(rows, (inter + 2047) / 2048);
    silu_mul_bf16<<<silu_grid, 256>>>(act1, gate_up, inter);
    fp8_quantize_rows_bf16<<<rows, 256>>>(q1, s1, act1, inter);
    silu_mul_fp8_rows_bf16<<<rows, 256, silu_smem>>>(act2, q2, s2, gate_up, inter);
    CK(cudaDeviceSynchronize());
    same_bits("silu_mul_fp8_rows: dtype output", rows, act1, act2, na);
    same_bits("silu_mul_fp8_rows: E4M3", rows, q1, q2, na);
    same_bits("silu_mul_fp8_rows: row scales", rows, s1, s2, rows);
    CK(cudaMemset(q2, 0, na));
    silu_mul_fp8_rows_bf16<<<rows, 256, silu_smem>>>(nullptr, q2, s2, gate_up, inter);
    CK(cudaDeviceSynchronize());
    same_bits("silu_mul_fp8_rows, no dtype output: E4M3", rows, q1, q2, na);

    if (timed) {
        const int amax_blocks = 264;
        auto per_tensor = [&](const bf* in, size_t n) {
            const int blocks = (int)std::min<size_t>(amax_blocks, (n + 2047) / 2048);
            fp8_amax_partial_bf16<<<blocks, 256>>>(stats, in, (long long)n);
            fp8_quantize_bf16<<<blocks, 256>>>(q1, stats + 264, stats, blocks, in, (long long)n);
        };
        const double norm_tensor = time_us([&] {
            rms_norm_bf16<<<rows, nt>>>(out1, x, weight, hidden, eps);
            per_tensor(out1, nx);
        });
        const double norm_rows = time_us([&] {
            rms_norm_bf16<<<rows, nt>>>(out1, x, weight, hidden, eps);
            fp8_quantize_rows_bf16<<<rows, 256>>>(q1, s1, out1, hidden);
        });
        const double norm_fused = time_us(
            [&] { rms_norm_fp8_rows_bf16<<<rows, nt>>>(nullptr, x, weight, hidden, eps, q2, s2); });
        const double silu_tensor = time_us([&] {
            silu_mul_bf16<<<silu_grid, 256>>>(act1, gate_up, inter);
            per_tensor(act1, na);
        });
        const double silu_rows = time_us([&] {
            silu_mul_bf16<<<silu_grid, 256>>>(act1, gate_up, inter);
            fp8_quantize_rows_bf16<<<rows, 256>>>(q1, s1, act1, inter);
        });
        const double silu_fused =
            time_us([&] { silu_mul_fp8_rows_bf16<<<rows, 256, silu_smem>>>(nullptr, q2, s2, gate_up, inter); });
        printf("time  rows %d: norm + per-tensor quantization %.1f us, + per-row %.1f, fused %.1f\n",
               rows, norm_tensor, norm_rows, norm_fused);
        printf("time  rows %d: silu_mul + per-tensor quantization %.1f us, + per-row %.1f, fused "
               "%.1f\n",
               rows, silu_tensor, silu_rows, silu_fused);
    }
    for (void* p : {(void*)x, (void*)sub, (void*)weight, (void*)gate_up, (void*)x1, (void*)x2,
                    (void*)out1, (void*)out2, (void*)act1, (void*)act2, (void*)q1, (void*)q2,
                    (void*)s1, (void*)s2, (void*)stats}) {
        CK(cudaFree(p));
    }
}

}  // namespace

int main() {
    std::mt19937 rng(7);
    for (int rows : {9, 256, 512, 1024, 2048, 8192}) {
        check_and_time(rows, 4096, 14336, rng, rows >= 256);
    }
    // Other widths the kernels take: Llama-3.2-1B's 2,048 / 8,192 and 8,192 / 28,672 (70B).
    check_and_time(33, 2048, 8192, rng, false);
    check_and_time(33, 8192, 28672, rng, false);
    printf("%s\n", failures ? "FAIL" : "PASS: fused and unfused quantization agree bit for bit");
    return failures ? 1 : 0;
}
