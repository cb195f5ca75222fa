// Matrix-vector products for the few-token steps of decoding, where a linear layer is bound by
// reading its weight once: y = x W^T for up to 8 rows of x.
#include "common.cuh"

namespace {

using tpserve::load_streaming;

__device__ __forceinline__ uint4 load_cached(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ float2 pair_to_float2(unsigned int bits, const __nv_bfloat16*) {
    __nv_bfloat162 h = *reinterpret_cast<__nv_bfloat162*>(&bits);
    return __bfloat1622float2(h);
}

__device__ __forceinline__ float2 pair_to_float2(unsigned int bits, const __half*) {
    __half2 h = *reinterpret_cast<__half2*>(&bits);
    return __half22float2(h);
}

// The dot product of 8 elements of w and 8 of x (16 bytes each), added to acc in element order.
template <typename T>
__device__ __forceinline__ float dot8(uint4 w, uint4 x, float acc) {
    const T* tag = nullptr;
    const unsigned int wb[4] = {w.x, w.y, w.z, w.w};
    const unsigned int xb[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 a = pair_to_float2(wb[i], tag);
        const float2 b = pair_to_float2(xb[i], tag);
        acc = fmaf(a.x, b.x, acc);
        acc = fmaf(a.y, b.y, acc);
    }
    return acc;
}

// The dot product of 16 FP8 E4M3 weights (one 16-byte load) and 16 elements of x (two 16-byte
// loads), added to acc in element order.
template <typename T>
__device__ __forceinline__ float dot16_e4m3(uint4 w, uint4 x0, uint4 x1, float acc) {
    const T* tag = nullptr;
    const unsigned int wb[4] = {w.x, w.y, w.z, w.w};
    const unsigned int xb[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 lo = tpserve::e4m3x2_to_float2(wb[i] & 0xffffu);
        const float2 hi = tpserve::e4m3x2_to_float2(wb[i] >> 16);
        const float2 a = pair_to_float2(xb[2 * i], tag);
        const float2 b = pair_to_float2(xb[2 * i + 1], tag);
        acc = fmaf(lo.x, a.x, acc);
        acc = fmaf(lo.y, a.y, acc);
        acc = fmaf(hi.x, b.x, acc);
        acc = fmaf(hi.y, b.y, acc);
    }
    return acc;
}

// An FP8 E4M3 weight element (one byte); its matrix carries one f32 scale.
struct E4M3 {
    unsigned char bits;
};

// What one 16-byte load of weights of type W holds, and its dot product with x: W is the
// activation dtype T (8 elements) or E4M3 (16 elements, two loads of x).
template <typename T, typename W> struct WeightLoad {
    static constexpr int kElements = 8;
    static __device__ __forceinline__ float dot(uint4 w, const uint4 (&x)[1], float acc) {
        return dot8<T>(w, x[0], acc);
    }
};
template <typename T> struct WeightLoad<T, E4M3> {
    static constexpr int kElements = 16;
    static __device__ __forceinline__ float dot(uint4 w, const uint4 (&x)[2], float acc) {
        return dot16_e4m3<T>(w, x[0], x[1], acc);
    }
};

constexpr int kWarps = 4;  // warps per block

}  // namespace

// Every variant is built with __launch_bounds__(128, 4): at least 4 resident blocks an SM, at
// most 128 registers a thread. Given the block size alone, ptxas aims at full occupancy (32
// registers) and schedules each load next to its first use, so a warp kept one or two 16-byte
// loads in flight whatever U said: the 4- and 8-chunk variants ran as the 2-chunk one, and the
// 2- and 4-column ones one chunk deep. Bounded at 4 blocks, it issues a whole step's U chunks
// (of every column and row) before the first sum, with no spills in any variant. The
// arithmetic is the same.

// gemv_m{1,2,4,8}_r{1,2,4}_{bf16,f16}: y[m, n] = sum_k x[m, k] * w[n, k] for m < rows (at most
// M, the kernel's row capacity) and n < n_out, accumulated in f32 and rounded to T once.
// gemv_m{1,2}_r{1,2}_u{4,8}_{bf16,f16}: the same with U (4 or 8) chunks in flight per lane
// instead of 2, for the smaller matrices (a few thousand rows), whose warps otherwise spend
// the kernel waiting on a short chain of loads rather than streaming.
// gemv_fp8_*: the same variants for FP8 E4M3 weights (issue 12's `--quantization fp8`):
// y[m, n] = w_scale[n or 0] * sum_k x[m, k] * w[n, k], x in T (weight-only FP8: the activations
// are not quantized for these few-row products); one scale per tensor, or per output row (an FP8
// checkpoint's per-channel scales, or per-tensor scales of fused q/k/v or gate/up).
//
// Each warp owns R consecutive output columns n (rows of w) and walks K with one 16-byte load
// of each weight row per lane per chunk (256 elements of T, or 512 of FP8 weights, a warp), U
// chunks in flight; x (a few rows, read by every warp) comes through L1. Before waiting for the
// previous kernel (common.cuh's wait_for_inputs) each warp prefetches its first 2 U chunks of
// weights into L2. The reduction order of y[m, n] is fixed by K alone (lane partial sums in
// chunk order, then a butterfly over the warp): it does not depend on M, R, U, the number of
// rows or the launch, so a row's result is the same in any batch of up to M rows and on every
// variant.
//
// Arguments:
//   y        T  [rows, n_out]   written
//   x        T  [rows, k]       read only
//   w        T or E4M3 [n_out, k]  read only (PyTorch's Linear weight layout)
//   w_scale  f32 [1] or [n_out]  read only (FP8 kernels only: the weight's scale, or its rows')
//   w_scale_per_row  i32        0: one scale; 1: one per output row (FP8 kernels only)
//   rows     i32                1..=M
//   n_out    i32
//   k        i32                a multiple of 8 (of 16 for FP8 weights); x, w 16-byte aligned
// Launch: grid (ceil(n_out / (4 * R)), 1, 1); block (128, 1, 1).
template <typename T, typename W, int M, int R, int kUnroll>
__device__ void gemv_impl(T* __restrict__ y, const T* __restrict__ x, const W* __restrict__ w,
                          const float* __restrict__ w_scale, int w_scale_per_row, int rows,
                          int n_out, int k) {
    using Load = WeightLoad<T, W>;
    constexpr int kPerLane = Load::kElements;   // elements of K per 16-byte weight load
    constexpr int kXLoads = kPerLane / 8;       // 16-byte loads of x per weight load
    constexpr int kChunk = 32 * kPerLane;       // elements of K one warp covers per load
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n0 = (blockIdx.x * kWarps + warp) * R;
    // The weights do not depend on earlier kernels: start pulling this warp's first chunks into
    // L2 while the kernel before (which writes x) may still be running. The count is known only
    // at run time and the loop unrolled by 4, not in full: so built, the one-column, two-chunk
    // variant of Llama-3-8B's o and down products ran 11-14% faster on an H200 (the 2- and
    // 4-column ones slower; the warm-up's timing picks per shape), and its batch-1 step 0.15 ms
    // (3.5%) faster, with the same bits out (docs/PERFORMANCE.md, issue 9, run 19).
    const int prefetch_chunks = min(2 * kUnroll, (k + kChunk - 1) / kChunk);
#pragma unroll 4
    for (int u = 0; u < prefetch_chunks; ++u) {
        const int kk = lane * kPerLane + u * kChunk;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (kk < k && n0 + r < n_out) {
                asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (long long)(n0 + r) * k + kk));
            }
        }
    }
    // The weight's scales are constants of the model too: loaded now, they are not a dependent
    // load after the sums (one scale per FP8 product, or its rows'; 1 for the dtype's weights).
    float out_scale[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        out_scale[r] = w_scale != nullptr && n0 + r < n_out
                           ? w_scale[w_scale_per_row ? n0 + r : 0]
                           : 1.0f;
    }
    tpserve::wait_for_inputs();
    if (n0 >= n_out) {
        return;
    }
    float acc[R][M];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            acc[r][m] = 0.0f;
        }
    }
    for (int base = lane * kPerLane; base < k; base += kChunk * kUnroll) {
        uint4 wv[kUnroll][R];
        uint4 xv[kUnroll][M][kXLoads];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int kk = base + u * kChunk;
            const bool in_k = kk < k;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                wv[u][r] = in_k && n0 + r < n_out
                               ? load_streaming(w + (long long)(n0 + r) * k + kk)
                               : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
#pragma unroll
                for (int j = 0; j < kXLoads; ++j) {
                    xv[u][m][j] = in_k && m < rows
                                      ? load_cached(x + (long long)m * k + kk + 8 * j)
                                      : make_uint4(0u, 0u, 0u, 0u);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    acc[r][m] = Load::dot(wv[u][r], xv[u][m], acc[r][m]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float total = tpserve::warp_reduce_sum(acc[r][m]);
            if (lane == ((r * M + m) & 31) && m < rows && n0 + r < n_out) {
                y[(long long)m * n_out + n0 + r] = tpserve::from_float<T>(total * out_scale[r]);
            }
        }
    }
}

