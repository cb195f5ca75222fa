// FP8 E4M3 quantization (issue 12's `--quantization fp8`): each linear weight once at load with
// one f32 scale per tensor, and for products of more rows than the GEMV kernel takes, the
// activations of each product: with an FP8 checkpoint's static scale (the quantizing kernel
// alone, given one "partial maximum" of 448 times that scale), with one dynamic scale for the
// product (below 512 rows), or with one dynamic scale per row (per token; the norm and SiLU-mul
// kernels quantize their outputs this way themselves: rms_norm.cu, silu_mul.cu) before
// cuBLASLt's FP8 GEMM.
//
// A tensor's (or row's) scale is amax / 448 (448 is E4M3's largest finite value), its elements
// x times 1 / scale rounded to the nearest E4M3 value (ties to even) and saturated at +-448:
// vLLM's `scaled_fp8_quant`, which multiplies by the reciprocal too. A tensor's maximum takes
// two kernels, so that it needs no atomics and no zeroed accumulator (both are graph-safe):
// partial maxima per block, then every block of the quantizing kernel reduces the partials
// before it converts its share.
#include "common.cuh"

namespace {

using tpserve::block_reduce_max;

// The largest |x[j]| of 8 elements (16-byte aligned).
template <typename T> __device__ __forceinline__ float abs_max8(const T* __restrict__ x) {
    return tpserve::abs_max8<T>(*reinterpret_cast<const uint4*>(x));
}

// out[j] = E4M3(x[j] * inv_scale) for 8 elements (x 16-byte, out 8-byte aligned).
template <typename T>
__device__ __forceinline__ void quantize8(unsigned char* __restrict__ out,
                                          const T* __restrict__ x, float inv_scale) {
    *reinterpret_cast<uint2*>(out) =
        tpserve::e4m3_quantize8<T>(*reinterpret_cast<const uint4*>(x), inv_scale);
}

}  // namespace

// fp8_amax_partial_{bf16,f16}: partial[b] = max |x[i]| over block b's grid-stride share of x.
//
// Arguments:
//   partial  f32 [gridDim.x]  written
//   x        T   [n]          read only, 16-byte aligned
//   n        i64              a multiple of 8
// Launch: grid (P, 1, 1) with P <= 1024; block (256, 1, 1).
template <typename T>
__device__ void fp8_amax_partial_impl(float* __restrict__ partial, const T* __restrict__ x,
                                      long long n) {
    tpserve::wait_for_inputs();
    float m = 0.0f;
    const long long stride = (long long)gridDim.x * blockDim.x * 8;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += stride) {
        m = fmaxf(m, abs_max8(x + i));
    }
    m = block_reduce_max(m);
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = m;
    }
}

// fp8_quantize_{bf16,f16}: with amax the maximum of partial[0..p) and scale = amax / 448 (1 when
// amax is 0), out[i] = E4M3(x[i] * (1 / scale)); block 0 writes scale to *scale_out.
//
// Arguments:
//   out        u8  [n]   written (E4M3 bits), 8-byte aligned
//   scale_out  f32 [1]   written
//   partial    f32 [p]   read only (fp8_amax_partial's output)
//   p          i32       1..=1024
//   x          T   [n]   read only, 16-byte aligned
//   n          i64       a multiple of 8
// Launch: grid (any, 1, 1); block (256, 1, 1).
template <typename T>
__device__ void fp8_quantize_impl(unsigned char* __restrict__ out, float* __restrict__ scale_out,
                                  const float* __restrict__ partial, int p,
                                  const T* __restrict__ x, long long n) {
    tpserve::wait_for_inputs();
    float m = 0.0f;
    for (int i = threadIdx.x; i < p; i += blockDim.x) {
        m = fmaxf(m, partial[i]);
    }
    const float amax = block_reduce_max(m);
    const float scale = tpserve::e4m3_scale(amax);
    const float inv_scale = 1.0f / scale;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        *scale_out = scale;
    }
    const long long stride = (long long)gridDim.x * blockDim.x * 8;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += stride) {
        quantize8(out + i, x + i, inv_scale);
    }
}

