// Token sampling on the device: greedy, or temperature with top-k, min-p and top-p filtering,
// drawn with the Gumbel-max trick from a per-row seed, so the logits never leave the GPU.
#include "common.cuh"

namespace {

using tpserve::block_reduce_max;

constexpr int kBisectionSteps = 28;

// A (value, index) pair reduced by max value, lowest index on ties.
struct ArgMax {
    float value;
    int index;
};

__device__ __forceinline__ ArgMax better(ArgMax a, ArgMax b) {
    if (b.value > a.value || (b.value == a.value && b.index < a.index)) {
        return b;
    }
    return a;
}

// The best of the warp's 32 pairs, to every lane (every lane calls it).
__device__ __forceinline__ ArgMax warp_argmax(ArgMax v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        ArgMax other;
        other.value = __shfl_xor_sync(0xffffffffu, v.value, offset);
        other.index = __shfl_xor_sync(0xffffffffu, v.index, offset);
        v = better(v, other);
    }
    return v;
}

// The token an argmax names: 0 where nothing could win (every entry -inf or NaN).
__device__ __forceinline__ unsigned int token_of(ArgMax best) {
    return best.index == 0x7fffffff ? 0u : (unsigned int)best.index;
}

__device__ ArgMax block_argmax(ArgMax v) {
    __shared__ float values[32];
    __shared__ int indices[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_argmax(v);
    if (lane == 0) {
        values[warp] = v.value;
        indices[warp] = v.index;
    }
    __syncthreads();
    const int warps = blockDim.x >> 5;
    ArgMax w;
    w.value = lane < warps ? values[lane] : tpserve::neg_inf();
    w.index = lane < warps ? indices[lane] : 0x7fffffff;
    w = warp_argmax(w);
    __syncthreads();
    return w;
}

// splitmix64: a well-mixed 64-bit hash.
__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Standard Gumbel noise, -log(-log(u)), for u uniform in (0, 1) on a grid of 2^-24: u = (m + 1/2)
// 2^-24, m the top 24 bits of a hash of the seed and token v (gumbel). Near u = 1, -log(u) is
// below __logf's absolute error (~2^-22), and -__logf(-__logf(u)) was infinite at one point of
// the grid (tests/gpu/sampling_bench.cu), which made that token win any draw over the whole
// vocabulary; there -log(u) comes from its series in w = 1 - u (exact on the grid), and the
// noise is at most -log(2^-25) = 17.33 < kGumbelMax.
__device__ __forceinline__ float gumbel_of(unsigned int m) {
    const float u = ((float)m + 0.5f) * (1.0f / 16777216.0f);
    const float w = ((float)(16777215u - m) + 0.5f) * (1.0f / 16777216.0f);
    const float e = w < 1.0f / 64.0f ? w * (1.0f + w * (0.5f + w * (1.0f / 3.0f))) : -__logf(u);
    return -__logf(e);
}
__device__ __forceinline__ float gumbel(unsigned long long seed, int v) {
    return gumbel_of((unsigned int)(mix64(seed ^ mix64((unsigned long long)v)) >> 40));
}
constexpr float kGumbelMax = 17.5f;

// The better of `best` and token v with value x plus its noise; the noise is not computed where
// it cannot make x the better (x + kGumbelMax below best).
__device__ __forceinline__ ArgMax draw_step(ArgMax best, float x, unsigned long long seed, int v) {
    if (x + kGumbelMax < best.value) {
        return best;
    }
    return better(best, ArgMax{x + gumbel(seed, v), v});
}

// A filtered draw's candidates (sample_impl): the tokens of a few bins of a histogram of the
// row, sorted in shared memory.
constexpr int kCandidates = 4096;
// Bins of that histogram: equal bins of x over [lo, x_max], one pair a thread of 1,024.
constexpr int kBins = 2048;
// Blocks that may share one row of sample_* (Team; one warp merges their draws).
constexpr int kMaxSampleSplits = 32;

// Inclusive prefix sums over the block's threads in threadIdx order, returned to each thread
// (blockDim.x a multiple of 32; every thread calls it).
template <typename V> __device__ V block_prefix_sum(V v) {
    __shared__ V warp_totals[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const V other = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) {
            v += other;
        }
    }
    if (lane == 31) {
        warp_totals[warp] = v;
    }
    __syncthreads();
    if (warp == 0) {
        V w = lane < (int)(blockDim.x >> 5) ? warp_totals[lane] : V(0);
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const V other = __shfl_up_sync(0xffffffffu, w, offset);
            if (lane >= offset) {
                w += other;
            }
        }
        warp_totals[lane] = w;
    }
    __syncthreads();
    const V before = warp == 0 ? V(0) : warp_totals[warp - 1];
    __syncthreads();
    return v + before;
}

// The sum of v over the block, to every thread (every thread calls it). Integer sums are the
// same in any order.
__device__ unsigned long long block_sum(unsigned long long v) {
    __shared__ unsigned long long sum;
    const unsigned long long through = block_prefix_sum(v);
    if (threadIdx.x == blockDim.x - 1) {
        sum = through;
    }
    __syncthreads();
    const unsigned long long result = sum;
    __syncthreads();
    return result;
}

// The logit of vocabulary entry v of a row spread over tensor-parallel ranks (see sample_*).
template <typename T>
__device__ __forceinline__ float spread_logit(const T* __restrict__ logits, int row,
                                              int row_stride, int vocab_per_rank, int v) {
    const int rank = v / vocab_per_rank;
    return tpserve::to_float(logits[(long long)rank * row_stride * vocab_per_rank +
                                    (long long)row * vocab_per_rank + (v - rank * vocab_per_rank)]);
}

// Calls f(v, logit(v)) for every entry v < vocab of a row laid out as sample_*'s logits (rank
// slices), 16 bytes a thread at a time where the slices allow it; of a row's pieces (16 bytes,
// or entries), block `part` of `parts` blocks sharing the row takes every parts-th blockDim.x.
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const T* __restrict__ logits, int row,
                                               int num_rows, int vocab_per_rank, int vocab,
                                               int part, int parts, F&& f) {
    constexpr int kVec = 16 / (int)sizeof(T);
    const long long rank_stride = (long long)num_rows * vocab_per_rank;
    const int first = part * blockDim.x + threadIdx.x;
    const int stride = parts * blockDim.x;
    if (vocab_per_rank % kVec == 0) {
        const int pieces = vocab_per_rank / kVec;
        for (int r = 0; r * vocab_per_rank < vocab; ++r) {
            const T* slice = logits + r * rank_stride + (long long)row * vocab_per_rank;
#pragma unroll 4
            for (int p = first; p < pieces; p += stride) {
                const uint4 raw = *reinterpret_cast<const uint4*>(slice + p * kVec);
                const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
                for (int i = 0; i < kVec; ++i) {
                    const int v = r * vocab_per_rank + p * kVec + i;
                    if (v < vocab) {
                        f(v, tpserve::to_float(e[i]));
                    }
                }
            }
        }
    } else {
        for (int v = first; v < vocab; v += stride) {
            f(v, spread_logit(logits, row, num_rows, vocab_per_rank, v));
        }
    }
}

