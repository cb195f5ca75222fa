//! LoRA on CUDA: `--max-loras` adapter slots stacked per layer and fused product (q|k|v, o,
//! gate|up, down) in GPU memory, and the batched delta `y += (x A^T) (scale B)^T` of a step's
//! rows, each with its own slot, as one shrink and one expand kernel per product (lora.cu) over
//! LoRA tiles: up to [`LORA_TILE_ROWS`] rows of one adapter wherever they are in the batch (a
//! prefill chunk's rows, or the decode rows of the sequences that use it), so each tile reads its
//! adapter's weights once (S-LoRA's SGMV and Punica's BGMV in one form). The shrink splits the
//! input dimension into `LORA_SPLIT_LEN` ranges computed side by side (decode steps have few
//! tiles), the expand sums the ranges in order.
//!
//! Layout per layer and product, for G stacked projections and the rank stride R (the largest
//! rank served, rounded up to 8): A `[slots, G * R, in]` (rank r of projection g in row
//! `g * R + r`), B `[slots, out, R]` (output column j's B row, already multiplied by the
//! adapter's scale); zero past a slot's rank and for projections the adapter does not target,
//! so the kernels need no per-projection bookkeeping. The slots are allocated when the model is
//! loaded, so the memory profile counts them before the KV cache is sized.
//!
//! Costs: a slot load copies the whole slot (`slot_bytes`), zeros included; a step with LoRA
//! rows launches 8 more kernels per layer, a step without none (its CUDA graph has no LoRA
//! nodes).

use super::device::{DeviceBuffer, Gpu};
use super::kernels::{
    Dtype, LoraProduct, ELEM, LORA_MAX_RANK, LORA_SPLIT_LEN, LORA_TILE_RANK, LORA_TILE_ROWS,
};
use super::model::Dims;
use crate::batch::Batch;
use crate::error::{Result, WorkerError};
use crate::lora::shard::AdapterShard;
use tpserve_modelfile::Projection;

/// One LoRA tile as lora.cu reads it: `{slot, rows, row_0, .., row_7, rank, 0 ..}`.
pub type LoraTile = [i32; 16];

/// A fused product of a layer that adapters may target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedProduct {
    Qkv,
    O,
    GateUp,
    Down,
}

impl FusedProduct {
    const ALL: [FusedProduct; 4] = [Self::Qkv, Self::O, Self::GateUp, Self::Down];

    /// The projections stacked in it, in output order.
    fn projections(self) -> &'static [Projection] {
        match self {
            Self::Qkv => &[Projection::Q, Projection::K, Projection::V],
            Self::O => &[Projection::O],
            Self::GateUp => &[Projection::Gate, Projection::Up],
            Self::Down => &[Projection::Down],
        }
    }

    /// `(in, out, bounds)` on this rank: input and output widths, and where the second and third
    /// projections' outputs start (`out` when there are none).
    fn shape(self, d: &Dims) -> (usize, usize, (usize, usize)) {
        let q_w = d.q_heads * d.head_dim;
        let kv_w = d.kv_heads * d.head_dim;
        match self {
            Self::Qkv => (d.hidden, d.qkv, (q_w, q_w + kv_w)),
            Self::O => (q_w, d.hidden, (d.hidden, d.hidden)),
            Self::GateUp => (d.hidden, 2 * d.inter, (d.inter, 2 * d.inter)),
            Self::Down => (d.inter, d.hidden, (d.hidden, d.hidden)),
        }
    }

    /// Elements of one slot's A and B.
    fn slot_elements(self, d: &Dims, stride: usize) -> (usize, usize) {
        let (k, out, _) = self.shape(d);
        (self.projections().len() * stride * k, out * stride)
    }
}

/// One product's A and B over every slot.
struct ProductSlots {
    a: DeviceBuffer,
    b: DeviceBuffer,
}

/// The adapter slots of this rank.
pub struct LoraSlots {
    slots: usize,
    stride: usize,
    dims: Dims,
    dtype: Dtype,
    /// `[layer][FusedProduct as usize]`.
    layers: Vec<[ProductSlots; 4]>,
    /// Each slot's rank (0 while empty), which the step's LoRA tiles carry.
    ranks: Vec<i32>,
}

impl LoraSlots {
    /// The rank stride for `max_rank`.
    fn stride_for(max_rank: usize) -> usize {
        max_rank.max(1).next_multiple_of(8)
    }

    /// Bytes of `slots` slots of rank up to `max_rank` for a model of `layers` layers.
    pub fn bytes_for(d: &Dims, layers: usize, slots: usize, max_rank: usize) -> usize {
        let stride = Self::stride_for(max_rank);
        let per_layer: usize = FusedProduct::ALL
            .iter()
            .map(|p| {
                let (a, b) = p.slot_elements(d, stride);
                a + b
            })
            .sum();
        layers * slots * per_layer * ELEM
    }

