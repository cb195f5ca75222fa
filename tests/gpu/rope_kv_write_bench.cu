// rope_kv_write (kernels/cuda/rope_kv_write.cu) outside tpserve (issue 9): checks its outputs
// (rotated queries in place, rotated keys and values in the cache) against a CPU copy of its
// per-element arithmetic, within one rounding step of the element (the CPU does not contract
// products into FMAs where nvcc and ptxas may), for its 8-pair items (head sizes 64, 128, 256)
// and its one-pair items (head size 72), bf16 and f16, caches in the dtype and FP8, rows with and
// without a slot; and times it on an 8B prompt step (8,192 tokens, 32 query and 8 KV heads of
// 128) against the copy rate. With -DOLD_ROPE='"path"' it also runs an earlier version of the
// file whose entry points were renamed old_rope_kv_write* (git show
// REV:kernels/cuda/rope_kv_write.cu | sed 's/rope_kv_write/old_rope_kv_write/g' > path), checks
// that its outputs are the same bits (the same arithmetic) and times it beside.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels/cuda tests/gpu/rope_kv_write_bench.cu -o /tmp/rk
//   /tmp/rk
// Exit status 1 if any check fails.
#include "common.cuh"
namespace k_new {
#include "rope_kv_write.cu"
}
#undef TPSERVE_ROPE_KV_WRITE
#undef TPSERVE_ROPE_KV_WRITE_ENTRY
#ifdef OLD_ROPE
namespace k_old {
#include OLD_ROPE
}
#endif

#include "harness.cuh"

#include <cuda_fp8.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

static int failures = 0;

template <typename T, typename C>
__global__ void rope_new(T* qkv, C* kc, C* vc, const long long* slots, const int* pos,
                         const float* cos, const float* sin, int qh, int kvh, int hd, int stride,
                         float ks, float vs) {
    k_new::rope_kv_write_impl<T, C>(qkv, kc, vc, slots, pos, cos, sin, qh, kvh, hd, stride, ks,
                                    vs);
}
#ifdef OLD_ROPE
template <typename T, typename C>
__global__ void rope_old(T* qkv, C* kc, C* vc, const long long* slots, const int* pos,
                         const float* cos, const float* sin, int qh, int kvh, int hd, int stride,
                         float ks, float vs) {
    k_old::old_rope_kv_write_impl<T, C>(qkv, kc, vc, slots, pos, cos, sin, qh, kvh, hd, stride,
                                        ks, vs);
}
#endif

