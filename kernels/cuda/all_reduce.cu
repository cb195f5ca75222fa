// A one-shot all-reduce (sum) over peer memory for the small messages of tensor-parallel decode,
// where NCCL's latency (~10-20 us a call) dominates the bytes moved.
//
// Every rank of the group owns one exchange buffer, allocated with cuMemAlloc and mapped into
// every other rank's address space by CUDA IPC (worker/src/cuda/peer_all_reduce.rs). Its layout:
//   [0, AR_SIGNAL_BYTES)          ArSignals: barrier flags and the per-block call counters
//   [AR_SIGNAL_BYTES, + world*cap) one slot of `cap` bytes per rank: what that rank pushed here
//
// One call, block b of rank r (every rank launches the same grid for the same message, so
// block b of each rank handles the same elements):
//   1. pushes its chunk of the input into slot r of every rank's buffer (remote stores over
//      NVLink, its own buffer included);
//   2. start barrier: after the block's stores, a release store of the call's number into every
//      rank's start flag [b][r]; then it waits (acquire) until every rank's flag [b][p] in its
//      own buffer has reached the call's number, i.e. until every rank's chunk has landed here;
//   3. sums its chunk over the slots in rank order 0..world (so every rank computes bit-identical
//      results, as the ranks of a tensor-parallel group must) and writes it to the input, in
//      place;
//   4. end barrier: a release store into every rank's end flag [b][r] and a wait for its own,
//      so that no rank's next call pushes into a slot that a peer is still reading. With the
//      kernel boundary (a rank's next call starts only after all of its blocks have passed this
//      barrier), every peer has finished reading everything the next call overwrites.
// The call number of block b is kept in its own buffer (`epoch[b]`) and advanced by the block,
// so the kernel needs no host-side counter and replays correctly inside a CUDA graph. Flags are
// compared by signed difference, so the 32-bit counter may wrap.
//
// Arguments:
//   buf     T    [count]   read, then written with the sum (16-byte aligned; count * sizeof(T)
//                          a multiple of 16 and at most `cap`)
//   peers   u64  [world]   each rank's exchange buffer, mapped into this process (own included)
//   n_vec   i32  count * sizeof(T) / 16
//   cap     i64  bytes of one slot
//   rank    i32
//   world   i32  at most AR_MAX_RANKS
// Launch: grid (B, 1, 1) with B <= AR_MAX_BLOCKS the same on every rank; block (AR_THREADS, 1, 1).
#include "common.cuh"

#define AR_MAX_RANKS 8
#define AR_MAX_BLOCKS 64
#define AR_THREADS 512
// The signal area's size, a multiple of 256 so the slots stay aligned; see ArSignals.
#define AR_SIGNAL_BYTES 8192
// Byte offsets of ArSignals' flag arrays.
#define AR_START_OFFSET 0
#define AR_END_OFFSET (AR_MAX_BLOCKS * AR_MAX_RANKS * 4)

struct ArSignals {
    unsigned int start[AR_MAX_BLOCKS][AR_MAX_RANKS];
    unsigned int end[AR_MAX_BLOCKS][AR_MAX_RANKS];
    unsigned int epoch[AR_MAX_BLOCKS];
};
static_assert(sizeof(ArSignals) <= AR_SIGNAL_BYTES, "the signal area is too small");

__device__ __forceinline__ void store_release_sys(unsigned int* flag, unsigned int value) {
    asm volatile("st.release.sys.global.u32 [%0], %1;\n" ::"l"(flag), "r"(value) : "memory");
}

__device__ __forceinline__ unsigned int load_acquire_sys(const unsigned int* flag) {
    unsigned int value;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];\n" : "=r"(value) : "l"(flag) : "memory");
    return value;
}

// Thread p < world signals rank p and waits for rank p's signal to this block.
__device__ __forceinline__ void barrier(unsigned int (*own)[AR_MAX_RANKS],
                                        const unsigned long long* peers, int flag_offset,
                                        int rank, int world, unsigned int epoch) {
    __syncthreads();
    if (threadIdx.x < world) {
        char* peer = reinterpret_cast<char*>(peers[threadIdx.x]);
        unsigned int* remote = reinterpret_cast<unsigned int*>(peer + flag_offset) +
                               blockIdx.x * AR_MAX_RANKS + rank;
        store_release_sys(remote, epoch);
        const unsigned int* mine = &own[blockIdx.x][threadIdx.x];
        while (static_cast<int>(load_acquire_sys(mine) - epoch) < 0) {
        }
    }
    __syncthreads();
}

