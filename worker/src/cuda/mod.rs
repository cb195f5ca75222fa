//! The CUDA backend: the model on one NVIDIA GPU in bfloat16 or float16, with our NVRTC-compiled
//! kernels (`tpserve-kernels`), cuBLAS GEMMs and NCCL tensor parallelism (one worker process per
//! GPU). Every CUDA library is loaded at run time (cudarc's `dynamic-loading`), so the same binary
//! runs on machines without CUDA; asking for CUDA there is a clear error, never a panic.
//!
//! Sampling happens on the device: rank 0 samples from the gathered logits, and NCCL broadcasts
//! the tokens so every rank appends the same ones.
//!
//! A step runs one of two ways: decode-only steps of a captured size replay a CUDA graph
//! (`graphs`), every other step (prefill chunks, mixed steps, `--enforce-eager`) issues its
//! kernels one by one (`forward`); both read the step's inputs from one upload and keep the
//! sequences' block tables on the device (`step_inputs`). A step's tokens come back through a
//! page-locked slot and an event (`token_slots`), so the runner launches the next step before
//! it waits for them; a graph step's rows decoding the previous step's tokens read them from
//! the workspace's sampled buffer (the embedding's feed), never from the host.

mod attention_plan;
mod blas;
mod blas_lt;
mod device;
mod floors;
mod forward;
mod fp8;
mod gemv;
mod graphs;
mod int4;
mod kernels;
mod launch;
mod linear;
mod linear_tuning;
mod loader;
mod logit_extras;
mod lora;
mod model;
mod nccl;
mod peer_all_reduce;
mod phases;
mod setup;
mod step_inputs;
mod step_tuning;
mod token_slots;
mod workspace;

use std::ops::Range;
use std::time::Instant;

use tpserve_modelfile::{LlamaConfig, LoraAdapter};

pub use device::{device_count, gpu_present};
pub use floors::{measure_floors, Floors};
pub use kernels::Dtype;
pub use phases::{take_phase_totals, take_step_gaps};

use self::attention_plan::key_splits;
use self::device::{DeviceBuffer, Gpu};
use self::forward::{
    forward, hidden_states, AttentionKind, AttentionPlan, Device, ForwardOutput, StepView,
};
use self::graphs::{table_shape, DecodeGraphs};
use self::kernels::Kernels;
use self::linear::Linear;
use self::linear_tuning::tune_linears;
use self::lora::LoraSlots;
use self::model::{CudaModel, Dims, GpuKvCache};
use self::nccl::Nccl;
use self::peer_all_reduce::PeerAllReduce;
use self::step_inputs::{is_decode_only, pack};
use self::token_slots::TokenSlots;
use self::workspace::Workspace;
use crate::backend::{Backend, CacheShape, DecodePrep, DeviceInfo, Launched};
use crate::batch::Batch;
use crate::error::{Result, WorkerError};
use crate::load::{LoadSpec, LoadedModel, MemoryBudget, MemoryProfile};
use crate::lora::shard::AdapterShard;
use crate::sampler::{RowExtras, SampleSpec, Sampled};
use crate::step_trace::{phase, Phase};

/// What exists once the model is loaded.
struct Loaded {
    model: CudaModel,
    kernels: Kernels,
    linear: Linear,
    cache: Option<GpuKvCache>,
    /// Captured at warm-up; dropped with the cache or the workspace they were captured on.
    graphs: Option<DecodeGraphs>,
}

impl Loaded {
    /// The device objects a forward pass of this model uses.
    fn device<'a>(
        &'a self,
        gpu: &'a Gpu,
        nccl: Option<&'a Nccl>,
        peer: Option<&'a PeerAllReduce>,
        rank: usize,
    ) -> Device<'a> {
        Device {
            gpu,
            kernels: &self.kernels,
            linear: &self.linear,
            nccl,
            peer,
            rank,
        }
    }
}

/// The loaded model, or the lifecycle error of calling `operation` before LoadModel. A free
/// function over the field, so callers can hold the GPU alongside it.
fn loaded_model<'a>(
    slot: &'a mut Option<Loaded>,
    operation: &'static str,
) -> Result<&'a mut Loaded> {
    slot.as_mut().ok_or(WorkerError::Lifecycle {
        operation,
        needs: "LoadModel",
    })
}

/// The KV cache a step runs on, or the lifecycle error of stepping before InitCache. A free
/// function over the field, so callers can borrow the model beside it.
fn step_cache(cache: Option<&GpuKvCache>) -> Result<&GpuKvCache> {
    cache.ok_or(WorkerError::Lifecycle {
        operation: "Step",
        needs: "InitCache",
    })
}

