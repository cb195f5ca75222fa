//! The Llama-family transformer on one GPU, for one tensor-parallel shard, in bfloat16 or
//! float16: the same shard split and the same layer order as the CPU model (`cpu::model`), with
//! the work done by our kernels, cuBLAS and NCCL:
//!
//! embedding (vocab-parallel, all-reduce) -> per layer: RMSNorm (fused with the residual add of
//! the previous sublayer) -> QKV GEMM (+bias) -> RoPE -> KV-cache write by slot -> paged attention
//! -> o_proj GEMM -> all-reduce -> residual + RMSNorm -> gate/up GEMM -> SiLU-mul -> down GEMM ->
//! all-reduce; then residual + final RMSNorm, the rows that sample, and the lm_head GEMM over this
//! rank's (padded) vocabulary slice.
//!
//! This module holds the weights and the cache; `loader` puts the weights on the device,
//! `forward` issues a pass, `workspace` holds the activations and `graphs` replays decode steps.

use tpserve_modelfile::LlamaConfig;

use super::device::{DeviceBuffer, Gpu};
use super::fp8::{Fp8Operands, Fp8Weight};
use super::int4::{gemm_counters, Int4Operands, Int4Weight, GATHERED_ROWS};
use super::kernels::{attention_max_items, CacheLayer, Dtype, Kernels, ELEM};
use super::linear::FP8_ROW_SCALES_MIN_ROWS;
use super::loader::Loader;
use super::lora::LoraSlots;
use super::workspace::Workspace;
use crate::error::{Result, WorkerError};
use crate::kv_cache_dtype::{layer_kv_scales, KvCacheDtype};
use crate::rope::Rope;
use crate::shard::ShardPlan;
use crate::weights::{ensure_supported, model_parts, WeightSource};

/// Sizes of this rank's shard.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub head_dim: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub inter: usize,
    /// Columns of the fused QKV output: `(q_heads + 2 kv_heads) * head_dim`.
    pub qkv: usize,
    /// Rows of this rank's embedding and lm_head, padded to the same count on every rank.
    pub vocab_per_rank: usize,
    pub vocab_start: usize,
    pub vocab_local: usize,
    pub vocab: usize,
    pub world_size: usize,
}

/// A linear layer's weight in PyTorch's Linear layout `[out, in]`: in the activation dtype, in
/// FP8 E4M3 with its scales (`fp8.rs`), or in 4-bit words with their groups (`int4.rs`).
pub struct LinearWeight {
    pub data: DeviceBuffer,
    pub fp8: Option<Fp8Weight>,
    pub int4: Option<Int4Weight>,
}

impl LinearWeight {
    /// What a product with this weight needs beyond its address, with `ws`'s room for the
    /// quantized activations: `None` for a weight in the dtype.
    pub fn fp8(&self, ws: &Workspace) -> Option<Fp8Operands> {
        self.fp8.as_ref().map(|w| Fp8Operands {
            w_scale: w.scales.at(w.scale_offset),
            w_scale_per_row: w.per_row,
            w_rows: w.scales.at(w.rows_offset),
            x_static: w.static_input.map(|o| w.scales.at(o)),
            x_q: ws.fp8_x.ptr,
            x_stats: ws.fp8_stats.ptr,
            x_ready: false,
        })
    }

    /// What a product with this weight needs beyond its address when it is 4-bit, with
    /// `model`'s scratch for the weight dequantized.
    pub fn int4(&self, model: &CudaModel) -> Option<Int4Operands> {
        self.int4.as_ref().map(|w| Int4Operands {
            params: w.params.ptr,
            group_size: w.group_size,
            scratch: model.int4_scratch.as_ref().map_or(0, |b| b.ptr),
            counters: model.int4_counters.as_ref().map_or(0, |b| b.ptr),
            perm: w.perm.as_ref().map_or(0, |b| b.ptr),
            gathered: model.int4_gathered.as_ref().map_or(0, |b| b.ptr),
        })
    }
}

/// Where linear weights are held in FP8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Load {
    /// Nowhere: every weight in the dtype (an FP8 checkpoint's dequantized).
    Off,
    /// Where the checkpoint stores them in FP8 with per-tensor or per-row scales, as stored.
    Checkpoint,
    /// Everywhere: the checkpoint's FP8 weights as stored, the others quantized at load
    /// (`--quantization fp8`).
    Always,
}