// fp8_quantize_rows_{bf16,f16}: per-token quantization (an FP8 checkpoint's per-channel weights
// multiply activations quantized per row, as llm-compressor's FP8_DYNAMIC scheme says): with
// amax_r the maximum |x[r, :]| and scale_r = amax_r / 448 (1 when amax_r is 0),
// out[r, i] = E4M3(x[r, i] * (1 / scale_r)) and scales[r] = scale_r. One block per row.
//
// Arguments:
//   out     u8  [rows, k]  written (E4M3 bits), 8-byte aligned
//   scales  f32 [rows]     written
//   x       T   [rows, k]  read only, 16-byte aligned
//   k       i32            a multiple of 8
// Launch: grid (rows, 1, 1); block (256, 1, 1).
template <typename T>
__device__ void fp8_quantize_rows_impl(unsigned char* __restrict__ out, float* __restrict__ scales,
                                       const T* __restrict__ x, int k) {
    tpserve::wait_for_inputs();
    const long long row = (long long)blockIdx.x * k;
    float m = 0.0f;
    for (int i = threadIdx.x * 8; i < k; i += blockDim.x * 8) {
        m = fmaxf(m, abs_max8(x + row + i));
    }
    const float amax = block_reduce_max(m);
    const float scale = tpserve::e4m3_scale(amax);
    const float inv_scale = 1.0f / scale;
    if (threadIdx.x == 0) {
        scales[blockIdx.x] = scale;
    }
    for (int i = threadIdx.x * 8; i < k; i += blockDim.x * 8) {
        quantize8(out + row + i, x + row + i, inv_scale);
    }
}

// fp8_scale_outer_{bf16,f16}: y[i, j] = y[i, j] * row_scales[i] * col_scales[j] (a null pointer
// scales by 1), for cuBLASLt builds whose FP8 GEMM takes no vector scales for a shape: the GEMM
// then runs with scales of 1 and this applies the activations' per-row and the weight's
// per-output-row scales (y's columns) to its result.
//
// Arguments:
//   y           T   [rows, cols]  read and written, 16-byte aligned
//   row_scales  f32 [rows]        read only, or null
//   col_scales  f32 [cols]        read only, or null
//   n           i64               rows * cols
//   cols        i32               a multiple of 8
// Launch: grid (any, 1, 1); block (256, 1, 1).
template <typename T>
__device__ void fp8_scale_outer_impl(T* __restrict__ y, const float* __restrict__ row_scales,
                                     const float* __restrict__ col_scales, long long n, int cols) {
    tpserve::wait_for_inputs();
    const long long stride = (long long)gridDim.x * blockDim.x * 8;
    for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8; i < n; i += stride) {
        uint4 v = *reinterpret_cast<const uint4*>(y + i);
        T* e = reinterpret_cast<T*>(&v);
        const long long r = i / cols;
        const int col = (int)(i - r * cols);
        const float rs = row_scales != nullptr ? row_scales[r] : 1.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float cs = col_scales != nullptr ? col_scales[col + j] : 1.0f;
            e[j] = tpserve::from_float<T>(tpserve::to_float(e[j]) * rs * cs);
        }
        *reinterpret_cast<uint4*>(y + i) = v;
    }
}

#define TPSERVE_FP8(SUFFIX, T)                                                                \
    extern "C" __global__ void __launch_bounds__(256) fp8_amax_partial_##SUFFIX(              \
        float* __restrict__ partial, const T* __restrict__ x, long long n) {                  \
        fp8_amax_partial_impl<T>(partial, x, n);                                              \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) fp8_quantize_##SUFFIX(                  \
        unsigned char* __restrict__ out, float* __restrict__ scale_out,                       \
        const float* __restrict__ partial, int p, const T* __restrict__ x, long long n) {     \
        fp8_quantize_impl<T>(out, scale_out, partial, p, x, n);                               \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) fp8_quantize_rows_##SUFFIX(             \
        unsigned char* __restrict__ out, float* __restrict__ scales, const T* __restrict__ x, \
        int k) {                                                                              \
        fp8_quantize_rows_impl<T>(out, scales, x, k);                                         \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) fp8_scale_outer_##SUFFIX(               \
        T* __restrict__ y, const float* __restrict__ row_scales,                              \
        const float* __restrict__ col_scales, long long n, int cols) {                        \
        fp8_scale_outer_impl<T>(y, row_scales, col_scales, n, cols);                          \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_FP8)
