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
//! Activations live in a workspace sized for the largest step seen (allocated before the memory
//! profile, so the KV cache gets what is left); a step's host inputs (token ids, positions,
//! slots, block tables, attention tiles, sampling parameters) travel in one copy.

use tpserve_modelfile::LlamaConfig;

use super::attention_plan::{block_tables, key_splits, AttentionTiles};
use super::blas::Blas;
use super::device::{DeviceBuffer, Gpu};
use super::kernels::{
    attention_max_items, AttentionShape, Dtype, Kernels, SamplingPointers, ATTENTION_MMA_ITEMS,
    ELEM,
};
use super::nccl::Nccl;
use super::phases::PhaseTimer;
use crate::batch::Batch;
use crate::cpu::ops::Rope;
use crate::error::{Result, WorkerError};
use crate::sampler::SampleSpec;
use crate::shard::ShardPlan;
use crate::weights::{
    dummy_range, ensure_supported, model_parts, read, tensor_seed, total_len, Part, WeightSource,
};

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

struct Layer {
    input_norm: DeviceBuffer,
    qkv: DeviceBuffer,
    qkv_bias: Option<DeviceBuffer>,
    o: DeviceBuffer,
    post_norm: DeviceBuffer,
    gate_up: DeviceBuffer,
    down: DeviceBuffer,
}

/// The paged KV cache: per layer, keys and values `[num_blocks, block_size, kv_heads, head_dim]`.
pub struct GpuKvCache {
    layers: Vec<(DeviceBuffer, DeviceBuffer)>,
    pub num_blocks: usize,
    pub block_size: usize,
}

/// Activation buffers for up to `tokens` rows and `samples` sampled rows.
struct Workspace {
    tokens: usize,
    samples: usize,
    x: DeviceBuffer,
    normed: DeviceBuffer,
    qkv: DeviceBuffer,
    attn: DeviceBuffer,
    sub: DeviceBuffer,
    gate_up: DeviceBuffer,
    act: DeviceBuffer,
    partial_out: DeviceBuffer,
    partial_ml: DeviceBuffer,
    last: DeviceBuffer,
    logits: DeviceBuffer,
    gathered: DeviceBuffer,
    sampled: DeviceBuffer,
    inputs: DeviceBuffer,
}

impl Workspace {
    fn bytes_for(d: &Dims, tokens: usize, samples: usize) -> [usize; 14] {
        let partial = Self::partial_capacity(d, tokens);
        [
            tokens * d.hidden * ELEM,
            tokens * d.hidden * ELEM,
            tokens * d.qkv * ELEM,
            tokens * d.q_heads * d.head_dim * ELEM,
            tokens * d.hidden * ELEM,
            tokens * 2 * d.inter * ELEM,
            tokens * d.inter * ELEM,
            partial * 4,
            partial / d.head_dim.max(1) * 2 * 4,
            samples * d.hidden * ELEM,
            samples * d.vocab_per_rank * ELEM,
            samples * d.vocab_per_rank * d.world_size * ELEM,
            samples * 4,
            Inputs::capacity(tokens, samples),
        ]
    }

    /// f32 elements of the split-attention buffer: room for 4 splits of every row, and at
    /// least 256 (row, split) pairs (e.g. 64 splits of 4 decode rows).
    fn partial_capacity(d: &Dims, tokens: usize) -> usize {
        tokens.max(64) * 4 * d.q_heads * d.head_dim
    }

    fn new(gpu: &Gpu, d: &Dims, tokens: usize, samples: usize) -> Result<Self> {
        let b = Self::bytes_for(d, tokens, samples);
        let a = |i: usize, what: &str| gpu.alloc(b[i], what);
        Ok(Self {
            tokens,
            samples,
            x: a(0, "activations")?,
            normed: a(1, "activations")?,
            qkv: a(2, "activations")?,
            attn: a(3, "activations")?,
            sub: a(4, "activations")?,
            gate_up: a(5, "activations")?,
            act: a(6, "activations")?,
            partial_out: a(7, "attention splits")?,
            partial_ml: a(8, "attention splits")?,
            last: a(9, "activations")?,
            logits: a(10, "logits")?,
            gathered: a(11, "logits")?,
            sampled: a(12, "sampled tokens")?,
            inputs: a(13, "step inputs")?,
        })
    }
}

/// A step's host inputs packed into one buffer: offsets of each array.
struct Inputs {
    bytes: Vec<u8>,
}

impl Inputs {
    const ALIGN: usize = 16;

