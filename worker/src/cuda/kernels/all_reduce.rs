//! The one-shot all-reduce over peer memory (all_reduce.cu), alone and fused with the residual
//! add and RMSNorm that follow it.

use cudarc::driver::LaunchConfig;

use super::{launch_err, Kernels, ResidualNorm};
use crate::error::Result;

/// all_reduce.cu's limits: threads per block, blocks, ranks, and the bytes of its signal area.
pub const ALL_REDUCE_THREADS: u32 = 512;
pub const ALL_REDUCE_MAX_BLOCKS: usize = 64;
pub const ALL_REDUCE_MAX_RANKS: usize = 8;
pub const ALL_REDUCE_SIGNAL_BYTES: usize = 8192;

impl Kernels {
    /// The one-shot all-reduce over peer memory (all_reduce.cu): `buf`'s `bytes` bytes summed over
    /// the `world` ranks whose exchange buffers `peers` (a device array of `world` addresses)
    /// holds, in place, in `blocks` blocks (the same on every rank).
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_one_shot(
        &self,
        buf: u64,
        bytes: usize,
        peers: u64,
        slot_bytes: usize,
        rank: usize,
        world: usize,
        blocks: usize,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ALL_REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_vec, cap) = ((bytes / 16) as i32, slot_bytes as i64);
        let (rank, world) = (rank as i32, world as i32);
        let mut b = self.launch(&self.all_reduce_one_shot);
        b.arg(&buf)
            .arg(&peers)
            .arg(&n_vec)
            .arg(&cap)
            .arg(&rank)
            .arg(&world);
        // SAFETY: as all_reduce.cu documents; the caller checked size, alignment and capacity.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("all_reduce_one_shot"))
    }

    /// The one-shot all-reduce of `sub` fused with `rms_norm_residual` (all_reduce.cu):
    /// `x += sum over ranks of sub; out = rmsnorm(x) * weight` for `n` rows, bit-identical to
    /// the two in sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_residual_norm(
        &self,
        norm: &ResidualNorm,
        peers: u64,
        slot_bytes: usize,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (norm.n.min(ALL_REDUCE_MAX_BLOCKS) as u32, 1, 1),
            block_dim: (Self::norm_threads(norm.hidden), 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, rows, cap) = (norm.hidden as i32, norm.n as i32, slot_bytes as i64);
        let (rank, world) = (rank as i32, world as i32);
        let mut b = self.launch(&self.all_reduce_residual_norm);
        b.arg(&norm.out)
            .arg(&norm.x)
            .arg(&norm.sub)
            .arg(&norm.weight)
            .arg(&h)
            .arg(&norm.eps)
            .arg(&rows)
            .arg(&peers)
            .arg(&cap)
            .arg(&rank)
            .arg(&world);
        // SAFETY: as all_reduce.cu documents; the caller checked size, alignment and capacity.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("all_reduce_residual_norm"))
    }
}
