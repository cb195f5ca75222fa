//! LoRA on the CPU: adapters cut for this tensor-parallel rank and held in slots, and the batched
//! delta `y += scale * (x A^T) B^T` applied per segment of consecutive rows that use the same
//! adapter (the CPU's form of S-LoRA's SGMV), after the base projection. How an adapter is cut
//! for a rank: [`crate::lora::shard`].
//!
//! Each row's delta depends only on that row (plain dot products in a fixed order), so batch
//! invariance holds with adapters too. Cost per targeted projection: `rows * r * (in + out)`
//! multiply-adds, small next to the base product for the ranks served (at most 512).

use std::ops::Range;

use tpserve_modelfile::Projection;

use super::linear::dot;
use crate::batch::Batch;
use crate::error::{Result, WorkerError};
use crate::lora::shard::AdapterShard;

/// The adapters this rank holds, by slot (`SeqSlice::lora_slot`).
#[derive(Debug, Default)]
pub struct LoraSlots {
    slots: Vec<Option<AdapterShard>>,
}

impl LoraSlots {
    /// Puts `adapter` into `slot`, replacing what was there.
    pub fn set(&mut self, slot: usize, adapter: AdapterShard) {
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        self.slots[slot] = Some(adapter);
    }

    /// The segments of `batch`: consecutive rows with the same adapter; rows of the base model
    /// are left out. Fails on a slot that holds no adapter (a runner bug, not a user error).
    pub fn segments(&self, batch: &Batch) -> Result<Segments<'_>> {
        let mut segs: Vec<(Range<usize>, &AdapterShard)> = Vec::new();
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
    segs: Vec<(Range<usize>, &'a AdapterShard)>,
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
