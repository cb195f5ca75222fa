//! 4-bit integer weights (W4A16: AWQ and GPTQ checkpoints, issue 12) on the GPU: a
//! `tpserve_modelfile::Int4Tensor` repacked at load into the layout of int4.cu (each lane's
//! 16-byte load is its mma A fragments of 64 inputs of 16 rows, [`mma_layout`]) with an f16
//! scale and zero point per group; the products of up to 8 rows on int4.cu's GEMV, which turns
//! the weights into tensor-core fragments as it streams them, and larger products on cuBLAS
//! after int4.cu's dequantization of the whole weight into a scratch buffer in the dtype (vLLM's
//! AWQ path does the same above its threshold; a fused GEMM, Marlin's, is the step after).

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
}

/// What a product with a 4-bit weight needs beyond its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4Operands {
    pub params: u64,
    pub group_size: usize,
    /// Room for the weight in the dtype, `[n_out, k]`, for products above 8 rows.
    pub scratch: u64,
}

/// Packs each group's scale and zero point as int4.cu reads them: an f16 pair, the scale in the
/// low half.
pub fn pack_params(scales: &[f32], zeros: &[f32]) -> Vec<u32> {
    scales
        .iter()
        .zip(zeros)
        .map(|(s, z)| {
            u32::from(half::f16::from_f32(*s).to_bits())
                | u32::from(half::f16::from_f32(*z).to_bits()) << 16
        })
        .collect()
}

/// Rows and inputs of one int4.cu tile: a weight's rows must be a multiple of the first and its
/// inputs of the second (and its groups of 16 inputs).
pub const TILE: (usize, usize) = (16, 64);

/// `t`'s 4-bit values in int4.cu's layout (u32 `[rows / 16, cols / 64, 32, 4]`: lane `4 g + t`'s
/// word `s` holds the A fragment of step `s` of its tile, element `2 p` in value `p`, `2 p + 1` in
/// value `p + 4`), or `None` when `t`'s shape or groups do not fit the tiles.
pub fn mma_layout(t: &Int4Tensor) -> Option<Vec<u32>> {
    if !t.rows.is_multiple_of(TILE.0)
        || !t.cols.is_multiple_of(TILE.1)
        || !t.group_size.is_multiple_of(16)
    {
        return None;
    }
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
                    for e in 0..8 {
                        let n = rb * 16 + g + 8 * ((e / 2) % 2);
                        let k = kt * 64 + 16 * s + 2 * tt + e % 2 + 8 * (e / 4);
                        let value = if e % 2 == 0 { e / 2 } else { e / 2 + 4 };
                        *word |= q(n, k) << (4 * value);
                    }
                }
            });
        }
    });
    Some(out)
}

/// Warps a launch should have in all: enough to keep every SM's loads in flight (about 16 warps
/// on each of an H200's 132 SMs, at int4.cu's register use), no more: beyond it the parts' sums
/// cost more than the extra loads bring.
const WARP_BUDGET: usize = 4096;

/// Warps that share a row block's inputs in int4.cu's GEMV for `n_out` rows of `k`: the most of
/// 16, 8, 4 and 2 that divides `k`'s tiles, leaves each warp at least 8 of them (two rounds of
/// loads) and keeps the launch within [`WARP_BUDGET`], else 1.
fn k_split(n_out: usize, k: usize) -> usize {
    let (tiles, blocks) = (k / TILE.1, n_out / TILE.0);
    [16, 8, 4, 2]
        .into_iter()
        .find(|s| tiles.is_multiple_of(*s) && tiles / s >= 8 && blocks * s <= WARP_BUDGET)
        .unwrap_or(1)
}

fn operands(p: &Product) -> Result<Int4Operands> {
    p.int4.ok_or_else(|| WorkerError::Device {
        detail: "a 4-bit product without its weight's groups".into(),
    })
}

