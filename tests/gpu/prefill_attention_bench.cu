// The prefill attention kernels (kernels/cuda/attention_mma.cu, and attention_wgmma.cu's Hopper
// kernel: build for sm_90a) outside tpserve (issue 9): checks
// it against a double-precision CPU reference on batches that mix sequences, cached prefixes
// (chunk offsets), tile sizes, head sizes 64 and 128, GQA groups 1, 3, 4 and 8, bf16 and f16, and
// times it on one long prompt (2,048 and 8,192 tokens from position 0, Llama-3-8B heads) in the
// launch shapes given below, with tiles in the host's order and longest first. The FP8 KV cache
// entry points (`--kv-cache-dtype fp8`, issue 12) run on caches whose values are E4M3 values
// times power-of-two scales (keys 1/2, values 1/4), given to them as E4M3 bytes and scales and to
// the same shape in the dtype as those values: their outputs must be bit-identical (the
// conversion is exact and the scales fold in exactly), and are timed beside it.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -Xcompiler -fopenmp -I kernels/cuda \
//       tests/gpu/prefill_attention_bench.cu -o /tmp/pa -lgomp
//   /tmp/pa
// With -DOLD_WGMMA='"path"' it also checks and times an earlier attention_wgmma.cu whose names
// were prefixed old_ (git show REV:kernels/cuda/attention_wgmma.cu | sed
// 's/paged_attention_wgmma_/old_paged_attention_wgmma_/g;
// s/TPSERVE_PAGED_ATTENTION_WGMMA/TPSERVE_OLD_PAGED_ATTENTION_WGMMA/g' > path; an absolute path),
// in the worker's shape then (4 warpgroups, 64-key tiles; edit old_wgmma_variant for another),
// and requires every Hopper shape of 64-key tiles to give its bits on the long prompts. Files
// from e65d409 on take their stages as a template argument: -DOLD_WGMMA_STAGES=4 (and from
// 73a102f on their cache element too: -DOLD_WGMMA_CACHE).
// With -DOLD_MMA='"path"' it also times, and compares every output row with, an earlier version
// of the kernel file whose names were renamed old_paged_attention_mma* (for a before/after in
// one run: git show REV:kernels/cuda/attention_mma.cu | sed
// 's/paged_attention_mma/old_paged_attention_mma/g;
// s/TPSERVE_PAGED_ATTENTION_MMA/TPSERVE_OLD_PAGED_ATTENTION_MMA/g' > path).
// Exit status 1 if any check fails (an error above the limit, or a non-finite output).
#include "common.cuh"
namespace k_new {
#include "attention_mma.cu"
}
#undef TPSERVE_PAGED_ATTENTION_MMA
namespace k_wgmma {
#include "attention_wgmma.cu"
}
#undef TPSERVE_PAGED_ATTENTION_WGMMA
#ifdef OLD_WGMMA
namespace k_old_wgmma {
#include OLD_WGMMA
}
#undef TPSERVE_OLD_PAGED_ATTENTION_WGMMA
#endif
#ifdef OLD_MMA
namespace k_old {
#include OLD_MMA
}
#endif

#include "harness.cuh"

#include <cuda_fp8.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static const int BLOCK = 16;

// One launch shape of the kernel: warps per block, m-tiles per warp, keys per tile; caches of
// element C (T, or E4M3 bytes with scales).
template <typename T, typename C, int HD, int W, int MT, int KEYS>
__global__ void __launch_bounds__(32 * W) variant(T* out, const T* q, const C* kc, const C* vc,
                                                  const int* tables, const int* tiles, int qh,
                                                  int kvh, int block, int width, int q_stride,
                                                  float scale, float k_scale, float v_scale) {
    k_new::paged_attention_mma_impl<T, C, HD, W, MT, KEYS>(out, q, kc, vc, tables, tiles, qh, kvh,
                                                            block, width, q_stride, scale,
                                                            k_scale, v_scale);
}

