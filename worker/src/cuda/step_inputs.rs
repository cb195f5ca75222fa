//! A step's host inputs on their way to the device: token ids, positions, KV slots, attention
//! tiles, sample rows, sampling parameters, LoRA tiles and the block-table updates, packed into
//! one buffer and copied in one transfer.
//!
//! An eager step packs exactly its rows. A step replayed by a CUDA graph packs its rows padded
//! to the graph's batch size, so every array sits at the offset the graph was captured with
//! (the offsets depend only on the padded size); padding rows are token 0 at position 0 with no
//! KV slot (nothing is written to the cache), an empty attention tile (nothing is computed) and
//! greedy sampling; the LoRA tiles are padded with empty ones. The block-table updates come last,
//! outside the fixed part. A padded step also carries each row's feed: the sample row of the
//! step before whose token the row takes on the device (`Batch::fed`), or -1.

use super::attention_plan::{table_updates, AttentionTiles};
use super::kernels::SamplingPointers;
use super::lora::lora_tiles;
use crate::batch::Batch;
use crate::sampler::SampleSpec;

/// Bytes packed for the device, each array 16-byte aligned.
pub struct Packed {
    pub bytes: Vec<u8>,
}

impl Packed {
    const ALIGN: usize = 16;

    /// Bytes for `tokens` rows and `samples` sampled rows, plus 1 MiB of block-table updates
    /// (131,072 blocks); a step that needs more gets a buffer of its own.
    pub fn capacity(tokens: usize, samples: usize) -> usize {
        // ids + positions + slots + tiles + LoRA tiles + feed + sample rows + sampling
        // parameters, plus alignment.
        tokens * (4 + 4 + 8 + 16 + 64 + 4) + samples * (4 + 4 + 4 + 4 + 4 + 8) + 16 * 16 + (1 << 20)
    }

    pub(super) fn with_capacity(bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// Appends `data` at the next aligned offset; returns the offset.
    pub(super) fn push<T: Copy>(&mut self, data: &[T]) -> usize {
        let at = self.bytes.len().next_multiple_of(Self::ALIGN);
        self.bytes.resize(at, 0);
        // SAFETY: T is plain data (u32, i32, i64, f32, u64 here); reading its bytes is sound.
        let raw = unsafe {
            std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
        };
        self.bytes.extend_from_slice(raw);
        at
    }

    /// Appends the sample kernel's per-row parameters of `sampling`, padded to `rows` rows with
    /// greedy ones; returns their offsets.
    pub(super) fn push_sampling(
        &mut self,
        sampling: &[SampleSpec],
        rows: usize,
    ) -> SamplingOffsets {
        let column = |f: &dyn Fn(&SampleSpec) -> f32, fill: f32| -> Vec<f32> {
            padded(sampling.iter().map(f).collect(), fill, rows)
        };
        let temperature = self.push(&column(&|x| x.params.temperature, 0.0));
        let top_k: Vec<i32> = sampling.iter().map(|x| x.params.top_k).collect();
        let top_k = self.push(&padded(top_k, 0, rows));
        let top_p = self.push(&column(&|x| x.params.top_p, 1.0));
        let min_p = self.push(&column(&|x| x.params.min_p, 0.0));
        let seeds: Vec<u64> = sampling.iter().map(|x| x.seed).collect();
        let seeds = self.push(&padded(seeds, 0, rows));
        SamplingOffsets {
            temperature,
            top_k,
            top_p,
            min_p,
            seeds,
        }
    }
}

/// Byte offsets of the sample kernel's per-row parameters in a packed buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplingOffsets {
    pub temperature: usize,
    pub top_k: usize,
    pub top_p: usize,
    pub min_p: usize,
    pub seeds: usize,
}

impl SamplingOffsets {
    /// Their addresses once the buffer is copied to `base`.
    pub fn at(&self, base: u64) -> SamplingPointers {
        let at = |offset: usize| base + offset as u64;
        SamplingPointers {
            temperature: at(self.temperature),
            top_k: at(self.top_k),
            top_p: at(self.top_p),
            min_p: at(self.min_p),
            seeds: at(self.seeds),
        }
    }
}

/// Byte offsets of a step's arrays in its packed buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offsets {
    pub ids: usize,
    pub positions: usize,
    pub slots: usize,
    pub tiles: usize,
    /// `None` when the sampled rows are rows `0..samples` (every decode step).
    pub sample_rows: Option<usize>,
    pub sampling: SamplingOffsets,
    /// LoRA tiles (`lora.cu`), room for one per row.
    pub lora_tiles: usize,
    /// Each row's feed (i32, -1: none); padded steps only.
    pub feed: Option<usize>,
    /// The `(index, block)` pairs of the block-table updates.
    pub updates: usize,
}

/// Device addresses of a packed step's arrays, once copied to `base`.
#[derive(Debug, Clone, Copy)]
pub struct InputPointers {
    pub ids: u64,
    pub positions: u64,
    pub slots: u64,
    pub tiles: u64,
    pub sample_rows: Option<u64>,
    pub sampling: SamplingPointers,
    pub lora_tiles: u64,
    /// 0: no row is fed.
    pub feed: u64,
}

