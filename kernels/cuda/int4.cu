// Linear layers with 4-bit integer weights in groups (W4A16: AWQ and GPTQ checkpoints, issue 12),
// repacked at load (worker/src/cuda/int4.rs) into the layout of an m16n8k16 mma's A fragments,
// with the inputs of a 64-input tile ordered so that each lane's B fragments (x) are two
// 16-byte loads:
//   w       u32 [n_out / 16, k / 64, 32, 4]: for rows 16 rb .. 16 rb + 16 and tile kt (inputs
//           64 kt .. 64 kt + 64), lane l = 4 g + t holds word s for the k16 step s: value p
//           (bits 4 p .. 4 p + 4, p = 0..3) is A element 2 p and value p + 4 element 2 p + 1,
//           where A elements 0, 1 are (row g, mma inputs 2 t + 0, 1), 2, 3 (row g + 8, the
//           same), 4, 5 (row g, mma inputs 2 t + 8 + 0, 1), 6, 7 (row g + 8, those): the 4-bit
//           values, 0..15. The mma inputs 2 t + {0, 1, 8, 9} of step s are the weight's inputs
//           c + {0, 1, 2, 3}, c = 64 kt + 16 S (s / S) + 4 S t + 4 (s % S), where S (steps a
//           chunk: 4 when group_size is a multiple of 64, else 2) keeps every chunk of 16 S
//           inputs inside one group. So lane (g, t) reads x[g] at 64 kt + 4 S t (8 inputs) and
//           at 64 kt + 4 S t + (S == 4 ? 8 : 32), and step s's B fragment is words 2 s, 2 s + 1
//           of those 16 inputs (input_of below).
//   params  u32 [n_out / 16, k / group_size, 8, 2]: an f16 pair for row 16 rb + r of group j
//           at (rb, j, r % 8, r / 8), the low half the group's scale, the high half its zero
//           point (an integer, exact in f16): lane (g, t) loads rows g and g + 8 of a group as
//           one 8-byte word, and a warp's parameters of one group are 64 contiguous bytes
// Element (n, k) of the weight is (q - zero) * scale of its row n and group k / group_size.
// Requires n_out a multiple of 16, k a multiple of 64 (of 64 * k_split), group_size a power of
// two from 32 (or k itself: one group a row), given as group_shift = log2(group_size) (31 for
// one group: every input lies in group 0).
#include "common.cuh"

namespace {

using tpserve::load_streaming;

// A group's (scale, zero point).
__device__ __forceinline__ float2 group_params(unsigned int p) {
    return __half22float2(*reinterpret_cast<__half2*>(&p));
}

// Pairs of 4-bit values as T: `(v & 0x000f000f) | kMagic` is the pair (M + q_lo, M + q_hi),
// exactly, with M = 128 (bf16, 7 mantissa bits) or 1024 (f16); subtracting the pair (M + zero)
// leaves q - zero, exactly.
// (v >> shift) & 0x000f000f | magic in one instruction (lop3's (a & b) | c).
__device__ __forceinline__ unsigned int nibble_pair(unsigned int v, unsigned int magic) {
    unsigned int r;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(r) : "r"(v), "r"(0x000f000fu), "r"(magic));
    return r;
}

template <typename T> struct W4Pair;
template <> struct W4Pair<__nv_bfloat16> {
    static constexpr unsigned int kMagic = 0x43004300u;
    static __device__ __forceinline__ unsigned int offset(float zero) {
        const __nv_bfloat162 v = __float2bfloat162_rn(128.0f + zero);
        return *reinterpret_cast<const unsigned int*>(&v);
    }
    static __device__ __forceinline__ unsigned int sub(unsigned int a, unsigned int b) {
        const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                         *reinterpret_cast<const __nv_bfloat162*>(&b));
        return *reinterpret_cast<const unsigned int*>(&r);
    }
};
template <> struct W4Pair<__half> {
    static constexpr unsigned int kMagic = 0x64006400u;
    static __device__ __forceinline__ unsigned int offset(float zero) {
        const __half2 v = __float2half2_rn(1024.0f + zero);
        return *reinterpret_cast<const unsigned int*>(&v);
    }
    static __device__ __forceinline__ unsigned int sub(unsigned int a, unsigned int b) {
        const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a),
                                  *reinterpret_cast<const __half2*>(&b));
        return *reinterpret_cast<const unsigned int*>(&r);
    }
};

// Step `s`'s A fragment from its word `v` of a tile: each 4-bit pair as (q - zero) in T, rows g
// (offset zero_a) and g + 8 (zero_b).
template <typename T>
__device__ __forceinline__ void step_fragment(unsigned int v, unsigned int zero_a,
                                              unsigned int zero_b, unsigned int (&a)[4]) {
    using Pair = W4Pair<T>;
    a[0] = Pair::sub(nibble_pair(v, Pair::kMagic), zero_a);
    a[1] = Pair::sub(nibble_pair(v >> 4, Pair::kMagic), zero_b);
    a[2] = Pair::sub(nibble_pair(v >> 8, Pair::kMagic), zero_a);
    a[3] = Pair::sub(nibble_pair(v >> 12, Pair::kMagic), zero_b);
}

