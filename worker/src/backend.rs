//! What a compute device must do for the runner: join a tensor-parallel group, hold a shard of the
//! model and its paged KV cache, and turn a batch into sampled tokens. The CPU backend
//! (`cpu::CpuBackend`) and the CUDA backend (`cuda::CudaBackend`) implement it; the runner keeps
//! the per-sequence state and plan validation, which do not depend on the device.
//!
//! Every rank of a group calls the same methods in the same order with the same batches; the
//! collectives inside `step`, `launch` and `logits` rely on that.
//!
//! A step without extras is launched (`launch`) and its tokens collected later (`collect`), so
//! the runner can launch the next step first: that step's rows in `Batch::fed` take their token
//! from the launched step's samples on the device (`feeds` says where a backend can), and the
//! device never waits for the host between two decode steps (issue 9, async scheduling).

use std::ops::Range;

use tpserve_modelfile::{LlamaConfig, LoraAdapter};

use crate::batch::Batch;
use crate::error::{Result, WorkerError};
use crate::load::{LoadSpec, LoadedModel, MemoryBudget, MemoryProfile};
use crate::sampler::{RowExtras, SampleSpec, Sampled};

/// What a worker runs on, for `Info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: &'static str,
    /// Human-readable name: `cpu (16 threads)`, `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Device memory in bytes (host memory for the CPU).
    pub total_memory_bytes: u64,
}

/// The paged KV cache `Backend::init_cache` allocates, and the sequences it serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShape {
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Sequences held at once (rows of the per-sequence state, `SeqSlice::slot` below this).
    pub max_sequences: usize,
}

/// What `Backend::prepare_decode` did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodePrep {
    /// CUDA graphs captured (0 on the CPU or with `--enforce-eager`).
    pub graphs: usize,
    /// Seconds spent choosing kernels and capturing graphs.
    pub seconds: f64,
}

/// A launched step's sampled tokens.
#[derive(Debug)]
pub enum Launched {
    /// Known already: the step ran to its end on the host's time (the CPU).
    Done(Sampled),
    /// On their way from the device; `Backend::collect` waits for them.
    InFlight {
        /// Sampled rows.
        count: usize,
        /// The backend's staging slot the tokens land in.
        slot: usize,
    },
}

/// One device's side of a worker.
pub trait Backend {
    /// The device, for `Info`.
    fn info(&self) -> DeviceInfo;

    /// Rank 0: creates the id every rank passes to `init_communicator`.
    fn communicator_id(&mut self, world_size: usize) -> Result<Vec<u8>>;

    /// This rank in its group (0 before `init_communicator`).
    fn rank(&self) -> usize;

    /// Joins the group; blocks until every rank has joined.
    fn init_communicator(&mut self, id: &[u8], rank: usize, world_size: usize) -> Result<()>;

    /// Loads this rank's shard, dropping any model and cache held before.
    fn load_model(&mut self, spec: &LoadSpec) -> Result<LoadedModel>;

    /// How many KV blocks fit on this rank.
    fn profile_memory(&mut self, budget: &MemoryBudget) -> Result<MemoryProfile>;

    /// Allocates the paged KV cache and the per-sequence state; returns the cache's size in
    /// bytes.
    fn init_cache(&mut self, shape: CacheShape) -> Result<u64>;

    /// After the cache exists: prepares decode steps for the batch sizes in `graph_sizes`
    /// (choosing kernels by measurement and capturing CUDA graphs on a GPU; nothing on the CPU).
    /// Every rank of a group calls it with the same arguments. `custom_all_reduce` lets a GPU
    /// group set up its all-reduce over peer memory for small messages (NCCL otherwise).
    fn prepare_decode(
        &mut self,
        graph_sizes: &[usize],
        custom_all_reduce: bool,
    ) -> Result<DecodePrep>;

    /// `(num_blocks, block_size)` of the cache, once it exists.
    fn cache_shape(&self) -> Option<(usize, usize)>;

    /// Positions the model can take (the rotary tables' length).
    fn max_positions(&self) -> Result<usize>;

    /// Runs `batch` and samples one token per `batch.sample_rows` entry with the matching
    /// `sampling` spec; every rank returns the same tokens. `extras` is empty (no row uses
    /// logit processing or log probabilities: the fast path) or has one entry per sample row:
    /// its edits are applied before the draw, and rank 0 returns the asked-for log
    /// probabilities of the raw logits.
    fn step(
        &mut self,
        batch: &Batch,
        sampling: &[SampleSpec],
        extras: &[RowExtras],
    ) -> Result<Sampled>;

