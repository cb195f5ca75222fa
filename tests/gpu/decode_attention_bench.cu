// The tensor-core decode attention (kernels/cuda/attention_decode_mma.cu) outside tpserve (issue
// 9): checks it against a double-precision CPU reference (decode rows of mixed contexts, key
// splits of fixed and per-row lengths merged by attention_combine, padding tiles, tiles of
// several rows, head sizes 64 and 128, GQA groups 1, 4 and 8, bf16 and f16), checks that its
// FP8-cache entry points give bit-identical outputs to the dtype's cache holding the same values
// (as prefill_attention_bench.cu does), and times it against attention.cu's
// paged_attention_decode (the CUDA-core kernel the worker's decode steps ran before) on
// Llama-3-8B heads (32 query, 8 KV, head size 128), 1 to 256 rows of 256 to 4,096 keys, with
// key splits as worker/src/cuda/graphs.rs's decode_splits gives a CUDA graph of that size. Each
// timing reports the KV cache bytes read per second and their ratio to the copy rate.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -Xcompiler -fopenmp -I kernels/cuda \
//       tests/gpu/decode_attention_bench.cu -o /tmp/da -lgomp
//   /tmp/da
// Exit status 1 if any check fails (an error above the limit, or a non-finite output).
#include "common.cuh"
namespace k_attention {
#include "attention.cu"
}
namespace k_decode_mma {
#include "attention_decode_mma.cu"
}

#include "harness.cuh"

#include <cuda_fp8.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

static const int BLOCK = 16;
static const float K_SCALE = 0.5f, V_SCALE = 0.25f;  // powers of two: exact

template <typename T, typename C, int HD, int STAGES>
__global__ void __launch_bounds__(128)
    decode_mma(T* out, float* po, float* pml, const T* q, const C* kc, const C* vc,
               const int* tables, const int* tiles, int qh, int kvh, int block, int width,
               int q_stride, int splits, int split_len, float scale, float ks, float vs) {
    k_decode_mma::paged_attention_decode_mma_impl<T, C, HD, STAGES>(
        out, po, pml, q, kc, vc, tables, tiles, qh, kvh, block, width, q_stride, splits,
        split_len, scale, ks, vs);
}

// One sequence of a batch: `rows` query rows after `prior` cached keys (a decode row: 1).
struct Seq {
    int prior, rows;
};

