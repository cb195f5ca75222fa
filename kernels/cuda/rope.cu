// Rotary position embedding, rotate-half (GPT-NeoX / Hugging Face Llama) layout, in place.
#include "common.cuh"

// rope_{bf16,f16}: rotates every head of q and k of each token by the angle table row of that
// token's position. For each head vector h of length head_dim, half = head_dim / 2 and
// i in [0, half):
//   h[i]        = h[i] * cos_table[p, i] - h[i + half] * sin_table[p, i]
//   h[i + half] = h[i + half] * cos_table[p, i] + h[i] * sin_table[p, i]
// which is Hugging Face's `q * cos + rotate_half(q) * sin` with cos = cat(freqs, freqs).
// The rotation is computed in f32 and rounded to T once (Hugging Face rounds cos and sin to T
// first; the difference is within bf16 rounding).
//
// The tables hold cos and sin of position * inv_freq[i], computed on the host for every position
// up to the model's maximum length, with whatever frequency scaling the model uses (Llama 3's
// low/high-frequency scaling included). The whole head is rotated (no partial rotary).
//
// Arguments:
//   q             T   [num_tokens, q_stride], token t's heads at q + t * q_stride:
//                     [num_q_heads, head_dim]; read and written
//   k             T   [num_tokens, k_stride], token t's heads at k + t * k_stride:
//                     [num_kv_heads, head_dim]; read and written
//                     (the strides let q and k be views into a fused qkv projection output)
//   positions     i32 [num_tokens]             position of each token in its sequence, < max_pos
//   cos_table     f32 [max_pos, head_dim / 2]
//   sin_table     f32 [max_pos, head_dim / 2]
//   num_q_heads   i32
//   num_kv_heads  i32
//   head_dim      i32                          even
//   q_stride      i32                          elements between consecutive tokens of q
//   k_stride      i32                          elements between consecutive tokens of k
// Launch: grid (num_tokens, 1, 1); block (any, 1, 1), e.g. 128; threads stride over the
// (num_q_heads + num_kv_heads) * head_dim / 2 rotation pairs of the token.
template <typename T>
__device__ void rope_impl(T* __restrict__ q, T* __restrict__ k, const int* __restrict__ positions,
                          const float* __restrict__ cos_table,
                          const float* __restrict__ sin_table, int num_q_heads,
                          int num_kv_heads, int head_dim, int q_stride, int k_stride) {
    const long long token = blockIdx.x;
    const int half = head_dim / 2;
    const long long pos = positions[token];
    const float* cos_row = cos_table + pos * half;
    const float* sin_row = sin_table + pos * half;
    const int q_pairs = num_q_heads * half;
    const int pairs = (num_q_heads + num_kv_heads) * half;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        T* base;
        int local;
        if (p < q_pairs) {
            base = q + token * q_stride;
            local = p;
        } else {
            base = k + token * k_stride;
            local = p - q_pairs;
        }
        const int head = local / half;
        const int i = local - head * half;
        T* h = base + head * head_dim;
        const float x1 = tpserve::to_float(h[i]);
        const float x2 = tpserve::to_float(h[i + half]);
        const float c = cos_row[i];
        const float s = sin_row[i];
        h[i] = tpserve::from_float<T>(x1 * c - x2 * s);
        h[i + half] = tpserve::from_float<T>(x2 * c + x1 * s);
    }
}

#define TPSERVE_ROPE(SUFFIX, T)                                                               \
    extern "C" __global__ void rope_##SUFFIX(                                                 \
        T* __restrict__ q, T* __restrict__ k, const int* __restrict__ positions,              \
        const float* __restrict__ cos_table, const float* __restrict__ sin_table,             \
        int num_q_heads, int num_kv_heads, int head_dim, int q_stride, int k_stride) {        \
        rope_impl<T>(q, k, positions, cos_table, sin_table, num_q_heads, num_kv_heads,        \
                     head_dim, q_stride, k_stride);                                           \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_ROPE)