// ONE(M, R): the variant of M rows and R columns a warp with 2 chunks in flight, for weights in T
// and in FP8 E4M3; DEEP(M, R, U): the same with U chunks in flight.
#define TPSERVE_GEMV_ONE(SUFFIX, T, M, R)                                                     \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_m##M##_r##R##_##SUFFIX(         \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemv_impl<T, T, M, R, 2>(y, x, w, nullptr, 0, rows, n_out, k);                        \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_fp8_m##M##_r##R##_##SUFFIX(     \
        T* __restrict__ y, const T* __restrict__ x, const E4M3* __restrict__ w,               \
        const float* __restrict__ w_scale, int w_scale_per_row, int rows, int n_out, int k) { \
        gemv_impl<T, E4M3, M, R, 2>(y, x, w, w_scale, w_scale_per_row, rows, n_out, k);       \
    }
#define TPSERVE_GEMV_DEEP(SUFFIX, T, M, R, U)                                                 \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_m##M##_r##R##_u##U##_##SUFFIX(  \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemv_impl<T, T, M, R, U>(y, x, w, nullptr, 0, rows, n_out, k);                        \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_fp8_m##M##_r##R##_u##U##_##SUFFIX( \
        T* __restrict__ y, const T* __restrict__ x, const E4M3* __restrict__ w,               \
        const float* __restrict__ w_scale, int w_scale_per_row, int rows, int n_out, int k) { \
        gemv_impl<T, E4M3, M, R, U>(y, x, w, w_scale, w_scale_per_row, rows, n_out, k);       \
    }

