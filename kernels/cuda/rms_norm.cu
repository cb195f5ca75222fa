// RMSNorm, plain and fused with the residual add that precedes it in every decoder layer.
#include "common.cuh"

// Shared body. With a residual: x += residual (rounded to T and stored back into x, which is
// then the next residual stream), then out = rmsnorm(x) * weight. Without: only the latter.
// Rounding follows Hugging Face's LlamaRMSNorm: mean of squares in f32, the normalised value
// rounded to T, then multiplied by the weight and rounded again.
//
// Rows whose length is a multiple of 8 (every model we serve) go 16 bytes at a time, each
// thread keeping its pieces (up to kMaxPieces) in registers between the two passes; others
// element by element. The reduction order depends on the row's length and the block's size
// alone, which the host sets from the row's length: never on the number of rows.
//
// With QUANT (the 16-byte path only; the host launches it only there), the output row is also
// quantized to FP8 E4M3 with its own scale, exactly as fp8.cu's fp8_quantize_rows would quantize
// it (the same maximum, scale and rounding): q_out[row, :] = E4M3(out[row, :] * (1 / s)) and
// q_scales[row] = s = amax / 448; `out` itself is then written only when not null.
template <typename T, bool HAS_RESIDUAL, int kMaxPieces, bool QUANT = false>
__device__ void rms_norm_impl(T* __restrict__ out, T* __restrict__ x,
                              const T* __restrict__ residual, const T* __restrict__ weight,
                              int hidden, float eps, unsigned char* __restrict__ q_out = nullptr,
                              float* __restrict__ q_scales = nullptr) {
    const long long row = blockIdx.x;
    T* xr = x + row * hidden;
    T* outr = out + row * hidden;
    const int pieces = hidden / 8;
    const bool in_registers = hidden % 8 == 0 && pieces <= kMaxPieces * (int)blockDim.x;
    // The narrow kernels' weight piece is a constant of the model: it loads while the kernel
    // before may still run, instead of after the sum's reduction, where its latency was on the
    // path of every norm (two a layer of a decode step); 32 registers still (the wide kernels
    // would take 25 more, and load theirs after the reduction).
    constexpr bool kWeightFirst = kMaxPieces == 1;
    uint4 weight_held[kMaxPieces];
    if constexpr (kWeightFirst) {
        weight_held[0] = in_registers && (int)threadIdx.x < pieces
                             ? *reinterpret_cast<const uint4*>(weight + threadIdx.x * 8)
                             : make_uint4(0, 0, 0, 0);
        tpserve::wait_for_inputs_after_loads();
    } else {
        tpserve::wait_for_inputs();
    }
    if (in_registers) {
        uint4 held[kMaxPieces];
        float sum_sq = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxPieces; ++j) {
            const int p = threadIdx.x + j * blockDim.x;
            if (p < pieces) {
                uint4 a = *reinterpret_cast<const uint4*>(xr + p * 8);
                T* e = reinterpret_cast<T*>(&a);
                if (HAS_RESIDUAL) {
                    const uint4 b =
                        *reinterpret_cast<const uint4*>(residual + row * hidden + p * 8);
                    const T* r = reinterpret_cast<const T*>(&b);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        e[i] = tpserve::from_float<T>(tpserve::to_float(e[i]) +
                                                      tpserve::to_float(r[i]));
                    }
                    *reinterpret_cast<uint4*>(xr + p * 8) = a;
                }
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float v = tpserve::to_float(e[i]);
                    sum_sq += v * v;
                }
                held[j] = a;
            }
        }
        const float total = tpserve::block_reduce_sum(sum_sq);
        const float scale = rsqrtf(total / (float)hidden + eps);
#pragma unroll
        for (int j = 0; j < kMaxPieces; ++j) {
            const int p = threadIdx.x + j * blockDim.x;
            if (p < pieces) {
                if constexpr (!kWeightFirst) {
                    weight_held[j] = *reinterpret_cast<const uint4*>(weight + p * 8);
                }
                const T* w = reinterpret_cast<const T*>(&weight_held[j]);
                T* e = reinterpret_cast<T*>(&held[j]);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float normed = tpserve::round_to<T>(tpserve::to_float(e[i]) * scale);
                    e[i] = tpserve::from_float<T>(normed * tpserve::to_float(w[i]));
                }
                if (!QUANT || out != nullptr) {
                    *reinterpret_cast<uint4*>(outr + p * 8) = held[j];
                }
            }
        }
        if (QUANT) {
            float amax = 0.0f;
#pragma unroll
            for (int j = 0; j < kMaxPieces; ++j) {
                if (threadIdx.x + j * blockDim.x < pieces) {
                    amax = fmaxf(amax, tpserve::abs_max8<T>(held[j]));
                }
            }
            const float q_scale = tpserve::e4m3_scale(tpserve::block_reduce_max(amax));
            const float q_inv_scale = 1.0f / q_scale;
            if (threadIdx.x == 0) {
                q_scales[row] = q_scale;
            }
#pragma unroll
            for (int j = 0; j < kMaxPieces; ++j) {
                const int p = threadIdx.x + j * blockDim.x;
                if (p < pieces) {
                    *reinterpret_cast<uint2*>(q_out + row * hidden + p * 8) =
                        tpserve::e4m3_quantize8<T>(held[j], q_inv_scale);
                }
            }
        }
        return;
    }
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = tpserve::to_float(xr[i]);
        if (HAS_RESIDUAL) {
            v = tpserve::round_to<T>(v + tpserve::to_float(residual[row * hidden + i]));
            xr[i] = tpserve::from_float<T>(v);
        }
        sum_sq += v * v;
    }
    const float total = tpserve::block_reduce_sum(sum_sq);
    const float scale = rsqrtf(total / (float)hidden + eps);
    // Each thread re-reads only the elements it wrote above, so no barrier is needed here.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float normed = tpserve::round_to<T>(tpserve::to_float(xr[i]) * scale);
        outr[i] = tpserve::from_float<T>(normed * tpserve::to_float(weight[i]));
    }
}

