// The 4-bit GEMV of int4.cu alone, outside tpserve (issue 12): Llama-3-8B's four products (q|k|v,
// o, gate|up, down) with AWQ-style weights (groups of 128, zero points), checked against a
// double-precision CPU reference and timed for every variant (tiles in flight, register limit)
// and every k_split, at 1, 4 and 8 rows; every variant must give the first one's bits at the same
// k_split (they do the same arithmetic). Each measurement is a CUDA graph of 64 launches with
// programmatic dependent launches (as the decode graphs run them), over enough copies of the
// weight that it comes from HBM, not L2; the copy bandwidth is measured in the same run, so each
// figure is also a fraction of it. The summary gives each variant at its best k_split a product.
// dequantize_w4 (the path of larger products) is checked bit for bit against the CPU, and group
// sizes 32 and one group a row (GPTQ's -1) and f16 activations are checked for correctness.
// The variants include an experiment, gemv_w4_xs (x staged in shared memory after the wait, a
// ring of weights and parameters only: deeper rings or more warps an SM in the same registers),
// at up to 200 KiB of dynamic shared memory (rows x k x 2 bytes; skipped above), and int4.cu's
// gemv_w4_pairs at several depths (two tiles' mma chains interleaved; session 51).
// gemm_w4 (9 to 64 rows, more in chunks) is checked against the CPU and bit for bit against the
// GEMV run 8 rows at a time at the same k_split, and timed at 16 to 256 rows (GEMM_ROWS, a comma
// list) at every k_split, beside the GEMV 8 rows a launch and dequantize_w4 alone (GEMM_ONLY=1:
// only that part; GEMV_ONLY=1: all but that part).
//
// Why: the GEMV decides 4-bit single-stream decode speed, and no profiler was known on the GPU
// machine when this was written (ncu is in /usr/local/cuda/bin there: docs/PERFORMANCE.md, run 30).
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90 -std=c++17 -I kernels/cuda tests/gpu/int4_gemv_bench.cu -o /tmp/ib
//   /tmp/ib
// Environment: ROWS (a comma list, default 1,4,8); VARIANTS ("a|b": only the GEMV variants whose
// names contain a or b, beside the first). With -DTPSERVE_OLD_INT4='"int4_old.cu"' -I /tmp
// the harness also times an earlier int4.cu in its own layout, for a before/after in one run:
//   git show 14faf2e:kernels/cuda/int4.cu | sed 's/gemv_w4_/old_gemv_w4_/g;
//     s/dequantize_w4_/old_dequantize_w4_/g; s/TPSERVE_INT4/TPSERVE_OLD_INT4_KERNELS/g' \
//     > /tmp/int4_old.cu
// (the layout before: a step's 16 inputs in order, params [n_out, groups]; pack_old below).
// With -DTPSERVE_HEAD_INT4='"int4_head.cu"' it times an earlier int4.cu in the current layout
// first, the reference for the others' time and bits:
//   git show HEAD:kernels/cuda/int4.cu | sed 's/gemv_w4_/head_gemv_w4_/g; s/gemm_w4_/head_gemm_w4_/g;
//     s/dequantize_w4_/head_dequantize_w4_/g; s/gather_inputs_/head_gather_inputs_/g;
//     s/TPSERVE_INT4/TPSERVE_HEAD_INT4_KERNELS/g; s/TPSERVE_GEMM_W4/TPSERVE_HEAD_GEMM_W4/g' \
//     > /tmp/int4_head.cu
#include "int4.cu"
#ifdef TPSERVE_HEAD_INT4
namespace k_head {
#include TPSERVE_HEAD_INT4
}
#endif
#ifdef TPSERVE_OLD_INT4
namespace k_old {
#include TPSERVE_OLD_INT4
}
#endif

#include "harness.cuh"

#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

template <int kAhead, typename T>
__global__ void __launch_bounds__(512)
    variant(T* y, const T* x, const uint4* w, const unsigned* params, int rows, int n_out, int k,
            int group_shift, int k_split) {
    gemv_w4<T, kAhead>(y, x, w, params, rows, n_out, k, group_shift, k_split);
}

// The same with at most 256 threads (k_split 8), so up to 255 registers.
template <int kAhead, typename T>
__global__ void __launch_bounds__(256)
    variant256(T* y, const T* x, const uint4* w, const unsigned* params, int rows, int n_out,
               int k, int group_shift, int k_split) {
    gemv_w4<T, kAhead>(y, x, w, params, rows, n_out, k, group_shift, k_split);
}

// An experiment (issue 12): gemv_w4 with x staged in shared memory. After the wait each warp
// copies x's rows over its part of K into shared memory at once (one L2 round trip), so the
// register ring holds only weights and group parameters (6 registers a tile instead of 14) and
// can run deeper, or leave room for more warps. Groups of 64 inputs or more only; the same
// arithmetic in the same order as gemv_w4 (so the same bits at the same k_split). Dynamic shared
// memory: rows x k x 2 bytes.
struct WTile {
    uint4 w;
    uint2 p;
};

