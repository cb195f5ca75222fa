// Batched LoRA: the delta `y += (x A^T) (scale B)^T` of many adapters in one step, each row with
// its own adapter slot (S-LoRA's SGMV and Punica's BGMV as one pair of kernels over "LoRA tiles":
// up to TPSERVE_LORA_TILE_ROWS rows of one adapter, wherever they are in the batch, so each
// adapter's weights are read once per tile rather than once per row).
#include "common.cuh"

// A LoRA tile is 16 i32: {slot, rows, row_0, ..., row_7, rank, 0...}: `rows` (1 to
// TPSERVE_LORA_TILE_ROWS) token rows that use the adapter in `slot`, whose rank is `rank` (in the
// tile so that no kernel waits on a second load to learn it). Tiles with rows == 0 or slot < 0
// do nothing (padding; rows of the base model are in no tile).
#define TPSERVE_LORA_TILE_INTS 16
#define TPSERVE_LORA_TILE_ROWS 8
#define TPSERVE_LORA_TILE_RANK 10
// The shrink's block: TPSERVE_LORA_SHRINK_WARPS warps over one split of `in`, each lane on 8
// consecutive elements (one 16-byte load per row and output), for TPSERVE_LORA_SHRINK_OUTS
// outputs. The split length is therefore SHRINK_WARPS * 256 elements.
#define TPSERVE_LORA_SHRINK_OUTS 8
#define TPSERVE_LORA_SHRINK_WARPS 8
#define TPSERVE_LORA_SPLIT_LEN (TPSERVE_LORA_SHRINK_WARPS * 256)
// Output columns per thread of the expand (adjacent; a multiple of 2, written as pairs).
#define TPSERVE_LORA_EXPAND_COLS 2

// The slot buffers of one fused product (q|k|v, o, gate|up or down) of one layer, for G stacked
// projections (3, 1, 2, 1) of a rank stride R (the largest rank served, rounded up to 8):
//   a      T [slots, G * R, in]   row g * R + r: rank r of projection g's A; zero past its rank
//   b      T [slots, out, R]      row j: the B row of output column j (its projection's), times
//                                 the adapter's scale; zero past its rank
// Output column j belongs to projection g = (j >= bound1) + (j >= bound2).
//
// The shrink splits `in` into S = ceil(in / TPSERVE_LORA_SPLIT_LEN) ranges and writes one
// partial sum per range; the expand adds the S partials in order. Each output is a fixed
// sequence of f32 sums (a lane's 8 products, a butterfly over the warp's lanes, the block's
// warps in order, then the splits in order) that does not depend on the other rows of the step
// or on where a row sits in its tile, so results are batch invariant.

// Element e (0-7, a compile-time constant after unrolling) of 8 T packed in a 16-byte load, as
// f32; taking the vector's address instead would put it in local memory.
template <typename T> __device__ __forceinline__ float lora_elem(const uint4& v, int e);
template <> __device__ __forceinline__ float lora_elem<__nv_bfloat16>(const uint4& v, int e) {
    const unsigned word = e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w;
    return __uint_as_float(e % 2 == 0 ? word << 16 : word & 0xffff0000u);
}
template <> __device__ __forceinline__ float lora_elem<__half>(const uint4& v, int e) {
    const unsigned word = e < 2 ? v.x : e < 4 ? v.y : e < 6 ? v.z : v.w;
    return __half2float(__ushort_as_half((unsigned short)(e % 2 == 0 ? word : word >> 16)));
}

// A block with nothing to do (a padding tile, or outputs past the rank) leaves at once rather
// than holding its SM slot until the previous kernel ends, except block 0, which waits: a kernel
// must not end before the one it depends on, whatever its blocks have to do.
__device__ __forceinline__ void lora_idle_block() {
    if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
        tpserve::wait_for_inputs();
    }
}