// A launch shape of the Hopper kernel (attention_wgmma.cu): warpgroups per block, keys per tile,
// blocks an SM should hold (the register budget), stages of the K and V ring; caches of element
// C (T, or E4M3 bytes with scales).
template <typename T, int WG, int KEYS, int MIN_BLOCKS, int STAGES, typename C>
__global__ void __launch_bounds__(128 * WG, MIN_BLOCKS)
    wgmma_variant(T* out, const T* q, const C* kc, const C* vc, const int* tables,
                  const int* tiles, int qh, int kvh, int block, int width, int q_stride,
                  float scale, float k_scale, float v_scale) {
    k_wgmma::paged_attention_wgmma_impl<T, WG, KEYS, STAGES, C>(out, q, kc, vc, tables, tiles, qh,
                                                                kvh, block, width, q_stride, scale,
                                                                k_scale, v_scale);
}

#ifdef OLD_WGMMA
#if defined(OLD_WGMMA_STAGES) && defined(OLD_WGMMA_CACHE)
#define OLD_WGMMA_ARGS T, 4, 64, OLD_WGMMA_STAGES, T
#elif defined(OLD_WGMMA_STAGES)
#define OLD_WGMMA_ARGS T, 4, 64, OLD_WGMMA_STAGES
#else
#define OLD_WGMMA_ARGS T, 4, 64
#endif
// The earlier Hopper kernel in the worker's shape then: 4 warpgroups, key tiles of 64.
template <typename T>
__global__ void __launch_bounds__(512, 1)
    old_wgmma_variant(T* out, const T* q, const T* kc, const T* vc, const int* tables,
                      const int* tiles, int qh, int kvh, int block, int width, int q_stride,
                      float scale, float k_scale, float v_scale) {
    k_old_wgmma::old_paged_attention_wgmma_impl<OLD_WGMMA_ARGS>(out, q, kc, vc, tables, tiles, qh,
                                                               kvh, block, width, q_stride, scale,
                                                               k_scale, v_scale);
}
#endif

// The FP8 caches' scales: powers of two, so that folding them in is exact.
static const float K_SCALE = 0.5f, V_SCALE = 0.25f;

// x / scale rounded to E4M3 (saturating), as the cache holds it.
static unsigned char to_e4m3(float x, float scale) {
    return __nv_fp8_e4m3(x / scale).__x;
}
static float from_e4m3(unsigned char b, float scale) {
    __nv_fp8_e4m3 v;
    v.__x = b;
    return (float)v * scale;
}

struct Seq {
    int prior;  // keys already in the cache before this chunk
    int rows;   // query rows of this chunk
};

