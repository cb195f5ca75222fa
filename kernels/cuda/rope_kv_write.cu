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
// over its work items. With head_dim a multiple of 16 (every head size the attention kernels
// take) an item is 8 rotation pairs of a head (two 16-byte loads of T, 8 cos and 8 sin) or 8
// values, (num_q_heads + num_kv_heads) * head_dim / 16 + num_kv_heads * head_dim / 8 items; else
// one pair or one value, (num_q_heads + num_kv_heads) * half + num_kv_heads * head_dim items.
// Both compute every element with the same f32 expressions, so their outputs are the same bits
// (one pair a thread read at 0.37 of the copy rate in an 8B prompt step: 2-byte loads;
// docs/PERFORMANCE.md, run 14).
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
    const int kv_elems = num_kv_heads * head_dim;
    const long long at = slot >= 0 ? slot * kv_elems : 0;  // not written when negative
    C* key_dst = key_cache + at;
    C* value_dst = value_cache + at;
    const T* values = row + (num_q_heads + num_kv_heads) * head_dim;
    const int first = blockIdx.y * blockDim.x + threadIdx.x;
    const int step = blockDim.x * gridDim.y;
    if (head_dim % 16 == 0) {
        // Items of 8: pairs i .. i + 7 of a head (i a multiple of 8), or values e .. e + 7.
        const int vecs_per_head = half / 8;
        const int q_vecs = num_q_heads * vecs_per_head;
        const int vecs = (num_q_heads + num_kv_heads) * vecs_per_head;
        const int items = slot >= 0 ? vecs + kv_elems / 8 : q_vecs;
        for (int p = first; p < items; p += step) {
            if (p >= vecs) {
                const int e = (p - vecs) * 8;
                Kv::store(value_dst + e,
                          Kv::from_act(*reinterpret_cast<const uint4*>(values + e), v_scale));
                continue;
            }
            const int head = p / vecs_per_head;  // over queries then keys
            const int i = (p - head * vecs_per_head) * 8;
            const T* h = row + head * head_dim;
            const uint4 lo = *reinterpret_cast<const uint4*>(h + i);
            const uint4 hi = *reinterpret_cast<const uint4*>(h + i + half);
            const float4 c0 = *reinterpret_cast<const float4*>(cos_row + i);
            const float4 c1 = *reinterpret_cast<const float4*>(cos_row + i + 4);
            const float4 s0 = *reinterpret_cast<const float4*>(sin_row + i);
            const float4 s1 = *reinterpret_cast<const float4*>(sin_row + i + 4);
            const float c[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
            const float s[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
            const T* x1 = reinterpret_cast<const T*>(&lo);
            const T* x2 = reinterpret_cast<const T*>(&hi);
            uint4 r1v, r2v;
            T* r1 = reinterpret_cast<T*>(&r1v);
            T* r2 = reinterpret_cast<T*>(&r2v);
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float a = tpserve::to_float(x1[j]);
                const float b = tpserve::to_float(x2[j]);
                r1[j] = tpserve::from_float<T>(a * c[j] - b * s[j]);
                r2[j] = tpserve::from_float<T>(b * c[j] + a * s[j]);
            }
            if (p < q_vecs) {
                T* hq = row + head * head_dim;
                *reinterpret_cast<uint4*>(hq + i) = r1v;
                *reinterpret_cast<uint4*>(hq + i + half) = r2v;
            } else {
                C* hk = key_dst + (head - num_q_heads) * head_dim;
                Kv::store(hk + i, Kv::from_act(r1v, k_scale));
                Kv::store(hk + i + half, Kv::from_act(r2v, k_scale));
            }
        }
        return;
    }
    const int q_pairs = num_q_heads * half;
    const int pairs = (num_q_heads + num_kv_heads) * half;
    const int items = slot >= 0 ? pairs + kv_elems : q_pairs;
    for (int p = first; p < items; p += step) {
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