// One step of lora_warp_sum_64: of its 2 * HALF live values, a lane keeps the upper half if
// its lane bit HALF / 2 is set (else the lower half), adds the partner's copy of the same half
// (the lane HALF / 2 apart), and sends the other half to the partner.
template <int HALF>
__device__ __forceinline__ void lora_butterfly_step(float (&v)[64], int lane) {
    constexpr int OFFSET = HALF / 2;
    const bool upper = (lane & OFFSET) != 0;
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
        const float lo = v[i], hi = v[i + HALF];
        const float send = upper ? lo : hi;
        const float keep = upper ? hi : lo;
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
    }
}

// The sums over a warp's lanes of 64 values at once: v[i] of every lane is added up, and lane l
// ends with the sums of values 2 l and 2 l + 1 in v[0] and v[1]. 62 shuffles instead of 64
// separate reductions' 320; every value is summed along the same tree (pairs of lanes 16 apart,
// then 8, ... then 1), whichever lane ends with it.
__device__ __forceinline__ void lora_warp_sum_64(float (&v)[64]) {
    const int lane = threadIdx.x & 31;
    lora_butterfly_step<32>(v, lane);
    lora_butterfly_step<16>(v, lane);
    lora_butterfly_step<8>(v, lane);
    lora_butterfly_step<4>(v, lane);
    lora_butterfly_step<2>(v, lane);
}

// lora_shrink_{bf16,f16}: t[s, row, o] = sum over k in split s of x[row, k] a[slot, o, k], for
// every row of every tile and o in [0, G R) with o % R below the tile's rank (the others are
// neither computed nor written: the expand does not read them).
//
// Arguments:
//   t          f32 [S, num_tokens, G * R]   written
//   x          T   [num_tokens, in]         read only (the product's input; 16-byte rows)
//   a          T   as above                 read only
//   tiles      i32 [num_tiles, 16]          read only
//   in, R, G   i32 (in a multiple of 8)
//   num_tokens i32
// Launch: grid (num_tiles, ceil(G R / TPSERVE_LORA_SHRINK_OUTS), S);
// block (32 * TPSERVE_LORA_SHRINK_WARPS, 1, 1).
template <typename T>
__device__ void lora_shrink_impl(float* __restrict__ t, const T* __restrict__ x,
                                 const T* __restrict__ a, const int* __restrict__ tiles, int in,
                                 int R, int G, int num_tokens) {
    constexpr int OUTS = TPSERVE_LORA_SHRINK_OUTS;
    constexpr int ROWS = TPSERVE_LORA_TILE_ROWS;
    static_assert(OUTS * ROWS == 64, "lora_warp_sum_64 reduces 64 values");
    __shared__ float warp_sums[TPSERVE_LORA_SHRINK_WARPS][OUTS * ROWS];
    // The tiles and A are not written by the kernels before this one (only by the host before
    // the step), so they are read before waiting on those kernels: the A loads overlap the
    // previous kernel's tail.
    const int* tile = tiles + TPSERVE_LORA_TILE_INTS * blockIdx.x;
    const int slot = tile[0], rows = tile[1], rank = tile[TPSERVE_LORA_TILE_RANK];
    const int width = G * R;
    const int o0 = blockIdx.y * OUTS;
    // OUTS divides R: a block's outputs are of one projection, all below the rank or not.
    if (rows <= 0 || slot < 0 || o0 >= width || o0 % R >= rank) {
        lora_idle_block();
        return;
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int k = blockIdx.z * TPSERVE_LORA_SPLIT_LEN + warp * 256 + lane * 8;
    const bool k_live = k < in;
    const T* a_slot = a + (long long)slot * width * in;
    uint4 av[OUTS];
#pragma unroll
    for (int i = 0; i < OUTS; ++i) {
        const int o = o0 + i;
        av[i] = k_live && o < width && o % R < rank
                    ? *reinterpret_cast<const uint4*>(a_slot + (long long)o * in + k)
                    : make_uint4(0, 0, 0, 0);
    }
    tpserve::wait_for_inputs();
    uint4 xv[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        xv[r] = k_live && r < rows
                    ? *reinterpret_cast<const uint4*>(x + (long long)tile[2 + r] * in + k)
                    : make_uint4(0, 0, 0, 0);
    }
    float acc[OUTS * ROWS];
#pragma unroll
    for (int i = 0; i < OUTS * ROWS; ++i) {
        acc[i] = 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        float xf[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            xf[r] = lora_elem<T>(xv[r], e);
        }
#pragma unroll
        for (int i = 0; i < OUTS; ++i) {
            const float ae = lora_elem<T>(av[i], e);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                acc[i * ROWS + r] += ae * xf[r];
            }
        }
    }
    lora_warp_sum_64(acc);
    const int first = 2 * lane;
    warp_sums[warp][first] = acc[0];
    warp_sums[warp][first + 1] = acc[1];
    __syncthreads();
    if (threadIdx.x < OUTS * ROWS) {
        const int i = threadIdx.x / ROWS, r = threadIdx.x % ROWS;
        const int o = o0 + i;
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < TPSERVE_LORA_SHRINK_WARPS; ++w) {
            sum += warp_sums[w][threadIdx.x];
        }
        if (r < rows && o % R < rank) {
            t[((long long)blockIdx.z * num_tokens + tile[2 + r]) * width + o] = sum;
        }
    }
}

