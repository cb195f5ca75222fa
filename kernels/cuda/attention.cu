// Paged attention for prefill and decode: causal, grouped-query, reading keys and values from
// the paged KV cache, FlashAttention-style (keys in tiles through shared memory, online softmax,
// nothing of size context x context ever materialised), optionally split over the key length
// with a second kernel combining the splits (for long decode contexts, where one block per
// sequence and head would leave most of the GPU idle).
#include "common.cuh"

namespace {

constexpr int kWarps = 4;            // warps per block
constexpr int kMaxItemsPerWarp = 8;  // (query row, head) pairs one warp carries
constexpr int kKeysPerTile = 32;     // keys per shared-memory tile: one per lane
constexpr int kMaxSplits = 64;       // key splits attention_combine merges (the
                                     // worker's ATTENTION_MAX_SPLITS, which its plans respect)

__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// One piece of a KV cache, global -> shared, by the size of its raw bytes (common.cuh's
// KvCache::Raw: 16 for a cache in the dtype, 8 for FP8).
__device__ __forceinline__ void cp_async_piece(uint4* dst, const void* src) {
    tpserve::cp_async_16(dst, src, true);
}
__device__ __forceinline__ void cp_async_piece(uint2* dst, const void* src) {
    tpserve::cp_async_8(dst, src);
}

}  // namespace

