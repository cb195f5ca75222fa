//! An adapter cut for one tensor-parallel rank, whatever the backend: per layer and projection,
//! the part of `A` and `B` this rank multiplies, with the projection's place in the fused output
//! row. Backends copy it into their slots (the CPU keeps it as is; CUDA stacks it into its slot
//! buffers).
//!
//! Sharding follows the base layer: column-parallel projections (q, k, v, gate, up) keep all of
//! `A` and the rows of `B` of this rank's output features; row-parallel ones (o, down) keep the
//! columns of `A` of this rank's input features and all of `B`, so the delta of each rank is a
//! partial sum that the base layer's all-reduce completes (the delta is linear in `x`).

use std::ops::Range;

use tpserve_modelfile::{LlamaConfig, LoraAdapter, Projection};

use crate::error::{Result, WorkerError};
use crate::shard::ShardPlan;

/// One projection's adapter weights on this rank.
#[derive(Debug, Clone)]
pub struct ProjectionShard {
    /// `[rank, in_local]`.
    pub a: Vec<f32>,
    /// `[out_local, rank]`.
    pub b: Vec<f32>,
    pub in_local: usize,
    pub out_local: usize,
    /// Where the projection's outputs start in the fused output row (k after q in `[q|k|v]`).
    pub out_offset: usize,
}

/// An adapter cut for this rank, per layer and projection.
#[derive(Debug, Clone)]
pub struct AdapterShard {
    pub rank: usize,
    pub scale: f32,
    /// `layers[l][p as usize]`.
    pub layers: Vec<[Option<ProjectionShard>; 7]>,
}

/// Rows of `[out_features]` / columns of `[in_features]` a rank keeps of projection `p`, and the
/// offset of `p`'s outputs in the fused output row of this rank (`[q|k|v]`, `[gate|up]`).
fn local_ranges(p: Projection, c: &LlamaConfig, s: &ShardPlan) -> (Range<usize>, usize) {
    let hd = c.head_dim;
    let heads = |r: &Range<usize>| r.start * hd..r.end * hd;
    let q_w = s.q_heads.len() * hd;
    let kv_w = s.kv_heads.len() * hd;
    match p {
        Projection::Q => (heads(&s.q_heads), 0),
        Projection::K => (heads(&s.kv_heads), q_w),
        Projection::V => (heads(&s.kv_heads), q_w + kv_w),
        Projection::Gate => (s.intermediate.clone(), 0),
        Projection::Up => (s.intermediate.clone(), s.intermediate.len()),
        Projection::O => (heads(&s.q_heads), 0),
        Projection::Down => (s.intermediate.clone(), 0),
    }
}

impl AdapterShard {
    /// Cuts `adapter` (checked against `config` when it was read) for the rank `shard` plans.
    pub fn cut(adapter: &LoraAdapter, config: &LlamaConfig, shard: &ShardPlan) -> Result<Self> {
        let r = adapter.rank;
        let mut layers: Vec<[Option<ProjectionShard>; 7]> = (0..config.num_hidden_layers)
            .map(|_| Default::default())
            .collect();
        for m in &adapter.modules {
            let (range, out_offset) = local_ranges(m.projection, config, shard);
            if m.a.len() != r * m.in_features || m.b.len() != m.out_features * r {
                return Err(WorkerError::Plan {
                    detail: format!(
                        "adapter {}: layer {} {} does not have rank {r}",
                        adapter.path.display(),
                        m.layer,
                        m.projection.module_name()
                    ),
                });
            }
            let pair = if m.projection.is_column_parallel() {
                ProjectionShard {
                    a: m.a.clone(),
                    b: m.b[range.start * r..range.end * r].to_vec(),
                    in_local: m.in_features,
                    out_local: range.len(),
                    out_offset,
                }
            } else {
                let mut a = Vec::with_capacity(r * range.len());
                for row in m.a.chunks_exact(m.in_features) {
                    a.extend_from_slice(&row[range.clone()]);
                }
                ProjectionShard {
                    a,
                    b: m.b.clone(),
                    in_local: range.len(),
                    out_local: m.out_features,
                    out_offset,
                }
            };
            let slot = layers.get_mut(m.layer).ok_or_else(|| WorkerError::Plan {
                detail: format!(
                    "adapter {}: layer {} is beyond the model's layers",
                    adapter.path.display(),
                    m.layer
                ),
            })?;
            slot[m.projection as usize] = Some(pair);
        }
        Ok(Self {
            rank: r,
            scale: adapter.scale,
            layers,
        })
    }
}
