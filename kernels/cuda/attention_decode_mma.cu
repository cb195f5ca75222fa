// Paged attention for decode rows on tensor cores, with the query heads of a KV head packed
// into the M dimension of the products (as FlashInfer's and vLLM's batch-decode kernels do):
// one block reads each key and value of its sequence's KV head once for all `group` query
// heads, and every score is computed, exponentiated and weighed once, by m16n8k16 mma.sync,
// instead of once per lane of a lane group as attention.cu's paged_attention_decode does (16
// lanes per key at head size 128, each computing every head's exponential: at 256 decodes of
// 1,024 keys that kernel is bound by instructions, not bytes; docs/PERFORMANCE.md, run 14).
#include "common.cuh"

namespace {

// log2(e): the softmax runs in base 2 (tpserve::fast_exp2), with scale * log2(e) applied to S in
// f32.
constexpr float kDecodeLog2e = 1.4426950408889634f;
constexpr int kDecodeWarps = 4;   // warps per block; each owns every 4th key chunk
constexpr int kDecodeKeys = 16;   // keys per chunk: one k-step of the P V product
constexpr int kDecodeItems = 16;  // (row, head) items of a block: the products' M

}  // namespace

// Shared memory of one block: Q of its items, then per warp `STAGES` chunks of keys and values
// in the cache's element (rows padded by 8 elements of T so that ldmatrix is conflict-free),
// and for an FP8 cache one chunk converted to T.
template <typename T, typename C, int HD, int STAGES> struct DecodeMmaSmem {
    static constexpr int kStride = HD + 8;  // elements of T per shared-memory row
    static constexpr bool kConverted = sizeof(C) == 1;
    // One chunk of K or V as it arrives: T rows padded to kStride, or E4M3 rows unpadded.
    static constexpr int kRawChunk =
        kConverted ? kDecodeKeys * HD : kDecodeKeys * kStride * (int)sizeof(T);
    static constexpr int kTChunk = kDecodeKeys * kStride * (int)sizeof(T);
    static constexpr int kWarpBytes = STAGES * 2 * kRawChunk + (kConverted ? 2 * kTChunk : 0);
    static constexpr int kQBytes = kDecodeItems * kStride * (int)sizeof(T);
    // After the loop: every warp's partial output [warp][item][HD] in f32 with its (max, sum).
    static constexpr int kMergeBytes = kDecodeWarps * kDecodeItems * (HD + 2) * 4;
    static constexpr int kLoopBytes = kQBytes + kDecodeWarps * kWarpBytes;
    static constexpr int kBytes = kLoopBytes > kMergeBytes ? kLoopBytes : kMergeBytes;
};

// Dynamic shared memory of one block of paged_attention_decode_mma (decode_mma_smem_bytes in
// worker/src/cuda/kernels/attention.rs computes the same: at the entry points' 2 stages, 73,984 bytes at HD 128
// and 39,168 at HD 64 for a cache in the dtype, 71,936 and 37,120 for FP8).
template <typename T, typename C, int HD, int STAGES>
__host__ __device__ constexpr int paged_attention_decode_mma_smem_bytes() {
    return DecodeMmaSmem<T, C, HD, STAGES>::kBytes;
}

