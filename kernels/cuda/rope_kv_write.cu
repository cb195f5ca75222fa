// The step's new keys and values into the paged KV cache, with the rotary position embedding
// (rotate-half, GPT-NeoX / Hugging Face Llama layout) applied on the way: one pass over the
// fused qkv projection output instead of a rotation pass and a copy pass.
#include "common.cuh"

// rope_kv_write_{bf16,f16}: for each token t of the step, with p = positions[t],
// half = head_dim / 2 and i in [0, half), for every head vector h:
//   rot(h)[i]        = h[i] * cos_table[p, i] - h[i + half] * sin_table[p, i]
//   rot(h)[i + half] = h[i + half] * cos_table[p, i] + h[i] * sin_table[p, i]
// (Hugging Face's `q * cos + rotate_half(q) * sin` with cos = cat(freqs, freqs)), and:
// - each query head of t is rotated in place in qkv;
// - when slot = slot_mapping[t] >= 0: key_cache[slot] = rot(k heads of t) and
//   value_cache[slot] = v heads of t (a negative slot skips the write: padding rows of a
//   CUDA-graph batch). The keys in qkv are left unrotated: attention reads keys from the cache.
//   An FP8 cache (the `_fp8kv` entry points, common.cuh's KvCache) gets E4M3(rot(k) / k_scale)
//   and E4M3(v / v_scale) of the values rounded to T; a cache in T ignores the scales.
// The rotation is computed in f32 and rounded to T once (Hugging Face rounds cos and sin to T
// first; the difference is within bf16 rounding). The tables hold cos and sin of
// position * inv_freq[i] for every position up to the model's maximum, with the model's
// frequency scaling (Llama 3's included), computed on the host.
//
// slot = block_id * block_size + offset, as the scheduler's block tables give it; a block's
// slots are contiguous, so slot * kv_heads * head_dim is the element offset of the slot.
//
// Arguments:
//   qkv          T   [num_tokens, stride]: per token, [num_q_heads, head_dim] queries, then
//                    [num_kv_heads, head_dim] keys, then as many values; queries rewritten
//   key_cache    C   [num_blocks, block_size, num_kv_heads, head_dim]   written at the slots
//   value_cache  C   [num_blocks, block_size, num_kv_heads, head_dim]   written at the slots
//                    (C: T, or E4M3 bytes for the `_fp8kv` entry points)
//   slot_mapping i64 [num_tokens]   < num_blocks * block_size, or negative to skip
//   positions    i32 [num_tokens]   < the tables' rows
//   cos_table    f32 [max_pos, head_dim / 2]
//   sin_table    f32 [max_pos, head_dim / 2]
//   num_q_heads, num_kv_heads, head_dim (even), stride: i32
//   k_scale, v_scale f32  the cache's scales (an FP8 cache's; 1 for a cache in T)
// Launch: grid (num_tokens, Y, 1); block (B, 1, 1): the Y blocks of a token stride together
// over its (num_q_heads + num_kv_heads) * half rotation pairs and num_kv_heads * head_dim values.
template <typename T, typename C>
__device__ void rope_kv_write_impl(T* __restrict__ qkv, C* __restrict__ key_cache,
                                   C* __restrict__ value_cache,
                                   const long long* __restrict__ slot_mapping,
                                   const int* __restrict__ positions,
                                   const float* __restrict__ cos_table,
                                   const float* __restrict__ sin_table, int num_q_heads,
                                   int num_kv_heads, int head_dim, int stride, float k_scale,
                                   float v_scale) {
    using Kv = tpserve::KvCache<T, C>;
    tpserve::wait_for_inputs();
    const long long token = blockIdx.x;
    const int half = head_dim / 2;
    const long long pos = positions[token];
    const long long slot = slot_mapping[token];
    const float* cos_row = cos_table + pos * half;
    const float* sin_row = sin_table + pos * half;
    T* row = qkv + token * stride;
    const int q_pairs = num_q_heads * half;
    const int pairs = (num_q_heads + num_kv_heads) * half;
    const int kv_elems = num_kv_heads * head_dim;
    const int items = slot >= 0 ? pairs + kv_elems : q_pairs;
    const long long at = slot >= 0 ? slot * kv_elems : 0;  // not written when negative
    C* key_dst = key_cache + at;
    C* value_dst = value_cache + at;
    const T* values = row + (num_q_heads + num_kv_heads) * head_dim;
    for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < items; p += blockDim.x * gridDim.y) {
        if (p >= pairs) {
            const int e = p - pairs;
            Kv::store1(value_dst + e, values[e], v_scale);
            continue;
        }
        const int head = p / half;  // over queries then keys
        const int i = p - head * half;
        const T* h = row + head * head_dim;
        const float x1 = tpserve::to_float(h[i]);
        const float x2 = tpserve::to_float(h[i + half]);
        const float c = cos_row[i];
        const float s = sin_row[i];
        const T r1 = tpserve::from_float<T>(x1 * c - x2 * s);
        const T r2 = tpserve::from_float<T>(x2 * c + x1 * s);
        if (p < q_pairs) {
            T* hq = row + head * head_dim;
            hq[i] = r1;
            hq[i + half] = r2;
        } else {
            C* hk = key_dst + (head - num_q_heads) * head_dim;
            Kv::store1(hk + i, r1, k_scale);
            Kv::store1(hk + i + half, r2, k_scale);
        }
    }
}

#define TPSERVE_ROPE_KV_WRITE_ENTRY(SUFFIX, T, KV, C)                                          \
    extern "C" __global__ void rope_kv_write##KV##_##SUFFIX(                                   \
        T* __restrict__ qkv, C* __restrict__ key_cache, C* __restrict__ value_cache,           \
        const long long* __restrict__ slot_mapping, const int* __restrict__ positions,         \
        const float* __restrict__ cos_table, const float* __restrict__ sin_table,              \
        int num_q_heads, int num_kv_heads, int head_dim, int stride, float k_scale,            \
        float v_scale) {                                                                       \
        rope_kv_write_impl<T, C>(qkv, key_cache, value_cache, slot_mapping, positions,         \
                                 cos_table, sin_table, num_q_heads, num_kv_heads, head_dim,    \
                                 stride, k_scale, v_scale);                                    \
    }
#define TPSERVE_ROPE_KV_WRITE(SUFFIX, T) \
    TPSERVE_FOR_EACH_KV_CACHE(TPSERVE_ROPE_KV_WRITE_ENTRY, SUFFIX, T)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_ROPE_KV_WRITE)
