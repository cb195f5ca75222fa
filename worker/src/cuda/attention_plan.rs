//! How a step's attention is cut into GPU blocks, decided on the host: tiles of consecutive query
//! rows of one sequence (a block loads each key tile once for every row and query head of its
//! tile), the updates that bring the persistent block tables up to date, and how many splits the
//! key length gets (a decode step of few sequences would otherwise leave most SMs idle). Pure
//! functions of the batch, tested here.

use super::kernels::ATTENTION_MAX_SPLITS;
use crate::batch::Batch;

/// The tiles of a step: `(sequence's table row, first row, rows, position of the first row)`
/// each, flattened as the attention kernels read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionTiles {
    pub tiles: Vec<i32>,
    /// Rows of the largest tile.
    pub max_rows: usize,
    /// Keys the longest sequence's last row sees.
    pub max_context: usize,
    /// Tiles of one row at the end of `tiles` (with `one_row_apart`; else 0).
    pub one_row_tiles: usize,
}

impl AttentionTiles {
    /// Cuts every sequence's rows into tiles of at most `tile_rows` rows, ordered by the keys
    /// their last row sees, most first (stable); with `one_row_apart`, tiles of one row (decode
    /// rows, for the decode kernel) come after all the others, in the same order among
    /// themselves.
    pub fn new(batch: &Batch, tile_rows: usize, one_row_apart: bool) -> Self {
        let tile_rows = tile_rows.max(1);
        let mut tiles: Vec<[i32; 4]> = Vec::new();
        let (mut max_rows, mut max_context) = (0usize, 0usize);
        for seq in &batch.seqs {
            let mut r = seq.rows.start;
            while r < seq.rows.end {
                let rows = tile_rows.min(seq.rows.end - r);
                let pos0 = seq.start_pos + (r - seq.rows.start);
                tiles.push([seq.slot as i32, r as i32, rows as i32, pos0 as i32]);
                max_rows = max_rows.max(rows);
                r += rows;
            }
            max_context = max_context.max(seq.context_len());
        }
        // The tiles that see the most keys first: the attention kernels start blocks in this
        // order, so the grid's tail is short tiles instead of a causal prompt's last, longest one.
        let apart = |t: &[i32; 4]| one_row_apart && t[2] == 1;
        tiles.sort_by_key(|t| (apart(t), std::cmp::Reverse(t[2] + t[3])));
        Self {
            one_row_tiles: tiles.iter().filter(|t| apart(t)).count(),
            tiles: tiles.concat(),
            max_rows,
            max_context,
        }
    }
}

/// The `(index, block)` pairs that bring the persistent block tables (`[rows, width]`, i32)
/// up to date for this batch: each sequence's blocks from `new_blocks_from` on, at its slot's
/// row. Fails, naming the sequence's row, when a table is wider than `width` or a slot is
/// outside `rows`.
pub fn table_updates(batch: &Batch, rows: usize, width: usize) -> Result<Vec<i32>, String> {
    let mut updates = Vec::new();
    for seq in &batch.seqs {
        if seq.slot >= rows {
            return Err(format!(
                "sequence row {} is outside the {rows} rows of the block tables",
                seq.slot
            ));
        }
        if seq.block_ids.len() > width {
            return Err(format!(
                "a block table of {} blocks is longer than the {width} a sequence can use",
                seq.block_ids.len()
            ));
        }
        for (j, block) in seq.block_ids.iter().enumerate().skip(seq.new_blocks_from) {
            updates.push((seq.slot * width + j) as i32);
            updates.push(*block as i32);
        }
    }
    Ok(updates)
}

