// Paged attention for prefill on tensor cores: the same computation and arguments as
// paged_attention (attention.cu), with Q K^T and P V done by warp-level mma.sync (m16n8k16,
// bf16/f16 inputs, f32 accumulation) instead of CUDA-core dot products. FlashAttention-2 style:
// keys and values stream through shared memory in tiles of 64, the softmax is online, and the
// probabilities P go from the S accumulators straight into the A operand of the P V product
// without a trip through shared memory. As in FlashAttention-2, V of a tile loads while Q K^T
// runs and K of the next tile while P V runs.
#include "common.cuh"

namespace {

constexpr int kMmaKeys = 64;      // keys per shared-memory tile
constexpr int kMmaSTiles = kMmaKeys / 8;  // n-tiles of 8 keys in one row of S

// log2(e): the softmax runs in base 2 (exp2f), with scale * log2(e) applied to S in f32.
constexpr float kLog2e = 1.4426950408889634f;

using tpserve::cp_async_16;
using tpserve::cp_async_commit;
using tpserve::cp_async_wait;
using tpserve::ldmatrix_x4;
using tpserve::ldmatrix_x4_trans;
using tpserve::Mma;

}  // namespace

// paged_attention_mma_hd{64,128}_{bf16,f16}: for each query row r of a tile and each query
// head h of KV head g (h in [g * group, (g + 1) * group), group = num_q_heads / num_kv_heads),
//   out[r, h] = softmax_j(scale * q[r, h] . K[j, g]) V[j, g]  over keys j <= position(r)
// where K[j] and V[j] live at slot block_tables[seq, j / block_size] * block_size +
// j % block_size of the caches: paged_attention's computation and argument list, on tensor
// cores, for prefill.
//
// A block computes one tile (consecutive query rows of ONE sequence, with consecutive
// positions) for one KV head: its M dimension is the tile's rows * group (row, head) "items",
// item i = (row row0 + i / group, head kv_head * group + i % group), warp w of the block's WARPS
// owning items [16 w, 16 w + 16): ITEMS = 16 * WARPS items (4 warps: 64). The host cuts prefill chunks into tiles of at most ITEMS / group rows, so
// REQUIRES rows * group <= ITEMS (and group <= ITEMS). Keys stream through shared memory 64 at a time
// from key 0 to the tile's last position; S = Q K^T and O += P V are m16n8k16 mma.sync with f32
// accumulators; Q stays in registers as mma A fragments for the whole kernel; P is rounded to T
// for the P V product (as FlashAttention does); O is divided by the softmax sum and rounded to
// T once. Q is used unscaled (exact T); scale is applied to S in f32.
//
// Only num_splits == 1 is supported (prefill never splits): the block owns all keys of its
// tile and writes `out`; partial_out, partial_ml and split_len are ignored (accepted only so
// the argument list matches paged_attention's) and num_splits must be 1.
//
// Arguments:
//   out           T   [num_tokens, num_q_heads * HD]    written (4-byte aligned)
//   partial_out   f32 ignored
//   partial_ml    f32 ignored
//   q             T   [num_tokens, q_stride]: token t's heads at q + t * q_stride, [num_q_heads, HD]
//   key_cache     T   [num_blocks, block_size, num_kv_heads, HD]   (this layer, 16-byte aligned)
//   value_cache   T   [num_blocks, block_size, num_kv_heads, HD]   (16-byte aligned)
//   block_tables  i32 [table_rows, max_blocks_per_seq]: one row per request
//   tiles         i32 [num_tiles, 4]: the sequence's row of block_tables, first row (token
//                     index), number of rows, position of the first row; rows * group <= ITEMS
//   num_q_heads, num_kv_heads, block_size, max_blocks_per_seq, q_stride: i32
//   num_splits    i32  must be 1
//   split_len     i32  ignored
//   scale         f32  usually 1 / sqrt(HD)
// Launch: grid (num_tiles, num_kv_heads, 1); block (32 * WARPS, 1, 1) = (128, 1, 1); no dynamic
// shared memory (0 bytes). Static shared memory: 2 * 64 * (HD + 8) * sizeof(T) + 2 * 64 * 8 bytes = 19456 bytes
// for HD 64, 35840 for HD 128 (K and V tiles with rows padded by 8 elements so that ldmatrix is
// free of bank conflicts, plus the slot indices of this tile's and the next tile's 64 keys; Q is
// staged through the K and V tiles' space before the key loop). Needs sm_80 or newer (mma bf16,
// ldmatrix, cp.async).
template <typename T, int HD, int WARPS>
__device__ __forceinline__ void paged_attention_mma_impl(
    T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ key_cache,
    const T* __restrict__ value_cache, const int* __restrict__ block_tables,
    const int* __restrict__ tiles, int num_q_heads, int num_kv_heads, int block_size,
    int max_blocks_per_seq, int q_stride, float scale) {
    tpserve::wait_for_inputs();
    static_assert(HD % 16 == 0, "HD must be a multiple of 16");
    constexpr int kMmaThreads = 32 * WARPS;
    constexpr int kMmaItems = 16 * WARPS;  // (query row, head) items per block: 16 per warp
    // Q is staged through the K and V tiles' space.
    static_assert(kMmaItems <= 2 * kMmaKeys, "at most 8 warps");
    constexpr int kStride = HD + 8;                   // elements per shared-memory row
    constexpr int kTileElems = kMmaKeys * kStride;    // one K (or V, or Q) tile
    constexpr int kVecs = HD / 8;                     // 16-byte vectors per key row
    constexpr int kKSteps = HD / 16;                  // mma k-steps over the head dimension
    constexpr int kOTiles = HD / 8;                   // mma n-tiles of O

    // K tile then V tile, [key][kStride] each; uint4 for 16-byte alignment.
    __shared__ uint4 kv_s4[2 * kTileElems * sizeof(T) / sizeof(uint4)];
    __shared__ long long slot_s[2][kMmaKeys];  // cache slot of each key of a tile, or -1
    T* const k_s = reinterpret_cast<T*>(kv_s4);
    T* const v_s = k_s + kTileElems;

    const int* tile = tiles + blockIdx.x * 4;
    const int seq = tile[0];
    const int row0 = tile[1];
    const int rows = tile[2];
    const int pos0 = tile[3];
    const int kv_head = blockIdx.y;
    const int group = num_q_heads / num_kv_heads;
    const int items = rows * group;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int gid = lane >> 2;  // mma groupID: fragment rows gid and gid + 8
    const int tig = lane & 3;   // mma threadID_in_group: fragment columns 2 tig, 2 tig + 1

    // Q of the block's 64 items (zero past `items`) into the K tile's space, [item][kStride].
#pragma unroll 8
    for (int it = 0; it < kMmaItems * HD / kMmaThreads; ++it) {
        const int idx = tid + it * kMmaThreads;
        const int item = idx / HD;
        const int d = idx - item * HD;
        T v = tpserve::from_float<T>(0.0f);
        if (item < items) {
            const long long row = row0 + item / group;
            const int head = kv_head * group + item % group;
            v = q[row * q_stride + head * HD + d];
        }
        k_s[item * kStride + d] = v;
    }
    __syncthreads();

    // A fragments of the warp's 16 x HD slice of Q, one per k-step of 16 dims:
    // a0 (row gid, dims 2 tig +{0,1}), a1 (row gid + 8, same dims), a2 / a3 the same 8 dims on.
    unsigned qf[kKSteps][4];
    {
        const T* qa = k_s + (warp * 16 + gid) * kStride + 2 * tig;
        const T* qb = qa + 8 * kStride;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
            qf[kk][0] = *reinterpret_cast<const unsigned*>(qa + kk * 16);
            qf[kk][1] = *reinterpret_cast<const unsigned*>(qb + kk * 16);
            qf[kk][2] = *reinterpret_cast<const unsigned*>(qa + kk * 16 + 8);
            qf[kk][3] = *reinterpret_cast<const unsigned*>(qb + kk * 16 + 8);
        }
    }

    // This thread's two items (fragment rows gid and gid + 8 of the warp); an item past `items`
    // gets position -1, so every key is masked for it and it is never stored.
    const int item_a = warp * 16 + gid;
    const int item_b = item_a + 8;
    const int pos_a = item_a < items ? pos0 + item_a / group : -1;
    const int pos_b = item_b < items ? pos0 + item_b / group : -1;
    // The warp's last position (-1 if it has no item): key tiles past it are skipped.
    const int warp_items = min(items - warp * 16, 16);
    const int warp_last_pos = warp_items > 0 ? pos0 + (warp * 16 + warp_items - 1) / group : -1;

    const float scale_log2 = scale * kLog2e;
    float m_a = tpserve::neg_inf();  // running max of scale_log2 * S, rows a and b
    float m_b = tpserve::neg_inf();
    float l_a = 0.0f;  // this thread's share of the running sum (reduced over 4 lanes at the end)
    float l_b = 0.0f;
    float o[kOTiles][4];  // O accumulator: C fragments, n-tile n = dims [8 n, 8 n + 8)
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            o[n][c] = 0.0f;
        }
    }

    const int* table = block_tables + (long long)seq * max_blocks_per_seq;
    const int ctx_end = pos0 + rows;  // keys the last row sees
    // Cache slots of the 64 keys from `first` into slot_s[buf] (-1 past the context).
    auto find_slots = [&](int first, int buf) {
        if (tid < kMmaKeys) {
            const int key = first + tid;
            slot_s[buf][tid] =
                key < ctx_end ? (long long)table[key / block_size] * block_size + key % block_size
                              : -1;
        }
    };
    // 16-byte copies of one K or V tile (keys of slot_s[buf]) into `dst`, as one cp.async group.
    auto load_tile = [&](T* dst, const T* cache, int buf) {
#pragma unroll
        for (int it = 0; it < kMmaKeys * kVecs / kMmaThreads; ++it) {
            const int idx = tid + it * kMmaThreads;
            const int j = idx / kVecs;
            const int c = idx - j * kVecs;
            const long long slot = slot_s[buf][j];
            const long long at = slot >= 0 ? (slot * num_kv_heads + kv_head) * HD + c * 8 : 0;
            cp_async_16(dst + j * kStride + c * 8, cache + at, slot >= 0);
        }
        cp_async_commit();
    };
    // FlashAttention-2's pipeline with one K and one V buffer: V of a tile loads while S = Q K^T
    // and the softmax run, and K of the next tile loads while O += P V runs, so each load
    // overlaps compute and a tile costs two barriers.
    find_slots(0, 0);
    __syncthreads();  // every warp has its Q fragments (k_s is free) and slot_s[0] is written
    load_tile(k_s, key_cache, 0);
    int buf = 0;
    for (int chunk = 0; chunk < ctx_end; chunk += kMmaKeys, buf ^= 1) {
        cp_async_wait<0>();  // this thread's K copies of this tile have landed
        __syncthreads();     // everyone's, and the previous tile's P V is done (v_s is free)
        load_tile(v_s, value_cache, buf);
        const int next = chunk + kMmaKeys;
        if (next < ctx_end) {
            find_slots(next, buf ^ 1);
        }

        const bool active = chunk <= warp_last_pos;  // warp-uniform
        // S (16 x 64 per warp) as 8 C fragments, n-tile j = keys chunk + [8 j, 8 j + 8);
        // after the softmax, P in the same registers.
        float s[kMmaSTiles][4];
        if (active) {
#pragma unroll
            for (int j = 0; j < kMmaSTiles; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    s[j][c] = 0.0f;
                }
            }
            // B = K^T (k = dim, n = key), from K stored [key][dim]: an 8x8 block of K read
            // non-transposed gives lane (gid, tig) K[key gid][dims 2 tig, +1] = B's fragment.
            // Matrices: 0 keys +0 dims +0 (b0 of n-tile 2 jj), 1 keys +0 dims +8 (b1),
            // 2 keys +8 dims +0 (b0 of n-tile 2 jj + 1), 3 keys +8 dims +8 (b1).
            const T* kb = k_s + (((lane >> 4) << 3) + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;
#pragma unroll
            for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
                for (int jj = 0; jj < kMmaSTiles / 2; ++jj) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4(b0, b1, b2, b3, kb + jj * 16 * kStride + kk * 16);
                    Mma<T>::run(s[2 * jj], qf[kk], b0, b1);
                    Mma<T>::run(s[2 * jj + 1], qf[kk], b2, b3);
                }
            }
            // Scale into base 2 and mask: C element c of n-tile j is row (c < 2 ? a : b),
            // key chunk + 8 j + 2 tig + (c & 1).
            float max_a = tpserve::neg_inf();
            float max_b = tpserve::neg_inf();
