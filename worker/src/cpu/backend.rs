//! The CPU backend: model shard with f32 activations (weights f32, or a GGUF's quantized blocks
//! unless `--dtype float32` or `--quantization none`), KV cache in host memory, TCP
//! communicator. Logits are gathered to rank 0, which samples and broadcasts the tokens.

use std::time::Instant;

use tpserve_modelfile::{LlamaConfig, LoraAdapter};

use super::quant::KernelChoice;
use super::{CpuModel, KvCache, WeightMode};
use crate::backend::{Backend, CacheShape, DecodePrep, DeviceInfo, Launched};
use crate::batch::Batch;
use crate::comm::tcp::Rendezvous;
use crate::comm::{Communicator, SingleRank, TcpCommunicator};
use crate::error::{Result, WorkerError};
use crate::kv_cache_dtype::KvCacheDtype;
use crate::load::{LoadSpec, LoadedModel, MemoryBudget, MemoryProfile};
use crate::lora::shard::AdapterShard;
use crate::sampler::{sample_gathered, RowExtras, SampleSpec, Sampled};
use crate::shard::ShardPlan;
use crate::step_trace::{phase, Phase};
use crate::weights::{load_response, load_shard, QuantizationRequest};

/// KV cache size when the coordinator leaves it to the worker (`--kv-cache-space`'s default).
const DEFAULT_KV_CACHE_BYTES: u64 = 2 << 30;

/// The CPU side of a worker.
pub struct CpuBackend {
    comm: Box<dyn Communicator>,
    rendezvous: Option<Rendezvous>,
    model: Option<CpuModel>,
    cache: Option<KvCache>,
    /// Vocabulary rows of every rank, to reassemble gathered logits.
    vocab_per_rank: Vec<usize>,
    /// Host name other ranks reach this worker's rendezvous socket at.
    host: String,
    threads: usize,
    /// The tokens of the last launched step, which the next step's fed rows take.
    last_sampled: Vec<u32>,
}

impl CpuBackend {
    /// A backend whose rendezvous socket (if it becomes rank 0) binds to `host`.
    pub fn new(host: String, threads: usize) -> Self {
        Self {
            comm: Box::new(SingleRank),
            rendezvous: None,
            model: None,
            cache: None,
            vocab_per_rank: Vec::new(),
            host,
            threads,
            last_sampled: Vec::new(),
        }
    }

    fn model(&self, operation: &'static str) -> Result<&CpuModel> {
        self.model.as_ref().ok_or(WorkerError::Lifecycle {
            operation,
            needs: "LoadModel",
        })
    }

