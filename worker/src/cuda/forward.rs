//! One forward pass of the Llama-family model on the GPU, issued on the worker's stream:
//!
//! embedding (vocab-parallel, all-reduce) -> per layer the attention block (RMSNorm fused with
//! the previous sublayer's residual add, QKV projection (+bias), RoPE with the KV-cache write,
//! paged attention (small decode steps: one kernel for RoPE, the cache write and attention), o
//! projection, all-reduce) and the MLP block (residual + RMSNorm, gate/up
//! projection, SiLU-mul, down projection, all-reduce), each projection followed by its LoRA
//! delta when the step has rows with adapters -> residual + final RMSNorm, the rows that
//! sample, the lm_head over this rank's (padded) vocabulary slice, the gather over ranks, and the
//! sampled tokens (rank 0 samples, NCCL broadcasts). Embedding steps stop after the final
//! RMSNorm (`hidden_states`).
//!
//! With one rank, an o or down projection that runs on cuBLAS (a weight in the dtype or a 4-bit
//! one dequantized for it) or on cuBLASLt's FP8 GEMM with every scale applied by cuBLASLt adds
//! its product to the residual stream itself (one rounding of the sum, where the separate add
//! rounds the product first), so the next RMSNorm reads one tensor and writes one instead of
//! reading two and writing two. Where a product runs on FP8 activations quantized per row, the
//! RMSNorm or SiLU-mul before it writes them (`fp8.rs`), and its output in the dtype only when
//! a LoRA delta reads it.
//!
//! The same code runs eagerly and under CUDA-graph capture: every step-dependent value (tokens,
//! positions, slots, tiles, sampling parameters, block tables, contexts) is read from device
//! memory, and the only host-side choices (which attention kernel, how many key splits, grid
//! sizes) come from the `StepView`, which a graph fixes at capture.

use super::device::Gpu;
use super::fp8::Fp8Operands;
use super::kernels::{
    attention_max_items, AttentionShape, DecodeAttention, Fed, Kernels, Lane, Product,
    ResidualNorm, RopeKvWrite,
};
use super::linear::Linear;
use super::lora::FusedProduct;
use super::model::{CudaModel, Dims, GpuKvCache, Layer};
use super::nccl::Nccl;
use super::peer_all_reduce::PeerAllReduce;
use super::phases::PhaseTimer;
use super::step_inputs::InputPointers;
use super::workspace::Workspace;
use crate::error::Result;

/// Which attention kernel a step runs, with its launch shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPlan {
    /// Tensor-core kernel (prefill chunks): tiles of up to `Kernels::attention_mma_items` (row, head)
    /// items, no key splits; the last `decode_tiles` tiles (one row each) on the tensor-core
    /// decode kernel, unsplit.
    Mma { decode_tiles: usize },
    /// CUDA-core kernel: tiles of up to `items` (row, head) items, `splits` key splits of
    /// `split_len` keys.
    Simt {
        items: usize,
        splits: usize,
        split_len: usize,
    },
    /// Decode kernel: one row per tile, `splits` key splits sized per row on the device, RoPE
    /// and the cache write folded in.
    Decode { splits: usize },
    /// Tensor-core decode kernel: one row per tile, `splits` key splits sized per row on the
    /// device, after `rope_kv_write`.
    DecodeMma { splits: usize },
}

impl AttentionPlan {
    /// Query rows of one sequence per tile, for a model with `group` query heads per KV head,
    /// where a tensor-core attention block holds `mma_items` (row, head) items.
    pub fn tile_rows(
        kind: AttentionKind,
        head_dim: usize,
        group: usize,
        mma_items: usize,
    ) -> usize {
        let items = match kind {
            AttentionKind::Mma => mma_items,
            AttentionKind::Simt => attention_max_items(head_dim),
            AttentionKind::Decode | AttentionKind::DecodeMma => return 1,
        };
        (items / group.max(1)).max(1)
    }

