// Paged attention for prefill on Hopper's warpgroup tensor cores: paged_attention_mma's
// computation, tiles and argument list (attention_mma.cu), with Q K^T and P V done by wgmma
// (sm_90a) instead of mma.sync. A warpgroup (4 warps) owns 64 (row, head) items; S = Q K^T is
// one m64nKEYSk16 product per 16 head dimensions with Q and K read by the tensor cores straight
// from shared memory, and O += P V one m64n128k16 product per 16 keys with P in registers (the
// S accumulators, rounded to T, are exactly wgmma's A register fragments) and V from shared
// memory, transposed by the instruction. The tensor cores read shared memory through 128-byte
// swizzled tiles, which no ldmatrix and no register copy of K or V touch, and K and V of the next
// tile load (cp.async) while the current one computes, in a ring of stages whose barriers
// (mbarrier) let each warpgroup go on as soon as its own next tile has landed.
//
// Shared memory holds every tile as two panels of 64 head dimensions (128 bytes a row); in each
// panel the 16-byte chunk c of row r sits at r * 128 + ((c ^ (r % 8)) * 16), the layout wgmma's
// 128-byte swizzle reads (8-row atoms of 1,024 bytes, 1,024-byte aligned). The matrix
// descriptors: Q and K (K-major: a row's dimensions contiguous) step 1,024 bytes per 8 rows and
// 32 bytes per 16 dimensions inside a panel; V (MN-major for the P V product: a key's dimensions,
// the N of the product, contiguous) steps 1,024 bytes per 8 keys and a panel (KEYS * 128 bytes)
// per 64 dimensions.
//
// Head size 128, a cache in T or in FP8 (the `_fp8kv` entry points: E4M3 tiles converted to T
// in shared memory, below). Built for every architecture so that the kernel table is the same
// everywhere; the body exists only for sm_90a (NVRTC's `--gpu-architecture=sm_90a`, which the
// worker uses on compute capability 9.0), elsewhere it traps and the worker never launches it.
#include "common.cuh"

namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// log2(e): the softmax runs in base 2 (tpserve::fast_exp2), with scale * log2(e) applied to S in
// f32.
constexpr float kWgmmaLog2e = 1.4426950408889634f;

// The wgmma products: ss_nN (A and B from shared memory, both K-major; D (+)= A B for
// accumulate != 0), rs_n128_tb (A from registers, B MN-major (transposed); D (+)= A B). D is
// the m64nN f32 accumulator fragment: element 4 j + c of warp w's lane is row 16 w + lane / 4
// (+ 8 for c >= 2), column 8 j + 2 (lane % 4) + (c & 1), the mma.sync C layout of n-tile j.
template <typename T> struct Wgmma;
// One specialisation per dtype T, whose PTX type name is TY.
#define TPSERVE_WGMMA_PRODUCTS(T, TY)                                                           \
template <> struct Wgmma<T> {                                                                   \
    static __device__ __forceinline__ void ss_n64(float (&d)[32], unsigned long long a,         \
                                                  unsigned long long b, int accumulate) {       \
        asm volatile(                                                                           \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                        \
            "wgmma.mma_async.sync.aligned.m64n64k16.f32." #TY "." #TY " "                       \
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
            "%32, %33, p, 1, 1, 0, 0;\n}\n"                                                     \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),           \
              "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),         \
              "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),     \
              "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),     \
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),     \
              "+f"(d[30]), "+f"(d[31])                                                          \
            : "l"(a), "l"(b), "r"(accumulate));                                                 \
    }                                                                                           \
    static __device__ __forceinline__ void ss_n128(float (&d)[64], unsigned long long a,        \
                                                  unsigned long long b, int accumulate) {       \
        asm volatile(                                                                           \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                        \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TY "." #TY " "                      \
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
            "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                     \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),           \
              "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),         \
              "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),     \
              "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),     \
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),     \
              "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),     \
              "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),     \
              "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),     \
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),     \
              "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),     \
              "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                \
            : "l"(a), "l"(b), "r"(accumulate));                                                 \
    }                                                                                           \
    static __device__ __forceinline__ void rs_n128_tb(float (&d)[64], const unsigned (&a)[4],   \
                                                      unsigned long long b, int accumulate) {   \
        asm volatile(                                                                           \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                        \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." #TY "." #TY " "                      \
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "           \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
            "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                       \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),           \
              "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),         \
              "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]),     \
              "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),     \
              "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]),     \
              "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]),     \
              "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),     \
              "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),     \
              "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]),     \
              "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]),     \
              "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])                                \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));             \
    }                                                                                           \
};
TPSERVE_WGMMA_PRODUCTS(__nv_bfloat16, bf16)
TPSERVE_WGMMA_PRODUCTS(__half, f16)
#undef TPSERVE_WGMMA_PRODUCTS

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// After wgmma_wait_all: keeps the compiler from reading an accumulator, or reusing an A
// fragment's registers, before the asynchronous products are done.
template <int N> __device__ __forceinline__ void hold_registers(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
        asm volatile("" : "+f"(d[i])::"memory");
    }
}
template <int N> __device__ __forceinline__ void hold_registers(unsigned (&a)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            asm volatile("" : "+r"(a[i][j])::"memory");
        }
    }
}
// Shared-memory writes made by cp.async copies (the generic proxy), seen by this thread through a
// stage's full barrier, become visible to its tensor cores' reads (the async proxy).
__device__ __forceinline__ void fence_async_proxy() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// A wgmma shared-memory matrix descriptor with the 128-byte swizzle: start address, leading and
// stride byte offsets (each stored >> 4).
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr, unsigned leading,
                                                        unsigned stride) {
    return (unsigned long long)((addr & 0x3ffffu) >> 4) |
           ((unsigned long long)((leading & 0x3ffffu) >> 4) << 16) |
           ((unsigned long long)((stride & 0x3ffffu) >> 4) << 32) | (1ull << 62);
}