// paged_attention_hd{64,128,256}_{bf16,f16}: for each query row r of a tile and each query
// head h of KV head g (h in [g * group, (g + 1) * group), group = num_q_heads / num_kv_heads),
//   out[r, h] = softmax_j(scale * q[r, h] . K[j, g]) V[j, g]  over keys j <= position(r)
// where K[j] and V[j] live at slot block_tables[seq, j / block_size] * block_size +
// j % block_size of the caches (seq: the tile's row of the block tables).
//
// A tile is up to a few consecutive query rows of ONE sequence (the host builds the tiles: a
// decode row is a tile of one; a prefill chunk is cut into tiles of at most
// 32 / group rows, fewer for head_dim 256), so a block loads each key tile once for every
// row and head of the tile. Rows of one tile have consecutive positions.
//
// With num_splits == 1 the block owns all keys of the tile and writes `out`. With num_splits > 1
// block z owns keys [z * split_len, (z + 1) * split_len) and writes its unnormalised partial
// result and its (max, sum) to the partial buffers; attention_combine then merges the splits.
//
// Arguments:
//   out           T   [num_tokens, num_q_heads * HD]                written when num_splits == 1
//   partial_out   f32 [num_tokens, num_q_heads, num_splits, HD]      written when num_splits > 1
//   partial_ml    f32 [num_tokens, num_q_heads, num_splits, 2]       (running max, sum of exp)
//   q             T   [num_tokens, q_stride]: token t's heads at q + t * q_stride, [num_q_heads, HD]
//   key_cache     C   [num_blocks, block_size, num_kv_heads, HD]   (this layer; C: T, or E4M3
//   value_cache   C   [num_blocks, block_size, num_kv_heads, HD]    bytes for `_fp8kv` entries)
//   block_tables  i32 [table_rows, max_blocks_per_seq]: one row per request (the worker's
//                     persistent block tables, updated in place each step)
//   tiles         i32 [num_tiles, 4]: the sequence's row of block_tables, first row (token
//                     index), number of rows, position of the first row
//   num_q_heads, num_kv_heads, block_size, max_blocks_per_seq, q_stride: i32
//   num_splits    i32  >= 1
//   split_len     i32  keys per split, a multiple of 32 (ignored when num_splits == 1)
//   scale         f32  usually 1 / sqrt(HD)
//   k_scale, v_scale  f32  the cache's scales (common.cuh's KvCache: an FP8 cache holds
//                     E4M3(K / k_scale) and E4M3(V / v_scale); 1 for a cache in T)
// Launch: grid (num_tiles, num_kv_heads, num_splits); block (128, 1, 1);
// dynamic shared memory: attention_smem_bytes(HD, rows * group) =
//   rows * group * HD * 4 + 32 * (HD + 2) * sizeof(T) + 32 * HD * sizeof(T).
// Requires rows * group <= 32, and the caches 16-byte aligned (HD is a multiple of 8).
template <typename T, typename C, int HD>
__device__ void paged_attention_impl(T* __restrict__ out, float* __restrict__ partial_out,
                                     float* __restrict__ partial_ml, const T* __restrict__ q,
                                     const C* __restrict__ key_cache,
                                     const C* __restrict__ value_cache,
                                     const int* __restrict__ block_tables,
                                     const int* __restrict__ tiles, int num_q_heads,
                                     int num_kv_heads, int block_size, int max_blocks_per_seq,
                                     int q_stride, int num_splits, int split_len, float scale,
                                     float k_scale, float v_scale) {
    using Kv = tpserve::KvCache<T, C>;
    tpserve::wait_for_inputs();
    scale *= k_scale;  // scores of the cache's K / k_scale
    constexpr int kPerLane = HD / 32;
    constexpr int kKStride = HD + 2;  // odd number of 32-bit words per row: no bank conflicts
    extern __shared__ float smem[];
    const int* tile = tiles + blockIdx.x * 4;
    const int seq = tile[0];
    const int row0 = tile[1];
    const int rows = tile[2];
    const int pos0 = tile[3];
    const int kv_head = blockIdx.y;
    const int split = blockIdx.z;
    const int group = num_q_heads / num_kv_heads;
    const int items = rows * group;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;

    float* q_s = smem;                                          // [items][HD], pre-scaled
    T* k_s = reinterpret_cast<T*>(q_s + items * HD);            // [32][HD + 2]
    T* v_s = k_s + kKeysPerTile * kKStride;                     // [32][HD]

    const int ctx_end = pos0 + rows;  // keys the last row sees
    const int2 keys = tpserve::split_keys(ctx_end, split, num_splits, split_len);
    const int key_begin = keys.x;
    const int key_end = keys.y;

    for (int idx = threadIdx.x; idx < items * HD; idx += blockDim.x) {
        const int item = idx / HD;
        const int d = idx - item * HD;
        const int row = row0 + item / group;
        const int head = kv_head * group + item % group;
        q_s[idx] = tpserve::to_float(q[(long long)row * q_stride + head * HD + d]) * scale;
    }

    float m[kMaxItemsPerWarp];
    float l[kMaxItemsPerWarp];
    float acc[kMaxItemsPerWarp][kPerLane];
#pragma unroll
    for (int i = 0; i < kMaxItemsPerWarp; ++i) {
        m[i] = tpserve::neg_inf();
        l[i] = 0.0f;
#pragma unroll
        for (int c = 0; c < kPerLane; ++c) {
            acc[i][c] = 0.0f;
        }
    }

    const int* table = block_tables + (long long)seq * max_blocks_per_seq;
    __shared__ long long slot_s[kKeysPerTile];  // cache slot of each key of the tile, or -1
    constexpr int kVecs = HD / 8;  // 16-byte vectors per key row
    for (int chunk = key_begin; chunk < key_end; chunk += kKeysPerTile) {
        __syncthreads();  // the previous tile is no longer read (and q_s is written, first time)
        if (threadIdx.x < kKeysPerTile) {
            const int key = chunk + threadIdx.x;
            slot_s[threadIdx.x] =
                key < key_end ? (long long)table[key / block_size] * block_size + key % block_size
                              : -1;
        }
        __syncthreads();
        // Loads of 8 elements (16 bytes, 8 for an FP8 cache, converted to T): a tile is
        // 32 x HD / 8 pieces of keys and as many of values, so each thread has a few
        // independent loads in flight rather than many dependent ones.
        for (int idx = threadIdx.x; idx < kKeysPerTile * kVecs; idx += blockDim.x) {
            const int j = idx / kVecs;
            const int c = idx - j * kVecs;
            const long long slot = slot_s[j];
            uint4 kv = make_uint4(0u, 0u, 0u, 0u);
            uint4 vv = kv;
            if (slot >= 0) {
                const long long at = (slot * num_kv_heads + kv_head) * HD + c * 8;
                kv = Kv::to_act(Kv::load(key_cache + at));
                vv = Kv::to_act(Kv::load(value_cache + at));
            }
            // k_s rows are HD + 2 elements (4-byte aligned, not 16): four 32-bit stores.
            unsigned int* kd = reinterpret_cast<unsigned int*>(k_s + j * kKStride + c * 8);
            kd[0] = kv.x;
            kd[1] = kv.y;
            kd[2] = kv.z;
            kd[3] = kv.w;
            *reinterpret_cast<uint4*>(v_s + j * HD + c * 8) = vv;
        }
        __syncthreads();
        const int key = chunk + lane;
#pragma unroll
        for (int i = 0; i < kMaxItemsPerWarp; ++i) {
            const int item = warp + i * kWarps;
            if (item >= items) {
                break;
            }
            const int pos = pos0 + item / group;
            float s = tpserve::neg_inf();
            if (key < key_end && key <= pos) {
                const float* qi = q_s + item * HD;
                const T* kj = k_s + lane * kKStride;
                float dot = 0.0f;
#pragma unroll 16
                for (int d = 0; d < HD; ++d) {
                    dot += qi[d] * tpserve::to_float(kj[d]);
                }
                s = dot;
            }
            const float tile_max = warp_reduce_max(s);
            if (tile_max == tpserve::neg_inf()) {
                continue;  // every key of this tile is masked for this row
            }
            const float m_new = fmaxf(m[i], tile_max);
            const float correction = __expf(m[i] - m_new);  // 0 while m[i] is -inf
            const float p = s == tpserve::neg_inf() ? 0.0f : __expf(s - m_new);
            l[i] = l[i] * correction + tpserve::warp_reduce_sum(p);
#pragma unroll
            for (int c = 0; c < kPerLane; ++c) {
                acc[i][c] *= correction;
            }
            for (int j = 0; j < kKeysPerTile; ++j) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
                if (pj != 0.0f) {  // the same for every lane: no divergence
                    const T* vj = v_s + j * HD;
#pragma unroll
                    for (int c = 0; c < kPerLane; ++c) {
                        acc[i][c] += pj * tpserve::to_float(vj[lane + 32 * c]);
                    }
                }
            }
            m[i] = m_new;
        }
    }

