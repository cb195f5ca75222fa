//! 4-bit integer weights (W4A16: AWQ and GPTQ checkpoints, issue 12) on the GPU: a
//! `tpserve_modelfile::Int4Tensor` repacked at load into the layout of int4.cu (each lane's
//! 16-byte load is its mma A fragments of 64 inputs of 16 rows, [`mma_layout`]) with an f16
//! scale and zero point per group; the products of up to 8 rows on int4.cu's GEMV, which turns
//! the weights into tensor-core fragments as it streams them, those of 9 to [`GEMM_ROWS`] rows
//! (decoding batches) on int4.cu's GEMM, which does the same for up to 64 rows of x staged in
//! shared memory and gives each row the GEMV's bits, and larger products (prompts) on cuBLAS
//! after int4.cu's dequantization of the whole weight into a scratch buffer in the dtype (vLLM's
//! AWQ path does the same above its threshold).

use cudarc::driver::LaunchConfig;
use tpserve_modelfile::Int4Tensor;

use super::device::{device_err, DeviceBuffer};
use super::kernels::{Kernels, Product};
use crate::error::{Result, WorkerError};

/// A linear layer's 4-bit weight beyond its words (`LinearWeight::data`, u32 in
/// [`mma_layout`]).
pub struct Int4Weight {
    /// u32 `[n_out, k / group_size]`: (scale, zero point) f16 pairs, [`pack_params`].
    pub params: DeviceBuffer,
    pub group_size: usize,
    /// i32 `[k]`, GPTQ's act-order: position `i` of the words holds input `perm[i]`
    /// (`Int4Tensor::perm`).
    pub perm: Option<DeviceBuffer>,
}

/// What a product with a 4-bit weight needs beyond its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4Operands {
    pub params: u64,
    pub group_size: usize,
    /// Room for the weight in the dtype, `[n_out, k]`, for products above [`GEMM_ROWS`] rows;
    /// the 4-bit GEMM's parts' sums (f32 `[k_split, 64, n_out]`, which fit) below.
    pub scratch: u64,
    /// The 4-bit GEMM's counters ([`gemm_counters`] u32, zero between products).
    pub counters: u64,
    /// The weight's act-order permutation (i32 `[k]`), 0 for inputs in order.
    pub perm: u64,
    /// Room for [`GATHERED_ROWS`] rows of inputs in the permutation's order (0 without one).
    pub gathered: u64,
}

/// The most rows a product runs on int4.cu's 4-bit GEMM; more run dequantized on cuBLAS. On an
/// H200, Llama-3-8B's four products at 64 rows take 210 us a layer on the GEMM against ~290 us
/// dequantized (dequantize_w4 alone 176 us), at 128 rows 389-414 us against ~300
/// (tests/gpu/int4_gemv_bench.cu; docs/PERFORMANCE.md, issue 12, session 21).
pub const GEMM_ROWS: usize = 64;

/// Warps of a 4-bit GEMM block (int4.cu's kGemmWarps), each owning 16 rows of the weight.
const GEMM_WARPS: usize = 8;

/// The 4-bit GEMM's counters for weights of up to `elements` elements: one for each column
/// block of `16 GEMM_WARPS` rows of the widest such weight (`k` is at least 64).
pub fn gemm_counters(elements: usize) -> usize {
    elements.div_ceil(TILE.1 * TILE.0 * GEMM_WARPS)
}

/// Rows of inputs an act-order gather holds: a GEMV's, or a chunk of a larger product's (which
/// then runs cuBLAS a chunk at a time).
pub const GATHERED_ROWS: usize = 1024;

/// `t`'s groups' scales and zero points as int4.cu reads them: an f16 pair (the scale in the low
/// half) for row `16 rb + r` of group `j` at `[rb, j, r % 8, r / 8]`, so that a lane's rows `g`
/// and `g + 8` are one 8-byte load.
pub fn pack_params(t: &Int4Tensor) -> Vec<u32> {
    let groups = t.cols / t.group_size;
    let mut out = vec![0u32; t.rows * groups];
    for n in 0..t.rows {
        for j in 0..groups {
            let (s, z) = (t.scales[n * groups + j], t.zeros[n * groups + j]);
            out[((n / 16 * groups + j) * 8 + n % 8) * 2 + n % 16 / 8] =
                u32::from(half::f16::from_f32(s).to_bits())
                    | u32::from(half::f16::from_f32(z).to_bits()) << 16;
        }
    }
    out
}