// One step's inputs on the device: qkv rows, positions, slots (every 5th row negative: a
// padding row), the RoPE tables, and caches of element C.
template <typename T, typename C> struct Step {
    int n, qh, kvh, hd, stride, max_pos = 4096;
    size_t cache_elems;
    std::vector<T> qkv;
    std::vector<long long> slots;
    std::vector<int> pos;
    std::vector<float> cos, sin;
    T* d_qkv;
    C *d_kc, *d_vc;
    long long* d_slots;
    int* d_pos;
    float *d_cos, *d_sin;
    Step(int n_, int qh_, int kvh_, int hd_) : n(n_), qh(qh_), kvh(kvh_), hd(hd_) {
        stride = (qh + 2 * kvh) * hd;
        std::mt19937 rng(n + hd);
        std::uniform_real_distribution<float> u(-2.0f, 2.0f);
        qkv.resize((size_t)n * stride);
        for (auto& v : qkv) v = from_f<T>(u(rng));
        for (int t = 0; t < n; ++t) {
            pos.push_back((t * 37) % max_pos);
            slots.push_back(t % 5 == 4 ? -1 : (long long)t);
        }
        const int half = hd / 2;
        for (int p = 0; p < max_pos; ++p)
            for (int i = 0; i < half; ++i) {
                const double f = p * std::pow(500000.0, -2.0 * i / hd);
                cos.push_back((float)std::cos(f));
                sin.push_back((float)std::sin(f));
            }
        cache_elems = (size_t)n * kvh * hd;
        CK(cudaMalloc(&d_qkv, qkv.size() * sizeof(T)));
        CK(cudaMalloc(&d_kc, cache_elems * sizeof(C)));
        CK(cudaMalloc(&d_vc, cache_elems * sizeof(C)));
        CK(cudaMalloc(&d_slots, n * sizeof(long long)));
        CK(cudaMalloc(&d_pos, n * sizeof(int)));
        CK(cudaMalloc(&d_cos, cos.size() * sizeof(float)));
        CK(cudaMalloc(&d_sin, sin.size() * sizeof(float)));
        CK(cudaMemcpy(d_slots, slots.data(), n * sizeof(long long), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_pos, pos.data(), n * sizeof(int), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_cos, cos.data(), cos.size() * sizeof(float), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_sin, sin.data(), sin.size() * sizeof(float), cudaMemcpyHostToDevice));
    }
    ~Step() {
        for (void* p : {(void*)d_qkv, (void*)d_kc, (void*)d_vc, (void*)d_slots, (void*)d_pos,
                        (void*)d_cos, (void*)d_sin})
            cudaFree(p);
    }
    // Resets qkv and the caches, runs `kernel` as the worker launches it, and returns qkv and
    // both caches' bytes.
    std::vector<unsigned char> run(const void* kernel, int grid_y) {
        CK(cudaMemcpy(d_qkv, qkv.data(), qkv.size() * sizeof(T), cudaMemcpyHostToDevice));
        CK(cudaMemset(d_kc, 0x7e, cache_elems * sizeof(C)));
        CK(cudaMemset(d_vc, 0x7e, cache_elems * sizeof(C)));
        launch(kernel, grid_y);
        CK(cudaDeviceSynchronize());
        const size_t qb = qkv.size() * sizeof(T), cb = cache_elems * sizeof(C);
        std::vector<unsigned char> out(qb + 2 * cb);
        CK(cudaMemcpy(out.data(), d_qkv, qb, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(out.data() + qb, d_kc, cb, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(out.data() + qb + cb, d_vc, cb, cudaMemcpyDeviceToHost));
        return out;
    }
    void launch(const void* kernel, int grid_y) {
        float ks = sizeof(C) == 1 ? 0.5f : 1.0f, vs = sizeof(C) == 1 ? 0.25f : 1.0f;
        void* args[] = {&d_qkv, &d_kc, &d_vc,   &d_slots, &d_pos, &d_cos, &d_sin,
                        &qh,    &kvh,  &hd,     &stride,  &ks,    &vs};
        CK(cudaLaunchKernel(kernel, dim3(n, grid_y), dim3(256), args, 0, 0));
    }
    // The CPU's copy of the per-element arithmetic (f32 expressions, rounded once; E4M3 of the
    // value rounded to T over the scale for an FP8 cache), as the bytes run() returns.
    std::vector<unsigned char> reference() const {
        std::vector<T> q = qkv;
        std::vector<C> kc(cache_elems), vc(cache_elems);
        std::memset(kc.data(), 0x7e, cache_elems * sizeof(C));
        std::memset(vc.data(), 0x7e, cache_elems * sizeof(C));
        const int half = hd / 2;
        auto put = [&](C* dst, T v, float scale) {
            if constexpr (sizeof(C) == 1) {
                const __nv_fp8_e4m3 e(to_f(v) / scale);
                std::memcpy(dst, &e.__x, 1);
            } else {
                *dst = v;
            }
        };
        for (int t = 0; t < n; ++t) {
            T* row = q.data() + (size_t)t * stride;
            const float* c = cos.data() + (size_t)pos[t] * half;
            const float* s = sin.data() + (size_t)pos[t] * half;
            for (int h = 0; h < qh + kvh; ++h) {
                T* x = row + h * hd;
                for (int i = 0; i < half; ++i) {
                    const float a = to_f(x[i]), b = to_f(x[i + half]);
                    const T r1 = from_f<T>(a * c[i] - b * s[i]);
                    const T r2 = from_f<T>(b * c[i] + a * s[i]);
                    if (h < qh) {
                        x[i] = r1;
                        x[i + half] = r2;
                    } else if (slots[t] >= 0) {
                        C* k = kc.data() + (size_t)slots[t] * kvh * hd + (h - qh) * hd;
                        put(k + i, r1, sizeof(C) == 1 ? 0.5f : 1.0f);
                        put(k + i + half, r2, sizeof(C) == 1 ? 0.5f : 1.0f);
                    }
                }
            }
            if (slots[t] >= 0)
                for (int e = 0; e < kvh * hd; ++e)
                    put(vc.data() + (size_t)slots[t] * kvh * hd + e,
                        row[(qh + kvh) * hd + e], sizeof(C) == 1 ? 0.25f : 1.0f);
        }
        const size_t qb = q.size() * sizeof(T), cb = cache_elems * sizeof(C);
        std::vector<unsigned char> out(qb + 2 * cb);
        std::memcpy(out.data(), q.data(), qb);
        std::memcpy(out.data() + qb, kc.data(), cb);
        std::memcpy(out.data() + qb + cb, vc.data(), cb);
        return out;
    }
};

static float e4m3(unsigned char b) {
    __nv_fp8_e4m3 v;
    v.__x = b;
    return (float)v;
}

// Elements of `got` further from `ref` than one rounding step of their type: 2^-7 (bf16) or
// 2^-10 (f16) of the larger magnitude for T, 2^-3 for E4M3 (plus 2^-9 below its normal range);
// the qkv rows first, then the caches.
template <typename T, typename C>
static size_t beyond_one_step(const Step<T, C>& s, const std::vector<unsigned char>& ref,
                              const std::vector<unsigned char>& got, size_t* equal) {
    const size_t nq = s.qkv.size(), nc = s.cache_elems;
    const double t_step = sizeof(T) == 2 && std::is_same<T, bf>::value ? 0x1p-7 : 0x1p-10;
    size_t far = 0;
    *equal = 0;
    // `floor`: the step below the type's normal range (E4M3's subnormals are 2^-9 apart).
    auto compare = [&](double a, double b, double step, double floor) {
        if (a == b || (std::isnan(a) && std::isnan(b))) {
            ++*equal;
        } else if (!(std::fabs(a - b) <= step * std::max(std::fabs(a), std::fabs(b)) + floor)) {
            ++far;
        }
    };
    const T* rq = reinterpret_cast<const T*>(ref.data());
    const T* gq = reinterpret_cast<const T*>(got.data());
    for (size_t i = 0; i < nq; ++i) compare(to_f(rq[i]), to_f(gq[i]), t_step, 1e-6);
    for (int kv = 0; kv < 2; ++kv) {
        const unsigned char* r = ref.data() + nq * sizeof(T) + kv * nc * sizeof(C);
        const unsigned char* g = got.data() + nq * sizeof(T) + kv * nc * sizeof(C);
        for (size_t i = 0; i < nc; ++i) {
            if constexpr (sizeof(C) == 1) {
                compare(e4m3(r[i]), e4m3(g[i]), 0x1p-3, 0x1p-9);
            } else {
                compare(to_f(reinterpret_cast<const T*>(r)[i]),
                        to_f(reinterpret_cast<const T*>(g)[i]), t_step, 1e-6);
            }
        }
    }
    return far;
}

template <typename T, typename C>
static void check(const char* what, int qh, int kvh, int hd) {
    Step<T, C> s(97, qh, kvh, hd);
    const std::vector<unsigned char> ref = s.reference();
    const std::vector<unsigned char> got = s.run((const void*)rope_new<T, C>, 1);
    size_t equal = 0;
    const size_t far = beyond_one_step(s, ref, got, &equal);
    if (far) ++failures;
    printf("%-4s %-40s heads %d/%d of %d: %zu elements beyond one rounding step of the CPU's "
           "arithmetic (%zu identical)\n",
           far ? "FAIL" : "PASS", what, qh, kvh, hd, far, equal);
#ifdef OLD_ROPE
    const std::vector<unsigned char> old = s.run((const void*)rope_old<T, C>, 1);
    const bool same = old == got;
    if (!same) ++failures;
    printf("%-4s %-40s heads %d/%d of %d: the earlier file's outputs are the same bits\n",
           same ? "PASS" : "FAIL", what, qh, kvh, hd);
#endif
}

int main() {
    check<bf, bf>("bf16, cache bf16", 32, 8, 128);
    check<bf, tpserve::E4M3Kv>("bf16, FP8 cache", 32, 8, 128);
    check<hf, hf>("f16, cache f16", 32, 8, 128);
    check<hf, tpserve::E4M3Kv>("f16, FP8 cache", 32, 8, 128);
    check<bf, bf>("bf16, head size 64", 16, 4, 64);
    check<bf, bf>("bf16, head size 256", 8, 2, 256);
    check<bf, bf>("bf16, head size 72 (one pair an item)", 8, 2, 72);

    const double copy = copy_bandwidth_gbs(0);
    printf("\n== an 8B prompt step: 8,192 tokens, 32/8 heads of 128, copy rate %.0f GB/s\n", copy);
    Step<bf, bf> s(8192, 32, 8, 128);
    s.run((const void*)rope_new<bf, bf>, 1);
    // Bytes: queries read and written, keys read and written to the cache, values copied, and
    // the tables' rows (f32 cos and sin).
    const double bytes = 8192.0 * ((32 * 2 + 8 * 2 + 8 * 2) * 128 * 2 + 2 * 64 * 4);
    auto row = [&](const char* name, double us) {
        printf("%-36s %8.1f us  %6.0f GB/s  %.2f of copy  (x32 layers: %.2f ms)\n", name, us,
               bytes / (us * 1e3), bytes / (us * 1e3) / copy, us * 32 / 1e3);
    };
    row("8 pairs an item", time_us([&] { s.launch((const void*)rope_new<bf, bf>, 1); }));
#ifdef OLD_ROPE
    // The earlier file as the worker launched it: grid y from one pair an item.
    const int old_y = ((32 + 8) * 64 + 8 * 128 + 1023) / 1024;
    row("earlier file, one pair an item",
        time_us([&] { s.launch((const void*)rope_old<bf, bf>, old_y); }));
#endif
    printf("\n%s: %d check(s) failed\n", failures ? "FAIL" : "PASS", failures);
    return failures ? 1 : 0;
}