/// One GPU's side of a worker.
pub struct CudaBackend {
    gpu: Gpu,
    nccl: Option<Nccl>,
    /// Small all-reduces over peer memory, set up at warm-up (`--disable-custom-all-reduce`
    /// leaves it off).
    peer: Option<PeerAllReduce>,
    rank: usize,
    world_size: usize,
    loaded: Option<Loaded>,
    /// Launched steps' tokens on their way back.
    tokens: TokenSlots,
}

impl CudaBackend {
    /// Opens GPU `ordinal` on the calling thread (which must be the runner thread).
    pub fn new(ordinal: usize) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        tracing::info!(ordinal, name = %gpu.name, arch = %gpu.arch, "CUDA device");
        Ok(Self {
            gpu,
            nccl: None,
            peer: None,
            rank: 0,
            world_size: 1,
            loaded: None,
            tokens: TokenSlots::default(),
        })
    }

    /// Issues the forward pass and the sampling of one token per sample row (`sampling`, one
    /// spec each) and returns where the logits and tokens will be, without waiting. Decode-only
    /// steps of a captured size replay a graph (staging their inputs in token slot `slot`); the
    /// rest run eagerly, as does every step while the phase table is on
    /// (`TPSERVE_CUDA_PHASES=1`: its events need the kernels issued one by one).
    fn forward(
        &mut self,
        batch: &Batch,
        sampling: &[SampleSpec],
        slot: usize,
    ) -> Result<ForwardOutput> {
        let gpu = &self.gpu;
        let loaded = loaded_model(&mut self.loaded, "Step")?;
        let cache = step_cache(loaded.cache.as_ref())?;
        let plan_err = |detail: String| WorkerError::Plan { detail };
        let d = *loaded.model.dims();
        let tables = table_shape(cache);
        let graph_size = graph_size(loaded, batch);
        if let (Some(size), Some(graphs), Some(ws)) =
            (graph_size, &loaded.graphs, loaded.model.workspace())
        {
            let ranks = loaded.model.lora().map_or(&[][..], LoraSlots::ranks);
            let step =
                pack(batch, sampling, 1, false, Some(size), tables, ranks).map_err(plan_err)?;
            let dev = loaded.device(gpu, self.nccl.as_ref(), self.peer.as_ref(), self.rank);
            phases::time_graph_step(gpu, || graphs.replay(&dev, cache, size, &step, slot))?;
            let logits = if d.world_size > 1 {
                ws.gathered.ptr
            } else {
                ws.logits.ptr
            };
            return Ok(ForwardOutput {
                logits,
                samples: size,
                sampled: ws.sampled.ptr,
            });
        }
        phases::break_step_gaps();
        self.eager(batch, sampling, |dev, model, cache, ws, view| {
            forward(dev, model, cache, ws, view, true)
        })
    }

    /// Runs `batch` eagerly (no graph): reserves the workspace, packs and uploads the step's
    /// inputs, chooses the attention plan, and hands the pass to `run`.
    fn eager<T>(
        &mut self,
        batch: &Batch,
        sampling: &[SampleSpec],
        run: impl FnOnce(&Device, &CudaModel, &GpuKvCache, &Workspace, &StepView) -> Result<T>,
    ) -> Result<T> {
        let gpu = &self.gpu;
        let loaded = loaded_model(&mut self.loaded, "Step")?;
        let cache = step_cache(loaded.cache.as_ref())?;
        let plan_err = |detail: String| WorkerError::Plan { detail };
        let n = batch.num_tokens();
        let d = *loaded.model.dims();
        let tables = table_shape(cache);
        let (_, replaced) = loaded.model.reserve(gpu, n, batch.sample_rows.len())?;
        if replaced && loaded.graphs.take().is_some() {
            tracing::warn!(
                tokens = n,
                "the activation workspace grew past its warm-up size; CUDA graphs dropped, \
                 decode steps run eagerly"
            );
        }
        let group = d.q_heads / d.kv_heads.max(1);
        let kind = attention_kind(&d, batch, cache.block_size, loaded.linear.batch_invariant());
        let mma_items = loaded.kernels.attention_mma_items(d.head_dim);
        let tile_rows = AttentionPlan::tile_rows(kind, d.head_dim, group, mma_items);
        let ranks = loaded.model.lora().map_or(&[][..], LoraSlots::ranks);
        // A prompt step's decode rows run on the tensor-core decode kernel when they are enough
        // to fill the GPU on their own (they get no key splits there: attention_combine would
        // merge every row of the step); else they stay in the prompt kernel's launch.
        let decode_rows = batch.seqs.iter().filter(|s| s.rows.len() == 1).count();
        let decode_apart = kind == AttentionKind::Mma
            && decode_rows * d.kv_heads >= 2 * gpu.sm_count
            && Kernels::has_decode_mma_attention(d.head_dim, group, cache.block_size);
        let step = pack(
            batch,
            sampling,
            tile_rows,
            decode_apart,
            None,
            tables,
            ranks,
        )
        .map_err(plan_err)?;
        let ws = loaded.model.workspace().expect("reserved above");
        let (base, _spill) = upload_inputs(gpu, &ws.inputs, &step.packed.bytes)?;
        loaded.kernels.set_entries(
            cache.tables.ptr,
            base + step.offsets.updates as u64,
            step.num_updates,
        )?;
        let attention = match kind {
            AttentionKind::Mma => AttentionPlan::Mma {
                decode_tiles: step.one_row_tiles,
            },
            AttentionKind::Simt => {
                // Batch-invariant mode never splits the keys: a split's partial sums depend on
                // how many splits the step's shape gives.
                let (splits, split_len) = if loaded.linear.batch_invariant() {
                    (1, 0)
                } else {
                    key_splits(
                        step.num_tiles * d.kv_heads,
                        gpu.sm_count,
                        step.max_context,
                        ws.split_room(&d, n),
                    )
                };
                AttentionPlan::Simt {
                    items: step.max_tile_rows * group,
                    splits,
                    split_len,
                }
            }
            AttentionKind::Decode | AttentionKind::DecodeMma => graphs::eager_decode_attention(
                &d,
                batch.seqs.len(),
                gpu.sm_count,
                ws.split_room(&d, n),
                cache.block_size,
                step.max_context,
            ),
        };
        let view = StepView {
            rows: n,
            samples: batch.sample_rows.len(),
            inputs: step.offsets.at(base),
            num_tiles: step.num_tiles,
            attention,
            lora_tiles: step.num_lora_tiles,
        };
        let dev = loaded.device(gpu, self.nccl.as_ref(), self.peer.as_ref(), self.rank);
        // `_spill`, if any, is freed in stream order after the pass that reads it.
        run(&dev, &loaded.model, cache, ws, &view)
    }
}