/// Splits of the key length for the CUDA-core kernel, `(splits, keys per split)`: `(1, 0)` when
/// the step already has a block per SM twice over or its contexts are short; otherwise enough
/// splits to fill the GPU, each at least 64 keys, at most [`ATTENTION_MAX_SPLITS`] splits and at
/// most `room` (what the split buffer holds for this step). Keys per split are a multiple of 32,
/// and no split is empty.
pub fn key_splits(
    blocks: usize,
    sm_count: usize,
    max_context: usize,
    room: usize,
) -> (usize, usize) {
    let target = 2 * sm_count;
    if blocks >= target || max_context <= 256 {
        return (1, 0);
    }
    let splits = target
        .div_ceil(blocks.max(1))
        .min(max_context.div_ceil(64))
        .min(ATTENTION_MAX_SPLITS)
        .min(room);
    if splits <= 1 {
        return (1, 0);
    }
    let split_len = max_context.div_ceil(splits).next_multiple_of(32);
    (max_context.div_ceil(split_len), split_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::SeqSlice;

    /// A batch of sequences given as (rows this step, tokens already cached).
    fn batch(seqs: &[(usize, usize)]) -> Batch {
        let mut b = Batch::default();
        for (i, &(rows, start)) in seqs.iter().enumerate() {
            let first = b.token_ids.len();
            for p in start..start + rows {
                b.token_ids.push(1);
                b.positions.push(p);
                b.slots.push(p);
            }
            b.seqs.push(SeqSlice {
                rows: first..first + rows,
                start_pos: start,
                block_ids: (0..(start + rows).div_ceil(16) as u32)
                    .map(|x| x + 100 * i as u32)
                    .collect(),
                slot: 10 + i,
                new_blocks_from: i,
                lora_slot: None,
            });
            b.sample_rows.push(first + rows - 1);
        }
        b
    }

    #[test]
    fn tiles_cover_every_row_once_with_its_sequence_and_position() {
        let b = batch(&[(37, 0), (1, 500), (16, 64), (5, 3)]);
        for tile_rows in [1, 4, 8, 16, 64] {
            let t = AttentionTiles::new(&b, tile_rows, false);
            assert_eq!(t.one_row_tiles, 0);
            let mut seen = vec![0; b.num_tokens()];
            for tile in t.tiles.chunks_exact(4) {
                let (seq, row0, rows, pos0) = (
                    tile[0] as usize,
                    tile[1] as usize,
                    tile[2] as usize,
                    tile[3] as usize,
                );
                assert!(rows >= 1 && rows <= tile_rows);
                let seq = b
                    .seqs
                    .iter()
                    .position(|s| s.slot == seq)
                    .expect("tiles name the sequence's slot");
                for (r, count) in seen.iter_mut().enumerate().skip(row0).take(rows) {
                    *count += 1;
                    assert!(
                        b.seqs[seq].rows.contains(&r),
                        "row {r} outside sequence {seq}"
                    );
                    assert_eq!(b.positions[r], pos0 + (r - row0));
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{seen:?}");
            let keys: Vec<i32> = t.tiles.chunks_exact(4).map(|t| t[2] + t[3]).collect();
            assert!(
                keys.windows(2).all(|w| w[0] >= w[1]),
                "most keys first: {keys:?}"
            );
            assert_eq!(t.max_context, 501);
            assert_eq!(t.max_rows, tile_rows.min(37));
        }
    }

    #[test]
    fn one_row_tiles_apart_come_last_each_part_most_keys_first() {
        // Two prompts, three decode rows; a 37-row prompt cut by 8 leaves a 5-row tile.
        let b = batch(&[(37, 0), (1, 500), (16, 64), (1, 7), (1, 900)]);
        let t = AttentionTiles::new(&b, 8, true);
        assert_eq!(t.one_row_tiles, 3);
        let tiles: Vec<&[i32]> = t.tiles.chunks_exact(4).collect();
        let (prompt, decode) = tiles.split_at(tiles.len() - 3);
        assert!(prompt.iter().all(|t| t[2] > 1));
        let keys: Vec<i32> = decode.iter().map(|t| t[2] + t[3]).collect();
        assert_eq!(keys, vec![901, 501, 8]);
        let keys: Vec<i32> = prompt.iter().map(|t| t[2] + t[3]).collect();
        assert!(keys.windows(2).all(|w| w[0] >= w[1]), "{keys:?}");
        assert_eq!(AttentionTiles::new(&b, 8, false).tiles.len(), t.tiles.len());
    }

    #[test]
    fn table_updates_carry_only_new_blocks_at_the_slot_row_and_refuse_what_does_not_fit() {
        // Sequence 0 (slot 10) is new: all 2 blocks; sequence 1 (slot 11) has seen its first.
        let b = batch(&[(20, 0), (1, 40)]);
        let updates = table_updates(&b, 16, 4).unwrap();
        assert_eq!(updates, vec![40, 0, 41, 1, 45, 101, 46, 102]);
        let err = table_updates(&b, 11, 4).unwrap_err();
        assert!(err.contains("row 11 is outside the 11 rows"), "{err}");
        let err = table_updates(&b, 16, 2).unwrap_err();
        assert!(err.contains("3 blocks is longer than the 2"), "{err}");
    }

    #[test]
    fn key_splits_fill_the_gpu_only_for_long_contexts_and_never_leave_a_split_empty() {
        assert_eq!(key_splits(8, 132, 200, 1000), (1, 0), "short context");
        assert_eq!(key_splits(300, 132, 4096, 1000), (1, 0), "enough blocks");
        for ctx in [257, 512, 1000, 4096, 100_000] {
            for blocks in [1, 8, 64, 263] {
                for room in [1, 2, 7, 1000] {
                    let (splits, len) = key_splits(blocks, 132, ctx, room);
                    if splits == 1 {
                        continue;
                    }
                    assert!(splits <= 64 && splits <= room, "{splits}");
                    assert_eq!(len % 32, 0);
                    assert!(len >= 64 || len * splits >= ctx);
                    assert!(splits * len >= ctx, "keys left over");
                    assert!((splits - 1) * len < ctx, "an empty split");
                }
            }
        }
        assert_eq!(key_splits(8, 132, 512, 1000), (8, 64));
    }
}