// gemv_mma_{bf16,f16} and gemv_fp8_mma_{bf16,f16}: the product for 1 to 8 rows on tensor cores,
// for weights in T and in FP8 E4M3, for the decoding batches of 2 to 8 rows, where the FMA
// variants above convert every weight once per row and fall to a quarter to a half of the copy
// rate on an H100 at 4 and 8 rows (FP8 weights), while this kernel's instructions a weight byte
// do not grow with the rows (docs/PERFORMANCE.md, issue 12, session 32). mma.m16n8k16 with x as
// A (its rows 0-7; rows 8-15 zero) and the weight as B (8 outputs; "col" layout = the weight's
// own row-major rows, so nothing is repacked): in tile i of its warp's part of K, lane (g, t)
// loads the 16 bytes of weight row n0 + g that hold inputs 4 I i + I t .. 4 I i + I t + I - 1
// (I = 8 elements of T or 16 of E4M3 a load), and its B fragment of step s is elements 4 s ..
// 4 s + 3 of them (E4M3 -> T exactly), so the step's k-slots 2t, 2t+1, 2t+8, 2t+9 are those
// inputs; its A fragment is x row g at the same inputs (one or two 16-byte loads, no
// conversion). A block of 4 warps owns 8 outputs and splits K four ways; the warps' sums are
// added in warp order. Its sums differ from the FMA variants' (the tensor cores' order):
// linear.rs's warm-up chooses it per shape and row bucket by timing, as it chooses between the
// GEMV and cuBLAS (its 16-row instance only with TPSERVE_CUDA_LINEAR=measured-wide).
//
// kAhead tiles are in flight per lane (4, or 8 in the _a8 entry points, which the warm-up times
// beside them: 8 suit qkv, 4 the o product, on an H100); kRows 16 fills A's rows 8-15 with x rows 8-15
// (gemv_mma_m16_{bf16,f16}: 9 to 16 rows of a weight in T, where cuBLAS is the alternative; the
// other entry points take up to 8). Arguments as the GEMVs above (w_scale null for weights in
// T), with k a multiple of 4 warps x 4 lanes x I (128 for T, 256 for E4M3).
// Launch: grid (ceil(n_out / 8), 1, 1); block (128, 1, 1).
template <typename T, typename W> struct MmaWeight {
    static constexpr int kInputs = 8;  // inputs of one 16-byte load
    // Step st's B fragment: the load's elements 4 st .. 4 st + 3 as two pairs of T.
    static __device__ __forceinline__ void fragment(const unsigned (&ws)[4], int st,
                                                    unsigned& b0, unsigned& b1) {
        b0 = ws[2 * st];
        b1 = ws[2 * st + 1];
    }
};
template <typename T> struct MmaWeight<T, E4M3> {
    static constexpr int kInputs = 16;
    static __device__ __forceinline__ void fragment(const unsigned (&ws)[4], int st,
                                                    unsigned& b0, unsigned& b1) {
        const float2 lo = tpserve::e4m3x2_to_float2(ws[st] & 0xffffu);
        const float2 hi = tpserve::e4m3x2_to_float2(ws[st] >> 16);
        b0 = tpserve::Mma<T>::pack(lo.x, lo.y);
        b1 = tpserve::Mma<T>::pack(hi.x, hi.y);
    }
};