// A chunk's sums (an mma C fragment) scaled into the totals: elements 0, 1 by row g's group
// scale, 2, 3 by row g + 8's; the chunk's sums restart at zero.
__device__ __forceinline__ void add_scaled(float (&total)[4], float (&acc)[4], float scale_a,
                                           float scale_b) {
    total[0] = fmaf(scale_a, acc[0], total[0]);
    total[1] = fmaf(scale_a, acc[1], total[1]);
    total[2] = fmaf(scale_b, acc[2], total[2]);
    total[3] = fmaf(scale_b, acc[3], total[3]);
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
}

constexpr int kMaxSplit = 16;  // warps per block (one per part of K), at most

// A chunk's products: steps s0 .. s0 + kSteps - 1 of a tile (its A words, x's B fragments `xw`)
// with the group parameters `p` of rows g and g + 8, scaled into `total`.
template <typename T, int kSteps>
__device__ __forceinline__ void chunk_products(float (&total)[4], const unsigned int (&words)[4],
                                               const unsigned int (&xw)[8], uint2 p, int s0) {
    using Pair = W4Pair<T>;
    const float2 pa = group_params(p.x);
    const float2 pb = group_params(p.y);
    const unsigned int zero_a = Pair::offset(pa.y);
    const unsigned int zero_b = Pair::offset(pb.y);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = s0; s < s0 + kSteps; ++s) {
        unsigned int a[4];
        step_fragment<T>(words[s], zero_a, zero_b, a);
        tpserve::Mma<T>::run(acc, a, xw[2 * s], xw[2 * s + 1]);
    }
    add_scaled(total, acc, pa.x, pb.x);
}

// Each warp's totals (a C fragment: elements 0, 1 are row g, columns 2 t, 2 t + 1; 2, 3 row
// g + 8) into its `partial`, then the block's barrier: true for the first warp, which adds them.
__device__ __forceinline__ bool stage_parts(float (&partial)[kMaxSplit][16][8],
                                            const float (&total)[4]) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    partial[warp][g][2 * t] = total[0];
    partial[warp][g][2 * t + 1] = total[1];
    partial[warp][g + 8][2 * t] = total[2];
    partial[warp][g + 8][2 * t + 1] = total[3];
    __syncthreads();
    return warp == 0;
}

// The end of a GEMV block: the warps' totals staged (a column is a row m of x), then the first
// warp adds the parts in part order and writes y[m, n] (lane l: row l / 2 of row block rb,
// columns 4 (l % 2) ..), n < n_out. Gated (gemv_w4_gated): warps 0 .. k_split - 1 hold the gate
// rows' parts and warps k_split .. 2 k_split - 1 the matching up rows' (the same order of parts);
// both sides are added, rounded to T as the plain end would store them, and y gets silu(gate) *
// up as silu_mul rounds it (common.cuh's silu_mul_rounded), n_out being the halves' width.
template <typename T, bool kGated>
__device__ __forceinline__ void sum_parts(T* __restrict__ y, float (&partial)[kMaxSplit][16][8],
                                          const float (&total)[4], int rb, int rows,
                                          int n_out, int k_split) {
    if (!stage_parts(partial, total)) {
        return;
    }
    const int lane = threadIdx.x & 31;
    const int row = lane >> 1;
    const long long n = rb * 16 + row;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int m = 4 * (lane & 1) + c;
        float sum = 0.0f;
        float up = 0.0f;
        for (int p = 0; p < k_split; ++p) {
            sum += partial[p][row][m];
            if (kGated) {
                up += partial[k_split + p][row][m];
            }
        }
        if (m < rows) {
            y[(long long)m * n_out + n] =
                kGated ? tpserve::silu_mul_rounded<T>(tpserve::round_to<T>(sum),
                                                      tpserve::round_to<T>(up))
                       : tpserve::from_float<T>(sum);
        }
    }
}

// Tiles a lane has loading while it computes one: the most that 128 registers hold (16 warps an
// SM, k_split up to 16); tests/gpu/int4_gemv_bench.cu measured 2, 3, 4 and deeper rings.
constexpr int kInFlight = 4;

// The first weight input of step s's chunk for lane t (see the layout above): the step's mma
// inputs 2 t + {0, 1, 8, 9} are this + {0, 1, 2, 3}.
__device__ __forceinline__ int input_of(int kt, int s, int t, int steps_per_chunk) {
    return 64 * kt + 16 * steps_per_chunk * (s / steps_per_chunk) + 4 * steps_per_chunk * t +
           4 * (s % steps_per_chunk);
}

// One tile of a lane's loads: its A words, x's 16 inputs (B fragments of the 4 steps, zero for
// lanes past the rows), and the parameters of rows g and g + 8 for the tile's first and second
// halves (the second loaded only when groups are 32 inputs).
struct Tile {
    uint4 w;
    uint4 x0, x1;
    uint2 p0, p1;
};