// lora_expand_{bf16,f16}: y[row, j] += sum_{r < rank} t[row, g R + r] b[slot, j, r] for every row
// of every tile and every output column j (g: j's projection), where t[row, o] is the sum of the
// shrink's S partials in order (summed once per block into shared memory, for o % R below the
// rank); rounded to T once.
//
// Arguments:
//   y          T   [num_tokens, out]           read and written (the base product's output)
//   t          f32 [S, num_tokens, G * R]      read only (lora_shrink's)
//   b          T   as above                    read only
//   tiles      i32 [num_tiles, 16]             read only
//   out, R, G, bound1, bound2, splits, num_tokens  i32 (out, bound1 and bound2 even)
// Launch: grid (num_tiles, ceil(out / (B * TPSERVE_LORA_EXPAND_COLS)), 1); block (B, 1, 1):
// TPSERVE_LORA_EXPAND_COLS adjacent output columns per thread; dynamic shared memory
// TPSERVE_LORA_TILE_ROWS * G * R * 4 bytes.
template <typename T>
__device__ void lora_expand_impl(T* __restrict__ y, const float* __restrict__ t,
                                 const T* __restrict__ b, const int* __restrict__ tiles, int out,
                                 int R, int G, int bound1, int bound2, int splits,
                                 int num_tokens) {
    constexpr int ROWS = TPSERVE_LORA_TILE_ROWS;
    constexpr int COLS = TPSERVE_LORA_EXPAND_COLS;
    // B elements of each column loaded before the wait (the whole row up to rank 16).
    constexpr int EARLY = 16;
    static_assert(COLS % 2 == 0, "the output is written as pairs of elements");
    extern __shared__ float t_tile[];  // [TPSERVE_LORA_TILE_ROWS][G * R]
    // As in the shrink, the tiles and B are read before the wait.
    const int* tile = tiles + TPSERVE_LORA_TILE_INTS * blockIdx.x;
    const int slot = tile[0], rows = tile[1], rank = tile[TPSERVE_LORA_TILE_RANK];
    if (rows <= 0 || slot < 0) {
        lora_idle_block();
        return;
    }
    const int width = G * R;
    const int j = (blockIdx.y * blockDim.x + threadIdx.x) * COLS;
    const bool j_live = j < out;
    const T* bj = b + ((long long)slot * out + j) * R;
    uint4 early[COLS][EARLY / 8];
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
#pragma unroll
        for (int q = 0; q < EARLY / 8; ++q) {
            early[c][q] = j_live && q * 8 < rank
                              ? *reinterpret_cast<const uint4*>(bj + c * R + q * 8)
                              : make_uint4(0, 0, 0, 0);
        }
    }
    tpserve::wait_for_inputs_after_loads();
    // The base product's outputs of this thread's columns (pairs: j is even), loaded now so
    // that their latency overlaps the partial sums' below.
    unsigned y_pair[ROWS][COLS / 2];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const unsigned* yr =
            reinterpret_cast<const unsigned*>(y + (long long)tile[2 + r] * out + j);
