// The gated activation of Llama's MLP: silu(gate) * up.
#include "common.cuh"

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
            const uint4 gv = *reinterpret_cast<const uint4*>(gate + p * 8);
            const uint4 uv = *reinterpret_cast<const uint4*>(up + p * 8);
            const T* g8 = reinterpret_cast<const T*>(&gv);
            const T* u8 = reinterpret_cast<const T*>(&uv);
            uint4 ov;
            T* o8 = reinterpret_cast<T*>(&ov);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float g = tpserve::to_float(g8[i]);
                const float activated = tpserve::round_to<T>(g / (1.0f + __expf(-g)));
                o8[i] = tpserve::from_float<T>(activated * tpserve::to_float(u8[i]));
            }
            *reinterpret_cast<uint4*>(dst + p * 8) = ov;
        }
        return;
    }
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < d; i += blockDim.x * gridDim.y) {
        const float g = tpserve::to_float(gate[i]);
        const float activated = tpserve::round_to<T>(g / (1.0f + __expf(-g)));
        dst[i] = tpserve::from_float<T>(activated * tpserve::to_float(up[i]));
    }
}

#define TPSERVE_SILU_MUL(SUFFIX, T)                                                           \
    extern "C" __global__ void silu_mul_##SUFFIX(T* __restrict__ out,                         \
                                                 const T* __restrict__ gate_up, int d) {      \
        silu_mul_impl<T>(out, gate_up, d);                                                    \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_SILU_MUL)
