//! The batched multi-LoRA delta (lora.cu): its tile geometry and its launch.

use cudarc::driver::LaunchConfig;

use super::{launch_err, Kernels};
use crate::error::Result;

/// Input elements per split of lora.cu's shrink (`TPSERVE_LORA_SPLIT_LEN`: 256 per warp of its
/// block): a product with `k` inputs runs `ceil(k / LORA_SPLIT_LEN)` splits side by side.
pub const LORA_SPLIT_LEN: usize = 2048;

/// Rows of one LoRA tile (lora.cu's `TPSERVE_LORA_TILE_ROWS`).
pub const LORA_TILE_ROWS: usize = 8;

/// Where a LoRA tile holds its adapter's rank (lora.cu's `TPSERVE_LORA_TILE_RANK`).
pub const LORA_TILE_RANK: usize = 10;

/// The largest LoRA rank the CUDA kernels take: the expand keeps a tile's shrunk rows of the
/// widest product (3 x rank f32 each) in the default 48 KiB of shared memory.
pub const LORA_MAX_RANK: usize = 256;

/// One fused product's LoRA delta (lora.cu): `y[rows, n_out] += (x[rows, k] A^T) B^T`, A and B
/// of each row's slot, over the LoRA tiles at `tiles`.
#[derive(Debug, Clone, Copy)]
pub struct LoraProduct {
    pub y: u64,
    pub x: u64,
    /// Rows of `y` and `x` (the step's, padded for a graph).
    pub rows: usize,
    /// f32 scratch `[splits, rows, groups * stride]`.
    pub t: u64,
    /// `[slots, groups * stride, k]` and `[slots, n_out, stride]`.
    pub a: u64,
    pub b: u64,
    pub tiles: u64,
    pub num_tiles: usize,
    pub k: usize,
    pub n_out: usize,
    /// Projections stacked in the product (3 for q|k|v, 2 for gate|up, else 1).
    pub groups: usize,
    /// The rank stride (a multiple of 8).
    pub stride: usize,
    /// Output columns where the second and third projections start (`n_out` when absent).
    pub bounds: (usize, usize),
}

impl Kernels {
    /// The batched LoRA delta of one fused product (lora.cu): `lora_shrink` into `t`, then
    /// `lora_expand` into `y`, over `num_tiles` LoRA tiles.
    pub fn lora_delta(&self, p: &LoraProduct) -> Result<()> {
        // lora.cu's TPSERVE_LORA_SHRINK_OUTS and _WARPS, and threads and columns per thread of
        // the expand (TPSERVE_LORA_EXPAND_COLS).
        const SHRINK_OUTS: usize = 8;
        const SHRINK_THREADS: u32 = 32 * 8;
        const EXPAND_THREADS: u32 = 256;
        const EXPAND_COLS: usize = 2;
        if p.num_tiles == 0 {
            return Ok(());
        }
        let tiles = p.num_tiles as u32;
        let width = p.groups * p.stride;
        let splits = p.k.div_ceil(LORA_SPLIT_LEN);
        let (k, r, g) = (p.k as i32, p.stride as i32, p.groups as i32);
        let tokens = p.rows as i32;
        let cfg = LaunchConfig {
            grid_dim: (tiles, width.div_ceil(SHRINK_OUTS) as u32, splits as u32),
            block_dim: (SHRINK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.launch(&self.lora_shrink);
        b.arg(&p.t)
            .arg(&p.x)
            .arg(&p.a)
            .arg(&p.tiles)
            .arg(&k)
            .arg(&r)
            .arg(&g)
            .arg(&tokens);
        // SAFETY: as lora.cu documents: `t` holds `splits` x `rows` rows of `groups * stride`
        // f32, `x` `rows` rows of `k` elements, `a` every slot.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("lora_shrink"))?;
        let cfg = LaunchConfig {
            grid_dim: (
                tiles,
                p.n_out.div_ceil(EXPAND_THREADS as usize * EXPAND_COLS) as u32,
                1,
            ),
            block_dim: (EXPAND_THREADS, 1, 1),
            shared_mem_bytes: (LORA_TILE_ROWS * width * 4) as u32,
        };
        let (out, b1, b2) = (p.n_out as i32, p.bounds.0 as i32, p.bounds.1 as i32);
        let splits = splits as i32;
        let mut b = self.launch(&self.lora_expand);
        b.arg(&p.y)
            .arg(&p.t)
            .arg(&p.b)
            .arg(&p.tiles)
            .arg(&out)
            .arg(&r)
            .arg(&g)
            .arg(&b1)
            .arg(&b2)
            .arg(&splits)
            .arg(&tokens);
        // SAFETY: as lora.cu documents: `y` holds `rows` rows of `n_out` elements, `b` every
        // slot's `[n_out, stride]`.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("lora_expand"))
    }
}
