// Batched LoRA: the delta `y += (x A^T) (scale B)^T` of many adapters in one step, each row with
// its own adapter slot (S-LoRA's SGMV and Punica's BGMV as one pair of kernels over "LoRA tiles":
// up to TPSERVE_LORA_TILE_ROWS rows of one adapter, wherever they are in the batch, so each
// adapter's weights are read once per tile rather than once per row).
#include "common.cuh"

// A LoRA tile is 16 i32: {slot, rows, row_0, ..., row_7, 0...}: `rows` (1 to
// TPSERVE_LORA_TILE_ROWS) token rows that use the adapter in `slot`. Tiles with rows == 0 or
// slot < 0 do nothing (padding; rows of the base model are in no tile).
#define TPSERVE_LORA_TILE_INTS 16
#define TPSERVE_LORA_TILE_ROWS 8
// Outputs of the shrink per warp (one warp per block), and k elements per warp step.
#define TPSERVE_LORA_SHRINK_OUTS 8
#define TPSERVE_LORA_SHRINK_CHUNK 256

// The slot buffers of one fused product (q|k|v, o, gate|up or down) of one layer, for G stacked
// projections (3, 1, 2, 1) of a rank stride R (the largest rank served, rounded up to 8):
//   a      T [slots, G * R, in]   row g * R + r: rank r of projection g's A; zero past its rank
//   b      T [slots, out, R]      row j: the B row of output column j (its projection's), times
//                                 the adapter's scale; zero past its rank
//   ranks  i32 [slots]            each slot's rank (rows past it are skipped)
// Output column j belongs to projection g = (j >= bound1) + (j >= bound2).
//
// The shrink splits `in` into S = ceil(in / split_len) ranges and writes one partial sum per
// range; the expand adds the S partials in order. Each output is a fixed sequence of f32 sums
// (lanes, then a warp reduction, then the splits in order) that does not depend on the other
// rows of the step, so results are batch invariant.

// lora_shrink_{bf16,f16}: t[s, row, o] = sum over k in split s of x[row, k] a[slot, o, k], for
// every row of every tile and o in [0, G R); outputs with o % R at or past the slot's rank are
// written as 0 without reading A.
//
// Arguments:
//   t          f32 [S, num_tokens, G * R]   written
//   x          T   [num_tokens, in]         read only (the product's input; 16-byte rows)
//   a          T   as above                 read only
//   tiles      i32 [num_tiles, 16]          read only
//   ranks      i32 [slots]                  read only
//   in, R, G   i32 (in a multiple of 8)
//   split_len  i32 (a multiple of TPSERVE_LORA_SHRINK_CHUNK)
//   num_tokens i32
// Launch: grid (num_tiles, ceil(G R / OUTS), S); block (32, 1, 1).
template <typename T>
__device__ void lora_shrink_impl(float* __restrict__ t, const T* __restrict__ x,
                                 const T* __restrict__ a, const int* __restrict__ tiles,
                                 const int* __restrict__ ranks, int in, int R, int G,
                                 int split_len, int num_tokens) {
    tpserve::wait_for_inputs();
    const int* tile = tiles + TPSERVE_LORA_TILE_INTS * blockIdx.x;
    const int slot = tile[0], rows = tile[1];
    if (rows <= 0 || slot < 0) {
        return;
    }
    const int rank = ranks[slot];
    const int width = G * R;
    const int lane = threadIdx.x;
    const int o0 = blockIdx.y * TPSERVE_LORA_SHRINK_OUTS;
    const int k_begin = blockIdx.z * split_len;
    const int k_end = min(in, k_begin + split_len);
    int row[TPSERVE_LORA_TILE_ROWS];
#pragma unroll
    for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
        row[r] = r < rows ? tile[2 + r] : tile[2];
    }
    bool live[TPSERVE_LORA_SHRINK_OUTS];
#pragma unroll
    for (int i = 0; i < TPSERVE_LORA_SHRINK_OUTS; ++i) {
        const int o = o0 + i;
        live[i] = o < width && o % R < rank;
    }
    float acc[TPSERVE_LORA_SHRINK_OUTS][TPSERVE_LORA_TILE_ROWS];
#pragma unroll
    for (int i = 0; i < TPSERVE_LORA_SHRINK_OUTS; ++i) {
#pragma unroll
        for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
            acc[i][r] = 0.0f;
        }
    }
    const T* a_slot = a + (long long)slot * width * in;
    for (int k = k_begin + lane * 8; k < k_end; k += TPSERVE_LORA_SHRINK_CHUNK) {
        float xf[TPSERVE_LORA_TILE_ROWS][8];
#pragma unroll
        for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
            if (r < rows) {
                const uint4 xv = *reinterpret_cast<const uint4*>(x + (long long)row[r] * in + k);
                const T* x8 = reinterpret_cast<const T*>(&xv);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    xf[r][e] = tpserve::to_float(x8[e]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < TPSERVE_LORA_SHRINK_OUTS; ++i) {
            if (!live[i]) {
                continue;
            }
            const uint4 av =
                *reinterpret_cast<const uint4*>(a_slot + (long long)(o0 + i) * in + k);
            const T* a8 = reinterpret_cast<const T*>(&av);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float ae = tpserve::to_float(a8[e]);
#pragma unroll
                for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
                    if (r < rows) {
                        acc[i][r] += ae * xf[r][e];
                    }
                }
            }
        }
    }
    float* ts = t + (long long)blockIdx.z * num_tokens * width;
