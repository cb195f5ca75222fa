//! The paged KV cache on the CPU and attention over it. Per layer, keys and values live in two
//! flat buffers laid out `[num_blocks, block_size, kv_heads, head_dim]`; a token's slot is
//! `block_id * block_size + offset`, so a sequence's keys are found through its block table and
//! never need to be contiguous. Attention is causal within a sequence: the query at position `p`
//! sees keys `0..=p`. Work is split over (token, KV head) pairs, each reading its keys and values
//! once for the query heads of its group; cost is O(tokens x context x heads x head_dim) in
//! arithmetic and O(tokens x context x kv_heads x head_dim) in cache reads.

use rayon::prelude::*;

use crate::batch::Batch;
use crate::cpu::linear::dot;

/// Keys and values of one layer.
#[derive(Debug)]
pub struct LayerCache {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The whole cache: one `LayerCache` per layer.
#[derive(Debug)]
pub struct KvCache {
    /// Per-layer buffers.
    pub layers: Vec<LayerCache>,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// KV heads stored on this rank.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
}

impl KvCache {
    /// Bytes one block takes over all layers (keys and values).
    pub fn bytes_per_block(
        layers: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * layers * block_size * kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    /// Allocates `num_blocks` blocks for every layer. The memory is zeroed lazily by the OS.
    pub fn new(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Self {
        let len = num_blocks * block_size * kv_heads * head_dim;
        Self {
            layers: (0..layers)
                .map(|_| LayerCache {
                    keys: vec![0.0; len],
                    values: vec![0.0; len],
                })
                .collect(),
            block_size,
            num_blocks,
            kv_heads,
            head_dim,
        }
    }

    /// Total bytes held.
    pub fn bytes(&self) -> usize {
        Self::bytes_per_block(
            self.layers.len(),
            self.block_size,
            self.kv_heads,
            self.head_dim,
        ) * self.num_blocks
    }

    /// The slot range of `slot` for one token (all its KV heads).
    fn token_range(&self, slot: usize) -> std::ops::Range<usize> {
        let w = self.kv_heads * self.head_dim;
        slot * w..(slot + 1) * w
    }
}

/// What one layer's attention needs besides the cache.
pub struct AttentionInput<'a> {
    /// Rotated queries, `[tokens, q_heads * head_dim]`.
    pub q: &'a [f32],
    /// Rotated keys, `[tokens, kv_heads * head_dim]`.
    pub k: &'a [f32],
    /// Values, `[tokens, kv_heads * head_dim]`.
    pub v: &'a [f32],
    /// Query heads on this rank.
    pub q_heads: usize,
    /// Maps a local query head to its local KV head.
    pub kv_head_of: &'a [usize],
}

/// Consecutive query heads attending with one KV head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HeadRun {
    kv_head: usize,
    heads: std::ops::Range<usize>,
}

/// The runs of `kv_head_of` (local query head -> local KV head), in head order.
fn head_runs(kv_head_of: &[usize]) -> Vec<HeadRun> {
    let mut runs: Vec<HeadRun> = Vec::new();
    for (head, &kv_head) in kv_head_of.iter().enumerate() {
        match runs.last_mut() {
            Some(run) if run.kv_head == kv_head => run.heads.end = head + 1,
            _ => runs.push(HeadRun {
                kv_head,
                heads: head..head + 1,
            }),
        }
    }
    runs
}

/// What every work item of one layer's attention reads: the layer's cache and queries.
struct LayerAttention<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    q: &'a [f32],
    q_heads: usize,
    head_dim: usize,
    /// Floats of one token's keys (all KV heads) in the cache.
    kv_width: usize,
    block_size: usize,
    scale: f32,
}