#pragma unroll
            for (int j = 0; j < kMmaSTiles; ++j) {
                const int key = chunk + 8 * j + 2 * tig;
                s[j][0] = key <= pos_a ? s[j][0] * scale_log2 : tpserve::neg_inf();
                s[j][1] = key + 1 <= pos_a ? s[j][1] * scale_log2 : tpserve::neg_inf();
                s[j][2] = key <= pos_b ? s[j][2] * scale_log2 : tpserve::neg_inf();
                s[j][3] = key + 1 <= pos_b ? s[j][3] * scale_log2 : tpserve::neg_inf();
                max_a = fmaxf(max_a, fmaxf(s[j][0], s[j][1]));
                max_b = fmaxf(max_b, fmaxf(s[j][2], s[j][3]));
            }
            // A row's 64 keys are spread over the 4 lanes of its group (same gid).
            max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 1));
            max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 2));
            max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 1));
            max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 2));
            const float new_a = fmaxf(m_a, max_a);
            const float new_b = fmaxf(m_b, max_b);
            // A row that has seen no key yet keeps max -inf: subtract 0 instead, so that its
            // masked entries give exp2(-inf) = 0 rather than NaN.
            const float use_a = new_a == tpserve::neg_inf() ? 0.0f : new_a;
            const float use_b = new_b == tpserve::neg_inf() ? 0.0f : new_b;
            const float corr_a = exp2f(m_a - use_a);  // 0 while m_a is -inf
            const float corr_b = exp2f(m_b - use_b);
            m_a = new_a;
            m_b = new_b;
            float sum_a = 0.0f;
            float sum_b = 0.0f;