#pragma unroll
    for (int i = 0; i < kMaxItemsPerWarp; ++i) {
        const int item = warp + i * kWarps;
        if (item >= items) {
            break;
        }
        const long long row = row0 + item / group;
        const int head = kv_head * group + item % group;
        if (num_splits == 1) {
            const float inv = (l[i] > 0.0f ? 1.0f / l[i] : 0.0f) * v_scale;
            T* o = out + (row * num_q_heads + head) * HD;
#pragma unroll
            for (int c = 0; c < kPerLane; ++c) {
                o[lane + 32 * c] = tpserve::from_float<T>(acc[i][c] * inv);
            }
        } else {
            const long long at = (row * num_q_heads + head) * num_splits + split;
            float* po = partial_out + at * HD;
#pragma unroll
            for (int c = 0; c < kPerLane; ++c) {
                po[lane + 32 * c] = acc[i][c] * v_scale;
            }
            if (lane == 0) {
                partial_ml[at * 2] = m[i];
                partial_ml[at * 2 + 1] = l[i];
            }
        }
    }
}

// paged_attention_decode_hd{64,128,256}_g{4,8}_{bf16,f16}: the same attention as
// paged_attention, for tiles of ONE query row each (decode), with at most G query heads per KV
// head, built to read the KV cache at bandwidth: no shared-memory staging and no barrier per
// key tile. Lanes split a key's head vector into pieces of 8 elements (16 bytes, 8 for an FP8
// cache; HD / 8 lanes per key, so a warp reads 32 / (HD / 8) keys per load), each piece of K and V read straight from the cache;
// every lane group keeps its own online softmax (running max, sum and output piece) over the
// keys it saw, merged across the warp by shuffles and across the block's warps in shared
// memory. Tiles with zero rows are padding (CUDA-graph batches): they write nothing.
//
// Each lane's pieces of K and V travel by cp.async into slots of shared memory that only that
// lane reads, kStages loop steps deep (a per-lane prefetch queue that costs no registers and no
// barrier): kStages - 1 steps of keys are in flight while a step computes, 24 KiB a block. An 8B
// decode of 256 sequences at 1,024 keys read the cache at 0.43 of the copy rate with keys loaded
// into registers one step ahead and reads it at 0.50 with the queue (docs/PERFORMANCE.md, run
// 14): bytes in flight were not the main limit; the instructions per key are the next suspect.
//
// It also does rope_kv_write's work for its rows (decode steps launch no rope_kv_write): it
// reads the qkv projection's output as it is, rotates the query heads and the row's own key
// with the same arithmetic as rope_kv_write.cu, and the split that attends to the row's own
// key writes it (rotated) and its value to the cache at the row's slot (a negative slot writes
// nothing). The keys and values of each warp's first loop step, which earlier steps wrote, are
// loaded before waiting for the kernel before: at decode's short splits that takes most of
// the kernel's chain of dependent loads off its critical path. The row's own key is not in the
// cache before this kernel writes it: the prefetched steps skip it and the lane that attends to
// it puts it (rotated) into its slot itself.
//
// Key splits as paged_attention, except that split_len 0 means: each row splits its own keys
// evenly, ceil(context / num_splits) rounded up to 32 (a CUDA graph is captured without knowing
// the contexts); splits past a row's context write only max -inf and sum 0, which
// attention_combine skips, and leave without waiting for the kernel before.
//
// With an FP8 cache (the `_fp8kv` entry points) the row's own key and value are rounded to
// E4M3 (over their scales) before it attends to them, as every other key it reads.
//
// Arguments: paged_attention's, with q replaced by
//   qkv           T   [num_tokens, qkv_stride]: per token, [num_q_heads, HD] queries, then
//                     [num_kv_heads, HD] keys, then as many values, before RoPE; read only
// and key_cache and value_cache written at the rows' slots, plus
//   slot_mapping  i64 [num_tokens]   the rows' cache slots (negative: padding, not written)
//   cos_table     f32 [max_pos, HD / 2]   as rope_kv_write's
//   sin_table     f32 [max_pos, HD / 2]
// (tiles must have rows 0 or 1, the row's position in tile[3]; G >= num_q_heads /
// num_kv_heads; no dynamic shared memory: 32 KiB static, 4 blocks an SM).
// Launch: grid (num_tiles, num_kv_heads, num_splits); block (128, 1, 1).
template <typename T, typename C, int HD, int G>
__device__ void paged_attention_decode_impl(
    T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_ml,
    const T* __restrict__ qkv, C* __restrict__ key_cache, C* __restrict__ value_cache,
    const int* __restrict__ block_tables, const int* __restrict__ tiles,
    const long long* __restrict__ slot_mapping, const float* __restrict__ cos_table,
    const float* __restrict__ sin_table, int num_q_heads, int num_kv_heads, int block_size,
    int max_blocks_per_seq, int qkv_stride, int num_splits, int split_len, float scale,
    float k_scale, float v_scale) {
    using Kv = tpserve::KvCache<T, C>;
    using Raw = typename Kv::Raw;
    scale *= k_scale;  // scores of the cache's K / k_scale
    constexpr int kLanesPerKey = HD / 8;
    constexpr int kHalfPieces = kLanesPerKey / 2;  // pieces in the first half of a head vector
    constexpr int kKeysPerStep = 32 / kLanesPerKey;  // keys one warp reads per piece load
    // Keys per lane per loop step: 32 bytes of keys per lane, 2 for a cache in the dtype, 4 for
    // FP8 (the kernel must stay within 128 registers, 4 blocks of 128 threads an SM: with 3, a
    // batch of 64 decodes needs a second wave; docs/PERFORMANCE.md, run 13).
    constexpr int kUnroll = 32 / sizeof(Raw);
    constexpr int kThreads = kWarps * 32;
    constexpr int kStages = 4;  // loop steps in shared memory, kStages - 1 in flight
    constexpr int kStageBytes = kThreads * kUnroll * 2 * (int)sizeof(Raw);
    constexpr int kAccBytes = kWarps * G * HD * (int)sizeof(float);
    constexpr int kSharedBytes =
        kStages * kStageBytes > kAccBytes ? kStages * kStageBytes : kAccBytes;
    __shared__ float m_s[kWarps][G];
    __shared__ float l_s[kWarps][G];
    // The lanes' prefetched pieces, [stage][key u][K, V][thread]; after the loop the warps'
    // partial outputs, [warp][head][element], in the same bytes.
    __shared__ __align__(16) unsigned char shared[kSharedBytes];
    Raw* staged = reinterpret_cast<Raw*>(shared);
    auto slot_of = [&](int stage, int u, int kv) {
        return staged + ((stage * kUnroll + u) * 2 + kv) * kThreads + threadIdx.x;
    };

    // The tiles and slots (copied in before the step), the block tables (updated at its
    // start), the RoPE tables and the keys and values of the first loop step (earlier steps
    // wrote them; the row's own key is this kernel's to write) are read before waiting for the
    // kernel before (the qkv projection): the block tables' updates finished before that kernel
    // started (common.cuh, wait_for_inputs).
    const int* tile = tiles + blockIdx.x * 4;
    if (tile[2] == 0) {
        return;
    }
    const int seq = tile[0];
    const long long row = tile[1];
    const int own_key = tile[3];
    const int ctx = own_key + 1;
    const int kv_head = blockIdx.y;
    const int split = blockIdx.z;
    const int group = num_q_heads / num_kv_heads;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int sub = lane / kLanesPerKey;    // which key of a step this lane reads
    const int piece = lane % kLanesPerKey;  // which 8 elements of the head vector

    const int2 keys = tpserve::split_keys(ctx, split, num_splits, split_len);
    const int key_begin = keys.x;
    const int key_end = keys.y;

    if (key_begin >= key_end) {
        // A split past the row's context (graphs are captured for the longest): it says so to
        // attention_combine and leaves at once, before waiting, out of the other blocks' way.
        // The partials' last reader, the previous layer's merge, finished before the kernel
        // before this one started.
        if (threadIdx.x < group) {
            const long long at =
                (row * num_q_heads + kv_head * group + threadIdx.x) * num_splits + split;
            partial_ml[at * 2] = tpserve::neg_inf();
            partial_ml[at * 2 + 1] = 0.0f;
        }
        return;
    }
    const int* table = block_tables + (long long)seq * max_blocks_per_seq;
    constexpr int kStride = kWarps * kKeysPerStep;  // keys between a warp's consecutive steps
    const int first = key_begin + warp * kKeysPerStep;
    constexpr int kStepKeys = kStride * kUnroll;  // keys between a warp's loop steps
    const int steps = first < key_end ? (key_end - first + kStepKeys - 1) / kStepKeys : 0;
    // Starts copying loop step `step`'s pieces of this lane (keys past the split's end, and
    // `skip`, are left out: their slots hold stale bytes that attend() masks) into its stage,
    // as one cp.async group (empty past the last step).
    auto prefetch = [&](int step, int skip) {
        const int stage = step % kStages;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const int key = first + step * kStepKeys + u * kStride + sub;
            if (step < steps && key < key_end && key != skip) {
                const long long slot =
                    (long long)table[key / block_size] * block_size + key % block_size;
                const long long at = (slot * num_kv_heads + kv_head) * HD + piece * 8;
                cp_async_piece(slot_of(stage, u, 0), key_cache + at);
                cp_async_piece(slot_of(stage, u, 1), value_cache + at);
            }
        }
        tpserve::cp_async_commit();
    };
    // The first kStages - 1 steps (earlier steps wrote their keys; not the row's own key).
