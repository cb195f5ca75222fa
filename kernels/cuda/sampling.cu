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
// Launch: grid (num_rows, 1, 1); block (1024, 1, 1). With 2-byte T and vocab_per_rank a multiple
// of 8 the logits must be 16-byte aligned (greedy rows read them 16 bytes at a time).
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
        if (sizeof(T) == 2 && vocab_per_rank % 8 == 0) {
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
        // Banned and masked entries (-inf, sample_processed_*) do not bound the bisections.
        if (x > tpserve::neg_inf()) {
            local_min = fminf(local_min, x);
        }
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

// The logit processing of a step whose rows ask for more than a draw (issue 13): penalties,
// `logit_bias`, `min_tokens`, `bad_words` and structured outputs' allowed-token masks change a
// row's logits before the draw, and log probabilities are read from its raw logits. The host
// builds each row's sparse edits from the request's history (worker/src/sampler/processors.rs)
// and uploads them with the masks; these kernels apply them, draw, and gather the log
// probabilities, so the vocabulary never leaves the GPU.
//
// One edit: a vocabulary entry and what happens to its logit, in vLLM's order (ban, bias,
// repetition penalty, then `sub`), as LogitEdit::apply on the host.
struct LogitEdit {
    unsigned int token;
    unsigned int ban;  // nonzero: the logit becomes -inf
    float bias;        // added first
    float repetition;  // 1: none; else x > 0 ? x / r : x * r
    float sub;         // subtracted last
};

namespace {

__device__ __forceinline__ float apply_edit(const LogitEdit& e, float x) {
    if (e.ban != 0u) {
        return tpserve::neg_inf();
    }
    x += e.bias;
    if (e.repetition != 1.0f) {
        x = x > 0.0f ? x / e.repetition : x * e.repetition;
    }
    return x - e.sub;
}

// The logit of vocabulary entry v of a row spread over tensor-parallel ranks (see sample_*).
template <typename T>
__device__ __forceinline__ float spread_logit(const T* __restrict__ logits, int row,
                                              int row_stride, int vocab_per_rank, int v) {
    const int rank = v / vocab_per_rank;
    return tpserve::to_float(logits[(long long)rank * row_stride * vocab_per_rank +
                                    (long long)row * vocab_per_rank + (v - rank * vocab_per_rank)]);
}

}  // namespace

// process_logits_{bf16,f16}: the edited f32 logits of each row, ready for sample_processed_*.
//
// edited[row, v] = -inf where the row has a mask (mask_index[row] >= 0) whose bit v (bit v % 32
// of word v / 32 of mask mask_index[row]) is clear; else apply(edit) for the row's edit of v, if
// any; else the raw logit. (Edits first and the mask over them, as the host path.)
//
// Arguments:
//   edited        f32 [num_rows, vocab]      written
//   logits        T   laid out as sample_*'s, with row_stride rows per rank slice
//   row_stride    i32                        rows of each rank slice (>= num_rows: a graph's
//                                            padded batch)
//   vocab_per_rank, vocab   i32
//   edit_offsets  i32 [num_rows + 1]         row r's edits are edits[edit_offsets[r] ..
//                                            edit_offsets[r + 1]], at most one per token
//   edits         LogitEdit [edit_offsets[num_rows]]
//   mask_index    i32 [num_rows]             -1: no mask
//   masks         u32 [masks, words]
//   words         i32                        ceil(vocab / 32)
// Launch: grid (num_rows, 1, 1); block (1024, 1, 1).
template <typename T>
__device__ void process_logits_impl(float* __restrict__ edited, const T* __restrict__ logits,
                                    int row_stride, int vocab_per_rank, int vocab,
                                    const int* __restrict__ edit_offsets,
                                    const LogitEdit* __restrict__ edits,
                                    const int* __restrict__ mask_index,
                                    const unsigned int* __restrict__ masks, int words) {
    tpserve::wait_for_inputs();
    const int row = blockIdx.x;
    float* out = edited + (long long)row * vocab;
    const int m = mask_index[row];
    const unsigned int* mask = m >= 0 ? masks + (long long)m * words : nullptr;
    auto allowed = [&](int v) { return mask == nullptr || ((mask[v >> 5] >> (v & 31)) & 1u); };
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        out[v] = allowed(v) ? spread_logit(logits, row, row_stride, vocab_per_rank, v)
                            : tpserve::neg_inf();
    }
    __syncthreads();
    for (int i = edit_offsets[row] + threadIdx.x; i < edit_offsets[row + 1]; i += blockDim.x) {
        const LogitEdit e = edits[i];
        const int v = (int)e.token;
        if (v < vocab && allowed(v)) {
            out[v] = apply_edit(e, spread_logit(logits, row, row_stride, vocab_per_rank, v));
        }
    }
}