// paged_attention_decode_mma_hd{64,128}_{bf16,f16} (and `_fp8kv_`): paged_attention's
// computation (attention.cu) for tiles of at most 16 (row, head) items, built for decode:
//   out[r, h] = softmax_j(scale * q[r, h] . K[j, g]) V[j, g]  over keys j <= position(r)
// for the tile's rows r and the query heads h of KV head g = blockIdx.y (item i = row
// row0 + i / group, head g * group + i % group; rows * group <= 16). Unlike
// paged_attention_decode it neither rotates the queries nor writes the cache: rope_kv_write
// has done both before it, as it does for prefill.
//
// A block computes one tile for one KV head and one key split; its 4 warps take the split's
// chunks of 16 keys in turn (warp w chunks w, w + 4, ...) and each runs its own online softmax
// over them, merged at the end through shared memory. Q of the items (zero past `items`) sits
// in registers as m16n8k16 A fragments for the whole kernel; per chunk, S = Q K^T is 2 n-tiles
// of 8 keys over HD / 16 k-steps, and O += P V is HD / 8 n-tiles over one k-step, P rounded to
// T from the S accumulators as FlashAttention does. Each warp's lanes copy its chunks of K and
// V by cp.async, STAGES chunks deep, with no barrier between warps in the loop; an FP8 cache's
// chunk is converted to T by the lanes that copied it before the products read it (common.cuh's
// KvCache; the key scale is folded into `scale`, the value scale into the final division).
//
// Key splits as paged_attention_decode: with num_splits > 1, split z owns keys
// [z * len, (z + 1) * len), len = split_len, or when split_len is 0, ceil(context / num_splits)
// rounded up to 32 for each tile's own context (CUDA graphs are captured without knowing the
// contexts); splits past a tile's context write max -inf and sum 0, which attention_combine
// skips. Tiles with zero rows are padding (CUDA-graph batches): they write nothing.
//
// Arguments: paged_attention's (out, partial_out, partial_ml, q, key_cache, value_cache,
// block_tables, tiles, num_q_heads, num_kv_heads, block_size, max_blocks_per_seq, q_stride,
// num_splits, split_len, scale, k_scale, v_scale), with the queries already rotated and the
// rows' own keys and values already in the cache. REQUIRES block_size a multiple of 16 (a
// chunk is 16 consecutive slots of one cache block), rows * group <= 16, q 16-byte aligned with
// q_stride a multiple of 8, split_len a multiple of 32.
// Launch: grid (num_tiles, num_kv_heads, num_splits); block (128, 1, 1); dynamic shared memory
// paged_attention_decode_mma_smem_bytes<T, C, HD, STAGES>() (above 48 KiB: the host raises the
// limit). Needs sm_80 or newer (mma bf16, ldmatrix, cp.async; FP8 conversion: sm_89).
template <typename T, typename C, int HD, int STAGES>
__device__ __forceinline__ void paged_attention_decode_mma_impl(
    T* __restrict__ out, float* __restrict__ partial_out, float* __restrict__ partial_ml,
    const T* __restrict__ q, const C* __restrict__ key_cache, const C* __restrict__ value_cache,
    const int* __restrict__ block_tables, const int* __restrict__ tiles, int num_q_heads,
    int num_kv_heads, int block_size, int max_blocks_per_seq, int q_stride, int num_splits,
    int split_len, float scale, float k_scale, float v_scale) {
    using Kv = tpserve::KvCache<T, C>;
    using Smem = DecodeMmaSmem<T, C, HD, STAGES>;
    using tpserve::Mma;
    static_assert(HD % 16 == 0, "HD must be a multiple of 16");
    constexpr int kStride = Smem::kStride;
    constexpr int kKSteps = HD / 16;  // mma k-steps of Q K^T over the head dimension
    constexpr int kOTiles = HD / 8;   // mma n-tiles of O
    constexpr bool kConverted = Smem::kConverted;
    // 16-byte copies per chunk of K (or V): T rows of HD / 8 copies, E4M3 rows of HD / 16.
    constexpr int kRowCopies = kConverted ? HD / 16 : HD / 8;
    constexpr int kLaneCopies = kDecodeKeys * kRowCopies / 32;
    static_assert(kDecodeKeys * kRowCopies % 32 == 0, "a chunk is whole copies per lane");

    tpserve::wait_for_inputs();
    const int* tile = tiles + blockIdx.x * 4;
    const int rows = tile[2];
    if (rows == 0) {
        return;
    }
    const int seq = tile[0];
    const int row0 = tile[1];
    const int pos0 = tile[3];
    const int kv_head = blockIdx.y;
    const int split = blockIdx.z;
    const int group = num_q_heads / num_kv_heads;
    const int items = rows * group;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int gid = lane >> 2;  // mma groupID: fragment rows gid and gid + 8
    const int tig = lane & 3;   // mma threadID_in_group: fragment columns 2 tig, 2 tig + 1

    const int ctx = pos0 + rows;  // keys the last row sees
    const int2 keys = tpserve::split_keys(ctx, split, num_splits, split_len);
    const int key_begin = keys.x;
    const int key_end = keys.y;
    if (key_begin >= key_end) {
        // A split past this tile's context (graphs are captured for the longest).
        for (int i = tid; i < items; i += blockDim.x) {
            const long long row = row0 + i / group;
            const long long at =
                (row * num_q_heads + kv_head * group + i % group) * num_splits + split;
            partial_ml[at * 2] = tpserve::neg_inf();
            partial_ml[at * 2 + 1] = 0.0f;
        }
        return;
    }

    extern __shared__ uint4 decode_mma_smem[];
    unsigned char* const base = reinterpret_cast<unsigned char*>(decode_mma_smem);
    T* const q_s = reinterpret_cast<T*>(base);  // [16][kStride]
    unsigned char* const warp_s = base + Smem::kQBytes + warp * Smem::kWarpBytes;
    // Stage s of K (kv 0) or V (kv 1) as it arrives.
    auto raw_chunk = [&](int stage, int kv) { return warp_s + (stage * 2 + kv) * Smem::kRawChunk; };
    // The chunk the products read: the stage itself for a T cache, the converted copy for FP8.
    auto t_chunk = [&](int stage, int kv) {
        return reinterpret_cast<T*>(kConverted ? warp_s + STAGES * 2 * Smem::kRawChunk +
                                                     kv * Smem::kTChunk
                                               : raw_chunk(stage, kv));
    };

    // Q of the items, zero past `items`, 16 bytes at a time.
    for (int idx = tid; idx < kDecodeItems * (HD / 8); idx += blockDim.x) {
        const int item = idx / (HD / 8);
        const int c = idx - item * (HD / 8);
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (item < items) {
            const long long row = row0 + item / group;
            const int head = kv_head * group + item % group;
            v = *reinterpret_cast<const uint4*>(q + row * q_stride + head * HD + c * 8);
        }
        *reinterpret_cast<uint4*>(q_s + item * kStride + c * 8) = v;
    }

    // This warp's chunks: key_begin + 16 (warp + 4 i), i < chunks.
    const int* table = block_tables + (long long)seq * max_blocks_per_seq;
    const int first = key_begin + warp * kDecodeKeys;
    constexpr int kChunkStride = kDecodeWarps * kDecodeKeys;
    const int chunks = first < key_end ? (key_end - first + kChunkStride - 1) / kChunkStride : 0;
    // Starts copying chunk i's keys and values into its stage, as one cp.async group (empty
    // past the last chunk). Keys past the split's end are zero-filled (their scores are masked;
    // zeros keep their P V terms finite).
    auto prefetch = [&](int i) {
        if (i < chunks) {
            const int stage = i % STAGES;
            const int chunk = first + i * kChunkStride;
            const long long slot0 =
                (long long)table[chunk / block_size] * block_size + chunk % block_size;
#pragma unroll
            for (int kv = 0; kv < 2; ++kv) {
                const C* cache = kv == 0 ? key_cache : value_cache;
                unsigned char* dst = raw_chunk(stage, kv);
#pragma unroll
                for (int u = 0; u < kLaneCopies; ++u) {
                    const int idx = lane + 32 * u;
                    const int j = idx / kRowCopies;
                    const int c = idx - j * kRowCopies;
                    const bool valid = chunk + j < key_end;
                    const long long at =
                        valid ? ((slot0 + j) * num_kv_heads + kv_head) * HD : 0;
                    if constexpr (kConverted) {
                        tpserve::cp_async_16(dst + j * HD + c * 16, cache + at + c * 16, valid);
                    } else {
                        tpserve::cp_async_16(dst + (j * kStride + c * 8) * sizeof(T),
                                             cache + at + c * 8, valid);
                    }
                }
            }
        }
        tpserve::cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < STAGES - 1; ++i) {
        prefetch(i);
    }

    __syncthreads();  // q_s is written
    unsigned qa[kKSteps][4];
    {
        const T* qrow = q_s + (lane & 15) * kStride + (lane >> 4) * 8;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
            tpserve::ldmatrix_x4(qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], qrow + kk * 16);
        }
    }
    // Positions of this thread's fragment rows gid (a) and gid + 8 (b); -1 past `items`.
    const int pos_a = gid < items ? pos0 + gid / group : -1;
    const int pos_b = gid + 8 < items ? pos0 + (gid + 8) / group : -1;

    const float scale_log2 = scale * k_scale * kDecodeLog2e;
    float m_a = tpserve::neg_inf(), m_b = tpserve::neg_inf();  // running max of raw S
    float l_a = 0.0f, l_b = 0.0f;  // this thread's share of the running sums
    float o[kOTiles][4];
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            o[n][c] = 0.0f;
        }
    }
    // ldmatrix row offsets (attention_mma.cu's): K read non-transposed as the B operand of
    // Q K^T (matrices: keys +0 / dims +0, keys +0 / dims +8, keys +8 / dims +0, keys +8 /
    // dims +8), V read transposed as the B operand of P V (keys +0 / dims +0, keys +8 / dims +0,
    // keys +0 / dims +8, keys +8 / dims +8).
    const int k_off = (((lane >> 4) << 3) + (lane & 7)) * kStride + ((lane >> 3) & 1) * 8;
    const int v_off = ((((lane >> 3) & 1) << 3) + (lane & 7)) * kStride + (lane >> 4) * 8;

    for (int i = 0; i < chunks; ++i) {
        // The stage chunk i + STAGES - 1 lands in was read by chunk i - 1, which every lane
        // finished before the __syncwarp that ended it.
        prefetch(i + STAGES - 1);
        tpserve::cp_async_wait<STAGES - 1>();
        const int stage = i % STAGES;
        if constexpr (kConverted) {
            // Each lane converts the pieces it copied itself.
#pragma unroll
            for (int kv = 0; kv < 2; ++kv) {
                const unsigned char* src = raw_chunk(stage, kv);
                T* dst = t_chunk(stage, kv);
#pragma unroll
                for (int u = 0; u < kLaneCopies; ++u) {
                    const int idx = lane + 32 * u;
                    const int j = idx / kRowCopies;
                    const int c = idx - j * kRowCopies;
                    const uint4 raw = *reinterpret_cast<const uint4*>(src + j * HD + c * 16);
                    uint4* d = reinterpret_cast<uint4*>(dst + j * kStride + c * 16);
                    d[0] = Kv::to_act(make_uint2(raw.x, raw.y));
                    d[1] = Kv::to_act(make_uint2(raw.z, raw.w));
                }
            }
        }
        __syncwarp();  // every lane's copies (or conversions) of this chunk are visible
        const T* k_s = t_chunk(stage, 0);
        const T* v_s = t_chunk(stage, 1);
        const int chunk = first + i * kChunkStride;

        // S: 16 items x 16 keys, n-tile j = keys chunk + [8 j, 8 j + 8).
        float s[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                s[j][c] = 0.0f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
            unsigned b0, b1, b2, b3;
            tpserve::ldmatrix_x4(b0, b1, b2, b3, k_s + k_off + kk * 16);
            Mma<T>::run(s[0], qa[kk], b0, b1);
            Mma<T>::run(s[1], qa[kk], b2, b3);
        }
        // C element c of n-tile j: row (c < 2 ? a : b), key chunk + 8 j + 2 tig + (c & 1).
        // Keys past the split's end or a row's position are masked (only the last chunks).
        if (chunk + kDecodeKeys > key_end || chunk + kDecodeKeys > pos0 + 1) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int key = chunk + 8 * j + 2 * tig + (c & 1);
                    const int pos = c < 2 ? pos_a : pos_b;
                    if (key >= key_end || key > pos) {
                        s[j][c] = tpserve::neg_inf();
                    }
                }
            }
        }
        float max_a = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float max_b = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        // A row's keys are spread over the 4 lanes of its group (same gid).
        max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 1));
        max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 2));
        max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 1));
        max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 2));
        const float new_a = fmaxf(m_a, max_a);
        const float new_b = fmaxf(m_b, max_b);
        // A row that has seen no key yet keeps max -inf: subtract 0 instead, so that its masked
        // entries give exp2(-inf) = 0 rather than NaN.
        const float sub_a = (new_a == tpserve::neg_inf() ? 0.0f : new_a) * scale_log2;
        const float sub_b = (new_b == tpserve::neg_inf() ? 0.0f : new_b) * scale_log2;
        // 0 while m_a is -inf:
        const float corr_a = tpserve::fast_exp2(fmaf(m_a, scale_log2, -sub_a));
        const float corr_b = tpserve::fast_exp2(fmaf(m_b, scale_log2, -sub_b));
        m_a = new_a;
        m_b = new_b;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            s[j][0] = tpserve::fast_exp2(fmaf(s[j][0], scale_log2, -sub_a));
            s[j][1] = tpserve::fast_exp2(fmaf(s[j][1], scale_log2, -sub_a));
            s[j][2] = tpserve::fast_exp2(fmaf(s[j][2], scale_log2, -sub_b));
            s[j][3] = tpserve::fast_exp2(fmaf(s[j][3], scale_log2, -sub_b));
        }
        l_a = l_a * corr_a + (s[0][0] + s[0][1] + s[1][0] + s[1][1]);
        l_b = l_b * corr_b + (s[0][2] + s[0][3] + s[1][2] + s[1][3]);
        // P as the A fragment of the one k-step of 16 keys: the C fragments of S n-tiles 0
        // and 1 (attention_mma.cu).
        unsigned pa[4];
        pa[0] = Mma<T>::pack(s[0][0], s[0][1]);
        pa[1] = Mma<T>::pack(s[0][2], s[0][3]);
        pa[2] = Mma<T>::pack(s[1][0], s[1][1]);
        pa[3] = Mma<T>::pack(s[1][2], s[1][3]);
