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
///
/// Per query head the arithmetic is [`dot`]'s for each score (eight lanes over the head's
/// dimensions, then the lanes summed in order), times the scale; the softmax in key order; and
/// each output element summed over the keys in order, weight times value then added (no fused
/// multiply-adds). The loops are arranged for the machine, not for that order: the keys' offsets
/// are found once, eight keys' lane sums are reduced together, and the output is summed 64
/// elements at a time in registers instead of through `dst` for every key. The order of each
/// element's operations is unchanged, so the bits are the same as the plain loops' (the
/// `attend_matches_the_plain_loops_bit_for_bit` test keeps those loops).
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
    // Where key j (and value j) of the sequence starts in the layer's buffers.
    let offsets: Vec<usize> = block_ids
        .iter()
        .flat_map(|&block| {
            let first = block as usize * block_size;
            (first..first + block_size).map(|slot| slot * layer.kv_width + kv_offset)
        })
        .take(visible)
        .collect();
    let heads = run.heads.len();
    // scores[g * visible + j]: query head g of the run against key j.
    let mut scores = vec![0.0f32; heads * visible];
    for (g, head) in run.heads.clone().enumerate() {
        let q = &layer.q[(row * qh + head) * hd..(row * qh + head + 1) * hd];
        score_keys(
            q,
            layer.keys,
            &offsets,
            layer.scale,
            &mut scores[g * visible..(g + 1) * visible],
        );
    }
    // Softmax per head; each score becomes its weight (the one product the value sum used).
    for row_scores in scores.chunks_mut(visible.max(1)) {
        let max = row_scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in row_scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for s in row_scores.iter_mut() {
            *s *= inv;
        }
    }
    for (g, out) in dst.chunks_mut(hd).enumerate() {
        sum_values(
            &scores[g * visible..(g + 1) * visible],
            layer.values,
            &offsets,
            out,
        );
    }
}

/// `scores[j] = dot(q, keys[offsets[j]..]) * scale` for every key j, eight keys at a time where
/// the head's size is a multiple of 8: each key's eight lane sums as [`dot`] forms them, then the
/// eight keys' lanes added together lane by lane (the same order as `dot`'s final sum).
#[inline(always)]
fn score_keys(q: &[f32], keys: &[f32], offsets: &[usize], scale: f32, scores: &mut [f32]) {
    let hd = q.len();
    let mut j = 0;
    if hd.is_multiple_of(8) {
        while j + 8 <= offsets.len() {
            // dot's lanes for the eight keys, the keys interleaved within each 8-wide chunk of
            // the head: eight independent sums in flight instead of one chain per key. (Plain
            // loops: a closure, as `array::from_fn` takes, is not inlined into the AVX2 build.)
            let mut key: [&[f32]; 8] = [&[]; 8];
            for (k, key) in key.iter_mut().enumerate() {
                *key = &keys[offsets[j + k]..][..hd];
            }
            let mut lanes = [[0.0f32; 8]; 8];
            for c in (0..hd).step_by(8) {
                let x = &q[c..c + 8];
                for k in 0..8 {
                    let y = &key[k][c..c + 8];
                    for l in 0..8 {
                        lanes[k][l] += x[l] * y[l];
                    }
                }
            }
            // Indexed loops on purpose: the iterator form clippy prefers was compiled to scalar
            // code here (single stream at 900 keys 77 -> 72 tok/s).
            let mut sums = [0.0f32; 8];
            #[allow(clippy::needless_range_loop)]
            for k in 0..8 {
                sums[k] = lanes[k][0];
            }
            #[allow(clippy::needless_range_loop)]
            for l in 1..8 {
                for k in 0..8 {
                    sums[k] += lanes[k][l];
                }
            }
            for k in 0..8 {
                scores[j + k] = sums[k] * scale;
            }
            j += 8;
        }
    }
    for (score, &o) in scores[j..].iter_mut().zip(&offsets[j..]) {
        *score = dot(q, &keys[o..o + hd]) * scale;
    }
}

