// Token sampling on the device: greedy, or temperature with top-k, min-p and top-p filtering,
// drawn with the Gumbel-max trick from a per-row seed, so the logits never leave the GPU.
#include "common.cuh"

namespace {

constexpr int kBisectionSteps = 28;

// A (value, index) pair reduced by max value, lowest index on ties.
struct ArgMax {
    float value;
    int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) {
        return b;
    }
    return a;
}

__device__ ArgMax block_argmax(ArgMax v) {
    __shared__ float values[32];
    __shared__ int indices[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        ArgMax other;
        other.value = __shfl_xor_sync(0xffffffffu, v.value, offset);
        other.index = __shfl_xor_sync(0xffffffffu, v.index, offset);
        v = better(v, other);
    }
    if (lane == 0) {
        values[warp] = v.value;
        indices[warp] = v.index;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    ArgMax w;
    w.value = lane < warps ? values[lane] : tpserve::neg_inf();
    w.index = lane < warps ? indices[lane] : 0x7fffffff;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        ArgMax other;
        other.value = __shfl_xor_sync(0xffffffffu, w.value, offset);
        other.index = __shfl_xor_sync(0xffffffffu, w.index, offset);
        w = better(w, other);
    }
    __syncthreads();
    return w;
}

__device__ float block_reduce_max(float v) {
    __shared__ float maxima[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    if (lane == 0) {
        maxima[warp] = v;
    }
    __syncthreads();
    float w = lane < (int)(blockDim.x >> 5) ? maxima[lane] : tpserve::neg_inf();
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, offset));
    }
    __syncthreads();
    return w;
}