#pragma unroll
            for (int j = 0; j < kMmaSTiles; ++j) {
                s[j][0] = exp2f(s[j][0] - use_a);
                s[j][1] = exp2f(s[j][1] - use_a);
                s[j][2] = exp2f(s[j][2] - use_b);
                s[j][3] = exp2f(s[j][3] - use_b);
                sum_a += s[j][0] + s[j][1];
                sum_b += s[j][2] + s[j][3];
            }
            l_a = l_a * corr_a + sum_a;
            l_b = l_b * corr_b + sum_b;
#pragma unroll
            for (int n = 0; n < kOTiles; ++n) {
                o[n][0] *= corr_a;
                o[n][1] *= corr_a;
                o[n][2] *= corr_b;
                o[n][3] *= corr_b;
            }
        }
        cp_async_wait<0>();  // this thread's V copies have landed
        __syncthreads();     // everyone's; S is done (k_s is free); slot_s[buf ^ 1] is written
        if (next < ctx_end) {
            load_tile(k_s, key_cache, buf ^ 1);
        }
        if (active) {
            // P (16 x 64) as A fragments of 4 k-steps of 16 keys: the C fragments of S n-tiles
            // 2 kk and 2 kk + 1 are exactly the A fragment of k-step kk (a0 = row a keys
            // 2 tig +{0,1} = C0,C1 of n-tile 2 kk; a1 = row b = C2,C3; a2, a3 the same of n-tile
            // 2 kk + 1, keys +8).
            // B = V (k = key, n = dim), from V stored [key][dim]: an 8x8 block of V read
            // transposed gives lane (gid, tig) V[keys 2 tig, +1][dim gid] = B's fragment.
            // Matrices: 0 keys +0 dims +0 (b0 of n-tile 2 nn), 1 keys +8 dims +0 (b1),
            // 2 keys +0 dims +8 (b0 of n-tile 2 nn + 1), 3 keys +8 dims +8 (b1).
            const T* vb = v_s + ((((lane >> 3) & 1) << 3) + (lane & 7)) * kStride + (lane >> 4) * 8;
#pragma unroll
            for (int kk = 0; kk < kMmaKeys / 16; ++kk) {
                unsigned pa[4];
                pa[0] = Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]);
                pa[1] = Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]);
                pa[2] = Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
                pa[3] = Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
                for (int nn = 0; nn < kOTiles / 2; ++nn) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4_trans(b0, b1, b2, b3, vb + kk * 16 * kStride + nn * 16);
                    Mma<T>::run(o[2 * nn], pa, b0, b1);
                    Mma<T>::run(o[2 * nn + 1], pa, b2, b3);
                }
            }
        }
    }

    // Each lane summed only its own columns: total over the row's 4 lanes.
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    // C element c of O n-tile n: row (c < 2 ? a : b), dim 8 n + 2 tig + (c & 1).
    if (item_a < items) {
        const float inv = l_a > 0.0f ? 1.0f / l_a : 0.0f;
        const long long row = row0 + item_a / group;
        const int head = kv_head * group + item_a % group;
        T* dst = out + (row * num_q_heads + head) * HD + 2 * tig;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
            *reinterpret_cast<unsigned*>(dst + 8 * n) = Mma<T>::pack(o[n][0] * inv, o[n][1] * inv);
        }
    }
    if (item_b < items) {
        const float inv = l_b > 0.0f ? 1.0f / l_b : 0.0f;
        const long long row = row0 + item_b / group;
        const int head = kv_head * group + item_b % group;
        T* dst = out + (row * num_q_heads + head) * HD + 2 * tig;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
            *reinterpret_cast<unsigned*>(dst + 8 * n) = Mma<T>::pack(o[n][2] * inv, o[n][3] * inv);
        }
    }
}

