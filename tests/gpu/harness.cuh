// What the standalone kernel harnesses of tests/gpu share: the CUDA runtime check (and cuBLAS's,
// where its header is there), the activation type, Llama-3-8B's product shapes and their
// cuBLASLt descriptors, random device buffers, event and graph timers, and the copy bandwidth
// their ratios divide by.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#if __has_include(<cublas_v2.h>)
#include <cublas_v2.h>
#endif
#if __has_include(<cublasLt.h>)
#include <cublasLt.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

// Runs a CUDA runtime call; on an error, prints it with the call and the line, and exits 1.
#define CK(x)                                                                               \
    do {                                                                                    \
        cudaError_t e = (x);                                                                \
        if (e != cudaSuccess) {                                                             \
            printf("CUDA error %s at line %d: %s\n", #x, __LINE__, cudaGetErrorString(e)); \
            exit(1);                                                                        \
        }                                                                                   \
    } while (0)

#if __has_include(<cublas_v2.h>)
// The same for a cuBLAS call.
#define CB(x)                                                                       \
    do {                                                                            \
        cublasStatus_t status_ = (x);                                               \
        if (status_ != CUBLAS_STATUS_SUCCESS) {                                     \
            printf("cuBLAS error %d at line %d: %s\n", (int)status_, __LINE__, #x); \
            exit(1);                                                                \
        }                                                                           \
    } while (0)
#endif

typedef __nv_bfloat16 bf;
typedef __half hf;

// A linear product of a layer: `n` outputs of `k` inputs (a weight [n, k]).
struct ProductShape {
    const char* name;
    int n, k;
};
// Llama-3-8B's four products a layer, fused as the worker runs them (q|k|v, gate|up).
static const ProductShape LLAMA3_8B_PRODUCTS[4] = {
    {"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}};

// Host conversions between f32 and the activation types.
template <typename T> inline float to_f(T x);
template <> inline float to_f<bf>(bf x) { return __bfloat162float(x); }
template <> inline float to_f<hf>(hf x) { return __half2float(x); }
template <typename T> inline T from_f(float x);
template <> inline bf from_f<bf>(float x) { return __float2bfloat16(x); }
template <> inline hf from_f<hf>(float x) { return __float2half(x); }

// One run of `f` timed by events on the default stream, in microseconds.
template <typename F> inline double event_us(F f) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0));
    f();
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return ms * 1000.0;
}

// The median of `iters` runs of `f` (after 3 untimed ones), each timed alone by events on the
// default stream, in microseconds.
template <typename F> inline double time_us(F f, int iters = 20) {
    for (int i = 0; i < 3; ++i) f();
    std::vector<double> t;
    for (int i = 0; i < iters; ++i) t.push_back(event_us(f));
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

// Microseconds per launch of `run(i)` (i = 0 .. launches - 1, captured in that order) in one CUDA
// graph on `st`, replayed 5 times after one untimed replay.
template <typename F> inline double graph_us(cudaStream_t st, int launches, F run) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < launches; ++i) run(i);
    CK(cudaStreamEndCapture(st, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    CK(cudaGraphLaunch(exec, st));
    CK(cudaEventRecord(e0, st));
    const int reps = 5;
    for (int i = 0; i < reps; ++i) CK(cudaGraphLaunch(exec, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return ms * 1e3 / (reps * launches);
}

// A copy of `v` in device memory (cudaMalloc'd; the caller frees it).
template <typename E> inline E* upload(const std::vector<E>& v) {
    E* d;
    CK(cudaMalloc(&d, v.size() * sizeof(E)));
    CK(cudaMemcpy(d, v.data(), v.size() * sizeof(E), cudaMemcpyHostToDevice));
    return d;
}

// Device buffers of uniform [-1, 1] bf16 values (the GEMM floor's operands: products near the
// power limit run at a rate that depends on their data), made on the device.
__global__ void fill_uniform(bf* p, size_t n, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        p[i] = __float2bfloat16((float)(z >> 40) / (float)(1u << 24) * 2.f - 1.f);
    }
}
inline bf* random_buffer(size_t elems, uint64_t seed) {
    bf* p;
    CK(cudaMalloc(&p, elems * sizeof(bf)));
    fill_uniform<<<1024, 256>>>(p, elems, seed);
    CK(cudaGetLastError());
    return p;
}

#if __has_include(<cublasLt.h>)
// cuBLASLt's workspace for the harnesses' products (what the worker gives it on Hopper).
static const size_t LT_WORKSPACE = 32u << 20;

// One product's cuBLASLt descriptors, y[n, m] = x[n, k] W[m, k]^T as worker/src/cuda/blas.rs
// runs it (bf16 in and out, f32 accumulation), and up to `requested` of the heuristic's
// algorithms for it; with `sm_target` > 0, the products held to that many SMs
// (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET).
struct LtShape {
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    std::vector<cublasLtMatmulHeuristicResult_t> algos;
    int n, m, k;
};

inline LtShape lt_shape(cublasLtHandle_t lt, int n, int m, int k, int requested,
                        int sm_target = 0) {
    LtShape s;
    s.n = n, s.m = m, s.k = k;
    CB(cublasLtMatmulDescCreate(&s.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t t = CUBLAS_OP_T, nn = CUBLAS_OP_N;
    CB(cublasLtMatmulDescSetAttribute(s.desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
    CB(cublasLtMatmulDescSetAttribute(s.desc, CUBLASLT_MATMUL_DESC_TRANSB, &nn, sizeof(nn)));
    if (sm_target > 0) {
        CB(cublasLtMatmulDescSetAttribute(s.desc, CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET,
                                          &sm_target, sizeof(sm_target)));
    }
    CB(cublasLtMatrixLayoutCreate(&s.a, CUDA_R_16BF, k, m, k));
    CB(cublasLtMatrixLayoutCreate(&s.b, CUDA_R_16BF, k, n, k));
    CB(cublasLtMatrixLayoutCreate(&s.c, CUDA_R_16BF, m, n, m));
    cublasLtMatmulPreference_t pref;
    CB(cublasLtMatmulPreferenceCreate(&pref));
    CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &LT_WORKSPACE, sizeof(LT_WORKSPACE)));
    s.algos.resize(requested);
    int found = 0;
    CB(cublasLtMatmulAlgoGetHeuristic(lt, s.desc, s.a, s.b, s.c, s.c, pref, requested,
                                      s.algos.data(), &found));
    s.algos.resize(found);
    CB(cublasLtMatmulPreferenceDestroy(pref));
    if (found < 1) {
        printf("no cuBLASLt algorithm for %d x %d x %d (SM target %d)\n", n, m, k, sm_target);
        exit(1);
    }
    return s;
}

// `s`'s product with its algorithm `algo` on `stream` (`workspace`: LT_WORKSPACE bytes).
inline void gemm_lt(cublasLtHandle_t lt, const LtShape& s, int algo, bf* y, const bf* x,
                    const bf* w, void* workspace, cudaStream_t stream) {
    const float alpha = 1.f, beta = 0.f;
    CB(cublasLtMatmul(lt, s.desc, &alpha, w, s.a, x, s.b, &beta, y, s.c, y, s.c,
                      &s.algos[algo].algo, workspace, LT_WORKSPACE, stream));
}
#endif

// The next 24-bit value of a linear congruential sequence seeded by `s` (reproducible test data).
inline unsigned lcg_next(unsigned& s) {
    s = s * 1664525u + 1013904223u;
    return s >> 8;
}

// Launches `kernel` on `stream` with programmatic dependent launch allowed, as the worker's
// decode graphs launch their kernels (each waits for its inputs in common.cuh's
// wait_for_inputs, after what it may do before).
template <typename... KArgs, typename... Args>
inline void launch_pdl_smem(cudaStream_t stream, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                            size_t shared_bytes, Args... args) {
    cudaLaunchAttribute pdl = {};
    pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t c = {};
    c.attrs = &pdl;
    c.numAttrs = 1;
    c.stream = stream;
    c.gridDim = grid;
    c.blockDim = block;
    c.dynamicSmemBytes = shared_bytes;
    CK(cudaLaunchKernelEx(&c, kernel, static_cast<KArgs>(args)...));
}

// launch_pdl without dynamic shared memory.
template <typename... KArgs, typename... Args>
inline void launch_pdl(cudaStream_t stream, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                       Args... args) {
    launch_pdl_smem(stream, kernel, grid, block, 0, args...);
}

// A comma list of integers from the environment variable `name` ("1,4,8"), or `fallback` when
// it is not set.
inline std::vector<int> env_int_list(const char* name, std::vector<int> fallback) {
    const char* text = getenv(name);
    if (text == nullptr) return fallback;
    std::vector<int> list;
    for (const char* p = text; *p;) {
        list.push_back(atoi(p));
        while (*p && *p != ',') ++p;
        if (*p == ',') ++p;
    }
    return list;
}

// Device-to-device copy bandwidth on `stream`, read + write (as worker/src/cuda/floors.rs counts
// it: the floors' rate), in GB/s: the median of 10 copies of 2 GiB, each timed alone outside any
// graph (a captured copy runs as a slower copy node).
inline double copy_bandwidth_gbs(cudaStream_t stream) {
    const size_t bytes = 2ull << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<double> ms;
    for (int i = 0; i < 10; ++i) {
        CK(cudaEventRecord(e0, stream));
        CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream));
        CK(cudaEventRecord(e1, stream));
        CK(cudaEventSynchronize(e1));
        float t;
        CK(cudaEventElapsedTime(&t, e0, e1));
        ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(a));
    CK(cudaFree(b));
    return 2.0 * bytes / (ms[ms.size() / 2] * 1e6);
}

// Double-precision causal paged attention of token `t`'s query head `h` (scale 1/sqrt(hd)) in
// the attention harnesses' batch `b`: sequences s of `prior` cached keys and `rows` query rows
// from row row0[s], queries at q[t * q_stride + h * hd], caches [blocks][block][kvh][hd] through
// `tables` (`width` blocks a sequence), query head h on KV head h / (qh / kvh).
template <typename B>
inline void reference_attention(const B& b, int block, int t, int h, std::vector<double>& o) {
    size_t s = 0;
    while (s + 1 < b.seqs.size() && b.row0[s + 1] <= t) ++s;
    const int pos = b.seqs[s].prior + (t - b.row0[s]);
    const int g = h / (b.qh / b.kvh);
    const double scale = 1.0 / std::sqrt((double)b.hd);
    auto slot = [&](int j) {
        return (size_t)b.tables[s * b.width + j / block] * block + j % block;
    };
    std::vector<double> p(pos + 1);
    double mx = -1e300;
    for (int j = 0; j <= pos; ++j) {
        double d = 0;
        for (int e = 0; e < b.hd; ++e)
            d += (double)to_f(b.q[(size_t)t * b.q_stride + h * b.hd + e]) *
                 to_f(b.kc[(slot(j) * b.kvh + g) * b.hd + e]);
        p[j] = d * scale;
        mx = std::max(mx, p[j]);
    }
    double sum = 0;
    for (int j = 0; j <= pos; ++j) sum += (p[j] = std::exp(p[j] - mx));
    o.assign(b.hd, 0.0);
    for (int j = 0; j <= pos; ++j) {
        for (int e = 0; e < b.hd; ++e)
            o[e] += p[j] / sum * to_f(b.vc[(slot(j) * b.kvh + g) * b.hd + e]);
    }
}