/// Every layer's linear weights: qkv, o, gate_up and down.
fn linear_weights(layers: &[Layer]) -> impl Iterator<Item = &LinearWeight> {
    layers
        .iter()
        .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
}

/// How the loader holds quantized linear weights, and what the KV cache will store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizedLoad {
    pub fp8: Fp8Load,
    /// Keep an AWQ/GPTQ checkpoint's 4-bit weights packed where the layout holds them.
    pub int4: bool,
    /// The KV cache's element (FP8 takes each layer's scales from the checkpoint).
    pub kv_cache: KvCacheDtype,
}

/// One decoder layer's weights.
pub struct Layer {
    pub input_norm: DeviceBuffer,
    /// q, k and v projections stacked: `[qkv, hidden]`.
    pub qkv: LinearWeight,
    pub qkv_bias: Option<DeviceBuffer>,
    pub o: LinearWeight,
    pub post_norm: DeviceBuffer,
    /// gate and up projections stacked: `[2 inter, hidden]`.
    pub gate_up: LinearWeight,
    pub down: LinearWeight,
}

/// The paged KV cache: per layer, keys and values `[num_blocks, block_size, kv_heads, head_dim]`
/// in the compute dtype or FP8 E4M3 (`--kv-cache-dtype fp8`); and the block tables of the
/// sequences it serves, `[table_rows, table_width]` i32, one row per sequence slot
/// (`SeqSlice::slot`), kept on the device and updated in place each step.
pub struct GpuKvCache {
    pub layers: Vec<KvLayer>,
    pub num_blocks: usize,
    pub block_size: usize,
    pub tables: DeviceBuffer,
    pub table_rows: usize,
    pub table_width: usize,
}

/// One layer's keys and values in the cache, with the scales an FP8 cache divides them by
/// (1 for a cache in the compute dtype).
pub struct KvLayer {
    pub key: DeviceBuffer,
    pub value: DeviceBuffer,
    pub k_scale: f32,
    pub v_scale: f32,
}

impl KvLayer {
    /// The layer as the attention kernels take it.
    pub fn args(&self) -> CacheLayer {
        CacheLayer {
            key: self.key.ptr,
            value: self.value.ptr,
            k_scale: self.k_scale,
            v_scale: self.v_scale,
        }
    }
}

/// The model's weights on this GPU.
pub struct CudaModel {
    config: LlamaConfig,
    shard: ShardPlan,
    dtype: Dtype,
    dims: Dims,
    pub layers: Vec<Layer>,
    /// `[vocab_per_rank, hidden]`, padded with zero rows.
    pub embed: DeviceBuffer,
    /// `[vocab_per_rank, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<DeviceBuffer>,
    pub final_norm: DeviceBuffer,
    /// f32 `[max_pos, head_dim / 2]`.
    pub rope_cos: DeviceBuffer,
    pub rope_sin: DeviceBuffer,
    max_pos: usize,
    weight_bytes: usize,
    /// Some linear layers' weights are FP8.
    fp8: bool,
    /// Room for the largest 4-bit weight dequantized (products above `int4::GEMM_ROWS` rows),
    /// and for the 4-bit GEMM's parts' sums below, when some linear layers' weights are 4-bit.
    int4_scratch: Option<DeviceBuffer>,
    /// The 4-bit GEMM's counters (u32, zero between products), one for each of its column
    /// blocks of the widest 4-bit weight.
    int4_counters: Option<DeviceBuffer>,
    /// Room for `GATHERED_ROWS` rows of inputs in an act-order weight's order (a GEMV's rows,
    /// or a chunk of a larger product's), when some 4-bit weights have one.
    int4_gathered: Option<DeviceBuffer>,
    workspace: Option<Workspace>,
    /// The adapter slots, with `--enable-lora`.
    lora: Option<LoraSlots>,
    /// What the KV cache stores, and each layer's (key, value) scales for an FP8 cache.
    kv_cache: KvCacheDtype,
    kv_scales: Vec<(f32, f32)>,
}

