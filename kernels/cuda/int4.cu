// Linear layers with 4-bit integer weights in groups (W4A16: AWQ and GPTQ checkpoints, issue 12),
// repacked at load (worker/src/cuda/int4.rs) into the layout of an m16n8k16 mma's A fragments:
//   w       u32 [n_out / 16, k / 64, 32, 4]: for rows 16 rb .. 16 rb + 16 and inputs 64 kt ..
//           64 kt + 64, lane l = 4 g + t holds word s for the k16 step s (inputs 64 kt + 16 s ..):
//           value p (bits 4 p .. 4 p + 4, p = 0..3) is A element 2 p and value p + 4 element
//           2 p + 1, where A elements 0, 1 are (row g, input 2 t + 0, 1), 2, 3 (row g + 8, the
//           same inputs), 4, 5 (row g, input 2 t + 8 + 0, 1), 6, 7 (row g + 8, those): the 4-bit
//           values, 0..15, so that each lane's one 16-byte load is its A fragments of 4 steps
//   params  u32 [n_out, k / group_size]: an f16 pair, the low half the group's scale, the high
//           half its zero point (an integer, exact in f16)
// Element (n, k) of the weight is (q - zero) * scale of its row n and group k / group_size.
// Requires n_out a multiple of 16, k a multiple of 64 (of 64 * k_split), group_size a multiple
// of 16.
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

constexpr int kMaxSplit = 16;  // warps per block (one per part of K), at most
constexpr int kUnroll = 4;     // 16-byte loads a lane issues at a time

}  // namespace

// gemv_w4_{bf16,f16}: y[m, n] = sum_k x[m, k] * W[n, k] for m < rows (1 to 8) and n < n_out,
// W the 4-bit weight above: the products of decoding steps. A block owns 16 rows of W and has
// one warp for each of k_split equal parts of K; a warp walks its part 64 inputs (one 16-byte
// load a lane) at a time, loading the next kUnroll tiles while it computes the current ones.
// Each k16 step turns a word into the A fragment ((q - zero) in the dtype, exact: the value
// placed in the mantissa of 128 (bf16) or 1024 (f16) minus 128 + zero) and multiplies it with
// x's rows (the B fragment, read through L1) by mma.sync with f32 accumulation; at each group's
// end the step sums are scaled into the warp's totals. The parts sum in shared memory, in part
// order. The reduction order depends on K, group_size and k_split alone, not on the rows. Before
// waiting for the previous kernel each warp prefetches its first loads into L2, as gemv.cu does.
//
// Arguments:
//   y           T   [rows, n_out]  written
//   x           T   [rows, k]      read only (4-byte aligned)
//   w           u32 the layout above
//   params      u32 [n_out, k / group_size]
//   rows        i32 1..=8
//   n_out       i32 a multiple of 16
//   k           i32 a multiple of 64 * k_split
//   group_size  i32 a multiple of 16 dividing k
//   k_split     i32 1, 2, 4, 8 or 16: warps of a block
// Launch: grid (n_out / 16, 1, 1); block (32 * k_split, 1, 1).
template <typename T>
__device__ void gemv_w4_impl(T* __restrict__ y, const T* __restrict__ x,
                             const uint4* __restrict__ w, const unsigned int* __restrict__ params,
                             int rows, int n_out, int k, int group_size, int k_split) {
    using Pair = W4Pair<T>;
    __shared__ float partial[kMaxSplit][16][8];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int rb = blockIdx.x;
    const int part = warp;
    const int k_tiles = k / 64;
    const int part_tiles = k_tiles / k_split;
    const int kt0 = part * part_tiles;
    const bool active = rb * 16 < n_out;
    const uint4* wp = w + ((long long)rb * k_tiles + kt0) * 32 + lane;
    if (active) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            if (u < part_tiles) {
                asm volatile("prefetch.global.L2 [%0];" ::"l"(wp + u * 32));
            }
        }
    }
    tpserve::wait_for_inputs();
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (active) {
        const int groups = k / group_size;
        const long long n_a = rb * 16 + g;
        const long long n_b = n_a + 8;
        const bool has_x = g < rows;
        const T* xr = x + (long long)(has_x ? g : 0) * k;
        // Groups by steps of 16 inputs, counted down (no division in the loop); the next
        // group's parameters load one group ahead.
        const int steps_per_group = group_size / 16;
        const int part_steps = part_tiles * 4;
        int group = kt0 * 4 / steps_per_group;
        int left = steps_per_group - (kt0 * 4 - group * steps_per_group);
        unsigned int cur_a = __ldg(params + n_a * groups + group);
        unsigned int cur_b = __ldg(params + n_b * groups + group);
        unsigned int next_a = group + 1 < groups ? __ldg(params + n_a * groups + group + 1) : 0u;
        unsigned int next_b = group + 1 < groups ? __ldg(params + n_b * groups + group + 1) : 0u;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        uint4 next[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
            next[u] = u < part_tiles ? load_streaming(wp + u * 32) : make_uint4(0u, 0u, 0u, 0u);
        }
        for (int it = 0; it < part_tiles; it += kUnroll) {
            uint4 wv[kUnroll];
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                wv[u] = next[u];
                const int ahead = it + kUnroll + u;
                next[u] = ahead < part_tiles ? load_streaming(wp + ahead * 32)
                                             : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < kUnroll; ++u) {
                if (it + u >= part_tiles) {
                    break;
                }
                const unsigned int words[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
#pragma unroll
                for (int s = 0; s < 4; ++s) {
                    const int step = (it + u) * 4 + s;
                    const int k0 = kt0 * 64 + 16 * step;
                    const float2 pa = group_params(cur_a);
                    const float2 pb = group_params(cur_b);
                    const unsigned int zero_a = Pair::offset(pa.y);
                    const unsigned int zero_b = Pair::offset(pb.y);
                    const unsigned int v = words[s];
                    const unsigned int a[4] = {
                        Pair::sub(((v >> 0) & 0x000f000fu) | Pair::kMagic, zero_a),
                        Pair::sub(((v >> 4) & 0x000f000fu) | Pair::kMagic, zero_b),
                        Pair::sub(((v >> 8) & 0x000f000fu) | Pair::kMagic, zero_a),
                        Pair::sub(((v >> 12) & 0x000f000fu) | Pair::kMagic, zero_b),
                    };
                    const unsigned int b0 =
                        has_x ? __ldg(reinterpret_cast<const unsigned int*>(xr + k0 + 2 * t)) : 0u;
                    const unsigned int b1 =
                        has_x ? __ldg(reinterpret_cast<const unsigned int*>(xr + k0 + 2 * t + 8))
                              : 0u;
                    tpserve::Mma<T>::run(acc, a, b0, b1);
                    --left;
                    const bool last = step == part_steps - 1;
                    if (left == 0 || last) {
                        total[0] = fmaf(pa.x, acc[0], total[0]);
                        total[1] = fmaf(pa.x, acc[1], total[1]);
                        total[2] = fmaf(pb.x, acc[2], total[2]);
                        total[3] = fmaf(pb.x, acc[3], total[3]);
                        acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
                    }
                    if (left == 0 && !last) {
                        ++group;
                        left = steps_per_group;
                        cur_a = next_a;
                        cur_b = next_b;
                        if (group + 1 < groups) {
                            next_a = __ldg(params + n_a * groups + group + 1);
                            next_b = __ldg(params + n_b * groups + group + 1);
                        }
                    }
                }
            }
        }
    }
    // C fragment: elements 0, 1 are (row g, columns 2 t, 2 t + 1), 2, 3 (row g + 8, the same);
    // a column is a row m of x.
    partial[warp][g][2 * t] = total[0];
    partial[warp][g][2 * t + 1] = total[1];
    partial[warp][g + 8][2 * t] = total[2];
    partial[warp][g + 8][2 * t + 1] = total[3];
    __syncthreads();
    if (!active || part != 0) {
        return;
    }
    // The first warp sums the parts: lane l writes (row l / 2, columns 4 (l % 2) ..).
    const int row = lane >> 1;
    const long long n = rb * 16 + row;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const int m = 4 * (lane & 1) + c;
        float sum = 0.0f;
        for (int p = 0; p < k_split; ++p) {
            sum += partial[p][row][m];
        }
        if (m < rows) {
            y[(long long)m * n_out + n] = tpserve::from_float<T>(sum);
        }
    }
}

