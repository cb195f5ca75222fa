// Where a single-stream decode step's time goes, outside tpserve (issue 9): the kernels of one
// Llama-3-8B decode step at batch 1 (per layer: RMSNorm, qkv GEMV, decode attention with RoPE
// and the KV write, its split merge, o GEMV, residual + RMSNorm, gate|up GEMV, SiLU-mul, down GEMV;
// then the final norm and the lm_head GEMV), launched as worker/src/cuda/forward.rs launches
// them, in one CUDA graph with programmatic dependent launches, weights in HBM (one copy per
// layer). The step is timed whole and with one kind of kernel left out at a time, so the
// difference is what that kind costs inside the graph, which a profiler of single kernels
// (ncu, in /usr/local/cuda/bin on the GPU machine) does not show.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90 -std=c++17 -I kernels/cuda tests/gpu/decode_step_bench.cu -o /tmp/db
//   /tmp/db [CONTEXT=256]
// Environment: SHORT=1 times only the whole step (33, 16 and 64 attention splits) and the step
// with the MLP as one persistent kernel (fused_mlp_bs1, below).
// Launch shapes as worker/src/cuda/kernels/; GEMV variants chosen per shape by timing them
// (as the worker's warm-up does); attention splits as worker/src/cuda/graphs.rs's decode_splits
// (33 at batch 1 on 132 SMs), and the other split counts for comparison.
// Each kernel file has its own anonymous-namespace helpers: one namespace per file keeps them
// apart in this one translation unit (common.cuh, included first, is guarded).
#include "common.cuh"
namespace k_attention {
#include "attention.cu"
}
namespace k_gemv {
#include "gemv.cu"
}
namespace k_norm {
#include "rms_norm.cu"
}
namespace k_rope {
#include "rope_kv_write.cu"
}
namespace k_silu {
#include "silu_mul.cu"
}
using namespace k_attention;
using namespace k_gemv;
using namespace k_norm;
using namespace k_rope;
using namespace k_silu;

#include "harness.cuh"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>


// Llama-3-8B.
static const int HIDDEN = 4096, Q_HEADS = 32, KV_HEADS = 8, HD = 128, INTER = 14336,
                 VOCAB = 128256, LAYERS = 32, BLOCK = 16;
static const int QKV = (Q_HEADS + 2 * KV_HEADS) * HD;

extern "C" __global__ void fill_random(bf* p, long long n, unsigned seed, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned s = (unsigned)i * 2654435761u ^ seed;
        s ^= s >> 13;
        s *= 0x5bd1e995u;
        s ^= s >> 15;
        p[i] = __float2bfloat16(((s & 0xffff) / 65536.0f - 0.5f) * scale);
    }
}

static bf* alloc_random(long long n, unsigned seed, float scale) {
    bf* p;
    CK(cudaMalloc(&p, n * sizeof(bf)));
    fill_random<<<1024, 256>>>(p, n, seed, scale);
    CK(cudaGetLastError());
    return p;
}

static cudaStream_t g_stream;

template <typename... KArgs, typename... Args>
static void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Args... args) {
    launch_pdl(g_stream, kernel, grid, block, args...);
}

typedef void (*GemvFn)(bf*, const bf*, const bf*, int, int, int);
struct GemvVariant {
    const char* name;
    GemvFn fn;
    int r;
};
static const GemvVariant VARIANTS[] = {
    {"r1u2", gemv_m1_r1_bf16, 1},    {"r2u2", gemv_m1_r2_bf16, 2},
    {"r4u2", gemv_m1_r4_bf16, 4},    {"r1u4", gemv_m1_r1_u4_bf16, 1},
    {"r1u8", gemv_m1_r1_u8_bf16, 1}, {"r2u4", gemv_m1_r2_u4_bf16, 2},
    {"r2u8", gemv_m1_r2_u8_bf16, 2},
};

static void gemv(const GemvVariant& v, bf* y, const bf* x, const bf* w, int n_out, int k) {
    launch(v.fn, dim3((n_out + 4 * v.r - 1) / (4 * v.r)), dim3(128), y, x, w, 1, n_out, k);
}