#pragma unroll
        for (int nn = 0; nn < kOTiles / 2; ++nn) {
            unsigned b0, b1, b2, b3;
            tpserve::ldmatrix_x4_trans(b0, b1, b2, b3, v_s + v_off + nn * 16);
            o[2 * nn][0] *= corr_a;
            o[2 * nn][1] *= corr_a;
            o[2 * nn][2] *= corr_b;
            o[2 * nn][3] *= corr_b;
            o[2 * nn + 1][0] *= corr_a;
            o[2 * nn + 1][1] *= corr_a;
            o[2 * nn + 1][2] *= corr_b;
            o[2 * nn + 1][3] *= corr_b;
            Mma<T>::run(o[2 * nn], pa, b0, b1);
            Mma<T>::run(o[2 * nn + 1], pa, b2, b3);
        }
        __syncwarp();  // every lane is done reading this chunk's stage
    }
    tpserve::cp_async_wait<0>();

    // The warps' partial results into shared memory (over the stages: every warp must be past
    // its loop first), then one thread per (item, element) merges them.
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    __syncthreads();
    float* const acc_s = reinterpret_cast<float*>(base);  // [warp][item][HD]
    float* const ml_s = acc_s + kDecodeWarps * kDecodeItems * HD;  // [warp][item][2]
    {
        float* acc_a = acc_s + (warp * kDecodeItems + gid) * HD + 2 * tig;
        float* acc_b = acc_a + 8 * HD;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
            *reinterpret_cast<float2*>(acc_a + 8 * n) = make_float2(o[n][0], o[n][1]);
            *reinterpret_cast<float2*>(acc_b + 8 * n) = make_float2(o[n][2], o[n][3]);
        }
        if (tig == 0) {
            float* ml = ml_s + (warp * kDecodeItems + gid) * 2;
            ml[0] = m_a;
            ml[1] = l_a;
            ml[16] = m_b;  // item gid + 8
            ml[17] = l_b;
        }
    }
    __syncthreads();
    for (int idx = tid; idx < items * HD; idx += blockDim.x) {
        const int item = idx / HD;
        const int d = idx - item * HD;
        float m_max = tpserve::neg_inf();
#pragma unroll
        for (int w = 0; w < kDecodeWarps; ++w) {
            m_max = fmaxf(m_max, ml_s[(w * kDecodeItems + item) * 2]);
        }
        float num = 0.0f;
        float den = 0.0f;
        if (m_max != tpserve::neg_inf()) {
#pragma unroll
            for (int w = 0; w < kDecodeWarps; ++w) {
                const float* ml = ml_s + (w * kDecodeItems + item) * 2;
                // A warp that saw no key has max -inf and sum 0: weight 0.
                const float weight = tpserve::fast_exp2((ml[0] - m_max) * scale_log2);
                num += weight * acc_s[(w * kDecodeItems + item) * HD + d];
                den += weight * ml[1];
            }
        }
        const long long row = row0 + item / group;
        const long long head = kv_head * group + item % group;
        if (num_splits == 1) {
            out[(row * num_q_heads + head) * HD + d] =
                tpserve::from_float<T>(den > 0.0f ? num / den * v_scale : 0.0f);
        } else {
            // attention_combine weighs splits by exp(max): the max of the scaled scores.
            const long long at = (row * num_q_heads + head) * num_splits + split;
            partial_out[at * HD + d] = num * v_scale;
            if (d == 0) {
                partial_ml[at * 2] =
                    m_max == tpserve::neg_inf() ? m_max : m_max * scale * k_scale;
                partial_ml[at * 2 + 1] = den;
            }
        }
    }
}