#define TPSERVE_PAGED_ATTENTION_MMA(SUFFIX, T)                                                \
    extern "C" __global__ void paged_attention_mma_hd64_##SUFFIX(                            \
        T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_ml,  \
        const T* __restrict__ q, const T* __restrict__ key_cache,                              \
        const T* __restrict__ value_cache, const int* __restrict__ block_tables,               \
        const int* __restrict__ tiles, int num_q_heads, int num_kv_heads, int block_size,      \
        int max_blocks_per_seq, int q_stride, int num_splits, int split_len, float scale) {    \
        (void)partial_out;                                                                    \
        (void)partial_ml;                                                                     \
        (void)num_splits;                                                                     \
        (void)split_len;                                                                      \
        paged_attention_mma_impl<T, 64, 4>(out, q, key_cache, value_cache, block_tables, tiles,  \
                                        num_q_heads, num_kv_heads, block_size,                \
                                        max_blocks_per_seq, q_stride, scale);                 \
    }                                                                                         \
    extern "C" __global__ void paged_attention_mma_hd128_##SUFFIX(                           \
        T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_ml,  \
        const T* __restrict__ q, const T* __restrict__ key_cache,                              \
        const T* __restrict__ value_cache, const int* __restrict__ block_tables,               \
        const int* __restrict__ tiles, int num_q_heads, int num_kv_heads, int block_size,      \
        int max_blocks_per_seq, int q_stride, int num_splits, int split_len, float scale) {    \
        (void)partial_out;                                                                    \
        (void)partial_ml;                                                                     \
        (void)num_splits;                                                                     \
        (void)split_len;                                                                      \
        paged_attention_mma_impl<T, 128, 4>(out, q, key_cache, value_cache, block_tables, tiles, \
                                         num_q_heads, num_kv_heads, block_size,               \
                                         max_blocks_per_seq, q_stride, scale);                \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_PAGED_ATTENTION_MMA)
