// Issue 9's prompt-length lever, measured outside tpserve: a Hopper GEMM (TMA loads into a ring
// of stages, warpgroup products, one producer warp and two consumer warpgroups) whose epilogue
// is the MLP's SiLU-mul, against what the worker runs today: cuBLAS's gate_up product (one
// [rows, 2 I] output) and then silu_mul.cu over it. A 2,048-token Llama-3-8B prefill spends
// ~1.9 ms of its ~46 ms in SiLU-mul (it reads the 117 MB gate_up output and writes half as
// much, 32 times); with the activation in the product's epilogue that traffic is gone, if the
// product itself stays near cuBLAS's rate.
//
// The kernel: a block computes a [128, 128] tile of the activated output from a [128, 256]
// accumulator whose first 128 columns are gate rows n0..n0+127 of W and whose last 128 are the
// matching up rows I+n0..: two TMA boxes of W a stage, so W keeps the worker's [2 I, K] layout.
// Each consumer warpgroup owns 64 rows: m64n256k16 products with A and B from shared memory
// (K-major, 128-byte swizzle, as TMA writes them), 4 a 64-wide K stage. In the accumulator
// layout (element 4 j + c of a lane: row lane / 4 (+8 for c >= 2) of its warp's 16, column
// 8 j + 2 (lane % 4) + (c & 1)), gate column j and up column j + 128 sit in one thread, so the
// epilogue is register-local: both rounded to T as cuBLAS rounds its output, then
// silu_mul_rounded, as silu_mul.cu computes them. `kSwiglu = false` is the plain product (its
// 256 columns stored), for the product's own rate against cuBLAS.
//
// How (on the GPU machine, from the repository root):
//   nvcc -O3 -arch=sm_90a -std=c++17 -I kernels/cuda tests/gpu/gemm_swiglu_bench.cu \
//       -o /tmp/gsb -lcublas -lcuda
//   /tmp/gsb
// For rows 1,024 to 8,192 of Llama-3-8B's gate_up (I = 14,336, K = 4,096) it checks the plain
// products against cuBLAS (within 2 units in the last place of bf16), the first SwiGLU variant
// against cuBLAS + silu_mul.cu (within 4, or 2^-6 where |value| < 1: the products' summation
// orders differ) and the other variants bit for bit against it, and prints each one's time.
//
// Run 62 measured the first four variants (a tile a block, persistent, 2-block clusters both
// ways): the product at 83-92% of cuBLAS's rate, the clusters at half of it. The variants added
// after it (docs/PERFORMANCE.md, session 51): the clusters' release at CTA scope (run 62's
// cluster-scope arrival compiles to MEMBAR.ALL.GPU twice a stage in the consumers' loop), the
// epilogue stored by TMA, and the epilogue deferred under the next tile's first products.
#include "attention_wgmma.cu"  // its mbarrier, descriptor and wgmma helpers
#include "common.cuh"
#include "silu_mul.cu"

#include "harness.cuh"

#if !__has_include(<cublas_v2.h>) || !__has_include(<cuda.h>)
int main() {
    printf("gemm_swiglu_bench: built without cuBLAS's or the driver's headers; nothing to measure\n");
    return 2;
}
#else
#include <cublas_v2.h>
#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