// rms_norm_{bf16,f16}: out = rmsnorm(x) * weight, row by row, for rows of at most 8,192
// elements: one 16-byte piece a thread, and at most 32 registers, so that two blocks of 1,024
// threads (four of 512: Llama-3-8B's 4,096) fit an SM and a prompt step's rows keep more loads in
// flight (issue 9, session 22). rms_norm_wide_{bf16,f16}: the same for longer rows (up to four
// pieces a thread; element by element past 32,768). Both sum a row in the same order for the
// same block size.
//
// Arguments:
//   out     T   [num_tokens, hidden]   written; must not alias x
//   x       T   [num_tokens, hidden]   read only
//   weight  T   [hidden]
//   hidden  i32
//   eps     f32                        e.g. config.json's rms_norm_eps
// Launch: grid (num_tokens, 1, 1); block (B, 1, 1) with B a multiple of 32, at most 1024
// (e.g. min(1024, round_up(hidden / 8, 32))); one block per row. Rows, x, residual, weight and
// out 16-byte aligned when hidden is a multiple of 8.
//
// rms_norm_residual_{bf16,f16}, rms_norm_residual_wide_{bf16,f16}: x += residual;
// out = rmsnorm(x) * weight (the same split by row length).
//
// Arguments:
//   out       T   [num_tokens, hidden]   written; must not alias x or residual
//   x         T   [num_tokens, hidden]   the residual stream; read and written: holds
//                                        x + residual afterwards
//   residual  T   [num_tokens, hidden]   the sublayer output to add (attention or MLP); read only
//   weight    T   [hidden]
//   hidden    i32
//   eps       f32
// Launch: as rms_norm.
//
// rms_norm_fp8_rows_{bf16,f16}, rms_norm_residual_fp8_rows_{bf16,f16}: rms_norm and
// rms_norm_residual (the narrow kernels: hidden a multiple of 8, at most 8,192) that also
// quantize each output row to FP8 for the product that reads it (issue 12: the per-token
// activations of cuBLASLt's FP8 GEMM, without a pass of their own over the norm's output).
//
// Extra arguments, after the others:
//   q_out     u8  [num_tokens, hidden]   written (E4M3 bits)
//   q_scales  f32 [num_tokens]           written (each row's scale)
// `out` may be null: the dtype output is then not written.
#define TPSERVE_RMS_NORM_KERNELS(NAME, BOUNDS, PIECES, SUFFIX, T)                             \
    extern "C" __global__ void BOUNDS rms_norm##NAME##_##SUFFIX(                              \
        T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,           \
        int hidden, float eps) {                                                              \
        /* x is only written when HAS_RESIDUAL is true. */                                    \
        rms_norm_impl<T, false, PIECES>(out, const_cast<T*>(x), nullptr, weight, hidden, eps); \
    }                                                                                         \
    extern "C" __global__ void BOUNDS rms_norm_residual##NAME##_##SUFFIX(                     \
        T* __restrict__ out, T* __restrict__ x, const T* __restrict__ residual,               \
        const T* __restrict__ weight, int hidden, float eps) {                                \
        rms_norm_impl<T, true, PIECES>(out, x, residual, weight, hidden, eps);                \
    }
#define TPSERVE_RMS_NORM_FP8_ROWS(SUFFIX, T)                                                  \
    extern "C" __global__ void __launch_bounds__(1024, 2) rms_norm_fp8_rows_##SUFFIX(         \
        T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ weight,           \
        int hidden, float eps, unsigned char* __restrict__ q_out,                             \
        float* __restrict__ q_scales) {                                                       \
        rms_norm_impl<T, false, 1, true>(out, const_cast<T*>(x), nullptr, weight, hidden, eps, \
                                         q_out, q_scales);                                    \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024, 2) rms_norm_residual_fp8_rows_##SUFFIX( \
        T* __restrict__ out, T* __restrict__ x, const T* __restrict__ residual,               \
        const T* __restrict__ weight, int hidden, float eps, unsigned char* __restrict__ q_out, \
        float* __restrict__ q_scales) {                                                       \
        rms_norm_impl<T, true, 1, true>(out, x, residual, weight, hidden, eps, q_out,         \
                                        q_scales);                                            \
    }
#define TPSERVE_RMS_NORM(SUFFIX, T)                                                           \
    TPSERVE_RMS_NORM_KERNELS(, __launch_bounds__(1024, 2), 1, SUFFIX, T)                      \
    TPSERVE_RMS_NORM_KERNELS(_wide, , 4, SUFFIX, T)                                           \
    TPSERVE_RMS_NORM_FP8_ROWS(SUFFIX, T)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_RMS_NORM)