    /// Launches `batch` as [`Self::step`] does without extras, taking the token of each row in
    /// `batch.fed` from the samples of the step launched just before (whose tokens may not be
    /// collected yet); the tokens come from [`Self::collect`]. Only a batch [`Self::feeds`]
    /// accepts may have fed rows.
    fn launch(&mut self, batch: &Batch, sampling: &[SampleSpec]) -> Result<Launched> {
        if !batch.fed.is_empty() {
            return Err(WorkerError::Plan {
                detail: "this backend cannot feed sampled tokens to the next step".into(),
            });
        }
        self.step(batch, sampling, &[]).map(Launched::Done)
    }

    /// Whether [`Self::launch`] can run `batch` with rows fed from the step launched before it.
    fn feeds(&self, _batch: &Batch) -> bool {
        false
    }

    /// Whether a launched step's tokens are back (never waits; an error counts as back, for
    /// [`Self::collect`] to report).
    fn tokens_ready(&self, _launched: &Launched) -> bool {
        true
    }

    /// Waits for a launched step's tokens.
    fn collect(&mut self, launched: Launched) -> Result<Sampled> {
        match launched {
            Launched::Done(sampled) => Ok(sampled),
            Launched::InFlight { .. } => Err(WorkerError::Device {
                detail: "tokens in flight on a backend that launches none".into(),
            }),
        }
    }

    /// The loaded model's config (`None` before `load_model`).
    fn model_config(&self) -> Option<&LlamaConfig>;

    /// Puts `adapter` (whole, as read and checked against the base) into LoRA slot `slot`
    /// (below `LoadModel`'s `max_loras`) for the following steps: cuts this rank's shard of it
    /// and copies it to the device. Sequences name slots in `SeqSlice::lora_slot`.
    fn load_lora(&mut self, slot: usize, adapter: &LoraAdapter) -> Result<()>;

    /// Runs `batch` and returns the whole-vocabulary logits of `batch.sample_rows`,
    /// `[rows, vocab]` as f32, on rank 0 (`None` on the other ranks). For numerical checks and
    /// scoring; serving uses `step`.
    fn logits(&mut self, batch: &Batch) -> Result<Option<Vec<f32>>>;

    /// Runs `batch` (embedding sequences: no sample rows) and returns, for each of `spans` (row
    /// ranges of the batch), the sum over its rows of the hidden states after the final RMSNorm,
    /// `[spans, hidden]` as f32, on rank 0 (`None` on the other ranks: the states are the same
    /// on every rank after the last all-reduce). The lm_head and sampling do not run.
    fn pool(&mut self, batch: &Batch, spans: &[Range<usize>]) -> Result<Option<Vec<f32>>>;
}

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when a driver and a GPU are present, else the CPU.
    Auto,
    /// The CPU backend.
    Cpu,
    /// A GPU; `None` picks by rank (`TPSERVE_RANK` modulo the GPUs this process sees).
    Cuda(Option<usize>),
}

impl DeviceChoice {
    /// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(None)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Self::Cuda(Some(n)))
                .ok_or_else(|| WorkerError::Device {
                    detail: format!("--device {other}: expected auto, cpu, cuda or cuda:N"),
                }),
        }
    }
}

/// Creates the backend `choice` names. `host` is where a CPU rank 0 opens its rendezvous socket;
/// `rank_hint` picks the GPU for a plain `cuda`/`auto`.
pub fn create_backend(
    choice: DeviceChoice,
    host: String,
    threads: usize,
    rank_hint: usize,
) -> Result<Box<dyn Backend>> {
    let cuda = |ordinal: Option<usize>| -> Result<Box<dyn Backend>> {
        let count = crate::cuda::device_count()?;
        let ordinal = ordinal.unwrap_or(rank_hint % count);
        Ok(Box::new(crate::cuda::CudaBackend::new(ordinal)?))
    };
    match choice {
        DeviceChoice::Cpu => Ok(Box::new(crate::cpu::CpuBackend::new(host, threads))),
        DeviceChoice::Cuda(ordinal) => cuda(ordinal),
        DeviceChoice::Auto => {
            if crate::cuda::gpu_present() {
                cuda(None)
            } else {
                Ok(Box::new(crate::cpu::CpuBackend::new(host, threads)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(DeviceChoice::parse("auto").unwrap(), DeviceChoice::Auto);
        assert_eq!(DeviceChoice::parse("cpu").unwrap(), DeviceChoice::Cpu);
        assert_eq!(
            DeviceChoice::parse("cuda").unwrap(),
            DeviceChoice::Cuda(None)
        );
        assert_eq!(
            DeviceChoice::parse("cuda:3").unwrap(),
            DeviceChoice::Cuda(Some(3))
        );
        for bad in ["gpu", "cuda:", "cuda:x", "CUDA"] {
            let e = DeviceChoice::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        }
    }
}
