//! The engine's flags, shared by `tpserve serve` and `tpserve generate`. Names follow vLLM's
//! where the meaning is the same; every flag can also be set through a `TPSERVE_*` variable.
//! Cross-flag checks live in `validate`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::adapters::LoraArgs;
use crate::error::StartError;
use crate::scheduler::SchedulingPolicy;
use crate::task::TaskArg;
use crate::tools::ToolArgs;

/// How the model's weights are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LoadFormat {
    /// A directory is read as safetensors, a `.gguf` file as GGUF.
    Auto,
    /// A Hugging Face directory.
    Safetensors,
    /// A single GGUF file.
    Gguf,
    /// Random weights of the shape the model's config.json gives (benchmarks).
    Dummy,
}

/// Waiting-queue order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// First come, first served.
    Fcfs,
    /// By the request's `priority` (lower first), then arrival.
    Priority,
    /// Weighted fair share between the gateway's tenants (weights from their tiers): a tenant
    /// that floods the queue cannot starve the others.
    Fair,
}

impl From<Policy> for SchedulingPolicy {
    fn from(p: Policy) -> Self {
        match p {
            Policy::Fcfs => SchedulingPolicy::Fcfs,
            Policy::Priority => SchedulingPolicy::Priority,
            Policy::Fair => SchedulingPolicy::Fair,
        }
    }
}