impl CudaBackend {
    /// A step with logit processors, log probabilities or structured outputs' token masks
    /// (issue 13): the forward pass as any step's (a graph replay for decode steps), then the
    /// processing, the draw and the log probabilities on the device (`logit_extras`). Steps
    /// without extras never come here, so their speed is unchanged.
    fn step_with_extras(
        &mut self,
        batch: &Batch,
        sampling: &[SampleSpec],
        extras: &[RowExtras],
    ) -> Result<Sampled> {
        let slot = self.tokens.take();
        let out = phase(Phase::ModelStep, || self.forward(batch, sampling, slot))?;
        let loaded = loaded_model(&mut self.loaded, "Step")?;
        let dims = *loaded.model.dims();
        let dev = loaded.device(&self.gpu, self.nccl.as_ref(), self.peer.as_ref(), self.rank);
        phases::break_step_gaps();
        phase(Phase::Sampling, || {
            logit_extras::sample_with_extras(&dev, &dims, &out, sampling, extras)
        })
    }
}

/// The captured size a step of `batch` replays, if it replays a graph: decode-only steps of at
/// most the largest size, while the phase table is off.
fn graph_size(loaded: &Loaded, batch: &Batch) -> Option<usize> {
    loaded
        .graphs
        .as_ref()
        .filter(|_| is_decode_only(batch) && !phases::enabled())
        .and_then(|g| g.size_for(batch.num_tokens()))
}