impl CudaModel {
    /// Loads this rank's shard onto `gpu`, the linear layers' weights in FP8 or kept 4-bit
    /// where `quantized` says (the caller checks the GPU runs FP8).
    pub fn load(
        gpu: &Gpu,
        kernels: &Kernels,
        config: &LlamaConfig,
        shard: ShardPlan,
        source: &WeightSource,
        dtype: Dtype,
        quantized: QuantizedLoad,
    ) -> Result<Self> {
        let QuantizedLoad {
            fp8,
            int4,
            kv_cache,
        } = quantized;
        let c = config;
        ensure_supported(c)?;
        if !Kernels::supports_head_dim(c.head_dim) {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "head size {} on CUDA (the attention kernel has 64, 128 and 256)",
                    c.head_dim
                ),
            });
        }
        let (h, hd) = (c.hidden_size, c.head_dim);
        let vocab_per_rank = c.vocab_size.div_ceil(shard.world_size);
        let dims = Dims {
            hidden: h,
            head_dim: hd,
            q_heads: shard.q_heads.len(),
            kv_heads: shard.kv_heads.len(),
            inter: shard.intermediate.len(),
            qkv: (shard.q_heads.len() + 2 * shard.kv_heads.len()) * hd,
            vocab_per_rank,
            vocab_start: shard.vocab.start,
            vocab_local: shard.vocab.len(),
            vocab: c.vocab_size,
            world_size: shard.world_size,
        };
        let group = dims.q_heads / dims.kv_heads.max(1);
        if group > attention_max_items(hd) {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "{group} query heads per KV head with head size {hd} on CUDA (at most {})",
                    attention_max_items(hd)
                ),
            });
        }
        let widths = [dims.hidden, dims.inter, dims.qkv, dims.q_heads * hd];
        let fp8 = match (fp8, widths.iter().all(|w| w.is_multiple_of(16))) {
            (Fp8Load::Always, false) => {
                return Err(WorkerError::Unsupported {
                    detail: format!(
                        "quantization fp8 needs the hidden size, intermediate size, QKV and \
                         attention widths per rank to be multiples of 16 (cuBLASLt's FP8 \
                         alignment); they are {widths:?}"
                    ),
                })
            }
            (Fp8Load::Checkpoint, false) => {
                tracing::warn!(
                    ?widths,
                    "widths per rank are not multiples of 16 (cuBLASLt's FP8 alignment): FP8 \
                     weights are dequantized to the dtype"
                );
                Fp8Load::Off
            }
            (f, _) => f,
        };
        let mut ld = Loader {
            gpu,
            kernels,
            dtype,
            source,
            bytes: 0,
            fp8,
            any_fp8: false,
            int4,
        };
        let parts = model_parts(c, &shard, source);
        let mut layers = Vec::with_capacity(parts.layers.len());
        for lp in &parts.layers {
            layers.push(Layer {
                input_norm: ld.one(&lp.input_norm)?,
                qkv: ld.linear(&lp.qkv)?,
                qkv_bias: lp.qkv_bias.as_deref().map(|b| ld.fused(b)).transpose()?,
                o: ld.linear(std::slice::from_ref(&lp.o))?,
                post_norm: ld.one(&lp.post_norm)?,
                gate_up: ld.linear(&lp.gate_up)?,
                down: ld.linear(std::slice::from_ref(&lp.down))?,
            });
        }
        // Both padded to the same row count on every rank, so gathered logits line up.
        let embed = ld.padded(std::slice::from_ref(&parts.embed), vocab_per_rank * h)?;
        let lm_head = parts
            .lm_head
            .as_ref()
            .map(|p| ld.padded(std::slice::from_ref(p), vocab_per_rank * h))
            .transpose()?;
        let final_norm = ld.one(&parts.final_norm)?;
        let kv_scales = match kv_cache {
            KvCacheDtype::Compute => vec![(1.0, 1.0); layers.len()],
            KvCacheDtype::Fp8E4M3 => (0..layers.len())
                .map(|l| layer_kv_scales(source, l))
                .collect::<Result<_>>()?,
        };
        // The largest 4-bit weight's elements: two a byte of its words.
        let int4_largest = linear_weights(&layers)
            .filter(|w| w.int4.is_some())
            .map(|w| w.data.bytes * 2)
            .max();
        let int4_scratch = int4_largest
            .map(|n| gpu.alloc(n * ELEM, "4-bit weights dequantized"))
            .transpose()?;
        let int4_counters = int4_largest
            .map(|n| gpu.alloc(gemm_counters(n) * 4, "4-bit GEMM counters"))
            .transpose()?;
        // The most inputs of an act-order weight: an i32 each in its permutation.
        let int4_gathered = linear_weights(&layers)
            .filter_map(|w| w.int4.as_ref()?.perm.as_ref().map(|p| p.bytes / 4))
            .max()
            .map(|k| gpu.alloc(GATHERED_ROWS * k * ELEM, "4-bit act-order inputs"))
            .transpose()?;
        let max_pos = c.max_position_embeddings;
        let rope = Rope::new(c, max_pos);
        let (cos, sin) = rope.tables();
        let rope_cos = gpu.alloc(cos.len() * 4, "rotary tables")?;
        gpu.upload(&rope_cos, cos)?;
        let rope_sin = gpu.alloc(sin.len() * 4, "rotary tables")?;
        gpu.upload(&rope_sin, sin)?;
        gpu.sync()?;
        Ok(Self {
            config: c.clone(),
            shard,
            dtype,
            dims,
            layers,
            embed,
            lm_head,
            final_norm,
            rope_cos,
            rope_sin,
            max_pos,
            weight_bytes: ld.bytes,
            fp8: ld.any_fp8,
            int4_scratch,
            int4_counters,
            int4_gathered,
            workspace: None,
            lora: None,
            kv_cache,
            kv_scales,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn shard(&self) -> &ShardPlan {
        &self.shard
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Whether some linear layers' weights are FP8.
    pub fn fp8(&self) -> bool {
        self.fp8
    }

    /// How the 4-bit weights are held and multiplied (`/v1/models`' `quantization` shows it
    /// after `int4`), or `None` when no weight is.
    pub fn int4_weight_types(&self) -> Option<String> {
        let packed: Vec<&Int4Weight> = linear_weights(&self.layers)
            .filter_map(|w| w.int4.as_ref())
            .collect();
        if packed.is_empty() {
            return None;
        }
        let groups: std::collections::BTreeSet<usize> =
            packed.iter().map(|q| q.group_size).collect();
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        let act_order = match packed.iter().filter(|q| q.perm.is_some()).count() {
            0 => String::new(),
            n => format!(", {n} of them in act-order (inputs gathered by group)"),
        };
        let unpacked = match linear_weights(&self.layers)
            .filter(|w| w.int4.is_none())
            .count()
        {
            0 => String::new(),
            n => format!(" ({n} linear layers dequantized to the dtype)"),
        };
        Some(format!(
            "4-bit integer linear weights in groups of {} inputs{act_order}{unpacked}; up to 8 \
             rows a GEMV unpacks them, above they are dequantized for cuBLAS; embedding and \
             lm_head in the dtype",
            groups.join(" and ")
        ))
    }

    /// How the FP8 weights are held and multiplied (`/v1/models`' `quantization` shows it
    /// after `fp8`).
    pub fn fp8_weight_types(&self) -> String {
        let mut scales = std::collections::BTreeSet::new();
        let mut activations = std::collections::BTreeSet::new();
        let mut in_dtype = 0;
        let dynamic =
            format!("dynamic (per token from {FP8_ROW_SCALES_MIN_ROWS} rows, per product below)");
        for w in linear_weights(&self.layers) {
            let Some(f) = &w.fp8 else {
                in_dtype += 1;
                continue;
            };
            scales.insert(if f.per_row { "per-row" } else { "per-tensor" });
            activations.insert(match f.static_input {
                Some(_) => "static per-tensor",
                None => dynamic.as_str(),
            });
        }
        let join =
            |s: std::collections::BTreeSet<&str>| s.into_iter().collect::<Vec<_>>().join(" and ");
        let unquantized = match in_dtype {
            0 => String::new(),
            n => format!(" ({n} linear layers in the dtype)"),
        };
        format!(
            "E4M3 linear weights with {} scales{unquantized}; above 8 rows activations {} E4M3 \
             (cuBLASLt), up to 8 in the dtype; embedding and lm_head in the dtype",
            join(scales),
            join(activations)
        )
    }

    /// Allocates `slots` adapter slots of rank up to `max_rank` (before the workspace, whose
    /// LoRA scratch they size, and the memory profile, which then counts them).
    pub fn enable_lora(&mut self, gpu: &Gpu, slots: usize, max_rank: usize) -> Result<usize> {
        self.workspace = None;
        let lora = LoraSlots::new(
            gpu,
            &self.dims,
            self.layers.len(),
            slots,
            max_rank,
            self.dtype,
        )?;
        self.lora = Some(lora);
        Ok(LoraSlots::bytes_for(
            &self.dims,
            self.layers.len(),
            slots,
            max_rank,
        ))
    }

    /// The adapter slots, when LoRA is on.
    pub fn lora(&self) -> Option<&LoraSlots> {
        self.lora.as_ref()
    }

    pub fn lora_mut(&mut self) -> Option<&mut LoraSlots> {
        self.lora.as_mut()
    }

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// What the KV cache stores.
    pub fn kv_cache_dtype(&self) -> KvCacheDtype {
        self.kv_cache
    }

    /// Bytes of one cache element.
    fn kv_elem_bytes(&self) -> usize {
        match self.kv_cache {
            KvCacheDtype::Compute => ELEM,
            KvCacheDtype::Fp8E4M3 => 1,
        }
    }

    /// Bytes of one cache block on this rank (all layers, keys and values).
    pub fn cache_bytes_per_block(&self, block_size: usize) -> usize {
        2 * self.layers.len()
            * block_size
            * self.dims.kv_heads
            * self.dims.head_dim
            * self.kv_elem_bytes()
    }

    /// Allocates the cache and block tables for `max_sequences` sequences.
    pub fn new_cache(
        &self,
        gpu: &Gpu,
        num_blocks: usize,
        block_size: usize,
        max_sequences: usize,
    ) -> Result<GpuKvCache> {
        let per_layer = num_blocks
            * block_size
            * self.dims.kv_heads
            * self.dims.head_dim
            * self.kv_elem_bytes();
        let layers = self
            .kv_scales
            .iter()
            .map(|&(k_scale, v_scale)| {
                Ok(KvLayer {
                    key: gpu.alloc(per_layer, "the KV cache")?,
                    value: gpu.alloc(per_layer, "the KV cache")?,
                    k_scale,
                    v_scale,
                })
            })
            .collect::<Result<_>>()?;
        // A sequence never has more blocks than the cache or than its positions need.
        let table_width = num_blocks.min(self.max_pos.div_ceil(block_size)).max(1);
        let table_rows = max_sequences.max(1);
        let tables = gpu.alloc(table_rows * table_width * 4, "the block tables")?;
        Ok(GpuKvCache {
            layers,
            num_blocks,
            block_size,
            tables,
            table_rows,
            table_width,
        })
    }

    /// Makes sure the workspace holds `tokens` rows and `samples` sampled rows; returns its bytes
    /// and whether it was replaced (which invalidates every CUDA graph captured on it).
    pub fn reserve(&mut self, gpu: &Gpu, tokens: usize, samples: usize) -> Result<(usize, bool)> {
        let fits = self
            .workspace
            .as_ref()
            .is_some_and(|w| w.tokens >= tokens && w.samples >= samples);
        if !fits {
            let (t, s) = match &self.workspace {
                Some(w) => (w.tokens.max(tokens), w.samples.max(samples)),
                None => (tokens, samples),
            };
            self.workspace = None;
            let lora_width = self.lora.as_ref().map_or(0, LoraSlots::scratch_width);
            self.workspace = Some(Workspace::new(
                gpu,
                &self.dims,
                t.max(1),
                s.max(1),
                lora_width,
                self.fp8,
            )?);
        }
        let w = self.workspace.as_ref().expect("just made");
        Ok((w.bytes(&self.dims), !fits))
    }

    /// The workspace, once reserved.
    pub fn workspace(&self) -> Option<&Workspace> {
        self.workspace.as_ref()
    }

    /// The layers' normalisation epsilon.
    pub fn rms_norm_eps(&self) -> f32 {
        self.config.rms_norm_eps as f32
    }

    /// The activation dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}