// dequantize_w4_{bf16,f16}: out[n, k] = (q - zero) * scale rounded to T, the whole weight, for
// the products of more than 8 rows (which then run cuBLAS on `out`). One thread per word of w
// (8 values: 4 pairs of adjacent inputs, 4-byte stores), grid-stride.
//
// Arguments:
//   out         T   [n_out, k]  written
//   w           u32 the layout above
//   params      u32 [n_out, k / group_size]
//   n_out, k, group_size  i32 (as gemv_w4's)
// Launch: any grid of blocks of 256 threads (the host uses min(words / 256, 132 * 8) blocks).
template <typename T>
__device__ void dequantize_w4_impl(T* __restrict__ out, const unsigned int* __restrict__ w,
                                   const unsigned int* __restrict__ params, int n_out, int k,
                                   int group_size) {
    // `out` may be what the product before read.
    tpserve::wait_for_inputs();
    const int k_tiles = k / 64;
    const long long total = (long long)n_out / 16 * k_tiles * 128;
    const int groups = k / group_size;
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
        // The word's 16 inputs lie in one group (groups are multiples of 16 inputs).
        const int group = (kt * 64 + 16 * s) / group_size;
        // Pair p: A elements 2 p, 2 p + 1 (values p and p + 4), at (row, input) below.
#pragma unroll
        for (int p = 0; p < 4; ++p) {
            const long long n = rb * 16 + g + 8 * (p & 1);
            const int kk = kt * 64 + 16 * s + 2 * t + 8 * (p >> 1);
            const float2 sz = group_params(params[n * groups + group]);
            const float lo = (float)((v >> (4 * p)) & 0xfu);
            const float hi = (float)((v >> (4 * p + 16)) & 0xfu);
            T pair[2] = {tpserve::from_float<T>((lo - sz.y) * sz.x),
                         tpserve::from_float<T>((hi - sz.y) * sz.x)};
            *reinterpret_cast<unsigned int*>(out + n * k + kk) =
                *reinterpret_cast<const unsigned int*>(pair);
        }
    }
}

#define TPSERVE_INT4(SUFFIX, T)                                                                \
    extern "C" __global__ void __launch_bounds__(512) gemv_w4_##SUFFIX(                        \
        T* __restrict__ y, const T* __restrict__ x, const uint4* __restrict__ w,               \
        const unsigned int* __restrict__ params, int rows, int n_out, int k, int group_size,   \
        int k_split) {                                                                         \
        gemv_w4_impl<T>(y, x, w, params, rows, n_out, k, group_size, k_split);                 \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) dequantize_w4_##SUFFIX(                  \
        T* __restrict__ out, const unsigned int* __restrict__ w,                               \
        const unsigned int* __restrict__ params, int n_out, int k, int group_size) {           \
        dequantize_w4_impl<T>(out, w, params, n_out, k, group_size);                           \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_INT4)