    fn splits(&self) -> usize {
        match *self {
            Self::Mma { .. } => 1,
            Self::Simt { splits, .. } | Self::Decode { splits } | Self::DecodeMma { splits } => {
                splits
            }
        }
    }
}

/// The kernel family of a step, decided before its inputs are packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionKind {
    Mma,
    Simt,
    Decode,
    DecodeMma,
}

/// Decode steps of at least this many rows run the tensor-core decode attention (plus a
/// `rope_kv_write` launch); smaller ones the CUDA-core kernel with RoPE and the cache write
/// folded in. On an H200 the tensor-core kernel reads 16 rows of 1,024 keys in 37 us a layer
/// against 52, 256 rows in 274 against 511; at 1 row both take about a launch
/// (tests/gpu/decode_attention_bench.cu, docs/PERFORMANCE.md run 15), so the small steps keep
/// the one launch.
pub const DECODE_MMA_MIN_ROWS: usize = 8;

impl AttentionKind {
    /// The decode kernel for a step of `rows` one-row sequences of a model with `group` query
    /// heads per KV head, on a cache of `block_size`-slot blocks; `None` when neither decode
    /// kernel runs the model.
    pub fn for_decode(
        rows: usize,
        head_dim: usize,
        group: usize,
        block_size: usize,
    ) -> Option<Self> {
        if rows >= DECODE_MMA_MIN_ROWS
            && Kernels::has_decode_mma_attention(head_dim, group, block_size)
        {
            Some(Self::DecodeMma)
        } else if Kernels::has_decode_attention(head_dim, group) {
            Some(Self::Decode)
        } else {
            None
        }
    }
}

/// A step's inputs on the device and the launch shapes they imply.
#[derive(Debug, Clone, Copy)]
pub struct StepView {
    /// Token rows (padded for a graph).
    pub rows: usize,
    /// Sampled rows (padded for a graph).
    pub samples: usize,
    pub inputs: InputPointers,
    pub num_tiles: usize,
    pub attention: AttentionPlan,
    /// LoRA tiles at `inputs.lora_tiles` (0: no row has an adapter, no LoRA kernel runs).
    pub lora_tiles: usize,
}

/// The device objects one pass uses.
pub struct Device<'a> {
    pub gpu: &'a Gpu,
    pub kernels: &'a Kernels,
    pub linear: &'a Linear,
    pub nccl: Option<&'a Nccl>,
    /// The one-shot all-reduce over peer memory, for the messages it takes.
    pub peer: Option<&'a PeerAllReduce>,
    pub rank: usize,
}

impl Device<'_> {
    /// In-place sum over ranks (nothing with one rank).
    fn all_reduce(&self, model: &CudaModel, buf: u64, count: usize) -> Result<()> {
        let bytes = count * model.dtype().bytes();
        if let Some(peer) = self.peer.filter(|p| p.handles(buf, bytes)) {
            return peer.all_reduce(self.kernels, buf, bytes);
        }
        match self.nccl {
            Some(comm) if comm.world_size() > 1 => {
                comm.all_reduce_sum(buf, count, model.dtype().nccl(), &self.gpu.stream)
            }
            _ => Ok(()),
        }
    }
}

/// Where a pass left its results.
pub struct ForwardOutput {
    /// Logits of the sample rows, `[world][samples][vocab_per_rank]`.
    pub logits: u64,
    pub samples: usize,
    /// The sampled tokens, u32 `[samples]`, the same on every rank.
    pub sampled: u64,
}