    /// Bytes for `tokens` rows and `samples` sampled rows, plus 1 MiB of block tables (256
    /// sequences of 1,024 blocks); a step whose tables need more gets a buffer of its own.
    fn capacity(tokens: usize, samples: usize) -> usize {
        // ids + positions + slots + tiles + sample rows + sampling parameters, plus alignment.
        tokens * (4 + 4 + 8 + 16) + samples * (4 + 4 + 4 + 4 + 4 + 8) + 16 * 16 + (1 << 20)
    }

    fn push<T: Copy>(&mut self, data: &[T]) -> usize {
        let at = self.bytes.len().next_multiple_of(Self::ALIGN);
        self.bytes.resize(at, 0);
        // SAFETY: T is plain data (u32, i32, i64, f32, u64 here); reading its bytes is sound.
        let raw = unsafe {
            std::slice::from_raw_parts(data.as_ptr() as *const u8, std::mem::size_of_val(data))
        };
        self.bytes.extend_from_slice(raw);
        at
    }
}

/// Device addresses of one step's inputs.
struct StepInputs {
    ids: u64,
    positions: u64,
    slots: u64,
    tables: u64,
    tiles: u64,
    sample_rows: u64,
    sampling: Option<SamplingPointers>,
    num_tiles: usize,
    items: usize,
    max_blocks_per_seq: usize,
    max_context: usize,
    /// Separate buffer when the block tables outgrow the workspace's input buffer.
    _spill: Option<DeviceBuffer>,
}

/// The model's weights on this GPU.
pub struct CudaModel {
    config: LlamaConfig,
    shard: ShardPlan,
    dtype: Dtype,
    dims: Dims,
    layers: Vec<Layer>,
    embed: DeviceBuffer,
    lm_head: Option<DeviceBuffer>,
    final_norm: DeviceBuffer,
    rope_cos: DeviceBuffer,
    rope_sin: DeviceBuffer,
    max_pos: usize,
    weight_bytes: usize,
    workspace: Option<Workspace>,
}

/// Stores weights on the GPU: read as f32 and rounded to the dtype, or filled on the device.
struct Loader<'a> {
    gpu: &'a Gpu,
    kernels: &'a Kernels,
    dtype: Dtype,
    source: &'a WeightSource<'a>,
    bytes: usize,
}

impl Loader<'_> {
    /// Stores `parts` one after another in a buffer of `total` elements (zero beyond what they
    /// fill: the padded vocabulary rows).
    fn padded(&mut self, parts: &[Part], total: usize) -> Result<DeviceBuffer> {
        let buf = self.gpu.alloc(total * ELEM, "weights")?;
        let mut offset = 0usize;
        for part in parts {
            match self.source {
                WeightSource::Dummy(seed) => {
                    let (low, high) = dummy_range(&part.name);
                    self.kernels.fill_uniform(
                        buf.at(offset),
                        part.elements(),
                        tensor_seed(*seed, &part.name),
                        low,
                        high,
                    )?;
                }
                WeightSource::Reader(_) => {
                    let values = read(self.source, part)?;
                    let bits: Vec<u16> = values.iter().map(|v| self.dtype.from_f32(*v)).collect();
                    self.gpu.upload_at(&buf, offset, &bits)?;
                    // `bits` is freed on return: wait for the copy rather than rely on the
                    // driver staging pageable memory before it returns.
                    self.gpu.sync()?;
                }
            }
            offset += part.elements() * ELEM;
        }
        self.bytes += total * ELEM;
        Ok(buf)
    }

    /// Stores `parts` one after another.
    fn fused(&mut self, parts: &[Part]) -> Result<DeviceBuffer> {
        self.padded(parts, total_len(parts))
    }

    fn one(&mut self, part: &Part) -> Result<DeviceBuffer> {
        self.fused(std::slice::from_ref(part))
    }
}