// Tile `tile`'s weights (a lane's 16-byte load at `w`, the tile's own) and its group parameters
// (`params` at the lane's rows): the parameters' index comes from the tile's number in 32 bits,
// a group's 8 words a row block; two groups a tile when groups are 32 inputs (kTwoGroups), else
// 2^(group_shift - 6) tiles a group (one group a row: group_shift 31, every tile in group 0).
template <bool kTwoGroups>
__device__ __forceinline__ void load_tile_weights(Tile& t, const uint4* w, const uint2* params,
                                                  int tile, int group_shift) {
    t.w = load_streaming(w);
    if (kTwoGroups) {
        t.p0 = __ldg(params + 16 * tile);
        t.p1 = __ldg(params + 16 * tile + 8);
    } else {
        t.p0 = __ldg(params + 8 * (tile >> (group_shift - 6)));
    }
}

// One tile's products: its kChunks chunks (two when groups are 32 inputs, else one), each
// scaled into `total` in order.
template <typename T, int kChunks>
__device__ __forceinline__ void tile_products(float (&total)[4], const Tile& cur) {
    constexpr int kChunkSteps = 4 / kChunks;
    const unsigned int words[4] = {cur.w.x, cur.w.y, cur.w.z, cur.w.w};
    const unsigned int xw[8] = {cur.x0.x, cur.x0.y, cur.x0.z, cur.x0.w,
                                cur.x1.x, cur.x1.y, cur.x1.z, cur.x1.w};
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
        chunk_products<T, kChunkSteps>(total, words, xw, c == 1 ? cur.p1 : cur.p0,
                                       kChunkSteps * c);
    }
}

// Two tiles' products (one chunk each: groups of 64 inputs or more, parameters p0): their steps
// interleaved on two accumulators, then each scaled into `total` in tile order, first `ta`'s.
// Each chunk's sum starts from zero, so these are chunk_products' operations on each tile in the
// same order, and the same bits; what changes is that the two tiles' mma chains are independent
// (in one chain a tile's first step waits for the tile before's last, as its accumulator).
template <typename T>
__device__ __forceinline__ void pair_products(float (&total)[4], const Tile& ta, const Tile& tb) {
    using Pair = W4Pair<T>;
    const float2 pa_a = group_params(ta.p0.x), pb_a = group_params(ta.p0.y);
    const float2 pa_b = group_params(tb.p0.x), pb_b = group_params(tb.p0.y);
    const unsigned int za_a = Pair::offset(pa_a.y), zb_a = Pair::offset(pb_a.y);
    const unsigned int za_b = Pair::offset(pa_b.y), zb_b = Pair::offset(pb_b.y);
    const unsigned int wa[4] = {ta.w.x, ta.w.y, ta.w.z, ta.w.w};
    const unsigned int wb[4] = {tb.w.x, tb.w.y, tb.w.z, tb.w.w};
    const unsigned int xa[8] = {ta.x0.x, ta.x0.y, ta.x0.z, ta.x0.w,
                                ta.x1.x, ta.x1.y, ta.x1.z, ta.x1.w};
    const unsigned int xb[8] = {tb.x0.x, tb.x0.y, tb.x0.z, tb.x0.w,
                                tb.x1.x, tb.x1.y, tb.x1.z, tb.x1.w};
    float acc_a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float acc_b[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        unsigned int a[4], b[4];
        step_fragment<T>(wa[s], za_a, zb_a, a);
        step_fragment<T>(wb[s], za_b, zb_b, b);
        tpserve::Mma<T>::run(acc_a, a, xa[2 * s], xa[2 * s + 1]);
        tpserve::Mma<T>::run(acc_b, b, xb[2 * s], xb[2 * s + 1]);
    }
    add_scaled(total, acc_a, pa_a.x, pb_a.x);
    add_scaled(total, acc_b, pa_b.x, pb_b.x);
}

}  // namespace