template <typename T, typename W, int kAhead = 4, int kRows = 8>
__device__ void gemv_mma_impl(T* __restrict__ y, const T* __restrict__ x, const W* __restrict__ w,
                              const float* __restrict__ w_scale, int w_scale_per_row, int rows,
                              int n_out, int k) {
    static_assert(kRows == 8 || kRows == 16, "A has 16 rows: 8 of x (the rest zero) or 16");
    using Weight = MmaWeight<T, W>;
    constexpr int kInputs = Weight::kInputs;
    constexpr int kXLoads = kInputs / 8;      // 16-byte loads of x a weight load, for a row
    constexpr int kHalves = kRows / 8;        // A's row halves that hold x: g, and g + 8
    constexpr int kTile = 4 * kInputs;        // inputs of a row a tile (4 lanes)
    constexpr int kTileBytes = 4 * 16;        // bytes of a row a tile
    __shared__ float partial[kWarps][kRows][8];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int n0 = blockIdx.x * 8;
    const bool w_live = n0 + g < n_out;
    const int part = k / kWarps;  // inputs a warp
    const int tiles = part / kTile;
    const unsigned char* w_row = reinterpret_cast<const unsigned char*>(w) +
                                 ((long long)(w_live ? n0 + g : 0) * k + warp * part) * sizeof(W);
    bool x_live[kHalves];
    const T* xr[kHalves];
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
        x_live[h] = g + 8 * h < rows;
        xr[h] = x + (long long)(x_live[h] ? g + 8 * h : 0) * k + warp * part + kInputs * t;
    }
    // As the FMA variants: the weights are constants of the model, so the first tiles are pulled
    // into L2 (lane t: tile t) and the scales loaded while the kernel before may still run.
    if (w_live && t < min(kAhead, tiles)) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(w_row + kTileBytes * t));
    }
    float out_scale[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int n = n0 + 2 * t + j;
        out_scale[j] = w_scale != nullptr && warp == 0 && n < n_out
                           ? w_scale[w_scale_per_row ? n : 0]
                           : 1.0f;
    }
    tpserve::wait_for_inputs();
    const unsigned char* wr = w_row + 16 * t;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int base = 0; base < tiles; base += kAhead) {
        uint4 wv[kAhead], xv[kAhead][kHalves][kXLoads];
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
            const bool in = base + u < tiles;
            wv[u] = in && w_live ? load_streaming(wr + (long long)kTileBytes * (base + u))
                                 : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
            for (int h = 0; h < kHalves; ++h) {
#pragma unroll
                for (int j = 0; j < kXLoads; ++j) {
                    xv[u][h][j] = in && x_live[h]
                                      ? load_cached(xr[h] + (long long)kTile * (base + u) + 8 * j)
                                      : make_uint4(0u, 0u, 0u, 0u);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
            const unsigned ws[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
            // xs[h][i]: elements 2i and 2i + 1 of x row g + 8 h at this lane's inputs.
            unsigned xs[2][4 * kXLoads] = {};
#pragma unroll
            for (int h = 0; h < kHalves; ++h) {
#pragma unroll
                for (int j = 0; j < kXLoads; ++j) {
                    xs[h][4 * j] = xv[u][h][j].x;
                    xs[h][4 * j + 1] = xv[u][h][j].y;
                    xs[h][4 * j + 2] = xv[u][h][j].z;
                    xs[h][4 * j + 3] = xv[u][h][j].w;
                }
            }
#pragma unroll
            for (int st = 0; st < kInputs / 4; ++st) {
                unsigned b0, b1;
                Weight::fragment(ws, st, b0, b1);
                const unsigned a[4] = {xs[0][2 * st], xs[1][2 * st], xs[0][2 * st + 1],
                                       xs[1][2 * st + 1]};
                tpserve::Mma<T>::run(acc, a, b0, b1);
            }
        }
    }
    // The C fragment: acc[0], acc[1] are x row g's outputs n0 + 2t and n0 + 2t + 1, acc[2],
    // acc[3] row g + 8's (zero rows unless kRows is 16).
#pragma unroll
    for (int h = 0; h < kHalves; ++h) {
        partial[warp][g + 8 * h][2 * t] = acc[2 * h];
        partial[warp][g + 8 * h][2 * t + 1] = acc[2 * h + 1];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int h = 0; h < kHalves; ++h) {
            const int m = g + 8 * h;
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int n = 2 * t + j;
                float total = partial[0][m][n];
#pragma unroll
                for (int v = 1; v < kWarps; ++v) {
                    total += partial[v][m][n];
                }
                if (m < rows && n0 + n < n_out) {
                    y[(long long)m * n_out + n0 + n] = tpserve::from_float<T>(total * out_scale[j]);
                }
            }
        }
    }
}

