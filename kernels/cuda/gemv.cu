// Matrix-vector products for the few-token steps of decoding, where a linear layer is bound by
// reading its weight once: y = x W^T for up to 8 rows of x.
#include "common.cuh"

namespace {

// 16 bytes of the weight, streamed: read once per step, so kept out of L1 (where the few rows
// of x that every warp re-reads stay instead).
__device__ __forceinline__ uint4 load_streaming(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

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

constexpr int kWarps = 4;       // warps per block
constexpr int kChunk = 32 * 8;  // elements of K one warp covers with one 16-byte load per lane

}  // namespace

// gemv_m{1,2,4,8}_r{1,2,4}_{bf16,f16}: y[m, n] = sum_k x[m, k] * w[n, k] for m < rows (at most
// M, the kernel's row capacity) and n < n_out, accumulated in f32 and rounded to T once.
// gemv_m{1,2}_r{1,2}_u{4,8}_{bf16,f16}: the same with U (4 or 8) chunks in flight per lane
// instead of 2, for the smaller matrices (a few thousand rows), whose warps otherwise spend
// the kernel waiting on a short chain of loads rather than streaming.
//
// Each warp owns R consecutive output columns n (rows of w) and walks K with one 16-byte load
// of each weight row per lane per 256-element chunk, U chunks in flight; x (a few rows, read
// by every warp) comes through L1. Before waiting for the previous kernel (common.cuh's
// wait_for_inputs) each warp prefetches its first 2 U chunks of weights into L2. The reduction
// order of y[m, n] is fixed by K alone (lane partial sums in chunk order, then a butterfly over
// the warp): it does not depend on M, R, U, the number of rows or the launch, so a row's result
// is the same in any batch of up to M rows and on every variant.
//
// Arguments:
//   y      T  [rows, n_out]   written
//   x      T  [rows, k]       read only
//   w      T  [n_out, k]      read only (PyTorch's Linear weight layout)
//   rows   i32                1..=M
//   n_out  i32
//   k      i32                a multiple of 8; x, w 16-byte aligned
// Launch: grid (ceil(n_out / (4 * R)), 1, 1); block (128, 1, 1).
template <typename T, int M, int R, int kUnroll>
__device__ void gemv_impl(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                          int rows, int n_out, int k) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n0 = (blockIdx.x * kWarps + warp) * R;
    // The weights do not depend on earlier kernels: start pulling this warp's first chunks into
    // L2 while the kernel before (which writes x) may still be running.
#pragma unroll
    for (int u = 0; u < 2 * kUnroll; ++u) {
        const int kk = lane * 8 + u * kChunk;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (kk < k && n0 + r < n_out) {
                asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (long long)(n0 + r) * k + kk));
            }
        }
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
    for (int base = lane * 8; base < k; base += kChunk * kUnroll) {
        uint4 wv[kUnroll][R];
        uint4 xv[kUnroll][M];
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
                xv[u][m] = in_k && m < rows ? load_cached(x + (long long)m * k + kk)
                                            : make_uint4(0u, 0u, 0u, 0u);
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    acc[r][m] = dot8<T>(wv[u][r], xv[u][m], acc[r][m]);
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
                y[(long long)m * n_out + n0 + r] = tpserve::from_float<T>(total);
            }
        }
    }
}

#define TPSERVE_GEMV_ONE(SUFFIX, T, M, R)                                                     \
    extern "C" __global__ void __launch_bounds__(128) gemv_m##M##_r##R##_##SUFFIX(            \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemv_impl<T, M, R, 2>(y, x, w, rows, n_out, k);                                       \
    }
#define TPSERVE_GEMV_DEEP(SUFFIX, T, M, R, U)                                                 \
    extern "C" __global__ void __launch_bounds__(128) gemv_m##M##_r##R##_u##U##_##SUFFIX(     \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemv_impl<T, M, R, U>(y, x, w, rows, n_out, k);                                       \
    }
#define TPSERVE_GEMV(SUFFIX, T)          \
    TPSERVE_GEMV_ONE(SUFFIX, T, 1, 1)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 1, 2)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 1, 4)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 2, 1)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 2, 2)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 2, 4)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 4, 1)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 4, 2)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 4, 4)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 8, 1)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 8, 2)    \
    TPSERVE_GEMV_ONE(SUFFIX, T, 8, 4)    \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 1, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 1, 8) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 2, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 1, 2, 8) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 1, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 1, 8) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 2, 4) \
    TPSERVE_GEMV_DEEP(SUFFIX, T, 2, 2, 8)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_GEMV)