namespace {

constexpr int kBM = 128;          // rows of a block tile (two consumer warpgroups of 64)
constexpr int kBN = 256;          // accumulator columns (128 gate + 128 up, or 256 plain)
constexpr int kBK = 64;           // K of a stage: 64 bf16 = one 128-byte swizzled row
constexpr int kStages = 4;
constexpr int kStageBytes = (kBM + kBN) * kBK * 2;  // 48 KiB
// A consumer warpgroup's staged output tile for the TMA store: 64 rows of 128 activated columns,
// as two 128-byte-swizzled boxes of 64 columns.
constexpr int kOutBoxBytes = 64 * 128;
constexpr int kOutStageBytes = 2 * kOutBoxBytes;
// Dynamic shared memory: the stages, both consumers' output stages when the epilogue stores by
// TMA, 1,024 bytes to align the first stage to the swizzle's atom, and the stages' barriers.
constexpr int smem_bytes(bool tma_store) {
    return kStages * kStageBytes + (tma_store ? 2 * kOutStageBytes : 0) + 1024 + 2 * 8 * kStages;
}
constexpr int kThreads = 384;     // warpgroup 0: producer; 1 and 2: consumers

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A K-major operand's descriptor: 128-byte swizzle, 1,024 bytes per 8 rows (the leading offset
// unused by this layout).
__device__ __forceinline__ unsigned long long kmajor_desc(unsigned addr) {
    return smem_desc(addr, 16, 1024);
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}
// A box of a 2-D tensor map (inner coordinate c0, outer c1) into shared memory at `dst`,
// counted on `bar`'s transaction bytes.
__device__ __forceinline__ void tma_load_2d(unsigned dst, const CUtensorMap* map, int c0, int c1,
                                            unsigned bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// The same box written into shared memory at `dst` of every block of the cluster in `mask`,
// counted on each one's barrier at `bar`.
__device__ __forceinline__ void tma_load_2d_multicast(unsigned dst, const CUtensorMap* map, int c0,
                                                      int c1, unsigned bar, unsigned short mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(map), "r"(c0), "r"(c1), "r"(bar), "h"(mask)
        : "memory");
}
// An arrival on the barrier at `bar` of the cluster's block `rank`, a release at cluster scope
// (kClusterScope: this thread's earlier writes visible to the whole cluster first) or at the
// default CTA scope, as CUTLASS's ClusterBarrier::arrive releases a stage to a peer's producer:
// a consumer's only accesses to a stage are its tensor cores' reads, which wgmma.wait_group has
// already completed, so nothing of this thread's needs to be visible to the peer's TMA writes.
template <bool kClusterScope>
__device__ __forceinline__ void mbar_arrive_cluster(unsigned bar, unsigned rank) {
    if constexpr (kClusterScope) {
        asm volatile(
            "{\n.reg .b32 remote;\n"
            "mapa.shared::cluster.u32 remote, %0, %1;\n"
            "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
            "r"(rank)
            : "memory");
    } else {
        asm volatile(
            "{\n.reg .b32 remote;\n"
            "mapa.shared::cluster.u32 remote, %0, %1;\n"
            "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
            "r"(rank)
            : "memory");
    }
}
// A box of shared memory at `src` (the tensor map's box, swizzled as the map says) stored to the
// 2-D tensor at inner coordinate c0, outer c1, as part of this thread's open bulk group.
__device__ __forceinline__ void tma_store_2d(const CUtensorMap* map, unsigned src, int c0, int c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n" ::"l"(map),
        "r"(c0), "r"(c1), "r"(src)
        : "memory");
}
__device__ __forceinline__ void bulk_commit() {
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}
// Waits until this thread's committed bulk stores have read their shared memory.
__device__ __forceinline__ void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}
// Waits until this thread's committed bulk stores are done (their writes performed).
__device__ __forceinline__ void bulk_wait_all() {
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}
// A barrier for the 128 threads of one warpgroup (named barrier `id`, 1 or more).
__device__ __forceinline__ void warpgroup_sync(int id) {
    asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

#define GSB_R8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                  "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
// d (+)= A B, m64n256k16, bf16 in, f32 out, A and B K-major in shared memory.
__device__ __forceinline__ void wgmma_n256(float (&d)[128], unsigned long long a,
                                           unsigned long long b, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "
        "%111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, "
        "%125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : GSB_R8(0), GSB_R8(8), GSB_R8(16), GSB_R8(24), GSB_R8(32), GSB_R8(40), GSB_R8(48),
          GSB_R8(56), GSB_R8(64), GSB_R8(72), GSB_R8(80), GSB_R8(88), GSB_R8(96), GSB_R8(104),
          GSB_R8(112), GSB_R8(120)
        : "l"(a), "l"(b), "r"(accumulate));
}
#undef GSB_R8