// The stages the worker launches: 2 chunks a warp, 3 blocks an SM at HD 128. On an H200
// (tests/gpu/decode_attention_bench.cu) 2 stages beat 3 at 256 rows of 1,024 keys (274 against
// 283 us a layer) and with an FP8 cache, 3 beat 2 at 64 rows (79 against 87 us), 4 never won.
constexpr int kDecodeMmaStages = 2;

#define TPSERVE_DECODE_MMA_ENTRY(HD, SUFFIX, T, KV, C)                                        \
    extern "C" __global__ void __launch_bounds__(32 * kDecodeWarps)                          \
        paged_attention_decode_mma_hd##HD##KV##_##SUFFIX(                                    \
            T* __restrict__ out, float* __restrict__ partial_out,                            \
            float* __restrict__ partial_ml, const T* __restrict__ q,                         \
            const C* __restrict__ key_cache, const C* __restrict__ value_cache,              \
            const int* __restrict__ block_tables, const int* __restrict__ tiles,             \
            int num_q_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,       \
            int q_stride, int num_splits, int split_len, float scale, float k_scale,         \
            float v_scale) {                                                                 \
        paged_attention_decode_mma_impl<T, C, HD, kDecodeMmaStages>(                         \
            out, partial_out, partial_ml, q, key_cache, value_cache, block_tables, tiles,     \
            num_q_heads, num_kv_heads, block_size, max_blocks_per_seq, q_stride, num_splits,  \
            split_len, scale, k_scale, v_scale);                                             \
    }
#define TPSERVE_DECODE_MMA_CACHE(SUFFIX, T, KV, C)        \
    TPSERVE_DECODE_MMA_ENTRY(64, SUFFIX, T, KV, C)        \
    TPSERVE_DECODE_MMA_ENTRY(128, SUFFIX, T, KV, C)
#define TPSERVE_DECODE_MMA(SUFFIX, T) \
    TPSERVE_FOR_EACH_KV_CACHE(TPSERVE_DECODE_MMA_CACHE, SUFFIX, T)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_DECODE_MMA)
