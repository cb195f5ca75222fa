//! The CUDA backend: the model on one NVIDIA GPU in bfloat16 or float16, with our NVRTC-compiled
//! kernels (`tpserve-kernels`), cuBLAS GEMMs and NCCL tensor parallelism (one worker process per
//! GPU). Every CUDA library is loaded at run time (cudarc's `dynamic-loading`), so the same binary
//! runs on machines without CUDA; asking for CUDA there is a clear error, never a panic.
//!
//! Sampling happens on the device: rank 0 samples from the gathered logits, and NCCL broadcasts
//! the tokens so every rank appends the same ones.

mod attention_plan;
mod blas;
mod device;
mod floors;
mod kernels;
mod model;
mod nccl;
mod phases;

use std::time::Instant;

use tpserve_proto as pb;

pub use device::{device_count, gpu_present};
pub use floors::{measure_floors, Floors};
pub use kernels::Dtype;
pub use phases::take_phase_totals;

use self::blas::Blas;
use self::device::Gpu;
use self::kernels::Kernels;
use self::model::{CudaModel, GpuKvCache};
use self::nccl::Nccl;
use crate::backend::{Backend, DeviceInfo};
use crate::batch::Batch;
use crate::error::{Result, WorkerError};
use crate::sampler::SampleSpec;
use crate::weights::{load_response, load_shard};

/// Memory kept free beyond the weights, activations and KV cache: cuBLAS's and NCCL's own
/// buffers, the CUDA context's growth and allocator slack.
const RESERVED_BYTES: usize = 512 << 20;

/// What exists once the model is loaded.
struct Loaded {
    model: CudaModel,
    kernels: Kernels,
    blas: Blas,
    cache: Option<GpuKvCache>,
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

/// One GPU's side of a worker.
pub struct CudaBackend {
    gpu: Gpu,
    nccl: Option<Nccl>,
    rank: usize,
    world_size: usize,
    loaded: Option<Loaded>,
}

impl CudaBackend {
    /// Opens GPU `ordinal` on the calling thread (which must be the runner thread).
    pub fn new(ordinal: usize) -> Result<Self> {
        let gpu = Gpu::open(ordinal)?;
        tracing::info!(ordinal, name = %gpu.name, arch = %gpu.arch, "CUDA device");
        Ok(Self {
            gpu,
            nccl: None,
            rank: 0,
            world_size: 1,
            loaded: None,
        })
    }

    /// Runs the forward pass; returns where the logits are.
    fn forward(
        &mut self,
        batch: &Batch,
        sampling: Option<&[SampleSpec]>,
    ) -> Result<model::ForwardOutput> {
        let loaded = loaded_model(&mut self.loaded, "Step")?;
        let cache = loaded.cache.as_ref().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "InitCache",
        })?;
        loaded.model.forward(
            &self.gpu,
            &loaded.kernels,
            &loaded.blas,
            self.nccl.as_ref(),
            cache,
            batch,
            sampling,
        )
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

    fn load_model(&mut self, req: &pb::LoadModelRequest) -> Result<pb::LoadModelResponse> {
        let started = Instant::now();
        let dtype = Dtype::parse(&req.dtype)?;
        self.loaded = None;
        let (rank, world) = (self.rank, self.world_size);
        let kernels = Kernels::load(&self.gpu, dtype)?;
        let blas = Blas::new(self.gpu.stream.clone(), dtype)?;
        let model = load_shard(req, rank, world, |config, shard, source| {
            CudaModel::load(&self.gpu, &kernels, config, shard, source, dtype)
        })?;
        self.gpu.sync()?;
        let response = load_response(
            model.config(),
            model.shard().kv_heads.len(),
            model.weight_bytes(),
            started,
        );
        tracing::info!(
            dtype = dtype.name(),
            weight_gib = model.weight_bytes() as f64 / (1u64 << 30) as f64,
            seconds = response.load_seconds,
            "model loaded"
        );
        self.loaded = Some(Loaded {
            model,
            kernels,
            blas,
            cache: None,
        });
        Ok(response)
    }

