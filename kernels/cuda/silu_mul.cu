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
// together (Y around d / (8 B) keeps each thread a few elements, so one decode token still
// spreads over several SMs).
template <typename T>
__device__ void silu_mul_impl(T* __restrict__ out, const T* __restrict__ gate_up, int d) {
    const long long token = blockIdx.x;
    const T* gate = gate_up + token * 2 * d;
    const T* up = gate + d;
    T* dst = out + token * d;
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