// A token's probability relative to the top one, exp(x - x_max), in units of 2^-32: integer
// sums are exact in any order, so the thresholds read off them (and the row's draw) do not
// depend on the order in which threads add.
__device__ __forceinline__ float relative_mass(float x, float x_max) {
    return __expf(__fsub_rn(x, x_max));
}
__device__ __forceinline__ unsigned long long mass_units_of(float relative) {
    return __float2ull_rz(relative * 4294967296.0f);
}
__device__ __forceinline__ unsigned long long mass_units(float x, float x_max) {
    return mass_units_of(relative_mass(x, x_max));
}

// The bin of x among kBins equal bins from lo (inv_width = kBins / (x_max - lo), 0 for an empty
// range), clamped: the same float arithmetic in every pass, so a token's bin is the same each
// time it is computed, and never falls as x rises.
__device__ __forceinline__ int bin_of(float x, float lo, float inv_width) {
    return min(kBins - 1, max(0, __float2int_rd(__fmul_rn(__fsub_rn(x, lo), inv_width))));
}

// Turns a histogram into the sums from each bin up, in place (S: the type the sums are taken
// in). blockDim.x must be kBins / 2: thread t owns bins kBins - 1 - 2 t and kBins - 2 - 2 t.
template <typename S, typename V> __device__ void to_sums_from(V* hist) {
    const int hi = kBins - 1 - 2 * (int)threadIdx.x;
    const S a = hist[hi];
    const S b = hist[hi - 1];
    const S through = block_prefix_sum<S>(a + b);  // every read is done when it returns
    hist[hi] = (V)(through - b);
    hist[hi - 1] = (V)through;
    __syncthreads();
}

// The largest bin whose sum from it up (to_sums_from) reaches goal, or -1, to every thread.
template <typename V> __device__ int last_reaching(const V* sums_from, V goal) {
    const int hi = kBins - 1 - 2 * (int)threadIdx.x;
    // The sums fall as the bin rises, so the bins that reach the goal are 0 ..= j.
    const int mine = sums_from[hi] >= goal ? hi : sums_from[hi - 1] >= goal ? hi - 1 : -1;
    return (int)block_reduce_max((float)mine);
}

// Adds a token (when `take`) to bin `bin` of the counts, and when kMass its mass (relative to the
// top token) to the float masses. Where every taker of the warp adds to one bin (a tie, or a
// clump of close values, which would queue on one address) the warp adds once, its mass summed
// in units of 2^-24 (the masses only locate boundaries; see sample_impl). (__match_any_sync,
// which would group any lanes of a bin, costs more than it saves on rows without ties.)
template <bool kMass>
__device__ __forceinline__ void add_to_bin(bool take, int bin, float mass, unsigned int* counts,
                                           float* masses) {
    const unsigned int mask = __activemask();
    const unsigned int takers = __ballot_sync(mask, take);
    if (takers == 0u) {
        return;
    }
    const int first = __ffs(takers) - 1;
    const int first_bin = __shfl_sync(mask, bin, first);
    if (__all_sync(mask, !take || bin == first_bin)) {
        const unsigned int units =
            kMass ? __reduce_add_sync(mask, take ? __float2uint_rn(mass * 16777216.0f) : 0u) : 0u;
        if ((int)(threadIdx.x & 31) == first) {
            atomicAdd(&counts[bin], (unsigned int)__popc(takers));
            if (kMass) {
                atomicAdd(&masses[bin], (float)units * (1.0f / 16777216.0f));
            }
        }
    } else if (take) {
        atomicAdd(&counts[bin], 1u);
        if (kMass) {
            atomicAdd(&masses[bin], mass);
        }
    }
}

// Appends (x, v) to the candidates where `take` (one atomic a warp), past kCandidates only
// counting.
__device__ __forceinline__ void append(bool take, float x, int v, float* xs, int* ids,
                                       int* count) {
    const unsigned int mask = __activemask();
    const unsigned int want = __ballot_sync(mask, take);
    if (want == 0u) {
        return;
    }
    const int lane = threadIdx.x & 31;
    const int leader = __ffs(want) - 1;
    int base = 0;
    if (lane == leader) {
        base = atomicAdd(count, __popc(want));
    }
    base = __shfl_sync(mask, base, leader);
    if (take) {
        const int at = base + __popc(want & ((1u << lane) - 1u));
        if (at < kCandidates) {
            xs[at] = x;
            ids[at] = v;
        }
    }
}

// Sorts the n candidates (xs, ids) by x descending, lowest id first on ties (bitonic, padded
// to a power of two with (-inf, INT_MAX); n at most kCandidates).
__device__ void sort_candidates(float* xs, int* ids, int n) {
    int size = 2;
    while (size < n) {
        size <<= 1;
    }
    for (int i = n + threadIdx.x; i < size; i += blockDim.x) {
        xs[i] = tpserve::neg_inf();
        ids[i] = 0x7fffffff;
    }
    __syncthreads();
    for (int span = 2; span <= size; span <<= 1) {
        for (int stride = span >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < size / 2; i += blockDim.x) {
                const int a = 2 * stride * (i / stride) + (i % stride);
                const int b = a + stride;
                // Whether b goes before a in this span's direction (descending where a & span
                // is 0, so the whole ends descending).
                const bool b_first = xs[b] > xs[a] || (xs[b] == xs[a] && ids[b] < ids[a]);
                if (b_first == ((a & span) == 0)) {
                    const float x = xs[a];
                    const int id = ids[a];
                    xs[a] = xs[b];
                    ids[a] = ids[b];
                    xs[b] = x;
                    ids[b] = id;
                }
            }
            __syncthreads();
        }
    }
}

// The number of leading sorted candidates with x >= threshold, to every thread.
__device__ int count_at_least(const float* xs, int n, float threshold) {
    int kept = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (xs[i] >= threshold) {
            kept = i + 1;
        }
    }
    return (int)block_reduce_max((float)kept);
}

// The first of the n sorted candidates at which `above` plus their running mass (mass_units)
// reaches goal (n if none does), to every thread.
__device__ int first_reaching(const float* xs, int n, float x_max, unsigned long long above,
                              unsigned long long goal) {
    __shared__ int first;
    // Each thread sums a run of consecutive candidates.
    const int per = (n + blockDim.x - 1) / blockDim.x;
    const int begin = min(n, (int)threadIdx.x * per);
    const int end = min(n, begin + per);
    unsigned long long mine = 0ull;
    for (int i = begin; i < end; ++i) {
        mine += mass_units(xs[i], x_max);
    }
    unsigned long long running = above + block_prefix_sum(mine) - mine;
    if (threadIdx.x == 0) {
        first = n;
    }
    __syncthreads();
    for (int i = begin; i < end; ++i) {
        running += mass_units(xs[i], x_max);
        if (running >= goal) {
            atomicMin(&first, i);
            break;
        }
    }
    __syncthreads();
    const int result = first;
    __syncthreads();
    return result;
}

}  // namespace

