// Token embedding lookup, vocabulary-parallel.
#include "common.cuh"

// embedding_{bf16,f16}: out[t, :] = table[id - vocab_start, :] when
// vocab_start <= id < vocab_start + vocab_len, else zeros, where id is fed[feed[t]] when feed is
// given and feed[t] >= 0 (the token the step before sampled, still on the device), else ids[t].
//
// With tensor parallelism each rank holds rows [vocab_start, vocab_start + vocab_len) of the
// embedding; the zero rows let an all-reduce (sum) over the ranks assemble the full result. One
// rank (or no tensor parallelism) passes vocab_start = 0 and vocab_len = vocab size.
//
// Arguments:
//   out          T   [num_tokens, hidden]     written
//   table        T   [vocab_len, hidden]      this rank's rows of the embedding
//   ids          u32 [num_tokens]             token ids in the full vocabulary
//   feed         i32 [num_tokens] or null     a row of fed, or -1: take ids[t]
//   fed          u32 [..]                     the previous step's sampled tokens
//   hidden       i32                          row length of out and table
//   vocab_start  i32                          first token id this rank holds
//   vocab_len    i32                          number of rows of table
// Launch: grid (num_tokens, 1, 1); block (any, 1, 1), e.g. 256; threads stride over the row.
template <typename T>
__device__ void embedding_impl(T* __restrict__ out, const T* __restrict__ table,
                               const unsigned int* __restrict__ ids,
                               const int* __restrict__ feed, const unsigned int* __restrict__ fed,
                               int hidden, int vocab_start, int vocab_len) {
    tpserve::wait_for_inputs();
    const long long token = blockIdx.x;
    const int from = feed != nullptr ? feed[token] : -1;
    const unsigned int id = from >= 0 ? fed[from] : ids[token];
    const long long local = (long long)id - vocab_start;
    T* dst = out + token * hidden;
    if (local < 0 || local >= vocab_len) {
        const T zero = tpserve::from_float<T>(0.0f);
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            dst[i] = zero;
        }
        return;
    }
    const T* src = table + local * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        dst[i] = src[i];
    }
}

#define TPSERVE_EMBEDDING(SUFFIX, T)                                                          \
    extern "C" __global__ void embedding_##SUFFIX(T* __restrict__ out,                        \
                                                  const T* __restrict__ table,                \
                                                  const unsigned int* __restrict__ ids,       \
                                                  const int* __restrict__ feed,               \
                                                  const unsigned int* __restrict__ fed,       \
                                                  int hidden, int vocab_start, int vocab_len) { \
        embedding_impl<T>(out, table, ids, feed, fed, hidden, vocab_start, vocab_len);        \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_EMBEDDING)