impl Offsets {
    /// The addresses of the fixed part at `base`.
    pub fn at(&self, base: u64) -> InputPointers {
        let at = |offset: usize| base + offset as u64;
        InputPointers {
            ids: at(self.ids),
            positions: at(self.positions),
            slots: at(self.slots),
            tiles: at(self.tiles),
            sample_rows: self.sample_rows.map(at),
            sampling: self.sampling.at(base),
            lora_tiles: at(self.lora_tiles),
            feed: self.feed.map_or(0, at),
        }
    }
}

/// A step packed for the device.
pub struct PackedStep {
    pub packed: Packed,
    pub offsets: Offsets,
    pub num_tiles: usize,
    /// One-row tiles at the end of the tiles, kept apart for the decode kernel (`pack`'s
    /// `one_row_apart`; else 0).
    pub one_row_tiles: usize,
    /// Rows of the largest attention tile.
    pub max_tile_rows: usize,
    /// Keys the longest sequence's last row sees.
    pub max_context: usize,
    /// Block-table updates (pairs at `offsets.updates`).
    pub num_updates: usize,
    /// LoRA tiles in use (the rest of the row-sized array is padding); 0: no row uses an
    /// adapter.
    pub num_lora_tiles: usize,
}

/// The persistent block tables a step's updates go into: `rows` sequences of `width` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableShape {
    pub rows: usize,
    pub width: usize,
}

/// Packs `batch` with one sampling spec per sample row; tiles of at most `tile_rows` rows (with
/// `one_row_apart`, the one-row tiles last: `AttentionTiles::new`); LoRA tiles with the ranks of
/// the adapter slots (`lora_ranks`). With `pad_to`, the batch must be decode rows only (one row
/// per sequence, every row sampled) and is padded to `pad_to` rows. Fails when a block table
/// does not fit `tables`, or when a row is fed (`Batch::fed`) in a step not padded.
pub fn pack(
    batch: &Batch,
    sampling: &[SampleSpec],
    tile_rows: usize,
    one_row_apart: bool,
    pad_to: Option<usize>,
    tables: TableShape,
    lora_ranks: &[i32],
) -> Result<PackedStep, String> {
    let n = batch.num_tokens();
    let s = batch.sample_rows.len();
    debug_assert_eq!(sampling.len(), s);
    let rows = pad_to.unwrap_or(n).max(n);
    let samples = pad_to.unwrap_or(s).max(s);
    let updates = table_updates(batch, tables.rows, tables.width)?;
    let mut p = Packed::with_capacity(Packed::capacity(rows, samples) + updates.len() * 4);
    let ids = p.push(&padded(batch.token_ids.clone(), 0u32, rows));
    let positions: Vec<i32> = batch.positions.iter().map(|x| *x as i32).collect();
    let positions = p.push(&padded(positions, 0, rows));
    let slots: Vec<i64> = batch.slots.iter().map(|x| *x as i64).collect();
    let slots = p.push(&padded(slots, -1, rows));
    let plan = AttentionTiles::new(batch, tile_rows, one_row_apart);
    let mut tiles = plan.tiles.clone();
    // Padding rows: one empty tile each, at their own row.
    for row in n..rows {
        tiles.extend_from_slice(&[0, row as i32, 0, 0]);
    }
    let num_tiles = tiles.len() / 4;
    let tiles = p.push(&tiles);
    let identity = s == n && batch.sample_rows.iter().enumerate().all(|(i, r)| i == *r);
    let sample_rows = (!identity).then(|| {
        let rows: Vec<i32> = batch.sample_rows.iter().map(|x| *x as i32).collect();
        p.push(&rows)
    });
    let sampling = p.push_sampling(sampling, samples);
    let lora = lora_tiles(batch, lora_ranks);
    let num_lora_tiles = lora.len();
    let lora_tiles = p.push(&padded(lora, [0; 16], rows));
    let feed = match pad_to {
        Some(_) => {
            let mut feed = vec![-1i32; rows];
            for &(row, sample) in &batch.fed {
                *feed.get_mut(row).ok_or("a fed row outside the step")? = sample as i32;
            }
            Some(p.push(&feed))
        }
        None if batch.fed.is_empty() => None,
        None => return Err("a step with fed rows must replay a decode graph".into()),
    };
    let updates_at = p.push(&updates);
    Ok(PackedStep {
        packed: p,
        offsets: Offsets {
            ids,
            positions,
            slots,
            tiles,
            sample_rows,
            sampling,
            lora_tiles,
            feed,
            updates: updates_at,
        },
        num_tiles,
        one_row_tiles: plan.one_row_tiles,
        max_tile_rows: plan.max_rows,
        max_context: plan.max_context,
        num_updates: updates.len() / 2,
        num_lora_tiles,
    })
}

/// `v` extended with `fill` to `len` elements.
fn padded<T: Copy>(mut v: Vec<T>, fill: T, len: usize) -> Vec<T> {
    v.resize(len, fill);
    v
}