// A batch on the device: q rows (qkv-shaped: queries, then keys and values), paged caches with
// shuffled blocks (every key of every row already in them), block tables, tiles of one
// sequence each (rows * group <= 16). With `fp8`, cache values are E4M3 values times the
// scales, also held as E4M3 bytes.
template <typename T> struct Batch {
    int hd, qh, kvh, q_stride, tokens = 0, width = 0, blocks = 0;
    std::vector<Seq> seqs;
    std::vector<int> row0, tables, tiles;
    std::vector<T> q, kc, vc;
    T *d_q = nullptr, *d_kc = nullptr, *d_vc = nullptr, *d_out = nullptr;
    unsigned char *d_kc8 = nullptr, *d_vc8 = nullptr;
    int *d_tables = nullptr, *d_tiles = nullptr;
    float *d_po = nullptr, *d_pml = nullptr;

    Batch(int hd_, int qh_, int kvh_, std::vector<Seq> s, unsigned seed, bool fp8, int padding)
        : hd(hd_), qh(qh_), kvh(kvh_), seqs(std::move(s)) {
        q_stride = (qh + 2 * kvh) * hd;
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
        for (auto& v : q) v = from_f<T>(4.0f * u(rng));  // peaked softmax: errors show
        const size_t cache = (size_t)blocks * BLOCK * kvh * hd;
        kc.resize(cache);
        vc.resize(cache);
        for (auto& v : kc) v = from_f<T>(u(rng));
        for (auto& v : vc) v = from_f<T>(u(rng));
        if (fp8) {
            std::vector<unsigned char> kc8(cache), vc8(cache);
            for (size_t i = 0; i < cache; ++i) {
                kc8[i] = __nv_fp8_e4m3(to_f(kc[i]) / K_SCALE).__x;
                vc8[i] = __nv_fp8_e4m3(to_f(vc[i]) / V_SCALE).__x;
                __nv_fp8_e4m3 a, b;
                a.__x = kc8[i];
                b.__x = vc8[i];
                kc[i] = from_f<T>((float)a * K_SCALE);  // exact
                vc[i] = from_f<T>((float)b * V_SCALE);
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
            tiles.insert(tiles.end(), {(int)i, row0[i], seqs[i].rows, seqs[i].prior});
        }
        for (int p = 0; p < padding; ++p) tiles.insert(tiles.end(), {0, 0, 0, 0});
        CK(cudaMalloc(&d_q, q.size() * sizeof(T)));
        CK(cudaMalloc(&d_kc, cache * sizeof(T)));
        CK(cudaMalloc(&d_vc, cache * sizeof(T)));
        CK(cudaMalloc(&d_out, (size_t)tokens * qh * hd * sizeof(T)));
        CK(cudaMalloc(&d_tables, tables.size() * sizeof(int)));
        CK(cudaMalloc(&d_tiles, tiles.size() * sizeof(int)));
        CK(cudaMalloc(&d_po, (size_t)tokens * qh * 64 * hd * sizeof(float)));
        CK(cudaMalloc(&d_pml, (size_t)tokens * qh * 64 * 2 * sizeof(float)));
        CK(cudaMemcpy(d_q, q.data(), q.size() * sizeof(T), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_kc, kc.data(), cache * sizeof(T), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_vc, vc.data(), cache * sizeof(T), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_tables, tables.data(), tables.size() * sizeof(int),
                      cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_tiles, tiles.data(), tiles.size() * sizeof(int),
                      cudaMemcpyHostToDevice));
    }
    ~Batch() {
        for (void* p : {(void*)d_q, (void*)d_kc, (void*)d_vc, (void*)d_out, (void*)d_kc8,
                        (void*)d_vc8, (void*)d_tables, (void*)d_tiles, (void*)d_po,
                        (void*)d_pml})
            cudaFree(p);
    }
    int num_tiles() const { return (int)tiles.size() / 4; }
    int max_context() const {
        int m = 0;
        for (const Seq& x : seqs) m = std::max(m, x.prior + x.rows);
        return m;
    }
    double kv_bytes(bool fp8) const {
        double keys = 0;
        for (const Seq& x : seqs) keys += x.prior + x.rows;
        return keys * kvh * hd * 2 * (fp8 ? 1 : sizeof(T));
    }

    // Double-precision reference of token t, head h.
    void reference(int t, int h, std::vector<double>& o) const {
        reference_attention(*this, BLOCK, t, h, o);
    }
};

template <typename T> static const void* combine_fn();
template <> const void* combine_fn<bf>() { return (const void*)k_attention::attention_combine_bf16; }
template <> const void* combine_fn<hf>() { return (const void*)k_attention::attention_combine_f16; }

// The kernel at STAGES on `b`: splits as given (split_len 0: per row), merged by
// attention_combine when more than one.
template <typename T, int HD, int STAGES>
static void launch(Batch<T>& b, bool fp8, int splits, int split_len, cudaStream_t stream = 0) {
    const void* fn = fp8 ? (const void*)decode_mma<T, tpserve::E4M3Kv, HD, STAGES>
                         : (const void*)decode_mma<T, T, HD, STAGES>;
    const int smem =
        fp8 ? k_decode_mma::paged_attention_decode_mma_smem_bytes<T, tpserve::E4M3Kv, HD, STAGES>()
            : k_decode_mma::paged_attention_decode_mma_smem_bytes<T, T, HD, STAGES>();
    CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    float scale = 1.0f / std::sqrt((float)b.hd);
    float ks = fp8 ? K_SCALE : 1.0f, vs = fp8 ? V_SCALE : 1.0f;
    void* kc = fp8 ? (void*)b.d_kc8 : (void*)b.d_kc;
    void* vc = fp8 ? (void*)b.d_vc8 : (void*)b.d_vc;
    int block = BLOCK;
    void* args[] = {&b.d_out,  &b.d_po,   &b.d_pml, &b.d_q,  &kc,    &vc,
                    &b.d_tables, &b.d_tiles, &b.qh,  &b.kvh, &block, &b.width,
                    &b.q_stride, &splits,  &split_len, &scale, &ks,  &vs};
    CK(cudaLaunchKernel(fn, dim3(b.num_tiles(), b.kvh, splits), dim3(128), args, smem, stream));
    if (splits > 1) {
        int hd = b.hd;
        void* cargs[] = {&b.d_out, &b.d_po, &b.d_pml, &b.qh, &hd, &splits};
        CK(cudaLaunchKernel(combine_fn<T>(), dim3(b.tokens, b.qh), dim3(b.hd), cargs, 0, stream));
    }
}

template <typename T, int HD, int STAGES>
static std::vector<T> run(Batch<T>& b, bool fp8, int splits, int split_len) {
    CK(cudaMemset(b.d_out, 0xff, (size_t)b.tokens * b.qh * b.hd * sizeof(T)));  // NaN
    launch<T, HD, STAGES>(b, fp8, splits, split_len);
    CK(cudaDeviceSynchronize());
    std::vector<T> out((size_t)b.tokens * b.qh * b.hd);
    CK(cudaMemcpy(out.data(), b.d_out, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    return out;
}

static int failures = 0;

// The reference outputs of every row of `b`, [token][head][dim], rows in parallel.
template <typename T> static std::vector<double> reference(const Batch<T>& b) {
    std::vector<double> ref((size_t)b.tokens * b.qh * b.hd);
#pragma omp parallel for schedule(dynamic)
    for (int t = 0; t < b.tokens; ++t) {
        std::vector<double> o;
        for (int h = 0; h < b.qh; ++h) {
            b.reference(t, h, o);
            std::copy(o.begin(), o.end(), ref.begin() + ((size_t)t * b.qh + h) * b.hd);
        }
    }
    return ref;
}

// Checks `out` against `ref`; limit on max |error| (prefill_attention_bench.cu's).
template <typename T>
static void check(const char* what, const std::vector<T>& out, const std::vector<double>& ref) {
    const double limit = 0.03;
    double worst = 0;
    bool finite = true;
    for (size_t i = 0; i < ref.size(); ++i) {
        const float v = to_f(out[i]);
        if (!std::isfinite(v)) finite = false;
        worst = std::max(worst, std::fabs(v - ref[i]));
    }
    const bool ok = finite && worst <= limit;
    if (!ok) ++failures;
    printf("%-4s %-64s max |err| %.5f (limit %.3f)%s\n", ok ? "PASS" : "FAIL", what, worst, limit,
           finite ? "" : " NON-FINITE");
}

// Checks one configuration: unsplit, 3 splits of fixed length, 5 sized per row; FP8 entry
// points bit-identical to the dtype's on the same values.
template <typename T, int HD>
static void checks(const char* dtype, int qh, int kvh, std::vector<Seq> seqs, int padding) {
    Batch<T> b(HD, qh, kvh, seqs, 1234 + HD + qh, true, padding);
    const std::vector<double> ref = reference(b);
    // Fixed-length splits cover the longest context, as worker/src/cuda/attention_plan.rs's
    // key_splits sizes them.
    const int len3 = ((b.max_context() + 2) / 3 + 31) / 32 * 32;
    const struct {
        int splits, len;
    } plans[] = {{1, 0}, {3, len3}, {5, 0}};
    for (const auto& p : plans) {
        char what[128];
        snprintf(what, sizeof what, "%s hd%d %d/%d heads, %zu seqs, splits %d len %d", dtype, HD,
                 qh, kvh, seqs.size(), p.splits, p.len);
        const std::vector<T> out = run<T, HD, 3>(b, false, p.splits, p.len);
        check(what, out, ref);
        const std::vector<T> out8 = run<T, HD, 3>(b, true, p.splits, p.len);
        const bool same = std::memcmp(out.data(), out8.data(), out.size() * sizeof(T)) == 0;
        if (!same) ++failures;
        printf("%-4s %-64s FP8 cache bit-identical to the dtype's\n", same ? "PASS" : "FAIL",
               what);
    }
    // Other stage counts: the same arithmetic, so the same bits.
    const std::vector<T> s3 = run<T, HD, 3>(b, false, 1, 0);
    const std::vector<T> s2 = run<T, HD, 2>(b, false, 1, 0);
    const std::vector<T> s4 = run<T, HD, 4>(b, false, 1, 0);
    const bool same = std::memcmp(s3.data(), s2.data(), s3.size() * sizeof(T)) == 0 &&
                      std::memcmp(s3.data(), s4.data(), s3.size() * sizeof(T)) == 0;
    if (!same) ++failures;
    printf("%-4s %s hd%d %d/%d heads: 2, 3 and 4 stages bit-identical\n", same ? "PASS" : "FAIL",
           dtype, HD, qh, kvh);
}

// decode_splits (worker/src/cuda/graphs.rs) for a graph of `rows` rows.
static int graph_splits(int rows, int kvh, int sms) {
    const int s = (2 * sms + rows * kvh - 1) / (rows * kvh);
    return std::min(std::max(s, 1), 64);
}

int main() {
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    printf("== checks against a double-precision reference\n");
    // Decode rows of mixed contexts (a key or two, chunk and block edges, long), padding tiles.
    const std::vector<Seq> decode = {{0, 1},  {1, 1},   {14, 1},  {15, 1},  {16, 1},
                                     {63, 1}, {64, 1},  {100, 1}, {257, 1}, {1000, 1},
                                     {2047, 1}, {3333, 1}};
    checks<bf, 128>("bf16", 32, 8, decode, 3);
    checks<bf, 128>("bf16", 64, 8, decode, 0);
    checks<bf, 128>("bf16", 8, 8, decode, 0);
    checks<bf, 64>("bf16", 16, 4, decode, 2);
    checks<hf, 128>("f16", 32, 8, decode, 0);
    checks<hf, 64>("f16", 32, 8, decode, 0);
    // Tiles of several rows: 4 rows of group 4, 16 rows of group 1, causal within the tile.
    checks<bf, 128>("bf16 (4-row tiles)", 32, 8, {{0, 4}, {61, 4}, {500, 4}}, 0);
    checks<bf, 128>("bf16 (16-row tiles)", 8, 8, {{0, 16}, {37, 16}, {300, 16}}, 0);

    const double copy = copy_bandwidth_gbs(0);
    printf("\n== timing: Llama-3-8B heads (32/8, hd 128), copy rate %.0f GB/s, %d SMs\n", copy,
           sms);
    printf("%-6s %-6s %-7s %-28s %10s %10s %8s\n", "rows", "keys", "splits", "kernel", "us",
           "GB/s", "of copy");
    for (int ctx : {256, 1024, 4096}) {
        for (int rows : {1, 16, 64, 256}) {
            if (ctx == 4096 && rows == 256) continue;
            std::vector<Seq> seqs(rows, Seq{ctx - 1, 1});
            Batch<bf> b(128, 32, 8, seqs, 7, true, 0);
            const int splits = graph_splits(rows, 8, sms);
            // The CUDA-core decode kernel, as a graph launches it (split_len 0, no cache
            // write: negative slots; it reads the qkv rows as they are).
            std::vector<long long> slots(rows, -1);
            long long* d_slots;
            float* d_rope;
            CK(cudaMalloc(&d_slots, rows * sizeof(long long)));
            CK(cudaMemcpy(d_slots, slots.data(), rows * sizeof(long long), cudaMemcpyHostToDevice));
            CK(cudaMalloc(&d_rope, (size_t)ctx * 64 * sizeof(float)));
            CK(cudaMemset(d_rope, 0, (size_t)ctx * 64 * sizeof(float)));
            for (int fp8 = 0; fp8 < 2; ++fp8) {
                const double bytes = b.kv_bytes(fp8);
                auto row = [&](const char* name, int s, double us) {
                    const double gbs = bytes / (us * 1e3);
                    printf("%-6d %-6d %-7d %-28s %10.1f %10.0f %8.2f\n", rows, ctx, s, name, us,
                           gbs, gbs / copy);
                };
                const void* old = fp8 ? (const void*)k_attention::paged_attention_decode_hd128_g4_fp8kv_bf16
                                      : (const void*)k_attention::paged_attention_decode_hd128_g4_bf16;
                auto launch_old = [&]() {
                    int block = BLOCK, sl = 0, s = splits;
                    float scale = 1.0f / std::sqrt(128.0f);
                    float ks = fp8 ? K_SCALE : 1.0f, vs = fp8 ? V_SCALE : 1.0f;
                    void* kc = fp8 ? (void*)b.d_kc8 : (void*)b.d_kc;
                    void* vc = fp8 ? (void*)b.d_vc8 : (void*)b.d_vc;
                    void* args[] = {&b.d_out,   &b.d_po,   &b.d_pml,  &b.d_q,    &kc,
                                    &vc,        &b.d_tables, &b.d_tiles, &d_slots, &d_rope,
                                    &d_rope,    &b.qh,     &b.kvh,    &block,   &b.width,
                                    &b.q_stride, &s,       &sl,       &scale,   &ks,
                                    &vs};
                    CK(cudaLaunchKernel(old, dim3(rows, 8, s), dim3(128), args, 0, 0));
                    if (s > 1) {
                        int hd = 128, qh = 32;
                        void* cargs[] = {&b.d_out, &b.d_po, &b.d_pml, &qh, &hd, &s};
                        CK(cudaLaunchKernel(combine_fn<bf>(), dim3(rows, 32), dim3(128), cargs, 0,
                                            0));
                    }
                };
                const char* tag = fp8 ? " (FP8 KV)" : "";
                std::string n = std::string("cuda-core decode") + tag;
                row(n.c_str(), splits, time_us(launch_old));
                for (int st : {2, 3, 4}) {
                    n = "tensor-core, " + std::to_string(st) + " stages" + tag;
                    auto f = [&]() {
                        if (st == 2) launch<bf, 128, 2>(b, fp8, splits, 0);
                        if (st == 3) launch<bf, 128, 3>(b, fp8, splits, 0);
                        if (st == 4) launch<bf, 128, 4>(b, fp8, splits, 0);
                    };
                    row(n.c_str(), splits, time_us(f));
                }
            }
            CK(cudaFree(d_slots));
            CK(cudaFree(d_rope));
        }
    }
    printf("\n%s: %d check(s) failed\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