// gemv_w4_{bf16,f16}: y[m, n] = sum_k x[m, k] * W[n, k] for m < rows (1 to 8) and n < n_out,
// W the 4-bit weight above: the products of decoding steps. A block owns 16 rows of W and has
// one warp for each of k_split equal parts of K; a warp walks its part one 64-input tile (a
// 16-byte load of weights and two of x a lane) at a time, with the next kInFlight tiles loading
// while it computes one. Each k16 step turns a word into the A fragment ((q - zero) in the
// dtype, exact: the value placed in the mantissa of 128 (bf16) or 1024 (f16) minus 128 + zero)
// and multiplies it with x's rows (the B fragment) by mma.sync with f32 accumulation; each
// group-aligned chunk's sums are scaled into the warp's totals. The parts sum in shared memory,
// in part order. The reduction order depends on K, group_size and k_split alone, not on the
// rows. The weights and parameters do not depend on earlier kernels: a warp's first tiles of
// them load before it waits for the previous kernel; x's after.
//
// Arguments:
//   y            T   [rows, n_out]  written
//   x            T   [rows, k]      read only (16-byte aligned)
//   w            u32 the layout above
//   params       u32 [n_out / 16, k / group_size, 8, 2]
//   rows         i32 1..=8
//   n_out        i32 a multiple of 16
//   k            i32 a multiple of 64 * k_split
//   group_shift  i32 log2(group_size), 5 or more; 31 for one group over all of k
//   k_split      i32 1, 2, 4, 8 or 16: warps of a block
// Launch: grid (n_out / 16, 1, 1); block (32 * k_split, 1, 1).
//
// warp_totals_w4 is one warp's share: part `part` of K for row block `rb`, into `total` (a C
// fragment); gemv_w4_impl gives warp w part w of block rb = blockIdx.x, and gemv_w4_gated's
// blocks hold a gate row block's warps and its up row block's. kPairs (gemv_w4_pairs and
// gemv_w4_gated_pairs; groups of 64 inputs or more): the tiles are computed two at a time by
// pair_products, the same sums in the same order (so the same bits), with two independent mma
// chains instead of one; the ring then holds kAhead + 2 tiles.
template <typename T, int kAhead, bool kTwoGroups, bool kPairs>
__device__ __forceinline__ void warp_totals_w4(float (&total)[4], const T* __restrict__ x,
                                               const uint4* __restrict__ w,
                                               const unsigned int* __restrict__ params, int rows,
                                               int k, int group_shift, int k_split, int rb,
                                               int part) {
    static_assert(!(kPairs && kTwoGroups), "pairs of tiles are for one chunk a tile");
    constexpr int kSlots = kAhead + (kPairs ? 2 : 1);
    // Chunks of 4 steps (a tile, one group) unless groups are 32 inputs: then 2 (half a tile).
    constexpr int kChunks = kTwoGroups ? 2 : 1;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int k_tiles = k / 64;
    const int part_tiles = k_tiles / k_split;
    const int kt0 = part * part_tiles;
    constexpr int x_second = kTwoGroups ? 32 : 8;
    const int groups = group_shift >= 31 ? 1 : k >> group_shift;
    const uint4* wp = w + ((long long)rb * k_tiles + kt0) * 32 + lane;
    const uint2* pp = reinterpret_cast<const uint2*>(params) + (long long)rb * groups * 8 + g;
    const T* xr = x + (long long)(g < rows ? g : 0) * k + 64 * kt0 + (kTwoGroups ? 8 : 16) * t;

    auto load_weights = [&](Tile& tile, int i) {
        load_tile_weights<kTwoGroups>(tile, wp + i * 32, pp, kt0 + i, group_shift);
    };
    // Lanes past the rows read row 0 again: their columns of the product are not written.
    auto load_x = [&](Tile& tile, int i) {
        tile.x0 = __ldg(reinterpret_cast<const uint4*>(xr + 64 * i));
        tile.x1 = __ldg(reinterpret_cast<const uint4*>(xr + 64 * i + x_second));
    };

    // Tile i lives in slot i % kSlots: it loads kAhead tiles before it is computed, into the
    // slot of tile i - 1 (kPairs: of the pair computed last).
    Tile slot[kSlots];
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
        if (u < part_tiles) {
            load_weights(slot[u], u);
        }
    }
    tpserve::wait_for_inputs_after_loads();
#pragma unroll
    for (int u = 0; u < kAhead; ++u) {
        if (u < part_tiles) {
            load_x(slot[u], u);
        }
    }
    if constexpr (kPairs) {
        for (int i = 0; i < part_tiles; i += kSlots) {
#pragma unroll
            for (int u = 0; u < kSlots; u += 2) {
                if (i + u >= part_tiles) {
                    break;
                }
#pragma unroll
                for (int v = 0; v < 2; ++v) {
                    if (i + u + v + kAhead < part_tiles) {
                        load_weights(slot[(u + v + kAhead) % kSlots], i + u + v + kAhead);
                        load_x(slot[(u + v + kAhead) % kSlots], i + u + v + kAhead);
                    }
                }
                if (i + u + 1 < part_tiles) {
                    pair_products<T>(total, slot[u], slot[u + 1]);
                } else {
                    tile_products<T, 1>(total, slot[u]);
                }
            }
        }
    } else {
        for (int i = 0; i < part_tiles; i += kSlots) {
#pragma unroll
            for (int u = 0; u < kSlots; ++u) {
                if (i + u >= part_tiles) {
                    break;
                }
                if (i + u + kAhead < part_tiles) {
                    load_weights(slot[(u + kAhead) % kSlots], i + u + kAhead);
                    load_x(slot[(u + kAhead) % kSlots], i + u + kAhead);
                }
                tile_products<T, kChunks>(total, slot[u]);
            }
        }
    }
}