#pragma unroll
    for (int step = 0; step < kStages - 1; ++step) {
        prefetch(step, own_key);
    }
    // RoPE at the row's position for this lane's 8 elements: rotation index i of element c is
    // (piece mod half) * 8 + c; the lane with the other half of each pair is `piece ^ half`.
    const bool low_half = piece < kHalfPieces;
    float cos_c[8];
    float sin_c[8];
    {
        const long long at = (long long)own_key * (HD / 2) + (piece % kHalfPieces) * 8;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            cos_c[c] = cos_table[at + c];
            sin_c[c] = sin_table[at + c];
        }
    }
    // A head vector's piece rotated as rope_kv_write.cu rotates it (the same f32 expressions,
    // rounded to T once); every lane of the warp must call it (a shuffle).
    auto rotate = [&](uint4 raw) {
        const T* e = reinterpret_cast<const T*>(&raw);
        uint4 rotated;
        T* r = reinterpret_cast<T*>(&rotated);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            const float mine = tpserve::to_float(e[c]);
            const float other = __shfl_xor_sync(0xffffffffu, mine, kHalfPieces);
            r[c] = low_half ? tpserve::from_float<T>(mine * cos_c[c] - other * sin_c[c])
                            : tpserve::from_float<T>(mine * cos_c[c] + other * sin_c[c]);
        }
        return rotated;
    };
    const long long own_slot = slot_mapping[row];
    tpserve::wait_for_inputs();

    // The queries' pieces, loaded with the own key's and value's: one round trip to L2 on the
    // way to the first scores instead of two (the own key's split waits at a barrier below).
    uint4 q_raw[G];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        q_raw[h] = h < group ? *reinterpret_cast<const uint4*>(
                                   qkv + row * qkv_stride + (kv_head * group + h) * HD + piece * 8)
                             : make_uint4(0u, 0u, 0u, 0u);
    }
    // The row's own key (rotated) and value, from the qkv projection, into the cache, by the
    // one split that attends to it.
    const bool has_own_key = own_key >= key_begin && own_key < key_end;
    Raw own_k = Kv::zero();
    Raw own_v = own_k;
    if (has_own_key) {
        const T* k_row = qkv + row * qkv_stride + (num_q_heads + kv_head) * HD + piece * 8;
        const T* v_row =
            qkv + row * qkv_stride + (num_q_heads + num_kv_heads + kv_head) * HD + piece * 8;
        own_k = Kv::from_act(rotate(*reinterpret_cast<const uint4*>(k_row)), k_scale);
        own_v = Kv::from_act(*reinterpret_cast<const uint4*>(v_row), v_scale);
        if (warp == 0 && sub == 0 && own_slot >= 0) {
            const long long at = (own_slot * num_kv_heads + kv_head) * HD + piece * 8;
            Kv::store(key_cache + at, own_k);
            Kv::store(value_cache + at, own_v);
        }
        // The lane whose prefetched steps skipped the own key puts it into its slot; later
        // steps read it from the cache, written before this barrier.
        const int own_index = own_key - first - sub;
        if (own_index >= 0 && own_index % kStride == 0 &&
            own_index / kStride < (kStages - 1) * kUnroll) {
            const int j = own_index / kStride;
            *slot_of(j / kUnroll, j % kUnroll, 0) = own_k;
            *slot_of(j / kUnroll, j % kUnroll, 1) = own_v;
        }
        __syncthreads();
    }

    float qf[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        if (h < group) {
            const uint4 raw = rotate(q_raw[h]);
            const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                qf[h][c] = tpserve::to_float(e[c]) * scale;
            }
        } else {
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                qf[h][c] = 0.0f;
            }
        }
    }
    float m[G];
    float l[G];
    float acc[G][8];
