// Shared device helpers of tpserve's kernels: dtype conversion, warp and block reductions, the
// tensor-core building blocks (mma.sync, ldmatrix, cp.async), the programmatic-dependent-launch
// wait every kernel starts with, and the macro that instantiates each templated kernel once per
// activation dtype under an extern "C" name.
//
// Every kernel file includes this header as `#include "common.cuh"`. NVRTC gets one source string
// per file, so the Rust side (tpserve-kernels' `KernelSource::expanded`) replaces that line with
// this file's text before compiling; nvcc (scripts/check-kernels.sh) finds it through `-I`. Keep
// it to NVRTC-safe headers only: no libc or C++ standard library headers.
//
// Conventions shared by every kernel:
// - Activations and weights are bf16 (`__nv_bfloat16`) or f16 (`__half`); each kernel exists as
//   `<name>_bf16` and `<name>_f16` with the same arguments.
// - Arithmetic is done in f32; results are rounded to the storage dtype once, where the
//   Hugging Face reference rounds.
// - Tensors are row-major and contiguous unless a `*_stride` argument says otherwise (strides
//   count elements, not bytes).
// - Token ids are u32, positions i32, slot indices i64; counts and sizes are i32 (`int`).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace tpserve {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
    return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Rounds an f32 value through the storage dtype T and back, to reproduce a reference that
// materialises an intermediate tensor in T.
template <typename T> __device__ __forceinline__ float round_to(float x) {
    return to_float(from_float<T>(x));
}

// Llama's gated activation of one element as Hugging Face rounds it in T: silu(g) = g / (1 +
// exp(-g)) rounded to T, times u, rounded again (g and u already values of T). silu_mul.cu's
// kernels and int4.cu's gated GEMV share it, so that they give the same bits.
template <typename T> __device__ __forceinline__ T silu_mul_rounded(float g, float u) {
    const float activated = round_to<T>(g / (1.0f + __expf(-g)));
    return from_float<T>(activated * u);
}

// Infinities without <math.h> (NVRTC has no INFINITY).
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 16 bytes of a weight, streamed: read once per step, so kept out of L1 (where the few rows of
// activations that every warp of a GEMV re-reads stay instead).
__device__ __forceinline__ uint4 load_streaming(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Sum of `v` over the whole block, returned to every thread. Requires blockDim.x to be a multiple
// of 32 and at most 1024, and every thread of the block to call it (it synchronises).
__device__ __forceinline__ float block_reduce_sum(float v) {
    __shared__ float warp_sums[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int num_warps = blockDim.x >> 5;
    v = warp_reduce_sum(v);
    if (lane == 0) {
        warp_sums[warp] = v;
    }
    __syncthreads();
    float total = lane < num_warps ? warp_sums[lane] : 0.0f;
    total = warp_reduce_sum(total);
    // Lets a second call in the same kernel reuse warp_sums safely.
    __syncthreads();
    return total;
}

// Tensor-core building blocks (sm_80 and newer), shared by the tensor-core kernels.

// The mma instruction and the f32-pair packing for each storage dtype.
template <typename T> struct Mma;

template <> struct Mma<__nv_bfloat16> {
    // d += a * b: a 16x16 row-major fragment (4 regs), b 16x8 column-major fragment (2 regs).
    static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4],
                                               unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    // Two f32 values rounded to bf16 in one 32-bit register, `lo` in the low half (the
    // lower-indexed element of an mma fragment pair).
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return static_cast<unsigned>(__bfloat16_as_ushort(v.x)) |
               (static_cast<unsigned>(__bfloat16_as_ushort(v.y)) << 16);
    }
};

template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float (&d)[4], const unsigned (&a)[4],
                                               unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        const __half2 v = __floats2half2_rn(lo, hi);
        return static_cast<unsigned>(__half_as_ushort(v.x)) |
               (static_cast<unsigned>(__half_as_ushort(v.y)) << 16);
    }
};

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8 (16 contiguous, 16-byte aligned bytes); r_i gets matrix i's elements
// (row lane / 4, columns 2 (lane % 4) and +1).
__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2,
                                            unsigned& r3, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(row))
                 : "memory");
}

