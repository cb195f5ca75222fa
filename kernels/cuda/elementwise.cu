// Small element-wise kernels around the model: bias add, row gather, the random fill that
// initialises dummy weights on the device, and the block-table updates of a step.
#include "common.cuh"

// add_bias_{bf16,f16}: x[t, i] += bias[i] for every row t (rounded to T once).
//
// Arguments:
//   x     T   [num_tokens, d]   read and written
//   bias  T   [d]
//   d     i32
// Launch: grid (num_tokens, 1, 1); block (any, 1, 1), e.g. 256.
template <typename T>
__device__ void add_bias_impl(T* __restrict__ x, const T* __restrict__ bias, int d) {
    tpserve::wait_for_inputs();
    T* row = x + (long long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        row[i] = tpserve::from_float<T>(tpserve::to_float(row[i]) + tpserve::to_float(bias[i]));
    }
}

// gather_rows_{bf16,f16}: out[r, :] = x[rows[r], :].
//
// Arguments:
//   out   T   [num_out, d]   written
//   x     T   [num_in, d]
//   rows  i32 [num_out]      each < num_in
//   d     i32
// Launch: grid (num_out, 1, 1); block (any, 1, 1), e.g. 256.
template <typename T>
__device__ void gather_rows_impl(T* __restrict__ out, const T* __restrict__ x,
                                 const int* __restrict__ rows, int d) {
    tpserve::wait_for_inputs();
    const T* src = x + (long long)rows[blockIdx.x] * d;
    T* dst = out + (long long)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        dst[i] = src[i];
    }
}

// fill_uniform_{bf16,f16}: out[i] = low + (high - low) * u_i with u_i uniform in [0, 1) from a
// hash of (seed, i): the same seed gives the same tensor on every GPU and every run.
//
// Arguments:
//   out   T   [n]   written
//   n     i64
//   seed  u64
//   low   f32
//   high  f32
// Launch: any 1-D grid of 1-D blocks; threads stride over [0, n).
__device__ __forceinline__ unsigned long long fill_mix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

template <typename T>
__device__ void fill_uniform_impl(T* __restrict__ out, long long n, unsigned long long seed,
                                  float low, float high) {
    tpserve::wait_for_inputs();
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned long long h = fill_mix64(seed ^ fill_mix64((unsigned long long)i));
        const float u = (float)(h >> 40) * (1.0f / 16777216.0f);
        out[i] = tpserve::from_float<T>(low + (high - low) * u);
    }
}

// set_entries_{bf16,f16}: table[updates[2 u]] = updates[2 u + 1] for u < count: the changes
// to the persistent block tables of a step (blocks appended to requests since their last step),
// applied on the device so the tables never travel whole. (Independent of the activation dtype;
// instantiated per dtype like every kernel, so each dtype's module is complete.)
//
// Arguments:
//   table    i32 [*]            written at the given indices (distinct within one launch)
//   updates  i32 [count, 2]     (index, value) pairs
//   count    i32
// Launch: grid (ceil(count / 256), 1, 1); block (256, 1, 1).
__device__ void set_entries_impl(int* __restrict__ table, const int* __restrict__ updates,
                                 int count) {
    tpserve::wait_for_inputs();
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u < count) {
        table[updates[2 * u]] = updates[2 * u + 1];
    }
}

#define TPSERVE_ELEMENTWISE(SUFFIX, T)                                                        \
    extern "C" __global__ void add_bias_##SUFFIX(T* __restrict__ x,                           \
                                                 const T* __restrict__ bias, int d) {         \
        add_bias_impl<T>(x, bias, d);                                                         \
    }                                                                                         \
    extern "C" __global__ void gather_rows_##SUFFIX(T* __restrict__ out,                      \
                                                    const T* __restrict__ x,                  \
                                                    const int* __restrict__ rows, int d) {    \
        gather_rows_impl<T>(out, x, rows, d);                                                 \
    }                                                                                         \
    extern "C" __global__ void fill_uniform_##SUFFIX(T* __restrict__ out, long long n,        \
                                                     unsigned long long seed, float low,      \
                                                     float high) {                            \
        fill_uniform_impl<T>(out, n, seed, low, high);                                        \
    }                                                                                         \
    extern "C" __global__ void set_entries_##SUFFIX(int* __restrict__ table,                  \
                                                    const int* __restrict__ updates,          \
                                                    int count) {                              \
        set_entries_impl(table, updates, count);                                              \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_ELEMENTWISE)