impl CudaModel {
    /// Loads this rank's shard onto `gpu`.
    pub fn load(
        gpu: &Gpu,
        kernels: &Kernels,
        config: &LlamaConfig,
        shard: ShardPlan,
        source: &WeightSource,
        dtype: Dtype,
    ) -> Result<Self> {
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
        let mut ld = Loader {
            gpu,
            kernels,
            dtype,
            source,
            bytes: 0,
        };
        let parts = model_parts(c, &shard, source);
        let mut layers = Vec::with_capacity(parts.layers.len());
        for lp in &parts.layers {
            layers.push(Layer {
                input_norm: ld.one(&lp.input_norm)?,
                qkv: ld.fused(&lp.qkv)?,
                qkv_bias: lp.qkv_bias.as_deref().map(|b| ld.fused(b)).transpose()?,
                o: ld.one(&lp.o)?,
                post_norm: ld.one(&lp.post_norm)?,
                gate_up: ld.fused(&lp.gate_up)?,
                down: ld.one(&lp.down)?,
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
            workspace: None,
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

    pub fn max_positions(&self) -> usize {
        self.max_pos
    }

    /// Bytes of one cache block on this rank (all layers, keys and values).
    pub fn cache_bytes_per_block(&self, block_size: usize) -> usize {
        2 * self.layers.len() * block_size * self.dims.kv_heads * self.dims.head_dim * ELEM
    }

    /// Allocates the cache.
    pub fn new_cache(&self, gpu: &Gpu, num_blocks: usize, block_size: usize) -> Result<GpuKvCache> {
        let per_layer = num_blocks * block_size * self.dims.kv_heads * self.dims.head_dim * ELEM;
        let layers = (0..self.layers.len())
            .map(|_| {
                Ok((
                    gpu.alloc(per_layer, "the KV cache")?,
                    gpu.alloc(per_layer, "the KV cache")?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(GpuKvCache {
            layers,
            num_blocks,
            block_size,
        })
    }

    /// Makes sure the workspace holds `tokens` rows and `samples` sampled rows; returns its bytes.
    pub fn reserve(&mut self, gpu: &Gpu, tokens: usize, samples: usize) -> Result<usize> {
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
            self.workspace = Some(Workspace::new(gpu, &self.dims, t.max(1), s.max(1))?);
        }
        let w = self.workspace.as_ref().expect("just made");
        Ok(Workspace::bytes_for(&self.dims, w.tokens, w.samples)
            .iter()
            .sum())
    }

    /// Runs the batch (positions, token ids and slots checked by the runner); the logits of the
    /// sample rows are left in the workspace,
    /// `[samples, vocab_per_rank]`. Returns the address of the logits to sample from (gathered
    /// over ranks when there are several).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        blas: &Blas,
        nccl: Option<&Nccl>,
        cache: &GpuKvCache,
        batch: &Batch,
        sampling: Option<&[SampleSpec]>,
    ) -> Result<ForwardOutput> {
        let n = batch.num_tokens();
        let s = batch.sample_rows.len();
        self.reserve(gpu, n, s)?;
        let d = self.dims;
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let ws = self.workspace.as_ref().expect("reserved");
        let mma = use_mma_attention(&d, batch);
        let tile_items = if mma {
            ATTENTION_MMA_ITEMS
        } else {
            attention_max_items(d.head_dim)
        };
        let inputs = pack_inputs(gpu, ws, &d, batch, sampling, tile_items)?;
        let stream = &gpu.stream;
        let mut timer = PhaseTimer::start(gpu);
        let all_reduce = |buf: u64, count: usize| -> Result<()> {
            match nccl {
                Some(comm) if comm.world_size() > 1 => {
                    comm.all_reduce_sum(buf, count, self.dtype.nccl(), stream)
                }
                _ => Ok(()),
            }
        };
        kernels.embedding(
            ws.x.ptr,
            self.embed.ptr,
            inputs.ids,
            n,
            d.hidden,
            d.vocab_start,
            d.vocab_local,
        )?;
        all_reduce(ws.x.ptr, n * d.hidden)?;
        timer.mark(gpu, "embedding");
        let q_w = d.q_heads * d.head_dim;
        let kv_w = d.kv_heads * d.head_dim;
        let shape = AttentionShape {
            q_heads: d.q_heads,
            kv_heads: d.kv_heads,
            head_dim: d.head_dim,
            block_size: cache.block_size,
            max_blocks_per_seq: inputs.max_blocks_per_seq,
            q_stride: d.qkv,
            scale: 1.0 / (d.head_dim as f32).sqrt(),
        };
        let splits = if mma {
            (1, 0)
        } else {
            self.splits(gpu, ws, &inputs, n)
        };
        for (li, layer) in self.layers.iter().enumerate() {
            if li == 0 {
                kernels.rms_norm(
                    ws.normed.ptr,
                    ws.x.ptr,
                    layer.input_norm.ptr,
                    n,
                    d.hidden,
                    eps,
                )?;
            } else {
                kernels.rms_norm_residual(
                    ws.normed.ptr,
                    ws.x.ptr,
                    ws.sub.ptr,
                    layer.input_norm.ptr,
                    n,
                    d.hidden,
                    eps,
                )?;
            }
            timer.mark(gpu, "rms_norm");
            blas.linear(ws.qkv.ptr, ws.normed.ptr, layer.qkv.ptr, n, d.qkv, d.hidden)?;
            if let Some(bias) = &layer.qkv_bias {
                kernels.add_bias(ws.qkv.ptr, bias.ptr, n, d.qkv)?;
            }
            timer.mark(gpu, "gemm qkv");
            let k = ws.qkv.at(q_w * ELEM);
            let v = ws.qkv.at((q_w + kv_w) * ELEM);
            kernels.rope(
                ws.qkv.ptr,
                k,
                inputs.positions,
                self.rope_cos.ptr,
                self.rope_sin.ptr,
                n,
                d.q_heads,
                d.kv_heads,
                d.head_dim,
                d.qkv,
            )?;
            let (kc, vc) = &cache.layers[li];
            kernels.kv_cache_write(
                k,
                v,
                kc.ptr,
                vc.ptr,
                inputs.slots,
                n,
                d.kv_heads,
                d.head_dim,
                d.qkv,
            )?;
            timer.mark(gpu, "rope + kv write");
            if mma {
                kernels.paged_attention_mma(
                    ws.attn.ptr,
                    ws.qkv.ptr,
                    kc.ptr,
                    vc.ptr,
                    inputs.tables,
                    inputs.tiles,
                    inputs.num_tiles,
                    &shape,
                )?;
            } else {
                kernels.paged_attention(
                    ws.attn.ptr,
                    ws.partial_out.ptr,
                    ws.partial_ml.ptr,
                    ws.qkv.ptr,
                    kc.ptr,
                    vc.ptr,
                    inputs.tables,
                    inputs.tiles,
                    inputs.num_tiles,
                    inputs.items,
                    &shape,
                    splits.0,
                    splits.1,
                )?;
            }
            if splits.0 > 1 {
                kernels.attention_combine(
                    ws.attn.ptr,
                    ws.partial_out.ptr,
                    ws.partial_ml.ptr,
                    n,
                    &shape,
                    splits.0,
                )?;
            }
            timer.mark(gpu, "attention");
            blas.linear(ws.sub.ptr, ws.attn.ptr, layer.o.ptr, n, d.hidden, q_w)?;
            timer.mark(gpu, "gemm o");
            all_reduce(ws.sub.ptr, n * d.hidden)?;
            timer.mark(gpu, "all-reduce");
            kernels.rms_norm_residual(
                ws.normed.ptr,
                ws.x.ptr,
                ws.sub.ptr,
                layer.post_norm.ptr,
                n,
                d.hidden,
                eps,
            )?;
            timer.mark(gpu, "rms_norm");
            blas.linear(
                ws.gate_up.ptr,
                ws.normed.ptr,
                layer.gate_up.ptr,
                n,
                2 * d.inter,
                d.hidden,
            )?;
            timer.mark(gpu, "gemm gate_up");
            kernels.silu_mul(ws.act.ptr, ws.gate_up.ptr, n, d.inter)?;
            timer.mark(gpu, "silu_mul");
            blas.linear(ws.sub.ptr, ws.act.ptr, layer.down.ptr, n, d.hidden, d.inter)?;
            timer.mark(gpu, "gemm down");
            all_reduce(ws.sub.ptr, n * d.hidden)?;
            timer.mark(gpu, "all-reduce");
        }
        kernels.rms_norm_residual(
            ws.normed.ptr,
            ws.x.ptr,
            ws.sub.ptr,
            self.final_norm.ptr,
            n,
            d.hidden,
            eps,
        )?;
        kernels.gather_rows(ws.last.ptr, ws.normed.ptr, inputs.sample_rows, s, d.hidden)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        blas.linear(
            ws.logits.ptr,
            ws.last.ptr,
            head.ptr,
            s,
            d.vocab_per_rank,
            d.hidden,
        )?;
        let logits = match nccl {
            Some(comm) if comm.world_size() > 1 => {
                comm.all_gather(
                    ws.logits.ptr,
                    ws.gathered.ptr,
                    s * d.vocab_per_rank,
                    self.dtype.nccl(),
                    stream,
                )?;
                ws.gathered.ptr
            }
            _ => ws.logits.ptr,
        };
        timer.mark(gpu, "final norm + lm_head");
        timer.finish();
        Ok(ForwardOutput {
            logits,
            samples: s,
            sampled: ws.sampled.ptr,
            sampling: inputs.sampling,
        })
    }

    /// How many splits attention takes over the key length, and keys per split.
    fn splits(&self, gpu: &Gpu, ws: &Workspace, inputs: &StepInputs, n: usize) -> (usize, usize) {
        let d = &self.dims;
        key_splits(
            inputs.num_tiles * d.kv_heads,
            gpu.sm_count,
            inputs.max_context,
            Workspace::partial_capacity(d, ws.tokens) / (n * d.q_heads * d.head_dim).max(1),
        )
    }

    /// The activation dtype.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
}

/// Where a forward pass left its results.
pub struct ForwardOutput {
    /// Logits of the sample rows, `[world][samples][vocab_per_rank]`.
    pub logits: u64,
    pub samples: usize,
    /// Room for `samples` u32 tokens.
    pub sampled: u64,
    /// The uploaded sampling parameters, when the step samples.
    pub sampling: Option<SamplingPointers>,
}

/// Rows of one sequence in a step from which the tensor-core attention kernel takes the step:
/// prefill chunks. Decode-only steps keep the CUDA-core kernel, which splits long contexts over
/// the key length. `TPSERVE_CUDA_ATTENTION=simt` keeps the CUDA-core kernel always (for
/// comparisons).
const MMA_MIN_ROWS: usize = 16;

fn use_mma_attention(d: &Dims, batch: &Batch) -> bool {
    Kernels::has_mma_attention(d.head_dim)
        && batch.seqs.iter().any(|s| s.rows.len() >= MMA_MIN_ROWS)
        && std::env::var("TPSERVE_CUDA_ATTENTION").map_or(true, |v| v != "simt")
}

/// Packs the step's host inputs and copies them to the device in one transfer.
fn pack_inputs(
    gpu: &Gpu,
    ws: &Workspace,
    d: &Dims,
    batch: &Batch,
    sampling: Option<&[SampleSpec]>,
    tile_items: usize,
) -> Result<StepInputs> {
    let n = batch.num_tokens();
    let mut p = Inputs {
        bytes: Vec::with_capacity(Inputs::capacity(n, batch.sample_rows.len())),
    };
    let ids = p.push(&batch.token_ids);
    let positions: Vec<i32> = batch.positions.iter().map(|x| *x as i32).collect();
    let positions = p.push(&positions);
    let slots: Vec<i64> = batch.slots.iter().map(|x| *x as i64).collect();
    let slots = p.push(&slots);
    let group = d.q_heads / d.kv_heads.max(1);
    let plan = AttentionTiles::new(batch, (tile_items / group).max(1));
    let tiles_at = p.push(&plan.tiles);
    let sample_rows: Vec<i32> = batch.sample_rows.iter().map(|x| *x as i32).collect();
    let sample_rows = p.push(&sample_rows);
    let sampling_at = sampling.map(|specs| {
        let t: Vec<f32> = specs.iter().map(|s| s.params.temperature).collect();
        let k: Vec<i32> = specs.iter().map(|s| s.params.top_k).collect();
        let tp: Vec<f32> = specs.iter().map(|s| s.params.top_p).collect();
        let mp: Vec<f32> = specs.iter().map(|s| s.params.min_p).collect();
        let seeds: Vec<u64> = specs.iter().map(|s| s.seed).collect();
        (
            p.push(&t),
            p.push(&k),
            p.push(&tp),
            p.push(&mp),
            p.push(&seeds),
        )
    });
    // Block tables last: their size depends on the sequences' lengths, not on the token count.
    let (tables, max_blocks_per_seq) = block_tables(batch);
    let tables_at = p.push(&tables);
    let (base, spill) = if p.bytes.len() <= ws.inputs.bytes {
        gpu.upload(&ws.inputs, &p.bytes)?;
        (ws.inputs.ptr, None)
    } else {
        let buf = gpu.alloc(p.bytes.len(), "step inputs")?;
        gpu.upload(&buf, &p.bytes)?;
        (buf.ptr, Some(buf))
    };
    let at = |offset: usize| base + offset as u64;
    Ok(StepInputs {
        ids: at(ids),
        positions: at(positions),
        slots: at(slots),
        tables: at(tables_at),
        tiles: at(tiles_at),
        sample_rows: at(sample_rows),
        sampling: sampling_at.map(|(t, k, tp, mp, s)| SamplingPointers {
            temperature: at(t),
            top_k: at(k),
            top_p: at(tp),
            min_p: at(mp),
            seeds: at(s),
        }),
        num_tiles: plan.len(),
        items: plan.max_rows * group,
        max_blocks_per_seq,
        max_context: plan.max_context,
        _spill: spill,
    })
}
