// Writes the keys and values of this step's tokens into the paged KV cache.
#include "common.cuh"

// kv_cache_write_{bf16,f16}: for each token t with slot = slot_mapping[t] >= 0,
//   key_cache[slot / block_size, slot % block_size, :, :]   = key[t]
//   value_cache[slot / block_size, slot % block_size, :, :] = value[t]
// Tokens with a negative slot (padding, or tokens whose KV is not kept) are skipped.
//
// slot = block_id * block_size + offset, as the scheduler's block tables give it. Because a
// block's slots are contiguous in this layout, slot * kv_heads * head_dim is the element offset
// of the slot in the cache, so block_size is not an argument.
//
// Arguments:
//   key           T   [num_tokens, key_stride], token t's keys at key + t * key_stride:
//                     [kv_heads, head_dim]
//   value         T   [num_tokens, value_stride], likewise: [kv_heads, head_dim]
//                     (the strides let key and value be views into a fused qkv output)
//   key_cache     T   [num_blocks, block_size, kv_heads, head_dim]   written at the slots
//   value_cache   T   [num_blocks, block_size, kv_heads, head_dim]   written at the slots
//   slot_mapping  i64 [num_tokens]   < num_blocks * block_size, or negative to skip
//   kv_heads      i32                this rank's KV heads
//   head_dim      i32
//   key_stride    i32                elements between consecutive tokens of key
//   value_stride  i32                elements between consecutive tokens of value
// Launch: grid (num_tokens, 1, 1); block (any, 1, 1), e.g. 128; threads stride over the
// kv_heads * head_dim elements of the token.
template <typename T>
__device__ void kv_cache_write_impl(const T* __restrict__ key, const T* __restrict__ value,
                                    T* __restrict__ key_cache, T* __restrict__ value_cache,
                                    const long long* __restrict__ slot_mapping, int kv_heads,
                                    int head_dim, int key_stride, int value_stride) {
    const long long token = blockIdx.x;
    const long long slot = slot_mapping[token];
    if (slot < 0) {
        return;
    }
    const int n = kv_heads * head_dim;
    const T* k = key + token * key_stride;
    const T* v = value + token * value_stride;
    T* kc = key_cache + slot * n;
    T* vc = value_cache + slot * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        kc[i] = k[i];
        vc[i] = v[i];
    }
}

#define TPSERVE_KV_CACHE_WRITE(SUFFIX, T)                                                     \
    extern "C" __global__ void kv_cache_write_##SUFFIX(                                       \
        const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ key_cache,    \
        T* __restrict__ value_cache, const long long* __restrict__ slot_mapping,              \
        int kv_heads, int head_dim, int key_stride, int value_stride) {                       \
        kv_cache_write_impl<T>(key, value, key_cache, value_cache, slot_mapping, kv_heads,    \
                               head_dim, key_stride, value_stride);                           \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_KV_CACHE_WRITE)