/// Everything needed to bring up the engine and its workers.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// The model: a Hugging Face directory or a GGUF file.
    #[arg(long, env = "TPSERVE_MODEL")]
    pub model: PathBuf,
    /// How to read the model.
    #[arg(long, env = "TPSERVE_LOAD_FORMAT", value_enum, default_value = "auto")]
    pub load_format: LoadFormat,
    /// Compute dtype: `auto` (float32 on CPU, bfloat16 on GPU), `float32` (CPU), `bfloat16` or
    /// `float16` (GPU).
    #[arg(long, env = "TPSERVE_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Quantized weights (vLLM's `--quantization`): `gguf` keeps a GGUF file's blocks quantized
    /// and multiplies them directly (CPU backend; the default for a GGUF on the CPU unless
    /// `--dtype float32`), `fp8` runs linear layers in FP8 E4M3 on CUDA GPUs of compute
    /// capability 8.9 or newer: an FP8 checkpoint's as stored, a bf16/f16 checkpoint's quantized
    /// at load with per-tensor scales (`compressed-tensors` says the same for such a
    /// checkpoint), `none` dequantizes at load. Default: what the checkpoint holds (an FP8
    /// checkpoint runs in FP8 where the GPU can, else dequantized). Other methods (awq, gptq,
    /// ...) are refused at start, by name.
    #[arg(long, short = 'q', env = "TPSERVE_QUANTIZATION")]
    pub quantization: Option<String>,
    /// Device of the workers this coordinator spawns: `auto` (a GPU when a CUDA driver and GPUs
    /// are present, else the CPU), `cpu` or `cuda` (rank r on GPU r).
    #[arg(long, env = "TPSERVE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Number of worker processes the model is split over (tensor parallelism).
    #[arg(
        long,
        short = 't',
        env = "TPSERVE_TENSOR_PARALLEL_SIZE",
        default_value_t = 1
    )]
    pub tensor_parallel_size: usize,
    /// Longest sequence (prompt plus output); defaults to the model's context length.
    #[arg(long, env = "TPSERVE_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Most sequences in one step.
    #[arg(long, env = "TPSERVE_MAX_NUM_SEQS", default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Token budget of one step; longer prompts are prefilled in chunks.
    #[arg(long, env = "TPSERVE_MAX_NUM_BATCHED_TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Tokens per KV-cache block.
    #[arg(long, env = "TPSERVE_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV-cache memory per worker, in GiB. Default: 2 on the CPU; on a GPU, what
    /// --gpu-memory-utilization leaves after the weights and activations.
    #[arg(long, env = "TPSERVE_KV_CACHE_SPACE")]
    pub kv_cache_space: Option<f64>,
    /// Fraction of GPU memory a worker may use (GPU backend).
    #[arg(long, env = "TPSERVE_GPU_MEMORY_UTILIZATION", default_value_t = 0.9)]
    pub gpu_memory_utilization: f32,
    /// What the KV cache stores (vLLM's `--kv-cache-dtype`): `auto`, the compute dtype; or
    /// `fp8` (`fp8_e4m3`), FP8 E4M3 with one scale per layer for keys and one for values (the
    /// checkpoint's `k_scale` / `v_scale`, else 1): half the bytes, so twice the tokens in the
    /// same memory and half the bytes a decode step's attention reads, for three mantissa bits.
    /// CUDA GPUs of compute capability 8.9 or newer.
    #[arg(long, env = "TPSERVE_KV_CACHE_DTYPE", default_value = "auto")]
    pub kv_cache_dtype: String,
    /// Reuse the KV cache of repeated prompt prefixes (the default).
    #[arg(long, overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn prefix caching off.
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// Run every step eagerly: no CUDA graphs for decode steps (GPU workers).
    #[arg(long, env = "TPSERVE_ENFORCE_EAGER")]
    pub enforce_eager: bool,
    /// Batch-invariant results: a request's output is bit-identical alone, in any batch and
    /// after a prefix-cache hit (fixed reduction orders, one kernel per operation for every
    /// batch size). Costs speed; for evaluation and RL rollouts. Off by default.
    #[arg(long, env = "TPSERVE_BATCH_INVARIANT")]
    pub batch_invariant: bool,
    /// Keep every all-reduce on NCCL (GPU tensor parallelism). By default a group of 2-8 GPUs
    /// with peer access sums small messages (decode steps) with its own one-shot all-reduce
    /// over peer memory, faster than NCCL for them.
    #[arg(long, env = "TPSERVE_DISABLE_CUSTOM_ALL_REDUCE")]
    pub disable_custom_all_reduce: bool,
    /// Largest decode batch captured as a CUDA graph (GPU workers): sizes 1, 2, 4, 8, then
    /// multiples of 8 up to this and --max-num-seqs; larger batches run eagerly.
    #[arg(
        long,
        env = "TPSERVE_MAX_CUDAGRAPH_CAPTURE_SIZE",
        default_value_t = 512
    )]
    pub max_cudagraph_capture_size: usize,
    /// Order of the waiting queue.
    #[arg(
        long,
        env = "TPSERVE_SCHEDULING_POLICY",
        value_enum,
        default_value = "fcfs"
    )]
    pub scheduling_policy: Policy,
    /// Send the next plan while the workers run the current one (vLLM's async scheduling) on
    /// any device. By default that is so where the workers run on GPUs, and off on the CPU:
    /// there the coordinator's work between steps would take the cores the worker computes on,
    /// and a new request would wait a step longer to join (see `docs/PERFORMANCE.md`).
    #[arg(
        long,
        env = "TPSERVE_ASYNC_SCHEDULING",
        conflicts_with = "no_async_scheduling"
    )]
    pub async_scheduling: bool,
    /// Schedule one step at a time on any device: the next plan is made only after the current
    /// one's tokens are back.
    #[arg(long, env = "TPSERVE_NO_ASYNC_SCHEDULING")]
    pub no_async_scheduling: bool,
    /// Requests allowed to wait; more get 429.
    #[arg(long, env = "TPSERVE_MAX_WAITING_REQUESTS", default_value_t = 4096)]
    pub max_waiting_requests: usize,
    /// Seed of the random weights of `--load-format dummy`.
    #[arg(long, env = "TPSERVE_DUMMY_WEIGHTS_SEED", default_value_t = 0)]
    pub dummy_weights_seed: u64,
    /// The worker binary (default: `tpserve-worker` beside `tpserve`).
    #[arg(long, env = "TPSERVE_WORKER_BINARY")]
    pub worker_binary: Option<PathBuf>,
    /// CPU threads per worker (default: the cores divided among the workers).
    #[arg(long, env = "TPSERVE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// etcd endpoints (comma-separated). When set, no workers are spawned: the group forms from
    /// the workers registered under `--cluster` and `--group`.
    #[arg(long, env = "TPSERVE_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// The worker group's shared token (16-256 visible ASCII characters), sent with every call
    /// to the workers, which refuse calls without it (their `--worker-token`). Give it through
    /// the environment (a Secret), not the command line. Default: a fresh random token for
    /// workers this process spawns; none for etcd-registered workers.
    #[arg(long, env = "TPSERVE_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// PEM client certificate presented to the workers over mutual TLS (with --worker-tls-key
    /// and --worker-tls-ca; the workers take the same three flags). Workers this process spawns
    /// serve with the same files, so the certificate must then be good for both ends and name
    /// 127.0.0.1.
    #[arg(long, env = tpserve_proto::tls::WORKER_TLS_CERT_ENV)]
    pub worker_tls_cert: Option<PathBuf>,
    /// PEM private key of --worker-tls-cert.
    #[arg(long, env = tpserve_proto::tls::WORKER_TLS_KEY_ENV)]
    pub worker_tls_key: Option<PathBuf>,
    /// PEM CA certificate: only workers whose certificate it signed, for the address dialled,
    /// are used.
    #[arg(long, env = tpserve_proto::tls::WORKER_TLS_CA_ENV)]
    pub worker_tls_ca: Option<PathBuf>,
    /// The cluster name workers register under in etcd.
    #[arg(long, env = "TPSERVE_CLUSTER", default_value = "default")]
    pub cluster: String,
    /// The worker group (tensor-parallel group) within the cluster.
    #[arg(long, env = "TPSERVE_GROUP", default_value = "default")]
    pub group: String,
    /// Seconds the engine loop may go without turning before `/live` answers 503: a step the
    /// workers do not answer (a hung collective, a stopped worker) or a wedged engine. Keep it
    /// above the longest step (a full --max-num-batched-tokens prefill on the slowest device).
    #[arg(long, env = "TPSERVE_ENGINE_STALL_TIMEOUT", default_value_t = 300.0)]
    pub engine_stall_timeout: f64,
    /// What to serve the model for: `generate` (completions and chat), `embed` (`/v1/embeddings`;
    /// alias `embedding`), or `auto`: embed when the checkpoint is an embedding model (a
    /// sentence-transformers pooling module, or an architecture without a language-model head
    /// such as `MistralModel`), else generate.
    #[arg(long, env = "TPSERVE_TASK", value_enum, default_value = "auto")]
    pub task: TaskArg,
    /// vLLM's pooler override for embedding models, as JSON: `pooling_type` (`LAST`, `MEAN` or
    /// `CLS`) and `normalize` (L2-normalize each vector), e.g.
    /// `'{"pooling_type": "MEAN", "normalize": true}'`.
    #[arg(long, env = "TPSERVE_OVERRIDE_POOLER_CONFIG")]
    pub override_pooler_config: Option<String>,
    /// vLLM's config overrides, as JSON; tpserve takes `is_matryoshka` and
    /// `matryoshka_dimensions` only (which `dimensions` an embedding request may ask for).
    #[arg(long, env = "TPSERVE_HF_OVERRIDES")]
    pub hf_overrides: Option<String>,
    #[command(flatten)]
    pub lora: LoraArgs,
    /// A chat template to use instead of the model's (vLLM's `--chat-template`): a file, or the
    /// template text itself. It gets the BOS and EOS strings of the model's own template, if any.
    #[arg(long, env = "TPSERVE_CHAT_TEMPLATE")]
    pub chat_template: Option<String>,
    #[command(flatten)]
    pub tools: ToolArgs,
}