template <typename T>
__device__ void all_reduce_one_shot_impl(T* __restrict__ buf, const unsigned long long* peers,
                                         int n_vec, long long cap, int rank, int world) {
    tpserve::wait_for_inputs();
    ArSignals* own = reinterpret_cast<ArSignals*>(peers[rank]);
    __shared__ unsigned int epoch_shared;
    if (threadIdx.x == 0) {
        epoch_shared = own->epoch[blockIdx.x] + 1;
    }
    __syncthreads();
    const unsigned int epoch = epoch_shared;

    const int per_block = (n_vec + gridDim.x - 1) / gridDim.x;
    const int lo = blockIdx.x * per_block;
    const int hi = min(n_vec, lo + per_block);
    uint4* data = reinterpret_cast<uint4*>(buf);
    const long long slot_vec = cap / 16;

    // 1. Push this block's chunk into slot `rank` of every rank's buffer.
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        const uint4 v = data[i];
        for (int p = 0; p < world; ++p) {
            uint4* slots = reinterpret_cast<uint4*>(reinterpret_cast<char*>(peers[p]) +
                                                    AR_SIGNAL_BYTES);
            __stcg(slots + rank * slot_vec + i, v);
        }
    }
    // 2. Every rank's chunk has landed in this rank's slots.
    barrier(own->start, peers, AR_START_OFFSET, rank, world, epoch);

    // 3. Sum over the slots in rank order.
    const uint4* slots =
        reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(own) + AR_SIGNAL_BYTES);
    constexpr int kPerVec = 16 / sizeof(T);
    for (int i = lo + threadIdx.x; i < hi; i += blockDim.x) {
        float acc[kPerVec];
#pragma unroll
        for (int j = 0; j < kPerVec; ++j) {
            acc[j] = 0.0f;
        }
        for (int p = 0; p < world; ++p) {
            const uint4 v = __ldcg(slots + p * slot_vec + i);
            const T* x = reinterpret_cast<const T*>(&v);
#pragma unroll
            for (int j = 0; j < kPerVec; ++j) {
                acc[j] += tpserve::to_float(x[j]);
            }
        }
        uint4 out;
        T* o = reinterpret_cast<T*>(&out);
#pragma unroll
        for (int j = 0; j < kPerVec; ++j) {
            o[j] = tpserve::from_float<T>(acc[j]);
        }
        data[i] = out;
    }
    // 4. Every rank has read its slots: the next call may overwrite them.
    barrier(own->end, peers, AR_END_OFFSET, rank, world, epoch);
    if (threadIdx.x == 0) {
        own->epoch[blockIdx.x] = epoch;
    }
}

// all_reduce_residual_norm_{bf16,f16}: the one-shot all-reduce of a sublayer's output fused
// with the residual add and RMSNorm that follow it in every decoder layer: per row,
//   s = sum over ranks of sub (f32 in rank order, rounded to T once, as all_reduce_one_shot),
//   x = x + s (rounded to T; x is the residual stream, written back),
//   out = rmsnorm(x) * weight,
// with rms_norm.cu's arithmetic, thread layout and reduction order (launched with the same
// block size, it is bit-identical to all_reduce_one_shot followed by rms_norm_residual). One
// launch instead of two, and no round trip of the sum through global memory. Blocks own whole
// rows (row b, b + B, ...), which they push, then sum and normalise; the barriers are as above.
//
// Arguments:
//   out     T    [rows, hidden]   written; must not alias x or sub
//   x       T    [rows, hidden]   the residual stream; read and written
//   sub     T    [rows, hidden]   this rank's partial sublayer output; read only
//   weight  T    [hidden]
//   hidden  i32  a multiple of 8, hidden / 8 <= 4 * blockDim.x
//   eps     f32
//   rows    i32  rows * hidden * sizeof(T) <= cap
//   peers, cap, rank, world: as all_reduce_one_shot
// Launch: grid (B, 1, 1) with B = min(rows, AR_MAX_BLOCKS), the same on every rank; block
// (rms_norm's: round_up(hidden / 8, 32) clamped to [32, 1024], 1, 1).
template <typename T>
__device__ void all_reduce_residual_norm_impl(T* __restrict__ out, T* __restrict__ x,
                                              const T* __restrict__ sub,
                                              const T* __restrict__ weight, int hidden, float eps,
                                              int rows, const unsigned long long* peers,
                                              long long cap, int rank, int world) {
    constexpr int kMaxPieces = 4;
    const int pieces = hidden / 8;
    // Rows of at most one 16-byte piece a thread (hidden <= 8,192: every model we serve) hold
    // the thread's piece of the weight, a constant of the model, from before the wait for the
    // kernel before: its latency is then off the path of every norm, as rms_norm.cu's narrow
    // kernels have it (docs/PERFORMANCE.md, run 53). Longer rows load theirs after the sums.
    const bool weight_first = pieces <= (int)blockDim.x;
    const uint4 weight_piece = weight_first && (int)threadIdx.x < pieces
                                   ? *reinterpret_cast<const uint4*>(weight + threadIdx.x * 8)
                                   : make_uint4(0, 0, 0, 0);
    tpserve::wait_for_inputs_after_loads();
    ArSignals* own = reinterpret_cast<ArSignals*>(peers[rank]);
    __shared__ unsigned int epoch_shared;
    if (threadIdx.x == 0) {
        epoch_shared = own->epoch[blockIdx.x] + 1;
    }
    __syncthreads();
    const unsigned int epoch = epoch_shared;
    const long long slot_vec = cap / 16;

    // 1. Push this block's rows into slot `rank` of every rank's buffer.
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        for (int p = threadIdx.x; p < pieces; p += blockDim.x) {
            const long long at = (long long)row * pieces + p;
            const uint4 v = reinterpret_cast<const uint4*>(sub)[at];
            for (int peer = 0; peer < world; ++peer) {
                uint4* slots = reinterpret_cast<uint4*>(reinterpret_cast<char*>(peers[peer]) +
                                                        AR_SIGNAL_BYTES);
                __stcg(slots + rank * slot_vec + at, v);
            }
        }
    }
    barrier(own->start, peers, AR_START_OFFSET, rank, world, epoch);

    // 2. Per row: the sum over ranks, the residual add, RMSNorm.
    const uint4* slots =
        reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(own) + AR_SIGNAL_BYTES);
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        T* xr = x + (long long)row * hidden;
        T* outr = out + (long long)row * hidden;
        uint4 held[kMaxPieces];
        float sum_sq = 0.0f;