// The same, transposed: r_i gets matrix i's elements (rows 2 (lane % 4) and +1, column lane / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned& r0, unsigned& r1, unsigned& r2,
                                                  unsigned& r3, const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(smem_addr(row))
                 : "memory");
}

// 16 bytes global -> shared without a register round trip; zero-filled when !valid (then
// `src` is only a valid dummy address and nothing is read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
                 : "memory");
}

// 8 bytes global -> shared (through L1: the .cg form copies 16 bytes only).
__device__ __forceinline__ void cp_async_8(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n"
                 :
                 : "r"(smem_addr(dst)), "l"(src)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The keys [x, y) of key split `split` of `num_splits` for a tile whose last row sees `ctx`
// keys: all of them with one split; else `split_len` keys a split, or when split_len <= 0,
// ceil(ctx / num_splits) rounded up to 32, each tile splitting its own keys (the decode kernels:
// a CUDA graph is captured without knowing the contexts). Empty (x >= y) for a split past the
// tile's context.
__device__ __forceinline__ int2 split_keys(int ctx, int split, int num_splits, int split_len) {
    if (num_splits <= 1) {
        return make_int2(0, ctx);
    }
    int len = split_len;
    if (len <= 0) {
        len = (ctx + num_splits - 1) / num_splits;
        len = (len + 31) / 32 * 32;
    }
    const int begin = split * len;
    return make_int2(begin, min(ctx, begin + len));
}

// Programmatic dependent launch (Hopper and later). The host launches our kernels with the
// "programmatic stream serialization" attribute, so a kernel's blocks may start while the kernel
// before it on the stream is still running. A kernel must therefore neither read what earlier
// kernels write nor write what they read before wait_for_inputs() returns, which happens once
// every earlier kernel has finished and its writes are visible: every kernel calls it first,
// except for reads of what no kernel of the step writes or what finished before the kernel
// before it started (the GEMV warms its weights into L2, the LoRA kernels load their adapter
// slots, the narrow RMSNorms and the fused all-reduce norm their weight, the decode attention
// earlier steps' keys and values). It then lets the next kernel launch at once, so that kernel's
// blocks are resident and waiting when this one ends, instead of paying a launch after it.
// (Letting it launch before waiting, so that a GEMV after a norm warms its weights during the
// previous GEMV's tail, was measured: 0.17 ms slower per 8B decode step; docs/PERFORMANCE.md,
// issue 9, session 6. After a kernel bound by latency it pays: let_next_kernel_launch below.)
// Loads placed before it stay there only behind a branch (wait_for_inputs_after_loads below).
// Without the attribute, or before sm_90, both instructions are no-ops.
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// wait_for_inputs for kernels that load constants before it (weights, adapter slots) and must
// keep those loads there. ptxas moves griddepcontrol.wait above loads of read-only memory in the
// same basic block, the PTX order notwithstanding: built so, int4.cu's GEMV issued its first
// weight tiles after the wait, not while the kernel before ran (its sm_90a SASS: ACQBULK before
// the LDGs). A branch ends the block, and ptxas keeps the wait behind it: one on a value the
// compiler cannot know is never zero (a lane's bit in %lanemask_eq), around a trap. With the
// loads before the wait, an H100's 4-bit one-row decode step took 2.7% less time (docs/
// PERFORMANCE.md, issue 9, run 52); scripts/check-kernels.sh checks the order in the SASS.
__device__ __forceinline__ void wait_for_inputs_after_loads() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    unsigned int lane_bit;
    asm volatile("mov.u32 %0, %%lanemask_eq;" : "=r"(lane_bit));
    if (lane_bit == 0) {
        __trap();
    }
#endif
    wait_for_inputs();
}

