//! LoRA on the CPU: adapters cut for this tensor-parallel rank and held in slots, and the batched
//! delta `y += scale * (x A^T) B^T` applied per segment of consecutive rows that use the same
//! adapter (the CPU's form of S-LoRA's SGMV), after the base projection.
//!
//! Sharding follows the base layer: column-parallel projections (q, k, v, gate, up) keep all of
//! `A` and the rows of `B` of this rank's output features; row-parallel ones (o, down) keep the
//! columns of `A` of this rank's input features and all of `B`, so the delta of each rank is a
//! partial sum that the base layer's all-reduce completes (the delta is linear in `x`).
//!
//! Each row's delta depends only on that row (plain dot products in a fixed order), so batch
//! invariance holds with adapters too. Cost per targeted projection: `rows * r * (in + out)`
//! multiply-adds, small next to the base product for the ranks served (at most 512).

use std::ops::Range;

use tpserve_modelfile::{LlamaConfig, LoraAdapter, Projection};

use super::linear::dot;
use crate::batch::Batch;
use crate::error::{Result, WorkerError};
use crate::shard::ShardPlan;

/// One projection's adapter weights on this rank.
#[derive(Debug, Clone)]
struct LoraPair {
    /// `[rank, in_local]`.
    a: Vec<f32>,
    /// `[out_local, rank]`.
    b: Vec<f32>,
    in_local: usize,
    out_local: usize,
    /// Where the projection's outputs start in the fused output row (k after q in `[q|k|v]`).
    out_offset: usize,
}

/// An adapter cut for this rank, per layer and projection.
#[derive(Debug, Clone)]
pub struct CpuAdapter {
    rank: usize,
    scale: f32,
    /// `layers[l][p as usize]`.
    layers: Vec<[Option<LoraPair>; 7]>,
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

impl CpuAdapter {
    /// Cuts `adapter` (checked against `config` when it was read) for the rank `shard` plans.
    pub fn cut(adapter: &LoraAdapter, config: &LlamaConfig, shard: &ShardPlan) -> Result<Self> {
        let r = adapter.rank;
        let mut layers: Vec<[Option<LoraPair>; 7]> = (0..config.num_hidden_layers)
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
                LoraPair {
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
                LoraPair {
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

/// The adapters this rank holds, by slot (`SeqSlice::lora_slot`).
#[derive(Debug, Default)]
pub struct LoraSlots {
    slots: Vec<Option<CpuAdapter>>,
}

impl LoraSlots {
    /// Puts `adapter` into `slot`, replacing what was there.
    pub fn set(&mut self, slot: usize, adapter: CpuAdapter) {
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.slots[slot] = Some(adapter);
    }

    /// The segments of `batch`: consecutive rows with the same adapter; rows of the base model
    /// are left out. Fails on a slot that holds no adapter (a runner bug, not a user error).
    pub fn segments(&self, batch: &Batch) -> Result<Segments<'_>> {
        let mut segs: Vec<(Range<usize>, &CpuAdapter)> = Vec::new();
        for seq in &batch.seqs {
            let Some(slot) = seq.lora_slot else {
                continue;
            };
            let adapter = self
                .slots
                .get(slot)
                .and_then(Option::as_ref)
                .ok_or_else(|| WorkerError::Plan {
                    detail: format!("LoRA slot {slot} holds no adapter"),
                })?;
            match segs.last_mut() {
                Some((rows, last))
                    if rows.end == seq.rows.start && std::ptr::eq(*last, adapter) =>
                {
                    rows.end = seq.rows.end;
                }
                _ => segs.push((seq.rows.clone(), adapter)),
            }
        }
        Ok(Segments { segs })
    }
}

/// One step's adapter segments.
pub struct Segments<'a> {
    segs: Vec<(Range<usize>, &'a CpuAdapter)>,
}

impl Segments<'_> {
    /// Adds the deltas of `projections` of `layer` to `out` (`[rows, out_width]`, the fused base
    /// output of this rank), computed from `x` (`[rows, in_width]`, the base projection's input
    /// on this rank).
    pub fn apply(
        &self,
        layer: usize,
        projections: &[Projection],
        (x, in_width): (&[f32], usize),
        (out, out_width): (&mut [f32], usize),
    ) {
        for (range, adapter) in &self.segs {
            for &p in projections {
                let Some(pair) = &adapter.layers[layer][p as usize] else {
                    continue;
                };
                debug_assert_eq!(pair.in_local, in_width);
                debug_assert!(pair.out_offset + pair.out_local <= out_width);
                let mut t = vec![0.0f32; adapter.rank];
                for row in range.clone() {
                    let xr = &x[row * in_width..(row + 1) * in_width];
                    for (tj, aj) in t.iter_mut().zip(pair.a.chunks_exact(in_width)) {
                        *tj = adapter.scale * dot(xr, aj);
                    }
                    let o = &mut out[row * out_width + pair.out_offset..][..pair.out_local];
                    for (y, bo) in o.iter_mut().zip(pair.b.chunks_exact(adapter.rank)) {
                        *y += dot(&t, bo);
                    }
                }
            }
        }
    }
}
