// Paged attention for prefill on tensor cores: the same computation and arguments as
// paged_attention (attention.cu), with Q K^T and P V done by warp-level mma.sync (m16n8k16,
// bf16/f16 inputs, f32 accumulation) instead of CUDA-core dot products. FlashAttention-2 style:
// keys and values stream through shared memory in tiles of KEYS, the softmax is online, and the
// probabilities P go from the S accumulators straight into the A operand of the P V product
// without a trip through shared memory. As in FlashAttention-2, V of a tile loads while Q K^T
// runs and K of the next tile while P V runs, and each warp owns MT m-tiles of 16 (row, head)
// items, so that every K or V fragment read from shared memory feeds MT products and each key
// tile fetched from L2 serves 16 * MT * WARPS items.
#include "common.cuh"

namespace {

// log2(e): the softmax runs in base 2 (tpserve::fast_exp2), with scale * log2(e) applied to S in
// f32.
constexpr float kLog2e = 1.4426950408889634f;

using tpserve::cp_async_16;
using tpserve::cp_async_commit;
using tpserve::cp_async_wait;
using tpserve::ldmatrix_x4;
using tpserve::ldmatrix_x4_trans;
using tpserve::Mma;

}  // namespace

// Dynamic shared memory of one block: Q of its items, one K and one V tile (rows padded by 8
// elements so that ldmatrix is free of bank conflicts), and the cache slots of two key tiles.
template <typename T, int HD, int WARPS, int MT, int KEYS>
__host__ __device__ constexpr int paged_attention_mma_smem_bytes() {
    return (16 * MT * WARPS + 2 * KEYS) * (HD + 8) * (int)sizeof(T) + 2 * KEYS * 8;
}

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
// owning items [16 MT w, 16 MT (w + 1)) as MT m-tiles of 16: ITEMS = 16 * MT * WARPS items
// (4 warps of 2 m-tiles: 128). The host cuts prefill chunks into tiles of at most ITEMS / group
// rows, so REQUIRES rows * group <= ITEMS (and group <= ITEMS). Keys stream through shared
// memory KEYS at a time from key 0 to the tile's last position; S = Q K^T and O += P V are
// m16n8k16 mma.sync with f32 accumulators; Q is read from shared memory by ldmatrix for each
// product; P is rounded to T for the P V product (as FlashAttention does); O is divided by the
// softmax sum and rounded to T once. Q is used unscaled (exact T); scale is applied to S in f32,
// fused with the max subtraction (exp2(S * scale log2(e) - max * scale log2(e))). Only key
// tiles that reach past a warp's first position are masked.
//
// An FP8 cache (the `_fp8kv` entry points, common.cuh's KvCache) cannot be copied by cp.async:
// each thread loads its share of a K or V tile into registers where cp.async would start the
// copy, and converts it to T into shared memory where the copy would be waited for, so the
// loads still overlap the products before that point. The key scale is folded into `scale`,
// the value scale into the final division by the softmax sum.
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
//                     (16-byte aligned, q_stride a multiple of 8)
//   key_cache     C   [num_blocks, block_size, num_kv_heads, HD]   (this layer, 16-byte aligned;
//   value_cache   C   [num_blocks, block_size, num_kv_heads, HD]    C: T, or E4M3 bytes)
//   block_tables  i32 [table_rows, max_blocks_per_seq]: one row per request
//   tiles         i32 [num_tiles, 4]: the sequence's row of block_tables, first row (token
//                     index), number of rows, position of the first row; rows * group <= ITEMS
//   num_q_heads, num_kv_heads, block_size, max_blocks_per_seq, q_stride: i32
//   num_splits    i32  must be 1
//   split_len     i32  ignored
//   scale         f32  usually 1 / sqrt(HD)
//   k_scale, v_scale  f32  the cache's scales (1 for a cache in T)
// Launch: grid (num_kv_heads, num_tiles, 1), so that blocks start in the tiles' order (the host
// puts the tiles with the most keys first, and the grid's tail is short tiles); block
// (32 * WARPS, 1, 1); dynamic shared memory paged_attention_mma_smem_bytes<T, HD, WARPS, MT,
// KEYS>() (the entry points below: 37,888, 70,656 and 105,472 bytes; above 48 KiB the host
// raises the kernel's dynamic shared memory limit).
// Needs sm_80 or newer (mma bf16, ldmatrix, cp.async).
template <typename T, typename C, int HD, int WARPS, int MT, int KEYS>
__device__ __forceinline__ void paged_attention_mma_impl(
    T* __restrict__ out, const T* __restrict__ q, const C* __restrict__ key_cache,
    const C* __restrict__ value_cache, const int* __restrict__ block_tables,
    const int* __restrict__ tiles, int num_q_heads, int num_kv_heads, int block_size,
    int max_blocks_per_seq, int q_stride, float scale, float k_scale, float v_scale) {
    using Kv = tpserve::KvCache<T, C>;
    tpserve::wait_for_inputs();
    scale *= k_scale;  // scores of the cache's K / k_scale
    static_assert(HD % 16 == 0, "HD must be a multiple of 16");
    static_assert(KEYS % 16 == 0, "KEYS must be a multiple of 16");
    constexpr int kThreads = 32 * WARPS;
    constexpr int kWarpItems = 16 * MT;
    constexpr int kItems = kWarpItems * WARPS;  // (query row, head) items per block
    constexpr int kStride = HD + 8;             // elements per shared-memory row
    constexpr int kVecs = HD / 8;               // 16-byte vectors per row
    constexpr int kKSteps = HD / 16;            // mma k-steps over the head dimension
    constexpr int kOTiles = HD / 8;             // mma n-tiles of O
    constexpr int kSTiles = KEYS / 8;           // mma n-tiles of one row of S
    static_assert(KEYS * kVecs % kThreads == 0, "a key tile is whole 16-byte copies per thread");
    static_assert(KEYS <= kThreads, "one thread per key finds the slots");

    // Q [kItems][kStride], then the K and V tiles [KEYS][kStride] each, then the slots.
    extern __shared__ uint4 mma_smem[];
    T* const q_s = reinterpret_cast<T*>(mma_smem);
    T* const k_s = q_s + kItems * kStride;
    T* const v_s = k_s + KEYS * kStride;
    long long(*slot_s)[KEYS] = reinterpret_cast<long long(*)[KEYS]>(v_s + KEYS * kStride);

    const int* tile = tiles + blockIdx.y * 4;
    const int seq = tile[0];
    const int row0 = tile[1];
    const int rows = tile[2];
    const int pos0 = tile[3];
    const int kv_head = blockIdx.x;
    const int group = num_q_heads / num_kv_heads;
    const int items = rows * group;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int tig = lane & 3;  // mma threadID_in_group: fragment columns 2 tig, 2 tig + 1

    // Q of the block's items (zero past `items`), 16 bytes at a time, as one cp.async group.
    for (int idx = tid; idx < kItems * kVecs; idx += kThreads) {
        const int item = idx / kVecs;
        const int c = idx - item * kVecs;
        const bool valid = item < items;
        const long long row = row0 + (valid ? item / group : 0);
        const int head = kv_head * group + (valid ? item % group : 0);
        cp_async_16(q_s + item * kStride + c * 8, q + row * q_stride + head * HD + c * 8, valid);
    }
    cp_async_commit();

    // This thread's items: fragment rows gid and gid + 8 of each of its warp's m-tiles. An item
    // past `items` gets position -1 (never stored; its Q is zero, so its scores are finite).
    const int warp_item0 = warp * kWarpItems;
    int pos_a[MT], pos_b[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const int item_a = warp_item0 + mt * 16 + (lane >> 2);
        const int item_b = item_a + 8;
        pos_a[mt] = item_a < items ? pos0 + item_a / group : -1;
        pos_b[mt] = item_b < items ? pos0 + item_b / group : -1;
    }
    // The warp's first and last positions (its items' positions rise): key tiles past the last
    // are skipped, and tiles wholly at or before the first need no mask.
    const int warp_items = min(items - warp_item0, kWarpItems);
    const int warp_last_pos = warp_items > 0 ? pos0 + (warp_item0 + warp_items - 1) / group : -1;
    const int warp_first_pos = pos0 + warp_item0 / group;

    const float scale_log2 = scale * kLog2e;
    float m_a[MT], m_b[MT];  // running max of the raw scores S, rows a and b
    float l_a[MT], l_b[MT];  // this thread's share of the running sums (reduced at the end)
    float o[MT][kOTiles][4];  // O accumulators: C fragments, n-tile n = dims [8 n, 8 n + 8)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m_a[mt] = tpserve::neg_inf();
        m_b[mt] = tpserve::neg_inf();
        l_a[mt] = 0.0f;
        l_b[mt] = 0.0f;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                o[mt][n][c] = 0.0f;
            }
        }
    }

    const int* table = block_tables + (long long)seq * max_blocks_per_seq;
    const int ctx_end = pos0 + rows;  // keys the last row sees
    // Cache slots of the KEYS keys from `first` into slot_s[buf] (-1 past the context).
    auto find_slots = [&](int first, int buf) {
        if (tid < KEYS) {
            const int key = first + tid;
            slot_s[buf][tid] =
                key < ctx_end ? (long long)table[key / block_size] * block_size + key % block_size
                              : -1;
        }
    };
    // One K or V tile (keys of slot_s[buf]) into `dst`, 8 elements per copy: started here
    // (16-byte cp.async copies as one group; for an FP8 cache, loads into `staged`) and
    // finished by land_tile before the barrier that publishes the tile.
    constexpr int kPieces = KEYS * kVecs / kThreads;
    typename Kv::Raw staged[kPieces];
    auto load_tile = [&](T* dst, const C* cache, int buf) {
#pragma unroll
        for (int it = 0; it < kPieces; ++it) {
            const int idx = tid + it * kThreads;
            const int j = idx / kVecs;
            const int c = idx - j * kVecs;
            const long long slot = slot_s[buf][j];
            const long long at = slot >= 0 ? (slot * num_kv_heads + kv_head) * HD + c * 8 : 0;
            if constexpr (Kv::kAsyncCopy) {
                cp_async_16(dst + j * kStride + c * 8, cache + at, slot >= 0);
            } else {
                staged[it] = slot >= 0 ? Kv::load(cache + at) : Kv::zero();
            }
        }
        cp_async_commit();
    };
    // Waits for this thread's copies (Q's too, the first time), or converts its staged FP8
    // pieces into `dst`.
    auto land_tile = [&](T* dst) {
        cp_async_wait<0>();
        if constexpr (!Kv::kAsyncCopy) {
#pragma unroll
            for (int it = 0; it < kPieces; ++it) {
                const int idx = tid + it * kThreads;
                const int j = idx / kVecs;
                const int c = idx - j * kVecs;
                *reinterpret_cast<uint4*>(dst + j * kStride + c * 8) = Kv::to_act(staged[it]);
            }
        }
    };
    // ldmatrix row addresses. A = Q (16 items x 16 dims, row-major): matrices (items +0, dims
    // +0), (+8, +0), (+0, +8), (+8, +8) = a0..a3. B = K^T (k = dim, n = key) from K stored
    // [key][dim], read non-transposed: matrices (keys +0, dims +0) = b0 of n-tile 2 jj, (keys +0,
    // dims +8) = b1, (keys +8, dims +0) = b0 of n-tile 2 jj + 1, (keys +8, dims +8) = b1.
    // B = V (k = key, n = dim) from V stored [key][dim], read transposed: matrices (keys +0,
    // dims +0) = b0 of n-tile 2 nn, (keys +8, dims +0) = b1, (keys +0, dims +8) = b0 of n-tile
    // 2 nn + 1, (keys +8, dims +8) = b1.
    const T* const qa = q_s + (warp_item0 + (lane & 15)) * kStride + (lane >> 4) * 8;
    const T* const kb = k_s + (((lane >> 4) << 3) + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;
    const T* const vb = v_s + ((((lane >> 3) & 1) << 3) + (lane & 7)) * kStride + (lane >> 4) * 8;

    // FlashAttention-2's pipeline with one K and one V buffer: V of a tile loads while S = Q K^T
    // and the softmax run, and K of the next tile loads while O += P V runs, so each load
    // overlaps compute and a tile costs two barriers.
    find_slots(0, 0);
    __syncthreads();  // slot_s[0] is written
    load_tile(k_s, key_cache, 0);
    int buf = 0;
    for (int chunk = 0; chunk < ctx_end; chunk += KEYS, buf ^= 1) {
        land_tile(k_s);   // this thread's Q (first tile) and K copies have landed
        __syncthreads();  // everyone's, and the previous tile's P V is done (v_s is free)
        load_tile(v_s, value_cache, buf);
        const int next = chunk + KEYS;
        if (next < ctx_end) {
            find_slots(next, buf ^ 1);
        }

        const bool active = chunk <= warp_last_pos;  // warp-uniform
        // S (16 MT x KEYS per warp) as C fragments, n-tile j = keys chunk + [8 j, 8 j + 8);
        // after the softmax, P in the same registers.
        float s[MT][kSTiles][4];
        if (active) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        s[mt][j][c] = 0.0f;
                    }
                }
            }