    /// This rank's logits of the sample rows, `[rows, vocab_local]`.
    fn forward(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        let model = self.model.as_ref().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "LoadModel",
        })?;
        let cache = self.cache.as_mut().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "InitCache",
        })?;
        model.forward(batch, cache, self.comm.as_mut())
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            kind: "cpu",
            name: format!("{} threads", self.threads),
            total_memory_bytes: total_memory_bytes(),
        }
    }

    fn communicator_id(&mut self, _world_size: usize) -> Result<Vec<u8>> {
        let rv = Rendezvous::open(&self.host)?;
        let id = rv.id()?;
        self.rendezvous = Some(rv);
        Ok(id)
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn init_communicator(&mut self, id: &[u8], rank: usize, world_size: usize) -> Result<()> {
        self.comm = if world_size == 1 {
            Box::new(SingleRank)
        } else if rank == 0 {
            let rv = self.rendezvous.take().ok_or(WorkerError::Lifecycle {
                operation: "InitCommunicator on rank 0",
                needs: "CommunicatorId",
            })?;
            Box::new(TcpCommunicator::accept(rv, world_size)?)
        } else {
            Box::new(TcpCommunicator::connect(id, rank, world_size)?)
        };
        Ok(())
    }

    fn load_model(&mut self, req: &LoadSpec) -> Result<LoadedModel> {
        let started = Instant::now();
        if !matches!(req.dtype.as_str(), "" | "auto" | "float32" | "float") {
            return Err(WorkerError::Device {
                detail: format!(
                    "the CPU backend computes in float32; dtype {:?} is not available on it",
                    req.dtype
                ),
            });
        }
        if KvCacheDtype::parse(&req.kv_cache_dtype)? != KvCacheDtype::Compute {
            return Err(WorkerError::Unsupported {
                detail: "kv cache dtype fp8 runs on CUDA GPUs of compute capability 8.9 or \
                         newer; the CPU backend keeps the KV cache in float32 (leave \
                         --kv-cache-dtype auto)"
                    .into(),
            });
        }
        let mode = weight_mode(req)?;
        self.model = None;
        self.cache = None;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mut model = load_shard(req, rank, world, |config, shard, source| {
            CpuModel::load(config, shard, source, config.max_position_embeddings, mode)
        })?;
        let weight_types = model.quantized_types();
        if weight_types.is_empty()
            && QuantizationRequest::parse(&req.quantization)? == QuantizationRequest::Gguf
        {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "quantization gguf needs a GGUF file with quantized tensors; {} has none",
                    req.model_path
                ),
            });
        }
        model.set_batch_invariant(req.batch_invariant);
        let config = model.config().clone();
        self.vocab_per_rank = (0..world)
            .map(|r| ShardPlan::new(&config, r, world).map(|p| p.vocab.len()))
            .collect::<Result<_>>()?;
        let mut response = load_response(
            &config,
            model.shard().kv_heads.len(),
            model.weight_bytes(),
            started,
        );
        response.quantization = if weight_types.is_empty() {
            "none"
        } else {
            "gguf"
        }
        .into();
        response.kv_cache_dtype = "float32".into();
        response.weight_types = weight_types
            .iter()
            .map(|t| format!("{t:?}"))
            .collect::<Vec<_>>()
            .join(",");
        tracing::info!(
            quantization = %response.quantization,
            weight_types = %response.weight_types,
            weight_mib = response.weight_bytes / (1 << 20),
            "model loaded"
        );
        self.model = Some(model);
        Ok(response)
    }

    fn profile_memory(&mut self, req: &MemoryBudget) -> Result<MemoryProfile> {
        let model = self.model("ProfileMemory")?;
        if req.block_size == 0 {
            return Err(WorkerError::Cache {
                detail: "block size must be positive".into(),
            });
        }
        let per_block = model.cache_bytes_per_block(req.block_size) as u64;
        let budget = if req.kv_cache_bytes == 0 {
            DEFAULT_KV_CACHE_BYTES
        } else {
            req.kv_cache_bytes
        };
        Ok(MemoryProfile {
            num_blocks: budget / per_block,
            bytes_per_block: per_block,
        })
    }

    fn init_cache(&mut self, shape: CacheShape) -> Result<u64> {
        let cache = self
            .model("InitCache")?
            .new_cache(shape.num_blocks, shape.block_size);
        let bytes = cache.bytes() as u64;
        self.cache = Some(cache);
        Ok(bytes)
    }

    fn prepare_decode(
        &mut self,
        _graph_sizes: &[usize],
        _custom_all_reduce: bool,
    ) -> Result<DecodePrep> {
        // Nothing to capture or choose: the CPU runs every step as it comes.
        Ok(DecodePrep::default())
    }

    fn cache_shape(&self) -> Option<(usize, usize)> {
        self.cache.as_ref().map(|c| (c.num_blocks, c.block_size))
    }

    fn max_positions(&self) -> Result<usize> {
        Ok(self.model("Step")?.max_positions())
    }

    fn step(
        &mut self,
        batch: &Batch,
        sampling: &[SampleSpec],
        extras: &[RowExtras],
    ) -> Result<Sampled> {
        let logits = phase(Phase::ModelStep, || self.logits(batch))?;
        let Sampled {
            mut tokens,
            logprobs,
        } = sample_gathered(logits, sampling, extras);
        self.comm.broadcast_from_root(&mut tokens)?;
        Ok(Sampled { tokens, logprobs })
    }

    /// Runs the step at once (the host is the device): fed rows take their token from the
    /// last launched step's, which the runner may not have collected yet.
    fn launch(&mut self, batch: &Batch, sampling: &[SampleSpec]) -> Result<Launched> {
        let with_fed;
        let batch = if batch.fed.is_empty() {
            batch
        } else {
            let mut b = batch.clone();
            for &(row, sample) in &batch.fed {
                let bad = || WorkerError::Plan {
                    detail: format!("row {row} fed from sample {sample}, outside the steps"),
                };
                let token = self.last_sampled.get(sample).ok_or_else(bad)?;
                *b.token_ids.get_mut(row).ok_or_else(bad)? = *token;
            }
            b.fed.clear();
            with_fed = b;
            &with_fed
        };
        let sampled = self.step(batch, sampling, &[])?;
        self.last_sampled.clone_from(&sampled.tokens);
        Ok(Launched::Done(sampled))
    }

    fn feeds(&self, _batch: &Batch) -> bool {
        true
    }

    fn model_config(&self) -> Option<&LlamaConfig> {
        self.model.as_ref().map(CpuModel::config)
    }

    fn load_lora(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<()> {
        let model = self.model.as_mut().ok_or(WorkerError::Lifecycle {
            operation: "loading a LoRA adapter",
            needs: "LoadModel",
        })?;
        let cut = AdapterShard::cut(adapter, model.config(), model.shard())?;
        model.lora_slots_mut().set(slot, cut);
        Ok(())
    }

    fn logits(&mut self, batch: &Batch) -> Result<Option<Vec<f32>>> {
        let local = self.forward(batch)?;
        gather_logits(self.comm.as_mut(), &local, &self.vocab_per_rank)
    }

    fn pool(
        &mut self,
        batch: &Batch,
        spans: &[std::ops::Range<usize>],
    ) -> Result<Option<Vec<f32>>> {
        let model = self.model.as_ref().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "LoadModel",
        })?;
        let cache = self.cache.as_mut().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "InitCache",
        })?;
        let sums = phase(Phase::ModelStep, || {
            model.pool(batch, cache, self.comm.as_mut(), spans)
        })?;
        Ok((self.comm.rank() == 0).then_some(sums))
    }
}