// A batch on the device: Q rows, paged caches with shuffled blocks, block tables. With `fp8`,
// the caches' values are E4M3 values times K_SCALE / V_SCALE, also held as E4M3 bytes.
template <typename T> struct Batch {
    int hd, qh, kvh, q_stride, tokens = 0, width = 0;
    std::vector<Seq> seqs;
    std::vector<int> row0, start_block;
    std::vector<T> q, kc, vc;
    std::vector<int> tables;
    T *d_q = nullptr, *d_kc = nullptr, *d_vc = nullptr, *d_out = nullptr;
    unsigned char *d_kc8 = nullptr, *d_vc8 = nullptr;
    int* d_tables = nullptr;

    Batch(int hd_, int qh_, int kvh_, std::vector<Seq> s, unsigned seed, bool fp8 = false)
        : hd(hd_), qh(qh_), kvh(kvh_), seqs(std::move(s)) {
        q_stride = (qh + 2 * kvh) * hd;
        int blocks = 0;
        for (const Seq& x : seqs) {
            row0.push_back(tokens);
            tokens += x.rows;
            const int nb = (x.prior + x.rows + BLOCK - 1) / BLOCK;
            width = std::max(width, nb);
            blocks += nb;
        }
        std::mt19937 rng(seed);
        std::uniform_real_distribution<float> u(-1.0f, 1.0f);
        q.resize((size_t)tokens * q_stride);
        // Q larger than K, so that the softmax is peaked and errors in it show.
        for (auto& v : q) v = from_f<T>(4.0f * u(rng));
        const size_t cache = (size_t)blocks * BLOCK * kvh * hd;
        kc.resize(cache);
        vc.resize(cache);
        for (auto& v : kc) v = from_f<T>(u(rng));
        for (auto& v : vc) v = from_f<T>(u(rng));
        if (fp8) {
            std::vector<unsigned char> kc8(cache), vc8(cache);
            for (size_t i = 0; i < cache; ++i) {
                kc8[i] = to_e4m3(to_f(kc[i]), K_SCALE);
                vc8[i] = to_e4m3(to_f(vc[i]), V_SCALE);
                kc[i] = from_f<T>(from_e4m3(kc8[i], K_SCALE));  // exact
                vc[i] = from_f<T>(from_e4m3(vc8[i], V_SCALE));
            }
            CK(cudaMalloc(&d_kc8, cache));
            CK(cudaMalloc(&d_vc8, cache));
            CK(cudaMemcpy(d_kc8, kc8.data(), cache, cudaMemcpyHostToDevice));
            CK(cudaMemcpy(d_vc8, vc8.data(), cache, cudaMemcpyHostToDevice));
        }
        std::vector<int> ids(blocks);
        for (int i = 0; i < blocks; ++i) ids[i] = i;
        std::shuffle(ids.begin(), ids.end(), rng);
        tables.assign((size_t)seqs.size() * width, 0);
        int next = 0;
        for (size_t i = 0; i < seqs.size(); ++i) {
            const int nb = (seqs[i].prior + seqs[i].rows + BLOCK - 1) / BLOCK;
            for (int b = 0; b < nb; ++b) tables[i * width + b] = ids[next++];
        }
        CK(cudaMalloc(&d_q, q.size() * sizeof(T)));
        CK(cudaMalloc(&d_kc, cache * sizeof(T)));
        CK(cudaMalloc(&d_vc, cache * sizeof(T)));
        CK(cudaMalloc(&d_out, (size_t)tokens * qh * hd * sizeof(T)));
        CK(cudaMalloc(&d_tables, tables.size() * sizeof(int)));
        CK(cudaMemcpy(d_q, q.data(), q.size() * sizeof(T), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_kc, kc.data(), cache * sizeof(T), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_vc, vc.data(), cache * sizeof(T), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_tables, tables.data(), tables.size() * sizeof(int),
                      cudaMemcpyHostToDevice));
    }
    ~Batch() {
        cudaFree(d_q);
        cudaFree(d_kc);
        cudaFree(d_vc);
        cudaFree(d_out);
        cudaFree(d_tables);
        cudaFree(d_kc8);
        cudaFree(d_vc8);
    }

    // Tiles of at most `items / group` rows, as worker/src/cuda/attention_plan.rs cuts them;
    // longest first when `reverse`.
    std::vector<int> tiles(int items, bool reverse) const {
        const int tile_rows = std::max(1, items / (qh / kvh));
        std::vector<int> t;
        for (size_t i = 0; i < seqs.size(); ++i) {
            for (int r = 0; r < seqs[i].rows; r += tile_rows) {
                const int rows = std::min(tile_rows, seqs[i].rows - r);
                t.insert(t.end(), {(int)i, row0[i] + r, rows, seqs[i].prior + r});
            }
        }
        if (reverse) {
            std::vector<int> r;
            for (size_t k = t.size(); k >= 4; k -= 4) r.insert(r.end(), t.begin() + k - 4, t.begin() + k);
            t = r;
        }
        return t;
    }

    // Attention FLOPs (two products of 2 * hd per key and query head).
    double flops() const {
        double f = 0;
        for (const Seq& x : seqs) {
            for (int r = 0; r < x.rows; ++r) f += 4.0 * hd * qh * (x.prior + r + 1);
        }
        return f;
    }

    // Double-precision reference of token `t`'s head `h`.
    void reference(int t, int h, std::vector<double>& o) const {
        reference_attention(*this, BLOCK, t, h, o);
    }
};

typedef void (*Kernel)(void*, const void*, const void*, const void*, const int*, const int*, int,
                       int, int, int, int, float);

struct Shape {
    std::string name;
    int items, threads, smem;
    const void* fn;
    bool fp8kv;  // reads the batch's E4M3 caches
};

template <typename T, int HD, int W, int MT, int KEYS, typename C = T> static Shape shape() {
    const void* fn = (const void*)variant<T, C, HD, W, MT, KEYS>;
    const int smem = k_new::paged_attention_mma_smem_bytes<T, HD, W, MT, KEYS>();
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const bool fp8kv = sizeof(C) == 1;
    char name[64];
    snprintf(name, sizeof name, "%d warps x %d m-tiles, %d keys%s", W, MT, KEYS,
             fp8kv ? ", FP8 KV" : "");
    return {name, 16 * W * MT, 32 * W, smem, fn, fp8kv};
}