template <typename T, int kAhead>
__device__ void gemv_w4_xs(T* __restrict__ y, const T* __restrict__ x,
                           const uint4* __restrict__ w, const unsigned int* __restrict__ params,
                           int rows, int n_out, int k, int group_shift, int k_split) {
    extern __shared__ uint4 x_shared[];
    __shared__ float partial[kMaxSplit][16][8];
    constexpr int kSlots = kAhead + 1;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int rb = blockIdx.x;
    const int k_tiles = k / 64;
    const int part_tiles = k_tiles / k_split;
    const int kt0 = warp * part_tiles;
    const int groups = group_shift >= 31 ? 1 : k >> group_shift;
    const uint4* wp = w + ((long long)rb * k_tiles + kt0) * 32 + lane;
    const uint2* pp = reinterpret_cast<const uint2*>(params) + (long long)rb * groups * 8 + g;
    auto load = [&](WTile& tile, int i) {
        tile.w = load_streaming(wp + 32 * i);
        tile.p = __ldg(pp + 8 * (static_cast<unsigned int>(kt0 + i) >> (group_shift - 6)));
    };
    WTile slot[kSlots];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
        if (u < part_tiles) {
            load(slot[u], u);
        }
    }
    tpserve::wait_for_inputs_after_loads();
    // This warp's part of x, every row: 8 pieces of 16 bytes a tile and row.
    T* xs = reinterpret_cast<T*>(x_shared);
    const int pieces = part_tiles * 8;
    for (int m = 0; m < rows; ++m) {
        const uint4* src = reinterpret_cast<const uint4*>(x + (long long)m * k + 64 * kt0);
        uint4* dst = reinterpret_cast<uint4*>(xs + m * k + 64 * kt0);
        for (int q = lane; q < pieces; q += 32) {
            dst[q] = __ldg(src + q);
        }
    }
    __syncwarp();
    const T* xr = xs + (g < rows ? g : 0) * k + 64 * kt0 + 16 * t;
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < part_tiles; i += kSlots) {
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
            if (i + u >= part_tiles) {
                break;
            }
            if (i + u + kAhead < part_tiles) {
                load(slot[(u + kAhead) % kSlots], i + u + kAhead);
            }
            const WTile& cur = slot[u];
            const uint4 x0 = *reinterpret_cast<const uint4*>(xr + 64 * (i + u));
            const uint4 x1 = *reinterpret_cast<const uint4*>(xr + 64 * (i + u) + 8);
            const unsigned int words[4] = {cur.w.x, cur.w.y, cur.w.z, cur.w.w};
            const unsigned int xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            chunk_products<T, 4>(total, words, xw, cur.p, 0);
        }
    }
    sum_parts<T, false>(y, partial, total, rb, rows, n_out, k_split);
}

template <int kAhead, typename T>
__global__ void __launch_bounds__(512)
    variant_xs(T* y, const T* x, const uint4* w, const unsigned* params, int rows, int n_out,
               int k, int group_shift, int k_split) {
    gemv_w4_xs<T, kAhead>(y, x, w, params, rows, n_out, k, group_shift, k_split);
}

// The same at most 64 registers a thread: up to 32 warps an SM instead of 16.
template <int kAhead, typename T>
__global__ void __maxnreg__(64)
    variant_xs64(T* y, const T* x, const uint4* w, const unsigned* params, int rows, int n_out,
                 int k, int group_shift, int k_split) {
    gemv_w4_xs<T, kAhead>(y, x, w, params, rows, n_out, k, group_shift, k_split);
}

// The same at most 80 registers a thread: up to 24 warps an SM instead of 16.
template <int kAhead, typename T>
__global__ void __maxnreg__(80)
    variant_xs80(T* y, const T* x, const uint4* w, const unsigned* params, int rows, int n_out,
                 int k, int group_shift, int k_split) {
    gemv_w4_xs<T, kAhead>(y, x, w, params, rows, n_out, k, group_shift, k_split);
}

// int4.cu's gemv_w4 with its tiles computed two at a time (kPairs: two independent mma chains,
// the same bits; session 51), kAhead tiles ahead of a pair; the worker's gemv_w4_pairs is
// kInFlight (4) ahead.
template <int kAhead, typename T>
__global__ void __launch_bounds__(512)
    variant_pairs(T* y, const T* x, const uint4* w, const unsigned* params, int rows, int n_out,
                  int k, int group_shift, int k_split) {
    gemv_w4<T, kAhead, false, true>(y, x, w, params, rows, n_out, k, group_shift, k_split);
}

// The same with at most 256 threads (k_split 8), so up to 255 registers: deeper rings.
template <int kAhead, typename T>
__global__ void __launch_bounds__(256)
    variant_pairs256(T* y, const T* x, const uint4* w, const unsigned* params, int rows,
                     int n_out, int k, int group_shift, int k_split) {
    gemv_w4<T, kAhead, false, true>(y, x, w, params, rows, n_out, k, group_shift, k_split);
}

typedef void (*Kernel)(bf*, const bf*, const uint4*, const unsigned*, int, int, int, int, int);
struct Variant {
    const char* name;
    Kernel kernel;
    bool old_layout;
    int max_split;
    bool x_shared = false;  // takes rows x k x 2 bytes of dynamic shared memory (variant_xs)
};

