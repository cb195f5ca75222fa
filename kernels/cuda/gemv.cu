// Matrix-vector products for steps of a few tokens (decode), where a GEMM is bound by reading
// the weights once: one warp per output row streams that row in 16-byte loads and serves every
// token of the step from it.
#include "common.cuh"

namespace {

constexpr int kGemvMaxRows = 8;   // tokens a launch may carry
constexpr int kGemvWarps = 8;     // output rows per block, one per warp

}  // namespace

// gemv_{bf16,f16}: y[t, r] = sum_i x[t, i] * w[r, i] for t < n, r < m: the `y = x W^T` of a
// Linear layer (row-major W [m, k], PyTorch's layout), for n <= 8 tokens. Accumulates in f32 and
// rounds to T once, as cuBLAS with f32 compute does.
//
// Arguments:
//   y  T   [n, m]   written
//   x  T   [n, k]
//   w  T   [m, k]
//   n  i32          1..8
//   m  i32
//   k  i32          a multiple of 8; x and w 16-byte aligned
// Launch: grid (ceil(m / 8), 1, 1); block (256, 1, 1): warp j of block b computes row 8 b + j.
template <typename T>
__device__ void gemv_impl(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w,
                          int n, int m, int k) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
    if (row >= m) {
        return;
    }
    const T* wr = w + (long long)row * k;
    float acc[kGemvMaxRows];
#pragma unroll
    for (int t = 0; t < kGemvMaxRows; ++t) {
        acc[t] = 0.0f;
    }
#pragma unroll 4
    for (int i = lane * 8; i < k; i += 32 * 8) {
        const uint4 wv = *reinterpret_cast<const uint4*>(wr + i);
        const T* wp = reinterpret_cast<const T*>(&wv);
        float wf[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            wf[j] = tpserve::to_float(wp[j]);
        }
#pragma unroll
        for (int t = 0; t < kGemvMaxRows; ++t) {
            if (t < n) {
                const uint4 xv = *reinterpret_cast<const uint4*>(x + (long long)t * k + i);
                const T* xp = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    acc[t] += wf[j] * tpserve::to_float(xp[j]);
                }
            }
        }
    }
#pragma unroll
    for (int t = 0; t < kGemvMaxRows; ++t) {
        if (t < n) {
            const float sum = tpserve::warp_reduce_sum(acc[t]);
            if (lane == 0) {
                y[(long long)t * m + row] = tpserve::from_float<T>(sum);
            }
        }
    }
}

#define TPSERVE_GEMV(SUFFIX, T)                                                               \
    extern "C" __global__ void gemv_##SUFFIX(T* __restrict__ y, const T* __restrict__ x,      \
                                             const T* __restrict__ w, int n, int m, int k) {  \
        gemv_impl<T>(y, x, w, n, m, k);                                                       \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_GEMV)