template <typename T, int WG, int KEYS, int MIN_BLOCKS, int STAGES, typename C = T>
static Shape wgmma_shape() {
    const void* fn = (const void*)wgmma_variant<T, WG, KEYS, MIN_BLOCKS, STAGES, C>;
    const int smem = k_wgmma::paged_attention_wgmma_smem_bytes<T, WG, KEYS, STAGES, C>();
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    const bool fp8kv = sizeof(C) == 1;
    char name[80];
    snprintf(name, sizeof name, "wgmma %d warpgroups, %d keys, %d/SM, %d stages%s", WG, KEYS,
             MIN_BLOCKS, STAGES, fp8kv ? ", FP8 KV" : "");
    return {name, 64 * WG, 128 * WG, smem, fn, fp8kv};
}

#ifdef OLD_WGMMA
template <typename T> static Shape old_wgmma_shape() {
    const void* fn = (const void*)old_wgmma_variant<T>;
    const int smem = k_old_wgmma::old_paged_attention_wgmma_smem_bytes<OLD_WGMMA_ARGS>();
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return {"before: wgmma 4 warpgroups, 64 keys", 256, 512, smem, fn, false};
}
#endif

// Launches `sh` on `b` with `tiles` (on the device); returns nothing, checks the launch.
template <typename T>
static void launch(const Shape& sh, Batch<T>& b, const int* d_tiles, int num_tiles) {
    float scale = 1.0f / std::sqrt((float)b.hd);
    float ks = sh.fp8kv ? K_SCALE : 1.0f, vs = sh.fp8kv ? V_SCALE : 1.0f;
    void* kc = sh.fp8kv ? (void*)b.d_kc8 : (void*)b.d_kc;
    void* vc = sh.fp8kv ? (void*)b.d_vc8 : (void*)b.d_vc;
    if (kc == nullptr) {
        fprintf(stderr, "an FP8 KV shape on a batch without FP8 caches\n");
        exit(2);
    }
    void* args[] = {&b.d_out,    &b.d_q,     &kc,    &vc, &b.d_tables, &d_tiles, &b.qh, &b.kvh,
                    (void*)&BLOCK, &b.width, &b.q_stride, &scale, &ks,  &vs};
    CK(cudaLaunchKernel(sh.fn, dim3(b.kvh, num_tiles), dim3(sh.threads), args, sh.smem, 0));
}

#ifdef OLD_MMA
// The earlier kernel file's bf16 entry point for this head size (4 warps, 64 items): the long
// prompts' "before".
template <typename T> static Shape old_shape(int hd);
template <> Shape old_shape<bf>(int hd) {
    return {"before (old file)", 64, 128, 0,
            hd == 64 ? (const void*)k_old::old_paged_attention_mma_hd64_bf16
                     : (const void*)k_old::old_paged_attention_mma_hd128_bf16};
}
template <typename T>
static void launch_old(const Shape& sh, Batch<T>& b, const int* d_tiles, int num_tiles) {
    float scale = 1.0f / std::sqrt((float)b.hd);
    void* unused = nullptr;
    int one = 1, zero = 0;
    float ks = 1.0f, vs = 1.0f;
    // Every parameter of the entry point, the cache's scales last (an array shorter than the
    // parameter list is read past its end).
    void* args[] = {&b.d_out,    &unused, &unused, &b.d_q, &b.d_kc, &b.d_vc,
                    &b.d_tables, &d_tiles, &b.qh,  &b.kvh, (void*)&BLOCK, &b.width,
                    &b.q_stride, &one,    &zero,   &scale, &ks,     &vs};
    CK(cudaLaunchKernel(sh.fn, dim3(num_tiles, b.kvh), dim3(sh.threads), args, 0, 0));
}
#endif

// Launches `sh` on `b`: the earlier file's entry point when `old`, else a launch shape of this
// one.
template <typename T>
static void launch_shape(const Shape& sh, Batch<T>& b, const int* d_tiles, int num_tiles,
                         bool old) {
#ifdef OLD_MMA
    if (old) {
        launch_old(sh, b, d_tiles, num_tiles);
        return;
    }
#endif
    (void)old;
    launch(sh, b, d_tiles, num_tiles);
}

static int failures = 0;