// What one block of a shared row (Team) hands the others at an exchange: integer sums, a least
// and a greatest value, and a count (or, for the draw, a token).
struct TeamSlot {
    unsigned long long a, b;
    float low, high;
    int n, unused;
};

// The exchanges a shared row makes at most: its range, top-k's counts and gathered tokens,
// top-p's masses and gathered tokens, and the draw. Each has its own slots: a block may write
// the next one's while another still reads this one's.
constexpr int kTeamExchanges = 6;

// The device scratch of one row that several blocks of a sample_* launch share (Team), zero
// between launches: the last of the row's blocks to finish zeroes what the launch used.
struct TeamRow {
    unsigned int arrived;      // the row's blocks' arrivals, at each exchange and at the end
    unsigned int appended[2];  // tokens each of the two gathers appended (top-k's, top-p's)
    unsigned int unused;
    unsigned int counts[2][kBins];  // the row's histograms: top-k's counts, top-p's
    float masses[kBins];            // top-p's masses
    TeamSlot slots[kTeamExchanges][kMaxSampleSplits];
    float xs[kCandidates];  // a gather's tokens, in the order the blocks appended them
    int ids[kCandidates];
};
// The worker allocates this much a row (worker/src/cuda/kernels/sampling.rs, TEAM_ROW_BYTES).
constexpr int kTeamRowBytes =
    16 + 3 * kBins * 4 + kTeamExchanges * kMaxSampleSplits * 32 + kCandidates * 8;
static_assert(sizeof(TeamRow) == kTeamRowBytes,
              "worker/src/cuda/kernels/sampling.rs allocates kTeamRowBytes a row");

namespace {

// A wait at an exchange longer than this traps (an error instead of a hang, should a launch
// break the residency rule below).
constexpr unsigned long long kTeamTimeoutNs = 2000000000ull;

__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// The blocks sharing one row of a sample_* launch (grid y). Each reads its share of the row
// (every parts-th piece: LogitRow::each_of) and at each exchange they combine what they found,
// after which every block holds the same result. So every block takes the same branches, and
// the row's thresholds, and so its token, are what one block reading the whole row finds:
// integer sums, least and greatest values, and the merged histograms' counts are exact in any
// order (the float masses only locate a boundary that the exact sums then decide; sample_impl).
// A block alone (parts 1) exchanges nothing.
//
// An exchange waits for every block of the row, so a launch that shares rows must have all its
// blocks resident at once: rows * splits at most the SMs, one block of 1,024 threads each (the
// worker's sample_splits). A finished row's blocks wait for nothing.
struct Team {
    TeamRow* row;  // nullptr when alone
    int part, parts;
    unsigned int arrivals = 0;  // the arrivals of all the row's blocks so far
    int exchange = 0;

    // This block's team: the blocks of grid y sharing row `row` (alone when there is one).
    __device__ static Team of_row(TeamRow* teams, int row) {
        return Team{gridDim.y > 1 ? teams + row : nullptr, (int)blockIdx.y, (int)gridDim.y};
    }

    __device__ bool shared() const { return parts > 1; }

    __device__ static TeamSlot nothing() {
        return TeamSlot{0ull, 0ull, tpserve::pos_inf(), tpserve::neg_inf(), 0, 0};
    }

    // Waits until every block of the row has arrived here; what they wrote before is then
    // visible (read it with __ldcg: L1 may hold an earlier exchange's bytes).
    __device__ void wait_for_all() {
        __syncthreads();
        arrivals += parts;
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(&row->arrived, 1u);
            const volatile unsigned int* arrived = &row->arrived;
            const unsigned long long start = global_ns();
            for (unsigned int spins = 1; *arrived < arrivals; ++spins) {
                if (spins % 1024u == 0u && global_ns() - start > kTeamTimeoutNs) {
                    __trap();
                }
            }
            __threadfence();
        }
        __syncthreads();
    }

    // The row's combination of every block's `mine` (a and b and n summed, the least low, the
    // greatest high), to every thread of every block; `publish` (the whole block) first writes
    // what else the others will read.
    template <typename F> __device__ TeamSlot combine(TeamSlot mine, F&& publish) {
        if (!shared()) {
            return mine;
        }
        TeamSlot* slots = row->slots[exchange++];
        publish();
        if (threadIdx.x == 0) {
            slots[part] = mine;
        }
        wait_for_all();
        __shared__ TeamSlot combined;
        if (threadIdx.x < 32) {
            const int lane = threadIdx.x;
            TeamSlot s = nothing();
            if (lane < parts) {
                s.a = __ldcg(&slots[lane].a);
                s.b = __ldcg(&slots[lane].b);
                s.low = __ldcg(&slots[lane].low);
                s.high = __ldcg(&slots[lane].high);
                s.n = __ldcg(&slots[lane].n);
            }
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {
                s.a += __shfl_xor_sync(0xffffffffu, s.a, offset);
                s.b += __shfl_xor_sync(0xffffffffu, s.b, offset);
                s.low = fminf(s.low, __shfl_xor_sync(0xffffffffu, s.low, offset));
                s.high = fmaxf(s.high, __shfl_xor_sync(0xffffffffu, s.high, offset));
                s.n += __shfl_xor_sync(0xffffffffu, s.n, offset);
            }
            if (lane == 0) {
                combined = s;
            }
        }
        __syncthreads();
        const TeamSlot result = combined;
        __syncthreads();
        return result;
    }
    __device__ TeamSlot combine(TeamSlot mine) {
        return combine(mine, [] {});
    }