// A 4-bit weight [n, k] in groups, and what the layouts make of it.
struct Weight {
    int n, k, group;  // group: inputs per group
    std::vector<unsigned char> q;
    std::vector<float> scale, zero;  // [n, k / group]
    float at(int r, int c) const {
        const int j = r * (k / group) + c / group;
        return (q[(size_t)r * k + c] - zero[j]) * scale[j];
    }
    unsigned param(int r, int j) const {
        const int i = r * (k / group) + j;
        const unsigned short s = __half_as_ushort(__float2half(scale[i]));
        const unsigned short z = __half_as_ushort(__float2half(zero[i]));
        return s | ((unsigned)z << 16);
    }
};

static Weight make_weight(int n, int k, int group, unsigned seed) {
    Weight w{n, k, group, {}, {}, {}};
    w.q.resize((size_t)n * k);
    for (auto& v : w.q) v = lcg_next(seed) & 15;
    const int groups = n * (k / group);
    w.scale.resize(groups);
    w.zero.resize(groups);
    for (int i = 0; i < groups; ++i) {
        // f16-exact scales around 0.01, integer zero points.
        w.scale[i] = __half2float(__float2half(0.004f + (lcg_next(seed) % 1000) * 0.00001f));
        w.zero[i] = (float)(lcg_next(seed) % 16);
    }
    return w;
}

static int group_shift_of(const Weight& w) {
    if (w.group == w.k) return 31;
    int s = 0;
    while ((1 << s) < w.group) ++s;
    return s;
}

// int4.cu's layout (input_of) and its params.
static void pack_new(const Weight& w, std::vector<unsigned>& words, std::vector<unsigned>& params) {
    const int k_tiles = w.k / 64, spc = group_shift_of(w) >= 6 ? 4 : 2;
    words.assign((size_t)w.n * w.k / 8, 0);
    for (size_t i = 0; i < words.size(); ++i) {
        const int s = i % 4, lane = (i / 4) % 32;
        const size_t tile = i / 128;
        const int rb = tile / k_tiles, kt = tile % k_tiles, g = lane / 4, t = lane % 4;
        const int first = 64 * kt + 16 * spc * (s / spc) + 4 * spc * t + 4 * (s % spc);
        for (int e = 0; e < 8; ++e) {
            const int r = rb * 16 + g + 8 * ((e / 2) % 2);
            const int c = first + e % 2 + 2 * (e / 4);
            const int value = e % 2 == 0 ? e / 2 : e / 2 + 4;
            words[i] |= (unsigned)w.q[(size_t)r * w.k + c] << (4 * value);
        }
    }
    const int groups = w.k / w.group;
    params.assign((size_t)w.n * groups, 0);
    for (int r = 0; r < w.n; ++r)
        for (int j = 0; j < groups; ++j)
            params[(((size_t)(r / 16) * groups + j) * 8 + r % 8) * 2 + (r % 16) / 8] =
                w.param(r, j);
}

// The layout before (inputs of a step in order; params [n, groups]).
static void pack_old(const Weight& w, std::vector<unsigned>& words, std::vector<unsigned>& params) {
    const int k_tiles = w.k / 64;
    words.assign((size_t)w.n * w.k / 8, 0);
    for (size_t i = 0; i < words.size(); ++i) {
        const int s = i % 4, lane = (i / 4) % 32;
        const size_t tile = i / 128;
        const int rb = tile / k_tiles, kt = tile % k_tiles, g = lane / 4, t = lane % 4;
        for (int e = 0; e < 8; ++e) {
            const int r = rb * 16 + g + 8 * ((e / 2) % 2);
            const int c = kt * 64 + 16 * s + 2 * t + e % 2 + 8 * (e / 4);
            const int value = e % 2 == 0 ? e / 2 : e / 2 + 4;
            words[i] |= (unsigned)w.q[(size_t)r * w.k + c] << (4 * value);
        }
    }
    const int groups = w.k / w.group;
    params.resize((size_t)w.n * groups);
    for (int r = 0; r < w.n; ++r)
        for (int j = 0; j < groups; ++j) params[(size_t)r * groups + j] = w.param(r, j);
}