// Waits until at most the last committed group of products is in flight.
__device__ __forceinline__ void wgmma_wait_but_one() {
    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// out = silu(x W_gate^T) * (x W_up^T) (kSwiglu), or out = x W^T (plain), for x [rows, k] and
// W [2 i, k] (both row-major bf16, by their tensor maps: boxes of 64 x 128), out [rows, i]
// (kSwiglu) or [rows, 2 i]. Output tiles of 128 rows by 128 activated (or 256 plain) columns,
// numbered with the row tile fastest (blocks running together share W's tile; x stays in L2);
// cluster c (of kCluster blocks, 1 or 2) takes tile groups c, c + clusters, ...: a group is
// kCluster row tiles next to each other with the same W tile, one a block, whose W boxes each
// block loads one of and multicasts to both (half the W traffic from L2). One group a cluster
// when the grid covers them; persistent when the grid is the SM count (the producer then loads
// the next tile's first stages during the consumers' epilogue). A consumer releases a stage to
// a peer block's producer with an arrival released at cluster scope (kClusterScope, run 62's
// kernel) or at CTA scope (CUTLASS's). kTmaStore (kSwiglu only): each consumer warpgroup writes
// its 64 x 128 activated tile into its output stage in shared memory (128-byte swizzle, two
// boxes of 64 columns, conflict-free from the accumulator layout) and one thread stores it with
// two TMA stores (out_map: boxes of 64 x 64), which run while the warpgroup goes on to its next
// tile; the stage is reused once those stores have read it. Otherwise each thread stores its
// 4-byte pairs. kDeferred (kSwiglu, persistent): the epilogue's arithmetic (~2,000 instructions
// a thread, the exact division of silu_mul_rounded above all), during which the tensor cores
// idle, moves under the next tile's first products: after its products the warpgroup keeps only
// its gate and up values rounded to bf16, in pairs (64 registers), which frees the accumulator,
// and activates and stores a quarter of them after issuing each of the next tile's first four
// stages; the last tile's after the loop. The same values, so the same bits. 384 threads;
// smem_bytes(kTmaStore) of dynamic shared memory. rows % (128 kCluster) == 0, k % 256 == 0.
template <bool kSwiglu, int kCluster, bool kClusterScope = true, bool kTmaStore = false,
          bool kDeferred = false>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_swiglu(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                const __grid_constant__ CUtensorMap out_map, __nv_bfloat16* __restrict__ out,
                int rows, int i_size, int k) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(kSwiglu || !kTmaStore, "the TMA-store epilogue is the SwiGLU one's");
    static_assert(kSwiglu || !kDeferred, "the deferred epilogue is the SwiGLU one's");
    static_assert(!(kTmaStore && kDeferred), "the deferred epilogue stores from registers");
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned raw = (unsigned)__cvta_generic_to_shared(smem_raw);
    const unsigned base = (raw + 1023) & ~1023u;
    const unsigned out_stages = base + kStages * kStageBytes;
    // full[s] at 8 s, empty[s] after
    const unsigned bars = out_stages + (kTmaStore ? 2 * kOutStageBytes : 0);
    const int wg = threadIdx.x / 128;
    const int k_tiles = k / kBK;
    const int groups_m = rows / kBM / kCluster;
    const int tn = kSwiglu ? 128 : kBN;  // output columns of a tile
    const int groups = groups_m * (kSwiglu ? i_size : 2 * i_size) / tn;
    const int rank = kCluster > 1 ? (int)cluster_rank() : 0;
    const int cluster = blockIdx.x / kCluster, clusters = gridDim.x / kCluster;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbarrier_init(bars + 8 * s, 1);
            mbarrier_init(bars + 8 * (kStages + s), 2 * kCluster);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    if constexpr (kCluster > 1) {
        cluster_sync();
    } else {
        __syncthreads();
    }
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x == 0) {
            int u = 0;  // stage uses so far, over every tile of this block
            for (int g = cluster; g < groups; g += clusters) {
                const int m0 = ((g % groups_m) * kCluster + rank) * kBM, n0 = (g / groups_m) * tn;
                for (int t = 0; t < k_tiles; ++t, ++u) {
                    const int s = u % kStages;
                    if (u >= kStages) {
                        mbarrier_wait(bars + 8 * (kStages + s), ((u / kStages) - 1) & 1);
                    }
                    const unsigned full = bars + 8 * s;
                    const unsigned a = base + s * kStageBytes;
                    const unsigned b = a + kBM * kBK * 2;
                    const int second = kSwiglu ? i_size + n0 : n0 + 128;
                    mbar_expect_tx(full, kStageBytes);
                    tma_load_2d(a, &x_map, t * kBK, m0, full);
                    if constexpr (kCluster > 1) {
                        tma_load_2d_multicast(b + rank * 128 * kBK * 2, &w_map, t * kBK,
                                              rank == 0 ? n0 : second, full, 0x3);
                    } else {
                        tma_load_2d(b, &w_map, t * kBK, n0, full);
                        tma_load_2d(b + 128 * kBK * 2, &w_map, t * kBK, second, full);
                    }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int c = wg - 1;  // this consumer's 64 rows of a tile
        const int lane = threadIdx.x % 32, warp = (threadIdx.x % 128) / 32;
        const bool leader = threadIdx.x % 128 == 0;
        // This warpgroup is done reading stage s: on every block of the cluster, whose
        // producers all write into it.
        auto release = [&](int s) {
            if (!leader) return;
            const unsigned empty = bars + 8 * (kStages + s);
            if constexpr (kCluster > 1) {
                mbar_arrive_cluster<kClusterScope>(empty, 0);
                mbar_arrive_cluster<kClusterScope>(empty, 1);
            } else {
                mbarrier_arrive(empty);
            }
        };
        const unsigned out_stage = out_stages + c * kOutStageBytes;
        // kDeferred: the tile before's gate (low half) and up (high half) values rounded to
        // bf16, pair 4 j + 2 h + e for accumulator columns 8 j + col + e (j < 16) and their up
        // columns, rows + 8 h; and where that tile's rows and columns start (pending_m < 0: none).
        unsigned packed[kDeferred ? 64 : 1];
        int pending_m = -1, pending_n = 0;
        // Activates and stores quarter P (j = 4 P .. 4 P + 3) of the pending tile.
        auto store_quarter = [&](auto quarter) {
            constexpr int p = decltype(quarter)::value;
            const int row = pending_m + c * 64 + warp * 16 + lane / 4;
            const int col = 2 * (lane % 4);
#pragma unroll
            for (int j = 4 * p; j < 4 * p + 4; ++j) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const unsigned lo = packed[4 * j + 2 * h], hi = packed[4 * j + 2 * h + 1];
                    __nv_bfloat162 v;
                    v.x = tpserve::silu_mul_rounded<__nv_bfloat16>(__uint_as_float(lo << 16),
                                                                   __uint_as_float(lo & 0xffff0000u));
                    v.y = tpserve::silu_mul_rounded<__nv_bfloat16>(__uint_as_float(hi << 16),
                                                                   __uint_as_float(hi & 0xffff0000u));
                    *reinterpret_cast<__nv_bfloat162*>(
                        out + (size_t)(row + 8 * h) * i_size + pending_n + 8 * j + col) = v;
                }
            }
        };
        using Q0 = std::integral_constant<int, 0>;
        using Q1 = std::integral_constant<int, 1>;
        using Q2 = std::integral_constant<int, 2>;
        using Q3 = std::integral_constant<int, 3>;
        int u = 0;
        for (int g = cluster; g < groups; g += clusters) {
            const int m0 = ((g % groups_m) * kCluster + rank) * kBM, n0 = (g / groups_m) * tn;
            float d[128];
            for (int t = 0; t < k_tiles; ++t, ++u) {
                const int s = u % kStages;
                mbarrier_wait(bars + 8 * s, (u / kStages) & 1);
                const unsigned a = base + s * kStageBytes + c * 64 * 128;
                const unsigned b = base + s * kStageBytes + kBM * kBK * 2;
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < kBK / 16; ++kk) {
                    wgmma_n256(d, kmajor_desc(a + 32 * kk), kmajor_desc(b + 32 * kk), t > 0 || kk > 0);
                }
                wgmma_commit();
                if constexpr (kDeferred) {
                    // The tile before's epilogue, a quarter under each of this one's first four
                    // stages of products.
                    if (t < 4 && pending_m >= 0) {
                        switch (t) {
                            case 0: store_quarter(Q0{}); break;
                            case 1: store_quarter(Q1{}); break;
                            case 2: store_quarter(Q2{}); break;
                            default: store_quarter(Q3{}); pending_m = -1; break;
                        }
                    }
                }
                // The previous stage's products are done once at most this one is in flight.
                wgmma_wait_but_one();
                if (t > 0) release((u - 1) % kStages);
            }
            wgmma_wait_all();
            release((u - 1) % kStages);
            hold_registers(d);
            const int row = m0 + c * 64 + warp * 16 + lane / 4;
            const int col = 2 * (lane % 4);
            if constexpr (kDeferred) {
                // Rounded as the epilogue below rounds them; the accumulator is then free for
                // the next tile's products (its first wgmma_fence orders these reads before them).
#pragma unroll
                for (int q = 0; q < 64; ++q) {
                    const int j = q / 4, e = q % 4;  // e: 2 h + (0 or 1)
                    const __nv_bfloat16 gate = __float2bfloat16_rn(d[4 * j + e]);
                    const __nv_bfloat16 up = __float2bfloat16_rn(d[4 * (j + 16) + e]);
                    packed[q] = (unsigned)__bfloat16_as_ushort(gate) |
                                ((unsigned)__bfloat16_as_ushort(up) << 16);
                }
                pending_m = m0;
                pending_n = n0;
            } else if constexpr (kSwiglu) {
                // Gate column 8 j + col (+1) and up column 8 (j + 16) + col (+1) of the
                // accumulator, activated, as output column n0 + 8 j + col (+1).
                auto activated = [&](int j, int h) {
                    __nv_bfloat162 v;
                    v.x = tpserve::silu_mul_rounded<__nv_bfloat16>(
                        tpserve::round_to<__nv_bfloat16>(d[4 * j + 2 * h]),
                        tpserve::round_to<__nv_bfloat16>(d[4 * (j + 16) + 2 * h]));
                    v.y = tpserve::silu_mul_rounded<__nv_bfloat16>(
                        tpserve::round_to<__nv_bfloat16>(d[4 * j + 2 * h + 1]),
                        tpserve::round_to<__nv_bfloat16>(d[4 * (j + 16) + 2 * h + 1]));
                    return v;
                };
                if constexpr (kTmaStore) {
                    // The output stage is free once this warpgroup's stores of the tile before
                    // have read it.
                    if (leader) bulk_wait_read();
                    warpgroup_sync(1 + c);
#pragma unroll
                    for (int j = 0; j < 16; ++j) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            // Row r of the warpgroup's 64, 16-byte chunk j % 8 of box j / 8,
                            // swizzled by the row within its 8-row atom.
                            const int r = warp * 16 + lane / 4 + 8 * h;
                            const unsigned at = out_stage + (j / 8) * kOutBoxBytes + r * 128 +
                                                (((j % 8) ^ (r % 8)) << 4) + 4 * (lane % 4);
                            const __nv_bfloat162 v = activated(j, h);
                            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at),
                                         "r"(*reinterpret_cast<const unsigned*>(&v))
                                         : "memory");
                        }
                    }
                    // The writes, seen by the TMA unit's reads (the async proxy).
                    fence_async_proxy();
                    warpgroup_sync(1 + c);
                    if (leader) {
                        tma_store_2d(&out_map, out_stage, n0, m0 + c * 64);
                        tma_store_2d(&out_map, out_stage + kOutBoxBytes, n0 + 64, m0 + c * 64);
                        bulk_commit();
                    }
                } else {
#pragma unroll
                    for (int j = 0; j < 16; ++j) {
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            *reinterpret_cast<__nv_bfloat162*>(
                                out + (size_t)(row + 8 * h) * i_size + n0 + 8 * j + col) =
                                activated(j, h);
                        }
                    }
                }
            } else {
                const size_t width = 2 * (size_t)i_size;
#pragma unroll
                for (int j = 0; j < 32; ++j) {
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        *reinterpret_cast<__nv_bfloat162*>(out + (size_t)(row + 8 * h) * width +
                                                           n0 + 8 * j + col) =
                            __floats2bfloat162_rn(d[4 * j + 2 * h], d[4 * j + 2 * h + 1]);
                    }
                }
            }
        }
        if constexpr (kDeferred) {
            if (pending_m >= 0) {
                store_quarter(Q0{});
                store_quarter(Q1{});
                store_quarter(Q2{});
                store_quarter(Q3{});
            }
        }
        // The last tile's stores done before the block's shared memory goes.
        if (kTmaStore && leader) bulk_wait_all();
    }
    // No block of a cluster leaves while another may still arrive on its barriers.
    if constexpr (kCluster > 1) cluster_sync();
