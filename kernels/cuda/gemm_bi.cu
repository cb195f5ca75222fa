// A batch-invariant matrix product for --batch-invariant: y = x W^T on tensor cores, with one
// tiling for every row count, no split over K and a fixed order of accumulation, so each output
// row is bit-identical whatever the other rows of the step are (alone, in any batch, in a
// prefill chunk or a decode step). Slower than cuBLAS, which picks kernels (and split-K) by
// shape; that is the price of the mode.
#include "common.cuh"

namespace {

constexpr int kThreads = 128;  // 4 warps, 2 x 2
constexpr int kTileM = 64;     // rows of x per block
constexpr int kTileN = 64;     // rows of w (output columns) per block
constexpr int kTileK = 32;     // K per shared-memory stage
constexpr int kPad = 8;        // elements of padding per shared row (ldmatrix without conflicts)
constexpr int kRow = kTileK + kPad;

using tpserve::cp_async_16;
using tpserve::cp_async_commit;
using tpserve::cp_async_wait;
using tpserve::ldmatrix_x4;
using tpserve::Mma;

}  // namespace

// gemm_bi_{bf16,f16}: y[m, n] = sum_k x[m, k] * w[n, k] for m < rows, n < n_out, accumulated in
// f32 in the order k = 0, 16, 32, ... (one m16n8k16 step at a time) and rounded to T once.
//
// Blocks of 64 x 64 outputs, 4 warps of 32 x 32; x and w tiles of 32 along K stream through
// two shared-memory stages by cp.async. The order of every output's sum depends only on K.
//
// Arguments:
//   y      T  [rows, n_out]   written
//   x      T  [rows, k]       read only
//   w      T  [n_out, k]      read only (PyTorch's Linear layout)
//   rows, n_out, k: i32       k a multiple of 8; x and w 16-byte aligned
// Launch: grid (ceil(n_out / 64), ceil(rows / 64), 1); block (128, 1, 1).
template <typename T>
__device__ void gemm_bi_impl(T* __restrict__ y, const T* __restrict__ x,
                             const T* __restrict__ w, int rows, int n_out, int k) {
    tpserve::wait_for_inputs();
    __shared__ __align__(16) T xs[2][kTileM][kRow];
    __shared__ __align__(16) T ws[2][kTileN][kRow];
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int warp_m = warp >> 1;  // 0..1: rows warp_m * 32 of the block's 64
    const int warp_n = warp & 1;   // 0..1: columns warp_n * 32
    const int m0 = blockIdx.y * kTileM;
    const int n0 = blockIdx.x * kTileN;

    // Each thread copies 2 of the 256 16-byte pieces of each tile per stage.
    auto load_stage = [&](int stage, int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int piece = tid + i * kThreads;
            const int r = piece >> 2;          // 4 pieces of 8 elements per 32-wide row
            const int c = (piece & 3) * 8;
            const int kk = k0 + c;
            const bool x_ok = m0 + r < rows && kk < k;
            const bool w_ok = n0 + r < n_out && kk < k;
            cp_async_16(&xs[stage][r][c], x_ok ? x + (long long)(m0 + r) * k + kk : x, x_ok);
            cp_async_16(&ws[stage][r][c], w_ok ? w + (long long)(n0 + r) * k + kk : w, w_ok);
        }
    };

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[i][j][e] = 0.0f;
            }
        }
    }

    const int tiles = (k + kTileK - 1) / kTileK;
    load_stage(0, 0);
    cp_async_commit();
    for (int t = 0; t < tiles; ++t) {
        const int stage = t & 1;
        if (t + 1 < tiles) {
            load_stage(stage ^ 1, (t + 1) * kTileK);
        }
        cp_async_commit();
        cp_async_wait<1>();  // this stage's copies are done (the next may be in flight)
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
            unsigned a[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = warp_m * 32 + i * 16 + (lane & 15);
                const int c = kk + (lane >> 4) * 8;
                ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3], &xs[stage][r][c]);
            }
            unsigned b[4][2];
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
                const int r = warp_n * 32 + j * 8 + (lane & 7) + (lane >> 4) * 8;
                const int c = kk + ((lane >> 3) & 1) * 8;
                ldmatrix_x4(b[j][0], b[j][1], b[j + 1][0], b[j + 1][1], &ws[stage][r][c]);
            }
#pragma unroll
            for (int i = 0; i < 2; ++i) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    Mma<T>::run(acc[i][j], a[i], b[j][0], b[j][1]);
                }
            }
        }
        __syncthreads();  // the stage is read before the next iteration refills it
    }

    const int g = lane >> 2;
    const int q = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + warp_n * 32 + j * 8 + q;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int m = m0 + warp_m * 32 + i * 16 + g + half * 8;
                if (m >= rows) {
                    continue;
                }
                T* out = y + (long long)m * n_out + n;
                if (n < n_out) {
                    out[0] = tpserve::from_float<T>(acc[i][j][half * 2]);
                }
                if (n + 1 < n_out) {
                    out[1] = tpserve::from_float<T>(acc[i][j][half * 2 + 1]);
                }
            }
        }
    }
}

#define TPSERVE_GEMM_BI(SUFFIX, T)                                                            \
    extern "C" __global__ void __launch_bounds__(128) gemm_bi_##SUFFIX(                       \
        T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int rows,        \
        int n_out, int k) {                                                                   \
        gemm_bi_impl<T>(y, x, w, rows, n_out, k);                                             \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_GEMM_BI)