#pragma unroll
        for (int w = 0; w < COLS / 2; ++w) {
            y_pair[r][w] = j_live && r < rows ? yr[w] : 0u;
        }
    }
    // The shrink's partials, summed in split order; each thread's loads of up to 8 splits are
    // issued together.
    const long long split_stride = (long long)num_tokens * width;
    for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
        const int r = i / width, o = i % width;
        const float* src = t + (long long)tile[2 + r] * width + o;
        float sum = 0.0f;
        for (int s0 = 0; o % R < rank && s0 < splits; s0 += 8) {
            float part[8];
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                part[s] = s0 + s < splits ? src[(s0 + s) * split_stride] : 0.0f;
            }
#pragma unroll
            for (int s = 0; s < 8; ++s) {
                if (s0 + s < splits) {
                    sum += part[s];
                }
            }
        }
        t_tile[i] = sum;
    }
    __syncthreads();
    if (!j_live) {
        return;
    }
    // Columns j to j + COLS - 1 belong to one projection: the bounds are multiples of COLS.
    const int g = (j >= bound1) + (j >= bound2);
    float acc[COLS][ROWS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            acc[c][r] = 0.0f;
        }
    }
    // R is a multiple of 8: 16-byte loads of the B rows. Past the rank, B is 0 and t is 0.
    for (int q = 0; q < rank; q += 8) {
        float bf[COLS][8];
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
            uint4 bv;
            if (q < EARLY) {
                bv = q == 0 ? early[c][0] : early[c][1];
            } else {
                bv = *reinterpret_cast<const uint4*>(bj + c * R + q);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                bf[c][e] = lora_elem<T>(bv, e);
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            if (r < rows) {
                const float4* tr =
                    reinterpret_cast<const float4*>(t_tile + r * width + g * R + q);
                const float4 lo = tr[0], hi = tr[1];
                const float tv[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
                for (int c = 0; c < COLS; ++c) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        acc[c][r] += tv[e] * bf[c][e];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        if (r < rows) {
            unsigned* yr = reinterpret_cast<unsigned*>(y + (long long)tile[2 + r] * out + j);
#pragma unroll
            for (int w = 0; w < COLS / 2; ++w) {
                const T* pair = reinterpret_cast<const T*>(&y_pair[r][w]);
                T sums[2] = {
                    tpserve::from_float<T>(tpserve::to_float(pair[0]) + acc[2 * w][r]),
                    tpserve::from_float<T>(tpserve::to_float(pair[1]) + acc[2 * w + 1][r])};
                yr[w] = *reinterpret_cast<const unsigned*>(sums);
            }
        }
    }
}

#define TPSERVE_LORA(SUFFIX, T)                                                                \
    extern "C" __global__ void lora_shrink_##SUFFIX(                                          \
        float* __restrict__ t, const T* __restrict__ x, const T* __restrict__ a,              \
        const int* __restrict__ tiles, int in, int R, int G, int num_tokens) {                \
        lora_shrink_impl<T>(t, x, a, tiles, in, R, G, num_tokens);                            \
    }                                                                                          \
    extern "C" __global__ void lora_expand_##SUFFIX(                                          \
        T* __restrict__ y, const float* __restrict__ t, const T* __restrict__ b,              \
        const int* __restrict__ tiles, int out, int R, int G, int bound1, int bound2,         \
        int splits, int num_tokens) {                                                          \
        lora_expand_impl<T>(y, t, b, tiles, out, R, G, bound1, bound2, splits, num_tokens);   \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_LORA)
