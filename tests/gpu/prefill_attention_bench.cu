// The prefill attention kernel (kernels/cuda/attention_mma.cu) outside tpserve (issue 9): checks
// it against a double-precision CPU reference on batches that mix sequences, cached prefixes
// (chunk offsets), tile sizes, head sizes 64 and 128, GQA groups 1, 3, 4 and 8, bf16 and f16, and
// times it on one long prompt (2,048 and 8,192 tokens from position 0, Llama-3-8B heads) in the
// launch shapes given below, with tiles in the host's order and longest first.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90 -std=c++17 -Xcompiler -fopenmp -I kernels/cuda \
//       tests/gpu/prefill_attention_bench.cu -o /tmp/pa -lgomp
//   /tmp/pa
// With -DOLD_MMA='"path"' it also times, and compares every output row with, an earlier version
// of the kernel file whose entry points were renamed old_paged_attention_mma_* (for a
// before/after in one run: git show REV:kernels/cuda/attention_mma.cu | sed
// 's/paged_attention_mma_/old_paged_attention_mma_/g' > path).
// Exit status 1 if any check fails (an error above the limit, or a non-finite output).
#include "common.cuh"
namespace k_new {
#include "attention_mma.cu"
}
#undef TPSERVE_PAGED_ATTENTION_MMA
#ifdef OLD_MMA
namespace k_old {
#include OLD_MMA
}
#endif

#include "harness.cuh"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

typedef __half hf;

static const int BLOCK = 16;

// One launch shape of the kernel: warps per block, m-tiles per warp, keys per tile.
template <typename T, int HD, int W, int MT, int KEYS>
__global__ void __launch_bounds__(32 * W) variant(T* out, const T* q, const T* kc, const T* vc,
                                                  const int* tables, const int* tiles, int qh,
                                                  int kvh, int block, int width, int q_stride,
                                                  float scale) {
    k_new::paged_attention_mma_impl<T, HD, W, MT, KEYS>(out, q, kc, vc, tables, tiles, qh, kvh,
                                                         block, width, q_stride, scale);
}

struct Seq {
    int prior;  // keys already in the cache before this chunk
    int rows;   // query rows of this chunk
};

template <typename T> static float to_f(T x);
template <> float to_f<bf>(bf x) { return __bfloat162float(x); }
template <> float to_f<hf>(hf x) { return __half2float(x); }
template <typename T> static T from_f(float x);
template <> bf from_f<bf>(float x) { return __float2bfloat16(x); }
template <> hf from_f<hf>(float x) { return __float2half(x); }

// A batch on the device: Q rows, paged caches with shuffled blocks, block tables.
template <typename T> struct Batch {
    int hd, qh, kvh, q_stride, tokens = 0, width = 0;
    std::vector<Seq> seqs;
    std::vector<int> row0, start_block;
    std::vector<T> q, kc, vc;
    std::vector<int> tables;
    T *d_q = nullptr, *d_kc = nullptr, *d_vc = nullptr, *d_out = nullptr;
    int* d_tables = nullptr;

    Batch(int hd_, int qh_, int kvh_, std::vector<Seq> s, unsigned seed)
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
        size_t s = 0;
        while (s + 1 < seqs.size() && row0[s + 1] <= t) ++s;
        const int pos = seqs[s].prior + (t - row0[s]);
        const int g = h / (qh / kvh);
        const double scale = 1.0 / std::sqrt((double)hd);
        std::vector<double> p(pos + 1);
        double mx = -1e300;
        for (int j = 0; j <= pos; ++j) {
            const size_t slot = (size_t)tables[s * width + j / BLOCK] * BLOCK + j % BLOCK;
            double d = 0;
            for (int e = 0; e < hd; ++e)
                d += (double)to_f(q[(size_t)t * q_stride + h * hd + e]) *
                     to_f(kc[(slot * kvh + g) * hd + e]);
            p[j] = d * scale;
            mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int j = 0; j <= pos; ++j) sum += (p[j] = std::exp(p[j] - mx));
        o.assign(hd, 0.0);
        for (int j = 0; j <= pos; ++j) {
            const size_t slot = (size_t)tables[s * width + j / BLOCK] * BLOCK + j % BLOCK;
            for (int e = 0; e < hd; ++e) o[e] += p[j] / sum * to_f(vc[(slot * kvh + g) * hd + e]);
        }
    }
};

