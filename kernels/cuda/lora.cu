// Batched LoRA: the delta `y += (x A^T) (scale B)^T` of many adapters in one step, each row with
// its own adapter slot (S-LoRA's SGMV for prefill segments, Punica's BGMV for decode rows, as one
// pair of kernels over "LoRA tiles").
#include "common.cuh"

// A LoRA tile is four i32 {first_row, rows, slot, 0}: `rows` (at most TPSERVE_LORA_TILE_ROWS)
// consecutive token rows that use the adapter in `slot`. Tiles with rows == 0 or slot < 0 do
// nothing (padding; rows of the base model have no tile).
#define TPSERVE_LORA_TILE_ROWS 8
// Outputs of the shrink per warp and warps per block.
#define TPSERVE_LORA_SHRINK_OUTS 4
#define TPSERVE_LORA_SHRINK_WARPS 4

// The slot buffers of one fused product (q|k|v, o, gate|up or down) of one layer, for G stacked
// projections (3, 1, 2, 1) of a rank stride R (the largest rank served, rounded up to 8):
//   a      T [slots, G * R, in]   row g * R + r: rank r of projection g's A; zero past its rank
//   b      T [slots, out, R]      row j: the B row of output column j (its projection's), times
//                                 the adapter's scale; zero past its rank
//   ranks  i32 [slots]            each slot's rank (rows past it are skipped)
// Output column j belongs to projection g = (j >= bound1) + (j >= bound2).

// lora_shrink_{bf16,f16}: t[row, o] = sum_k x[row, k] a[slot, o, k] for every row of every tile
// and o in [0, G R); outputs with o % R at or past the slot's rank are written as 0 without
// reading A (the expand multiplies them by B's zero padding). f32 sums; each output is one warp's dot product (lanes stride k in 8-element chunks,
// then a warp reduction), the same for every row of a tile.
//
// Arguments:
//   t      f32 [num_tokens, G * R]   written
//   x      T   [num_tokens, in]      read only (the product's input)
//   a      T   as above              read only
//   tiles  i32 [num_tiles, 4]        read only
//   ranks  i32 [slots]               read only
//   in, R, G  i32
// Launch: grid (num_tiles, ceil(G R / (OUTS * WARPS)), 1); block (32 * WARPS, 1, 1).
template <typename T>
__device__ void lora_shrink_impl(float* __restrict__ t, const T* __restrict__ x,
                                 const T* __restrict__ a, const int* __restrict__ tiles,
                                 const int* __restrict__ ranks, int in, int R, int G) {
    tpserve::wait_for_inputs();
    const int* tile = tiles + 4 * blockIdx.x;
    const int first = tile[0], rows = tile[1], slot = tile[2];
    if (rows <= 0 || slot < 0) {
        return;
    }
    const int rank = ranks[slot];
    const int width = G * R;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int base = (blockIdx.y * TPSERVE_LORA_SHRINK_WARPS + warp) * TPSERVE_LORA_SHRINK_OUTS;
    const T* a_slot = a + (long long)slot * width * in;
    for (int i = 0; i < TPSERVE_LORA_SHRINK_OUTS; ++i) {
        const int o = base + i;
        if (o >= width) {
            break;
        }
        const bool live = o % R < rank;
        const T* ao = a_slot + (long long)o * in;
        float acc[TPSERVE_LORA_TILE_ROWS];
#pragma unroll
        for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
            acc[r] = 0.0f;
        }
        if (!live) {
            // acc stays 0.
        } else if (in % 8 == 0) {
            for (int k = lane * 8; k < in; k += 32 * 8) {
                const uint4 av = *reinterpret_cast<const uint4*>(ao + k);
                const T* a8 = reinterpret_cast<const T*>(&av);
                float af[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    af[e] = tpserve::to_float(a8[e]);
                }
#pragma unroll
                for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
                    if (r < rows) {
                        const uint4 xv = *reinterpret_cast<const uint4*>(
                            x + (long long)(first + r) * in + k);
                        const T* x8 = reinterpret_cast<const T*>(&xv);
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            acc[r] += af[e] * tpserve::to_float(x8[e]);
                        }
                    }
                }
            }
        } else {
            for (int k = lane; k < in; k += 32) {
                const float af = tpserve::to_float(ao[k]);
#pragma unroll
                for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
                    if (r < rows) {
                        acc[r] += af * tpserve::to_float(x[(long long)(first + r) * in + k]);
                    }
                }
            }
        }
#pragma unroll
        for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
            const float sum = tpserve::warp_reduce_sum(acc[r]);
            if (lane == 0 && r < rows) {
                t[(long long)(first + r) * width + o] = sum;
            }
        }
    }
}

// lora_expand_{bf16,f16}: y[row, j] += sum_{r < rank} t[row, g R + r] b[slot, j, r] for every row
// of every tile and every output column j (g: j's projection), rounded to T once.
//
// Arguments:
//   y       T   [num_tokens, out]   read and written (the base product's output)
//   t       f32 [num_tokens, G * R] read only (lora_shrink's)
//   b       T   as above            read only
//   tiles   i32 [num_tiles, 4]      read only
//   ranks   i32 [slots]             read only
//   out, R, G, bound1, bound2  i32
// Launch: grid (num_tiles, ceil(out / B), 1); block (B, 1, 1): one output column per thread.
template <typename T>
__device__ void lora_expand_impl(T* __restrict__ y, const float* __restrict__ t,
                                 const T* __restrict__ b, const int* __restrict__ tiles,
                                 const int* __restrict__ ranks, int out, int R, int G, int bound1,
                                 int bound2) {
    tpserve::wait_for_inputs();
    const int* tile = tiles + 4 * blockIdx.x;
    const int first = tile[0], rows = tile[1], slot = tile[2];
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (rows <= 0 || slot < 0 || j >= out) {
        return;
    }
    const int rank = ranks[slot];
    const int g = (j >= bound1) + (j >= bound2);
    const int width = G * R;
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
#pragma unroll
        for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
            if (r < rows) {
                const float* tr = t + (long long)(first + r) * width + g * R + c;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    acc[r] += tr[e] * tpserve::to_float(b8[e]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < TPSERVE_LORA_TILE_ROWS; ++r) {
        if (r < rows) {
            T* yr = y + (long long)(first + r) * out + j;
            *yr = tpserve::from_float<T>(tpserve::to_float(*yr) + acc[r]);
        }
    }
}

#define TPSERVE_LORA(SUFFIX, T)                                                                \
    extern "C" __global__ void lora_shrink_##SUFFIX(                                          \
        float* __restrict__ t, const T* __restrict__ x, const T* __restrict__ a,              \
        const int* __restrict__ tiles, const int* __restrict__ ranks, int in, int R, int G) { \
        lora_shrink_impl<T>(t, x, a, tiles, ranks, in, R, G);                                 \
    }                                                                                          \
    extern "C" __global__ void lora_expand_##SUFFIX(                                          \
        T* __restrict__ y, const float* __restrict__ t, const T* __restrict__ b,              \
        const int* __restrict__ tiles, const int* __restrict__ ranks, int out, int R, int G,  \
        int bound1, int bound2) {                                                              \
        lora_expand_impl<T>(y, t, b, tiles, ranks, out, R, G, bound1, bound2);                \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_LORA)