    // combine, and the row's histogram `which` (0: top-k's counts; 1: top-p's counts and
    // masses) from every block's into each block's `counts` (and `masses`).
    __device__ TeamSlot merge_histogram(int which, unsigned int* counts, float* masses,
                                        TeamSlot mine) {
        const TeamSlot result = combine(mine, [&] {
            for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
                if (counts[i] != 0u) {
                    atomicAdd(&row->counts[which][i], counts[i]);
                }
                if (masses != nullptr && masses[i] != 0.0f) {
                    atomicAdd(&row->masses[i], masses[i]);
                }
            }
        });
        if (shared()) {
            for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
                counts[i] = __ldcg(&row->counts[which][i]);
                if (masses != nullptr) {
                    masses[i] = __ldcg(&row->masses[i]);
                }
            }
            __syncthreads();
        }
        return result;
    }

    // combine (mine.n: the block's gathered tokens, those past kCandidates only counted), and
    // the row's gathered tokens (gather `which`) into each block's candidates where they all fit.
    __device__ TeamSlot merge_candidates(int which, float* xs, int* ids, TeamSlot mine) {
        __shared__ unsigned int base;
        const TeamSlot result = combine(mine, [&] {
            if (threadIdx.x == 0) {
                base = atomicAdd(&row->appended[which], (unsigned int)mine.n);
            }
            __syncthreads();
            const int room = max(0, kCandidates - (int)min(base, (unsigned int)kCandidates));
            for (int i = threadIdx.x; i < min(mine.n, room); i += blockDim.x) {
                row->xs[base + i] = xs[i];
                row->ids[base + i] = ids[i];
            }
        });
        if (shared() && result.n <= kCandidates) {
            for (int i = threadIdx.x; i < result.n; i += blockDim.x) {
                xs[i] = __ldcg(&row->xs[i]);
                ids[i] = __ldcg(&row->ids[i]);
            }
            __syncthreads();
        }
        return result;
    }

    // The row's token, the best of every block's `best` (lowest id on ties): written by the last
    // of the row's blocks to get here (leave).
    __device__ void finish(ArgMax best, unsigned int* out) {
        best = block_argmax(best);
        if (!shared()) {
            if (threadIdx.x == 0) {
                *out = token_of(best);
            }
            return;
        }
        TeamSlot* slots = row->slots[exchange];
        if (threadIdx.x == 0) {
            slots[part].low = best.value;
            slots[part].n = best.index;
        }
        if (!leave()) {
            return;
        }
        static_assert(kMaxSampleSplits == 32, "one whole warp merges the splits");
        if (threadIdx.x < 32) {
            ArgMax merged{tpserve::neg_inf(), 0x7fffffff};
            if ((int)threadIdx.x < parts) {
                merged = ArgMax{__ldcg(&slots[threadIdx.x].low), __ldcg(&slots[threadIdx.x].n)};
            }
            merged = warp_argmax(merged);
            if (threadIdx.x == 0) {
                *out = token_of(merged);
            }
        }
    }

    // The block's end of the row, after its last read of the scratch (every block of a row that
    // made an exchange calls it): whether it is the last to get here, to every thread. The last
    // sees what the others wrote before (read it with __ldcg) and zeroes what the launch used.
    __device__ bool leave() {
        if (!shared()) {
            return true;
        }
        __shared__ bool last;
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            last = atomicAdd(&row->arrived, 1u) == arrivals + parts - 1;
        }
        __syncthreads();
        if (!last) {
            return false;
        }
        __threadfence();
        if (arrivals > 0u) {
            // The histograms' counts and masses (adjacent in TeamRow), and the gathers' appends.
            unsigned int* words = &row->counts[0][0];
            for (int i = threadIdx.x; i < 3 * kBins; i += blockDim.x) {
                words[i] = 0u;
            }
            if (threadIdx.x < 2) {
                row->appended[threadIdx.x] = 0u;
            }
        }
        if (threadIdx.x == 0) {
            row->arrived = 0u;
        }
        return true;
    }
};

// A row of logits as the sampling kernels read it (see sample_*): rank slices of `stride` rows,
// entry v's x = logit * inv_t, never contracted with what follows, so every pass sees the same
// value.
template <typename T> struct LogitRow {
    const T* logits;
    int row, stride, vocab_per_rank, vocab;
    float inv_t;

    // Calls f(v, x) for the team's block's share of the entries (for_each_logit; every entry for
    // a block alone).
    template <typename F> __device__ __forceinline__ void each_of(const Team& team, F&& f) const {
        for_each_logit(logits, row, stride, vocab_per_rank, vocab, team.part, team.parts,
                       [&](int v, float l) { f(v, __fmul_rn(l, inv_t)); });
    }

    // The smallest finite x (banned and masked entries are -inf and bound nothing) and the
    // largest x, to every thread of the team.
    __device__ float2 range(Team& team) const {
        float low = tpserve::pos_inf();
        float high = tpserve::neg_inf();
        each_of(team, [&](int, float x) {
            high = fmaxf(high, x);
            if (x > tpserve::neg_inf()) {
                low = fminf(low, x);
            }
        });
        TeamSlot mine = Team::nothing();
        mine.low = -block_reduce_max(-low);
        mine.high = block_reduce_max(high);
        const TeamSlot row = team.combine(mine);
        return make_float2(row.low, row.high);
    }
};

// Counts the row's finite x in kBins equal bins from lo (bin_of) and turns the counts into sums
// from each bin up (to_sums_from); blockDim.x must be kBins / 2.
template <typename T>
__device__ void count_bins(const LogitRow<T>& r, Team& team, float lo, float inv_width,
                           unsigned int* counts) {
    for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
        counts[i] = 0u;
    }
    __syncthreads();
    r.each_of(team, [&](int, float x) {
        add_to_bin<false>(x > tpserve::neg_inf(), bin_of(x, lo, inv_width), 0.0f, counts,
                          nullptr);
    });
    __syncthreads();
    team.merge_histogram(0, counts, nullptr, Team::nothing());
    to_sums_from<unsigned int>(counts);
}

// What gather_bins gathered: n tokens (sorted in the candidates where n <= kCandidates), their
// exact mass, their least and greatest x, and the exact mass of the kept tokens past them.
struct Gathered {
    int n;
    unsigned long long mass, above;
    float low, high;
};

// Gathers the row's finite tokens with x >= floor whose bin (bin_of from lo) lies in
// [first_bin, last_bin] into the candidates (xs, ids), sorted where they fit; masses in
// mass_units against x_max. `which` names the gather among a shared row's two (Team).
template <typename T>
__device__ Gathered gather_bins(const LogitRow<T>& r, Team& team, int which, float floor,
                                float lo, float inv_width, int first_bin, int last_bin,
                                float x_max, float* xs, int* ids) {
    __shared__ int gathered;
    if (threadIdx.x == 0) {
        gathered = 0;
    }
    __syncthreads();
    unsigned long long in_range = 0ull;
    unsigned long long past = 0ull;
    float low = tpserve::pos_inf();
    float high = tpserve::neg_inf();
    r.each_of(team, [&](int v, float x) {
        const bool kept = x >= floor && x > tpserve::neg_inf();
        const int bin = bin_of(x, lo, inv_width);
        const bool take = kept && bin >= first_bin && bin <= last_bin;
        if (take) {
            in_range += mass_units(x, x_max);
            low = fminf(low, x);
            high = fmaxf(high, x);
        } else if (kept && bin > last_bin) {
            past += mass_units(x, x_max);
        }
        append(take, x, v, xs, ids, &gathered);
    });
    TeamSlot mine;
    mine.a = block_sum(in_range);
    mine.b = block_sum(past);
    mine.low = -block_reduce_max(-low);
    mine.high = block_reduce_max(high);
    mine.n = gathered;
    const TeamSlot row = team.merge_candidates(which, xs, ids, mine);
    Gathered g;
    g.mass = row.a;
    g.above = row.b;
    g.low = row.low;
    g.high = row.high;
    g.n = row.n;
    if (g.n <= kCandidates) {
        sort_candidates(xs, ids, g.n);
    }
    return g;
}

}  // namespace

