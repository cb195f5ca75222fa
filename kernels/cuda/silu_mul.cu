// The gated activation of Llama's MLP: silu(gate) * up.
#include "common.cuh"

namespace {

// silu(gate[i]) * up[i] for one 16-byte piece of each (8 elements, 16-byte aligned), rounded as
// silu_mul documents (common.cuh's silu_mul_rounded).
template <typename T>
__device__ __forceinline__ uint4 silu_mul8(const T* __restrict__ gate, const T* __restrict__ up) {
    const uint4 gv = *reinterpret_cast<const uint4*>(gate);
    const uint4 uv = *reinterpret_cast<const uint4*>(up);
    const T* g8 = reinterpret_cast<const T*>(&gv);
    const T* u8 = reinterpret_cast<const T*>(&uv);
    uint4 ov;
    T* o8 = reinterpret_cast<T*>(&ov);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        o8[i] = tpserve::silu_mul_rounded<T>(tpserve::to_float(g8[i]), tpserve::to_float(u8[i]));
    }
    return ov;
}

}  // namespace

// silu_mul_{bf16,f16}: out[t, i] = silu(gate_up[t, i]) * gate_up[t, d + i] for i in [0, d),
// where silu(g) = g / (1 + exp(-g)).
//
// gate_up is the output of the fused gate and up projection: the first d columns of each row
// are the gate, the last d the up projection (with tensor parallelism, d is this rank's share of
// the intermediate size). Rounding follows Hugging Face: silu(gate) is rounded to T, then the
// product is rounded again.
//
// Arguments:
//   out      T   [num_tokens, d]       written
//   gate_up  T   [num_tokens, 2 * d]   read only
//   d        i32
// Launch: grid (num_tokens, Y, 1); block (B, 1, 1): the Y blocks of a row stride over it
// together (Y around d / (8 B): with d a multiple of 8, each thread takes 16 bytes at a time,
// and one decode token still spreads over several SMs). 16-byte aligned rows when d % 8 == 0.
template <typename T>
__device__ void silu_mul_impl(T* __restrict__ out, const T* __restrict__ gate_up, int d) {
    tpserve::wait_for_inputs();
    const long long token = blockIdx.x;
    const T* gate = gate_up + token * 2 * d;
    const T* up = gate + d;
    T* dst = out + token * d;
    if (d % 8 == 0) {
        // 16 bytes of gate, of up and of the output per thread and step.
        for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < d / 8;
             p += blockDim.x * gridDim.y) {
            *reinterpret_cast<uint4*>(dst + p * 8) = silu_mul8<T>(gate + p * 8, up + p * 8);
        }
        return;
    }
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < d; i += blockDim.x * gridDim.y) {
        dst[i] = tpserve::silu_mul_rounded<T>(tpserve::to_float(gate[i]), tpserve::to_float(up[i]));
    }
}

// silu_mul_fp8_rows_{bf16,f16}: silu_mul's row (the same values, rounded as it rounds them)
// quantized to FP8 E4M3 with the row's own scale, as fp8.cu's fp8_quantize_rows would quantize
// it: q_out[t, :] = E4M3(out[t, :] * (1 / s_t)), q_scales[t] = s_t = amax_t / 448 (1 for a row of
// zeros); `out` written too when not null. For the down projection's per-token FP8
// activations (issue 12) without a pass of their own. The row waits in shared memory between
// its maximum and its conversion (each thread reads back only what it wrote); rows of Llama-3-8B
// (14,336 elements, 28 KiB) leave room for seven blocks an SM, whose passes overlap: one block
// of 1,024 threads holding the row in registers had one an SM and took 337 us for 8,192 rows
// against 281 for silu_mul and fp8_quantize_rows (tests/gpu/fp8_rows_bench.cu, H200).
//
// Arguments:
//   out       T   [num_tokens, d]       written, or null
//   q_out     u8  [num_tokens, d]       written (E4M3 bits)
//   q_scales  f32 [num_tokens]          written
//   gate_up   T   [num_tokens, 2 * d]   read only
//   d         i32                       a multiple of 8
// Launch: grid (num_tokens, 1, 1); block (256, 1, 1); dynamic shared memory d * sizeof(T)
// bytes. 16-byte aligned rows.
template <typename T>
__device__ void silu_mul_fp8_rows_impl(T* __restrict__ out, unsigned char* __restrict__ q_out,
                                       float* __restrict__ q_scales,
                                       const T* __restrict__ gate_up, int d) {
    extern __shared__ uint4 row_pieces[];
    tpserve::wait_for_inputs();
    const long long token = blockIdx.x;
    const T* gate = gate_up + token * 2 * d;
    const T* up = gate + d;
    const int pieces = d / 8;
    float amax = 0.0f;
#pragma unroll 4
    for (int p = threadIdx.x; p < pieces; p += blockDim.x) {
        const uint4 ov = silu_mul8<T>(gate + p * 8, up + p * 8);
        amax = fmaxf(amax, tpserve::abs_max8<T>(ov));
        row_pieces[p] = ov;
        if (out != nullptr) {
            *reinterpret_cast<uint4*>(out + token * d + p * 8) = ov;
        }
    }
    const float scale = tpserve::e4m3_scale(tpserve::block_reduce_max(amax));
    const float inv_scale = 1.0f / scale;
    if (threadIdx.x == 0) {
        q_scales[token] = scale;
    }
#pragma unroll 4
    for (int p = threadIdx.x; p < pieces; p += blockDim.x) {
        *reinterpret_cast<uint2*>(q_out + token * d + p * 8) =
            tpserve::e4m3_quantize8<T>(row_pieces[p], inv_scale);
    }
}

#define TPSERVE_SILU_MUL(SUFFIX, T)                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(T* __restrict__ out,                         \
                                                 const T* __restrict__ gate_up, int d) {      \
        silu_mul_impl<T>(out, gate_up, d);                                                    \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(256) silu_mul_fp8_rows_##SUFFIX(             \
        T* __restrict__ out, unsigned char* __restrict__ q_out, float* __restrict__ q_scales, \
        const T* __restrict__ gate_up, int d) {                                               \
        silu_mul_fp8_rows_impl<T>(out, q_out, q_scales, gate_up, d);                          \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_SILU_MUL)