// gemv_w4_impl's block: warp w walks part w of K for row block rb = blockIdx.x. Gated
// (gemv_w4_gated below): the first k_split warps walk gate row block rb, the others the up row
// block n_out / 16 + rb (n_out the halves' width), and the block's end writes silu(gate) * up.
template <typename T, int kAhead, bool kTwoGroups, bool kGated, bool kPairs>
__device__ void gemv_w4_impl(T* __restrict__ y, const T* __restrict__ x,
                             const uint4* __restrict__ w, const unsigned int* __restrict__ params,
                             int rows, int n_out, int k, int group_shift, int k_split,
                             float (&partial)[kMaxSplit][16][8]) {
    const int warp = threadIdx.x >> 5;
    const bool up = kGated && warp >= k_split;
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    warp_totals_w4<T, kAhead, kTwoGroups, kPairs>(total, x, w, params, rows, k, group_shift,
                                                  k_split, blockIdx.x + (up ? n_out / 16 : 0),
                                                  up ? warp - k_split : warp);
    sum_parts<T, kGated>(y, partial, total, blockIdx.x, rows, n_out, k_split);
}

// gemv_w4_impl for the group size: two groups a tile (32 inputs), or one group over one or more
// tiles. The arithmetic is the same; a kernel that took either at run time spent ~25 of its
// ~100 instructions a tile on the other's parameters (their addresses, a second conversion and
// a second scaled add, sm_90 code): built for its size, a 64-input tile takes ~76 (session 31).
//
// gemv_w4_gated_{bf16,f16} (kGated): act[m, n] = silu(gate[m, n]) * up[m, n] for n < d, where
// gate and up are gemv_w4's product of a fused gate and up weight (rows 0 .. d the gate, d ..
// 2 d the up projection), each rounded to T: the bits of gemv_w4 at the same k_split followed
// by silu_mul, in one launch, for 1 to 8 rows. Arguments as gemv_w4's, with act T [rows, d] for
// y, d (a multiple of 16) for n_out, and k_split at most kMaxSplit / 2.
// Launch: grid (d / 16, 1, 1); block (64 * k_split, 1, 1).
//
// gemv_w4_pairs_{bf16,f16} and gemv_w4_gated_pairs_{bf16,f16} (kPairs): the same, with a
// warp's tiles computed two at a time (warp_totals_w4's kPairs) where groups are 64 inputs or
// more; the same bits. The worker runs them with TPSERVE_CUDA_W4_PAIRS=1 (prepared in session
// 51 without a GPU; docs/PERFORMANCE.md).
template <typename T, int kAhead, bool kGated = false, bool kPairs = false>
__device__ void gemv_w4(T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ w,
                        const unsigned int* __restrict__ params, int rows, int n_out, int k,
                        int group_shift, int k_split) {
    __shared__ float partial[kMaxSplit][16][8];  // each warp's sums, for the first to add up
    if (group_shift < 6) {
        gemv_w4_impl<T, kAhead, true, kGated, false>(y, x, w, params, rows, n_out, k,
                                                     group_shift, k_split, partial);
    } else {
        gemv_w4_impl<T, kAhead, false, kGated, kPairs>(y, x, w, params, rows, n_out, k,
                                                       group_shift, k_split, partial);
    }
}

// gemm_w4_n{16,32,64}_{bf16,f16}: the same product for 9 to 64 rows of x (decoding batches;
// more rows run in chunks of 64, grid.z), with the same reduction order as gemv_w4 at the same
// k_split, so a row's result is the same bits as in a batch of 1 to 8 rows. A block has
// kGemmWarps warps, each owning one row block (16 rows of W); they walk the same part of K
// (k_split parts, grid.y) one 64-input tile at a time and share x's tile, which the block copies
// into shared memory (cp.async, kGemmStages tiles ahead); each warp's weights load kInFlight
// tiles ahead into registers, as gemv_w4's (six at 16 rows). Each k16 step's A fragment is dequantized once and
// multiplied with every 8-row n-tile of x (NT of them: 8 NT rows a launch chunk). With k_split
// > 1 each block writes its part's sums (f32) to `partials`, and the last block of a column
// block to finish (a counter per column block and chunk, which it resets) sums the parts in part
// order and writes y.
//
// Arguments:
//   y            T   [rows, n_out]  written
//   x            T   [rows, k]      read only (16-byte aligned)
//   w, params    as gemv_w4's
//   partials     f32 [chunks, k_split, 64, n_out] (k_split > 1; any address otherwise)
//   counters     u32 [chunks, ceil(n_out / (16 kGemmWarps))], zero before the first launch;
//                every launch leaves them zero
//   rows         i32 at least 1
//   n_out, k, group_shift, k_split  as gemv_w4's
// Launch: grid (ceil(n_out / (16 kGemmWarps)), k_split, ceil(rows / 64)); block (32 kGemmWarps).
constexpr int kGemmWarps = 8;
constexpr int kGemmStages = 4;
constexpr int kGemmChunk = 64;  // rows of x a launch chunk: the largest NT is 8
constexpr int kGemmPitch = 72;  // elements a row of a staged x tile (64, padded: no conflicts)