// The descriptor of `desc`'s matrix moved `bytes` on in shared memory (a multiple of 16): only
// the start address field changes, which stays below 2^18 bytes.
__device__ __forceinline__ unsigned long long desc_plus(unsigned long long desc, unsigned bytes) {
    return desc + (bytes >> 4);
}

// Byte offset of 16-byte chunk c (8 elements of T; 0 <= c < 16 at head size 128) of row r in a
// tile of `rows` rows: panel c / 8, swizzled chunk within the row's 128 bytes.
__device__ __forceinline__ constexpr int swizzled_offset(int r, int c, int rows) {
    return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

// The stages' barriers (mbarrier objects in shared memory, 8 bytes each). A stage's "full"
// barrier completes a phase when every thread's copies into it have landed (each thread's
// cp.async.mbarrier.arrive.noinc counts once, when its earlier copies are done); its "empty"
// barrier when every thread has finished the products that read it (a plain arrival each).
__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_on_copies(unsigned bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\n"
        "wait_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra wait_%=;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace

// Dynamic shared memory of one block: Q of its 64 WG items, STAGES K and STAGES V tiles of KEYS
// keys (head size 128), 1,024 bytes to align the first tile to the swizzle's atom, and each
// stage's two barriers; for an FP8 cache (C = E4M3Kv), then two tiles' worth of each thread's
// E4M3 pieces as copied, before they are converted into a stage.
template <typename T, int WG, int KEYS, int STAGES, typename C = T>
__host__ __device__ constexpr int paged_attention_wgmma_smem_bytes() {
    return (64 * WG + 2 * STAGES * KEYS) * 128 * (int)sizeof(T) + 1024 + 16 * STAGES +
           (sizeof(C) == 1 ? 2 * 128 * WG * ((KEYS + 8 * WG - 1) / (8 * WG)) * 16 : 0);
}

// paged_attention_wgmma_hd128_{bf16,f16}: out[r, h] = softmax_j(scale * q[r, h] . K[j, g]) V[j,
// g] over keys j <= position(r), exactly paged_attention_mma's definition, tiles (rows * group
// <= 64 WG items, item i = (row row0 + i / group, head kv_head * group + i % group)), causal mask
// and rounding (P rounded to T for P V, O divided by the softmax sum and rounded once). Warpgroup
// g owns items [64 g, 64 g + 64); key tiles past its last position are skipped, and only tiles
// reaching past its first position are masked.
//
// Arguments: paged_attention_mma's (attention_mma.cu), with a cache of C: T, or E4M3 bytes
// (k_scale and v_scale are applied as there; 1 for a cache in T).
// An FP8 cache cannot go into the tensor cores' tiles by cp.async: each thread copies its E4M3
// pieces of a tile into its own slots of a staging area two tiles ahead, and converts them into
// the tile's stage (exactly: every E4M3 value is a T value) one tile ahead, then arrives on the
// stage's full barrier itself. So an FP8 cache gives the bits of a cache in T holding the same
// values.
// Launch: grid (num_kv_heads, num_tiles, 1); block (128 * WG, 1, 1); dynamic shared memory
// paged_attention_wgmma_smem_bytes<T, WG, KEYS, STAGES, C>() (the host raises the kernel's
// limit). Needs sm_90a.
template <typename T, int WG, int KEYS, int STAGES, typename C>
__device__ __forceinline__ void paged_attention_wgmma_impl(
    T* __restrict__ out, const T* __restrict__ q, const C* __restrict__ key_cache,
    const C* __restrict__ value_cache, const int* __restrict__ block_tables,
    const int* __restrict__ tiles, int num_q_heads, int num_kv_heads, int block_size,
    int max_blocks_per_seq, int q_stride, float scale, float k_scale, float v_scale) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int HD = 128;
    static_assert(KEYS == 64 || KEYS == 128, "S is one m64n64 or m64n128 accumulator");
    constexpr int kThreads = 128 * WG;
    constexpr int kItems = 64 * WG;
    constexpr int kChunks = HD / 8;  // 16-byte chunks per row
    constexpr int kQBytes = kItems * HD * (int)sizeof(T);
    constexpr int kTileBytes = KEYS * HD * (int)sizeof(T);
    constexpr int kSTiles = KEYS / 8;  // n-tiles of 8 keys in S
    constexpr int kOTiles = HD / 8;    // n-tiles of 8 dimensions in O
    static_assert(kThreads % kChunks == 0, "a thread copies one chunk column");
    constexpr int kKeyStride = kThreads / kChunks;  // between a thread's keys in a tile
    constexpr int kPieces = (KEYS + kKeyStride - 1) / kKeyStride;  // keys a thread copies, at most
    constexpr bool kFp8 = sizeof(C) == 1;
    static_assert(!kFp8 || STAGES >= 3, "an FP8 tile is converted one tile ahead of its use");

    tpserve::wait_for_inputs();
    scale *= k_scale;

    extern __shared__ unsigned char wgmma_smem[];
    const unsigned raw = tpserve::smem_addr(wgmma_smem);
    const unsigned base = (raw + 1023u) & ~1023u;
    unsigned char* const smem = wgmma_smem + (base - raw);
    // Q at 0, K tile of stage b at kQBytes + b kTileBytes, V tiles after the K tiles, then the
    // stages' full and empty barriers.
    auto k_at = [&](int b) { return kQBytes + b * kTileBytes; };
    auto v_at = [&](int b) { return kQBytes + (STAGES + b) * kTileBytes; };
    const unsigned full_bar = base + kQBytes + 2 * STAGES * kTileBytes;
    const unsigned empty_bar = full_bar + 8 * STAGES;
    if (threadIdx.x == 0) {
#pragma unroll
        for (int b = 0; b < STAGES; ++b) {
            mbarrier_init(full_bar + 8 * b, kThreads);
            mbarrier_init(empty_bar + 8 * b, kThreads);
        }
    }
    __syncthreads();

    const int* tile = tiles + blockIdx.y * 4;
    const int seq = tile[0];
    const int row0 = tile[1];
    const int rows = tile[2];
    const int pos0 = tile[3];
    const int kv_head = blockIdx.x;
    const int group = num_q_heads / num_kv_heads;
    const int items = rows * group;
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int wg = tid >> 7;
    const int warp = (tid >> 5) & 3;  // within the warpgroup
    const int tig = lane & 3;

    // Q of the block's items (zero past `items`); waited for with the first K and V tiles.
    for (int idx = tid; idx < kItems * kChunks; idx += kThreads) {
        const int item = idx / kChunks;
        const int c = idx - item * kChunks;
        const bool valid = item < items;
        const long long row = row0 + (valid ? item / group : 0);
        const int head = kv_head * group + (valid ? item % group : 0);
        tpserve::cp_async_16(smem + swizzled_offset(item, c, kItems),
                             q + row * q_stride + head * HD + c * 8, valid);
    }

    // This thread's rows of S and O: items a and b; an item past `items` gets position -1.
    const int wg_item0 = 64 * wg;
    const int item_a = wg_item0 + 16 * warp + (lane >> 2);
    const int item_b = item_a + 8;
    const int pos_a = item_a < items ? pos0 + item_a / group : -1;
    const int pos_b = item_b < items ? pos0 + item_b / group : -1;
    const int wg_items = min(items - wg_item0, 64);
    const int wg_last_pos = wg_items > 0 ? pos0 + (wg_item0 + wg_items - 1) / group : -1;
    const int wg_first_pos = pos0 + wg_item0 / group;

    const int* table = block_tables + (long long)seq * max_blocks_per_seq;
    const int ctx_end = pos0 + rows;  // keys the last row sees
    // A key's cache block and slot in it: by shift and mask when the block size is a power of
    // two (as the worker's are), else by division.
    const bool pow2_blocks = (block_size & (block_size - 1)) == 0;
    const int block_shift = __ffs(block_size) - 1;
    // This thread copies chunk tid % 16 of keys tid / 16 + kKeyStride i of each tile (its
    // pieces i).
    const int my_chunk = tid % kChunks;
    // The row in a tile of this thread's piece i, and whether it exists (the last piece may
    // reach past KEYS).
    auto piece_row = [&](int i) { return tid / kChunks + i * kKeyStride; };
    auto has_piece = [&](int i) { return KEYS % kKeyStride == 0 || piece_row(i) < KEYS; };
    // The cache slot of a key, or -1 past the context.
    auto slot_of = [&](int key) -> long long {
        const int block = pow2_blocks ? key >> block_shift : key / block_size;
        const int in_block = pow2_blocks ? key & (block_size - 1) : key % block_size;
        return key < ctx_end ? (long long)table[block] * block_size + in_block : -1;
    };
    // The element offset of this thread's chunk of a slot's head vector in the cache.
    auto slot_at = [&](long long slot) {
        return (slot * num_kv_heads + kv_head) * HD + my_chunk * 8;
    };
    // A cache in T: K and V of the KEYS keys from `first` into stage b, then this thread's
    // arrival on the stage's full barrier once they have landed (zeros past the context).
    auto load_kv = [&](int first, int b) {
#pragma unroll
        for (int i = 0; i < kPieces; ++i) {
            if (!has_piece(i)) {
                break;
            }
            const int j = piece_row(i);
            const long long slot = slot_of(first + j);
            const long long at = slot >= 0 ? slot_at(slot) : 0;
            const int offset = swizzled_offset(j, my_chunk, KEYS);
            tpserve::cp_async_16(smem + k_at(b) + offset, key_cache + at, slot >= 0);
            tpserve::cp_async_16(smem + v_at(b) + offset, value_cache + at, slot >= 0);
        }
        mbarrier_arrive_on_copies(full_bar + 8 * b);
    };
    // FP8: this thread's E4M3 pieces of the tile from `first` into staging buffer sb (8 bytes
    // each, K then V per piece; nothing past the context), as one cp.async group.
    unsigned char* const staging = smem + kQBytes + 2 * STAGES * kTileBytes + 16 * STAGES;
    auto staged = [&](int sb, int i, int kv) {
        return staging + (((sb * kThreads + tid) * kPieces + i) * 2 + kv) * 8;
    };
    auto stage_kv = [&](int first, int sb) {
#pragma unroll
        for (int i = 0; i < kPieces; ++i) {
            if (!has_piece(i)) {
                break;
            }
            const long long slot = slot_of(first + piece_row(i));
            if (slot >= 0) {
                tpserve::cp_async_8(staged(sb, i, 0), key_cache + slot_at(slot));
                tpserve::cp_async_8(staged(sb, i, 1), value_cache + slot_at(slot));
            }
        }
        tpserve::cp_async_commit();
    };
    // FP8: the staged pieces of the tile from `first` converted into stage b (zeros past the
    // context), made visible to the tensor cores, and this thread's arrival on its full barrier.
    auto convert_kv = [&](int first, int sb, int b) {
        using Kv = tpserve::KvCache<T, C>;
#pragma unroll
        for (int i = 0; i < kPieces; ++i) {
            if (!has_piece(i)) {
                break;
            }
            const bool valid = first + piece_row(i) < ctx_end;
            const int offset = swizzled_offset(piece_row(i), my_chunk, KEYS);
#pragma unroll
            for (int kv = 0; kv < 2; ++kv) {
                const auto* raw = reinterpret_cast<const typename Kv::Raw*>(staged(sb, i, kv));
                const uint4 v = valid ? Kv::to_act(*raw) : make_uint4(0u, 0u, 0u, 0u);
                *reinterpret_cast<uint4*>(smem + (kv == 0 ? k_at(b) : v_at(b)) + offset) = v;
            }
        }
        fence_async_proxy();
        mbarrier_arrive(full_bar + 8 * b);
    };

    const float scale_log2 = scale * kWgmmaLog2e;
    float m_a = tpserve::neg_inf(), m_b = tpserve::neg_inf();  // running max of raw scores
    float l_a = 0.0f, l_b = 0.0f;  // this thread's share of the running sums
    float o[HD / 2];               // O: element 4 n + c as D's layout above, n-tile n
#pragma unroll
    for (int i = 0; i < HD / 2; ++i) {
        o[i] = 0.0f;
    }

    // Key tile t lives in stage t % STAGES, its (t / STAGES)-th filling: its full barrier's
    // phase of that parity completes when it has landed, and its empty barrier's when every
    // thread is done with it. Each thread copies its share of tile t + 1 before it computes tile
    // t, once every thread is done with tile t + 1 - STAGES: so no warpgroup waits for the others
    // at every tile, as one block-wide barrier a tile would make it, but it may run at most
    // STAGES - 2 tiles ahead of the slowest.
    static_assert(STAGES >= 2, "a stage computed while the next one loads");
    // Tile u's stage, once every thread is done with the tile it held before (u - STAGES).
    auto free_stage = [&](int u) {
        const int ub = u % STAGES;
        if (u >= STAGES) {
            mbarrier_wait(empty_bar + 8 * ub, ((u - STAGES) / STAGES) & 1);
        }
        return ub;
    };
    const int num_key_tiles = (ctx_end + KEYS - 1) / KEYS;
    // The warpgroup's Q and each stage's K and V at their first 16 dimensions (or keys): the
    // products' descriptors are these moved by constants.
    const unsigned long long q_desc = smem_desc(base + wg_item0 * 128, 16, 1024);
    if constexpr (kFp8) {
        // Tile 0 (with Q: one group) and tile 1 staged; tile 0 converted.
        stage_kv(0, 0);
        if (num_key_tiles > 1) {
            stage_kv(KEYS, 1);
        } else {
            tpserve::cp_async_commit();
        }
        tpserve::cp_async_wait<1>();
        convert_kv(0, 0, 0);
    } else {
        load_kv(0, 0);  // with Q: tile 0's barrier covers both
    }
    for (int t = 0; t < num_key_tiles; ++t) {
        const int b = t % STAGES;
        const int chunk = t * KEYS;
        const int next = t + 1;
        if constexpr (kFp8) {
            // Tile t + 2 staged (into the buffer tile t was converted from); tile t + 1, staged
            // a tile ago, converted into its stage once every thread is done with that stage.
            if (next + 1 < num_key_tiles) {
                stage_kv(chunk + 2 * KEYS, (next + 1) & 1);
            } else {
                tpserve::cp_async_commit();
            }
            if (next < num_key_tiles) {
                tpserve::cp_async_wait<1>();
                convert_kv(chunk + KEYS, next & 1, free_stage(next));
            }
        } else if (next < num_key_tiles) {
            load_kv(chunk + KEYS, free_stage(next));
        }
        mbarrier_wait(full_bar + 8 * b, (t / STAGES) & 1);
        fence_async_proxy();  // the copies' writes, seen through the barrier, for the tensor cores
        const unsigned long long k_desc = smem_desc(base + k_at(b), 16, 1024);
        const unsigned long long v_desc = smem_desc(base + v_at(b), KEYS * 128, 1024);

        if (chunk <= wg_last_pos) {  // warpgroup-uniform
            float s[KEYS / 2];
#pragma unroll
            for (int i = 0; i < KEYS / 2; ++i) {
                s[i] = 0.0f;
            }
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk) {
                const unsigned inner = (kk & 3) * 32;  // 16 dimensions inside the panel
                const unsigned long long a = desc_plus(q_desc, (kk >> 2) * kItems * 128 + inner);
                const unsigned long long bk = desc_plus(k_desc, (kk >> 2) * KEYS * 128 + inner);
                if constexpr (KEYS == 64) {
                    Wgmma<T>::ss_n64(s, a, bk, kk > 0);
                } else {
                    Wgmma<T>::ss_n128(s, a, bk, kk > 0);
                }
            }
            wgmma_commit();
            wgmma_wait_all();
            hold_registers(s);

            // Mask keys past a row's position: element 4 j + c is row (c < 2 ? a : b), key
            // chunk + 8 j + 2 tig + (c & 1).
            if (chunk + KEYS - 1 > wg_first_pos) {
#pragma unroll
                for (int j = 0; j < kSTiles; ++j) {
                    const int key = chunk + 8 * j + 2 * tig;
                    if (key > pos_a) s[4 * j] = tpserve::neg_inf();
                    if (key + 1 > pos_a) s[4 * j + 1] = tpserve::neg_inf();
                    if (key > pos_b) s[4 * j + 2] = tpserve::neg_inf();
                    if (key + 1 > pos_b) s[4 * j + 3] = tpserve::neg_inf();
                }
            }
            float max_a = tpserve::neg_inf();
            float max_b = tpserve::neg_inf();
#pragma unroll
            for (int j = 0; j < kSTiles; ++j) {
                max_a = fmaxf(max_a, fmaxf(s[4 * j], s[4 * j + 1]));
                max_b = fmaxf(max_b, fmaxf(s[4 * j + 2], s[4 * j + 3]));
            }
            // A row's keys are spread over the 4 lanes of its quad.
            max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 1));
            max_a = fmaxf(max_a, __shfl_xor_sync(0xffffffffu, max_a, 2));
            max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 1));
            max_b = fmaxf(max_b, __shfl_xor_sync(0xffffffffu, max_b, 2));
            const float new_a = fmaxf(m_a, max_a);
            const float new_b = fmaxf(m_b, max_b);
            // A row that has seen no key keeps max -inf: subtract 0 so that exp2(-inf) = 0.
            const float sub_a = (new_a == tpserve::neg_inf() ? 0.0f : new_a) * scale_log2;
            const float sub_b = (new_b == tpserve::neg_inf() ? 0.0f : new_b) * scale_log2;
            const float corr_a = tpserve::fast_exp2(fmaf(m_a, scale_log2, -sub_a));  // 0 while -inf
            const float corr_b = tpserve::fast_exp2(fmaf(m_b, scale_log2, -sub_b));
            m_a = new_a;
            m_b = new_b;
            float sum_a = 0.0f;
            float sum_b = 0.0f;