    /// Empty (zeroed) slots.
    pub fn new(
        gpu: &Gpu,
        dims: &Dims,
        layers: usize,
        slots: usize,
        max_rank: usize,
        dtype: Dtype,
    ) -> Result<Self> {
        if max_rank > LORA_MAX_RANK {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "--max-lora-rank {max_rank} on CUDA: the LoRA kernels take ranks up to \
                     {LORA_MAX_RANK}"
                ),
            });
        }
        // The expand writes output columns in pairs that never straddle a projection.
        if let Some(p) = FusedProduct::ALL.iter().find(|p| {
            let (_, out, (b1, b2)) = p.shape(dims);
            out % 2 != 0 || b1 % 2 != 0 || b2 % 2 != 0
        }) {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "LoRA on CUDA needs even output widths on each rank; {:?} has {:?}",
                    p,
                    p.shape(dims)
                ),
            });
        }
        let stride = Self::stride_for(max_rank);
        let mut all = Vec::with_capacity(layers);
        for _ in 0..layers {
            let product = |p: FusedProduct| -> Result<ProductSlots> {
                let (a, b) = p.slot_elements(dims, stride);
                Ok(ProductSlots {
                    a: gpu.alloc(slots * a * ELEM, "LoRA slots")?,
                    b: gpu.alloc(slots * b * ELEM, "LoRA slots")?,
                })
            };
            all.push([
                product(FusedProduct::Qkv)?,
                product(FusedProduct::O)?,
                product(FusedProduct::GateUp)?,
                product(FusedProduct::Down)?,
            ]);
        }
        Ok(Self {
            slots,
            stride,
            dims: *dims,
            dtype,
            layers: all,
            ranks: vec![0; slots],
        })
    }

    /// The most LoRA tiles a step of `rows` rows can have: each adapter's rows cut into tiles
    /// of [`LORA_TILE_ROWS`], at most one partial tile per slot.
    pub fn max_tiles(&self, rows: usize) -> usize {
        rows.min(rows.div_ceil(LORA_TILE_ROWS) + self.slots)
    }

    /// f32 columns of the shrink's scratch per row: the widest product's `G * R`, once per
    /// split of the longest input.
    pub fn scratch_width(&self) -> usize {
        let d = &self.dims;
        let longest = d.hidden.max(d.inter).max(d.q_heads * d.head_dim);
        longest.div_ceil(LORA_SPLIT_LEN) * 3 * self.stride
    }

    /// Copies `adapter` (cut for this rank) into `slot`, replacing what was there.
    pub fn load(&mut self, gpu: &Gpu, slot: usize, adapter: &AdapterShard) -> Result<()> {
        let bad = |detail: String| WorkerError::Plan { detail };
        if slot >= self.slots {
            return Err(bad(format!("LoRA slot {slot} of {}", self.slots)));
        }
        let r = self.stride;
        if adapter.rank > r || adapter.layers.len() != self.layers.len() {
            return Err(bad(format!(
                "an adapter of rank {} and {} layers does not fit slots of rank {r} and {} layers",
                adapter.rank,
                adapter.layers.len(),
                self.layers.len()
            )));
        }
        for (layer, products) in adapter.layers.iter().zip(&self.layers) {
            for (fused, buffers) in FusedProduct::ALL.iter().zip(products) {
                let (k, out, _) = fused.shape(&self.dims);
                let (a_len, b_len) = fused.slot_elements(&self.dims, r);
                let mut a = vec![0u16; a_len];
                let mut b = vec![0u16; b_len];
                for (g, &p) in fused.projections().iter().enumerate() {
                    let Some(pair) = &layer[p as usize] else {
                        continue;
                    };
                    if pair.in_local != k || pair.out_offset + pair.out_local > out {
                        return Err(bad(format!(
                            "LoRA {} is [{}, {}] at {} where the product is [{out}, {k}]",
                            p.module_name(),
                            pair.out_local,
                            pair.in_local,
                            pair.out_offset
                        )));
                    }
                    for (rank_row, row) in pair.a.chunks_exact(k).enumerate() {
                        let at = (g * r + rank_row) * k;
                        for (dst, v) in a[at..at + k].iter_mut().zip(row) {
                            *dst = self.dtype.from_f32(*v);
                        }
                    }
                    for (j, row) in pair.b.chunks_exact(adapter.rank).enumerate() {
                        let at = (pair.out_offset + j) * r;
                        for (dst, v) in b[at..at + adapter.rank].iter_mut().zip(row) {
                            *dst = self.dtype.from_f32(v * adapter.scale);
                        }
                    }
                }
                gpu.upload_at(&buffers.a, slot * a_len * ELEM, &a)?;
                gpu.upload_at(&buffers.b, slot * b_len * ELEM, &b)?;
                // `a` and `b` are freed at the end of this iteration: wait for the copies.
                gpu.sync()?;
            }
        }
        self.ranks[slot] = adapter.rank as i32;
        Ok(())
    }

    /// Each slot's rank (0 while empty), for [`lora_tiles`].
    pub fn ranks(&self) -> &[i32] {
        &self.ranks
    }

    /// The delta of `fused` of `layer` for the rows of `num_tiles` tiles at `tiles`: `y += ...`
    /// from `x` (both of `rows` rows), through the f32 scratch `t`.
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        &self,
        layer: usize,
        fused: FusedProduct,
        (y, x, rows): (u64, u64, usize),
        t: u64,
        tiles: u64,
        num_tiles: usize,
    ) -> LoraProduct {
        let (k, n_out, bounds) = fused.shape(&self.dims);
        let buffers = &self.layers[layer][fused as usize];
        LoraProduct {
            y,
            x,
            rows,
            t,
            a: buffers.a.ptr,
            b: buffers.b.ptr,
            tiles,
            num_tiles,
            k,
            n_out,
            groups: fused.projections().len(),
            stride: self.stride,
            bounds,
        }
    }
}