template <typename T, int NT, bool kTwoGroups>
__device__ void gemm_w4_impl(T* __restrict__ y, const T* __restrict__ x,
                             const uint4* __restrict__ w, const unsigned int* __restrict__ params,
                             float* __restrict__ partials, unsigned int* __restrict__ counters,
                             int rows, int n_out, int k, int group_shift, int k_split,
                             T (&xs)[kGemmStages][8 * NT][kGemmPitch], bool& last_block) {
    using Pair = W4Pair<T>;
    // Tiles of weights in flight: six where the registers allow it (16 rows: 8% faster than
    // four for Llama-3-8B's gate_up on an H200), else gemv_w4's four (six spill at 64 rows).
    // Built beside the other group size's instance (gemm_w4), the 32- and 64-row kernels spill
    // a few registers (ptxas -v, sm_90a: 84 bytes at 64 rows; the instance for groups of 64 and
    // more alone spills none), and that instance still runs 3-15% faster than the kernel that
    // took the group size at run time (docs/PERFORMANCE.md, session 31).
    constexpr int kAhead = NT <= 2 ? 6 : kInFlight;
    constexpr int kSlots = kAhead + 1;
    constexpr int kRows = 8 * NT;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int rb = blockIdx.x * kGemmWarps + warp;
    const bool active = rb < n_out / 16;
    const int part = blockIdx.y;
    const int chunk = blockIdx.z;
    const int m0 = chunk * kGemmChunk;
    const int chunk_rows = min(kRows, rows - m0);
    const int k_tiles = k / 64;
    const int part_tiles = k_tiles / k_split;
    const int kt0 = part * part_tiles;
    const int groups = group_shift >= 31 ? 1 : k >> group_shift;
    const uint4* wp = w + ((long long)(active ? rb : 0) * k_tiles + kt0) * 32 + lane;
    const uint2* pp =
        reinterpret_cast<const uint2*>(params) + (long long)(active ? rb : 0) * groups * 8 + g;

    auto load_weights = [&](Tile& tile, int i) {
        load_tile_weights<kTwoGroups>(tile, wp + i * 32, pp, kt0 + i, group_shift);
    };
    // Tile i of x (rows m0.., inputs of tile kt0 + i) into stage `stage`: 16-byte pieces, rows
    // past the chunk's zero.
    auto stage_x = [&](int stage, int i) {
        for (int piece = threadIdx.x; piece < kRows * 8; piece += 32 * kGemmWarps) {
            const int r = piece >> 3;
            const int c = (piece & 7) * 8;
            const bool valid = r < chunk_rows;
            const T* src = x + (long long)(m0 + (valid ? r : 0)) * k + 64 * (kt0 + i) + c;
            tpserve::cp_async_16(&xs[stage][r][c], src, valid);
        }
    };

    Tile slot[kSlots];
    if (active) {
#pragma unroll
        for (int u = 0; u < kAhead; ++u) {
            if (u < part_tiles) {
                load_weights(slot[u], u);
            }
        }
    }
    tpserve::wait_for_inputs();
#pragma unroll
    for (int u = 0; u < kGemmStages - 1; ++u) {
        if (u < part_tiles) {
            stage_x(u, u);
        }
        tpserve::cp_async_commit();
    }
    float total[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        total[j][0] = total[j][1] = total[j][2] = total[j][3] = 0.0f;
    }
    // Lane (g, t)'s 16 inputs of a tile: 4 S t on, and 8 inputs at `x_second` on (gemv_w4's).
    const int x_first = (kTwoGroups ? 8 : 16) * t;
    const int x_second = x_first + (kTwoGroups ? 32 : 8);
    for (int i = 0; i < part_tiles; i += kSlots) {
#pragma unroll
        for (int u = 0; u < kSlots; ++u) {
            const int tile = i + u;
            if (tile >= part_tiles) {
                break;
            }
            // Tile `tile`'s x is in; every warp is done with the stage the next copy refills.
            tpserve::cp_async_wait<kGemmStages - 2>();
            __syncthreads();
            if (tile + kGemmStages - 1 < part_tiles) {
                stage_x((tile + kGemmStages - 1) % kGemmStages, tile + kGemmStages - 1);
            }
            tpserve::cp_async_commit();
            if (!active) {
                continue;
            }
            if (tile + kAhead < part_tiles) {
                load_weights(slot[(u + kAhead) % kSlots], tile + kAhead);
            }
            const Tile& cur = slot[u];
            const unsigned int words[4] = {cur.w.x, cur.w.y, cur.w.z, cur.w.w};
            // Each step's A fragment, once for every n-tile; a chunk's parameters once (gemv_w4's
            // chunks: the tile, or each half of it when groups are 32 inputs).
            constexpr int kChunks = kTwoGroups ? 2 : 1;
            unsigned int a[4][4];
            float2 scale[kChunks];
#pragma unroll
            for (int c = 0; c < kChunks; ++c) {
                const uint2 p = c == 1 ? cur.p1 : cur.p0;
                const float2 pa = group_params(p.x);
                const float2 pb = group_params(p.y);
                scale[c] = make_float2(pa.x, pb.x);
                const unsigned int zero_a = Pair::offset(pa.y);
                const unsigned int zero_b = Pair::offset(pb.y);
#pragma unroll
                for (int s = 4 / kChunks * c; s < 4 / kChunks * (c + 1); ++s) {
                    step_fragment<T>(words[s], zero_a, zero_b, a[s]);
                }
            }
            const int stage = tile % kGemmStages;
#pragma unroll
            for (int j = 0; j < NT; ++j) {
                const T* xrow = &xs[stage][8 * j + g][0];
                const uint4 x0 = *reinterpret_cast<const uint4*>(xrow + x_first);
                const uint4 x1 = *reinterpret_cast<const uint4*>(xrow + x_second);
                const unsigned int xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    tpserve::Mma<T>::run(acc, a[s], xw[2 * s], xw[2 * s + 1]);
                    // As gemv_w4: a chunk ends after step 1 with groups of 32, else after 3.
                    if (s == 3 || (s == 1 && kTwoGroups)) {
                        const float2 sc = scale[s == 3 ? kChunks - 1 : 0];
                        add_scaled(total[j], acc, sc.x, sc.y);
                    }
                }
            }
        }
    }
    tpserve::cp_async_wait<0>();
    // C fragment: elements 0, 1 are (row g, n-tile columns 2 t, 2 t + 1), 2, 3 (row g + 8).
    const long long n_base = (long long)rb * 16 + g;
    if (k_split == 1) {
        if (active) {
#pragma unroll
            for (int j = 0; j < NT; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int m = 8 * j + 2 * t + (e & 1);
                    if (m < chunk_rows) {
                        // 0 + the part's sum, as gemv_w4's sum over its parts.
                        y[(long long)(m0 + m) * n_out + n_base + 8 * (e >> 1)] =
                            tpserve::from_float<T>(0.0f + total[j][e]);
                    }
                }
            }
        }
        return;
    }
    float* chunk_partials = partials + (long long)chunk * k_split * kGemmChunk * n_out;
    if (active) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = 8 * j + 2 * t + (e & 1);
                if (m < chunk_rows) {
                    chunk_partials[((long long)part * kGemmChunk + m) * n_out + n_base +
                                   8 * (e >> 1)] = total[j][e];
                }
            }
        }
    }
    __threadfence();
    __syncthreads();
    unsigned int* counter = counters + (long long)chunk * gridDim.x + blockIdx.x;
    if (threadIdx.x == 0) {
        last_block = atomicAdd(counter, 1u) == (unsigned int)k_split - 1;
    }
    __syncthreads();
    if (!last_block) {
        return;
    }
    __threadfence();
    // The last block: the parts' sums in part order, for its 16 kGemmWarps columns.
    const int n_first = blockIdx.x * kGemmWarps * 16;
    const int columns = min(kGemmWarps * 16, n_out - n_first);
    for (int i = threadIdx.x; i < chunk_rows * columns; i += 32 * kGemmWarps) {
        const int m = i / columns;
        const long long n = n_first + i % columns;
        float sum = 0.0f;
        for (int p = 0; p < k_split; ++p) {
            sum += __ldcg(chunk_partials + ((long long)p * kGemmChunk + m) * n_out + n);
        }
        y[(long long)(m0 + m) * n_out + n] = tpserve::from_float<T>(sum);
    }
    if (threadIdx.x == 0) {
        *counter = 0u;
    }
}