// splitmix64: a well-mixed 64-bit hash.
__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Standard Gumbel noise for token v under `seed`: -log(-log(u)), u uniform in (0, 1).
__device__ __forceinline__ float gumbel(unsigned long long seed, int v) {
    const unsigned long long h = mix64(seed ^ mix64((unsigned long long)v));
    const float u = ((float)(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
    return -__logf(-__logf(u));
}

}  // namespace

// sample_{bf16,f16}: one token per row.
//
// The logits of a row may be spread over tensor-parallel ranks (the output of an all-gather of
// vocab-parallel slices): logit(row, v) = logits[(v / vocab_per_rank) * num_rows * vocab_per_rank
// + row * vocab_per_rank + v % vocab_per_rank], for v < vocab. Without tensor parallelism pass
// vocab_per_rank = vocab, which is plain [num_rows, vocab].
//
// Per row, with x_v = logit / temperature:
// - temperature <= 0 or top_k == 1: the largest logit, lowest id on ties (greedy);
// - else keep v with x_v >= threshold, where the threshold is the largest of: the k-th largest x
//   (top_k > 0; found by bisection on the value, so ties at the boundary may keep a few more);
//   max x + log(min_p) (min_p > 0: probability at least min_p times the top one); then, over
//   what survives, the largest t whose kept tokens (x >= t) carry at least top_p of the
//   renormalised probability (top_p < 1, bisection). The kept token with the largest
//   x_v + Gumbel(seed, v) is returned: an exact draw from softmax(x) restricted to the kept set.
// Same seed, same logits: same token.
//
// Arguments:
//   out             u32 [num_rows]   written
//   logits          T   see above
//   num_rows        i32
//   vocab_per_rank  i32
//   vocab           i32
//   temperature     f32 [num_rows]
//   top_k           i32 [num_rows]   <= 0: off
//   top_p           f32 [num_rows]   >= 1: off
//   min_p           f32 [num_rows]   <= 0: off
//   seeds           u64 [num_rows]
// Launch: grid (num_rows, 1, 1); block (1024, 1, 1). With vocab_per_rank a multiple of 8 the
// logits must be 16-byte aligned (greedy rows read them 16 bytes at a time).
template <typename T>
__device__ void sample_impl(unsigned int* __restrict__ out, const T* __restrict__ logits,
                            int num_rows, int vocab_per_rank, int vocab,
                            const float* __restrict__ temperature, const int* __restrict__ top_k,
                            const float* __restrict__ top_p, const float* __restrict__ min_p,
                            const unsigned long long* __restrict__ seeds) {
    tpserve::wait_for_inputs();
    const int row = blockIdx.x;
    const long long rank_stride = (long long)num_rows * vocab_per_rank;
    auto logit = [&](int v) -> float {
        const int rank = v / vocab_per_rank;
        return tpserve::to_float(
            logits[rank * rank_stride + (long long)row * vocab_per_rank + (v - rank * vocab_per_rank)]);
    };
    const float t = temperature[row];
    const int k = top_k[row];
    if (t <= 0.0f || k == 1) {
        ArgMax best{tpserve::neg_inf(), 0x7fffffff};
        if (vocab_per_rank % 8 == 0) {
            // 16 bytes (8 logits) per thread and step, rank slice by rank slice.
            const int pieces = vocab_per_rank / 8;
            for (int r = 0; r * vocab_per_rank < vocab; ++r) {
                const T* slice = logits + r * rank_stride + (long long)row * vocab_per_rank;
                for (int p = threadIdx.x; p < pieces; p += blockDim.x) {
                    const uint4 raw = *reinterpret_cast<const uint4*>(slice + p * 8);
                    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        const int v = r * vocab_per_rank + p * 8 + i;
                        if (v < vocab) {
                            best = better(best, ArgMax{tpserve::to_float(e[i]), v});
                        }
                    }
                }
            }
        } else {
            for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
                best = better(best, ArgMax{logit(v), v});
            }
        }
        best = block_argmax(best);
        if (threadIdx.x == 0) {
            out[row] = best.index == 0x7fffffff ? 0u : (unsigned int)best.index;
        }
        return;
    }
    const float inv_t = 1.0f / t;
    float local_max = tpserve::neg_inf();
    float local_min = tpserve::pos_inf();
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        const float x = logit(v) * inv_t;
        local_max = fmaxf(local_max, x);
        local_min = fminf(local_min, x);
    }
    const float x_max = block_reduce_max(local_max);
    const float x_min = -block_reduce_max(-local_min);
    float threshold = tpserve::neg_inf();
    if (k > 0 && k < vocab) {
        // Largest t with at least k values >= t.
        float lo = x_min;
        float hi = x_max;
        for (int step = 0; step < kBisectionSteps; ++step) {
            const float mid = 0.5f * (lo + hi);
            float count = 0.0f;
            for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
                count += logit(v) * inv_t >= mid ? 1.0f : 0.0f;
            }
            if (tpserve::block_reduce_sum(count) >= (float)k) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        threshold = lo;
    }
    const float mp = min_p[row];
    if (mp > 0.0f) {
        threshold = fmaxf(threshold, x_max + __logf(mp));
    }
    const float p = top_p[row];
    if (p < 1.0f) {
        float mass = 0.0f;
        for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
            const float x = logit(v) * inv_t;
            mass += x >= threshold ? __expf(x - x_max) : 0.0f;
        }
        const float target = p * tpserve::block_reduce_sum(mass);
        // Largest t >= threshold whose kept mass is still at least the target.
        float lo = fmaxf(threshold, x_min);
        float hi = x_max;
        for (int step = 0; step < kBisectionSteps; ++step) {
            const float mid = 0.5f * (lo + hi);
            float kept = 0.0f;
            for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
                const float x = logit(v) * inv_t;
                kept += x >= mid ? __expf(x - x_max) : 0.0f;
            }
            if (tpserve::block_reduce_sum(kept) >= target) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        threshold = fmaxf(threshold, lo);
    }
    const unsigned long long seed = seeds[row];
    ArgMax best{tpserve::neg_inf(), 0x7fffffff};
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        const float x = logit(v) * inv_t;
        if (x >= threshold) {
            best = better(best, ArgMax{x + gumbel(seed, v), v});
        }
    }
    best = block_argmax(best);
    if (threadIdx.x == 0) {
        out[row] = best.index == 0x7fffffff ? 0u : (unsigned int)best.index;
    }
}

#define TPSERVE_SAMPLE(SUFFIX, T)                                                             \
    extern "C" __global__ void sample_##SUFFIX(                                               \
        unsigned int* __restrict__ out, const T* __restrict__ logits, int num_rows,           \
        int vocab_per_rank, int vocab, const float* __restrict__ temperature,                 \
        const int* __restrict__ top_k, const float* __restrict__ top_p,                       \
        const float* __restrict__ min_p, const unsigned long long* __restrict__ seeds) {      \
        sample_impl<T>(out, logits, num_rows, vocab_per_rank, vocab, temperature, top_k,      \
                       top_p, min_p, seeds);                                                  \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_SAMPLE)