#pragma unroll
            for (int kk = 0; kk < kKSteps; ++kk) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ldmatrix_x4(a[mt][0], a[mt][1], a[mt][2], a[mt][3],
                                qa + mt * 16 * kStride + kk * 16);
                }
#pragma unroll
                for (int jj = 0; jj < kSTiles / 2; ++jj) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4(b0, b1, b2, b3, kb + jj * 16 * kStride + kk * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        Mma<T>::run(s[mt][2 * jj], a[mt], b0, b1);
                        Mma<T>::run(s[mt][2 * jj + 1], a[mt], b2, b3);
                    }
                }
            }
            // Mask where a key can lie past a row's position: C element c of n-tile j is row
            // (c < 2 ? a : b), key chunk + 8 j + 2 tig + (c & 1).
            if (chunk + KEYS - 1 > warp_first_pos) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                    for (int j = 0; j < kSTiles; ++j) {
                        const int key = chunk + 8 * j + 2 * tig;
                        if (key > pos_a[mt]) s[mt][j][0] = tpserve::neg_inf();
                        if (key + 1 > pos_a[mt]) s[mt][j][1] = tpserve::neg_inf();
                        if (key > pos_b[mt]) s[mt][j][2] = tpserve::neg_inf();
                        if (key + 1 > pos_b[mt]) s[mt][j][3] = tpserve::neg_inf();
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                float max_a = tpserve::neg_inf();
                float max_b = tpserve::neg_inf();
#pragma unroll
                for (int j = 0; j < kSTiles; ++j) {
                    max_a = fmaxf(max_a, fmaxf(s[mt][j][0], s[mt][j][1]));
                    max_b = fmaxf(max_b, fmaxf(s[mt][j][2], s[mt][j][3]));
                }
                // A row's keys are spread over the 4 lanes of its group (same gid).
                max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 1));
                max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 2));
                max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 1));
                max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 2));
                const float new_a = fmaxf(m_a[mt], max_a);
                const float new_b = fmaxf(m_b[mt], max_b);
                // A row that has seen no key yet keeps max -inf: subtract 0 instead, so that
                // its masked entries give exp2(-inf) = 0 rather than NaN.
                const float sub_a = (new_a == tpserve::neg_inf() ? 0.0f : new_a) * scale_log2;
                const float sub_b = (new_b == tpserve::neg_inf() ? 0.0f : new_b) * scale_log2;
                // 0 while -inf:
                const float corr_a = tpserve::fast_exp2(fmaf(m_a[mt], scale_log2, -sub_a));
                const float corr_b = tpserve::fast_exp2(fmaf(m_b[mt], scale_log2, -sub_b));
                m_a[mt] = new_a;
                m_b[mt] = new_b;
                float sum_a = 0.0f;
                float sum_b = 0.0f;