struct Layer {
    bf *input_norm, *post_norm, *qkv, *o, *gate_up, *down, *kc, *vc;
};

// What the step leaves out (an ablation) and how it runs.
struct Options {
    bool norms = true, rope = true, attention = true, silu = true, gemvs = true;
    int splits = 33;
    // The split merge left out (its launch and its work); the attention and merge replaced by
    // empty kernels that only wait (what a kernel boundary costs in the chain).
    bool combine = true, empty_attention = false;
    // The MLP's three kernels (gate|up GEMV, SiLU-mul, down GEMV) as one persistent kernel,
    // with or without the down rows' first loads before its grid barrier.
    bool fused_mlp = false, fused_preload = true;
};

extern "C" __global__ void empty_kernel() { tpserve::wait_for_inputs(); }

// An experiment toward a fused decode layer (issue 9; session 31, not yet run on a GPU): the MLP
// of one row in one persistent kernel. Every warp computes gate and up rows j (a GEMV's dot
// products, summed in gemv.cu's order, so the same bits) and writes silu(gate) * up rounded as
// silu_mul.cu rounds it; then each warp loads the first chunks of its down rows, the grid meets
// at a barrier (a counter and a generation word, reset by the last block to arrive, so graphs
// replay it), and the warps finish the down rows reading the activations through L2. What it
// saves against three kernels: the SiLU-mul launch and the down product's ramp, whose first
// loads are in flight while the slowest gate|up rows finish; what it pays: the barrier. Every
// block must be resident at once: the grid is at most the SMs' capacity at 4 blocks an SM.
constexpr int kFusedWarps = 4;  // warps a block
constexpr int kFusedU = 4;      // 256-element chunks a lane has in flight per row

// A warp's dot products of kRows weight rows (k elements of bf16 each) and x, each summed as
// gemv.cu sums it (a lane's 8-element pieces in chunk order, then the warp's butterfly: every lane
// gets the totals); the rows' chunks load together (kRows x kFusedU in flight a lane). `pre`: the
// rows' first kFusedU chunks, already loaded when `have_pre`. x through L2 when kXFromL2 (written
// by other blocks of the same kernel), else the read-only path.
template <int kRows, bool kXFromL2>
__device__ void fused_dot(const bf* const (&w_rows)[kRows], const bf* __restrict__ x, int k,
                          int lane, const uint4 (&pre)[kRows][kFusedU], bool have_pre,
                          float (&total)[kRows]) {
    float acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = 0.0f;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
    for (int base = lane * 8, group = 0; base < k; base += 256 * kFusedU, ++group) {
        uint4 wv[kRows][kFusedU], xv[kFusedU];
#pragma unroll
        for (int u = 0; u < kFusedU; ++u) {
            const int kk = base + u * 256;
            const bool in_k = kk < k;
#pragma unroll
            for (int r = 0; r < kRows; ++r) {
                wv[r][u] = group == 0 && have_pre
                               ? pre[r][u]
                               : (in_k ? tpserve::load_streaming(w_rows[r] + kk) : zero);
            }
            const uint4* xp = reinterpret_cast<const uint4*>(x + kk);
            xv[u] = in_k ? (kXFromL2 ? __ldcg(xp) : __ldg(xp)) : zero;
        }
#pragma unroll
        for (int u = 0; u < kFusedU; ++u) {
#pragma unroll
            for (int r = 0; r < kRows; ++r) acc[r] = dot8<bf>(wv[r][u], xv[u], acc[r]);
        }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) total[r] = tpserve::warp_reduce_sum(acc[r]);
}