// Lets the next kernel launch now, before this one waits for the kernel before it: called first,
// where the next kernel's early work (its weights' first loads) should overlap a kernel before
// this one that is bound by latency, not bytes (attention_combine, after the attention). Safe
// for every kernel after: each waits in wait_for_inputs for this kernel to finish, and this one
// finishes only after its own wait.
__device__ __forceinline__ void let_next_kernel_launch() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// 2^x by the SFU alone (ex2.approx.ftz), for the attention kernels' softmax (base 2): exp2f's
// extra steps (5 instructions where this is 1) keep results below 2^-126 (denormal) from flushing
// to zero, which a softmax weight that small cannot need: the row's largest weight is 1, and the
// products' f32 sums cannot see 2^-126 beside it.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// FP8 E4M3 (issue 12: FP8 weights, activations and the KV cache). Two E4M3 values (the low
// byte is the lower-indexed element) as f32; exact.
__device__ __forceinline__ float2 e4m3x2_to_float2(unsigned int bits) {
#if __CUDA_ARCH__ >= 890
    unsigned int h;
    const unsigned short pair = static_cast<unsigned short>(bits);
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(pair));
    return __half22float2(*reinterpret_cast<__half2*>(&h));
#else
    // E4M3's sign, exponent and mantissa placed in f16's fields: the same value times 2^-8 (the
    // exponent biases differ by 8, and E4M3's subnormals land on f16's), hence the 256. Exact;
    // the FP8 kernels run only where the instruction above exists, this keeps them compiling.
    unsigned int h = ((bits & 0x80u) << 8) | ((bits & 0x7fu) << 7) | ((bits & 0x8000u) << 16) |
                     ((bits & 0x7f00u) << 15);
    const float2 f = __half22float2(*reinterpret_cast<__half2*>(&h));
    return make_float2(f.x * 256.0f, f.y * 256.0f);
#endif
}

// Two f32 values as E4M3 (rounded to nearest even, saturated at +-448), `lo` in the low byte.
__device__ __forceinline__ unsigned short float2_to_e4m3x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 890
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    // FP8 runs only where the conversion instruction exists (sm_89 and newer); the worker refuses
    // `--quantization fp8` and `--kv-cache-dtype fp8` elsewhere, so this is never reached.
    __trap();
    return 0;
#endif
}

// FP8 activations (issue 12): E4M3's largest finite value, and the scale of a tensor or row
// whose largest |element| is amax (1 for all zeros), as vLLM's `scaled_fp8_quant` computes it.
// Elements are quantized as vLLM's kernels quantize them: times the scale's reciprocal
// (1 / scale rounded once), not divided by the scale, which costs a division per element.
constexpr float kE4M3Max = 448.0f;

__device__ __forceinline__ float e4m3_scale(float amax) {
    return amax > 0.0f ? amax / kE4M3Max : 1.0f;
}

// The largest |element| of one 16-byte piece of T (8 elements).
template <typename T> __device__ __forceinline__ float abs_max8(uint4 v) {
    const T* e = reinterpret_cast<const T*>(&v);
    float m = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        m = fmaxf(m, fabsf(to_float(e[j])));
    }
    return m;
}

// One 16-byte piece of T (8 elements) as E4M3(x * inv_scale), 8 bytes in element order
// (inv_scale = 1 / the scale).
template <typename T> __device__ __forceinline__ uint2 e4m3_quantize8(uint4 v, float inv_scale) {
    const T* e = reinterpret_cast<const T*>(&v);
    unsigned short q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        q[j] = float2_to_e4m3x2(to_float(e[2 * j]) * inv_scale,
                                to_float(e[2 * j + 1]) * inv_scale);
    }
    return make_uint2(q[0] | ((unsigned int)q[1] << 16), q[2] | ((unsigned int)q[3] << 16));
}

