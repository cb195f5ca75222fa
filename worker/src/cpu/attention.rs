//! The paged KV cache on the CPU and attention over it. Per layer, keys and values live in two
//! flat buffers laid out `[num_blocks, block_size, kv_heads, head_dim]`; a token's slot is
//! `block_id * block_size + offset`, so a sequence's keys are found through its block table and
//! never need to be contiguous. Attention is causal within a sequence: the query at position `p`
//! sees keys `0..=p`. Work is split over (token, head) pairs; cost is O(tokens x context x heads
//! x head_dim), small beside the projections on these models.

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

/// Writes this step's keys and values into the cache at `batch.slots`, then computes attention
/// for every row. Returns `[tokens, q_heads * head_dim]`.
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
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, dst)| {
        let (row, head) = (idx / qh, idx % qh);
        let seq = &batch.seqs[row_seq[row]];
        let visible = batch.positions[row] + 1;
        let kvh = input.kv_head_of[head];
        let q = &input.q[(row * qh + head) * hd..(row * qh + head + 1) * hd];
        let key_at = |j: usize| {
            let slot = seq.block_ids[j / block_size] as usize * block_size + j % block_size;
            (slot * kv_w) + kvh * hd
        };
        let mut scores: Vec<f32> = (0..visible)
            .map(|j| {
                let o = key_at(j);
                dot(q, &lc.keys[o..o + hd]) * scale
            })
            .collect();
        let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (j, p) in scores.iter().enumerate() {
            let o = key_at(j);
            let w = p * inv;
            for (d, v) in dst.iter_mut().zip(&lc.values[o..o + hd]) {
                *d += w * v;
            }
        }
    });
    out
}
