//! The Llama-family transformer on the CPU, for one tensor-parallel shard: vocab-parallel
//! embedding, per layer RMSNorm -> fused QKV (column-parallel) -> RoPE -> paged attention -> o_proj
//! (row-parallel, all-reduce) -> residual -> RMSNorm -> fused gate/up (column-parallel) -> SiLU-mul
//! -> down (row-parallel, all-reduce) -> residual, then the final norm and the vocab-parallel
//! lm_head on the rows that sample only (or, for embedding sequences, the final norm of the
//! pooled rows, summed per sequence, and no lm_head). Activations are f32; matrix weights
//! are f32 or, for a GGUF with [`WeightMode::Quantized`], kept in their quantized blocks (norms
//! stay f32).

use std::time::Instant;

use tpserve_modelfile::{LlamaConfig, Projection as P};

use super::attention::{paged_attention, AttentionInput, KvCache};
use super::linear::{Linear, Weights};
use super::lora::LoraSlots;
use super::ops::{rms_norm, silu_mul};
use super::quant::{KernelChoice, QuantLinear};
use crate::batch::Batch;
use crate::comm::Communicator;
use crate::error::Result;
use crate::rope::Rope;
use crate::shard::ShardPlan;
use crate::weights::{
    ensure_supported, model_parts, read, read_fused, read_quantized_fused, Part, WeightSource,
};

/// How matrix weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// Everything dequantized to f32 (`--dtype float32`: the exact reference path).
    Float32,
    /// GGUF matrices kept in their blocks, through these kernels; others f32.
    Quantized(KernelChoice),
}

/// One decoder layer's weights on this rank.
#[derive(Debug)]
struct Layer {
    input_norm: Vec<f32>,
    /// `[q | k | v]` rows of this rank's heads.
    qkv: Linear,
    /// Columns of this rank's heads.
    o: Linear,
    post_norm: Vec<f32>,
    /// `[gate | up]` rows of this rank's intermediate slice.
    gate_up: Linear,
    /// Columns of this rank's intermediate slice.
    down: Linear,
}

/// The model's weights on this rank and the tables it needs.
#[derive(Debug)]
pub struct CpuModel {
    config: LlamaConfig,
    shard: ShardPlan,
    /// Rows `shard.vocab` of the embedding, `[vocab_local, hidden]`; also the lm_head when tied.
    embed: Linear,
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    /// `None` when tied to `embed`.
    lm_head: Option<Linear>,
    rope: Rope,
    kv_head_of: Vec<usize>,
    /// Every product by the one-row-at-a-time path, whatever the batch (`--batch-invariant`).
    batch_invariant: bool,
    /// LoRA adapters in their slots (`SeqSlice::lora_slot`).
    lora: LoraSlots,
}

impl CpuModel {
    /// Loads this rank's shard. Positions up to `max_pos` get rotary tables.
    pub fn load(
        config: &LlamaConfig,
        shard: ShardPlan,
        source: &WeightSource,
        max_pos: usize,
        mode: WeightMode,
    ) -> Result<Self> {
        let c = config;
        ensure_supported(c)?;
        let parts = model_parts(c, &shard, source);
        let linear = |parts: &[Part], bias: Option<&[Part]>| -> Result<Linear> {
            let bias = bias.map(|b| read_fused(source, b)).transpose()?;
            if let WeightMode::Quantized(choice) = mode {
                if let Some(q) = read_quantized_fused(source, parts)?
                    .and_then(|blocks| QuantLinear::new(blocks, choice))
                {
                    return Ok(Linear::quantized(q, bias));
                }
            }
            Ok(Linear::dense(
                read_fused(source, parts)?,
                bias,
                parts.iter().map(|p| p.shape[0]).sum(),
                parts[0].shape[1],
            ))
        };
        let mut layers = Vec::with_capacity(parts.layers.len());
        for lp in &parts.layers {
            layers.push(Layer {
                input_norm: read(source, &lp.input_norm)?,
                qkv: linear(&lp.qkv, lp.qkv_bias.as_deref())?,
                o: linear(std::slice::from_ref(&lp.o), None)?,
                post_norm: read(source, &lp.post_norm)?,
                gate_up: linear(&lp.gate_up, None)?,
                down: linear(std::slice::from_ref(&lp.down), None)?,
            });
        }
        let embed = linear(std::slice::from_ref(&parts.embed), None)?;
        let lm_head = parts
            .lm_head
            .as_ref()
            .map(|p| linear(std::slice::from_ref(p), None))
            .transpose()?;
        let kv_head_of = (0..shard.q_heads.len())
            .map(|i| shard.kv_head_of(i))
            .collect();
        Ok(Self {
            config: c.clone(),
            rope: Rope::new(c, max_pos),
            embed,
            layers,
            final_norm: read(source, &parts.final_norm)?,
            lm_head,
            kv_head_of,
            shard,
            batch_invariant: false,
            lora: LoraSlots::default(),
        })
    }