/// The LoRA tiles of `batch`: each adapter's rows (in batch order, adapters in order of first
/// use) cut into tiles of at most [`LORA_TILE_ROWS`], with the slot's rank from `ranks`; rows of
/// the base model are in none.
pub fn lora_tiles(batch: &Batch, ranks: &[i32]) -> Vec<LoraTile> {
    let mut tiles: Vec<LoraTile> = Vec::new();
    for seq in &batch.seqs {
        let Some(slot) = seq.lora_slot else {
            continue;
        };
        let slot = slot as i32;
        for row in seq.rows.clone() {
            // The adapter's latest tile, while it has room; else a new one.
            let index = match tiles.iter().rposition(|t| t[0] == slot) {
                Some(i) if (tiles[i][1] as usize) < LORA_TILE_ROWS => i,
                _ => {
                    let mut tile = [0i32; 16];
                    tile[0] = slot;
                    tile[LORA_TILE_RANK] = ranks.get(slot as usize).copied().unwrap_or(0);
                    tiles.push(tile);
                    tiles.len() - 1
                }
            };
            let tile = &mut tiles[index];
            tile[2 + tile[1] as usize] = row as i32;
            tile[1] += 1;
        }
    }
    tiles
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SeqSlice;

    fn seq(rows: std::ops::Range<usize>, lora_slot: Option<usize>) -> SeqSlice {
        SeqSlice {
            rows,
            start_pos: 0,
            block_ids: vec![0],
            slot: 0,
            new_blocks_from: 0,
            lora_slot,
        }
    }

    /// A tile of `slot` (of rank `10 * slot + 4`) holding `rows`.
    fn tile(slot: i32, rows: &[i32]) -> LoraTile {
        let mut t = [0; 16];
        t[0] = slot;
        t[1] = rows.len() as i32;
        t[2..2 + rows.len()].copy_from_slice(rows);
        t[LORA_TILE_RANK] = 10 * slot + 4;
        t
    }

    #[test]
    fn tiles_gather_each_adapters_rows_and_cut_at_the_tile_size() {
        let batch = Batch {
            seqs: vec![
                seq(0..11, Some(2)),
                seq(11..12, Some(1)),
                seq(12..13, None),
                seq(13..14, Some(2)),
                seq(14..15, Some(1)),
                seq(15..16, Some(0)),
            ],
            ..Batch::default()
        };
        let ranks = [4, 14, 24];
        assert_eq!(
            lora_tiles(&batch, &ranks),
            vec![
                tile(2, &[0, 1, 2, 3, 4, 5, 6, 7]),
                tile(2, &[8, 9, 10, 13]),
                tile(1, &[11, 14]),
                tile(0, &[15]),
            ]
        );
        assert!(lora_tiles(&Batch::default(), &ranks).is_empty());
    }

    #[test]
    fn slot_bytes_follow_the_rank_stride() {
        let d = Dims {
            hidden: 64,
            head_dim: 16,
            q_heads: 4,
            kv_heads: 2,
            inter: 128,
            qkv: 128,
            vocab_per_rank: 256,
            vocab_start: 0,
            vocab_local: 256,
            vocab: 256,
            world_size: 1,
        };
        // Stride 8 for rank 4: qkv 3*8*64 + 128*8, o 8*64 + 64*8, gate_up 2*8*64 + 256*8,
        // down 8*128 + 64*8, times 2 bytes, 2 layers, 3 slots.
        let per_layer = (1536 + 1024) + (512 + 512) + (1024 + 2048) + (1024 + 512);
        assert_eq!(LoraSlots::bytes_for(&d, 2, 3, 4), 2 * 3 * per_layer * 2);
    }
}