// gemm_w4 on `rows` rows: the n-tiles of the smallest variant that holds them (64 a chunk).
template <typename T>
static void launch_gemm(cudaStream_t st, T* y, const T* x, const uint4* w, const unsigned* p,
                        float* partials, unsigned* counters, int rows, int n_out, int k,
                        int shift, int split, bool head = false) {
    const dim3 grid((n_out / 16 + kGemmWarps - 1) / kGemmWarps, split, (rows + 63) / 64);
    const dim3 block(32 * kGemmWarps);
    const int most = std::min(rows, 64);
    // int4.cu's entry points for T, as int4.rs launches them.
    typedef void (*Gemm)(T*, const T*, const uint4*, const unsigned*, float*, unsigned*, int, int,
                         int, int, int);
    Gemm kernels[3];
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        kernels[0] = gemm_w4_n16_bf16, kernels[1] = gemm_w4_n32_bf16, kernels[2] = gemm_w4_n64_bf16;
#ifdef TPSERVE_HEAD_INT4
        if (head) {
            kernels[0] = k_head::head_gemm_w4_n16_bf16, kernels[1] = k_head::head_gemm_w4_n32_bf16,
            kernels[2] = k_head::head_gemm_w4_n64_bf16;
        }
#endif
    } else {
        kernels[0] = gemm_w4_n16_f16, kernels[1] = gemm_w4_n32_f16, kernels[2] = gemm_w4_n64_f16;
    }
    launch_pdl(st, kernels[most <= 16 ? 0 : most <= 32 ? 1 : 2], grid, block, y, x, w, p, partials,
           counters, rows, n_out, k, shift, split);
}

// int4.rs's k_split: the most of 16, 8, 4, 2 that divides k's tiles, leaves each part at least
// 8 tiles and keeps the GEMV within 2,048 warps.
static int worker_k_split(int n_out, int k) {
    for (int s : {16, 8, 4, 2}) {
        if ((k / 64) % s == 0 && (k / 64) / s >= 8 && (n_out / 16) * s <= 2048) return s;
    }
    return 1;
}

// max |y - reference| / max |reference| over rows x n.
template <typename T>
static double error_of(const std::vector<T>& y, const std::vector<double>& ref) {
    double e = 0, m = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        e = std::max(e, std::fabs(to_f(y[i]) - ref[i]));
        m = std::max(m, std::fabs(ref[i]));
    }
    return e / m;
}

template <typename T>
static std::vector<double> reference(const Weight& w, const std::vector<T>& x, int rows) {
    std::vector<float> dense((size_t)w.n * w.k);
    for (int r = 0; r < w.n; ++r)
        for (int c = 0; c < w.k; ++c) dense[(size_t)r * w.k + c] = w.at(r, c);
    std::vector<double> ref((size_t)rows * w.n, 0.0);
    for (int m = 0; m < rows; ++m) {
        std::vector<double> xm(w.k);
        for (int c = 0; c < w.k; ++c) xm[c] = to_f(x[(size_t)m * w.k + c]);
        for (int r = 0; r < w.n; ++r) {
            const float* row = &dense[(size_t)r * w.k];
            double s = 0;
            for (int c = 0; c < w.k; ++c) s += xm[c] * row[c];
            ref[(size_t)m * w.n + r] = s;
        }
    }
    return ref;
}

template <typename T>
__global__ void dequantize_kernel(T* out, const unsigned* w, const unsigned* params, int n,
                                  int k, int shift) {
    dequantize_w4_impl<T>(out, w, params, n, k, shift);
}
template <typename T>
void dequantize_w4_impl_launch(T* out, const unsigned* w, const unsigned* p, int n, int k,
                               int shift) {
    dequantize_kernel<T><<<132 * 8, 256>>>(out, w, p, n, k, shift);
}

static const double kTolerance = 0.01;  // bf16 output: one rounding of ~0.004 at most
static int g_failures = 0;

// A weight packed in int4.cu's layout and `rows` rows of x in T (seeded), on the GPU, with the
// CPU's double-precision product.
template <typename T> struct Problem {
    std::vector<double> ref;
    unsigned *dw, *dp;
    T* dx;
    Problem(const Weight& w, int rows, unsigned seed) {
        std::vector<unsigned> words, params;
        pack_new(w, words, params);
        std::vector<T> x((size_t)rows * w.k);
        for (auto& v : x) v = from_f<T>((lcg_next(seed) % 2001) / 1000.0f - 1.0f);
        ref = reference(w, x, rows);
        dw = upload(words);
        dp = upload(params);
        dx = upload(x);
    }
    ~Problem() {
        CK(cudaFree(dw));
        CK(cudaFree(dp));
        CK(cudaFree(dx));
    }
};