#pragma unroll
        for (int j = 0; j < kMaxPieces; ++j) {
            const int p = threadIdx.x + j * blockDim.x;
            if (p < pieces) {
                const long long at = (long long)row * pieces + p;
                float acc[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    acc[i] = 0.0f;
                }
                for (int peer = 0; peer < world; ++peer) {
                    const uint4 v = __ldcg(slots + peer * slot_vec + at);
                    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        acc[i] += tpserve::to_float(e[i]);
                    }
                }
                uint4 a = *reinterpret_cast<const uint4*>(xr + p * 8);
                T* e = reinterpret_cast<T*>(&a);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    e[i] = tpserve::from_float<T>(tpserve::to_float(e[i]) +
                                                  tpserve::round_to<T>(acc[i]));
                }
                *reinterpret_cast<uint4*>(xr + p * 8) = a;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float v = tpserve::to_float(e[i]);
                    sum_sq += v * v;
                }
                held[j] = a;
            }
        }
        const float total = tpserve::block_reduce_sum(sum_sq);
        const float scale = rsqrtf(total / (float)hidden + eps);
#pragma unroll
        for (int j = 0; j < kMaxPieces; ++j) {
            const int p = threadIdx.x + j * blockDim.x;
            if (p < pieces) {
                const uint4 wv = weight_first
                                     ? weight_piece
                                     : *reinterpret_cast<const uint4*>(weight + p * 8);
                const T* w = reinterpret_cast<const T*>(&wv);
                T* e = reinterpret_cast<T*>(&held[j]);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float normed = tpserve::round_to<T>(tpserve::to_float(e[i]) * scale);
                    e[i] = tpserve::from_float<T>(normed * tpserve::to_float(w[i]));
                }
                *reinterpret_cast<uint4*>(outr + p * 8) = held[j];
            }
        }
    }
    // 3. Every rank has read its slots: the next call may overwrite them.
    barrier(own->end, peers, AR_END_OFFSET, rank, world, epoch);
    if (threadIdx.x == 0) {
        own->epoch[blockIdx.x] = epoch;
    }
}

#define TPSERVE_ALL_REDUCE(SUFFIX, T)                                                          \
    extern "C" __global__ void __launch_bounds__(AR_THREADS) all_reduce_one_shot_##SUFFIX(     \
        T* __restrict__ buf, const unsigned long long* peers, int n_vec, long long cap,        \
        int rank, int world) {                                                                 \
        all_reduce_one_shot_impl<T>(buf, peers, n_vec, cap, rank, world);                      \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) all_reduce_residual_norm_##SUFFIX(      \
        T* __restrict__ out, T* __restrict__ x, const T* __restrict__ sub,                     \
        const T* __restrict__ weight, int hidden, float eps, int rows,                         \
        const unsigned long long* peers, long long cap, int rank, int world) {                 \
        all_reduce_residual_norm_impl<T>(out, x, sub, weight, hidden, eps, rows, peers, cap,   \
                                         rank, world);                                         \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_ALL_REDUCE)