#pragma unroll
    for (int h = 0; h < G; ++h) {
        m[h] = tpserve::neg_inf();
        l[h] = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            acc[h][c] = 0.0f;
        }
    }

    // One loop step: the online softmax over the kUnroll keys (one per lane group) of each lane.
    auto attend = [&](int step) {
        const int base = first + step * kStepKeys;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            const bool valid = base + u * kStride + sub < key_end;
            float kf[8];
            float vf[8];
            Kv::to_floats(*slot_of(step % kStages, u, 0), kf);
            Kv::to_floats(*slot_of(step % kStages, u, 1), vf);
#pragma unroll
            for (int h = 0; h < G; ++h) {
                float s = 0.0f;
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    s = fmaf(qf[h][c], kf[c], s);
                }
                // Sum over the lanes of this key (a power-of-two group of consecutive lanes).
#pragma unroll
                for (int offset = kLanesPerKey / 2; offset > 0; offset >>= 1) {
                    s += __shfl_xor_sync(0xffffffffu, s, offset);
                }
                if (valid && h < group) {
                    const float m_new = fmaxf(m[h], s);
                    const float correction = __expf(m[h] - m_new);  // 0 while m[h] is -inf
                    const float p = __expf(s - m_new);
                    l[h] = l[h] * correction + p;
#pragma unroll
                    for (int c = 0; c < 8; ++c) {
                        acc[h][c] = fmaf(p, vf[c], acc[h][c] * correction);
                    }
                    m[h] = m_new;
                }
            }
        }
    };
    // The loop bound is the same for every lane of a warp (the shuffles need all of them); a
    // lane's own key may lie past the end. Each step first starts the copy of the step
    // kStages - 1 ahead, into the stage the step before read, then waits for its own.
    for (int step = 0; step < steps; ++step) {
        prefetch(step + kStages - 1, -1);
        tpserve::cp_async_wait<kStages - 1>();
        attend(step);
    }
    tpserve::cp_async_wait<0>();
    __syncthreads();  // every warp is done with its stages: their bytes become acc_s
    float(*acc_s)[G][HD] = reinterpret_cast<float(*)[G][HD]>(shared);

    // Merge the lane groups of the warp (they saw different keys, the same head pieces).