#pragma unroll
                for (int j = 0; j < kSTiles; ++j) {
                    s[mt][j][0] = tpserve::fast_exp2(fmaf(s[mt][j][0], scale_log2, -sub_a));
                    s[mt][j][1] = tpserve::fast_exp2(fmaf(s[mt][j][1], scale_log2, -sub_a));
                    s[mt][j][2] = tpserve::fast_exp2(fmaf(s[mt][j][2], scale_log2, -sub_b));
                    s[mt][j][3] = tpserve::fast_exp2(fmaf(s[mt][j][3], scale_log2, -sub_b));
                    sum_a += s[mt][j][0] + s[mt][j][1];
                    sum_b += s[mt][j][2] + s[mt][j][3];
                }
                l_a[mt] = l_a[mt] * corr_a + sum_a;
                l_b[mt] = l_b[mt] * corr_b + sum_b;
#pragma unroll
                for (int n = 0; n < kOTiles; ++n) {
                    o[mt][n][0] *= corr_a;
                    o[mt][n][1] *= corr_a;
                    o[mt][n][2] *= corr_b;
                    o[mt][n][3] *= corr_b;
                }
            }
        }
        land_tile(v_s);   // this thread's V copies have landed
        __syncthreads();  // everyone's; S is done (k_s is free); slot_s[buf ^ 1] is written
        if (next < ctx_end) {
            load_tile(k_s, key_cache, buf ^ 1);
        }
        if (active) {
            // P (16 x KEYS per m-tile) as A fragments of k-steps of 16 keys: the C fragments of
            // S n-tiles 2 kk and 2 kk + 1 are exactly the A fragment of k-step kk (a0 = row a
            // keys 2 tig +{0,1} = C0,C1 of n-tile 2 kk; a1 = row b = C2,C3; a2, a3 the same of
            // n-tile 2 kk + 1, keys +8).
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                unsigned pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    pa[mt][0] = Mma<T>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                    pa[mt][1] = Mma<T>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                    pa[mt][2] = Mma<T>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                    pa[mt][3] = Mma<T>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
                }