/// How the request asks the weights to be held: a GGUF's blocks are kept unless the request
/// says `quantization: none` or `dtype: float32` (the exact f32 reference path); asking for
/// both `gguf` and `float32` is a contradiction and refused.
fn weight_mode(req: &LoadSpec) -> Result<WeightMode> {
    let float32 = matches!(req.dtype.as_str(), "float32" | "float");
    match (QuantizationRequest::parse(&req.quantization)?, float32) {
        (QuantizationRequest::None, _) | (QuantizationRequest::Auto, true) => {
            Ok(WeightMode::Float32)
        }
        (QuantizationRequest::Fp8, _) => Err(WorkerError::Unsupported {
            detail: "quantization fp8 runs on CUDA GPUs of compute capability 8.9 or newer \
                     (Ada, Hopper, Blackwell), not on the CPU backend"
                .into(),
        }),
        (QuantizationRequest::Gguf, true) => Err(WorkerError::Unsupported {
            detail: "quantization gguf keeps weights in GGUF blocks, dtype float32 asks for \
                     them dequantized: choose one"
                .into(),
        }),
        _ => Ok(WeightMode::Quantized(KernelChoice::Fastest)),
    }
}

/// Gathers every rank's vocabulary slice of the logits (`[rows, vocab_of_rank]` each) to rank 0
/// and reassembles whole rows, `[rows, vocab]`; other ranks get `None`.
fn gather_logits(
    comm: &mut dyn Communicator,
    local: &[f32],
    vocab_per_rank: &[usize],
) -> Result<Option<Vec<f32>>> {
    let Some(all) = comm.gather_to_root(local)? else {
        return Ok(None);
    };
    let vocab: usize = vocab_per_rank.iter().sum();
    let rows = all.len().checked_div(vocab).unwrap_or(0);
    let mut out = vec![0.0f32; rows * vocab];
    let (mut offset, mut column) = (0usize, 0usize);
    for &v in vocab_per_rank {
        for r in 0..rows {
            out[r * vocab + column..r * vocab + column + v]
                .copy_from_slice(&all[offset + r * v..offset + (r + 1) * v]);
        }
        offset += rows * v;
        column += v;
    }
    Ok(Some(out))
}

/// Host memory in bytes, from /proc/meminfo (0 where unreadable).
fn total_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(quantization: &str, dtype: &str) -> Result<WeightMode> {
        weight_mode(&LoadSpec {
            quantization: quantization.into(),
            dtype: dtype.into(),
            ..Default::default()
        })
    }

    #[test]
    fn fp8_and_contradictions_are_refused_by_name() {
        for dtype in ["auto", "float32"] {
            let err = mode("fp8", dtype).expect_err("fp8 on the CPU").to_string();
            assert!(err.contains("fp8") && err.contains("CPU backend"), "{err}");
        }
        let err = mode("gguf", "float32")
            .expect_err("a contradiction")
            .to_string();
        assert!(err.contains("choose one"), "{err}");
        assert!(matches!(mode("", "float32"), Ok(WeightMode::Float32)));
        assert!(matches!(mode("none", "auto"), Ok(WeightMode::Float32)));
        assert!(matches!(mode("gguf", "auto"), Ok(WeightMode::Quantized(_))));
    }

    #[test]
    fn an_fp8_kv_cache_is_refused_before_anything_loads() {
        let mut backend = CpuBackend::new("127.0.0.1".into(), 1);
        for kv in ["fp8", "fp8_e4m3", "fp8_e5m2"] {
            let err = backend
                .load_model(&LoadSpec {
                    model_path: "/nonexistent".into(),
                    kv_cache_dtype: kv.into(),
                    ..Default::default()
                })
                .expect_err("no FP8 cache on the CPU")
                .to_string();
            let why = if kv == "fp8_e5m2" {
                "\"fp8_e5m2\""
            } else {
                "keeps the KV cache in float32"
            };
            assert!(err.contains(why), "{kv}: {err}");
        }
    }
}