impl EngineArgs {
    /// Checks the flags against each other.
    pub fn validate(&self) -> Result<(), StartError> {
        let bad = |detail: String| Err(StartError::Config { detail });
        if self.tensor_parallel_size == 0 {
            return bad("--tensor-parallel-size must be at least 1".into());
        }
        if self.block_size == 0 || !self.block_size.is_power_of_two() {
            return bad(format!(
                "--block-size must be a power of two, not {}",
                self.block_size
            ));
        }
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            return bad("--max-num-seqs and --max-num-batched-tokens must be positive".into());
        }
        if let Some(space) = self.kv_cache_space.filter(|s| s.is_nan() || *s <= 0.0) {
            return bad(format!("--kv-cache-space must be positive, not {space}"));
        }
        if !matches!(self.device.as_str(), "auto" | "cpu" | "cuda") {
            return bad(format!(
                "unknown --device {:?} (auto, cpu, cuda)",
                self.device
            ));
        }
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0)
            || self.gpu_memory_utilization.is_nan()
        {
            return bad("--gpu-memory-utilization must be in (0, 1]".into());
        }
        if !matches!(
            self.dtype.as_str(),
            "auto" | "float32" | "float" | "bfloat16" | "float16" | "half"
        ) {
            return bad(format!(
                "unknown --dtype {:?} (auto, float32, bfloat16, float16)",
                self.dtype
            ));
        }
        crate::quantization::validate_flag(
            self.quantization.as_deref(),
            &self.dtype,
            &self.device,
        )?;
        self.validate_kv_cache_dtype()?;
        if !(self.engine_stall_timeout.is_finite() && self.engine_stall_timeout > 0.0) {
            return bad(format!(
                "--engine-stall-timeout must be a positive number of seconds, not {}",
                self.engine_stall_timeout
            ));
        }
        if self.max_waiting_requests == 0 {
            return bad("--max-waiting-requests must be at least 1".into());
        }
        self.lora.validate()
    }

    /// Checks `--kv-cache-dtype` on its own and against `--device` (the GPU's FP8 support is the
    /// workers' to check).
    fn validate_kv_cache_dtype(&self) -> Result<(), StartError> {
        let bad = |detail: String| Err(StartError::Config { detail });
        match self.kv_cache_dtype.as_str() {
            "auto" => Ok(()),
            "fp8" | "fp8_e4m3" if self.device == "cpu" => bad(format!(
                "--kv-cache-dtype {} runs on CUDA GPUs of compute capability 8.9 or newer, not on \
                 --device cpu (the CPU backend keeps the KV cache in float32: leave \
                 --kv-cache-dtype auto)",
                self.kv_cache_dtype
            )),
            "fp8" | "fp8_e4m3" => Ok(()),
            d @ ("fp8_e5m2" | "fp8_inc" | "fp8_ds_mla" | "bfloat16" | "float16" | "half") => {
                bad(format!(
                    "--kv-cache-dtype {d} is not supported by tpserve (supported: auto, the \
                     compute dtype; fp8 or fp8_e4m3)"
                ))
            }
            d => bad(format!(
                "unknown --kv-cache-dtype {d:?} (supported: auto, fp8, fp8_e4m3)"
            )),
        }
    }

    /// Decode batch sizes to capture as CUDA graphs: vLLM's 1, 2, 4, 8, then multiples of 8,
    /// up to `--max-cudagraph-capture-size` and `--max-num-seqs` (which is itself captured when
    /// it is not a multiple of 8); none with `--enforce-eager`.
    pub fn cuda_graph_sizes(&self) -> Vec<u32> {
        if self.enforce_eager {
            return Vec::new();
        }
        let cap = self.max_cudagraph_capture_size.min(self.max_num_seqs);
        let mut sizes: Vec<usize> = [1, 2, 4]
            .into_iter()
            .chain((8..=cap).step_by(8))
            .filter(|&s| s <= cap)
            .collect();
        if cap > 0 && sizes.last() != Some(&cap) {
            sizes.push(cap);
        }
        sizes.into_iter().map(|s| s as u32).collect()
    }

    /// Whether prefix caching is on after both flags.
    pub fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    /// Whether the engine sends the next plan while the workers run the current one, for
    /// workers of `device_kind` (`cpu` or `cuda`, as they report it): the flags, else on for a
    /// GPU and off for the CPU.
    pub fn async_scheduling_on(&self, device_kind: &str) -> bool {
        if self.async_scheduling || self.no_async_scheduling {
            return self.async_scheduling;
        }
        device_kind != "cpu"
    }

    /// Threads each worker gets.
    pub fn threads_per_worker(&self) -> usize {
        self.worker_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.tensor_parallel_size).max(1)
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn args(extra: &[&str]) -> EngineArgs {
        let mut argv = vec!["tpserve", "--model", "m"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).engine
    }

    #[test]
    fn kv_cache_dtype_takes_vllms_fp8_names_and_refuses_the_rest_by_name() {
        for ok in ["auto", "fp8", "fp8_e4m3"] {
            assert!(args(&["--kv-cache-dtype", ok]).validate().is_ok(), "{ok}");
        }
        let msg = |a: &[&str]| args(a).validate().unwrap_err().to_string();
        let e = msg(&["--kv-cache-dtype", "fp8_e5m2"]);
        assert!(
            e.contains("--kv-cache-dtype fp8_e5m2 is not supported"),
            "{e}"
        );
        let e = msg(&["--kv-cache-dtype", "int4"]);
        assert!(e.contains("unknown --kv-cache-dtype \"int4\""), "{e}");
        let e = msg(&["--kv-cache-dtype", "fp8", "--device", "cpu"]);
        assert!(e.contains("not on --device cpu"), "{e}");
    }

    #[test]
    fn graph_sizes_follow_vllm_up_to_the_cap_and_max_num_seqs() {
        let sizes = args(&[]).cuda_graph_sizes();
        assert_eq!(&sizes[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(
            sizes.last(),
            Some(&256),
            "capped by the default --max-num-seqs"
        );
        assert!(sizes[3..].iter().all(|s| s % 8 == 0));
        assert_eq!(
            args(&["--max-num-seqs", "20"]).cuda_graph_sizes(),
            vec![1, 2, 4, 8, 16, 20]
        );
        assert_eq!(
            args(&["--max-cudagraph-capture-size", "3"]).cuda_graph_sizes(),
            vec![1, 2, 3]
        );
        assert!(args(&["--enforce-eager"]).cuda_graph_sizes().is_empty());
    }

    #[test]
    fn async_scheduling_is_on_for_gpus_and_off_for_the_cpu_unless_a_flag_says() {
        assert!(args(&[]).async_scheduling_on("cuda"));
        assert!(!args(&[]).async_scheduling_on("cpu"));
        assert!(args(&["--async-scheduling"]).async_scheduling_on("cpu"));
        assert!(!args(&["--no-async-scheduling"]).async_scheduling_on("cuda"));
        let both = [
            "tpserve",
            "--model",
            "m",
            "--async-scheduling",
            "--no-async-scheduling",
        ];
        assert!(Cli::try_parse_from(both).is_err());
    }
}
