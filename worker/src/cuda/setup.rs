//! Loading a model onto the GPU and sizing its KV cache: the CUDA backend's LoadModel and
//! ProfileMemory, before any step runs.

use std::time::Instant;

use super::blas::Blas;
use super::blas_lt::BlasLt;
use super::device::Gpu;
use super::kernels::{Dtype, Kernels};
use super::linear::Linear;
use super::model::{CudaModel, Fp8Load, QuantizedLoad};
use super::{fp8, loaded_model, CudaBackend, Loaded};
use crate::error::{Result, WorkerError};
use crate::kv_cache_dtype::KvCacheDtype;
use crate::load::{LoadSpec, LoadedModel, MemoryBudget, MemoryProfile};
use crate::weights::{load_response, load_shard, QuantizationRequest};

/// Memory kept free beyond the weights, activations and KV cache: cuBLAS's and NCCL's own
/// buffers, the CUDA context's growth and allocator slack.
const RESERVED_BYTES: usize = 512 << 20;

/// Refuses `--quantization fp8` where it cannot run: GPUs without FP8 (before compute
/// capability 8.9) and the batch-invariant mode (whose one kernel is for the dtype).
fn check_fp8(gpu: &Gpu, batch_invariant: bool) -> Result<()> {
    let (major, minor) = gpu.compute_capability;
    if (major, minor) < fp8::MIN_COMPUTE_CAPABILITY {
        return Err(WorkerError::Unsupported {
            detail: format!(
                "quantization fp8 needs a GPU of compute capability 8.9 or newer (Ada, \
                 Hopper, Blackwell); {} is {major}.{minor}",
                gpu.name
            ),
        });
    }
    if batch_invariant {
        return Err(WorkerError::Unsupported {
            detail: "quantization fp8 with --batch-invariant (the batch-invariant GEMM \
                     multiplies weights in the dtype)"
                .into(),
        });
    }
    Ok(())
}

/// Refuses `--kv-cache-dtype fp8` on GPUs without FP8 conversions (before compute capability
/// 8.9).
fn check_fp8_kv_cache(gpu: &Gpu) -> Result<()> {
    let (major, minor) = gpu.compute_capability;
    if (major, minor) < fp8::MIN_COMPUTE_CAPABILITY {
        return Err(WorkerError::Unsupported {
            detail: format!(
                "kv cache dtype fp8 needs a GPU of compute capability 8.9 or newer (Ada, \
                 Hopper, Blackwell); {} is {major}.{minor} (leave --kv-cache-dtype auto)",
                gpu.name
            ),
        });
    }
    Ok(())
}