// Correctness of the new kernels on one weight with T activations; and of dequantize_w4.
template <typename T, int kAhead>
static void check(const char* what, const Weight& w, int rows) {
    const Problem<T> pr(w, rows, 7);
    const auto& ref = pr.ref;
    unsigned *dw = pr.dw, *dp = pr.dp;
    T* dx = pr.dx;
    T* dy;
    CK(cudaMalloc(&dy, (size_t)rows * w.n * sizeof(T)));
    double worst = 0;
    size_t pair_mismatches = 0;  // gemv_w4_pairs against gemv_w4: the same bits
    for (int split = 1; split <= 16; split *= 2) {
        if ((w.k / 64) % split) continue;
        std::vector<T> y((size_t)rows * w.n), y_pairs(y.size());
        for (const bool pairs : {false, true}) {
            CK(cudaMemset(dy, 0xff, (size_t)rows * w.n * sizeof(T)));
            auto kernel = pairs ? variant_pairs<kAhead, T> : variant<kAhead, T>;
            kernel<<<w.n / 16, 32 * split>>>(dy, dx, reinterpret_cast<const uint4*>(dw), dp,
                                             rows, w.n, w.k, group_shift_of(w), split);
            CK(cudaDeviceSynchronize());
            std::vector<T>& out = pairs ? y_pairs : y;
            CK(cudaMemcpy(out.data(), dy, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
        }
        worst = std::max(worst, error_of(y, ref));
        for (size_t i = 0; i < y.size(); ++i) {
            pair_mismatches += memcmp(&y[i], &y_pairs[i], sizeof(T)) != 0;
        }
    }
    // dequantize_w4: bit for bit (q - zero) * scale rounded to T.
    T* dq;
    CK(cudaMalloc(&dq, (size_t)w.n * w.k * sizeof(T)));
    dequantize_w4_impl_launch<T>(dq, dw, dp, w.n, w.k, group_shift_of(w));
    CK(cudaDeviceSynchronize());
    std::vector<T> q((size_t)w.n * w.k);
    CK(cudaMemcpy(q.data(), dq, q.size() * sizeof(T), cudaMemcpyDeviceToHost));
    size_t mismatches = 0;
    for (int r = 0; r < w.n; ++r)
        for (int c = 0; c < w.k; ++c)
            if (to_f(q[(size_t)r * w.k + c]) != to_f(from_f<T>(w.at(r, c)))) ++mismatches;
    const bool ok = worst < kTolerance && mismatches == 0 && pair_mismatches == 0;
    g_failures += !ok;
    printf("check %-34s %d rows: max error %.5f (limit %.3f), dequantize mismatches %zu, pairs "
           "differing from gemv_w4 %zu: %s\n",
           what, rows, worst, kTolerance, mismatches, pair_mismatches, ok ? "PASS" : "FAIL");
    CK(cudaFree(dy));
    CK(cudaFree(dq));
}

// Microseconds per launch of `run(copy)` in a CUDA graph of `launches` launches rotating over
// `copies` weight copies (harness.cuh's graph_us).
template <typename F>
static double copies_us(cudaStream_t st, int launches, int copies, F run) {
    return graph_us(st, launches, [&](int i) { run(i % copies); });
}

// gemm_w4 against the CPU and, bit for bit, against gemv_w4 on 8 rows at a time at the same
// k_split.
template <typename T>
static void check_gemm(const char* what, const Weight& w, int rows) {
    const Problem<T> pr(w, rows, 9);
    const auto& ref = pr.ref;
    unsigned *dw = pr.dw, *dp = pr.dp;
    T* dx = pr.dx;
    T *dy, *dg;
    CK(cudaMalloc(&dy, (size_t)rows * w.n * sizeof(T)));
    CK(cudaMalloc(&dg, (size_t)rows * w.n * sizeof(T)));
    const int chunks = (rows + 63) / 64;
    float* partials;
    CK(cudaMalloc(&partials, (size_t)chunks * 16 * 64 * w.n * sizeof(float)));
    unsigned* counters;
    const size_t n_counters = (size_t)chunks * ((w.n / 16 + kGemmWarps - 1) / kGemmWarps);
    CK(cudaMalloc(&counters, n_counters * sizeof(unsigned)));
    CK(cudaMemset(counters, 0, n_counters * sizeof(unsigned)));
    const uint4* wq = reinterpret_cast<const uint4*>(dw);
    double worst = 0;
    size_t differ = 0;
    for (int split = 1; split <= 16; split *= 2) {
        if ((w.k / 64) % split) continue;
        for (int rep = 0; rep < 2; ++rep) {  // twice: the counters must be left at zero
            CK(cudaMemset(dy, 0xff, (size_t)rows * w.n * sizeof(T)));
            launch_gemm<T>(0, dy, dx, wq, dp, partials, counters, rows, w.n, w.k,
                           group_shift_of(w), split);
            CK(cudaDeviceSynchronize());
        }
        for (int m = 0; m < rows; m += 8) {
            variant<4, T><<<w.n / 16, 32 * split>>>(dg + (size_t)m * w.n, dx + (size_t)m * w.k,
                                                    wq, dp, std::min(8, rows - m), w.n, w.k,
                                                    group_shift_of(w), split);
        }
        CK(cudaDeviceSynchronize());
        std::vector<T> y((size_t)rows * w.n), yg((size_t)rows * w.n);
        CK(cudaMemcpy(y.data(), dy, y.size() * sizeof(T), cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(yg.data(), dg, yg.size() * sizeof(T), cudaMemcpyDeviceToHost));
        worst = std::max(worst, error_of(y, ref));
        differ += memcmp(y.data(), yg.data(), y.size() * sizeof(T)) != 0;
    }
    std::vector<unsigned> left(n_counters);
    CK(cudaMemcpy(left.data(), counters, n_counters * sizeof(unsigned), cudaMemcpyDeviceToHost));
    const bool zeroed = std::all_of(left.begin(), left.end(), [](unsigned c) { return c == 0; });
    const bool ok = worst < kTolerance && differ == 0 && zeroed;
    g_failures += !ok;
    printf("check gemm_w4 %-26s %d rows: max error %.5f (limit %.3f), k_splits unlike the "
           "GEMV's bits %zu, counters %s: %s\n",
           what, rows, worst, kTolerance, differ, zeroed ? "zero" : "LEFT", ok ? "PASS" : "FAIL");
    CK(cudaFree(dy));
    CK(cudaFree(dg));
    CK(cudaFree(partials));
    CK(cudaFree(counters));
}

// gemm_w4 against gemv_w4 a chunk of 8 rows at a time and dequantize_w4 alone (the first half
// of the path of more than 8 rows before it, cuBLAS the other), for Llama-3-8B's products.
static void time_gemm(cudaStream_t st, double copy_gbs) {
    const std::vector<int> row_list = env_int_list("GEMM_ROWS", {16, 32, 64, 128, 256});
    printf("\n| product | rows | kernel | k_split | us | weight GB/s | of copy |\n"
           "| --- | ---: | --- | ---: | ---: | ---: | ---: |\n");
    for (const ProductShape& s : LLAMA3_8B_PRODUCTS) {
        const Weight w = make_weight(s.n, s.k, 128, 300);
        std::vector<unsigned> wn, pn;
        pack_new(w, wn, pn);
        const double bytes = wn.size() * 4.0 + pn.size() * 4.0;
        const int copies = std::max(2, (int)std::ceil(256e6 / bytes));
        std::vector<unsigned*> dwn(copies), dpn(copies);
        for (int c = 0; c < copies; ++c) {
            dwn[c] = upload(wn);
            dpn[c] = upload(pn);
        }
        const int max_rows = row_list.empty() ? 0 : *std::max_element(row_list.begin(), row_list.end());
        const int chunks = (max_rows + 63) / 64;
        std::vector<bf> x((size_t)max_rows * s.k);
        unsigned seed = 5;
        for (auto& v : x) v = from_f<bf>((lcg_next(seed) % 2001) / 1000.0f - 1.0f);
        bf* dx = upload(x);
        bf *dy, *dq;
        CK(cudaMalloc(&dy, (size_t)max_rows * s.n * sizeof(bf)));
        CK(cudaMalloc(&dq, (size_t)s.n * s.k * sizeof(bf)));
        float* partials;
        CK(cudaMalloc(&partials, (size_t)chunks * 16 * 64 * s.n * sizeof(float)));
        unsigned* counters;
        const size_t n_counters = (size_t)chunks * ((s.n / 16 + kGemmWarps - 1) / kGemmWarps);
        CK(cudaMalloc(&counters, n_counters * sizeof(unsigned)));
        CK(cudaMemset(counters, 0, n_counters * sizeof(unsigned)));
        auto time_us = [&](auto run) { return copies_us(st, 32, copies, run); };
        auto row = [&](int rows, const char* kernel, int split, double us) {
            const double gbs = bytes / (us * 1e-6) / 1e9;
            printf("| %s | %d | %s | %d | %.2f | %.0f | %.3f |\n", s.name, rows, kernel, split, us,
                   gbs, gbs / copy_gbs);
        };
        const int gemv_split = worker_k_split(s.n, s.k);
        for (int rows : row_list) {
            for (int split = 1; split <= 16; split *= 2) {
                if ((s.k / 64) % split || (s.k / 64) / split < 4) continue;
                const double us = time_us([&](int c) {
                    launch_gemm<bf>(st, dy, dx, reinterpret_cast<const uint4*>(dwn[c]), dpn[c],
                                    partials, counters, rows, s.n, s.k, 7, split);
                });
                row(rows, split == gemv_split ? "gemm_w4 (the GEMV's k_split)" : "gemm_w4", split,
                    us);
            }
#ifdef TPSERVE_HEAD_INT4
            const double head_us = time_us([&](int c) {
                launch_gemm<bf>(st, dy, dx, reinterpret_cast<const uint4*>(dwn[c]), dpn[c],
                                partials, counters, rows, s.n, s.k, 7, gemv_split, true);
            });
            row(rows, "HEAD gemm_w4 (the GEMV's k_split)", gemv_split, head_us);
#endif
            const double gemv_us = time_us([&](int c) {
                for (int m = 0; m < rows; m += 8) {
                    launch_pdl(st, variant<4, bf>, dim3(s.n / 16), dim3(32 * gemv_split),
                           dy + (size_t)m * s.n, (const bf*)(dx + (size_t)m * s.k),
                           reinterpret_cast<const uint4*>(dwn[c]), (const unsigned*)dpn[c],
                           std::min(8, rows - m), s.n, s.k, 7, gemv_split);
                }
            });
            row(rows, "gemv_w4, 8 rows a launch", gemv_split, gemv_us);
        }
        const double dq_us = time_us([&](int c) {
            launch_pdl(st, dequantize_kernel<bf>, dim3(132 * 8), dim3(256), dq,
                   (const unsigned*)dwn[c], (const unsigned*)dpn[c], s.n, s.k, 7);
        });
        row(0, "dequantize_w4 alone (any rows; cuBLAS comes after)", 0, dq_us);
        for (int c = 0; c < copies; ++c) {
            CK(cudaFree(dwn[c]));
            CK(cudaFree(dpn[c]));
        }
        CK(cudaFree(dx));
        CK(cudaFree(dy));
        CK(cudaFree(dq));
        CK(cudaFree(partials));
        CK(cudaFree(counters));
    }
}

int main() {
    const std::vector<int> row_list = env_int_list("ROWS", {1, 4, 8});
    cudaStream_t st;
    CK(cudaStreamCreate(&st));

    // Correctness: every variant on a small weight; group sizes 32, 128 and one group a row;
    // bf16 and f16.
    {
        const Weight g128 = make_weight(256, 1024, 128, 11);
        const Weight g32 = make_weight(128, 512, 32, 12);
        const Weight g64 = make_weight(64, 768, 64, 14);
        const Weight whole = make_weight(64, 1024, 1024, 13);
        for (int rows : {1, 3, 8}) {
            check<bf, 4>("bf16 g128", g128, rows);
            check<bf, 2>("bf16 g128 ahead 2", g128, rows);
            check<bf, 6>("bf16 g128 ahead 6", g128, rows);
            check<bf, 4>("bf16 g32", g32, rows);
            check<bf, 4>("bf16 g64", g64, rows);
            check<bf, 4>("bf16 one group a row", whole, rows);
            check<__half, 4>("f16 g128", g128, rows);
            check<__half, 4>("f16 g32", g32, rows);
        }
        for (int rows : {9, 16, 23, 32, 40, 64, 100, 130}) {
            check_gemm<bf>("bf16 g128", g128, rows);
            check_gemm<bf>("bf16 g32", g32, rows);
            check_gemm<bf>("bf16 one group a row", whole, rows);
            check_gemm<__half>("f16 g64", g64, rows);
        }
    }

    // The copy rate, for the ratios.
    const double copy_gbs = copy_bandwidth_gbs(st);
    printf("copy bandwidth: %.0f GB/s (read + write, as bench_device counts it: the floors' rate)\n",
           copy_gbs);

    if (!getenv("GEMV_ONLY")) {
        time_gemm(st, copy_gbs);
    }
    if (getenv("GEMM_ONLY")) {
        printf("%s: %d failures\n", g_failures ? "FAIL" : "PASS", g_failures);
        return g_failures ? 1 : 0;
    }

    std::vector<Variant> variants = {
        {"ahead 4 (gemv_w4)", variant<4, bf>, false, 16},
        {"ahead 2", variant<2, bf>, false, 16},
        {"ahead 3", variant<3, bf>, false, 16},
        {"at most 256 threads, ahead 4", variant256<4, bf>, false, 8},
        {"at most 256 threads, ahead 6", variant256<6, bf>, false, 8},
        {"at most 256 threads, ahead 8", variant256<8, bf>, false, 8},
        {"x in shared memory, ahead 4", variant_xs<4, bf>, false, 16, true},
        {"x in shared memory, ahead 8", variant_xs<8, bf>, false, 16, true},
        {"x in shared memory, ahead 12", variant_xs<12, bf>, false, 16, true},
        {"x in shared memory, ahead 3, 64 registers", variant_xs64<3, bf>, false, 16, true},
        {"x in shared memory, ahead 6, 80 registers", variant_xs80<6, bf>, false, 16, true},
        {"x in shared memory, ahead 8, 80 registers", variant_xs80<8, bf>, false, 16, true},
        {"tiles in pairs, ahead 4 (gemv_w4_pairs)", variant_pairs<4, bf>, false, 16},
        {"tiles in pairs, ahead 2", variant_pairs<2, bf>, false, 16},
        {"tiles in pairs, at most 256 threads, ahead 4", variant_pairs256<4, bf>, false, 8},
        {"tiles in pairs, at most 256 threads, ahead 6", variant_pairs256<6, bf>, false, 8},
    };
    for (const Variant& v : variants) {
        if (v.x_shared) {
            CK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    200 * 1024));
        }
    }
#ifdef TPSERVE_HEAD_INT4
    // The GEMV of an earlier int4.cu in this layout: the reference for time and for bits.
    variants.insert(variants.begin(), {"HEAD gemv_w4", k_head::head_gemv_w4_bf16, false, 16});
#endif
#ifdef TPSERVE_OLD_INT4
    variants.push_back({"before (v5)", k_old::old_gemv_w4_bf16, true, 16});
#endif
    // VARIANTS="a|b": only the variants whose names contain one of these (the first one kept
    // always: the others' bits are compared with it).
    if (const char* only = getenv("VARIANTS")) {
        std::vector<Variant> kept = {variants[0]};
        for (size_t i = 1; i < variants.size(); ++i) {
            std::string list = only;
            size_t at = 0;
            while (at <= list.size()) {
                const size_t end = std::min(list.find('|', at), list.size());
                const std::string word = list.substr(at, end - at);
                if (!word.empty() && std::string(variants[i].name).find(word) != std::string::npos) {
                    kept.push_back(variants[i]);
                    break;
                }
                at = end + 1;
            }
        }
        variants = kept;
    }
    printf("\n| product | rows | variant | k_split | us | GB/s | of copy | max error |\n"
           "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
    // best[variant][rows][shape]: each variant's fastest k_split
    std::vector<std::vector<std::vector<double>>> best(
        variants.size(),
        std::vector<std::vector<double>>(row_list.size(), std::vector<double>(4, 1e9)));
    for (int si = 0; si < 4; ++si) {
        const ProductShape& s = LLAMA3_8B_PRODUCTS[si];
        const Weight w = make_weight(s.n, s.k, 128, 100 + si);
        std::vector<unsigned> wn, pn, wo, po;
        pack_new(w, wn, pn);
        pack_old(w, wo, po);
        const double bytes = wn.size() * 4.0 + pn.size() * 4.0;
        const int copies = std::max(2, (int)std::ceil(256e6 / bytes));
        std::vector<unsigned*> dwn(copies), dpn(copies), dwo(copies), dpo(copies);
        for (int c = 0; c < copies; ++c) {
            dwn[c] = upload(wn);
            dpn[c] = upload(pn);
            dwo[c] = upload(wo);
            dpo[c] = upload(po);
        }
        for (size_t ri = 0; ri < row_list.size(); ++ri) {
            const int rows = row_list[ri];
            std::vector<bf> x((size_t)rows * s.k);
            unsigned seed = 5;
            for (auto& v : x) v = from_f<bf>((lcg_next(seed) % 2001) / 1000.0f - 1.0f);
            const auto ref = reference(w, x, rows);
            bf* dx = upload(x);
            bf* dy;
            CK(cudaMalloc(&dy, (size_t)rows * s.n * sizeof(bf)));
            // The first variant's output at each k_split, for the bits of the others.
            std::vector<std::vector<bf>> first_y(17);
            for (size_t vi = 0; vi < variants.size(); ++vi) {
                const Variant& v = variants[vi];
                for (int split = 1; split <= v.max_split; split *= 2) {
                    if ((s.k / 64) % split) continue;
                    const size_t smem = v.x_shared ? (size_t)rows * s.k * sizeof(bf) : 0;
                    if (smem > 200 * 1024) continue;
                    auto run = [&](int c) {
                        const uint4* wp = reinterpret_cast<const uint4*>(v.old_layout ? dwo[c]
                                                                                       : dwn[c]);
                        const unsigned* pp = v.old_layout ? dpo[c] : dpn[c];
                        // The old kernel takes group_size, the new one its log2.
                        const int g = v.old_layout ? 128 : 7;
                        launch_pdl_smem(st, v.kernel, dim3(s.n / 16), dim3(32 * split), smem, dy,
                                        (const bf*)dx, wp, pp, rows, s.n, s.k, g, split);
                    };
                    run(0);
                    CK(cudaStreamSynchronize(st));
                    std::vector<bf> y((size_t)rows * s.n);
                    CK(cudaMemcpy(y.data(), dy, y.size() * sizeof(bf), cudaMemcpyDeviceToHost));
                    const double err = error_of(y, ref);
                    if (err >= kTolerance) ++g_failures;
                    // Every variant in this layout does the same arithmetic: the same bits as
                    // the first at the same k_split.
                    const char* bits = "";
                    if (!v.old_layout) {
                        if (first_y[split].empty()) {
                            first_y[split] = y;
                            bits = " (bits: reference)";
                        } else if (memcmp(y.data(), first_y[split].data(),
                                          y.size() * sizeof(bf)) == 0) {
                            bits = " (bits: same)";
                        } else {
                            bits = " (bits: DIFFER) FAIL";
                            ++g_failures;
                        }
                    }
                    const double us = copies_us(st, 64, copies, run);
                    const double gbs = bytes / (us * 1e-6) / 1e9;
                    printf("| %s | %d | %s | %d | %.2f | %.0f | %.3f | %.5f%s%s |\n", s.name, rows,
                           v.name, split, us, gbs, gbs / copy_gbs, err,
                           err >= kTolerance ? " FAIL" : "", bits);
                    best[vi][ri][si] = std::min(best[vi][ri][si], us);
                }
            }
            CK(cudaFree(dx));
            CK(cudaFree(dy));
        }
        for (int c = 0; c < copies; ++c) {
            CK(cudaFree(dwn[c]));
            CK(cudaFree(dpn[c]));
            CK(cudaFree(dwo[c]));
            CK(cudaFree(dpo[c]));
        }
    }
    printf("\neach variant at its best k_split per product (us), and a layer's four x 32 layers "
           "(ms):\n");
    for (size_t ri = 0; ri < row_list.size(); ++ri) {
        for (size_t vi = 0; vi < variants.size(); ++vi) {
            double layer = 0;
            printf("rows %d | %-58s |", row_list[ri], variants[vi].name);
            for (int si = 0; si < 4; ++si) {
                printf(" %s %.2f", LLAMA3_8B_PRODUCTS[si].name, best[vi][ri][si]);
                layer += best[vi][ri][si];
            }
            printf(" | 32 layers %.3f ms\n", layer * 32e-3);
        }
    }
    printf("%s: %d failures\n", g_failures ? "FAIL" : "PASS", g_failures);
    return g_failures ? 1 : 0;
}