#pragma unroll
            for (int j = 0; j < kSTiles; ++j) {
                s[4 * j] = tpserve::fast_exp2(fmaf(s[4 * j], scale_log2, -sub_a));
                s[4 * j + 1] = tpserve::fast_exp2(fmaf(s[4 * j + 1], scale_log2, -sub_a));
                s[4 * j + 2] = tpserve::fast_exp2(fmaf(s[4 * j + 2], scale_log2, -sub_b));
                s[4 * j + 3] = tpserve::fast_exp2(fmaf(s[4 * j + 3], scale_log2, -sub_b));
                sum_a += s[4 * j] + s[4 * j + 1];
                sum_b += s[4 * j + 2] + s[4 * j + 3];
            }
            l_a = l_a * corr_a + sum_a;
            l_b = l_b * corr_b + sum_b;
#pragma unroll
            for (int n = 0; n < kOTiles; ++n) {
                o[4 * n] *= corr_a;
                o[4 * n + 1] *= corr_a;
                o[4 * n + 2] *= corr_b;
                o[4 * n + 3] *= corr_b;
            }
            // P as A fragments of k-steps of 16 keys: n-tiles 2 kk and 2 kk + 1 of S are the
            // A fragment of k-step kk (a0 = row a, keys 2 tig + {0, 1}; a1 = row b; a2, a3 the
            // same 8 keys on).
            unsigned p[KEYS / 16][4];
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                p[kk][0] = tpserve::Mma<T>::pack(s[8 * kk], s[8 * kk + 1]);
                p[kk][1] = tpserve::Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
                p[kk][2] = tpserve::Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
                p[kk][3] = tpserve::Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
            }
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KEYS / 16; ++kk) {
                const unsigned long long bv = desc_plus(v_desc, kk * 16 * 128);
                Wgmma<T>::rs_n128_tb(o, p[kk], bv, 1);
            }
            wgmma_commit();
            wgmma_wait_all();
            hold_registers(o);
            hold_registers(p);
        }
        mbarrier_arrive(empty_bar + 8 * b);
    }

    // Totals of the row sums over the quad; O divided by them, rounded to T once.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = h == 0 ? l_a : l_b;
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const int item = h == 0 ? item_a : item_b;
        if (item < items) {
            const float inv = (l > 0.0f ? 1.0f / l : 0.0f) * v_scale;
            const long long row = row0 + item / group;
            const int head = kv_head * group + item % group;
            T* dst = out + (row * num_q_heads + head) * HD + 2 * tig;
#pragma unroll
            for (int n = 0; n < kOTiles; ++n) {
                *reinterpret_cast<unsigned*>(dst + 8 * n) = tpserve::Mma<T>::pack(
                    o[4 * n + 2 * h] * inv, o[4 * n + 2 * h + 1] * inv);
            }
        }
    }