/// Which attention kernel an eager step runs: a decode kernel when every sequence has one row
/// (`AttentionKind::for_decode`: tensor cores from `DECODE_MMA_MIN_ROWS` rows), the tensor-core
/// kernel when a sequence has a prefill chunk of 16 rows or more, the CUDA-core kernel
/// otherwise, and always in batch-invariant mode (each row's result then does not depend on its
/// tile) or with `TPSERVE_CUDA_ATTENTION=simt` (comparisons; `=mma` instead keeps sm_90a's
/// prompts on attention_mma.cu, chosen in `Kernels::new`).
fn attention_kind(
    d: &Dims,
    batch: &Batch,
    block_size: usize,
    batch_invariant: bool,
) -> AttentionKind {
    const MMA_MIN_ROWS: usize = 16;
    let simt_only =
        batch_invariant || std::env::var("TPSERVE_CUDA_ATTENTION").is_ok_and(|v| v == "simt");
    let group = d.q_heads / d.kv_heads.max(1);
    let decode = batch
        .seqs
        .iter()
        .all(|s| s.rows.len() == 1)
        .then(|| AttentionKind::for_decode(batch.seqs.len(), d.head_dim, group, block_size))
        .flatten();
    if simt_only {
        AttentionKind::Simt
    } else if let Some(kind) = decode {
        kind
    } else if Kernels::has_mma_attention(d.head_dim)
        && batch.seqs.iter().any(|s| s.rows.len() >= MMA_MIN_ROWS)
    {
        AttentionKind::Mma
    } else {
        AttentionKind::Simt
    }
}

/// Copies a packed step to `buf`, or to a buffer of its own when it does not fit; returns the
/// device address and that buffer.
fn upload_inputs(
    gpu: &Gpu,
    buf: &DeviceBuffer,
    bytes: &[u8],
) -> Result<(u64, Option<DeviceBuffer>)> {
    if bytes.len() <= buf.bytes {
        gpu.upload(buf, bytes)?;
        Ok((buf.ptr, None))
    } else {
        let spill = gpu.alloc(bytes.len(), "step inputs")?;
        gpu.upload(&spill, bytes)?;
        Ok((spill.ptr, Some(spill)))
    }
}

/// The cache and workspace a warm-up captures graphs on (InitCache made them).
fn warm_up_state(loaded: &Loaded) -> Result<(&GpuKvCache, &Workspace)> {
    match (loaded.cache.as_ref(), loaded.model.workspace()) {
        (Some(cache), Some(ws)) => Ok((cache, ws)),
        _ => Err(WorkerError::Lifecycle {
            operation: "Warmup",
            needs: "InitCache",
        }),
    }
}