// out[n] = sum_j act[j] * w_down[n, j], act[j] = silu(x . w_gate_up[j]) * (x . w_gate_up[inter
// + j]), for one row x. barrier: 2 u32, zero before the first launch (every launch leaves the
// count at zero and advances the generation). preload: 0 leaves the down rows' first chunks to
// after the barrier (what the early loads are worth). Launch: grid (G) with G blocks resident at
// once; block (32 kFusedWarps).
extern "C" __global__ void __launch_bounds__(32 * kFusedWarps, 4)
    fused_mlp_bs1(bf* __restrict__ out, bf* __restrict__ act, const bf* __restrict__ x,
                  const bf* __restrict__ w_gate_up, const bf* __restrict__ w_down,
                  unsigned* __restrict__ barrier, int hidden, int inter, int preload) {
    const int lane = threadIdx.x & 31;
    const int warps = gridDim.x * kFusedWarps;
    const int wid = blockIdx.x * kFusedWarps + (threadIdx.x >> 5);
    // The first gate and up rows' first chunks into L2 while the kernel before finishes.
    if (wid < inter) {
#pragma unroll
        for (int u = 0; u < kFusedU; ++u) {
            const long long kk = lane * 8 + u * 256;
            asm volatile("prefetch.global.L2 [%0];" ::"l"(w_gate_up + (long long)wid * hidden + kk));
            asm volatile("prefetch.global.L2 [%0];" ::"l"(w_gate_up + (long long)(inter + wid) *
                                                                          hidden + kk));
        }
    }
    // Read before this block arrives; it changes only after every block has.
    const unsigned generation = *reinterpret_cast<volatile unsigned*>(&barrier[1]);
    tpserve::wait_for_inputs();
    const uint4 none1[1][kFusedU] = {};
    const uint4 none2[2][kFusedU] = {};
    for (int j = wid; j < inter; j += warps) {
        const bf* const pair[2] = {w_gate_up + (long long)j * hidden,
                                   w_gate_up + (long long)(inter + j) * hidden};
        float gu[2];
        fused_dot<2, false>(pair, x, hidden, lane, none2, false, gu);
        if (lane == 0) {
            // As the GEMV rounds its outputs and silu_mul.cu its product.
            const float gate = tpserve::round_to<bf>(gu[0]);
            const float up = tpserve::round_to<bf>(gu[1]);
            const float activated = tpserve::round_to<bf>(gate / (1.0f + __expf(-gate)));
            act[j] = tpserve::from_float<bf>(activated * up);
        }
    }
    // The first chunks of this warp's first two down rows (the second may lie past the rows: it
    // then loads the first again, and its sum is dropped), before the barrier.
    const int n0 = wid, n1 = wid + warps < hidden ? wid + warps : wid;
    const bf* const down_rows[2] = {w_down + (long long)n0 * inter, w_down + (long long)n1 * inter};
    uint4 pre[2][kFusedU];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int u = 0; u < kFusedU; ++u) {
            const int kk = lane * 8 + u * 256;
            pre[r][u] = preload && n0 < hidden && kk < inter
                            ? tpserve::load_streaming(down_rows[r] + kk)
                            : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    // The grid barrier: every block's activations written and visible before any reads them.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(&barrier[0], 1u) + 1 == gridDim.x) {
            atomicExch(&barrier[0], 0u);
            __threadfence();
            atomicAdd(&barrier[1], 1u);
        } else {
            while (*reinterpret_cast<volatile unsigned*>(&barrier[1]) == generation) {
            }
        }
        __threadfence();
    }
    __syncthreads();
    if (n0 < hidden) {
        float t[2];
        fused_dot<2, true>(down_rows, act, inter, lane, pre, preload != 0, t);
        if (lane == 0) {
            out[n0] = tpserve::from_float<bf>(t[0]);
            if (n1 != n0) out[n1] = tpserve::from_float<bf>(t[1]);
        }
    }
    // Any further rows of a smaller grid.
    for (int n = wid + 2 * warps; n < hidden; n += warps) {
        const bf* const row[1] = {w_down + (long long)n * inter};
        float t[1];
        fused_dot<1, true>(row, act, inter, lane, none1, false, t);
        if (lane == 0) {
            out[n] = tpserve::from_float<bf>(t[0]);
        }
    }
}

struct Model {
    std::vector<Layer> layers;
    bf *final_norm, *lm_head;
    // Activations.
    bf *x, *normed, *qkv, *attn, *sub, *gate_up, *act, *logits;
    float *partial_out, *partial_ml, *cos_t, *sin_t;
    int *block_tables, *tiles, *positions;
    long long* slots;
    int context, max_blocks;
    unsigned* barrier;  // fused_mlp_bs1's
    int fused_blocks;   // fused_mlp_bs1's grid
    const GemvVariant *v_qkv, *v_o, *v_gate_up, *v_down, *v_head;
};