#pragma unroll
                for (int nn = 0; nn < kOTiles / 2; ++nn) {
                    unsigned b0, b1, b2, b3;
                    ldmatrix_x4_trans(b0, b1, b2, b3, vb + kk * 16 * kStride + nn * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        Mma<T>::run(o[mt][2 * nn], pa[mt], b0, b1);
                        Mma<T>::run(o[mt][2 * nn + 1], pa[mt], b2, b3);
                    }
                }
            }
        }
    }

    // Each lane summed only its own columns: totals over the row's 4 lanes. C element c of O
    // n-tile n: row (c < 2 ? a : b), dim 8 n + 2 tig + (c & 1); half h of the fragment (h = 0:
    // row a, 1: row b) is elements 2 h and 2 h + 1.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = h == 0 ? l_a[mt] : l_b[mt];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int item = warp_item0 + mt * 16 + (lane >> 2) + 8 * h;
            if (item < items) {
                const float inv = (l > 0.0f ? 1.0f / l : 0.0f) * v_scale;
                const long long row = row0 + item / group;
                const int head = kv_head * group + item % group;
                T* dst = out + (row * num_q_heads + head) * HD + 2 * tig;
#pragma unroll
                for (int n = 0; n < kOTiles; ++n) {
                    *reinterpret_cast<unsigned*>(dst + 8 * n) =
                        Mma<T>::pack(o[mt][n][2 * h] * inv, o[mt][n][2 * h + 1] * inv);
                }
            }
        }
    }
}