/// Whether [`attend_avx2`] can run here.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`attend`] compiled for AVX2: the eight-lane dot products and the value sums become 8-wide
/// instructions instead of two 4-wide SSE ones (the build's x86-64 baseline). The same
/// operations in the same order (no fused multiply-adds: Rust does not contract), so the same
/// bits. In SmolLM2's single-stream decode to 1,000 tokens on 2 cores, attention's share of the
/// profile fell from 27-29% to 23-24% (docs/PERFORMANCE.md, issue 12, session 21).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(layer: &LayerAttention, item: &WorkItem, dst: &mut [f32]) {
    attend(layer, item, dst)
}

/// One work item: query heads `run.heads` of `row` against the first `visible` keys and values
/// of its sequence (blocks `block_ids`).
struct WorkItem<'a> {
    row: usize,
    run: &'a HeadRun,
    block_ids: &'a [u32],
    visible: usize,
}

/// `item` of `layer`'s attention into `dst` (`[heads, head_dim]`, zero on entry).
#[inline(always)]
fn attend(layer: &LayerAttention, item: &WorkItem, dst: &mut [f32]) {
    let WorkItem {
        row,
        run,
        block_ids,
        visible,
    } = *item;
    let (hd, qh, block_size) = (layer.head_dim, layer.q_heads, layer.block_size);
    let kv_offset = run.kv_head * hd;
    let key_at = |j: usize| {
        let slot = block_ids[j / block_size] as usize * block_size + j % block_size;
        slot * layer.kv_width + kv_offset
    };
    let queries: Vec<&[f32]> = run
        .heads
        .clone()
        .map(|head| &layer.q[(row * qh + head) * hd..(row * qh + head + 1) * hd])
        .collect();
    // scores[g * visible + j]: query head g of the run against key j.
    let mut scores = vec![0.0f32; queries.len() * visible];
    for j in 0..visible {
        let o = key_at(j);
        let key = &layer.keys[o..o + hd];
        for (g, q) in queries.iter().enumerate() {
            scores[g * visible + j] = dot(q, key) * layer.scale;
        }
    }
    let mut weights = Vec::with_capacity(queries.len());
    for row_scores in scores.chunks_mut(visible.max(1)) {
        let max = row_scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in row_scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        weights.push(1.0 / sum);
    }
    for j in 0..visible {
        let o = key_at(j);
        let value = &layer.values[o..o + hd];
        for (g, dst) in dst.chunks_mut(hd).enumerate() {
            let w = scores[g * visible + j] * weights[g];
            for (d, v) in dst.iter_mut().zip(value) {
                *d += w * v;
            }
        }
    }
}