#pragma unroll
    for (int offset = kLanesPerKey; offset < 32; offset <<= 1) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
            const float m_o = __shfl_xor_sync(0xffffffffu, m[h], offset);
            const float l_o = __shfl_xor_sync(0xffffffffu, l[h], offset);
            const float m_new = fmaxf(m[h], m_o);
            const float a = m[h] == tpserve::neg_inf() ? 0.0f : __expf(m[h] - m_new);
            const float b = m_o == tpserve::neg_inf() ? 0.0f : __expf(m_o - m_new);
            l[h] = l[h] * a + l_o * b;
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const float acc_o = __shfl_xor_sync(0xffffffffu, acc[h][c], offset);
                acc[h][c] = acc[h][c] * a + acc_o * b;
            }
            m[h] = m_new;
        }
    }
    if (sub == 0) {
#pragma unroll
        for (int h = 0; h < G; ++h) {
            if (piece == 0) {
                m_s[warp][h] = m[h];
                l_s[warp][h] = l[h];
            }
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                acc_s[warp][h][piece * 8 + c] = acc[h][c];
            }
        }
    }
    __syncthreads();
    // Merge the warps: one thread per (head, element).
    for (int idx = threadIdx.x; idx < group * HD; idx += blockDim.x) {
        const int h = idx / HD;
        const int d = idx - h * HD;
        float m_max = tpserve::neg_inf();
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            m_max = fmaxf(m_max, m_s[w][h]);
        }
        float num = 0.0f;
        float den = 0.0f;
        if (m_max != tpserve::neg_inf()) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float weight = __expf(m_s[w][h] - m_max);
                num += weight * acc_s[w][h][d];
                den += weight * l_s[w][h];
            }
        }
        const long long head = kv_head * group + h;
        if (num_splits == 1) {
            out[(row * num_q_heads + head) * HD + d] =
                tpserve::from_float<T>(den > 0.0f ? num / den * v_scale : 0.0f);
        } else {
            const long long at = (row * num_q_heads + head) * num_splits + split;
            partial_out[at * HD + d] = num * v_scale;
            if (d == 0) {
                partial_ml[at * 2] = m_max;
                partial_ml[at * 2 + 1] = den;
            }
        }
    }
}