// sample_{bf16,f16}: one token per row.
//
// The logits of a row may be spread over tensor-parallel ranks (the output of an all-gather of
// vocab-parallel slices): logit(row, v) = logits[(v / vocab_per_rank) * num_rows * vocab_per_rank
// + row * vocab_per_rank + v % vocab_per_rank], for v < vocab. Without tensor parallelism pass
// vocab_per_rank = vocab, which is plain [num_rows, vocab].
//
// Per row, with x_v = logit / temperature:
// - temperature <= 0 or top_k == 1: the largest logit, lowest id on ties (greedy);
// - else keep v with x_v >= threshold, where the threshold is the largest of: the k-th largest x
//   (top_k > 0; ties with it are kept too); max x + log(min_p) (min_p > 0: probability at least
//   min_p times the top one); then, over what survives, the largest t whose kept tokens (x >= t)
//   carry at least top_p of the renormalised probability (top_p < 1). The kept token with the
//   largest x_v + Gumbel(seed, v) is returned: an exact draw from softmax(x) restricted to the
//   kept set. Same seed, same logits: same token.
//
// How the thresholds are found, in a few passes over the row whatever the parameters (the
// bisection this replaced took 28 passes per threshold: ~1 ms for top-p at one row of a 128k
// vocabulary on an H100, docs/PERFORMANCE.md run 40): one pass finds the row's largest and
// smallest x; for top-k, one pass counts the tokens in kBins equal bins of x, which gives the
// bin of the k-th value and how many lie above it, and one gathers the tokens of that bin (and
// those above, when they fit) into shared memory, sorted, where the k-th value is read off
// exactly. Top-p does the same with the mass of the tokens still kept, unless top-k's gathered
// tokens already hold all it may keep: the bins' float sums locate the boundary to within a bin,
// the gathered tokens (one bin either side) and the exact integer masses (mass_units) of those
// and of all above decide it. The draw then runs over the gathered tokens where they hold every
// kept one, else over the row. A boundary bin of more than kCandidates tokens is read off
// without sorting when they are all one value (a tie); otherwise that threshold falls back to
// the bisection on the value (ties at the boundary may keep a few more there).
//
// Arguments:
//   out             u32 [num_rows]   written
//   logits          T   see above
//   num_rows        i32
//   vocab_per_rank  i32
//   vocab           i32
//   temperature     f32 [num_rows]
//   top_k           i32 [num_rows]   <= 0: off
//   top_p           f32 [num_rows]   >= 1: off
//   min_p           f32 [num_rows]   <= 0: off
//   seeds           u64 [num_rows]
//   teams           TeamRow [num_rows] where splits > 1 (else unused): zero before the launch,
//                   left zero
// Launch: grid (num_rows, splits, 1), splits <= kMaxSampleSplits and, where splits > 1,
// num_rows * splits at most the SMs (Team); block (kBins / 2 = 1024, 1, 1). Where
// vocab_per_rank is a multiple of 16 / sizeof(T) the logits must be 16-byte aligned (read 16
// bytes at a time).
//
// One block of an SM takes ~10 us for a greedy row of 128k entries, ~55 us with temperature
// alone (it computes each token's noise) and ~100 us for top-p (five passes with their
// histograms; docs/PERFORMANCE.md runs 40 and 42). With splits > 1 the row's blocks share it as
// a Team: each reads every splits-th share of the row, their histograms, gathered tokens and
// draws are combined, and the last block to finish writes the token. Whatever the split, the
// thresholds are the same (Team), and so is the token; a threshold that falls back to the
// bisection is found by every block over the whole row. (The worker's rule for splits:
// worker/src/cuda/kernels/sampling.rs, sample_splits.)
template <typename T>
__device__ void sample_impl(unsigned int* __restrict__ out, const T* __restrict__ logits,
                            int num_rows, int vocab_per_rank, int vocab,
                            const float* __restrict__ temperature, const int* __restrict__ top_k,
                            const float* __restrict__ top_p, const float* __restrict__ min_p,
                            const unsigned long long* __restrict__ seeds,
                            TeamRow* __restrict__ teams) {
    // The histogram (counts, then float masses), later the candidates (values, then ids).
    __shared__ __align__(16) unsigned char scratch[kCandidates * 8];
    unsigned int* counts = reinterpret_cast<unsigned int*>(scratch);
    float* masses = reinterpret_cast<float*>(scratch + kBins * 4);
    float* xs = reinterpret_cast<float*>(scratch);
    int* ids = reinterpret_cast<int*>(scratch + kCandidates * 4);
    tpserve::wait_for_inputs();
    const int row = blockIdx.x;
    Team team = Team::of_row(teams, row);
    auto finish = [&](ArgMax best) { team.finish(best, out + row); };
    const float t = temperature[row];
    const int k = top_k[row];
    const bool greedy = t <= 0.0f || k == 1;
    const float inv_t = greedy ? 1.0f : 1.0f / t;
    const unsigned long long seed = seeds[row];
    const bool use_k = k > 0 && k < vocab;
    const float mp = min_p[row];
    const float p = top_p[row];
    const LogitRow<T> r{logits, row, num_rows, vocab_per_rank, vocab, inv_t};
    // The better of `best` and token v (value x) for a draw over tokens with x >= threshold.
    auto draw = [&](ArgMax best, float threshold, int v, float x) {
        return x >= threshold && x > tpserve::neg_inf() ? draw_step(best, x, seed, v) : best;
    };
    if (greedy || (!use_k && mp <= 0.0f && p >= 1.0f)) {
        // Greedy, or temperature alone (every token kept): one argmax.
        ArgMax best{tpserve::neg_inf(), 0x7fffffff};
        r.each_of(team, [&](int v, float x) {
            best = greedy ? better(best, ArgMax{x, v}) : draw(best, tpserve::neg_inf(), v, x);
        });
        finish(best);
        return;
    }
    // The draw over every finite token of the row with x >= threshold.
    auto draw_all = [&](float threshold) {
        ArgMax best{tpserve::neg_inf(), 0x7fffffff};
        r.each_of(team, [&](int v, float x) { best = draw(best, threshold, v, x); });
        finish(best);
    };
    const float2 range = r.range(team);
    const float x_min = range.x;
    const float x_max = range.y;
    const float min_p_threshold = mp > 0.0f ? x_max + __logf(mp) : tpserve::neg_inf();

    auto gather = [&](int which, float floor, float lo, float inv_width, int first_bin,
                      int last_bin) {
        return gather_bins(r, team, which, floor, lo, inv_width, first_bin, last_bin, x_max, xs,
                           ids);
    };

    // `threshold` is what every later stage keeps at least; `listed`: the sorted candidates hold
    // every finite token with x >= threshold.
    float threshold = tpserve::neg_inf();
    bool listed = false;
    int n = 0;
    bool bisect_k = false;
    if (use_k) {
        const float lo = x_min;
        const float inv_width = x_max > lo ? (float)kBins / (x_max - lo) : 0.0f;
        count_bins(r, team, lo, inv_width, counts);
        // -1: fewer than k finite tokens, all of them kept.
        const int bin = max(0, last_reaching(counts, (unsigned int)k));
        const unsigned int from_bin = counts[bin];
        const unsigned int past_bin = bin + 1 < kBins ? counts[bin + 1] : 0u;
        __syncthreads();  // the counts' bytes become the candidates'
        if (from_bin <= (unsigned int)kCandidates) {
            n = gather(0, tpserve::neg_inf(), lo, inv_width, bin, kBins - 1).n;
            threshold = k <= n ? xs[k - 1] : x_min;
            listed = true;
        } else {
            // The k-th value's bin alone; past_bin < k tokens lie above it.
            const Gathered g = gather(0, tpserve::neg_inf(), lo, inv_width, bin, bin);
            if (g.n <= kCandidates) {
                threshold = xs[k - (int)past_bin - 1];
            } else if (g.low == g.high) {
                threshold = g.low;  // a bin of one value (a tie): the k-th
            } else {
                bisect_k = true;
            }
        }
    }
    auto logit = [&](int v) { return spread_logit(logits, row, num_rows, vocab_per_rank, v); };
    if (bisect_k) {
        // Largest t with at least k values >= t.
        float lo_k = x_min;
        float hi_k = x_max;
        for (int step = 0; step < kBisectionSteps; ++step) {
            const float mid = 0.5f * (lo_k + hi_k);
            float count = 0.0f;
            for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
                count += logit(v) * inv_t >= mid ? 1.0f : 0.0f;
            }
            if (tpserve::block_reduce_sum(count) >= (float)k) {
                lo_k = mid;
            } else {
                hi_k = mid;
            }
        }
        threshold = lo_k;
    }
    threshold = fmaxf(threshold, min_p_threshold);
    if (p < 1.0f && listed) {
        // The candidates at or above the threshold are a prefix of them, and hold all top-p
        // may keep.
        const int kept = count_at_least(xs, n, threshold);
        unsigned long long mine = 0ull;
        for (int i = threadIdx.x; i < kept; i += blockDim.x) {
            mine += mass_units(xs[i], x_max);
        }
        const unsigned long long goal =
            (unsigned long long)((double)p * (double)block_sum(mine));
        const int first = first_reaching(xs, kept, x_max, 0ull, goal);
        if (kept > 0) {
            threshold = fmaxf(threshold, xs[min(first, kept - 1)]);
        }
    } else if (p < 1.0f) {
        // The mass of the tokens kept so far, in bins over [threshold, x_max].
        const float lo = fmaxf(threshold, x_min);
        const float inv_width = x_max > lo ? (float)kBins / (x_max - lo) : 0.0f;
        for (int i = threadIdx.x; i < kBins; i += blockDim.x) {
            counts[i] = 0u;
            masses[i] = 0.0f;
        }
        __syncthreads();
        unsigned long long mine = 0ull;
        r.each_of(team, [&](int, float x) {
            const bool kept = x >= threshold && x > tpserve::neg_inf();
            const float relative = kept ? relative_mass(x, x_max) : 0.0f;
            add_to_bin<true>(kept, bin_of(x, lo, inv_width), relative, counts, masses);
            mine += mass_units_of(relative);
        });
        TeamSlot total = Team::nothing();
        total.a = block_sum(mine);  // its syncs also end the histogram's adds
        total = team.merge_histogram(1, counts, masses, total);
        const unsigned long long goal = (unsigned long long)((double)p * (double)total.a);
        to_sums_from<unsigned int>(counts);
        to_sums_from<float>(masses);
        // The float sums locate the boundary to within a bin: gather one bin either side.
        const int bin = max(0, last_reaching(masses, (float)goal * (1.0f / 4294967296.0f)));
        const int first_bin = max(0, bin - 1);
        const int last_bin = min(kBins - 1, bin + 1);
        const unsigned int from_first = counts[first_bin];
        __syncthreads();  // the histogram's bytes become the candidates'
        bool found = false;
        Gathered g;
        if (from_first <= (unsigned int)kCandidates) {
            g = gather(1, threshold, lo, inv_width, first_bin, kBins - 1);
            listed = true;
        } else {
            g = gather(1, threshold, lo, inv_width, first_bin, last_bin);
        }
        n = g.n;
        // The exact sums must put the boundary inside the gathered bins.
        if (g.above < goal && g.above + g.mass >= goal) {
            if (g.n <= kCandidates) {
                const int first = first_reaching(xs, g.n, x_max, g.above, goal);
                if (first < g.n) {
                    threshold = fmaxf(threshold, xs[first]);
                    found = true;
                }
            } else if (g.low == g.high) {
                threshold = fmaxf(threshold, g.low);  // bins of one value (a tie)
                found = true;
            }
        }
        if (!found) {
            // A boundary bin of nearly equal values, or the float sums off by more than a bin.
            listed = false;
            float mass = 0.0f;
            for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
                const float x = logit(v) * inv_t;
                mass += x >= threshold ? __expf(x - x_max) : 0.0f;
            }
            const float target = p * tpserve::block_reduce_sum(mass);
            // Largest t >= threshold whose kept mass is still at least the target.
            float lo_p = fmaxf(threshold, x_min);
            float hi_p = x_max;
            for (int step = 0; step < kBisectionSteps; ++step) {
                const float mid = 0.5f * (lo_p + hi_p);
                float kept = 0.0f;
                for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
                    const float x = logit(v) * inv_t;
                    kept += x >= mid ? __expf(x - x_max) : 0.0f;
                }
                if (tpserve::block_reduce_sum(kept) >= target) {
                    lo_p = mid;
                } else {
                    hi_p = mid;
                }
            }
            threshold = fmaxf(threshold, lo_p);
        }
    }
    if (listed) {
        ArgMax best{tpserve::neg_inf(), 0x7fffffff};
        // Every block holds the candidates; each draws over its share of them.
        const int stride = team.parts * blockDim.x;
        for (int i = team.part * blockDim.x + threadIdx.x; i < n && xs[i] >= threshold;
             i += stride) {
            best = draw_step(best, xs[i], seed, ids[i]);
        }
        finish(best);
    } else {
        draw_all(threshold);
    }
}