#pragma unroll
    for (int i = 0; i < TPSERVE_LORA_SHRINK_OUTS; ++i) {
        const int o = o0 + i;
#pragma unroll
        for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
            const float sum = tpserve::warp_reduce_sum(acc[i][r]);
            if (lane == 0 && r < rows && o < width) {
                ts[(long long)row[r] * width + o] = sum;
            }
        }
    }
}

// lora_expand_{bf16,f16}: y[row, j] += sum_{r < rank} t[row, g R + r] b[slot, j, r] for every row
// of every tile and every output column j (g: j's projection), where t[row, o] is the sum of the
// shrink's S partials in order (summed once per block into shared memory); rounded to T once.
//
// Arguments:
//   y          T   [num_tokens, out]           read and written (the base product's output)
//   t          f32 [S, num_tokens, G * R]      read only (lora_shrink's)
//   b          T   as above                    read only
//   tiles      i32 [num_tiles, 16]             read only
//   ranks      i32 [slots]                     read only
//   out, R, G, bound1, bound2, splits, num_tokens  i32
// Launch: grid (num_tiles, ceil(out / B), 1); block (B, 1, 1): one output column per thread;
// dynamic shared memory TPSERVE_LORA_TILE_ROWS * G * R * 4 bytes.
template <typename T>
__device__ void lora_expand_impl(T* __restrict__ y, const float* __restrict__ t,
                                 const T* __restrict__ b, const int* __restrict__ tiles,
                                 const int* __restrict__ ranks, int out, int R, int G, int bound1,
                                 int bound2, int splits, int num_tokens) {
    extern __shared__ float t_tile[];  // [TPSERVE_LORA_TILE_ROWS][G * R]
    tpserve::wait_for_inputs();
    const int* tile = tiles + TPSERVE_LORA_TILE_INTS * blockIdx.x;
    const int slot = tile[0], rows = tile[1];
    if (rows <= 0 || slot < 0) {
        return;
    }
    const int rank = ranks[slot];
    const int width = G * R;
    const long long split_stride = (long long)num_tokens * width;
    for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
        const int r = i / width, o = i % width;
        const float* src = t + (long long)tile[2 + r] * width + o;
        float sum = 0.0f;
        for (int s = 0; s < splits; ++s) {
            sum += src[s * split_stride];
        }
        t_tile[i] = sum;
    }
    __syncthreads();
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= out) {
        return;
    }
    const int g = (j >= bound1) + (j >= bound2);
    const T* bj = b + ((long long)slot * out + j) * R;
    float acc[TPSERVE_LORA_TILE_ROWS];
#pragma unroll
    for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
        acc[r] = 0.0f;
    }
    // R is a multiple of 8: 16-byte loads of the B row. Past the rank, B is 0 and t is 0.
    for (int c = 0; c < rank; c += 8) {
        const uint4 bv = *reinterpret_cast<const uint4*>(bj + c);
        const T* b8 = reinterpret_cast<const T*>(&bv);
        float bf[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            bf[e] = tpserve::to_float(b8[e]);
        }
#pragma unroll
        for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
            if (r < rows) {
                const float* tr = t_tile + r * width + g * R + c;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    acc[r] += tr[e] * bf[e];
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
        if (r < rows) {
            T* yr = y + (long long)tile[2 + r] * out + j;
            *yr = tpserve::from_float<T>(tpserve::to_float(*yr) + acc[r]);
        }
    }
}

#define TPSERVE_LORA(SUFFIX, T)                                                                \
    extern "C" __global__ void lora_shrink_##SUFFIX(                                          \
        float* __restrict__ t, const T* __restrict__ x, const T* __restrict__ a,              \
        const int* __restrict__ tiles, const int* __restrict__ ranks, int in, int R, int G,   \
        int split_len, int num_tokens) {                                                       \
        lora_shrink_impl<T>(t, x, a, tiles, ranks, in, R, G, split_len, num_tokens);          \
    }                                                                                          \
    extern "C" __global__ void lora_expand_##SUFFIX(                                          \
        T* __restrict__ y, const float* __restrict__ t, const T* __restrict__ b,              \
        const int* __restrict__ tiles, const int* __restrict__ ranks, int out, int R, int G,  \
        int bound1, int bound2, int splits, int num_tokens) {                                  \
        lora_expand_impl<T>(y, t, b, tiles, ranks, out, R, G, bound1, bound2, splits,         \
                            num_tokens);                                                       \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_LORA)