typedef void (*Kernel)(void*, const void*, const void*, const void*, const int*, const int*, int,
                       int, int, int, int, float);

struct Shape {
    std::string name;
    int items, threads, smem;
    const void* fn;
};

template <typename T, int HD, int W, int MT, int KEYS> static Shape shape() {
    const void* fn = (const void*)variant<T, HD, W, MT, KEYS>;
    const int smem = k_new::paged_attention_mma_smem_bytes<T, HD, W, MT, KEYS>();
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    char name[64];
    snprintf(name, sizeof name, "%d warps x %d m-tiles, %d keys", W, MT, KEYS);
    return {name, 16 * W * MT, 32 * W, smem, fn};
}

// Launches `sh` on `b` with `tiles` (on the device); returns nothing, checks the launch.
template <typename T>
static void launch(const Shape& sh, Batch<T>& b, const int* d_tiles, int num_tiles) {
    float scale = 1.0f / std::sqrt((float)b.hd);
    void* args[] = {&b.d_out, &b.d_q,  &b.d_kc,  &b.d_vc,     &b.d_tables, &d_tiles,
                    &b.qh,    &b.kvh, (void*)&BLOCK, &b.width, &b.q_stride, &scale};
    CK(cudaLaunchKernel(sh.fn, dim3(b.kvh, num_tiles), dim3(sh.threads), args, sh.smem, 0));
}

#ifdef OLD_MMA
// The earlier kernel file's entry point for this head size and dtype (4 warps, 64 items).
template <typename T> static Shape old_shape(int hd);
template <> Shape old_shape<bf>(int hd) {
    return {"before (old file)", 64, 128, 0,
            hd == 64 ? (const void*)k_old::old_paged_attention_mma_hd64_bf16
                     : (const void*)k_old::old_paged_attention_mma_hd128_bf16};
}
template <> Shape old_shape<hf>(int hd) {
    return {"before (old file)", 64, 128, 0,
            hd == 64 ? (const void*)k_old::old_paged_attention_mma_hd64_f16
                     : (const void*)k_old::old_paged_attention_mma_hd128_f16};
}
template <typename T>
static void launch_old(const Shape& sh, Batch<T>& b, const int* d_tiles, int num_tiles) {
    float scale = 1.0f / std::sqrt((float)b.hd);
    void* unused = nullptr;
    int one = 1, zero = 0;
    void* args[] = {&b.d_out,  &unused, &unused, &b.d_q,    &b.d_kc,     &b.d_vc,
                    &b.d_tables, &d_tiles, &b.qh, &b.kvh, (void*)&BLOCK, &b.width,
                    &b.q_stride, &one,     &zero,  &scale};
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

// Every check of one head size and dtype, for the shapes given.
template <typename T, int HD>
static void checks(const char* dtype, const std::vector<Shape>& shapes) {
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
    }
}

int main() {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("GPU: %s, %d SMs\n", prop.name, prop.multiProcessorCount);

    const std::vector<Shape> bf128 = {shape<bf, 128, 4, 2, 64>(), shape<bf, 128, 4, 2, 32>(),
                                      shape<bf, 128, 4, 1, 64>(), shape<bf, 128, 8, 2, 64>()};
    const std::vector<Shape> bf64 = {shape<bf, 64, 4, 2, 64>(), shape<bf, 64, 4, 1, 64>()};
    const std::vector<Shape> hf128 = {shape<hf, 128, 4, 2, 64>(), shape<hf, 128, 8, 2, 64>()};
    const std::vector<Shape> hf64 = {shape<hf, 64, 4, 2, 64>()};
    checks<bf, 128>("bf16", bf128);
    checks<bf, 64>("bf16", bf64);
    checks<hf, 128>("f16", hf128);
    checks<hf, 64>("f16", hf64);

    // One long prompt, Llama-3-8B heads: timed, checked on sampled rows, and compared with the
    // old kernel on every row.
    for (int n : {2048, 8192}) {
        Batch<bf> b(128, 32, 8, {{0, n}}, 99u);
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
        for (const Shape& sh : bf128) {
            const std::vector<bf> out = run(sh, b, true);
            check(what, sh, b, out, ref, 0.03);
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
        for (const Shape& sh : bf128) {
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