/// Rows and inputs of one int4.cu tile: a weight's rows must be a multiple of the first and its
/// inputs of the second.
pub const TILE: (usize, usize) = (16, 64);

/// int4.cu's `group_shift` for groups of `group_size` over `k` inputs: log2 of a power of two
/// from 32, or 31 for one group over all inputs; `None` for groups the kernels cannot hold (16
/// inputs, or not a power of two).
pub fn group_shift(group_size: usize, k: usize) -> Option<i32> {
    if group_size == k {
        Some(31)
    } else if group_size >= 32 && group_size.is_power_of_two() {
        Some(group_size.trailing_zeros() as i32)
    } else {
        None
    }
}

/// The first input of step `s` of tile `kt` for lane `4 g + t` (int4.cu's `input_of`): the
/// step's mma inputs `2 t + {0, 1, 8, 9}` are this `+ {0, 1, 2, 3}`; chunks of
/// `steps_per_chunk` steps (4, or 2 for groups of 32 inputs) each lie in one group.
fn input_of(kt: usize, s: usize, t: usize, steps_per_chunk: usize) -> usize {
    64 * kt
        + 16 * steps_per_chunk * (s / steps_per_chunk)
        + 4 * steps_per_chunk * t
        + 4 * (s % steps_per_chunk)
}

/// `t`'s 4-bit values in int4.cu's layout (u32 `[rows / 16, cols / 64, 32, 4]`: lane `4 g + t`'s
/// word `s` holds the A fragment of step `s` of its tile, element `2 p` in value `p`, `2 p + 1` in
/// value `p + 4`, over the inputs [`input_of`] names), or `None` when `t`'s shape or groups do
/// not fit the tiles.
pub fn mma_layout(t: &Int4Tensor) -> Option<Vec<u32>> {
    let shift = group_shift(t.group_size, t.cols)?;
    if !t.rows.is_multiple_of(TILE.0) || !t.cols.is_multiple_of(TILE.1) {
        return None;
    }
    let steps_per_chunk = if shift >= 6 { 4 } else { 2 };
    let per_row = t.cols / 8;
    let q = |n: usize, k: usize| (t.words[n * per_row + k / 8] >> (4 * (k % 8))) & 0xf;
    let k_tiles = t.cols / TILE.1;
    let mut out = vec![0u32; t.rows / 16 * k_tiles * 128];
    // A row block's tiles at a time, on every core (an 8B model has ~10^9 words).
    let block_words = k_tiles * 128;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let blocks_per_thread = (t.rows / 16).div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (chunk_index, chunk) in out.chunks_mut(blocks_per_thread * block_words).enumerate() {
            scope.spawn(move || {
                let first = chunk_index * blocks_per_thread * block_words;
                for (j, word) in chunk.iter_mut().enumerate() {
                    let i = first + j;
                    let (s, lane, tile) = (i % 4, (i / 4) % 32, i / 128);
                    let (rb, kt) = (tile / k_tiles, tile % k_tiles);
                    let (g, tt) = (lane / 4, lane % 4);
                    let base = input_of(kt, s, tt, steps_per_chunk);
                    for e in 0..8 {
                        let n = rb * 16 + g + 8 * ((e / 2) % 2);
                        let k = base + e % 2 + 2 * (e / 4);
                        let value = if e % 2 == 0 { e / 2 } else { e / 2 + 4 };
                        *word |= q(n, k) << (4 * value);
                    }
                }
            });
        }
    });
    Some(out)
}

/// Warps a launch should have in all: about 16 on each SM of an H200 (132) at int4.cu's
/// register use (128, so 16 warps an SM), no more: beyond it the parts' sums and the shorter
/// streams cost more than the extra loads bring. Measured per shape with
/// tests/gpu/int4_gemv_bench.cu (docs/PERFORMANCE.md, issue 12, session 13).
const WARP_BUDGET: usize = 2048;