/// Issues one forward pass and the sampling of its sample rows. `timed` records the per-phase
/// GPU time when `TPSERVE_CUDA_PHASES=1` (never under capture).
pub fn forward(
    dev: &Device,
    model: &CudaModel,
    cache: &GpuKvCache,
    ws: &Workspace,
    v: &StepView,
    timed: bool,
) -> Result<ForwardOutput> {
    let pass = Pass {
        dev,
        model,
        cache,
        ws,
        v,
        d: *model.dims(),
        sub_pending: std::cell::Cell::new(false),
    };
    let mut timer = if timed {
        PhaseTimer::start(dev.gpu)
    } else {
        PhaseTimer::off()
    };
    pass.embed()?;
    timer.mark(dev.gpu, "embedding");
    for (li, layer) in model.layers.iter().enumerate() {
        pass.attention_block(li, layer, &mut timer)?;
        pass.mlp_block(li, layer, &mut timer)?;
    }
    let out = pass.head(&mut timer)?;
    timer.mark(dev.gpu, "lm_head + sampling");
    timer.finish();
    Ok(out)
}

/// Issues a pass without the lm_head and sampling, for embedding steps: leaves the hidden
/// states after the final RMSNorm, `[v.rows, hidden]` in the model's dtype, in `ws.normed`
/// (the same on every rank after the last all-reduce).
pub fn hidden_states(
    dev: &Device,
    model: &CudaModel,
    cache: &GpuKvCache,
    ws: &Workspace,
    v: &StepView,
) -> Result<()> {
    let pass = Pass {
        dev,
        model,
        cache,
        ws,
        v,
        d: *model.dims(),
        sub_pending: std::cell::Cell::new(false),
    };
    let mut timer = PhaseTimer::off();
    pass.embed()?;
    for (li, layer) in model.layers.iter().enumerate() {
        pass.attention_block(li, layer, &mut timer)?;
        pass.mlp_block(li, layer, &mut timer)?;
    }
    pass.reduce_residual_norm(model.final_norm.ptr, v.rows, &mut timer)
}

/// What one pass reads: the device, the weights, the cache, the activations and the step.
struct Pass<'a> {
    dev: &'a Device<'a>,
    model: &'a CudaModel,
    cache: &'a GpuKvCache,
    ws: &'a Workspace,
    v: &'a StepView,
    d: Dims,
    /// Whether `ws.sub` holds a sublayer's output not yet added to the residual stream `ws.x`
    /// (false after the embedding, and after a projection that added its product itself).
    sub_pending: std::cell::Cell<bool>,
}