// The shapes the worker launches (MmaShape in worker/src/cuda/kernels/attention.rs): 2 m-tiles a
// warp and key tiles of 64; 4 warps (128 items, 70,656 bytes of shared memory at HD 128), or at
// HD 128 on GPUs that give a block 105,472 bytes, the "wide" entry point's 8 warps (256 items: each K
// and V tile serves twice the items; 13-20% faster on an H200 at 2,048-8,192 tokens).
constexpr int kMmaMTiles = 2;
constexpr int kMmaKeys = 64;

// One entry point per shape, head size, dtype and cache element, with paged_attention's
// argument list: WIDTH is `_` for 4 warps and `_wide_` for 8 (paged_attention_mma_hd128_bf16,
// paged_attention_mma_wide_hd128_bf16, paged_attention_mma_hd128_fp8kv_bf16, ...).
#define TPSERVE_PAGED_ATTENTION_MMA_ENTRY(WIDTH, HD, WARPS, SUFFIX, T, KV, C)                 \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) paged_attention_mma##WIDTH##hd##HD##KV##_##SUFFIX( \
            T* __restrict__ out, float* __restrict__ partial_out,                            \
            float* __restrict__ partial_ml, const T* __restrict__ q,                         \
            const C* __restrict__ key_cache, const C* __restrict__ value_cache,              \
            const int* __restrict__ block_tables, const int* __restrict__ tiles,             \
            int num_q_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,       \
            int q_stride, int num_splits, int split_len, float scale, float k_scale,         \
            float v_scale) {                                                                 \
        (void)partial_out;                                                                   \
        (void)partial_ml;                                                                    \
        (void)num_splits;                                                                    \
        (void)split_len;                                                                     \
        paged_attention_mma_impl<T, C, HD, WARPS, kMmaMTiles, kMmaKeys>(                     \
            out, q, key_cache, value_cache, block_tables, tiles, num_q_heads, num_kv_heads,   \
            block_size, max_blocks_per_seq, q_stride, scale, k_scale, v_scale);              \
    }
#define TPSERVE_PAGED_ATTENTION_MMA_CACHE(SUFFIX, T, KV, C)              \
    TPSERVE_PAGED_ATTENTION_MMA_ENTRY(_, 64, 4, SUFFIX, T, KV, C)        \
    TPSERVE_PAGED_ATTENTION_MMA_ENTRY(_, 128, 4, SUFFIX, T, KV, C)       \
    TPSERVE_PAGED_ATTENTION_MMA_ENTRY(_wide_, 128, 8, SUFFIX, T, KV, C)
#define TPSERVE_PAGED_ATTENTION_MMA(SUFFIX, T) \
    TPSERVE_FOR_EACH_KV_CACHE(TPSERVE_PAGED_ATTENTION_MMA_CACHE, SUFFIX, T)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_PAGED_ATTENTION_MMA)