/// Writes this step's keys and values into the cache at `batch.slots`, then computes attention
/// for every row. Returns `[tokens, q_heads * head_dim]`. Each (row, KV head) pair is one work
/// item computing the query heads of its group in one pass over the keys and values (one item per
/// query head when rows are too few to share out otherwise); per query head the arithmetic and
/// its order are the same either way.
pub fn paged_attention(
    cache: &mut KvCache,
    layer: usize,
    batch: &Batch,
    input: &AttentionInput,
) -> Vec<f32> {
    let hd = cache.head_dim;
    let kv_w = cache.kv_heads * hd;
    {
        let (slots, block_size) = (&batch.slots, cache.block_size);
        debug_assert!(slots.iter().all(|s| *s < cache.num_blocks * block_size));
        let ranges: Vec<_> = slots.iter().map(|&s| cache.token_range(s)).collect();
        let lc = &mut cache.layers[layer];
        for (t, r) in ranges.into_iter().enumerate() {
            lc.keys[r.clone()].copy_from_slice(&input.k[t * kv_w..(t + 1) * kv_w]);
            lc.values[r].copy_from_slice(&input.v[t * kv_w..(t + 1) * kv_w]);
        }
    }
    let lc = &cache.layers[layer];
    let block_size = cache.block_size;
    let scale = 1.0 / (hd as f32).sqrt();
    let qh = input.q_heads;
    let mut out = vec![0.0f32; batch.num_tokens() * qh * hd];
    // Which sequence each row belongs to.
    let mut row_seq = vec![0usize; batch.num_tokens()];
    for (i, s) in batch.seqs.iter().enumerate() {
        row_seq[s.rows.clone()].fill(i);
    }
    // Work items: a row and a run of consecutive query heads sharing one KV head (a GQA group,
    // or its part on this rank), so each key and value is read once for the whole run; with too
    // few rows to keep every thread busy that way (a single stream's decode step), one head each.
    let mut runs = head_runs(input.kv_head_of);
    if batch.num_tokens() * runs.len() < 4 * rayon::current_num_threads() {
        runs = runs
            .iter()
            .flat_map(|r| {
                r.heads.clone().map(|h| HeadRun {
                    kv_head: r.kv_head,
                    heads: h..h + 1,
                })
            })
            .collect();
    }
    let mut items: Vec<(usize, &HeadRun, &mut [f32])> =
        Vec::with_capacity(batch.num_tokens() * runs.len());
    for (row, row_out) in out.chunks_mut(qh * hd).enumerate() {
        let mut rest = row_out;
        for run in &runs {
            let (dst, tail) = rest.split_at_mut(run.heads.len() * hd);
            items.push((row, run, dst));
            rest = tail;
        }
    }
    let item = LayerAttention {
        keys: &lc.keys,
        values: &lc.values,
        q: input.q,
        q_heads: qh,
        head_dim: hd,
        kv_width: kv_w,
        block_size,
        scale,
    };
    #[cfg(target_arch = "x86_64")]
    let avx2 = avx2_available();
    items.into_par_iter().for_each(|(row, run, dst)| {
        let work = WorkItem {
            row,
            run,
            block_ids: &batch.seqs[row_seq[row]].block_ids,
            visible: batch.positions[row] + 1,
        };
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 (checked at run time above).
            unsafe { attend_avx2(&item, &work, dst) };
            return;
        }
        attend(&item, &work, dst);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 build of a work item gives the portable build's bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn attention_compiled_for_avx2_gives_the_same_bits() {
        if !avx2_available() {
            return;
        }
        let (hd, kv_heads, q_heads, block_size, visible) = (64, 3, 9, 16, 77usize);
        let mut seed = 17u32;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
                })
                .collect()
        };
        let slots = visible.div_ceil(block_size) * block_size;
        let (keys, values, q) = (
            random(slots * kv_heads * hd),
            random(slots * kv_heads * hd),
            random(q_heads * hd),
        );
        let item = LayerAttention {
            keys: &keys,
            values: &values,
            q: &q,
            q_heads,
            head_dim: hd,
            kv_width: kv_heads * hd,
            block_size,
            scale: 0.125,
        };
        // Blocks out of order, as a block table has them.
        let block_ids: Vec<u32> = (0..slots / block_size).rev().map(|b| b as u32).collect();
        for run in head_runs(&[0, 0, 0, 1, 1, 1, 2, 2, 2]) {
            let mut portable = vec![0.0f32; run.heads.len() * hd];
            let mut avx2 = portable.clone();
            let work = WorkItem {
                row: 0,
                run: &run,
                block_ids: &block_ids,
                visible,
            };
            attend(&item, &work, &mut portable);
            // SAFETY: the CPU has AVX2 (checked above).
            unsafe { attend_avx2(&item, &work, &mut avx2) };
            assert!(portable.iter().any(|v| *v != 0.0));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&portable), bits(&avx2));
        }
    }

    #[test]
    fn query_heads_group_into_runs_by_kv_head() {
        let runs = head_runs(&[0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(runs.len(), 3);
        assert_eq!(
            runs[1],
            HeadRun {
                kv_head: 1,
                heads: 3..6
            }
        );
        // A tensor-parallel rank whose query heads straddle two replicated KV heads.
        let runs = head_runs(&[0, 0, 1]);
        assert_eq!(
            runs,
            [
                HeadRun {
                    kv_head: 0,
                    heads: 0..2
                },
                HeadRun {
                    kv_head: 1,
                    heads: 2..3
                }
            ]
        );
    }
}