#endif
}

// The launch configuration of gemm_swiglu on `grid` blocks in clusters of `cluster` (grid a
// multiple of it) with `smem` bytes of dynamic shared memory, with the attribute it points to.
struct ClusterLaunch {
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t config;
    ClusterLaunch(int grid, int cluster, int smem) : attr{}, config{} {
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = cluster;
        attr.val.clusterDim.y = 1;
        attr.val.clusterDim.z = 1;
        config.gridDim = dim3(grid);
        config.blockDim = dim3(kThreads);
        config.dynamicSmemBytes = smem;
        config.attrs = &attr;
        config.numAttrs = 1;
    }
    ClusterLaunch(const ClusterLaunch&) = delete;
};

// gemm_swiglu<kSwiglu, kCluster, kClusterScope, kTmaStore, kDeferred>, allowed its shared
// memory.
template <bool kSwiglu, int kCluster, bool kClusterScope = true, bool kTmaStore = false,
          bool kDeferred = false>
struct Kernel {
    static constexpr auto fn = gemm_swiglu<kSwiglu, kCluster, kClusterScope, kTmaStore, kDeferred>;
    static constexpr int smem = smem_bytes(kTmaStore);
    static void allow() {
        CK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    }
    // Launches it on `grid` blocks (a multiple of kCluster).
    static void launch(int grid, const CUtensorMap& x_map, const CUtensorMap& w_map,
                       const CUtensorMap& out_map, __nv_bfloat16* out, int rows, int i_size,
                       int k) {
        const ClusterLaunch l(grid, kCluster, smem);
        CK(cudaLaunchKernelEx(&l.config, fn, x_map, w_map, out_map, out, rows, i_size, k));
    }
};