impl Kernels {
    /// `p.y = p.x W^T` for 1 to 8 rows, `W` `p`'s 4-bit weight: int4.cu's GEMV.
    pub fn gemv_w4(&self, p: &Product) -> Result<()> {
        let q = operands(p)?;
        if !(1..=8).contains(&p.rows) {
            return Err(WorkerError::Unsupported {
                detail: format!("{} rows on the 4-bit GEMV kernel (1 to 8)", p.rows),
            });
        }
        let split = k_split(p.n_out, p.k);
        let (rw, nw, kw, gw, sw) = (
            p.rows as i32,
            p.n_out as i32,
            p.k as i32,
            q.group_size as i32,
            split as i32,
        );
        let mut b = self.launch(&self.gemv_w4);
        b.arg(&p.y)
            .arg(&p.x)
            .arg(&p.w)
            .arg(&q.params)
            .arg(&rw)
            .arg(&nw)
            .arg(&kw)
            .arg(&gw)
            .arg(&sw);
        let blocks = p.n_out / TILE.0;
        // SAFETY: as int4.cu documents: y holds rows x n_out and x rows x k elements of the
        // dtype, w the weight in [`mma_layout`] and params n_out x k / group_size, the caller's
        // buffers; n_out, k and group_size fit the tiles (the loader's checks) and k_split
        // divides k's tiles.
        unsafe { b.launch(super::kernels::grid_rows(blocks, 32 * split as u32)) }
            .map(drop)
            .map_err(|e| device_err("launching gemv_w4", e))
    }

    /// `p`'s 4-bit weight in the dtype, into its operands' scratch (`[n_out, k]`).
    pub fn dequantize_w4(&self, p: &Product) -> Result<()> {
        let q = operands(p)?;
        let words = p.n_out * p.k / 8;
        let blocks = words.div_ceil(256).clamp(1, 132 * 8);
        let (nw, kw, gw) = (p.n_out as i32, p.k as i32, q.group_size as i32);
        let mut b = self.launch(&self.dequantize_w4);
        b.arg(&q.scratch)
            .arg(&p.w)
            .arg(&q.params)
            .arg(&nw)
            .arg(&kw)
            .arg(&gw);
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

    /// What lane `4 g + t` of an m16n8k16 mma holds as A elements 0..8 of a 16 x 16 tile.
    fn fragment(g: usize, t: usize) -> [(usize, usize); 8] {
        std::array::from_fn(|e| (g + 8 * ((e / 2) % 2), 2 * t + e % 2 + 8 * (e / 4)))
    }

    #[test]
    fn each_lane_word_is_its_mma_fragment_of_one_step() {
        let (rows, cols) = (32, 128);
        let value = |n: usize, k: usize| ((n * 7 + k * 3) % 16) as u32;
        let mut words = vec![0u32; rows * cols / 8];
        for n in 0..rows {
            for k in 0..cols {
                words[n * cols / 8 + k / 8] |= value(n, k) << (4 * (k % 8));
            }
        }
        let t = Int4Tensor {
            rows,
            cols,
            group_size: 64,
            words,
            scales: vec![1.0; rows * 2],
            zeros: vec![0.0; rows * 2],
        };
        let packed = mma_layout(&t).unwrap();
        assert_eq!(packed.len(), rows * cols / 8);
        for rb in 0..rows / 16 {
            for kt in 0..cols / 64 {
                for lane in 0..32 {
                    for s in 0..4 {
                        let w = packed[((rb * (cols / 64) + kt) * 32 + lane) * 4 + s];
                        for (e, (r, c)) in fragment(lane / 4, lane % 4).into_iter().enumerate() {
                            // Value p holds element 2 p, value p + 4 element 2 p + 1.
                            let v = if e % 2 == 0 { e / 2 } else { e / 2 + 4 };
                            let got = (w >> (4 * v)) & 0xf;
                            assert_eq!(got, value(16 * rb + r, 64 * kt + 16 * s + c));
                        }
                    }
                }
            }
        }
        // Llama-3-8B's o, qkv, down and gate_up; the GPU test model's down; short inputs.
        assert_eq!(k_split(4096, 4096), 8);
        assert_eq!(k_split(6144, 4096), 8);
        assert_eq!(k_split(4096, 14336), 16);
        assert_eq!(k_split(28672, 4096), 2);
        assert_eq!(k_split(1024, 2816), 4);
        assert_eq!(k_split(1024, 1024), 2);
        assert_eq!(k_split(1024, 128), 1);
        let odd = Int4Tensor { rows: 24, ..t };
        assert!(mma_layout(&odd).is_none());
    }

    #[test]
    fn params_are_f16_pairs_scale_low() {
        let p = pack_params(&[0.5, 0.25], &[8.0, 1.0]);
        assert_eq!(p[0] & 0xffff, u32::from(half::f16::from_f32(0.5).to_bits()));
        assert_eq!(p[0] >> 16, u32::from(half::f16::from_f32(8.0).to_bits()));
        assert_eq!(p[1] >> 16, u32::from(half::f16::ONE.to_bits()));
    }
}