#define TPSERVE_SAMPLE(SUFFIX, T)                                                             \
    extern "C" __global__ void __launch_bounds__(1024, 1) sample_##SUFFIX(                    \
        unsigned int* __restrict__ out, const T* __restrict__ logits, int num_rows,           \
        int vocab_per_rank, int vocab, const float* __restrict__ temperature,                 \
        const int* __restrict__ top_k, const float* __restrict__ top_p,                       \
        const float* __restrict__ min_p, const unsigned long long* __restrict__ seeds,        \
        TeamRow* __restrict__ teams) {                                                        \
        sample_impl<T>(out, logits, num_rows, vocab_per_rank, vocab, temperature, top_k,      \
                       top_p, min_p, seeds, teams);                                           \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_SAMPLE)

// The logit processing of a step whose rows ask for more than a draw (issue 13): penalties,
// `logit_bias`, `min_tokens`, `bad_words` and structured outputs' allowed-token masks change a
// row's logits before the draw, and log probabilities are read from its raw logits. The host
// builds each row's sparse edits from the request's history (worker/src/sampler/processors.rs)
// and uploads them with the masks; these kernels apply them, draw, and gather the log
// probabilities, so the vocabulary never leaves the GPU.
//
// One edit: a vocabulary entry and what happens to its logit, in vLLM's order (ban, bias,
// repetition penalty, then `sub`), as LogitEdit::apply on the host.
struct LogitEdit {
    unsigned int token;
    unsigned int ban;  // nonzero: the logit becomes -inf
    float bias;        // added first
    float repetition;  // 1: none; else x > 0 ? x / r : x * r
    float sub;         // subtracted last
};