#define CU(x)                                                           \
    do {                                                                \
        CUresult r_ = (x);                                              \
        if (r_ != CUDA_SUCCESS) {                                       \
            printf("driver error %d at line %d: %s\n", (int)r_, __LINE__, #x); \
            exit(1);                                                    \
        }                                                               \
    } while (0)

// A row-major [rows, cols] bf16 matrix's tensor map with boxes of 64 columns by `box_rows`
// rows (128 for the operands, 64 for the TMA-stored output), 128-byte swizzle.
CUtensorMap tensor_map(const void* p, int rows, int cols, unsigned box_rows = 128) {
    CUtensorMap map;
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)cols * 2};
    cuuint32_t box[2] = {64, box_rows};
    cuuint32_t elem[2] = {1, 1};
    CU(cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(p),
                              dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
    return map;
}

// units in the last place of bf16 between a and b (their bit patterns as ordered integers)
int ulps(__nv_bfloat16 a, __nv_bfloat16 b) {
    auto key = [](__nv_bfloat16 v) {
        unsigned short u;
        memcpy(&u, &v, 2);
        return (u & 0x8000) ? -(int)(u & 0x7fff) : (int)u;
    };
    return abs(key(a) - key(b));
}

}  // namespace

int main() {
    const int I = 14336, K = 4096, max_rows = 8192;
    cublasHandle_t blas;
    CB(cublasCreate(&blas));
    void* ws;
    CK(cudaMalloc(&ws, 32u << 20));
    CB(cublasSetWorkspace(blas, ws, 32u << 20));
    __nv_bfloat16 *x, *w, *gu, *ref, *out;
    CK(cudaMalloc(&x, (size_t)max_rows * K * 2));
    CK(cudaMalloc(&w, (size_t)2 * I * K * 2));
    CK(cudaMalloc(&gu, (size_t)max_rows * 2 * I * 2));
    CK(cudaMalloc(&ref, (size_t)max_rows * 2 * I * 2));
    CK(cudaMalloc(&out, (size_t)max_rows * 2 * I * 2));
    fill_uniform<<<1024, 256>>>(x, (size_t)max_rows * K, 1);
    fill_uniform<<<1024, 256>>>(w, (size_t)2 * I * K, 2);
    CK(cudaDeviceSynchronize());
    // The kernels measured: SwiGLU a tile a block, persistent, and persistent with the TMA-store
    // or the deferred epilogue; in 2-block clusters sharing W with the release at cluster scope
    // (run 62's) and at CTA scope, a tile a block and persistent with each epilogue; the plain
    // product alone and in clusters.
    using Fused = Kernel<true, 1>;
    using FusedTma = Kernel<true, 1, true, true>;
    using FusedDeferred = Kernel<true, 1, true, false, true>;
    using PairWide = Kernel<true, 2, true>;
    using Pair = Kernel<true, 2, false>;
    using PairTma = Kernel<true, 2, false, true>;
    using PairDeferred = Kernel<true, 2, false, false, true>;
    using Plain = Kernel<false, 1>;
    using PlainPair = Kernel<false, 2, false>;
    Fused::allow();
    FusedTma::allow();
    FusedDeferred::allow();
    PairDeferred::allow();
    PairWide::allow();
    Pair::allow();
    PairTma::allow();
    Plain::allow();
    PlainPair::allow();
    const CUtensorMap w_map = tensor_map(w, 2 * I, K);
    const CUtensorMap out_map = tensor_map(out, max_rows, I, 64);
    const float one = 1.0f, zero = 0.0f;
    // cuBLAS as blas.rs calls it: y[n, m] = x[n, k] W[m, k]^T (column-major: W^T x).
    auto cublas_gate_up = [&](int rows, __nv_bfloat16* y) {
        CB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, 2 * I, rows, K, &one, w, CUDA_R_16BF, K, x,
                        CUDA_R_16BF, K, &zero, y, CUDA_R_16BF, 2 * I, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT));
    };
    auto silu = [&](int rows, __nv_bfloat16* o) {
        silu_mul_bf16<<<dim3(rows, 7), 256>>>(o, gu, I);
    };
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    // How many 2-block clusters of the kernel fit on the GPU at once (its persistent grid), with
    // and without the output stages.
    int pairs = 0, pairs_tma = 0;
    const ClusterLaunch pair_launch(2 * sms, 2, Pair::smem);
    CK(cudaOccupancyMaxActiveClusters(&pairs, Pair::fn, &pair_launch.config));
    const ClusterLaunch pair_tma_launch(2 * sms, 2, PairTma::smem);
    CK(cudaOccupancyMaxActiveClusters(&pairs_tma, PairTma::fn, &pair_tma_launch.config));
    printf("%d SMs; %d clusters of 2 blocks at once (%d with the output stages)\n", sms, pairs,
           pairs_tma);
    bool ok = true;
    for (int rows : {1024, 2048, 4096, 8192}) {
        const CUtensorMap x_map = tensor_map(x, rows, K);
        const int plain_tiles = rows / kBM * (2 * I / kBN), fused_tiles = rows / kBM * (I / 128);
        struct Variant {
            const char* name;
            std::function<void()> run;
        };
        const int persistent = std::min(fused_tiles, sms);
        const int pair_grid = std::min(fused_tiles, 2 * pairs);
        const int pair_tma_grid = std::min(fused_tiles, 2 * pairs_tma);
        const std::vector<Variant> fused = {
            {"SwiGLU, a tile a block",
             [&] { Fused::launch(fused_tiles, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, persistent",
             [&] { Fused::launch(persistent, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, persistent, TMA-store epilogue",
             [&] { FusedTma::launch(persistent, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, persistent, deferred epilogue",
             [&] { FusedDeferred::launch(persistent, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, 2-block clusters, cluster-scope release (run 62), a tile a block",
             [&] { PairWide::launch(fused_tiles, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, 2-block clusters, CTA-scope release, a tile a block",
             [&] { Pair::launch(fused_tiles, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, 2-block clusters, CTA-scope release, persistent",
             [&] { Pair::launch(pair_grid, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, 2-block clusters, CTA-scope release, persistent, TMA-store epilogue",
             [&] { PairTma::launch(pair_tma_grid, x_map, w_map, out_map, out, rows, I, K); }},
            {"SwiGLU, 2-block clusters, CTA-scope release, persistent, deferred epilogue",
             [&] { PairDeferred::launch(pair_grid, x_map, w_map, out_map, out, rows, I, K); }},
        };
        auto plain = [&] { Plain::launch(plain_tiles, x_map, w_map, out_map, out, rows, I, K); };
        auto plain_pair = [&] {
            PlainPair::launch(std::min(plain_tiles, 2 * pairs), x_map, w_map, out_map, out, rows,
                              I, K);
        };
        const size_t n_plain = (size_t)rows * 2 * I, n_fused = (size_t)rows * I;
        const double flop = 2.0 * rows * 2.0 * I * K;
        // cuBLAS and cuBLAS + silu_mul.cu: the references and the times to beat.
        cublas_gate_up(rows, gu);
        silu(rows, ref);
        CK(cudaDeviceSynchronize());
        std::vector<__nv_bfloat16> h_gu(n_plain), h_ref(n_fused), h_out(n_plain), h_first;
        CK(cudaMemcpy(h_gu.data(), gu, n_plain * 2, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(h_ref.data(), ref, n_fused * 2, cudaMemcpyDeviceToHost));
        const double t_cublas = time_us([&] { cublas_gate_up(rows, gu); });
        const double t_both = time_us([&] {
            cublas_gate_up(rows, gu);
            silu(rows, ref);
        });
        printf("rows %d: cuBLAS gate_up %.1f us (%.0f TFLOP/s); + silu_mul.cu %.1f us\n", rows,
               t_cublas, flop / t_cublas / 1e6, t_both);
        fflush(stdout);
        // The plain products against cuBLAS's, within 2 units in the last place.
        for (const Variant& p : {Variant{"plain product, a tile a block", plain},
                                 Variant{"plain product, 2-block clusters, CTA-scope release, "
                                         "persistent",
                                         plain_pair}}) {
            CK(cudaMemset(out, 0, n_plain * 2));
            p.run();
            CK(cudaDeviceSynchronize());
            CK(cudaMemcpy(h_out.data(), out, n_plain * 2, cudaMemcpyDeviceToHost));
            int worst = 0;
            for (size_t i = 0; i < n_plain; i += 7) {
                worst = std::max(worst, ulps(h_gu[i], h_out[i]));
            }
            const double t_plain = time_us(p.run);
            ok = ok && worst <= 2;
            printf("  ours, %s: %d ulp from cuBLAS %s; %.1f us (%.0f TFLOP/s)\n", p.name, worst,
                   worst <= 2 ? "PASS" : "FAIL", t_plain, flop / t_plain / 1e6);
            fflush(stdout);
        }
        // Each SwiGLU variant: the first against cuBLAS + silu_mul.cu (within 4 units in the
        // last place, or 2^-6 where |value| < 1); the others bit-identical to the first (the same
        // products in the same order).
        for (size_t v = 0; v < fused.size(); ++v) {
            CK(cudaMemset(out, 0, n_fused * 2));
            fused[v].run();
            CK(cudaDeviceSynchronize());
            CK(cudaMemcpy(h_out.data(), out, n_fused * 2, cudaMemcpyDeviceToHost));
            bool pass;
            char what[64];
            if (v == 0) {
                int worst_f = 0;
                for (size_t i = 0; i < n_fused; i += 7) {
                    const float r = __bfloat162float(h_ref[i]), o = __bfloat162float(h_out[i]);
                    if (fabsf(r) < 1.0f) {
                        if (fabsf(r - o) > 2.0f * 0.0078125f) worst_f = std::max(worst_f, 99);
                    } else {
                        worst_f = std::max(worst_f, ulps(h_ref[i], h_out[i]));
                    }
                }
                pass = worst_f <= 4;
                snprintf(what, sizeof what, "%d ulp from cuBLAS + silu_mul", worst_f);
                h_first.assign(h_out.begin(), h_out.begin() + n_fused);
            } else {
                pass = memcmp(h_first.data(), h_out.data(), n_fused * 2) == 0;
                snprintf(what, sizeof what, "%s", pass ? "bit-identical" : "DIFFERENT");
            }
            const double t = time_us(fused[v].run);
            ok = ok && pass;
            printf("  ours, %s: %s %s; %.1f us (%.0f TFLOP/s), %.3fx cuBLAS + silu_mul\n",
                   fused[v].name, what, pass ? "PASS" : "FAIL", t, flop / t / 1e6, t_both / t);
            fflush(stdout);
        }
    }
    printf("%s\n", ok ? "PASS" : "FAIL");
    return ok ? 0 : 1;
}
#endif
