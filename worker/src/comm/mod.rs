//! Collective operations among the ranks of one tensor-parallel group. The CPU backend uses
//! `TcpCommunicator` (one process per rank on one host, or across hosts) or `SingleRank`; the CUDA
//! backend will use NCCL behind the same trait.
//!
//! Every rank calls the same operations in the same order with buffers of the same length;
//! results are deterministic (sums are taken in rank order) so repeated runs agree bit for bit.

pub mod tcp;

pub use tcp::TcpCommunicator;

use crate::error::Result;

/// The collectives the model needs.
pub trait Communicator: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks, in place; every rank ends with the same values.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// Rank 0 receives every rank's buffer (its own first), concatenated in rank order; other
    /// ranks get `None`. Lengths may differ between ranks.
    fn gather_to_root(&mut self, buf: &[f32]) -> Result<Option<Vec<f32>>>;
    /// Rank 0's `buf` is copied to every rank; all ranks pass buffers of the same length.
    fn broadcast_from_root(&mut self, buf: &mut [u32]) -> Result<()>;
}

/// The group of one: every collective is the identity.
#[derive(Debug, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn gather_to_root(&mut self, buf: &[f32]) -> Result<Option<Vec<f32>>> {
        Ok(Some(buf.to_vec()))
    }
    fn broadcast_from_root(&mut self, _buf: &mut [u32]) -> Result<()> {
        Ok(())
    }
}