namespace {

__device__ __forceinline__ float apply_edit(const LogitEdit& e, float x) {
    if (e.ban != 0u) {
        return tpserve::neg_inf();
    }
    x += e.bias;
    if (e.repetition != 1.0f) {
        x = x > 0.0f ? x / e.repetition : x * e.repetition;
    }
    return x - e.sub;
}

}  // namespace

// process_logits_{bf16,f16}: the edited f32 logits of each row, ready for sample_processed_*.
//
// edited[row, v] = -inf where the row has a mask (mask_index[row] >= 0) whose bit v (bit v % 32
// of word v / 32 of mask mask_index[row]) is clear; else apply(edit) for the row's edit of v, if
// any; else the raw logit. (Edits first and the mask over them, as the host path.)
//
// Arguments:
//   edited        f32 [num_rows, vocab]      written
//   logits        T   laid out as sample_*'s, with row_stride rows per rank slice
//   row_stride    i32                        rows of each rank slice (>= num_rows: a graph's
//                                            padded batch)
//   vocab_per_rank, vocab   i32
//   edit_offsets  i32 [num_rows + 1]         row r's edits are edits[edit_offsets[r] ..
//                                            edit_offsets[r + 1]], at most one per token
//   edits         LogitEdit [edit_offsets[num_rows]]
//   mask_index    i32 [num_rows]             -1: no mask
//   masks         u32 [masks, words]
//   words         i32                        ceil(vocab / 32)
// Launch: grid (num_rows, 1, 1); block (1024, 1, 1).
template <typename T>
__device__ void process_logits_impl(float* __restrict__ edited, const T* __restrict__ logits,
                                    int row_stride, int vocab_per_rank, int vocab,
                                    const int* __restrict__ edit_offsets,
                                    const LogitEdit* __restrict__ edits,
                                    const int* __restrict__ mask_index,
                                    const unsigned int* __restrict__ masks, int words) {
    tpserve::wait_for_inputs();
    const int row = blockIdx.x;
    float* out = edited + (long long)row * vocab;
    const int m = mask_index[row];
    const unsigned int* mask = m >= 0 ? masks + (long long)m * words : nullptr;
    auto allowed = [&](int v) { return mask == nullptr || ((mask[v >> 5] >> (v & 31)) & 1u); };
    for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
        out[v] = allowed(v) ? spread_logit(logits, row, row_stride, vocab_per_rank, v)
                            : tpserve::neg_inf();
    }
    __syncthreads();
    for (int i = edit_offsets[row] + threadIdx.x; i < edit_offsets[row + 1]; i += blockDim.x) {
        const LogitEdit e = edits[i];
        const int v = (int)e.token;
        if (v < vocab && allowed(v)) {
            out[v] = apply_edit(e, spread_logit(logits, row, row_stride, vocab_per_rank, v));
        }
    }
}

// sample_processed_{bf16,f16}: sample_* over process_logits_*'s f32 rows ([num_rows, vocab],
// one rank slice); the arguments and launch are sample_*'s with vocab_per_rank = vocab. The
// dtype suffix only names the model's dtype: every instance reads f32.
//
// token_logprobs_{bf16,f16}: per row, the log probabilities (log_softmax of the raw logits, as
// worker/src/sampler/logprobs.rs computes on the host) of one token and of the row's `top_n`
// most likely tokens (most likely first, lowest id on ties), written as one record of
// kLogprobRecord u32 words:
//   [0] the sampled token (sampled[row]), [1] the scored token (targets[row] >= 0 ? targets[row]
//   : sampled[row]), [2] its log probability (f32 bits), [3] its rank (1 + tokens with a larger
//   logit), [4 + i] the i-th top token, [4 + kMaxTopLogprobs + i] its log probability (f32
//   bits), for i < top_n; a row with top_n < 0 gets [0] only.
//
// Arguments:
//   records    u32 [num_rows, kLogprobRecord]   written
//   logits     T   laid out as process_logits_*'s (row_stride rows per rank slice)
//   row_stride, vocab_per_rank, vocab   i32
//   targets    i32 [num_rows]   -1: the sampled token
//   sampled    u32 [num_rows]   sample_processed_*'s output
//   top_n      i32 [num_rows]   -1: no log probabilities; else 0..=kMaxTopLogprobs
//   teams      TeamRow [num_rows] where splits > 1 (else unused): zero before the launch, left
//              zero
// Launch: grid (num_rows, splits, 1), as sample_*'s (where splits > 1 the row's blocks share it as
// a Team and num_rows * splits must be at most the SMs); block (kBins / 2 = 1024, 1, 1). Where
// vocab_per_rank is a multiple of 16 / sizeof(T) the logits must be 16-byte aligned (read 16
// bytes at a time). Four passes over a row whatever top_n (two for top_n 0), where one a top
// token was taken before (docs/PERFORMANCE.md run 40). The softmax's sum is taken in units of
// 2^-40 of the top token's probability (lse_units): exact in any order, so a record's bits are
// the same at any split (and so in any batch), within 128k x 2^-40 of the true sum.
constexpr int kMaxTopLogprobs = 20;
constexpr int kLogprobRecord = 4 + 2 * kMaxTopLogprobs;