/// `out[d] = sum over j of weights[j] * values[offsets[j] + d]`, in key order, `out` zero on
/// entry. 64 elements of `out` at a time stay in registers over all the keys.
#[inline(always)]
fn sum_values(weights: &[f32], values: &[f32], offsets: &[usize], out: &mut [f32]) {
    const WIDTH: usize = 64;
    let mut chunks = out.chunks_exact_mut(WIDTH);
    let mut d0 = 0;
    for chunk in &mut chunks {
        let mut acc = [0.0f32; WIDTH];
        for (&w, &o) in weights.iter().zip(offsets) {
            let value: &[f32; WIDTH] = values[o + d0..o + d0 + WIDTH].try_into().unwrap();
            for l in 0..WIDTH {
                acc[l] += w * value[l];
            }
        }
        chunk.copy_from_slice(&acc);
        d0 += WIDTH;
    }
    let rest = chunks.into_remainder();
    for (&w, &o) in weights.iter().zip(offsets) {
        for (d, v) in rest.iter_mut().zip(&values[o + d0..]) {
            *d += w * v;
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

    /// The plain loops `attend` was before it was arranged for the machine (session 27): per
    /// key a `dot` with each query head, the softmax, then every key's weighted value added into
    /// `dst`. `attend` must keep their bits.
    fn attend_plain(layer: &LayerAttention, item: &WorkItem, dst: &mut [f32]) {
        let (hd, qh, block_size) = (layer.head_dim, layer.q_heads, layer.block_size);
        let kv_offset = item.run.kv_head * hd;
        let key_at = |j: usize| {
            let slot = item.block_ids[j / block_size] as usize * block_size + j % block_size;
            slot * layer.kv_width + kv_offset
        };
        let queries: Vec<&[f32]> = item
            .run
            .heads
            .clone()
            .map(|head| &layer.q[(item.row * qh + head) * hd..(item.row * qh + head + 1) * hd])
            .collect();
        let visible = item.visible;
        let mut scores = vec![0.0f32; queries.len() * visible];
        for j in 0..visible {
            let key = &layer.keys[key_at(j)..key_at(j) + hd];
            for (g, q) in queries.iter().enumerate() {
                scores[g * visible + j] = dot(q, key) * layer.scale;
            }
        }
        let mut weights = Vec::new();
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
            let value = &layer.values[key_at(j)..key_at(j) + hd];
            for (g, dst) in dst.chunks_mut(hd).enumerate() {
                let w = scores[g * visible + j] * weights[g];
                for (d, v) in dst.iter_mut().zip(value) {
                    *d += w * v;
                }
            }
        }
    }

    /// `attend`, portable and compiled for AVX2, gives the plain loops' bits: head sizes with
    /// and without a whole 64-element chunk or a multiple of 8, context lengths around the
    /// eight-key groups and the blocks, blocks out of order as a block table has them.
    #[test]
    fn attend_matches_the_plain_loops_bit_for_bit() {
        let mut seed = 17u32;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
                })
                .collect()
        };
        let (kv_heads, q_heads, block_size) = (3, 9, 16);
        for hd in [64, 128, 72, 12, 6] {
            for visible in [1usize, 7, 8, 9, 16, 77, 200] {
                let slots = visible.div_ceil(block_size) * block_size;
                let (keys, values, q) = (
                    random(slots * kv_heads * hd),
                    random(slots * kv_heads * hd),
                    random(2 * q_heads * hd),
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
                let block_ids: Vec<u32> = (0..slots / block_size).rev().map(|b| b as u32).collect();
                for run in head_runs(&[0, 0, 0, 1, 1, 1, 2, 2, 2]) {
                    let work = WorkItem {
                        row: 1,
                        run: &run,
                        block_ids: &block_ids,
                        visible,
                    };
                    let mut plain = vec![0.0f32; run.heads.len() * hd];
                    attend_plain(&item, &work, &mut plain);
                    assert!(plain.iter().any(|v| *v != 0.0));
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    let mut portable = vec![0.0f32; plain.len()];
                    attend(&item, &work, &mut portable);
                    assert_eq!(bits(&portable), bits(&plain), "head {hd}, {visible} keys");
                    #[cfg(target_arch = "x86_64")]
                    if avx2_available() {
                        let mut avx2 = vec![0.0f32; plain.len()];
                        // SAFETY: the CPU has AVX2 (checked just above).
                        unsafe { attend_avx2(&item, &work, &mut avx2) };
                        assert_eq!(bits(&avx2), bits(&plain), "AVX2, head {hd}, {visible} keys");
                    }
                }
            }
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