static void step(const Model& m, const Options& o) {
    const float eps = 1e-5f;
    const float scale = 1.0f / sqrtf((float)HD);
    for (int li = 0; li < LAYERS; ++li) {
        const Layer& l = m.layers[li];
        if (o.norms) {
            if (li == 0) {
                launch(rms_norm_bf16, dim3(1), dim3(512), m.normed, m.x, l.input_norm, HIDDEN,
                       eps);
            } else {
                launch(rms_norm_residual_bf16, dim3(1), dim3(512), m.normed, m.x, m.sub,
                       l.input_norm, HIDDEN, eps);
            }
        }
        if (o.gemvs) gemv(*m.v_qkv, m.qkv, m.normed, l.qkv, QKV, HIDDEN);
        if (!o.attention && o.rope) {
            // The decode attention rotates and writes the new key itself; without it, the
            // rotation it does is left out with it, unless asked for alone.
            const int pairs = (Q_HEADS + KV_HEADS) * HD / 2 + KV_HEADS * HD;
            launch(rope_kv_write_bf16, dim3(1, std::max(1, (pairs + 1023) / 1024)), dim3(256),
                   m.qkv, l.kc, l.vc, m.slots, m.positions, m.cos_t, m.sin_t, Q_HEADS, KV_HEADS,
                   HD, QKV, 1.0f, 1.0f);
        }
        if (o.empty_attention) {
            launch(empty_kernel, dim3(1, KV_HEADS, o.splits), dim3(128));
            if (o.combine) launch(empty_kernel, dim3(1, Q_HEADS), dim3(HD));
        } else if (o.attention) {
            launch(paged_attention_decode_hd128_g4_bf16, dim3(1, KV_HEADS, o.splits), dim3(128),
                   m.attn, m.partial_out, m.partial_ml, m.qkv, l.kc, l.vc, m.block_tables,
                   m.tiles, m.slots, m.cos_t, m.sin_t, Q_HEADS, KV_HEADS, BLOCK, m.max_blocks,
                   QKV, o.splits, 0, scale, 1.0f, 1.0f);
            if (o.splits > 1 && o.combine) {
                launch(attention_combine_bf16, dim3(1, Q_HEADS), dim3(HD), m.attn,
                       m.partial_out, m.partial_ml, Q_HEADS, HD, o.splits);
            }
        }
        if (o.gemvs) gemv(*m.v_o, m.sub, m.attn, l.o, HIDDEN, Q_HEADS * HD);
        if (o.norms) {
            launch(rms_norm_residual_bf16, dim3(1), dim3(512), m.normed, m.x, m.sub,
                   l.post_norm, HIDDEN, eps);
        }
        if (o.fused_mlp) {
            launch(fused_mlp_bs1, dim3(m.fused_blocks), dim3(32 * kFusedWarps), m.sub, m.act,
                   m.normed, l.gate_up, l.down, m.barrier, HIDDEN, INTER,
                   o.fused_preload ? 1 : 0);
            continue;
        }
        if (o.gemvs) gemv(*m.v_gate_up, m.gate_up, m.normed, l.gate_up, 2 * INTER, HIDDEN);
        if (o.silu) {
            launch(silu_mul_bf16, dim3(1, (INTER + 2047) / 2048), dim3(256), m.act, m.gate_up,
                   INTER);
        }
        if (o.gemvs) gemv(*m.v_down, m.sub, m.act, l.down, HIDDEN, INTER);
    }
    if (o.norms) {
        launch(rms_norm_residual_bf16, dim3(1), dim3(512), m.normed, m.x, m.sub, m.final_norm,
               HIDDEN, eps);
    }
    if (o.gemvs) gemv(*m.v_head, m.logits, m.normed, m.lm_head, VOCAB, HIDDEN);
}