__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// The maximum of `v` over the block, returned to every thread (as block_reduce_sum: blockDim.x
// a multiple of 32, every thread calls it).
__device__ __forceinline__ float block_reduce_max(float v) {
    __shared__ float warp_max[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_reduce_max(v);
    if (lane == 0) {
        warp_max[warp] = v;
    }
    __syncthreads();
    const float total =
        warp_reduce_max(lane < (int)(blockDim.x >> 5) ? warp_max[lane] : neg_inf());
    __syncthreads();
    return total;
}

// An element of an FP8 KV cache (`--kv-cache-dtype fp8`): E4M3 bits of x / scale, with one f32
// scale per layer for keys and one for values.
struct E4M3Kv {
    unsigned char bits;
};

// How the attention kernels read and write a KV cache of element C for activations T, 8
// consecutive elements of a head vector (a "piece", 8-element aligned) at a time:
// - C = T: the cache holds the keys and values as they are (unscaled: the host passes scales
//   of 1, which the kernels then fold in exactly); a piece is 16 bytes.
// - C = E4M3Kv: the cache holds E4M3(x / scale); a piece is 8 bytes. Reading converts exactly
//   (every E4M3 value is a bf16 and an f16 value); the kernels fold the key scale into the
//   softmax scale and multiply their outputs by the value scale.
template <typename T, typename C> struct KvCache;

template <typename T> struct KvCache<T, T> {
    using Raw = uint4;
    static constexpr bool kAsyncCopy = true;  // a piece is what cp.async copies: 16 bytes
    __device__ static Raw zero() { return make_uint4(0u, 0u, 0u, 0u); }
    __device__ static Raw load(const T* p) { return *reinterpret_cast<const uint4*>(p); }
    __device__ static void store(T* p, Raw r) { *reinterpret_cast<uint4*>(p) = r; }
    // The piece as 8 elements of T.
    __device__ static uint4 to_act(Raw r) { return r; }
    // 8 elements of T as a piece (scale ignored: a T cache is unscaled).
    __device__ static Raw from_act(uint4 v, float) { return v; }
    __device__ static void to_floats(Raw r, float (&f)[8]) {
        const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            f[c] = to_float(e[c]);
        }
    }
    // One element of T into the cache.
    __device__ static void store1(T* p, T v, float) { *p = v; }
};

template <typename T> struct KvCache<T, E4M3Kv> {
    using Raw = uint2;
    static constexpr bool kAsyncCopy = false;  // converted on the way into shared memory
    __device__ static Raw zero() { return make_uint2(0u, 0u); }
    __device__ static Raw load(const E4M3Kv* p) { return *reinterpret_cast<const uint2*>(p); }
    __device__ static void store(E4M3Kv* p, Raw r) { *reinterpret_cast<uint2*>(p) = r; }
    __device__ static void to_floats(Raw r, float (&f)[8]) {
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            const unsigned int word = w == 0 ? r.x : r.y;
            const float2 lo = e4m3x2_to_float2(word & 0xffffu);
            const float2 hi = e4m3x2_to_float2(word >> 16);
            f[4 * w] = lo.x;
            f[4 * w + 1] = lo.y;
            f[4 * w + 2] = hi.x;
            f[4 * w + 3] = hi.y;
        }
    }
    __device__ static uint4 to_act(Raw r) {
        float f[8];
        to_floats(r, f);
        uint4 v;
        T* e = reinterpret_cast<T*>(&v);
#pragma unroll
        for (int c = 0; c < 8; ++c) {
            e[c] = from_float<T>(f[c]);  // exact
        }
        return v;
    }
    __device__ static Raw from_act(uint4 v, float scale) {
        const T* e = reinterpret_cast<const T*>(&v);
        unsigned int q[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            q[j] = float2_to_e4m3x2(to_float(e[2 * j]) / scale, to_float(e[2 * j + 1]) / scale);
        }
        return make_uint2(q[0] | (q[1] << 16), q[2] | (q[3] << 16));
    }
    __device__ static void store1(E4M3Kv* p, T v, float scale) {
        p->bits = static_cast<unsigned char>(float2_to_e4m3x2(to_float(v) / scale, 0.0f));
    }
};

}  // namespace tpserve

// Calls M(suffix, type) once per activation dtype: the single list of dtypes every kernel
// file instantiates. The Rust side's entry-point table must list the same suffixes.
#define TPSERVE_FOR_EACH_DTYPE(M) \
    M(bf16, __nv_bfloat16)        \
    M(f16, __half)

// Calls M(suffix, type, kv, cache) for each KV cache element of activation dtype `type`: the
// dtype itself (kv empty) and FP8 E4M3 (kv `_fp8kv`, `--kv-cache-dtype fp8`). Kernels that read
// or write the KV cache instantiate through it (entry points `<name>_bf16` and
// `<name>_fp8kv_bf16`, ...).
#define TPSERVE_FOR_EACH_KV_CACHE(M, SUFFIX, T) \
    M(SUFFIX, T, , T)                           \
    M(SUFFIX, T, _fp8kv, tpserve::E4M3Kv)
