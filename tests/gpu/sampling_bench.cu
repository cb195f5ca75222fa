// sample_* (kernels/cuda/sampling.cu) outside tpserve (issue 9): checks every draw against the
// set of tokens the row's parameters keep, computed on the CPU from the same logits (the k-th
// value, min-p's bound, top-p's running mass in double, sorted; a draw below the bound passes
// only within 1e-5 of it), that the same seeds draw the same tokens, and that the Gumbel noise
// is finite and bounded at every point of its 2^24 grid; and times one launch of the kernel over
// a Llama-3 vocabulary (128,256 entries) at 1 to 256 rows for greedy, temperature, top-k, top-p,
// min-p and their mixes, on bf16 logits (sample_*) and on f32 ones with structured-output masks
// (sample_processed_*). The rows mix a model's peaked shape, flat rows (wide nuclei) and rows of
// 128,000 tied values; a launch takes as long as its slowest row. Rows are shared by several
// blocks at small row counts (sample_impl's Team): the draws must be the same tokens at 1, 3, 16
// and 32 blocks a row (at as many rows as fit the SMs); SPLITS=N times every launch at N blocks
// a row instead of the worker's rule where they fit, and SETS=N runs the first N parameter sets
// on bf16 logits only.
//
// With -DOLD_SAMPLING='"path"' it also runs an earlier version of the file whose entry points and
// sample_impl were renamed old_* (git show REV:kernels/cuda/sampling.cu | sed
// 's/sample_/old_sample_/g; s/process_logits_/old_process_logits_/g;
// s/token_logprobs_/old_token_logprobs_/g' > path), checks it the same way, counts the rows
// where the two draw different tokens with the same seeds ("differ": since session 35 the noise
// near u = 1 differs from the earlier formula's on purpose, so draws over the whole vocabulary
// may), and times it beside. The earlier file's sample_* must take session 36's arguments (the
// split rows' partials and arrival counters, as of c62505e).
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels/cuda tests/gpu/sampling_bench.cu -o /tmp/sb
//   /tmp/sb
// Exit status 1 if any check fails.
#include "common.cuh"
namespace k_new {
#include "sampling.cu"
}
#undef TPSERVE_SAMPLE
#undef TPSERVE_LOGIT_EXTRAS
#ifdef OLD_SAMPLING
namespace k_old {
#include OLD_SAMPLING
}
#endif

#include "harness.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

static int failures = 0;

template <typename T>
__global__ void __launch_bounds__(1024, 1) sample_new(unsigned int* out, const T* logits, int rows, int vpr, int vocab,
                           const float* t, const int* k, const float* p, const float* mp,
                           const unsigned long long* seeds, k_new::TeamRow* teams) {
    k_new::sample_impl<T>(out, logits, rows, vpr, vocab, t, k, p, mp, seeds, teams);
}

// Blocks sharing a row at `rows` rows: the worker's rule (worker/src/cuda/kernels/sampling.rs,
// sample_splits), or SPLITS when set (the timing of other counts) where the launch's blocks all
// fit the SMs at once (which a shared row needs; else one block a row).
static int sm_count = 0;
static int forced_splits = 0;
int splits_for(int rows) {
    if (forced_splits > 0) return rows * forced_splits <= sm_count ? forced_splits : 1;
    return std::max(1, std::min(k_new::kMaxSampleSplits, sm_count / std::max(rows, 1)));
}
#ifdef OLD_SAMPLING
// The old file's entry point: sampling.cu as of session 36 (splits for greedy and
// temperature-only rows only, through partials and arrival counters).
template <typename T>
__global__ void sample_old(unsigned int* out, const T* logits, int rows, int vpr, int vocab,
                           const float* t, const int* k, const float* p, const float* mp,
                           const unsigned long long* seeds, int2* partials,
                           unsigned int* arrivals) {
    k_old::old_sample_impl<T>(out, logits, rows, vpr, vocab, t, k, p, mp, seeds, partials,
                              arrivals);
}
#endif