    fn profile_memory(
        &mut self,
        req: &pb::ProfileMemoryRequest,
    ) -> Result<pb::ProfileMemoryResponse> {
        if req.block_size == 0 {
            return Err(WorkerError::Cache {
                detail: "block size must be positive".into(),
            });
        }
        let gpu = &self.gpu;
        let loaded = loaded_model(&mut self.loaded, "ProfileMemory")?;
        loaded.cache = None;
        let tokens = req.max_num_batched_tokens.max(1) as usize;
        let seqs = (req.max_num_seqs.max(1) as usize).min(tokens);
        let activations = loaded.model.reserve(gpu, tokens, seqs)?;
        gpu.sync()?;
        let (free, total) = gpu.mem_info()?;
        let per_block = loaded.model.cache_bytes_per_block(req.block_size as usize);
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        let util = req.gpu_memory_utilization as f64;
        let budget = if req.kv_cache_bytes > 0 {
            let asked = req.kv_cache_bytes as usize;
            if asked + RESERVED_BYTES > free {
                return Err(WorkerError::Cache {
                    detail: format!(
                        "--kv-cache-space asks for {:.2} GiB but {:.2} GiB of the GPU is free \
                         after the weights ({:.2} GiB) and activations ({:.2} GiB)",
                        gib(asked),
                        gib(free),
                        gib(loaded.model.weight_bytes()),
                        gib(activations)
                    ),
                });
            }
            asked
        } else {
            // Everything this process may use, minus what is in use now (ours and anyone else's).
            let allowed = (total as f64 * util) as usize;
            let used = total - free;
            allowed.saturating_sub(used + RESERVED_BYTES)
        };
        let num_blocks = budget / per_block.max(1);
        if num_blocks == 0 {
            return Err(WorkerError::Cache {
                detail: format!(
                    "no KV cache block fits: of {:.2} GiB x --gpu-memory-utilization {util:.2} the \
                     weights take {:.2} GiB, activations for --max-num-batched-tokens {tokens} \
                     take {:.2} GiB, and {:.2} GiB is in use in all; raise \
                     --gpu-memory-utilization, lower --max-num-batched-tokens, or use more GPUs \
                     (--tensor-parallel-size)",
                    gib(total),
                    gib(loaded.model.weight_bytes()),
                    gib(activations),
                    gib(total - free)
                ),
            });
        }
        tracing::info!(
            free_gib = gib(free),
            activation_gib = gib(activations),
            kv_gib = gib(num_blocks * per_block),
            num_blocks,
            "memory profile"
        );
        Ok(pb::ProfileMemoryResponse {
            num_blocks: num_blocks as u64,
            bytes_per_block: per_block as u64,
        })
    }

    fn init_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<u64> {
        let gpu = &self.gpu;
        let loaded = loaded_model(&mut self.loaded, "InitCache")?;
        loaded.cache = None;
        let cache = loaded.model.new_cache(gpu, num_blocks, block_size)?;
        gpu.sync()?;
        loaded.cache = Some(cache);
        Ok((loaded.model.cache_bytes_per_block(block_size) * num_blocks) as u64)
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

    fn step(&mut self, batch: &Batch, sampling: &[SampleSpec]) -> Result<Vec<u32>> {
        if sampling.len() != batch.sample_rows.len() {
            return Err(WorkerError::Plan {
                detail: "one sampling spec per sampled row".into(),
            });
        }
        let out = self.forward(batch, Some(sampling))?;
        let rank = self.rank;
        let loaded = loaded_model(&mut self.loaded, "Step")?;
        let dims = *loaded.model.dims();
        if out.samples > 0 && rank == 0 {
            let params = out.sampling.expect("uploaded with the inputs");
            loaded.kernels.sample(
                out.sampled,
                out.logits,
                out.samples,
                dims.vocab_per_rank,
                dims.vocab,
                &params,
            )?;
        }
        if let Some(comm) = &self.nccl {
            comm.broadcast_from_root(
                out.sampled,
                out.samples,
                cudarc::nccl::sys::ncclDataType_t::ncclUint32,
                &self.gpu.stream,
            )?;
        }
        let mut tokens = vec![0u32; out.samples];
        self.gpu.download(out.sampled, &mut tokens)?;
        Ok(tokens)
    }

    fn logits(&mut self, batch: &Batch) -> Result<Option<Vec<f32>>> {
        // Every rank runs the forward pass (it has collectives); only rank 0 reads the result.
        let out = self.forward(batch, None)?;
        if self.rank != 0 {
            return Ok(None);
        }
        let loaded = loaded_model(&mut self.loaded, "Step")?;
        let dims = *loaded.model.dims();
        let dtype = loaded.model.dtype();
        let per = dims.vocab_per_rank;
        let mut bits = vec![0u16; dims.world_size * out.samples * per];
        self.gpu.download(out.logits, &mut bits)?;
        let mut rows = vec![0.0f32; out.samples * dims.vocab];
        for (r, row) in rows.chunks_exact_mut(dims.vocab).enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                let (rank, local) = (v / per, v % per);
                *x = dtype.to_f32(bits[(rank * out.samples + r) * per + local]);
            }
        }
        Ok(Some(rows))
    }
}