// gemm_w4_impl for the group size, as gemv_w4 (the same sums either way).
template <typename T, int NT>
__device__ void gemm_w4(T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ w,
                        const unsigned int* __restrict__ params, float* __restrict__ partials,
                        unsigned int* __restrict__ counters, int rows, int n_out, int k,
                        int group_shift, int k_split) {
    __shared__ __align__(16) T xs[kGemmStages][8 * NT][kGemmPitch];  // x's staged tiles
    __shared__ bool last_block;
    if (group_shift < 6) {
        gemm_w4_impl<T, NT, true>(y, x, w, params, partials, counters, rows, n_out, k,
                                  group_shift, k_split, xs, last_block);
    } else {
        gemm_w4_impl<T, NT, false>(y, x, w, params, partials, counters, rows, n_out, k,
                                   group_shift, k_split, xs, last_block);
    }
}

// dequantize_w4_{bf16,f16}: out[n, k] = (q - zero) * scale rounded to T, the whole weight, for
// the products of more than 8 rows (which then run cuBLAS on `out`). One thread per word of w
// (8 values: 4 pairs of adjacent inputs, 4-byte stores), grid-stride.
//
// Arguments:
//   out          T   [n_out, k]  written
//   w            u32 the layout above
//   params       u32 [n_out / 16, k / group_size, 8, 2]
//   n_out, k, group_shift  i32 (as gemv_w4's)
// Launch: any grid of blocks of 256 threads (the host uses min(words / 256, 132 * 8) blocks).
template <typename T>
__device__ void dequantize_w4_impl(T* __restrict__ out, const unsigned int* __restrict__ w,
                                   const unsigned int* __restrict__ params, int n_out, int k,
                                   int group_shift) {
    // `out` may be what the product before read.
    tpserve::wait_for_inputs();
    const int k_tiles = k / 64;
    const long long total = (long long)n_out / 16 * k_tiles * 128;
    const int steps_per_chunk = group_shift >= 6 ? 4 : 2;
    const int groups = group_shift >= 31 ? 1 : k >> group_shift;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int s = (int)(i & 3);
        const int lane = (int)((i >> 2) & 31);
        const long long tile = i >> 7;
        const long long rb = tile / k_tiles;
        const int kt = (int)(tile - rb * k_tiles);
        const int g = lane >> 2;
        const int t = lane & 3;
        const unsigned int v = w[i];
        const int first = input_of(kt, s, t, steps_per_chunk);
        // The word's inputs lie in one group (chunks lie in groups).
        const int group = first >> group_shift;
        // Pair p: A elements 2 p, 2 p + 1 (values p and p + 4): row g + 8 (p % 2), inputs
        // first + 2 (p / 2) + {0, 1}.
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const int r = g + 8 * (p & 1);
            const long long n = rb * 16 + r;
            const int kk = first + 2 * (p >> 1);
            const float2 sz = group_params(params[((rb * groups + group) * 8 + g) * 2 + (p & 1)]);
            const float lo = (float)((v >> (4 * p)) & 0xfu);
            const float hi = (float)((v >> (4 * p + 16)) & 0xfu);
            T pair[2] = {tpserve::from_float<T>((lo - sz.y) * sz.x),
                         tpserve::from_float<T>((hi - sz.y) * sz.x)};
            *reinterpret_cast<unsigned int*>(out + n * k + kk) =
                *reinterpret_cast<const unsigned int*>(pair);
        }
    }
}