impl Backend for CudaBackend {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            kind: "cuda",
            name: format!("{} (cuda:{})", self.gpu.name, self.gpu.ordinal),
            total_memory_bytes: self.gpu.total_memory as u64,
        }
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn communicator_id(&mut self, world_size: usize) -> Result<Vec<u8>> {
        if world_size <= 1 {
            return Ok(Vec::new());
        }
        nccl::unique_id()
    }

    fn init_communicator(&mut self, id: &[u8], rank: usize, world_size: usize) -> Result<()> {
        if world_size == 0 || rank >= world_size {
            return Err(WorkerError::Communicator {
                detail: format!("rank {rank} is outside a group of {world_size}"),
            });
        }
        self.loaded = None;
        self.peer = None;
        self.nccl = None;
        self.gpu
            .ctx
            .bind_to_thread()
            .map_err(|e| device::device_err("binding the context", e))?;
        let started = Instant::now();
        if world_size > 1 {
            self.nccl = Some(Nccl::join(id, rank, world_size)?);
            tracing::info!(
                rank,
                world_size,
                seconds = started.elapsed().as_secs_f64(),
                "NCCL group joined"
            );
        }
        self.rank = rank;
        self.world_size = world_size;
        Ok(())
    }

    fn load_model(&mut self, req: &LoadSpec) -> Result<LoadedModel> {
        self.load(req)
    }

    fn profile_memory(&mut self, req: &MemoryBudget) -> Result<MemoryProfile> {
        self.size_cache(req)
    }

    fn init_cache(&mut self, shape: CacheShape) -> Result<u64> {
        let gpu = &self.gpu;
        let loaded = loaded_model(&mut self.loaded, "InitCache")?;
        loaded.graphs = None;
        loaded.cache = None;
        let cache =
            loaded
                .model
                .new_cache(gpu, shape.num_blocks, shape.block_size, shape.max_sequences)?;
        gpu.sync()?;
        loaded.cache = Some(cache);
        Ok((loaded.model.cache_bytes_per_block(shape.block_size) * shape.num_blocks) as u64)
    }

    fn prepare_decode(
        &mut self,
        graph_sizes: &[usize],
        custom_all_reduce: bool,
    ) -> Result<DecodePrep> {
        let started = Instant::now();
        // Before any capture: the graphs record which all-reduce each message takes.
        self.peer = None;
        if let Some(nccl) = self.nccl.as_ref().filter(|_| custom_all_reduce) {
            self.peer = PeerAllReduce::new(&self.gpu, nccl, self.rank)?;
        }
        let gpu = &self.gpu;
        let one_rank = self.world_size <= 1;
        let loaded = loaded_model(&mut self.loaded, "Warmup")?;
        loaded.graphs = None;
        let timings = tune_linears(gpu, loaded)?;
        let (cache, ws) = warm_up_state(loaded)?;
        let d = *loaded.model.dims();
        let group = d.q_heads / d.kv_heads.max(1);
        let mut sizes: Vec<usize> = graph_sizes
            .iter()
            .copied()
            .filter(|&s| s >= 1 && s <= ws.tokens && s <= ws.samples && s <= cache.table_rows)
            .collect();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.len() < graph_sizes.len() {
            tracing::info!(
                asked = graph_sizes.len(),
                kept = sizes.len(),
                "CUDA graph sizes beyond the step limits are not captured"
            );
        }
        let invariant = loaded.linear.batch_invariant();
        if !sizes.is_empty() && !invariant && !Kernels::has_decode_attention(d.head_dim, group) {
            tracing::warn!(
                head_dim = d.head_dim,
                group,
                "no decode attention kernel for this head shape: no CUDA graphs, decode runs \
                 eagerly"
            );
            sizes.clear();
        }
        if sizes.first() == Some(&1)
            && loaded.linear.measured()
            && one_rank
            && step_tuning::enabled()
        {
            let tuning = Instant::now();
            let seconds = || tuning.elapsed().as_secs_f64();
            // Only speed rides on it (every candidate runs the product right): a failure keeps
            // the choices as they stand, and a broken device fails the capture below.
            match step_tuning::tune(gpu, loaded, &timings) {
                Ok(step_tuning::Outcome::Timed) => tracing::info!(
                    seconds = seconds(),
                    "one-row products chosen by whole decode steps"
                ),
                Ok(step_tuning::Outcome::Kept(file)) => tracing::info!(
                    file = %file.display(),
                    "one-row products as whole decode steps chose them at an earlier start"
                ),
                Ok(step_tuning::Outcome::NothingToChoose) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "timing whole decode steps failed; the one-row products keep the choices \
                     made so far"
                ),
            }
        }
        let (cache, ws) = warm_up_state(loaded)?;
        if !sizes.is_empty() {
            let dev = loaded.device(gpu, self.nccl.as_ref(), self.peer.as_ref(), self.rank);
            let graphs = DecodeGraphs::capture(&dev, &loaded.model, cache, ws, &sizes, invariant)?;
            tracing::info!(
                graphs = graphs.len(),
                largest = sizes.last().copied().unwrap_or(0),
                seconds = started.elapsed().as_secs_f64(),
                "CUDA graphs captured"
            );
            loaded.graphs = Some(graphs);
        }
        gpu.sync()?;
        Ok(DecodePrep {
            graphs: loaded.graphs.as_ref().map_or(0, DecodeGraphs::len),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    fn cache_shape(&self) -> Option<(usize, usize)> {
        self.loaded
            .as_ref()
            .and_then(|l| l.cache.as_ref())
            .map(|c| (c.num_blocks, c.block_size))
    }

    fn max_positions(&self) -> Result<usize> {
        self.loaded
            .as_ref()
            .map(|l| l.model.max_positions())
            .ok_or(WorkerError::Lifecycle {
                operation: "Step",
                needs: "LoadModel",
            })
    }

    fn step(
        &mut self,
        batch: &Batch,
        sampling: &[SampleSpec],
        extras: &[RowExtras],
    ) -> Result<Sampled> {
        if sampling.len() != batch.sample_rows.len() {
            return Err(WorkerError::Plan {
                detail: "one sampling spec per sampled row".into(),
            });
        }
        if !extras.is_empty() {
            return self.step_with_extras(batch, sampling, extras);
        }
        let launched = self.launch(batch, sampling)?;
        self.collect(launched)
    }

    /// Issues the step and queues its tokens' copy to the host (padding rows, if any, come
    /// after them; they are not copied): nothing waits for the device.
    fn launch(&mut self, batch: &Batch, sampling: &[SampleSpec]) -> Result<Launched> {
        if sampling.len() != batch.sample_rows.len() {
            return Err(WorkerError::Plan {
                detail: "one sampling spec per sampled row".into(),
            });
        }
        let slot = self.tokens.take();
        let out = phase(Phase::ModelStep, || self.forward(batch, sampling, slot))?;
        self.tokens
            .send_back(&self.gpu, slot, out.sampled, sampling.len())?;
        Ok(Launched::InFlight {
            count: sampling.len(),
            slot,
        })
    }

    /// Decode steps that replay a graph: their fed rows read the workspace's sampled tokens,
    /// which the step before wrote (graphs exist only while the workspace stays).
    fn feeds(&self, batch: &Batch) -> bool {
        self.loaded
            .as_ref()
            .is_some_and(|l| graph_size(l, batch).is_some())
    }

    fn tokens_ready(&self, launched: &Launched) -> bool {
        match launched {
            Launched::Done(_) => true,
            Launched::InFlight { slot, .. } => self.tokens.ready(*slot),
        }
    }

    /// The step's one synchronisation: its tokens.
    fn collect(&mut self, launched: Launched) -> Result<Sampled> {
        let tokens = match launched {
            Launched::Done(sampled) => return Ok(sampled),
            Launched::InFlight { count, slot } => self.tokens.collect(slot, count)?,
        };
        phases::log_step_gaps();
        Ok(Sampled {
            tokens,
            logprobs: Vec::new(),
        })
    }

    fn model_config(&self) -> Option<&LlamaConfig> {
        self.loaded.as_ref().map(|l| l.model.config())
    }

    fn load_lora(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        let gpu = &self.gpu;
        let model = &mut loaded_model(&mut self.loaded, "loading a LoRA adapter")?.model;
        let shard = AdapterShard::cut(adapter, model.config(), model.shard())?;
        let slots = model.lora_mut().ok_or_else(|| WorkerError::Plan {
            detail: "a LoRA adapter for a model loaded without LoRA slots (max_loras 0)".into(),
        })?;
        slots.load(gpu, slot, &shard)
    }

    fn pool(&mut self, batch: &Batch, spans: &[Range<usize>]) -> Result<Option<Vec<f32>>> {
        if !batch.sample_rows.is_empty() {
            return Err(WorkerError::Plan {
                detail: "an embedding step samples no rows".into(),
            });
        }
        let rank = self.rank;
        // Every rank runs the pass (it has collectives); rank 0 reads the final normed hidden
        // states of the whole batch back (`[tokens, hidden]` in the model's dtype: embedding
        // steps only, so generate steps never pay for the copy) and sums each span on the host.
        let states = phase(Phase::ModelStep, || {
            self.eager(batch, &[], |dev, model, cache, ws, view| {
                hidden_states(dev, model, cache, ws, view)?;
                if rank != 0 {
                    return Ok(None);
                }
                let mut bits = vec![0u16; view.rows * model.dims().hidden];
                dev.gpu.download(ws.normed.ptr, &mut bits)?;
                Ok(Some((bits, model.dtype(), model.dims().hidden)))
            })
        })?;
        let Some((bits, dtype, hidden)) = states else {
            return Ok(None);
        };
        let mut out = vec![0.0f32; spans.len() * hidden];
        for (span, acc) in spans.iter().zip(out.chunks_exact_mut(hidden.max(1))) {
            for r in span.clone() {
                for (a, b) in acc.iter_mut().zip(&bits[r * hidden..(r + 1) * hidden]) {
                    *a += dtype.to_f32(*b);
                }
            }
        }
        Ok(Some(out))
    }

    fn logits(&mut self, batch: &Batch) -> Result<Option<Vec<f32>>> {
        // Every rank runs the forward pass (it has collectives); only rank 0 reads the result.
        let greedy = vec![SampleSpec::greedy(); batch.sample_rows.len()];
        let slot = self.tokens.take();
        let out = self.forward(batch, &greedy, slot)?;
        if self.rank != 0 {
            return Ok(None);
        }
        let loaded = loaded_model(&mut self.loaded, "Step")?;
        let dims = *loaded.model.dims();
        let dtype = loaded.model.dtype();
        let per = dims.vocab_per_rank;
        let mut bits = vec![0u16; dims.world_size * out.samples * per];
        self.gpu.download(out.logits, &mut bits)?;
        let rows = batch.sample_rows.len();
        let mut logits = vec![0.0f32; rows * dims.vocab];
        for (r, row) in logits.chunks_exact_mut(dims.vocab).enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                let (rank, local) = (v / per, v % per);
                *x = dtype.to_f32(bits[(rank * out.samples + r) * per + local]);
            }
        }
        Ok(Some(logits))
    }
}