/// Warps a block of int4.cu's GEMV may have (its kMaxSplit): parts of K, and the gated form's
/// gate and up parts together.
const MAX_SPLIT: usize = 16;

/// int4.cu's GEMV entry points, plain and gated: those that compute a warp's tiles two at a time
/// (two independent mma chains, the same bits) with `TPSERVE_CUDA_W4_PAIRS=1`, else the
/// one-tile-at-a-time forms (the default until a GPU has measured the pairs: docs/PERFORMANCE.md,
/// issue 12, session 51).
pub(super) fn gemv_w4_entry_points() -> [&'static str; 2] {
    if std::env::var("TPSERVE_CUDA_W4_PAIRS").as_deref() == Ok("1") {
        ["gemv_w4_pairs", "gemv_w4_gated_pairs"]
    } else {
        ["gemv_w4", "gemv_w4_gated"]
    }
}

/// Warps that share a row block's inputs in int4.cu's GEMV for `n_out` rows of `k`: the most of
/// 16, 8, 4 and 2 that divides `k`'s tiles, leaves each warp at least 8 of them and keeps the
/// launch within [`WARP_BUDGET`], else 1.
fn k_split(n_out: usize, k: usize) -> usize {
    let (tiles, blocks) = (k / TILE.1, n_out / TILE.0);
    [MAX_SPLIT, 8, 4, 2]
        .into_iter()
        .find(|s| tiles.is_multiple_of(*s) && tiles / s >= 8 && blocks * s <= WARP_BUDGET)
        .unwrap_or(1)
}

/// Whether int4.cu's gated GEMV can run the fused gate and up product `p`: 1 to 8 rows, gate and
/// up halves of whole row blocks, and their warps together within a block.
pub fn gated_gemv_fits(p: &Product) -> bool {
    (1..=8).contains(&p.rows)
        && p.n_out.is_multiple_of(2 * TILE.0)
        && 2 * k_split(p.n_out, p.k) <= MAX_SPLIT
}

/// `p`'s 4-bit operands and its groups' `group_shift`.
fn operands(p: &Product) -> Result<(Int4Operands, i32)> {
    let q = p.int4.ok_or_else(|| WorkerError::Device {
        detail: "a 4-bit product without its weight's groups".into(),
    })?;
    let shift = group_shift(q.group_size, p.k).ok_or_else(|| WorkerError::Device {
        detail: format!("4-bit groups of {} inputs on the GPU kernels", q.group_size),
    })?;
    Ok((q, shift))
}

impl Kernels {
    /// `p.y = p.x W^T` for 1 to 8 rows, `W` `p`'s 4-bit weight: int4.cu's GEMV, after
    /// gathering the inputs into the weight's order where it has an act-order permutation.
    pub fn gemv_w4(&self, p: &Product) -> Result<()> {
        self.launch_gemv_w4(p, false)
    }

    /// `p.y = silu(gate) * up` for 1 to 8 rows of a fused gate and up product `p` with a 4-bit
    /// weight (its first `p.n_out / 2` rows the gate, the rest the up projection; `p.y` holds
    /// `p.n_out / 2` elements a row): the bits of [`Self::gemv_w4`] followed by
    /// [`Self::silu_mul`], in one launch (int4.cu's gemv_w4_gated).
    pub fn gemv_w4_gated(&self, p: &Product) -> Result<()> {
        self.launch_gemv_w4(p, true)
    }