impl Pass<'_> {
    /// `y[rows, n_out] = x[rows, k] w^T` on the kernel chosen for the shape.
    fn linear(&self, p: Product) -> Result<()> {
        self.dev.linear.run(self.dev.kernels, &p)
    }

    /// A sublayer's last projection `p` (into `ws.sub`) with its LoRA delta. With one rank,
    /// where `p` runs on cuBLAS, it is added to the residual stream `ws.x` instead (the sum
    /// rounded once) and nothing is left pending; otherwise `ws.sub` holds it for the next
    /// `reduce_residual_norm`.
    fn residual_product(&self, li: usize, fused: FusedProduct, p: Product) -> Result<()> {
        let single_rank =
            self.dev.peer.is_none() && self.dev.nccl.is_none_or(|comm| comm.world_size() == 1);
        let into_x = Product {
            y: self.ws.x.ptr,
            ..p
        };
        if single_rank && self.dev.linear.try_accumulate(self.dev.kernels, &into_x)? {
            self.sub_pending.set(false);
            return self.lora(li, fused, into_x.y, p.x);
        }
        self.linear(p)?;
        self.sub_pending.set(true);
        self.lora(li, fused, p.y, p.x)
    }

    /// Adds the LoRA delta of `fused` of layer `li` to its output `y` (input `x`) for the rows
    /// with adapters; nothing when the step has none.
    fn lora(&self, li: usize, fused: FusedProduct, y: u64, x: u64) -> Result<()> {
        let Some(slots) = self.model.lora().filter(|_| self.v.lora_tiles > 0) else {
            return Ok(());
        };
        let t = self.ws.lora_scratch.ptr;
        let (tiles, n) = (self.v.inputs.lora_tiles, self.v.lora_tiles);
        let rows = self.v.rows;
        self.dev
            .kernels
            .lora_delta(&slots.product(li, fused, (y, x, rows), t, tiles, n))
    }

    /// The sublayer output `sub` summed over ranks, added to the residual stream `x`, and
    /// `x`'s RMSNorm with `weight` into `normed`: one fused kernel where the peer all-reduce
    /// takes the message, else the all-reduce (NCCL; nothing with one rank) and the norm. With
    /// nothing pending in `sub` (after the embedding, or a projection that added itself to
    /// `x`), the norm alone.
    fn reduce_residual_norm(&self, weight: u64, n: usize, timer: &mut PhaseTimer) -> Result<()> {
        self.reduce_residual_norm_into(weight, n, None, timer)
            .map(drop)
    }

    /// [`Self::reduce_residual_norm`] for the input of `next`, a product reading `ws.normed`:
    /// where `next` runs on FP8 activations quantized per row and one norm kernel makes them,
    /// that kernel quantizes its output for it (writing `ws.normed` itself only when a LoRA
    /// delta reads it). Returns `next` with its operands saying so.
    fn norm_for(&self, weight: u64, next: Product, timer: &mut PhaseTimer) -> Result<Product> {
        let fp8 = next
            .fp8
            .filter(|_| self.dev.linear.quantizes_rows(&next) && Kernels::fuses_norm_fp8(next.k));
        let ready = self.reduce_residual_norm_into(weight, next.rows, fp8, timer)?;
        Ok(Product {
            fp8: next.fp8.map(|f| Fp8Operands {
                x_ready: ready,
                ..f
            }),
            ..next
        })
    }

    /// Whether this step adds LoRA deltas (which read the products' inputs in the dtype).
    fn lora_active(&self) -> bool {
        self.model.lora().is_some() && self.v.lora_tiles > 0
    }

    /// The norm of [`Self::reduce_residual_norm`], quantizing its rows into `fp8`'s operands
    /// too when given and one norm kernel runs (true); with the all-reduce fused in, or none
    /// given, the norm alone (false).
    fn reduce_residual_norm_into(
        &self,
        weight: u64,
        n: usize,
        fp8: Option<Fp8Operands>,
        timer: &mut PhaseTimer,
    ) -> Result<bool> {
        let (d, ws, k) = (&self.d, self.ws, self.dev.kernels);
        let eps = self.model.rms_norm_eps();
        let normed = (fp8.is_none() || self.lora_active()).then_some(ws.normed.ptr);
        let quantized = fp8.map(|f| (f.x_q, f.x_stats));
        if !self.sub_pending.replace(false) {
            match quantized {
                Some(q) => {
                    k.rms_norm_fp8_rows(normed, q, ws.x.ptr, None, weight, n, d.hidden, eps)?
                }
                None => k.rms_norm(ws.normed.ptr, ws.x.ptr, weight, n, d.hidden, eps)?,
            }
            timer.mark(self.dev.gpu, "rms_norm");
            return Ok(quantized.is_some());
        }
        let norm = ResidualNorm {
            out: ws.normed.ptr,
            x: ws.x.ptr,
            sub: ws.sub.ptr,
            weight,
            n,
            hidden: d.hidden,
            eps,
        };
        if let Some(peer) = self.dev.peer {
            if peer.residual_norm(k, &norm)? {
                timer.mark(self.dev.gpu, "all-reduce + rms_norm");
                return Ok(false);
            }
        }
        self.dev.all_reduce(self.model, ws.sub.ptr, n * d.hidden)?;
        timer.mark(self.dev.gpu, "all-reduce");
        match quantized {
            Some(q) => {
                k.rms_norm_fp8_rows(normed, q, norm.x, Some(norm.sub), weight, n, d.hidden, eps)?
            }
            None => {
                k.rms_norm_residual(norm.out, norm.x, norm.sub, weight, n, d.hidden, norm.eps)?
            }
        }
        timer.mark(self.dev.gpu, "rms_norm");
        Ok(quantized.is_some())
    }

    /// The token embeddings into the residual stream (vocab-parallel, summed over ranks).
    fn embed(&self) -> Result<()> {
        let (d, ws, n) = (&self.d, self.ws, self.v.rows);
        let ids = Fed {
            ids: self.v.inputs.ids,
            feed: self.v.inputs.feed,
            fed: ws.sampled.ptr,
        };
        self.dev.kernels.embedding(
            ws.x.ptr,
            self.model.embed.ptr,
            ids,
            n,
            d.hidden,
            d.vocab_start,
            d.vocab_local,
        )?;
        self.dev.all_reduce(self.model, ws.x.ptr, n * d.hidden)
    }

    /// Residual + RMSNorm, QKV, RoPE with the cache write, attention, o projection, all-reduce
    /// (the decode attention does the RoPE and the cache write itself).
    fn attention_block(&self, li: usize, layer: &Layer, timer: &mut PhaseTimer) -> Result<()> {
        let (d, ws, n, k) = (&self.d, self.ws, self.v.rows, self.dev.kernels);
        let gpu = self.dev.gpu;
        let qkv = Product {
            y: ws.qkv.ptr,
            x: ws.normed.ptr,
            w: layer.qkv.data.ptr,
            fp8: layer.qkv.fp8(ws),
            int4: layer.qkv.int4(self.model),
            rows: n,
            n_out: d.qkv,
            k: d.hidden,
        };
        let qkv = self.norm_for(layer.input_norm.ptr, qkv, timer)?;
        self.linear(qkv)?;
        if let Some(bias) = &layer.qkv_bias {
            k.add_bias(ws.qkv.ptr, bias.ptr, n, d.qkv)?;
        }
        self.lora(li, FusedProduct::Qkv, ws.qkv.ptr, ws.normed.ptr)?;
        timer.mark(gpu, "gemm qkv");
        // The decode attention rotates the queries and writes the new keys and values itself.
        if !matches!(self.v.attention, AttentionPlan::Decode { .. }) {
            k.rope_kv_write(&RopeKvWrite {
                qkv: ws.qkv.ptr,
                cache: self.cache.layers[li].args(),
                slots: self.v.inputs.slots,
                positions: self.v.inputs.positions,
                cos: self.model.rope_cos.ptr,
                sin: self.model.rope_sin.ptr,
                n,
                q_heads: d.q_heads,
                kv_heads: d.kv_heads,
                head_dim: d.head_dim,
                stride: d.qkv,
            })?;
            timer.mark(gpu, "rope + kv write");
        }
        self.attention(li)?;
        timer.mark(gpu, "attention");
        self.residual_product(
            li,
            FusedProduct::O,
            Product {
                y: ws.sub.ptr,
                x: ws.attn.ptr,
                w: layer.o.data.ptr,
                fp8: layer.o.fp8(ws),
                int4: layer.o.int4(self.model),
                rows: n,
                n_out: d.hidden,
                k: d.q_heads * d.head_dim,
            },
        )?;
        timer.mark(gpu, "gemm o");
        Ok(())
    }

    /// Paged attention of every row over its sequence's cached keys, by the view's plan.
    fn attention(&self, li: usize) -> Result<()> {
        let (d, ws, v, k) = (&self.d, self.ws, self.v, self.dev.kernels);
        let cache = self.cache.layers[li].args();
        let shape = AttentionShape {
            q_heads: d.q_heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
            block_size: self.cache.block_size,
            max_blocks_per_seq: self.cache.table_width,
            q_stride: d.qkv,
            scale: 1.0 / (d.head_dim as f32).sqrt(),
        };
        let tables = self.cache.tables.ptr;
        // The tensor-core decode kernel on `num_tiles` tiles from the address `tiles`.
        let decode_mma = |lane: Lane, tiles: u64, num_tiles: usize, splits: usize| {
            k.paged_attention_decode_mma(
                lane,
                ws.attn.ptr,
                ws.partial_out.ptr,
                ws.partial_ml.ptr,
                ws.qkv.ptr,
                &cache,
                tables,
                tiles,
                num_tiles,
                &shape,
                splits,
            )
        };
        match v.attention {
            AttentionPlan::Mma { decode_tiles } => {
                let prompt_tiles = v.num_tiles - decode_tiles;
                // A tile is 4 i32.
                let decode_at = v.inputs.tiles + (prompt_tiles * 16) as u64;
                // With a side stream the decode rows' attention runs beside the prompt rows'
                // (they write different rows of `attn`); else after it.
                let beside = prompt_tiles > 0 && decode_tiles > 0 && k.has_side_stream();
                if beside {
                    k.fork_side()?;
                }
                if prompt_tiles > 0 {
                    k.paged_attention_mma(
                        ws.attn.ptr,
                        ws.qkv.ptr,
                        &cache,
                        tables,
                        v.inputs.tiles,
                        prompt_tiles,
                        &shape,
                    )?;
                }
                if decode_tiles > 0 {
                    let lane = if beside { Lane::Side } else { Lane::Main };
                    decode_mma(lane, decode_at, decode_tiles, 1)?;
                }
                if beside {
                    k.join_side()?;
                }
            }
            AttentionPlan::Simt {
                items,
                splits,
                split_len,
            } => k.paged_attention(
                ws.attn.ptr,
                ws.partial_out.ptr,
                ws.partial_ml.ptr,
                ws.qkv.ptr,
                &cache,
                tables,
                v.inputs.tiles,
                v.num_tiles,
                items,
                &shape,
                splits,
                split_len,
            )?,
            AttentionPlan::DecodeMma { splits } => {
                decode_mma(Lane::Main, v.inputs.tiles, v.num_tiles, splits)?
            }
            AttentionPlan::Decode { splits } => k.paged_attention_decode(
                &DecodeAttention {
                    out: ws.attn.ptr,
                    partial_out: ws.partial_out.ptr,
                    partial_ml: ws.partial_ml.ptr,
                    qkv: ws.qkv.ptr,
                    cache,
                    block_tables: tables,
                    tiles: v.inputs.tiles,
                    slots: v.inputs.slots,
                    cos: self.model.rope_cos.ptr,
                    sin: self.model.rope_sin.ptr,
                    num_tiles: v.num_tiles,
                    num_splits: splits,
                },
                &shape,
            )?,
        }
        let splits = v.attention.splits();
        if splits > 1 {
            k.attention_combine(
                ws.attn.ptr,
                ws.partial_out.ptr,
                ws.partial_ml.ptr,
                v.rows,
                &shape,
                splits,
            )?;
        }
        Ok(())
    }

    /// Residual + RMSNorm, gate/up projection, SiLU-mul (in the gate/up GEMV where it is a
    /// gated one), down projection, all-reduce.
    fn mlp_block(&self, li: usize, layer: &Layer, timer: &mut PhaseTimer) -> Result<()> {
        let (d, ws, n, k) = (&self.d, self.ws, self.v.rows, self.dev.kernels);
        let gpu = self.dev.gpu;
        let gate_up = Product {
            y: ws.gate_up.ptr,
            x: ws.normed.ptr,
            w: layer.gate_up.data.ptr,
            fp8: layer.gate_up.fp8(ws),
            int4: layer.gate_up.int4(self.model),
            rows: n,
            n_out: 2 * d.inter,
            k: d.hidden,
        };
        let gate_up = self.norm_for(layer.post_norm.ptr, gate_up, timer)?;
        // No LoRA delta to add before the activation: a gated GEMV may write the activation
        // itself, and then no SiLU-mul runs.
        let into_act = Product {
            y: ws.act.ptr,
            ..gate_up
        };
        let gated = !self.lora_active() && self.dev.linear.run_gated(k, &into_act)?;
        if !gated {
            self.linear(gate_up)?;
            self.lora(li, FusedProduct::GateUp, ws.gate_up.ptr, ws.normed.ptr)?;
        }
        timer.mark(gpu, "gemm gate_up");
        let mut down = Product {
            y: ws.sub.ptr,
            x: ws.act.ptr,
            w: layer.down.data.ptr,
            fp8: layer.down.fp8(ws),
            int4: layer.down.int4(self.model),
            rows: n,
            n_out: d.hidden,
            k: d.inter,
        };
        // Where the down projection runs on FP8 activations quantized per row, the SiLU-mul
        // quantizes its rows for it (writing `ws.act` only when a LoRA delta reads it).
        let fused = self.dev.linear.quantizes_rows(&down) && Kernels::fuses_silu_fp8(d.inter);
        match down.fp8.as_mut().filter(|_| fused) {
            _ if gated => {}
            Some(fp8) => {
                let act = self.lora_active().then_some(ws.act.ptr);
                k.silu_mul_fp8_rows(act, (fp8.x_q, fp8.x_stats), ws.gate_up.ptr, n, d.inter)?;
                fp8.x_ready = true;
            }
            None => k.silu_mul(ws.act.ptr, ws.gate_up.ptr, n, d.inter)?,
        }
        timer.mark(gpu, "silu_mul");
        self.residual_product(li, FusedProduct::Down, down)?;
        timer.mark(gpu, "gemm down");
        Ok(())
    }

    /// Residual + final RMSNorm, the sample rows' logits (gathered over ranks), sampling.
    fn head(&self, timer: &mut PhaseTimer) -> Result<ForwardOutput> {
        let (d, ws, v, k) = (&self.d, self.ws, self.v, self.dev.kernels);
        let (dev, model) = (self.dev, self.model);
        let s = v.samples;
        self.reduce_residual_norm(model.final_norm.ptr, v.rows, timer)?;
        let rows = match v.inputs.sample_rows {
            Some(ids) => {
                k.gather_rows(ws.last.ptr, ws.normed.ptr, ids, s, d.hidden)?;
                ws.last.ptr
            }
            // Decode steps sample every row, in order: no gather.
            None => ws.normed.ptr,
        };
        let head = model.lm_head.as_ref().unwrap_or(&model.embed);
        self.linear(Product {
            y: ws.logits.ptr,
            x: rows,
            w: head.ptr,
            rows: s,
            n_out: d.vocab_per_rank,
            k: d.hidden,
            fp8: None,
            int4: None,
        })?;
        let logits = match dev.nccl {
            Some(comm) if comm.world_size() > 1 => {
                comm.all_gather(
                    ws.logits.ptr,
                    ws.gathered.ptr,
                    s * d.vocab_per_rank,
                    model.dtype().nccl(),
                    &dev.gpu.stream,
                )?;
                ws.gathered.ptr
            }
            _ => ws.logits.ptr,
        };
        if s > 0 {
            if dev.rank == 0 {
                k.sample(
                    ws.sampled.ptr,
                    logits,
                    s,
                    d.vocab_per_rank,
                    d.vocab,
                    &v.inputs.sampling,
                )?;
            }
            if let Some(comm) = dev.nccl.filter(|c| c.world_size() > 1) {
                comm.broadcast_from_root(
                    ws.sampled.ptr,
                    s,
                    cudarc::nccl::sys::ncclDataType_t::ncclUint32,
                    &dev.gpu.stream,
                )?;
            }
        }
        Ok(ForwardOutput {
            logits,
            samples: s,
            sampled: ws.sampled.ptr,
        })
    }
}