// sample_processed_{bf16,f16}: sample_* over process_logits_*'s f32 rows ([num_rows, vocab],
// one rank slice); the arguments and launch are sample_*'s with vocab_per_rank = vocab. The
// dtype suffix only names the model's dtype: every instance reads f32.
//
// token_logprobs_{bf16,f16}: per row, the log probabilities (log_softmax of the raw logits, as
// worker/src/sampler/logprobs.rs computes on the host) of one token and of the row's `top_n`
// most likely tokens (most likely first, lowest id on ties), written as one record of
// kLogprobRecord u32 words:
//   [0] the sampled token (sampled[row]), [1] the scored token (targets[row] >= 0 ? targets[row]
//   : sampled[row]), [2] its log probability (f32 bits), [3] its rank (1 + tokens with a larger
//   logit), [4 + i] the i-th top token, [4 + kMaxTopLogprobs + i] its log probability (f32
//   bits), for i < top_n; a row with top_n < 0 gets [0] only.
//
// Arguments:
//   records    u32 [num_rows, kLogprobRecord]   written
//   logits     T   laid out as process_logits_*'s (row_stride rows per rank slice)
//   row_stride, vocab_per_rank, vocab   i32
//   targets    i32 [num_rows]   -1: the sampled token
//   sampled    u32 [num_rows]   sample_processed_*'s output
//   top_n      i32 [num_rows]   -1: no log probabilities; else 0..=kMaxTopLogprobs
// Launch: grid (num_rows, 1, 1); block (1024, 1, 1).
constexpr int kMaxTopLogprobs = 20;
constexpr int kLogprobRecord = 4 + 2 * kMaxTopLogprobs;

template <typename T>
__device__ void token_logprobs_impl(unsigned int* __restrict__ records,
                                    const T* __restrict__ logits, int row_stride,
                                    int vocab_per_rank, int vocab, const int* __restrict__ targets,
                                    const unsigned int* __restrict__ sampled,
                                    const int* __restrict__ top_n) {
    tpserve::wait_for_inputs();
    const int row = blockIdx.x;
    unsigned int* rec = records + (long long)row * kLogprobRecord;
    const int n = min(top_n[row], kMaxTopLogprobs);
    if (threadIdx.x == 0) {
        rec[0] = sampled[row];
    }
    if (n < 0) {
        return;
    }
    auto logit = [&](int v) { return spread_logit(logits, row, row_stride, vocab_per_rank, v); };
    float local_max = tpserve::neg_inf();
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        local_max = fmaxf(local_max, logit(v));
    }
    const float x_max = block_reduce_max(local_max);
    float local_sum = 0.0f;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        local_sum += expf(logit(v) - x_max);
    }
    const float lse = x_max + logf(tpserve::block_reduce_sum(local_sum));
    const int target = targets[row] >= 0 ? targets[row] : (int)sampled[row];
    const float x_target =
        target >= 0 && target < vocab ? logit(target) : tpserve::neg_inf();
    float above = 0.0f;
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        above += logit(v) > x_target ? 1.0f : 0.0f;
    }
    const float rank = tpserve::block_reduce_sum(above);
    if (threadIdx.x == 0) {
        rec[1] = (unsigned int)target;
        rec[2] = __float_as_uint(x_target - lse);
        rec[3] = 1u + (unsigned int)rank;
    }
    // The top tokens one at a time: each pick is the best entry strictly after the previous one
    // in the order (logit descending, id ascending).
    ArgMax prev{tpserve::pos_inf(), -1};
    for (int i = 0; i < n && i < vocab; ++i) {
        ArgMax best{tpserve::neg_inf(), 0x7fffffff};
        for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
            const float x = logit(v);
            if (x < prev.value || (x == prev.value && v > prev.index)) {
                best = better(best, ArgMax{x, v});
            }
        }
        prev = block_argmax(best);
        if (threadIdx.x == 0) {
            rec[4 + i] = (unsigned int)prev.index;
            rec[4 + kMaxTopLogprobs + i] = __float_as_uint(prev.value - lse);
        }
    }
}

#define TPSERVE_LOGIT_EXTRAS(SUFFIX, T)                                                       \
    extern "C" __global__ void process_logits_##SUFFIX(                                       \
        float* __restrict__ edited, const T* __restrict__ logits, int row_stride,             \
        int vocab_per_rank, int vocab, const int* __restrict__ edit_offsets,                  \
        const LogitEdit* __restrict__ edits, const int* __restrict__ mask_index,              \
        const unsigned int* __restrict__ masks, int words) {                                  \
        process_logits_impl<T>(edited, logits, row_stride, vocab_per_rank, vocab,             \
                               edit_offsets, edits, mask_index, masks, words);                \
    }                                                                                         \
    extern "C" __global__ void sample_processed_##SUFFIX(                                     \
        unsigned int* __restrict__ out, const float* __restrict__ logits, int num_rows,       \
        int vocab_per_rank, int vocab, const float* __restrict__ temperature,                 \
        const int* __restrict__ top_k, const float* __restrict__ top_p,                       \
        const float* __restrict__ min_p, const unsigned long long* __restrict__ seeds) {      \
        sample_impl<float>(out, logits, num_rows, vocab_per_rank, vocab, temperature, top_k,  \
                           top_p, min_p, seeds);                                              \
    }                                                                                         \
    extern "C" __global__ void token_logprobs_##SUFFIX(                                       \
        unsigned int* __restrict__ records, const T* __restrict__ logits, int row_stride,     \
        int vocab_per_rank, int vocab, const int* __restrict__ targets,                       \
        const unsigned int* __restrict__ sampled, const int* __restrict__ top_n) {            \
        token_logprobs_impl<T>(records, logits, row_stride, vocab_per_rank, vocab, targets,   \
                               sampled, top_n);                                               \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_LOGIT_EXTRAS)