#else
    (void)out, (void)q, (void)key_cache, (void)value_cache, (void)block_tables, (void)tiles;
    (void)num_q_heads, (void)num_kv_heads, (void)block_size, (void)max_blocks_per_seq;
    (void)q_stride, (void)scale, (void)k_scale, (void)v_scale;
#if defined(__CUDA_ARCH__)
    __trap();
#endif
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// The shape the worker launches (worker/src/cuda/kernels/attention.rs): 4 warpgroups (256
// items: each K and V tile serves twice the items of 2 warpgroups), one block an SM (128
// registers a thread), key tiles of 64 in 4 stages (197,696 bytes of shared memory); for an FP8
// cache 3 stages and the staging area (197,680 bytes). On an H200
// (prefill_attention_bench.cu, one layer from position 0, 2 stages then): 1.452 ms at 8,192
// tokens against 1.598 with 2 warpgroups at 2 blocks an SM and 1.783 for attention_mma.cu's
// widest shape.
constexpr int kWgmmaGroups = 4;
constexpr int kWgmmaKeys = 64;
constexpr int kWgmmaStages = 4;
constexpr int kWgmmaFp8Stages = 3;

// One entry point per dtype and cache element, with paged_attention's argument list
// (paged_attention_wgmma_hd128_bf16, paged_attention_wgmma_hd128_fp8kv_bf16, ...).
#define TPSERVE_PAGED_ATTENTION_WGMMA_CACHE(SUFFIX, T, KV, C)                                 \
    extern "C" __global__ void __launch_bounds__(128 * kWgmmaGroups, 1)                        \
        paged_attention_wgmma_hd128##KV##_##SUFFIX(                                           \
            T* __restrict__ out, float* __restrict__ partial_out,                             \
            float* __restrict__ partial_ml, const T* __restrict__ q,                          \
            const C* __restrict__ key_cache, const C* __restrict__ value_cache,               \
            const int* __restrict__ block_tables, const int* __restrict__ tiles,              \
            int num_q_heads, int num_kv_heads, int block_size, int max_blocks_per_seq,        \
            int q_stride, int num_splits, int split_len, float scale, float k_scale,          \
            float v_scale) {                                                                  \
        (void)partial_out;                                                                    \
        (void)partial_ml;                                                                     \
        (void)num_splits;                                                                     \
        (void)split_len;                                                                      \
        paged_attention_wgmma_impl<T, kWgmmaGroups, kWgmmaKeys,                               \
                                   sizeof(C) == 1 ? kWgmmaFp8Stages : kWgmmaStages, C>(       \
            out, q, key_cache, value_cache, block_tables, tiles, num_q_heads, num_kv_heads,    \
            block_size, max_blocks_per_seq, q_stride, scale, k_scale, v_scale);               \
    }
#define TPSERVE_PAGED_ATTENTION_WGMMA(SUFFIX, T) \
    TPSERVE_FOR_EACH_KV_CACHE(TPSERVE_PAGED_ATTENTION_WGMMA_CACHE, SUFFIX, T)
TPSERVE_FOR_EACH_DTYPE(TPSERVE_PAGED_ATTENTION_WGMMA)