// attention_combine_{bf16,f16}: merges the splits of paged_attention:
//   out[t, h] = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s,  M = max_s m_s
// Splits that saw no key have m = -inf and weigh nothing: their partial output is not read (it
// was not written: loading it anyway reads lines that are not in L2, which made a batch-1 step at
// 384 keys 0.05 ms slower over HTTP). The partial outputs are loaded 8 splits at a time before
// any is summed, so the loads overlap instead of each waiting for the one before (the 32 merges
// of 33 splits in a batch-1 8B decode step at 2,048 keys took 0.21 ms with one load in flight,
// 0.08 ms so); the sum's order and arithmetic are as before, and so are the bits.
// It lets the next kernel launch before it waits for the attention (common.cuh's
// let_next_kernel_launch): the o projection's blocks are then resident while the attention, which
// reads little and is bound by its latency, still runs, and load their first weights meanwhile
// (an H100's one-row decode step 0.6-1.3% faster in bf16, FP8 and 4-bit; docs/PERFORMANCE.md,
// issue 9, run 52).
//
// Arguments:
//   out          T   [num_tokens, num_q_heads * head_dim]   written
//   partial_out  f32 [num_tokens, num_q_heads, num_splits, head_dim]
//   partial_ml   f32 [num_tokens, num_q_heads, num_splits, 2]
//   num_q_heads, head_dim: i32
//   num_splits   i32  2..=kMaxSplits (64)
// Launch: grid (num_tokens, num_q_heads, 1); block (head_dim, 1, 1) (head_dim <= 1024).
template <typename T>
__device__ void attention_combine_impl(T* __restrict__ out, const float* __restrict__ partial_out,
                                       const float* __restrict__ partial_ml, int num_q_heads,
                                       int head_dim, int num_splits) {
    tpserve::let_next_kernel_launch();
    tpserve::wait_for_inputs();
    __shared__ float m_s[kMaxSplits];
    __shared__ float l_s[kMaxSplits];
    const long long base = (long long)blockIdx.x * num_q_heads + blockIdx.y;
    const float* ml = partial_ml + base * num_splits * 2;
    for (int s = threadIdx.x; s < num_splits; s += blockDim.x) {
        m_s[s] = ml[s * 2];
        l_s[s] = ml[s * 2 + 1];
    }
    __syncthreads();
    float max_m = tpserve::neg_inf();
    for (int s = 0; s < num_splits; ++s) {
        max_m = fmaxf(max_m, m_s[s]);
    }
    const int d = threadIdx.x;
    float num = 0.0f;
    float den = 0.0f;
    if (max_m != tpserve::neg_inf()) {
        const float* part = partial_out + base * num_splits * head_dim + d;
        constexpr int kInFlight = 8;
        for (int s0 = 0; s0 < num_splits; s0 += kInFlight) {
            bool live[kInFlight];
            float p[kInFlight];
#pragma unroll
            for (int j = 0; j < kInFlight; ++j) {
                const int s = s0 + j;
                live[j] = s < num_splits && m_s[s] != tpserve::neg_inf();
                p[j] = live[j] ? part[(long long)s * head_dim] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < kInFlight; ++j) {
                const int s = s0 + j;
                if (live[j]) {
                    const float w = __expf(m_s[s] - max_m);
                    den += w * l_s[s];
                    num += w * p[j];
                }
            }
        }
    }
    out[base * head_dim + d] = tpserve::from_float<T>(den > 0.0f ? num / den : 0.0f);
}