// Every variant, for activations T.
#define TPSERVE_GEMV(SUFFIX, T)           \
    TPSERVE_GEMV_ONE(SUFFIX, T, 1, 1)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 1, 2)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 1, 4)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 2, 1)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 2, 2)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 2, 4)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 4, 1)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 4, 2)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 4, 4)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 8, 1)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 8, 2)     \
    TPSERVE_GEMV_ONE(SUFFIX, T, 8, 4)     \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 1, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 1, 8) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 2, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 2, 8) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 1, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 1, 8) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 2, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 2, 8)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_GEMV)
#define TPSERVE_GEMV_MMA(SUFFIX, T)                                                           \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_mma_##SUFFIX(                   \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemv_mma_impl<T, T>(y, x, w, nullptr, 0, rows, n_out, k);                             \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_mma_a8_##SUFFIX(                \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemv_mma_impl<T, T, 8>(y, x, w, nullptr, 0, rows, n_out, k);                          \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_mma_m16_##SUFFIX(               \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemv_mma_impl<T, T, 4, 16>(y, x, w, nullptr, 0, rows, n_out, k);                      \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_fp8_mma_##SUFFIX(               \
        T* __restrict__ y, const T* __restrict__ x, const E4M3* __restrict__ w,               \
        const float* __restrict__ w_scale, int w_scale_per_row, int rows, int n_out, int k) { \
        gemv_mma_impl<T, E4M3>(y, x, w, w_scale, w_scale_per_row, rows, n_out, k);            \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(128, 4) gemv_fp8_mma_a8_##SUFFIX(            \
        T* __restrict__ y, const T* __restrict__ x, const E4M3* __restrict__ w,               \
        const float* __restrict__ w_scale, int w_scale_per_row, int rows, int n_out, int k) { \
        gemv_mma_impl<T, E4M3, 8>(y, x, w, w_scale, w_scale_per_row, rows, n_out, k);         \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_GEMV_MMA)