    /// int4.cu's GEMV (`gated`: its gated form) at `p`'s `k_split`.
    fn launch_gemv_w4(&self, p: &Product, gated: bool) -> Result<()> {
        let (q, shift) = operands(p)?;
        let split = k_split(p.n_out, p.k);
        let fits = match gated {
            false => (1..=8).contains(&p.rows),
            true => gated_gemv_fits(p),
        };
        if !fits {
            let kernel = match gated {
                false => "the 4-bit GEMV kernel (1 to 8 rows)",
                true => "the 4-bit GEMV's gated form (1 to 8 rows, halves of whole row blocks)",
            };
            return Err(WorkerError::Unsupported {
                detail: format!("{} rows of {} outputs on {kernel}", p.rows, p.n_out),
            });
        }
        let x = self.inputs_in_weight_order(&q, p)?;
        let (outputs, function, name) = match gated {
            false => (p.n_out, &self.gemv_w4, "gemv_w4"),
            true => (p.n_out / 2, &self.gemv_w4_gated, "gemv_w4_gated"),
        };
        let (rw, nw, kw, sw) = (p.rows as i32, outputs as i32, p.k as i32, split as i32);
        let mut b = self.launch(function);
        b.arg(&p.y)
            .arg(&x)
            .arg(&p.w)
            .arg(&q.params)
            .arg(&rw)
            .arg(&nw)
            .arg(&kw)
            .arg(&shift)
            .arg(&sw);
        let warps = if gated { 2 * split } else { split };
        // SAFETY: as int4.cu documents: y holds rows x n_out (gated: n_out / 2) and x rows x k
        // elements of the dtype (x 16-byte aligned, as every activation buffer), w the weight in
        // [`mma_layout`] and params n_out x k / group_size, the caller's buffers; n_out, k and
        // the groups fit the tiles (the loader's checks, `group_shift`, and the gated halves'
        // whole row blocks above) and k_split divides k's tiles.
        unsafe {
            b.launch(super::kernels::grid_rows(
                outputs / TILE.0,
                32 * warps as u32,
            ))
        }
        .map(drop)
        .map_err(|e| device_err(&format!("launching {name}"), e))
    }