// Gumbel noise at every point u = (m + 1/2) 2^-24 of its grid: the number of values that are
// not finite or above k_new::kGumbelMax, and the largest, for the kernel's formula and for
// -__logf(-__logf(u)) alone (the earlier one).
__global__ void gumbel_grid(unsigned int* bad, float* largest) {
    const unsigned int m = blockIdx.x * blockDim.x + threadIdx.x;
    const float u = ((float)m + 0.5f) * (1.0f / 16777216.0f);
    const float g[2] = {k_new::gumbel_of(m), -__logf(-__logf(u))};
    for (int i = 0; i < 2; ++i) {
        if (!(g[i] <= k_new::kGumbelMax)) atomicAdd(&bad[i], 1u);
        if (g[i] == g[i] && g[i] < INFINITY)
            atomicMax(reinterpret_cast<int*>(&largest[i]), __float_as_int(fmaxf(g[i], 0.0f)));
    }
}

void check_gumbel() {
    unsigned int* bad;
    float* largest;
    CK(cudaMalloc(&bad, 8));
    CK(cudaMalloc(&largest, 8));
    CK(cudaMemset(bad, 0, 8));
    CK(cudaMemset(largest, 0, 8));
    gumbel_grid<<<(1 << 24) / 256, 256>>>(bad, largest);
    unsigned int b[2];
    float l[2];
    CK(cudaMemcpy(b, bad, 8, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(l, largest, 8, cudaMemcpyDeviceToHost));
    printf("== Gumbel noise over its 2^24 grid points: kernel %u not finite or above %.1f (largest "
           "finite %.3f); -__logf(-__logf(u)) alone %u (largest finite %.3f)\n",
           b[0], k_new::kGumbelMax, l[0], b[1], l[1]);
    if (b[0] != 0) ++failures;
    CK(cudaFree(bad));
    CK(cudaFree(largest));
}

template <typename T>
__global__ void __launch_bounds__(1024, 1)
    logprobs_new(unsigned int* rec, const T* logits, int rows, int vpr, int vocab,
                 const int* targets, const unsigned int* sampled, const int* top_n,
                 k_new::TeamRow* teams) {
    k_new::token_logprobs_impl<T>(rec, logits, rows, vpr, vocab, targets, sampled, top_n, teams);
}
#ifdef OLD_SAMPLING
template <typename T>
__global__ void logprobs_old(unsigned int* rec, const T* logits, int rows, int vpr, int vocab,
                             const int* targets, const unsigned int* sampled, const int* top_n) {
    k_old::old_token_logprobs_impl<T>(rec, logits, rows, vpr, vocab, targets, sampled, top_n);
}
#endif

struct Params {
    const char* name;
    float temperature;
    int top_k;
    float top_p;
    float min_p;
};

// Rows of logits: a normal body, a few dozen tokens lifted well above it (a model's likely
// continuations), every 4th row flat (a wide nucleus), every 8th (from the 6th) a body of equal
// values (a tie of 128,000 tokens at most boundaries: the bisection's case), and for f32 rows
// every 3rd row with most of the vocabulary at -inf (a structured-output mask).
template <typename T> std::vector<T> make_logits(int rows, int vocab, bool masked, unsigned seed) {
    std::mt19937 gen(seed);
    std::normal_distribution<float> body(0.0f, 2.5f);
    std::uniform_real_distribution<float> lift(4.0f, 14.0f);
    std::uniform_int_distribution<int> token(0, vocab - 1);
    std::vector<T> out((size_t)rows * vocab);
    for (int r = 0; r < rows; ++r) {
        std::vector<float> x(vocab);
        const float spread = r % 4 == 3 ? 0.3f : r % 8 == 5 ? 0.0f : 1.0f;
        for (int v = 0; v < vocab; ++v) x[v] = body(gen) * spread;
        if (r % 4 != 3) {
            for (int i = 0; i < 40; ++i) x[token(gen)] += lift(gen);
        }
        if (masked && r % 3 == 2) {
            for (int v = 0; v < vocab; ++v) {
                if (v % 97 != 5) x[v] = -INFINITY;
            }
        }
        for (int v = 0; v < vocab; ++v) out[(size_t)r * vocab + v] = T(x[v]);
    }
    return out;
}

template <> inline float to_f<float>(float x) { return x; }

// Per row, the lowest x the parameters keep (CPU, double sums), as the kernel defines it.
template <typename T>
std::vector<float> kept_bounds(const std::vector<T>& logits, int rows, int vocab,
                               const Params& p) {
    std::vector<float> bounds(rows);
    for (int r = 0; r < rows; ++r) {
        std::vector<float> xs;
        for (int v = 0; v < vocab; ++v) {
            const float x = to_f(logits[(size_t)r * vocab + v]) * (1.0f / p.temperature);
            if (x > -INFINITY) xs.push_back(x);
        }
        std::sort(xs.begin(), xs.end(), std::greater<float>());
        const float x_max = xs[0];
        float t = -INFINITY;
        if (p.top_k > 0 && p.top_k < vocab) t = xs[std::min<size_t>(p.top_k, xs.size()) - 1];
        if (p.min_p > 0.0f) t = std::max(t, x_max + logf(p.min_p));
        if (p.top_p < 1.0f) {
            double total = 0.0;
            for (float x : xs) total += x >= t ? exp((double)x - x_max) : 0.0;
            double run = 0.0;
            for (float x : xs) {
                if (x < t) break;
                run += exp((double)x - x_max);
                if (run >= p.top_p * total) {
                    t = std::max(t, x);
                    break;
                }
            }
        }
        bounds[r] = t;
    }
    return bounds;
}

template <typename T> struct Run {
    int rows, vocab;
    std::vector<T> host;
    T* logits;
    unsigned int* out;
    float *t, *p, *mp;
    int* k;
    unsigned long long* seeds;
    k_new::TeamRow* teams;
    int2* partials;
    unsigned int* arrivals;
    Run(int rows_, int vocab_, bool masked, unsigned seed) : rows(rows_), vocab(vocab_) {
        host = make_logits<T>(rows, vocab, masked, seed);
        logits = upload(host);
        CK(cudaMalloc(&teams, (size_t)rows * k_new::kTeamRowBytes));
        CK(cudaMemset(teams, 0, (size_t)rows * k_new::kTeamRowBytes));
        CK(cudaMalloc(&partials, (size_t)rows * k_new::kMaxSampleSplits * 8));
        CK(cudaMalloc(&arrivals, rows * 4));
        CK(cudaMemset(arrivals, 0, rows * 4));
        CK(cudaMalloc(&out, rows * 4));
        CK(cudaMalloc(&t, rows * 4));
        CK(cudaMalloc(&p, rows * 4));
        CK(cudaMalloc(&mp, rows * 4));
        CK(cudaMalloc(&k, rows * 4));
        CK(cudaMalloc(&seeds, rows * 8));
    }
    void set(const Params& q, unsigned long long seed_base) {
        std::vector<float> tv(rows, q.temperature), pv(rows, q.top_p), mv(rows, q.min_p);
        std::vector<int> kv(rows, q.top_k);
        std::vector<unsigned long long> sv(rows);
        for (int r = 0; r < rows; ++r) sv[r] = seed_base + 7919ull * r;
        CK(cudaMemcpy(t, tv.data(), rows * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(p, pv.data(), rows * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(mp, mv.data(), rows * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(k, kv.data(), rows * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(seeds, sv.data(), rows * 8, cudaMemcpyHostToDevice));
    }
    // sample_new's launch and the old file's, grid (n, splits_for(n)) both.
    void launch(void (*kernel)(unsigned int*, const T*, int, int, int, const float*, const int*,
                               const float*, const float*, const unsigned long long*,
                               k_new::TeamRow*),
                cudaStream_t st, int n) {
        kernel<<<dim3(n, splits_for(n)), 1024, 0, st>>>(out, logits, n, vocab, vocab, t, k, p, mp,
                                                         seeds, teams);
    }
    void launch(void (*kernel)(unsigned int*, const T*, int, int, int, const float*, const int*,
                               const float*, const float*, const unsigned long long*, int2*,
                               unsigned int*),
                cudaStream_t st, int n) {
        kernel<<<dim3(n, splits_for(n)), 1024, 0, st>>>(out, logits, n, vocab, vocab, t, k, p, mp,
                                                         seeds, partials, arrivals);
    }
    // The tokens of the first n rows (all by default).
    template <typename K> std::vector<unsigned int> draw(K kernel, int n = 0) {
        n = n > 0 ? n : rows;
        launch(kernel, 0, n);
        CK(cudaGetLastError());
        std::vector<unsigned int> h(n);
        CK(cudaMemcpy(h.data(), out, n * 4, cudaMemcpyDeviceToHost));
        return h;
    }
};

// Every draw of `tokens` against the CPU's kept set: a token below the bound is allowed only
// within a relative 1e-5 of it (the kernel's float sums and __logf at a boundary).
template <typename T>
int outside(const Run<T>& run, const Params& q, const std::vector<unsigned int>& tokens,
            const std::vector<float>& bounds) {
    int bad = 0;
    for (int r = 0; r < run.rows; ++r) {
        const float x = to_f(run.host[(size_t)r * run.vocab + tokens[r]]) * (1.0f / q.temperature);
        if (q.temperature <= 0.0f || q.top_k == 1) {
            float best = -INFINITY;
            for (int v = 0; v < run.vocab; ++v)
                best = std::max(best, to_f(run.host[(size_t)r * run.vocab + v]));
            bad += to_f(run.host[(size_t)r * run.vocab + tokens[r]]) != best;
            continue;
        }
        const float b = bounds[r];
        if (!(x >= b - 1e-5f * std::max(1.0f, fabsf(b)))) ++bad;
    }
    return bad;
}

template <typename T>
void check_and_time(const char* what, bool masked, const std::vector<Params>& sets) {
    const int vocab = 128256;
    const int rows = 256;
    Run<T> run(rows, vocab, masked, 17);
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    printf("\n== %s, vocabulary %d: draws of %d rows checked; us a launch at 1 / 8 / 64 / 256 rows\n",
           what, vocab, rows);
    printf("%-34s %9s %6s %32s", "parameters", "outside", "differ", "new");
#ifdef OLD_SAMPLING
    printf(" %32s", "old");
#endif
    printf("\n");
    for (const Params& q : sets) {
        run.set(q, 1000);
        const std::vector<float> bounds =
            q.temperature > 0.0f ? kept_bounds(run.host, rows, vocab, q) : std::vector<float>(rows);
        const std::vector<unsigned int> fresh = run.draw(sample_new<T>);
        const std::vector<unsigned int> again = run.draw(sample_new<T>);
        int bad = outside(run, q, fresh, bounds);
        if (fresh != again) {
            printf("  %s: the same seeds drew other tokens\n", q.name);
            ++bad;
        }
        // Every split of the rows draws the same tokens (the scratch left at zero between), at
        // as many rows as fit the SMs at that split.
        const int forced = forced_splits;
        for (int splits : {1, 3, 16, k_new::kMaxSampleSplits}) {
            forced_splits = splits;
            const int n = splits == 1 ? rows : std::max(1, sm_count / splits);
            const std::vector<unsigned int> split = run.draw(sample_new<T>, n);
            if (!std::equal(split.begin(), split.end(), fresh.begin())) {
                printf("  %s: %d blocks a row drew other tokens\n", q.name, splits);
                ++bad;
            }
        }
        forced_splits = forced;
        int differ = 0;
#ifdef OLD_SAMPLING
        const std::vector<unsigned int> old = run.draw(sample_old<T>);
        const int old_bad = outside(run, q, old, bounds);
        for (int r = 0; r < rows; ++r) differ += old[r] != fresh[r];
        if (old_bad) printf("  %s: the old kernel drew %d token(s) outside\n", q.name, old_bad);
#endif
        if (bad) ++failures;
        char new_times[64];
        double us[4];
        const int counts[4] = {1, 8, 64, 256};
        for (int i = 0; i < 4; ++i)
            us[i] = graph_us(st, 20, [&](int) { run.launch(sample_new<T>, st, counts[i]); });
        snprintf(new_times, sizeof new_times, "%.1f / %.1f / %.1f / %.1f", us[0], us[1], us[2], us[3]);
        printf("%-34s %9d %6d %32s", q.name, bad, differ, new_times);
#ifdef OLD_SAMPLING
        for (int i = 0; i < 4; ++i)
            us[i] = graph_us(st, 20, [&](int) { run.launch(sample_old<T>, st, counts[i]); });
        printf(" %32s", (snprintf(new_times, sizeof new_times, "%.1f / %.1f / %.1f / %.1f", us[0],
                                  us[1], us[2], us[3]),
                         new_times));
#endif
        printf("\n");
        fflush(stdout);
    }
    CK(cudaStreamDestroy(st));
}

// token_logprobs_* on the same rows: each record's top tokens (value descending, id ascending),
// the scored token's rank and every log probability against the CPU's log_softmax in double
// (within 1e-4), at 0, 5 and 20 top tokens; the same bits at 1, 3, 16 and 32 blocks a row; and
// the time of a launch at 1 / 8 / 64 / 256 rows.
template <typename T> void check_logprobs(const char* what, bool masked) {
    const int vocab = 128256;
    const int rows = 256;
    const int words = k_new::kLogprobRecord;
    const std::vector<T> host = make_logits<T>(rows, vocab, masked, 23);
    T* logits = upload(host);
    std::vector<int> targets(rows, -1);
    std::vector<unsigned int> sampled(rows);
    for (int r = 0; r < rows; ++r) {
        sampled[r] = (unsigned int)((r * 7919) % vocab);
        if (r % 2 == 1) targets[r] = (r * 104729) % vocab;
    }
    int* d_targets = upload(targets);
    unsigned int* d_sampled = upload(sampled);
    int* d_top;
    unsigned int* rec;
    CK(cudaMalloc(&d_top, rows * 4));
    CK(cudaMalloc(&rec, (size_t)rows * words * 4));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    printf("\n== token_logprobs, %s: records of %d rows checked; us a launch at 1 / 8 / 64 / 256 rows\n",
           what, rows);
    k_new::TeamRow* teams;
    CK(cudaMalloc(&teams, (size_t)rows * k_new::kTeamRowBytes));
    CK(cudaMemset(teams, 0, (size_t)rows * k_new::kTeamRowBytes));
    for (int n : {0, 5, 20}) {
        CK(cudaMemcpy(d_top, std::vector<int>(rows, n).data(), rows * 4, cudaMemcpyHostToDevice));
        auto launch_new = [&](int count) {
            logprobs_new<T><<<dim3(count, splits_for(count)), 1024, 0, st>>>(
                rec, logits, count, vocab, vocab, d_targets, d_sampled, d_top, teams);
        };
#ifdef OLD_SAMPLING
        auto launch_old = [&](int count) {
            logprobs_old<T><<<count, 1024, 0, st>>>(rec, logits, count, vocab, vocab, d_targets,
                                                     d_sampled, d_top);
        };
#endif
        // The records of the first `count` rows.
        auto records = [&](auto launch, int count) {
            launch(count);
            CK(cudaStreamSynchronize(st));
            CK(cudaGetLastError());
            std::vector<unsigned int> h((size_t)count * words);
            CK(cudaMemcpy(h.data(), rec, h.size() * 4, cudaMemcpyDeviceToHost));
            return h;
        };
        auto wrong = [&](const std::vector<unsigned int>& h) {
            int bad = 0;
            for (int r = 0; r < rows; ++r) {
                std::vector<std::pair<float, int>> order;
                double x_max = -INFINITY;
                for (int v = 0; v < vocab; ++v) {
                    const float x = to_f(host[(size_t)r * vocab + v]);
                    order.push_back({x, v});
                    x_max = std::max(x_max, (double)x);
                }
                double sum = 0.0;
                for (auto& e : order) sum += exp((double)e.first - x_max);
                const double lse = x_max + log(sum);
                std::sort(order.begin(), order.end(), [](auto a, auto b) {
                    return a.first > b.first || (a.first == b.first && a.second < b.second);
                });
                const unsigned int* q = &h[(size_t)r * words];
                const int target = targets[r] >= 0 ? targets[r] : (int)sampled[r];
                const float xt = to_f(host[(size_t)r * vocab + target]);
                unsigned int rank = 1;
                for (auto& e : order) rank += e.first > xt;
                auto close = [&](unsigned int bits, double want) {
                    float got;
                    memcpy(&got, &bits, 4);
                    return std::isinf(want) ? got == (float)want : fabs(got - want) <= 1e-4;
                };
                bool ok = q[0] == sampled[r] && (int)q[1] == target && q[3] == rank &&
                          close(q[2], xt - lse);
                for (int i = 0; i < n; ++i) {
                    ok = ok && (int)q[4 + i] == order[i].second &&
                         close(q[4 + k_new::kMaxTopLogprobs + i], order[i].first - lse);
                }
                bad += !ok;
            }
            return bad;
        };
        const std::vector<unsigned int> full = records(launch_new, rows);
        int bad = wrong(full);
        // The same bits at every split of the rows (as many rows as fit the SMs at each).
        const int forced = forced_splits;
        for (int splits : {1, 3, 16, k_new::kMaxSampleSplits}) {
            forced_splits = splits;
            const int m = splits == 1 ? rows : std::max(1, sm_count / splits);
            const std::vector<unsigned int> split = records(launch_new, m);
            if (!std::equal(split.begin(), split.end(), full.begin())) {
                printf("  top %d: %d blocks a row wrote other records\n", n, splits);
                ++bad;
            }
        }
        forced_splits = forced;
        if (bad) ++failures;
        double us[4];
        const int counts[4] = {1, 8, 64, 256};
        for (int i = 0; i < 4; ++i)
            us[i] = graph_us(st, 20, [&](int) { launch_new(counts[i]); });
        printf("top %-2d  rows wrong %d   new %.1f / %.1f / %.1f / %.1f", n, bad, us[0], us[1], us[2],
               us[3]);
#ifdef OLD_SAMPLING
        const int old_bad = wrong(records(launch_old, rows));
        for (int i = 0; i < 4; ++i)
            us[i] = graph_us(st, 20, [&](int) { launch_old(counts[i]); });
        printf("   old (rows wrong %d) %.1f / %.1f / %.1f / %.1f", old_bad, us[0], us[1], us[2],
               us[3]);
#endif
        printf("\n");
        fflush(stdout);
    }
    CK(cudaStreamDestroy(st));
    CK(cudaFree(teams));
}

int main() {
    const std::vector<Params> sets = {
        {"greedy", 0.0f, 0, 1.0f, 0.0f},
        {"temperature 1", 1.0f, 0, 1.0f, 0.0f},
        {"temperature 0.7 top-p 0.9", 0.7f, 0, 0.9f, 0.0f},
        {"top-p 0.95", 1.0f, 0, 0.95f, 0.0f},
        {"top-k 50", 1.0f, 50, 1.0f, 0.0f},
        {"temperature 0.7 top-k 20 top-p 0.9", 0.7f, 20, 0.9f, 0.0f},
        {"min-p 0.05", 1.0f, 0, 1.0f, 0.05f},
        {"top-k 40 min-p 0.1 top-p 0.8", 0.8f, 40, 0.8f, 0.1f},
        {"top-k 8000", 1.0f, 8000, 1.0f, 0.0f},
        {"top-p 0.99 (wide nuclei)", 1.5f, 0, 0.99f, 0.0f},
    };
    CK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, 0));
    if (const char* env = getenv("SPLITS")) forced_splits = atoi(env);
    printf("== %d SMs; blocks a row: %s\n", sm_count,
           forced_splits > 0 ? "SPLITS" : "min(32, SMs / rows)");
    check_gumbel();
    // SETS=N: the first N parameter sets only, on bf16 logits (a quicker timing run).
    if (const char* env = getenv("SETS")) {
        const size_t n = std::min<size_t>(atoi(env), sets.size());
        const std::vector<Params> first(sets.begin(), sets.begin() + n);
        check_and_time<bf>("bf16 logits (sample_*)", false, first);
    } else {
        check_and_time<bf>("bf16 logits (sample_*)", false, sets);
        check_and_time<float>("f32 logits, every 3rd row masked (sample_processed_*)", true, sets);
        check_logprobs<bf>("bf16 logits", false);
    }
    printf("\n%s: %d check(s) failed\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
