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

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Programmatic dependent launch (Hopper and later). The host launches our kernels with the
// "programmatic stream serialization" attribute, so a kernel's blocks may start while the kernel
// before it on the stream is still running. A kernel must therefore neither read what earlier
// kernels write nor write what they read before wait_for_inputs() returns, which happens once
// every earlier kernel has finished and its writes are visible: every kernel calls it first,
// except for reads of what no kernel of the step writes or what finished before the kernel
// before it started (the GEMV warms its weights into L2, the LoRA kernels load their adapter
// slots, the decode attention loads earlier steps' keys and values). It then lets the next
// kernel launch at once, so that kernel's blocks are resident and waiting when this one ends,
// instead of paying a launch after it. (Letting it launch before waiting, so that a GEMV after
// a norm warms its weights during the previous GEMV's tail, was measured: 0.17 ms slower per
// 8B decode step; docs/PERFORMANCE.md, issue 9, session 6.) Without the attribute, or before sm_90, both instructions are no-ops.
__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace tpserve

// Calls M(suffix, type) once per activation dtype: the single list of dtypes every kernel
// file instantiates. The Rust side's entry-point table must list the same suffixes.
#define TPSERVE_FOR_EACH_DTYPE(M) \
    M(bf16, __nv_bfloat16)        \
    M(f16, __half)