impl CudaBackend {
    /// LoadModel: the shard's weights on this GPU (FP8 or 4-bit kept as asked), its kernels,
    /// its GEMM handles and the LoRA slots.
    pub(super) fn load(&mut self, req: &LoadSpec) -> Result<LoadedModel> {
        let started = Instant::now();
        let dtype = Dtype::parse(&req.dtype)?;
        let quantization = QuantizationRequest::parse(&req.quantization)?;
        let kv_cache = KvCacheDtype::parse(&req.kv_cache_dtype)?;
        if kv_cache == KvCacheDtype::Fp8E4M3 {
            check_fp8_kv_cache(&self.gpu)?;
        }
        if quantization == QuantizationRequest::Gguf {
            return Err(WorkerError::Unsupported {
                detail: "quantization gguf runs on the CPU backend only; on a GPU a GGUF is \
                         dequantized to the dtype at load (leave --quantization unset, or none)"
                    .into(),
            });
        }
        self.loaded = None;
        // `Fp8` must run FP8 (an FP8 checkpoint as stored, any other quantized here); `Auto`
        // keeps an FP8 checkpoint's weights as stored where this GPU multiplies FP8 and
        // dequantizes them elsewhere.
        let fp8 = match quantization {
            QuantizationRequest::Fp8 => {
                check_fp8(&self.gpu, req.batch_invariant)?;
                Fp8Load::Always
            }
            QuantizationRequest::Auto if check_fp8(&self.gpu, req.batch_invariant).is_ok() => {
                Fp8Load::Checkpoint
            }
            _ => Fp8Load::Off,
        };
        // An AWQ/GPTQ checkpoint's 4-bit weights stay packed unless asked otherwise (or in
        // batch-invariant mode, whose one kernel multiplies weights in the dtype).
        let int4 = quantization == QuantizationRequest::Auto && !req.batch_invariant;
        let (rank, world) = (self.rank, self.world_size);
        let kernels = Kernels::load(&self.gpu, dtype, kv_cache)?;
        let mut model = load_shard(req, rank, world, |config, shard, source| {
            let quantized = QuantizedLoad {
                fp8,
                int4,
                kv_cache,
            };
            CudaModel::load(&self.gpu, &kernels, config, shard, source, dtype, quantized)
        })?;
        let blas_lt = model
            .fp8()
            .then(|| BlasLt::new(&self.gpu, dtype))
            .transpose()?;
        let linear = Linear::new(Blas::new(&self.gpu, dtype)?, blas_lt, req.batch_invariant)?;
        if req.max_loras > 0 {
            let (slots, rank) = (req.max_loras, req.max_lora_rank);
            let bytes = model.enable_lora(&self.gpu, slots, rank)?;
            tracing::info!(
                slots,
                max_rank = rank,
                gib = bytes as f64 / (1u64 << 30) as f64,
                "LoRA slots allocated"
            );
        }
        self.gpu.sync()?;
        let d = *model.dims();
        let inner = [d.hidden, d.inter, d.q_heads * d.head_dim];
        if req.batch_invariant && inner.iter().any(|k| !k.is_multiple_of(8)) {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "--batch-invariant on CUDA needs the hidden size, intermediate size and \
                     attention width per rank to be multiples of 8 (they are {inner:?})"
                ),
            });
        }
        let mut response = load_response(
            model.config(),
            model.shard().kv_heads.len(),
            model.weight_bytes(),
            started,
        );
        if model.fp8() {
            response.quantization = "fp8".into();
            response.weight_types = model.fp8_weight_types();
        } else if let Some(types) = model.int4_weight_types() {
            response.quantization = "int4".into();
            response.weight_types = types;
        } else {
            response.quantization = "none".into();
        }
        response.kv_cache_dtype = model.kv_cache_dtype().name(dtype.name());
        tracing::info!(
            dtype = dtype.name(),
            kv_cache_dtype = %response.kv_cache_dtype,
            weight_gib = model.weight_bytes() as f64 / (1u64 << 30) as f64,
            seconds = response.load_seconds,
            "model loaded"
        );
        self.loaded = Some(Loaded {
            model,
            kernels,
            linear,
            cache: None,
            graphs: None,
        });
        Ok(response)
    }

    /// ProfileMemory: reserves the activations for the budget's batch and sizes the KV cache in
    /// what is left (or checks an explicit size against it).
    pub(super) fn size_cache(&mut self, req: &MemoryBudget) -> Result<MemoryProfile> {
        if req.block_size == 0 {
            return Err(WorkerError::Cache {
                detail: "block size must be positive".into(),
            });
        }
        let gpu = &self.gpu;
        let loaded = loaded_model(&mut self.loaded, "ProfileMemory")?;
        loaded.graphs = None;
        loaded.cache = None;
        let tokens = req.max_num_batched_tokens.max(1);
        let seqs = req.max_num_seqs.max(1).min(tokens);
        let (activations, _) = loaded.model.reserve(gpu, tokens, seqs)?;
        gpu.sync()?;
        let (free, total) = gpu.mem_info()?;
        let per_block = loaded.model.cache_bytes_per_block(req.block_size);
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
        Ok(MemoryProfile {
            num_blocks: num_blocks as u64,
            bytes_per_block: per_block as u64,
        })
    }
}