template <typename T>
static double max_diff(const std::vector<T>& a, const std::vector<T>& b, bool* finite);

// Checks that a shape's output equals another's bit for bit (by default: an FP8 KV shape's, the
// dtype's on the same values).
template <typename T>
static void identical(const char* what, const Shape& sh, const std::vector<T>& out,
                      const std::vector<T>& same, const char* to = "the dtype's cache") {
    const bool ok = out.size() == same.size() &&
                    std::memcmp(out.data(), same.data(), out.size() * sizeof(T)) == 0;
    if (!ok) ++failures;
    bool finite = true;
    const double d = out.size() == same.size() ? max_diff(out, same, &finite) : -1.0;
    printf("%-4s %-44s %-34s bit-identical to %s (max |diff| %.5f)\n", ok ? "PASS" : "FAIL",
           what, sh.name.c_str(), to, d);
}

// Runs `sh` on `b` and returns the output rows.
template <typename T>
static std::vector<T> run(const Shape& sh, Batch<T>& b, bool reverse, bool old = false) {
    std::vector<int> tiles = b.tiles(sh.items, reverse);
    int* d_tiles;
    CK(cudaMalloc(&d_tiles, tiles.size() * sizeof(int)));
    CK(cudaMemcpy(d_tiles, tiles.data(), tiles.size() * sizeof(int), cudaMemcpyHostToDevice));
    CK(cudaMemset(b.d_out, 0xff, (size_t)b.tokens * b.qh * b.hd * sizeof(T)));  // NaN
    launch_shape(sh, b, d_tiles, (int)tiles.size() / 4, old);
    CK(cudaDeviceSynchronize());
    CK(cudaFree(d_tiles));
    std::vector<T> out((size_t)b.tokens * b.qh * b.hd);
    CK(cudaMemcpy(out.data(), b.d_out, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
}

// The reference outputs of some rows of a batch, [row][head][dim], computed once.
struct Reference {
    std::vector<int> rows;
    std::vector<double> out;
};

// The reference of `rows` of `b` (every row when empty), rows in parallel.
template <typename T> static Reference reference(const Batch<T>& b, std::vector<int> rows) {
    if (rows.empty()) {
        for (int t = 0; t < b.tokens; ++t) rows.push_back(t);
    }
    Reference r{rows, std::vector<double>(rows.size() * b.qh * b.hd)};
#pragma omp parallel for schedule(dynamic)
    for (int i = 0; i < (int)rows.size(); ++i) {
        std::vector<double> o;
        for (int h = 0; h < b.qh; ++h) {
            b.reference(rows[i], h, o);
            std::copy(o.begin(), o.end(), r.out.begin() + ((size_t)i * b.qh + h) * b.hd);
        }
    }
    return r;
}

// Checks `out` against `ref` on its rows; limit on max |error|.
template <typename T>
static void check(const char* what, const Shape& sh, const Batch<T>& b, const std::vector<T>& out,
                  const Reference& ref, double limit) {
    double worst = 0;
    bool finite = true;
    for (size_t i = 0; i < ref.rows.size(); ++i) {
        for (int h = 0; h < b.qh; ++h) {
            for (int e = 0; e < b.hd; ++e) {
                const float v = to_f(out[((size_t)ref.rows[i] * b.qh + h) * b.hd + e]);
                if (!std::isfinite(v)) finite = false;
                worst = std::max(worst, std::fabs(v - ref.out[(i * b.qh + h) * b.hd + e]));
            }
        }
    }
    const bool ok = finite && worst <= limit;
    if (!ok) ++failures;
    printf("%-4s %-44s %-34s max |err| %.5f (limit %.3f)%s\n", ok ? "PASS" : "FAIL", what,
           sh.name.c_str(), worst, limit, finite ? "" : " NON-FINITE");
}

template <typename T>
static double max_diff(const std::vector<T>& a, const std::vector<T>& b, bool* finite) {
    double worst = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const float x = to_f(a[i]), y = to_f(b[i]);
        if (!std::isfinite(x) || !std::isfinite(y)) *finite = false;
        worst = std::max(worst, (double)std::fabs(x - y));
    }
    return worst;
}

// Median milliseconds of one launch of `sh` on `b` over 15 runs.
template <typename T> static double time_ms(const Shape& sh, Batch<T>& b, bool reverse, bool old) {
    std::vector<int> tiles = b.tiles(sh.items, reverse);
    int* d_tiles;
    CK(cudaMalloc(&d_tiles, tiles.size() * sizeof(int)));
    CK(cudaMemcpy(d_tiles, tiles.data(), tiles.size() * sizeof(int), cudaMemcpyHostToDevice));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int i = 0; i < 18; ++i) {
        CK(cudaEventRecord(e0));
        launch_shape(sh, b, d_tiles, (int)tiles.size() / 4, old);
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float m;
        CK(cudaEventElapsedTime(&m, e0, e1));
        if (i >= 3) ms.push_back(m);
    }
    CK(cudaFree(d_tiles));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

// The shape in the dtype of an FP8 KV shape: the same launch shape.
static const Shape& twin(const std::vector<Shape>& shapes, const Shape& fp8) {
    for (const Shape& sh : shapes) {
        if (!sh.fp8kv && sh.fn != fp8.fn && sh.items == fp8.items && sh.threads == fp8.threads &&
            fp8.name.rfind(sh.name, 0) == 0) {
            return sh;
        }
    }
    fprintf(stderr, "no shape in the dtype for %s\n", fp8.name.c_str());
    exit(2);
}

// Every check of one head size and dtype, for the shapes given (FP8 KV shapes: on FP8 caches,
// checked against the reference and bit-identical to their twins on the same values).
template <typename T, int HD>
static void checks(const char* dtype, const std::vector<Shape>& shapes,
                   const std::vector<Shape>& fp8 = {}) {
    struct Layout {
        int qh, kvh;
    };
    const Layout layouts[] = {{32, 8}, {9, 3}, {8, 8}, {64, 8}};
    for (const Layout& l : layouts) {
        // Chunks after cached prefixes of every residue mod the tile sizes, single rows,
        // and a chunk that starts mid-block.
        Batch<T> b(HD, l.qh, l.kvh,
                   {{0, 1}, {0, 77}, {37, 100}, {500, 333}, {63, 2}, {64, 65}, {129, 31}, {5, 0}},
                   1234u + l.qh);
        char what[96];
        snprintf(what, sizeof what, "%s hd %d, %d q / %d kv heads, 8 sequences", dtype, HD, l.qh,
                 l.kvh);
        const Reference ref = reference(b, {});
        for (const Shape& sh : shapes) {
            for (bool reverse : {false, true}) {
                check(what, sh, b, run(sh, b, reverse), ref, 0.03);
            }
        }
        if (fp8.empty()) continue;
        Batch<T> b8(HD, l.qh, l.kvh,
                    {{0, 1}, {0, 77}, {37, 100}, {500, 333}, {63, 2}, {64, 65}, {129, 31}, {5, 0}},
                    4321u + l.qh, true);
        const Reference ref8 = reference(b8, {});
        for (const Shape& sh : fp8) {
            const std::vector<T> out = run(sh, b8, true);
            check(what, sh, b8, out, ref8, 0.03);
            identical(what, sh, out, run(twin(shapes, sh), b8, true));
        }
    }
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("GPU: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

    const std::vector<Shape> bf128 = {
        shape<bf, 128, 4, 2, 64>(),         shape<bf, 128, 4, 2, 32>(),
        shape<bf, 128, 4, 1, 64>(),         shape<bf, 128, 8, 2, 64>(),
#ifdef OLD_WGMMA
        old_wgmma_shape<bf>(),
#endif
        wgmma_shape<bf, 2, 64, 2, 2>(),     wgmma_shape<bf, 2, 128, 1, 2>(),
        wgmma_shape<bf, 3, 64, 1, 3>(),     wgmma_shape<bf, 1, 64, 3, 2>(),
        wgmma_shape<bf, 4, 64, 1, 2>(),     wgmma_shape<bf, 4, 64, 1, 3>(),
        wgmma_shape<bf, 4, 64, 1, 4>()};
    const std::vector<Shape> bf64 = {shape<bf, 64, 4, 2, 64>(), shape<bf, 64, 4, 1, 64>()};
    const std::vector<Shape> hf128 = {shape<hf, 128, 4, 2, 64>(), shape<hf, 128, 8, 2, 64>(),
                                      wgmma_shape<hf, 4, 64, 1, 4>(),
                                      wgmma_shape<hf, 4, 64, 1, 3>()};
    const std::vector<Shape> hf64 = {shape<hf, 64, 4, 2, 64>()};
    using E4M3 = tpserve::E4M3Kv;
    // The worker's entry points (kMmaMTiles 2, kMmaKeys 64) on FP8 caches, and the Hopper kernel
    // converting FP8 tiles in shared memory (3 stages: its twin in the dtype is in bf128).
    const std::vector<Shape> bf128_fp8 = {shape<bf, 128, 4, 2, 64, E4M3>(),
                                          shape<bf, 128, 8, 2, 64, E4M3>(),
                                          wgmma_shape<bf, 4, 64, 1, 3, E4M3>()};
    const std::vector<Shape> bf64_fp8 = {shape<bf, 64, 4, 2, 64, E4M3>()};
    const std::vector<Shape> hf128_fp8 = {shape<hf, 128, 8, 2, 64, E4M3>(),
                                          wgmma_shape<hf, 4, 64, 1, 3, E4M3>()};
    checks<bf, 128>("bf16", bf128, bf128_fp8);
    checks<bf, 64>("bf16", bf64, bf64_fp8);
    checks<hf, 128>("f16", hf128, hf128_fp8);
    checks<hf, 64>("f16", hf64);

    // One long prompt, Llama-3-8B heads: timed, checked on sampled rows, and compared with the
    // old kernel on every row.
    for (int n : {2048, 8192}) {
        Batch<bf> b(128, 32, 8, {{0, n}}, 99u, true);
        std::vector<int> sample;
        for (int t : {0, 1, 15, 16, 31, 32, 63, 64, 127, 128, 1000, n / 2 + 7, n - 33, n - 2, n - 1})
            if (t < n) sample.push_back(t);
        char what[64];
        snprintf(what, sizeof what, "bf16 hd 128, 32/8 heads, %d tokens", n);
        const Reference ref = reference(b, sample);
#ifdef OLD_MMA
        const Shape old = old_shape<bf>(128);
        const std::vector<bf> before = run(old, b, false, true);
        check(what, old, b, before, ref, 0.03);
#endif
        for (const Shape& sh : bf128_fp8) {
            const std::vector<bf> out = run(sh, b, true);
            check(what, sh, b, out, ref, 0.03);
            identical(what, sh, out, run(twin(bf128, sh), b, true));
        }
        // A Hopper shape of 64-key tiles makes a row's products in the earlier kernel's order:
        // the same bits, whatever its tiles.
        std::vector<bf> before_wgmma;
        for (const Shape& sh : bf128) {
            const std::vector<bf> out = run(sh, b, true);
            check(what, sh, b, out, ref, 0.03);
            if (sh.name.rfind("before: wgmma", 0) == 0) {
                before_wgmma = out;
            } else if (!before_wgmma.empty() && sh.name.rfind("wgmma", 0) == 0 &&
                       sh.name.find(", 64 keys") != std::string::npos) {
                identical(what, sh, out, before_wgmma, "the earlier Hopper kernel");
            }
#ifdef OLD_MMA
            bool finite = true;
            const double d = max_diff(out, before, &finite);
            printf("     every row against the old kernel: max |diff| %.5f%s\n", d,
                   finite ? "" : " NON-FINITE");
            if (!finite || d > 0.03) ++failures;
#endif
        }
        const double gf = b.flops();
        printf("\n%d tokens from position 0 (%.1f GFLOP):\n", n, gf / 1e9);
        printf("  %-34s %-14s %9s %9s\n", "shape", "tile order", "ms", "TFLOP/s");
#ifdef OLD_MMA
        {
            const double ms = time_ms(old, b, false, true);
            printf("  %-34s %-14s %9.3f %9.1f\n", old.name.c_str(), "host", ms, gf / ms / 1e9);
        }
#endif
        std::vector<Shape> timed = bf128;
        timed.insert(timed.end(), bf128_fp8.begin(), bf128_fp8.end());
        for (const Shape& sh : timed) {
            for (bool reverse : {false, true}) {
                const double ms = time_ms(sh, b, reverse, false);
                printf("  %-34s %-14s %9.3f %9.1f\n", sh.name.c_str(),
                       reverse ? "longest first" : "host", ms, gf / ms / 1e9);
            }
        }
        printf("\n");
    }
    printf("%s: %d failed\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