// gather_inputs_{bf16,f16}: out[m, i] = x[m, perm[i]]: GPTQ act-order's inputs in the order of a
// weight's layout (inputs sorted by group), for gemv_w4 or for cuBLAS on dequantize_w4's output
// (which keeps that order). One element a thread; the permutation, which no kernel writes, is
// read before waiting for the kernel that writes x.
//
// Arguments:
//   out   T   [rows, k]  written
//   x     T   [rows, k]
//   perm  i32 [k]        a permutation of 0..k
//   k     i32
// Launch: grid (ceil(k / 256), rows, 1); block (256, 1, 1).
template <typename T>
__device__ void gather_inputs_impl(T* __restrict__ out, const T* __restrict__ x,
                                   const int* __restrict__ perm, int k) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int from = i < k ? perm[i] : 0;
    tpserve::wait_for_inputs();
    if (i < k) {
        const long long row = (long long)blockIdx.y * k;
        out[row + i] = x[row + from];
    }
}

// gemm_w4_n{ROWS}: the 4-bit GEMM of up to ROWS rows a chunk (NT = ROWS / 8 n-tiles).
#define TPSERVE_GEMM_W4(SUFFIX, T, ROWS, NT)                                                   \
    extern "C" __global__ void __launch_bounds__(32 * kGemmWarps, 2) gemm_w4_n##ROWS##_##SUFFIX( \
        T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ w,               \
        const unsigned int* __restrict__ params, float* __restrict__ partials,                 \
        unsigned int* __restrict__ counters, int rows, int n_out, int k, int group_shift,      \
        int k_split) {                                                                         \
        gemm_w4<T, NT>(y, x, w, params, partials, counters, rows, n_out, k, group_shift,       \
                       k_split);                                                               \
    }
// gemv_w4 (GATED false) and gemv_w4_gated (true), each plain and with its tiles in pairs.
#define TPSERVE_GEMV_W4(NAME, SUFFIX, T, GATED, PAIRS)                                         \
    extern "C" __global__ void __launch_bounds__(512) NAME##_##SUFFIX(                         \
        T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ w,               \
        const unsigned int* __restrict__ params, int rows, int n_out, int k, int group_shift,  \
        int k_split) {                                                                         \
        gemv_w4<T, kInFlight, GATED, PAIRS>(y, x, w, params, rows, n_out, k, group_shift,      \
                                            k_split);                                          \
    }
#define TPSERVE_INT4(SUFFIX, T)                                                                \
    TPSERVE_GEMV_W4(gemv_w4, SUFFIX, T, false, false)                                          \
    TPSERVE_GEMV_W4(gemv_w4_gated, SUFFIX, T, true, false)                                     \
    TPSERVE_GEMV_W4(gemv_w4_pairs, SUFFIX, T, false, true)                                     \
    TPSERVE_GEMV_W4(gemv_w4_gated_pairs, SUFFIX, T, true, true)                                \
    TPSERVE_GEMM_W4(SUFFIX, T, 16, 2)                                                         \
    TPSERVE_GEMM_W4(SUFFIX, T, 32, 4)                                                         \
    TPSERVE_GEMM_W4(SUFFIX, T, 64, 8)                                                         \
    extern "C" __global__ void __launch_bounds__(256) dequantize_w4_##SUFFIX(                  \
        T* __restrict__ out, const unsigned int* __restrict__ w,                               \
        const unsigned int* __restrict__ params, int n_out, int k, int group_shift) {          \
        dequantize_w4_impl<T>(out, w, params, n_out, k, group_shift);                          \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gather_inputs_##SUFFIX(                  \
        T* __restrict__ out, const T* __restrict__ x, const int* __restrict__ perm, int k) {   \
        gather_inputs_impl<T>(out, x, perm, k);                                                \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_INT4)