static float bf_to_f(unsigned short b) {
    unsigned int u = (unsigned int)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static float round_bf(float x) { return __bfloat162float(__float2bfloat16(x)); }

// The last layer's decode attention (RoPE, the new key's cache write, the attention itself)
// against a double-precision CPU reference from the same qkv and cache; exits on a mismatch.
static void check_last_attention(const Model& m) {
    const Layer& l = m.layers[LAYERS - 1];
    const int ctx = m.context + 1;
    std::vector<unsigned short> qkv(QKV), attn(Q_HEADS * HD);
    std::vector<unsigned short> kc((size_t)m.max_blocks * BLOCK * KV_HEADS * HD), vc(kc.size());
    std::vector<float> cos_t((size_t)ctx * HD / 2), sin_t(cos_t.size());
    std::vector<int> table(m.max_blocks);
    CK(cudaMemcpy(qkv.data(), m.qkv, QKV * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(attn.data(), m.attn, attn.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(kc.data(), l.kc, kc.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(vc.data(), l.vc, vc.size() * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(cos_t.data(), m.cos_t, cos_t.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(sin_t.data(), m.sin_t, sin_t.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(table.data(), m.block_tables, table.size() * 4, cudaMemcpyDeviceToHost));
    const int pos = m.context;
    auto rotate = [&](const unsigned short* h, float* out) {
        for (int i = 0; i < HD / 2; ++i) {
            const float c = cos_t[(size_t)pos * HD / 2 + i], s = sin_t[(size_t)pos * HD / 2 + i];
            const float x1 = bf_to_f(h[i]), x2 = bf_to_f(h[i + HD / 2]);
            out[i] = round_bf(x1 * c - x2 * s);
            out[i + HD / 2] = round_bf(x2 * c + x1 * s);
        }
    };
    auto slot_of = [&](int key) { return (size_t)table[key / BLOCK] * BLOCK + key % BLOCK; };
    double worst = 0, worst_cache = 0;
    for (int g = 0; g < KV_HEADS; ++g) {
        float own_k[HD];
        rotate(&qkv[(Q_HEADS + g) * HD], own_k);
        const unsigned short* own_v = &qkv[(Q_HEADS + KV_HEADS + g) * HD];
        for (int d = 0; d < HD; ++d) {
            const size_t at = (slot_of(pos) * KV_HEADS + g) * HD + d;
            worst_cache = std::max(worst_cache, (double)fabsf(bf_to_f(kc[at]) - own_k[d]));
            worst_cache = std::max(worst_cache, (double)fabsf(bf_to_f(vc[at]) - bf_to_f(own_v[d])));
        }
        for (int hh = 0; hh < Q_HEADS / KV_HEADS; ++hh) {
            const int h = g * (Q_HEADS / KV_HEADS) + hh;
            float q[HD];
            rotate(&qkv[h * HD], q);
            std::vector<double> score(ctx);
            double mx = -1e300;
            for (int j = 0; j < ctx; ++j) {
                double dot = 0;
                for (int d = 0; d < HD; ++d) {
                    const double k = j == pos ? own_k[d]
                                              : bf_to_f(kc[(slot_of(j) * KV_HEADS + g) * HD + d]);
                    dot += (double)q[d] * k;
                }
                score[j] = dot / sqrt((double)HD);
                mx = std::max(mx, score[j]);
            }
            double den = 0;
            for (int j = 0; j < ctx; ++j) den += exp(score[j] - mx);
            for (int d = 0; d < HD; ++d) {
                double num = 0;
                for (int j = 0; j < ctx; ++j) {
                    const double v = j == pos ? bf_to_f(own_v[d])
                                              : bf_to_f(vc[(slot_of(j) * KV_HEADS + g) * HD + d]);
                    num += exp(score[j] - mx) * v;
                }
                worst = std::max(worst, fabs(num / den - bf_to_f(attn[h * HD + d])));
            }
        }
    }
    // The output is rounded to bf16 once (|values| < 1 here: 2^-8 relative) after f32 sums.
    const bool ok = worst < 1e-2 && worst_cache == 0;
    printf("last layer's attention vs CPU: max |diff| %.2e (limit 1e-2), new key and value in "
           "the cache: max |diff| %.1e (must be 0): %s\n",
           worst, worst_cache, ok ? "ok" : "MISMATCH");
    if (!ok) exit(1);
}

// Median ms per replay of a graph holding `reps` copies of `body`.
template <typename F> static double time_graph(F body, int reps, int replays) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal));
    for (int i = 0; i < reps; ++i) body();
    CK(cudaStreamEndCapture(g_stream, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
    for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(exec, g_stream));
    std::vector<double> ms;
    for (int i = 0; i < replays; ++i) {
        CK(cudaEventRecord(a, g_stream));
        CK(cudaGraphLaunch(exec, g_stream));
        CK(cudaEventRecord(b, g_stream));
        CK(cudaEventSynchronize(b));
        float t;
        CK(cudaEventElapsedTime(&t, a, b));
        ms.push_back(t / reps);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

// The fastest GEMV variant for one shape, over LAYERS weight copies (from HBM).
static const GemvVariant* pick(const char* name, bf* y, const bf* x, bf* const* w, int n_out,
                               int k) {
    const GemvVariant* best = nullptr;
    double best_us = 1e30;
    printf("  %-8s", name);
    for (const GemvVariant& v : VARIANTS) {
        const double ms = time_graph(
            [&] {
                for (int li = 0; li < LAYERS; ++li) gemv(v, y, x, w[li], n_out, k);
            },
            1, 20);
        const double us = ms * 1000.0 / LAYERS;
        const double gbs = (double)n_out * k * 2 / (us * 1e3);
        printf(" %s %.1f us (%.0f GB/s)", v.name, us, gbs);
        if (us < best_us) {
            best_us = us;
            best = &v;
        }
    }
    printf(" -> %s\n", best->name);
    return best;
}

int main(int argc, char** argv) {
    const int context = argc > 1 ? atoi(argv[1]) : 256;
    CK(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));

    Model m;
    m.context = context;
    m.max_blocks = (context + 1 + BLOCK - 1) / BLOCK + 1;
    const long long cache_elems = (long long)m.max_blocks * BLOCK * KV_HEADS * HD;
    double weight_bytes = 0;
    for (int li = 0; li < LAYERS; ++li) {
        Layer l;
        const unsigned s = 1000u * li;
        l.input_norm = alloc_random(HIDDEN, s + 1, 2.0f);
        l.post_norm = alloc_random(HIDDEN, s + 2, 2.0f);
        l.qkv = alloc_random((long long)QKV * HIDDEN, s + 3, 0.04f);
        l.o = alloc_random((long long)HIDDEN * Q_HEADS * HD, s + 4, 0.04f);
        l.gate_up = alloc_random((long long)2 * INTER * HIDDEN, s + 5, 0.04f);
        l.down = alloc_random((long long)HIDDEN * INTER, s + 6, 0.02f);
        l.kc = alloc_random(cache_elems, s + 7, 1.0f);
        l.vc = alloc_random(cache_elems, s + 8, 1.0f);
        m.layers.push_back(l);
        weight_bytes += 2.0 * ((double)QKV * HIDDEN + (double)HIDDEN * Q_HEADS * HD +
                               2.0 * INTER * HIDDEN + (double)HIDDEN * INTER);
    }
    m.final_norm = alloc_random(HIDDEN, 7, 2.0f);
    m.lm_head = alloc_random((long long)VOCAB * HIDDEN, 9, 0.04f);
    weight_bytes += 2.0 * VOCAB * HIDDEN;
    m.x = alloc_random(HIDDEN, 11, 1.0f);
    m.normed = alloc_random(HIDDEN, 12, 1.0f);
    m.qkv = alloc_random(QKV, 13, 1.0f);
    m.attn = alloc_random(Q_HEADS * HD, 14, 1.0f);
    m.sub = alloc_random(HIDDEN, 15, 0.1f);
    m.gate_up = alloc_random(2 * INTER, 16, 1.0f);
    m.act = alloc_random(INTER, 17, 1.0f);
    m.logits = alloc_random(VOCAB, 18, 1.0f);
    CK(cudaMalloc(&m.barrier, 2 * sizeof(unsigned)));
    CK(cudaMemset(m.barrier, 0, 2 * sizeof(unsigned)));
    {
        // 2,048 warps where they fit: 7 gate|up pairs and 2 down rows each.
        int per_sm = 0;
        CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fused_mlp_bs1,
                                                         32 * kFusedWarps, 0));
        m.fused_blocks = std::min(512, per_sm * prop.multiProcessorCount);
    }
    CK(cudaMalloc(&m.partial_out, (size_t)Q_HEADS * 64 * HD * sizeof(float)));
    CK(cudaMalloc(&m.partial_ml, (size_t)Q_HEADS * 64 * 2 * sizeof(float)));
    {
        const int max_pos = context + 2;
        std::vector<float> c((size_t)max_pos * HD / 2), s(c.size());
        for (int p = 0; p < max_pos; ++p) {
            for (int i = 0; i < HD / 2; ++i) {
                const double f = p * pow(500000.0, -2.0 * i / HD);
                c[(size_t)p * HD / 2 + i] = (float)cos(f);
                s[(size_t)p * HD / 2 + i] = (float)sin(f);
            }
        }
        CK(cudaMalloc(&m.cos_t, c.size() * 4));
        CK(cudaMalloc(&m.sin_t, s.size() * 4));
        CK(cudaMemcpy(m.cos_t, c.data(), c.size() * 4, cudaMemcpyHostToDevice));
        CK(cudaMemcpy(m.sin_t, s.data(), s.size() * 4, cudaMemcpyHostToDevice));
        // One sequence whose blocks are stored in reverse order (a block table is a gather).
        std::vector<int> table(m.max_blocks);
        for (int b = 0; b < m.max_blocks; ++b) table[b] = m.max_blocks - 1 - b;
        CK(cudaMalloc(&m.block_tables, table.size() * 4));
        CK(cudaMemcpy(m.block_tables, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
        // The new token at position `context` (context keys before it, itself included after
        // the write: context + 1 keys attended).
        const int pos = context;
        const int tile[4] = {0, 0, 1, pos};
        const long long slot = (long long)table[pos / BLOCK] * BLOCK + pos % BLOCK;
        CK(cudaMalloc(&m.tiles, 16));
        CK(cudaMemcpy(m.tiles, tile, 16, cudaMemcpyHostToDevice));
        CK(cudaMalloc(&m.positions, 4));
        CK(cudaMemcpy(m.positions, &pos, 4, cudaMemcpyHostToDevice));
        CK(cudaMalloc(&m.slots, 8));
        CK(cudaMemcpy(m.slots, &slot, 8, cudaMemcpyHostToDevice));
    }
    CK(cudaDeviceSynchronize());

    // Copy bandwidth, the floor's denominator.
    const double copy_gbs = copy_bandwidth_gbs(g_stream);
    printf("%s, %d SMs; copy %.0f GB/s; weights %.2f GB; floor %.3f ms; context %d\n",
           prop.name, prop.multiProcessorCount, copy_gbs, weight_bytes / 1e9,
           weight_bytes / (copy_gbs * 1e6), context);

    printf("GEMV per shape (us per call, over %d weight copies):\n", LAYERS);
    std::vector<bf*> w(LAYERS);
    for (int li = 0; li < LAYERS; ++li) w[li] = m.layers[li].qkv;
    m.v_qkv = pick("qkv", m.qkv, m.normed, w.data(), QKV, HIDDEN);
    for (int li = 0; li < LAYERS; ++li) w[li] = m.layers[li].o;
    m.v_o = pick("o", m.sub, m.attn, w.data(), HIDDEN, Q_HEADS * HD);
    for (int li = 0; li < LAYERS; ++li) w[li] = m.layers[li].gate_up;
    m.v_gate_up = pick("gate_up", m.gate_up, m.normed, w.data(), 2 * INTER, HIDDEN);
    for (int li = 0; li < LAYERS; ++li) w[li] = m.layers[li].down;
    m.v_down = pick("down", m.sub, m.act, w.data(), HIDDEN, INTER);
    std::vector<bf*> head(LAYERS, m.lm_head);
    m.v_head = pick("lm_head", m.logits, m.normed, head.data(), VOCAB, HIDDEN);

    // A checksum of one step's logits and attention output from a fixed state: a kernel change
    // that should not move any number (a load moved, a launch reordered) must leave it as it was.
    {
        bf* x0 = alloc_random(HIDDEN, 11, 1.0f);
        // One step from the fixed state: FNV-1a of its logits and of the last attention output.
        auto checksums = [&](const Options& o) {
            CK(cudaMemcpy(m.x, x0, HIDDEN * sizeof(bf), cudaMemcpyDeviceToDevice));
            CK(cudaMemset(m.sub, 0, HIDDEN * sizeof(bf)));
            step(m, o);
            CK(cudaStreamSynchronize(g_stream));
            std::vector<unsigned short> logits(VOCAB), attn(Q_HEADS * HD);
            CK(cudaMemcpy(logits.data(), m.logits, VOCAB * 2, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(attn.data(), m.attn, Q_HEADS * HD * 2, cudaMemcpyDeviceToHost));
            unsigned long long h = 1469598103934665603ull;
            for (unsigned short v : logits) h = (h ^ v) * 1099511628211ull;
            unsigned long long ha = 1469598103934665603ull;
            for (unsigned short v : attn) ha = (ha ^ v) * 1099511628211ull;
            return std::make_pair(h, ha);
        };
        Options fused;
        fused.fused_mlp = true;
        const auto f = checksums(fused);
        Options o;
        o.splits = 33;
        const auto [h, ha] = checksums(o);
        printf("checksum: logits %016llx, last layer's attention %016llx\n", h, ha);
        // The fused MLP sums as the GEMVs do and rounds as they and SiLU-mul do: the same bits.
        printf("the MLP as one persistent kernel (%d blocks): logits %016llx: %s\n",
               m.fused_blocks, f.first, f.first == h ? "the same bits" : "DIFFERENT BITS");
        if (f.first != h) exit(1);
        check_last_attention(m);
        // One split: the row's own key then lies past the first loop step of its warp.
        o.splits = 1;
        step(m, o);
        CK(cudaStreamSynchronize(g_stream));
        check_last_attention(m);
    }
    const bool short_rows = getenv("SHORT") != nullptr;

    struct Row {
        std::string name;
        Options o;
    };
    std::vector<Row> rows;
    auto row = [&](std::string name, void (*edit)(Options&)) {
        Options o;
        edit(o);
        rows.push_back({name, o});
    };
    rows.push_back({"whole step", Options{}});
    row("the MLP as one persistent kernel (grid barrier)", [](Options& o) { o.fused_mlp = true; });
    row("the same, the down rows' first loads after the barrier", [](Options& o) {
        o.fused_mlp = true;
        o.fused_preload = false;
    });
    row("without the split merge (its output wrong)", [](Options& o) { o.combine = false; });
    row("attention and merge as empty kernels", [](Options& o) { o.empty_attention = true; });
    row("attention as one empty kernel", [](Options& o) {
        o.empty_attention = true;
        o.combine = false;
    });
    for (int s : {16, 64}) {
        Options o;
        o.splits = s;
        if (short_rows) rows.push_back({"attention with " + std::to_string(s) + " splits", o});
    }
    if (!short_rows) {
        row("without RMSNorms", [](Options& o) { o.norms = false; });
        row("without attention (+ merge), with RoPE + KV write",
            [](Options& o) { o.attention = false; });
        row("without attention (+ merge, RoPE, KV write)",
            [](Options& o) { o.attention = o.rope = false; });
        row("without SiLU-mul", [](Options& o) { o.silu = false; });
        row("GEMVs only", [](Options& o) { o.norms = o.rope = o.attention = o.silu = false; });
        row("everything but the GEMVs", [](Options& o) { o.gemvs = false; });
        for (int s : {1, 2, 4, 8, 16, 64}) {
            Options o;
            o.splits = s;
            rows.push_back({"attention with " + std::to_string(s) + " splits", o});
        }
    }
    rows.push_back({"whole step again", Options{}});
    const double floor_ms = weight_bytes / (copy_gbs * 1e6);
    printf("\n| step (batch 1, %d keys) | ms | floor ratio | difference to whole |\n", context);
    printf("| --- | --- | --- | --- |\n");
    double whole = 0;
    for (const Row& r : rows) {
        const double ms = time_graph([&] { step(m, r.o); }, 4, 30);
        if (whole == 0) whole = ms;
        printf("| %s | %.3f | %.3f | %+.3f |\n", r.name.c_str(), ms, floor_ms / ms, ms - whole);
    }
    return 0;
}