    /// `p.y = p.x W^T` for 9 to [`GEMM_ROWS`] rows: int4.cu's 4-bit GEMM at the GEMV's
    /// `k_split`, so each row's result is the GEMV's bits, after gathering the inputs where the
    /// weight has an act-order permutation.
    pub fn gemm_w4(&self, p: &Product) -> Result<()> {
        let (q, shift) = operands(p)?;
        if !(1..=GEMM_ROWS).contains(&p.rows) || q.counters == 0 || q.scratch == 0 {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "{} rows on the 4-bit GEMM kernel (1 to {GEMM_ROWS}, with its buffers)",
                    p.rows
                ),
            });
        }
        let x = self.inputs_in_weight_order(&q, p)?;
        let split = k_split(p.n_out, p.k);
        let variant = match p.rows {
            ..=16 => 0,
            17..=32 => 1,
            _ => 2,
        };
        let (rw, nw, kw, sw) = (p.rows as i32, p.n_out as i32, p.k as i32, split as i32);
        let mut b = self.launch(&self.gemm_w4[variant]);
        b.arg(&p.y)
            .arg(&x)
            .arg(&p.w)
            .arg(&q.params)
            .arg(&q.scratch)
            .arg(&q.counters)
            .arg(&rw)
            .arg(&nw)
            .arg(&kw)
            .arg(&shift)
            .arg(&sw);
        let config = LaunchConfig {
            grid_dim: (
                (p.n_out / TILE.0).div_ceil(GEMM_WARPS) as u32,
                split as u32,
                1,
            ),
            block_dim: (32 * GEMM_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as int4.cu documents: y holds rows x n_out and x rows x k elements of the
        // dtype, w and params the weight's; the scratch holds the largest 4-bit weight in the
        // dtype, n_out x k x 2 bytes, at least the k_split x 64 x n_out f32 partial sums
        // (k_split <= k / 512); the counters cover this weight's column blocks (one chunk: rows
        // <= 64) and are zero, as every launch leaves them.
        unsafe { b.launch(config) }
            .map(drop)
            .map_err(|e| device_err("launching gemm_w4", e))
    }

    /// The address of `p`'s inputs in the order of its weight's inputs: `p.x`, or for an
    /// act-order weight its rows gathered into that order (at most [`GATHERED_ROWS`]).
    fn inputs_in_weight_order(&self, q: &Int4Operands, p: &Product) -> Result<u64> {
        if q.perm != 0 {
            self.gather_inputs(q, p.x, p.rows, p.k)
        } else {
            Ok(p.x)
        }
    }

    /// `rows` (at most [`GATHERED_ROWS`]) rows of `k` inputs from `x` in the order of `q`'s
    /// act-order weight (`gathered[m, i] = x[m, perm[i]]`): the address of the gathered rows.
    pub fn gather_inputs(&self, q: &Int4Operands, x: u64, rows: usize, k: usize) -> Result<u64> {
        if rows > GATHERED_ROWS || q.gathered == 0 {
            return Err(WorkerError::Device {
                detail: format!("an act-order gather of {rows} rows without room for them"),
            });
        }
        let kw = k as i32;
        let mut b = self.launch(&self.gather_inputs);
        b.arg(&q.gathered).arg(&x).arg(&q.perm).arg(&kw);
        let config = LaunchConfig {
            grid_dim: (k.div_ceil(256) as u32, rows as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as int4.cu documents: x holds rows x k elements of the dtype, `gathered`
        // GATHERED_ROWS x k (the model's buffer for its widest act-order weight), perm k i32 (the
        // weight's permutation of 0..k).
        unsafe { b.launch(config) }.map_err(|e| device_err("launching gather_inputs", e))?;
        Ok(q.gathered)
    }

    /// `p`'s 4-bit weight in the dtype, into its operands' scratch (`[n_out, k]`), its inputs in
    /// the layout's order (an act-order weight's sorted by group).
    pub fn dequantize_w4(&self, p: &Product) -> Result<()> {
        let (q, shift) = operands(p)?;
        let words = p.n_out * p.k / 8;
        let blocks = words.div_ceil(256).clamp(1, 132 * 8);
        let (nw, kw) = (p.n_out as i32, p.k as i32);
        let mut b = self.launch(&self.dequantize_w4);
        b.arg(&q.scratch)
            .arg(&p.w)
            .arg(&q.params)
            .arg(&nw)
            .arg(&kw)
            .arg(&shift);
        let config = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as int4.cu documents; the scratch holds the largest 4-bit weight in the dtype,
        // and the weight fits the tiles.
        unsafe { b.launch(config) }
            .map(drop)
            .map_err(|e| device_err("launching dequantize_w4", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The (row, input) of A element `e` of lane `4 g + t` at step `s` of tile `kt`, derived from
    /// the B side: lane `t` loads x at `64 kt + 4 S t` and `second` inputs on (8 each), and step
    /// `s` multiplies words `2 s` (mma inputs `2 t`, `2 t + 1`) and `2 s + 1` (`2 t + 8`, `+ 9`)
    /// of those 16 inputs.
    fn element(kt: usize, g: usize, t: usize, s: usize, e: usize, spc: usize) -> (usize, usize) {
        let second = if spc == 4 { 8 } else { 32 };
        let x: Vec<usize> = (0..16)
            .map(|j| 64 * kt + 4 * spc * t + if j < 8 { j } else { second + j - 8 })
            .collect();
        (g + 8 * ((e / 2) % 2), x[4 * s + e % 2 + 2 * (e / 4)])
    }

    fn tensor(rows: usize, cols: usize, group_size: usize) -> Int4Tensor {
        let value = |n: usize, k: usize| ((n * 7 + k * 3 + k / 5) % 16) as u32;
        let mut words = vec![0u32; rows * cols / 8];
        for n in 0..rows {
            for k in 0..cols {
                words[n * cols / 8 + k / 8] |= value(n, k) << (4 * (k % 8));
            }
        }
        let groups = rows * cols / group_size;
        Int4Tensor {
            rows,
            cols,
            group_size,
            words,
            scales: (0..groups).map(|i| i as f32 / 64.0).collect(),
            zeros: (0..groups).map(|i| (i % 16) as f32).collect(),
            perm: None,
        }
    }

    #[test]
    fn each_lane_word_is_its_mma_fragment_over_its_x_loads() {
        let (rows, cols) = (32, 128);
        for (group_size, spc) in [(64, 4), (128, 4), (32, 2)] {
            let t = tensor(rows, cols, group_size);
            let packed = mma_layout(&t).unwrap();
            assert_eq!(packed.len(), rows * cols / 8);
            let mut seen = vec![0u8; rows * cols];
            for rb in 0..rows / 16 {
                for kt in 0..cols / 64 {
                    for lane in 0..32 {
                        let (g, tt) = (lane / 4, lane % 4);
                        for s in 0..4 {
                            let w = packed[((rb * (cols / 64) + kt) * 32 + lane) * 4 + s];
                            let mut group = None;
                            for e in 0..8 {
                                let (r, c) = element(kt, g, tt, s, e, spc);
                                // Value p holds element 2 p, value p + 4 element 2 p + 1.
                                let v = if e % 2 == 0 { e / 2 } else { e / 2 + 4 };
                                let want = (t.words[(16 * rb + r) * cols / 8 + c / 8]
                                    >> (4 * (c % 8)))
                                    & 0xf;
                                assert_eq!((w >> (4 * v)) & 0xf, want, "g{group_size} s{s} e{e}");
                                seen[(16 * rb + r) * cols + c] += 1;
                                // A step's inputs lie in one group.
                                assert_eq!(*group.get_or_insert(c / group_size), c / group_size);
                            }
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "every element once");
        }
        // Groups of 16 inputs, groups not a power of two, and shapes off the tiles do not fit.
        assert!(mma_layout(&tensor(32, 128, 16)).is_none());
        assert!(mma_layout(&tensor(32, 192, 96)).is_none());
        assert!(mma_layout(&tensor(24, 128, 64)).is_none());
        // One group over all inputs, whatever its size.
        assert!(mma_layout(&tensor(16, 192, 192)).is_some());
        assert_eq!(group_shift(192, 192), Some(31));
        assert_eq!(group_shift(128, 4096), Some(7));
        // Llama-3-8B's o, qkv, down and gate_up (as tests/gpu/int4_gemv_bench.cu measured
        // best); the GPU test model's down; short inputs.
        assert_eq!(k_split(4096, 4096), 8);
        assert_eq!(k_split(6144, 4096), 4);
        assert_eq!(k_split(4096, 14336), 8);
        assert_eq!(k_split(28672, 4096), 1);
        assert_eq!(k_split(1024, 2816), 4);
        assert_eq!(k_split(1024, 1024), 2);
        assert_eq!(k_split(1024, 128), 1);
        // The 4-bit GEMM's parts' sums fit the dequantization scratch of the weight
        // (k_split x 64 rows x n_out f32 against n_out x k elements), and its counters cover the
        // weight's column blocks.
        for (n_out, k) in [
            (4096, 4096),
            (6144, 4096),
            (4096, 14336),
            (28672, 4096),
            (1024, 128),
        ] {
            assert!(k_split(n_out, k) * GEMM_ROWS * n_out * 4 <= n_out * k * 2);
            assert!(gemm_counters(n_out * k) >= (n_out / TILE.0).div_ceil(GEMM_WARPS));
        }
    }

    #[test]
    fn params_are_f16_pairs_scale_low_rows_g_and_g_plus_8_adjacent() {
        let t = tensor(32, 128, 64);
        let p = pack_params(&t);
        assert_eq!(p.len(), 32 * 2);
        let at = |n: usize, j: usize| p[((n / 16 * 2 + j) * 8 + n % 8) * 2 + n % 16 / 8];
        for n in 0..32 {
            for j in 0..2 {
                let (s, z) = (t.scales[n * 2 + j], t.zeros[n * 2 + j]);
                assert_eq!(
                    at(n, j) & 0xffff,
                    u32::from(half::f16::from_f32(s).to_bits())
                );
                assert_eq!(at(n, j) >> 16, u32::from(half::f16::from_f32(z).to_bits()));
            }
        }
        // Rows 3 and 11 of group 1 in row block 1: one 8-byte word.
        assert_eq!(at(16 + 3, 1), p[((2 + 1) * 8 + 3) * 2]);
        assert_eq!(at(16 + 11, 1), p[((2 + 1) * 8 + 3) * 2 + 1]);
    }
}