    /// Computes every row the same way whatever the batch: products row by row (the blocked
    /// GEMM's summation order depends on the number of rows).
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.batch_invariant = on;
    }

    /// The LoRA slots, to put adapters into.
    pub fn lora_slots_mut(&mut self) -> &mut LoraSlots {
        &mut self.lora
    }

    /// `x [n, cols] W^T` through the path the mode asks for.
    fn project(&self, linear: &Linear, x: &[f32], n: usize) -> Vec<f32> {
        if self.batch_invariant {
            linear.forward_row_by_row(x, n)
        } else {
            linear.forward(x, n)
        }
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                (l.input_norm.len() + l.post_norm.len()) * 4
                    + l.qkv.bytes()
                    + l.o.bytes()
                    + l.gate_up.bytes()
                    + l.down.bytes()
            })
            .sum();
        layers
            + self.embed.bytes()
            + self.final_norm.len() * 4
            + self.lm_head.as_ref().map_or(0, Linear::bytes)
    }

    /// Block types of the matrices held quantized, in first-seen order (empty: all f32).
    pub fn quantized_types(&self) -> Vec<candle_core::quantized::GgmlDType> {
        let mut types = Vec::new();
        let linears = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain(std::iter::once(&self.embed))
            .chain(self.lm_head.as_ref());
        for linear in linears {
            if let Weights::Quantized(q) = &linear.weights {
                for t in q.dtypes() {
                    if !types.contains(&t) {
                        types.push(t);
                    }
                }
            }
        }
        types
    }

    /// The shard this rank holds.
    pub fn shard(&self) -> &ShardPlan {
        &self.shard
    }

    /// The model's config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Positions the rotary tables cover.
    pub fn max_positions(&self) -> usize {
        self.rope.max_pos()
    }

    /// An empty cache shaped for this shard.
    pub fn new_cache(&self, num_blocks: usize, block_size: usize) -> KvCache {
        KvCache::new(
            self.layers.len(),
            num_blocks,
            block_size,
            self.shard.kv_heads.len(),
            self.config.head_dim,
        )
    }

    /// Bytes one cache block takes on this rank.
    pub fn cache_bytes_per_block(&self, block_size: usize) -> usize {
        KvCache::bytes_per_block(
            self.layers.len(),
            block_size,
            self.shard.kv_heads.len(),
            self.config.head_dim,
        )
    }

    /// Runs the batch (positions and token ids checked by the runner) and returns this rank's
    /// logits for `batch.sample_rows`,
    /// `[sample_rows, vocab_local]`.
    pub fn forward(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        comm: &mut dyn Communicator,
    ) -> Result<Vec<f32>> {
        let started = Instant::now();
        let h = self.config.hidden_size;
        let x = self.residual_stream(batch, cache, comm)?;
        let s = batch.sample_rows.len();
        let mut last = Vec::with_capacity(s * h);
        for &r in &batch.sample_rows {
            last.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut last_normed = vec![0.0f32; s * h];
        rms_norm(
            &last,
            &self.final_norm,
            self.config.rms_norm_eps,
            &mut last_normed,
        );
        let logits = self.project(
            self.lm_head.as_ref().unwrap_or(&self.embed),
            &last_normed,
            s,
        );
        tracing::trace!(tokens = batch.num_tokens(), elapsed = ?started.elapsed(), "forward");
        Ok(logits)
    }

    /// Runs the batch and returns, for each of `spans` (row ranges), the sum over its rows of the
    /// hidden states after the final norm, `[spans, hidden]` (the same on every rank). For
    /// embedding sequences: no lm_head.
    pub fn pool(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        comm: &mut dyn Communicator,
        spans: &[std::ops::Range<usize>],
    ) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let x = self.residual_stream(batch, cache, comm)?;
        let mut out = vec![0.0f32; spans.len() * h];
        let mut normed = vec![0.0f32; h];
        for (span, acc) in spans.iter().zip(out.chunks_exact_mut(h)) {
            for r in span.clone() {
                rms_norm(
                    &x[r * h..(r + 1) * h],
                    &self.final_norm,
                    self.config.rms_norm_eps,
                    &mut normed,
                );
                add_into(acc, &normed);
            }
        }
        Ok(out)
    }

    /// The residual stream after the last layer, `[tokens, hidden]` (before the final norm).
    fn residual_stream(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        comm: &mut dyn Communicator,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (h, hd, n) = (c.hidden_size, c.head_dim, batch.num_tokens());
        let lora = self.lora.segments(batch)?;
        let mut x = self.embed(&batch.token_ids, comm)?;
        let mut normed = vec![0.0f32; n * h];
        let q_w = self.shard.q_heads.len() * hd;
        let kv_w = self.shard.kv_heads.len() * hd;
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_norm, c.rms_norm_eps, &mut normed);
            let mut qkv = self.project(&layer.qkv, &normed, n);
            lora.apply(
                li,
                &[P::Q, P::K, P::V],
                (&normed, h),
                (&mut qkv, q_w + 2 * kv_w),
            );
            let (mut q, mut k, mut v) = (
                Vec::with_capacity(n * q_w),
                Vec::with_capacity(n * kv_w),
                Vec::with_capacity(n * kv_w),
            );
            for row in qkv.chunks_exact(q_w + 2 * kv_w) {
                q.extend_from_slice(&row[..q_w]);
                k.extend_from_slice(&row[q_w..q_w + kv_w]);
                v.extend_from_slice(&row[q_w + kv_w..]);
            }
            self.rope.apply(&mut q, q_w, &batch.positions);
            self.rope.apply(&mut k, kv_w, &batch.positions);
            let attn = paged_attention(
                cache,
                li,
                batch,
                &AttentionInput {
                    q: &q,
                    k: &k,
                    v: &v,
                    q_heads: self.shard.q_heads.len(),
                    kv_head_of: &self.kv_head_of,
                },
            );
            let mut o = self.project(&layer.o, &attn, n);
            lora.apply(li, &[P::O], (&attn, q_w), (&mut o, h));
            comm.all_reduce_sum(&mut o)?;
            add_into(&mut x, &o);
            rms_norm(&x, &layer.post_norm, c.rms_norm_eps, &mut normed);
            let inter = layer.down.cols;
            let mut gate_up = self.project(&layer.gate_up, &normed, n);
            lora.apply(
                li,
                &[P::Gate, P::Up],
                (&normed, h),
                (&mut gate_up, 2 * inter),
            );
            let mut act = vec![0.0f32; n * inter];
            silu_mul(&gate_up, inter, &mut act);
            let mut down = self.project(&layer.down, &act, n);
            lora.apply(li, &[P::Down], (&act, inter), (&mut down, h));
            comm.all_reduce_sum(&mut down)?;
            add_into(&mut x, &down);
        }
        Ok(x)
    }

    /// Vocab-parallel lookup: rows outside this rank's slice are zero, then summed over ranks.
    fn embed(&self, tokens: &[u32], comm: &mut dyn Communicator) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let mut x = vec![0.0f32; tokens.len() * h];
        for (dst, &t) in x.chunks_exact_mut(h).zip(tokens) {
            let t = t as usize;
            if self.shard.vocab.contains(&t) {
                self.embed.row_into(t - self.shard.vocab.start, dst);
            }
        }
        if self.shard.world_size > 1 {
            comm.all_reduce_sum(&mut x)?;
        }
        Ok(x)
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += *b;
    }
}