#define TPSERVE_PAGED_ATTENTION_HD(SUFFIX, T, KV, C, HD)                                      \
    extern "C" __global__ void paged_attention_hd##HD##KV##_##SUFFIX(                          \
        T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_ml,  \
        const T* __restrict__ q, const C* __restrict__ key_cache,                              \
        const C* __restrict__ value_cache, const int* __restrict__ block_tables,               \
        const int* __restrict__ tiles, int num_q_heads, int num_kv_heads, int block_size,      \
        int max_blocks_per_seq, int q_stride, int num_splits, int split_len, float scale,      \
        float k_scale, float v_scale) {                                                        \
        paged_attention_impl<T, C, HD>(out, partial_out, partial_ml, q, key_cache,             \
                                       value_cache, block_tables, tiles, num_q_heads,          \
                                       num_kv_heads, block_size, max_blocks_per_seq, q_stride, \
                                       num_splits, split_len, scale, k_scale, v_scale);        \
    }
#define TPSERVE_PAGED_ATTENTION_CACHE(SUFFIX, T, KV, C)     \
    TPSERVE_PAGED_ATTENTION_HD(SUFFIX, T, KV, C, 64)        \
    TPSERVE_PAGED_ATTENTION_HD(SUFFIX, T, KV, C, 128)       \
    TPSERVE_PAGED_ATTENTION_HD(SUFFIX, T, KV, C, 256)
#define TPSERVE_PAGED_ATTENTION(SUFFIX, T)                                                    \
    TPSERVE_FOR_EACH_KV_CACHE(TPSERVE_PAGED_ATTENTION_CACHE, SUFFIX, T)                       \
    extern "C" __global__ void attention_combine_##SUFFIX(                                    \
        T* __restrict__ out, const float* __restrict__ partial_out,                           \
        const float* __restrict__ partial_ml, int num_q_heads, int head_dim,                  \
        int num_splits) {                                                                     \
        attention_combine_impl<T>(out, partial_out, partial_ml, num_q_heads, head_dim,        \
                                  num_splits);                                                \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_PAGED_ATTENTION)

#define TPSERVE_DECODE_ATTENTION_ONE(SUFFIX, T, KV, C, HD, G)                                 \
    extern "C" __global__ void __launch_bounds__(128) paged_attention_decode_hd##HD##_g##G##KV##_##SUFFIX( \
        T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_ml,  \
        const T* __restrict__ qkv, C* __restrict__ key_cache, C* __restrict__ value_cache,     \
        const int* __restrict__ block_tables, const int* __restrict__ tiles,                   \
        const long long* __restrict__ slot_mapping, const float* __restrict__ cos_table,       \
        const float* __restrict__ sin_table, int num_q_heads, int num_kv_heads,                \
        int block_size, int max_blocks_per_seq, int qkv_stride, int num_splits, int split_len, \
        float scale, float k_scale, float v_scale) {                                          \
        paged_attention_decode_impl<T, C, HD, G>(                                             \
            out, partial_out, partial_ml, qkv, key_cache, value_cache, block_tables, tiles,   \
            slot_mapping, cos_table, sin_table, num_q_heads, num_kv_heads, block_size,        \
            max_blocks_per_seq, qkv_stride, num_splits, split_len, scale, k_scale, v_scale);  \
    }
#define TPSERVE_DECODE_ATTENTION_CACHE(SUFFIX, T, KV, C)          \
    TPSERVE_DECODE_ATTENTION_ONE(SUFFIX, T, KV, C, 64, 4)         \
    TPSERVE_DECODE_ATTENTION_ONE(SUFFIX, T, KV, C, 64, 8)         \
    TPSERVE_DECODE_ATTENTION_ONE(SUFFIX, T, KV, C, 128, 4)        \
    TPSERVE_DECODE_ATTENTION_ONE(SUFFIX, T, KV, C, 128, 8)        \
    TPSERVE_DECODE_ATTENTION_ONE(SUFFIX, T, KV, C, 256, 4)        \
    TPSERVE_DECODE_ATTENTION_ONE(SUFFIX, T, KV, C, 256, 8)
#define TPSERVE_DECODE_ATTENTION(SUFFIX, T) \
    TPSERVE_FOR_EACH_KV_CACHE(TPSERVE_DECODE_ATTENTION_CACHE, SUFFIX, T)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_DECODE_ATTENTION)