/// Whether `batch` can run as a padded decode batch: one row per sequence, every row sampled
/// in order.
pub fn is_decode_only(batch: &Batch) -> bool {
    let n = batch.num_tokens();
    n > 0
        && batch.seqs.len() == n
        && batch.seqs.iter().all(|s| s.rows.len() == 1)
        && batch.sample_rows.len() == n
        && batch.sample_rows.iter().enumerate().all(|(i, r)| i == *r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SeqSlice;

    /// `count` decode rows of sequences at the given contexts, slots 3, 4, ...
    fn decode_batch(contexts: &[usize]) -> Batch {
        let mut b = Batch::default();
        for (i, &ctx) in contexts.iter().enumerate() {
            b.token_ids.push(7 + i as u32);
            b.positions.push(ctx - 1);
            b.slots.push(100 + i);
            b.seqs.push(SeqSlice {
                rows: i..i + 1,
                start_pos: ctx - 1,
                block_ids: (0..ctx.div_ceil(16) as u32).collect(),
                slot: 3 + i,
                new_blocks_from: ctx.div_ceil(16) - 1,
                lora_slot: None,
            });
            b.sample_rows.push(i);
        }
        b
    }

    fn read<T: Copy + Default>(p: &Packed, at: usize, n: usize) -> Vec<T> {
        let mut out = vec![T::default(); n];
        // SAFETY: the packed buffer holds n values of T at `at` (written by `push`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                p.bytes[at..].as_ptr(),
                out.as_mut_ptr() as *mut u8,
                n * std::mem::size_of::<T>(),
            )
        };
        out
    }

    const TABLES: TableShape = TableShape {
        rows: 16,
        width: 64,
    };

    #[test]
    fn padded_offsets_depend_only_on_the_padded_size() {
        let greedy = SampleSpec::greedy();
        let one = pack(
            &decode_batch(&[5]),
            &[greedy],
            1,
            false,
            Some(8),
            TABLES,
            &[],
        )
        .unwrap();
        let three = decode_batch(&[5, 40, 300]);
        let three = pack(&three, &[greedy; 3], 1, false, Some(8), TABLES, &[]).unwrap();
        let mut a = one.offsets;
        let mut b = three.offsets;
        // Only the updates (after the fixed part) may move... and here they do not either.
        a.updates = 0;
        b.updates = 0;
        assert_eq!(a, b);
        assert_eq!(a.sample_rows, None, "decode rows sample in order");
        assert_eq!(three.num_tiles, 8);
    }

    #[test]
    fn padding_rows_write_no_cache_slot_and_compute_no_attention() {
        let b = decode_batch(&[5, 40]);
        let step = pack(
            &b,
            &[SampleSpec::greedy(); 2],
            1,
            false,
            Some(4),
            TABLES,
            &[],
        )
        .unwrap();
        let p = &step.packed;
        assert_eq!(read::<u32>(p, step.offsets.ids, 4), vec![7, 8, 0, 0]);
        assert_eq!(
            read::<i64>(p, step.offsets.slots, 4),
            vec![100, 101, -1, -1]
        );
        let tiles = read::<i32>(p, step.offsets.tiles, 16);
        // The longer context's tile first; the padding rows' empty tiles after them.
        assert_eq!(&tiles[..8], &[4, 1, 1, 39, 3, 0, 1, 4]);
        assert_eq!(&tiles[8..], &[0, 2, 0, 0, 0, 3, 0, 0]);
        assert_eq!(read::<f32>(p, step.offsets.sampling.top_p, 4), vec![1.0; 4]);
        // Each sequence sends only its last (new) block: slot row * width + index.
        assert_eq!(step.num_updates, 2);
        let updates = read::<i32>(p, step.offsets.updates, 4);
        assert_eq!(updates, vec![3 * 64, 0, 4 * 64 + 2, 2]);
    }

    #[test]
    fn fed_rows_name_their_sample_and_need_a_padded_step() {
        let mut b = decode_batch(&[5, 40, 9]);
        b.fed = vec![(0, 2), (2, 0)];
        let step = pack(
            &b,
            &[SampleSpec::greedy(); 3],
            1,
            false,
            Some(4),
            TABLES,
            &[],
        )
        .unwrap();
        let feed = read::<i32>(&step.packed, step.offsets.feed.unwrap(), 4);
        assert_eq!(feed, vec![2, -1, 0, -1]);
        let eager = pack(&b, &[SampleSpec::greedy(); 3], 1, false, None, TABLES, &[]);
        assert!(eager.is_err());
        b.fed.clear();
        let eager = pack(&b, &[SampleSpec::greedy(); 3], 1, false, None, TABLES, &[]).unwrap();
        assert_eq!(eager.offsets.feed, None);
    }

    #[test]
    fn decode_only_means_one_sampled_row_per_sequence_in_order() {
        assert!(is_decode_only(&decode_batch(&[5, 9])));
        let mut prefill = decode_batch(&[5]);
        prefill.token_ids.push(1);
        prefill.positions.push(5);
        prefill.slots.push(1);
        prefill.seqs[0].rows = 0..2;
        prefill.sample_rows = vec![1];
        assert!(!is_decode_only(&prefill));
        assert!(!is_decode_only(&Batch::default()));
    }
}