namespace {

// exp(x - x_max) in units of 2^-40 (rounded down): at most 2^40 an entry, so a row's sum fits 64
// bits for vocabularies up to 2^24.
__device__ __forceinline__ unsigned long long lse_units(float x, float x_max) {
    return __float2ull_rz(expf(x - x_max) * 1099511627776.0f);
}

}  // namespace

template <typename T>
__device__ void token_logprobs_impl(unsigned int* __restrict__ records,
                                    const T* __restrict__ logits, int row_stride,
                                    int vocab_per_rank, int vocab, const int* __restrict__ targets,
                                    const unsigned int* __restrict__ sampled,
                                    const int* __restrict__ top_n, TeamRow* __restrict__ teams) {
    // The histogram, later the candidates (values, then ids).
    __shared__ __align__(16) unsigned char scratch[kCandidates * 8];
    tpserve::wait_for_inputs();
    const int row = blockIdx.x;
    Team team = Team::of_row(teams, row);
    // The row's first block writes the record (every block holds the same numbers).
    const bool writer = team.part == 0;
    unsigned int* rec = records + (long long)row * kLogprobRecord;
    const int n = min(top_n[row], kMaxTopLogprobs);
    if (writer && threadIdx.x == 0) {
        rec[0] = sampled[row];
    }
    if (n < 0) {
        return;
    }
    const LogitRow<T> r{logits, row, row_stride, vocab_per_rank, vocab, 1.0f};
    auto logit = [&](int v) { return spread_logit(logits, row, row_stride, vocab_per_rank, v); };
    const int target = targets[row] >= 0 ? targets[row] : (int)sampled[row];
    const float x_target =
        target >= 0 && target < vocab ? logit(target) : tpserve::neg_inf();
    const float2 range = r.range(team);
    const float x_min = range.x;
    const float x_max = range.y;
    unsigned long long units = 0ull;
    unsigned long long above = 0ull;
    r.each_of(team, [&](int, float x) {
        units += lse_units(x, x_max);
        above += x > x_target ? 1ull : 0ull;
    });
    TeamSlot sums = Team::nothing();
    sums.a = block_sum(units);
    sums.b = block_sum(above);
    sums = team.combine(sums);
    const float lse = (float)((double)x_max + log((double)sums.a) - 40.0 * 0.6931471805599453);
    if (writer && threadIdx.x == 0) {
        rec[1] = (unsigned int)target;
        rec[2] = __float_as_uint(x_target - lse);
        rec[3] = 1u + (unsigned int)sums.b;
    }
    if (n == 0) {
        team.leave();
        return;
    }
    // The top tokens: the n-th largest logit's bin and those above, gathered and sorted (two
    // passes, as sample_* finds top-k's threshold).
    unsigned int* counts = reinterpret_cast<unsigned int*>(scratch);
    float* xs = reinterpret_cast<float*>(scratch);
    int* ids = reinterpret_cast<int*>(scratch + kCandidates * 4);
    const float inv_width = x_max > x_min ? (float)kBins / (x_max - x_min) : 0.0f;
    count_bins(r, team, x_min, inv_width, counts);
    const int bin = max(0, last_reaching(counts, (unsigned int)n));
    const unsigned int from_bin = counts[bin];
    __syncthreads();  // the counts' bytes become the candidates'
    if (from_bin <= (unsigned int)kCandidates) {
        const Gathered g = gather_bins(r, team, 0, tpserve::neg_inf(), x_min, inv_width, bin,
                                       kBins - 1, x_max, xs, ids);
        if (g.n >= n) {
            if (writer && (int)threadIdx.x < n) {
                rec[4 + threadIdx.x] = (unsigned int)ids[threadIdx.x];
                rec[4 + kMaxTopLogprobs + threadIdx.x] = __float_as_uint(xs[threadIdx.x] - lse);
            }
            team.leave();
            return;
        }
    }
    // A boundary bin of more than kCandidates tokens (ties), or fewer than n finite logits: one
    // token a pass (every block over the whole row), each pick the best entry strictly after the
    // previous one in the order (logit descending, id ascending).
    ArgMax prev{tpserve::pos_inf(), -1};
    for (int i = 0; i < n && i < vocab; ++i) {
        ArgMax best{tpserve::neg_inf(), 0x7fffffff};
        for (int v = threadIdx.x; v < vocab; v += blockDim.x) {
            const float x = logit(v);
            if (x < prev.value || (x == prev.value && v > prev.index)) {
                best = better(best, ArgMax{x, v});
            }
        }
        prev = block_argmax(best);
        if (writer && threadIdx.x == 0) {
            rec[4 + i] = (unsigned int)prev.index;
            rec[4 + kMaxTopLogprobs + i] = __float_as_uint(prev.value - lse);
        }
    }
    team.leave();
}

#define TPSERVE_LOGIT_EXTRAS(SUFFIX, T)                                                       \
    extern "C" __global__ void process_logits_##SUFFIX(                                       \
        float* __restrict__ edited, const T* __restrict__ logits, int row_stride,             \
        int vocab_per_rank, int vocab, const int* __restrict__ edit_offsets,                  \
        const LogitEdit* __restrict__ edits, const int* __restrict__ mask_index,              \
        const unsigned int* __restrict__ masks, int words) {                                  \
        process_logits_impl<T>(edited, logits, row_stride, vocab_per_rank, vocab,             \
                               edit_offsets, edits, mask_index, masks, words);                \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024, 1) sample_processed_##SUFFIX(          \
        unsigned int* __restrict__ out, const float* __restrict__ logits, int num_rows,       \
        int vocab_per_rank, int vocab, const float* __restrict__ temperature,                 \
        const int* __restrict__ top_k, const float* __restrict__ top_p,                       \
        const float* __restrict__ min_p, const unsigned long long* __restrict__ seeds,        \
        TeamRow* __restrict__ teams) {                                                        \
        sample_impl<float>(out, logits, num_rows, vocab_per_rank, vocab, temperature, top_k,  \
                           top_p, min_p, seeds, teams);                                       \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024, 1) token_logprobs_##SUFFIX(            \
        unsigned int* __restrict__ records, const T* __restrict__ logits, int row_stride,     \
        int vocab_per_rank, int vocab, const int* __restrict__ targets,                       \
        const unsigned int* __restrict__ sampled, const int* __restrict__ top_n,              \
        TeamRow* __restrict__ teams) {                                                        \
        token_logprobs_impl<T>(records, logits, row_stride, vocab_per_rank, vocab, targets,   \
                               sampled, top_n, teams);                                        \
    }
TPSERVE_FOR_EACH_DTYPE(TPSERVE_LOGIT_EXTRAS)
