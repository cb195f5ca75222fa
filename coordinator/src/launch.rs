//! Brings the engine up from its flags: reads the model's config and tokenizer, starts (or
//! reaches) the workers, runs their start-up sequence, checks that the KV cache can hold a
//! sequence of max-model-len, and starts the engine actor. Shared by `serve`, `generate` and the
//! benchmarks; each ends with [`Launched::stop`], which stops the workers (local ones are reaped).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tpserve_modelfile::{ChatTemplate, Format, ModelSource};
use tpserve_proto as pb;
use tpserve_proto::tls::WorkerTls;
use tpserve_term::human;

use crate::adapters::{AdapterRegistry, LoraError};
use crate::config::{EngineArgs, LoadFormat};
use crate::engine::{start_engine, EngineConfig, EngineHandle, EngineStatus, GroupLink};
use crate::error::StartError;
use crate::metrics::{CacheConfigInfo, Metrics};
use crate::quantization::Checkpoint;
use crate::scheduler::SchedulerConfig;
use crate::served_model::ServedModel;
use crate::structured::GrammarCompiler;
use crate::workers::{
    worker_binary, EtcdWorkers, GroupInit, GroupReady, GroupToken, LocalWorkers, Supervisor,
    WorkerGroup, WorkerSource,
};

/// A running engine and what keeps it alive.
pub struct Launched {
    /// Submit requests here.
    pub engine: EngineHandle,
    /// The model as the API presents it.
    pub model: ServedModel,
    /// Health and load, updated after every step.
    pub status: watch::Receiver<EngineStatus>,
    /// What start-up found (blocks, weight bytes, device).
    pub ready: GroupReady,
    /// The Prometheus metrics the engine updates.
    pub metrics: Arc<Metrics>,
    /// Keeps the worker group formed; dropping it stops the workers without waiting.
    pub supervisor: Supervisor,
}

/// How long the engine may take to finish its last step once its last handle is dropped.
const ENGINE_STOP: Duration = Duration::from_secs(5);

impl Launched {
    /// Stops the engine, then the workers, and waits until they are gone (local ones exit and
    /// are reaped). Every other handle to the engine must be dropped first: the engine ends once
    /// none is left and the steps it has in flight are back, so stopping the workers cuts no
    /// step off (which would be logged as a failure).
    pub async fn stop(self) {
        let Launched {
            engine,
            mut status,
            supervisor,
            ..
        } = self;
        drop(engine);
        let ended = async { while status.changed().await.is_ok() {} };
        if tokio::time::timeout(ENGINE_STOP, ended).await.is_err() {
            tracing::warn!(
                "the engine did not stop within {}; stopping the workers anyway",
                human::duration(ENGINE_STOP)
            );
        }
        supervisor.stop().await;
    }
}

/// Starts everything; the first failure is returned with what failed.
pub async fn launch(
    args: &EngineArgs,
    served_model_names: &[String],
) -> Result<Launched, StartError> {
    args.validate()?;
    let started = Instant::now();
    let format = match args.load_format {
        LoadFormat::Safetensors | LoadFormat::Dummy => Some(Format::Safetensors),
        LoadFormat::Gguf => Some(Format::Gguf),
        LoadFormat::Auto => None,
    };
    let source = ModelSource::open(&args.model, format)?;
    let config = source.config().clone();
    let checkpoint = match args.load_format {
        // Random weights are plain floats whatever the checkpoint's config says.
        LoadFormat::Dummy => Checkpoint::Plain,
        _ => Checkpoint::of(&source),
    };
    let quantization = crate::quantization::resolve(args.quantization.as_deref(), checkpoint)?;
    match checkpoint {
        Checkpoint::Fp8(Ok(scheme)) => {
            tracing::info!(scheme = %scheme.describe(), "FP8 checkpoint")
        }
        Checkpoint::PackedInt(Ok(scheme)) => {
            tracing::info!(scheme = %scheme.describe(), "AWQ/GPTQ checkpoint");
            // Maps the files (no tensor is read): a config that says AWQ/GPTQ over weights that
            // are not packed is refused here rather than by every worker.
            source.weights()?;
        }
        _ => {}
    }
    let task = crate::task::resolve(
        args.task,
        args.override_pooler_config.as_deref(),
        args.hf_overrides.as_deref(),
        &args.model,
        config.is_headless(),
    )?;
    let tokenizer = Arc::new(source.tokenizer()?);
    let chat_template = match &args.chat_template {
        Some(flag) => Some(chat_template_from_flag(flag, source.chat_template()?)?),
        None => source.chat_template()?,
    };
    let tools = args.tools.resolve(chat_template.as_ref())?;
    let chat_template = chat_template.map(Arc::new);
    let model_len = config.max_position_embeddings;
    let max_model_len = match args.max_model_len {
        Some(n) if n > model_len => {
            return Err(StartError::Config {
                detail: format!(
                    "--max-model-len {n} is longer than the model's context of {model_len} tokens"
                ),
            })
        }
        Some(0) => {
            return Err(StartError::Config {
                detail: "--max-model-len must be positive".into(),
            })
        }
        Some(n) => n,
        None => model_len,
    };
    let (name, aliases) = match served_model_names.split_first() {
        Some((first, rest)) => (first.clone(), rest.to_vec()),
        None => (args.model.display().to_string(), Vec::new()),
    };
    let lora = &args.lora;
    // Adapters are read and checked before any worker starts: a bad one stops start-up at once.
    let adapters = if lora.enable_lora {
        let registry = AdapterRegistry::new(
            config.clone(),
            std::iter::once(name.clone())
                .chain(aliases.iter().cloned())
                .collect(),
            lora.max_lora_rank,
            lora.enable_runtime_lora_updates,
        );
        for m in lora.modules()? {
            registry
                .load(&m.name, &m.path)
                .map_err(|e: LoraError| StartError::Config {
                    detail: format!("--lora-modules {}: {e}", m.name),
                })?;
        }
        Some(Arc::new(registry))
    } else {
        None
    };
    let binary = worker_binary(args.worker_binary.as_deref());
    let init = GroupInit {
        model_path: args.model.display().to_string(),
        load_format: match args.load_format {
            LoadFormat::Auto => pb::LoadFormat::Auto,
            LoadFormat::Safetensors => pb::LoadFormat::Safetensors,
            LoadFormat::Gguf => pb::LoadFormat::Gguf,
            LoadFormat::Dummy => pb::LoadFormat::Dummy,
        },
        dtype: args.dtype.clone(),
        quantization,
        kv_cache_dtype: args.kv_cache_dtype.clone(),
        block_size: args.block_size as u32,
        // 0 lets each worker decide (2 GiB on the CPU, the memory profile on a GPU).
        kv_cache_bytes: args
            .kv_cache_space
            .map_or(0, |gib| (gib * (1u64 << 30) as f64) as u64),
        gpu_memory_utilization: args.gpu_memory_utilization,
        max_num_batched_tokens: args.max_num_batched_tokens as u32,
        max_num_seqs: args.max_num_seqs as u32,
        seed: args.dummy_weights_seed,
        cuda_graph_sizes: args.cuda_graph_sizes(),
        batch_invariant: args.batch_invariant,
        disable_custom_all_reduce: args.disable_custom_all_reduce,
        max_loras: if lora.enable_lora {
            lora.max_loras as u32
        } else {
            0
        },
        max_lora_rank: lora.max_lora_rank as u32,
        max_cpu_loras: lora.cpu_loras() as u32,
        token: match &args.worker_token {
            Some(text) => GroupToken::new(text).map_err(|e| StartError::Config {
                detail: e.to_string(),
            })?,
            // Workers it spawns itself get a fresh token each start.
            None if args.etcd_endpoints.is_empty() => GroupToken::random(),
            None => {
                tracing::warn!(
                    "no --worker-token: the cluster's workers accept any caller that reaches them"
                );
                GroupToken::default()
            }
        },
        tls: WorkerTls::from_flags(
            args.worker_tls_cert.as_deref(),
            args.worker_tls_key.as_deref(),
            args.worker_tls_ca.as_deref(),
        )
        .map_err(|e| StartError::Config {
            detail: e.to_string(),
        })?,
    };
    let (tx, events) = tokio::sync::mpsc::unbounded_channel();
    let (broken, broken_rx) = watch::channel(0u64);
    let (group, ready, supervisor) = if args.etcd_endpoints.is_empty() {
        let source = LocalWorkers::new(
            binary,
            args.tensor_parallel_size,
            args.threads_per_worker(),
            args.device.clone(),
            init,
        );
        start_supervised(source, tx, broken_rx).await?
    } else {
        let source = EtcdWorkers::new(
            &args.etcd_endpoints,
            &args.cluster,
            &args.group,
            args.tensor_parallel_size,
            init,
        )?;
        start_supervised(source, tx, broken_rx).await?
    };
    let capacity = ready.num_blocks as usize * args.block_size;
    if capacity < max_model_len {
        supervisor.stop().await;
        return Err(StartError::Config {
            detail: format!(
                "the KV cache holds {capacity} tokens ({} blocks of {}), fewer than --max-model-len {max_model_len}; \
                 raise --kv-cache-space or lower --max-model-len",
                ready.num_blocks, args.block_size
            ),
        });
    }
    let engine_config = EngineConfig {
        scheduler: SchedulerConfig {
            block_size: args.block_size,
            num_blocks: ready.num_blocks as usize,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_model_len,
            enable_prefix_caching: args.prefix_caching(),
            policy: args.scheduling_policy.into(),
            max_loras: if lora.enable_lora { lora.max_loras } else { 0 },
        },
        max_waiting_requests: args.max_waiting_requests,
        eos_token_ids: config.eos_token_ids.clone(),
        async_scheduling: args.async_scheduling_on(&ready.device_kind),
        stall_timeout: std::time::Duration::from_secs_f64(args.engine_stall_timeout),
        embed: task.pooler().is_some(),
        max_cpu_loras: lora.cpu_loras(),
    };
    if let Err(e) = engine_config.scheduler.validate() {
        supervisor.stop().await;
        return Err(StartError::Config {
            detail: e.to_string(),
        });
    }
    let metrics = Arc::new(Metrics::new(&name));
    metrics.set_cache_config(CacheConfigInfo {
        block_size: args.block_size,
        cache_dtype: ready.kv_cache_dtype.clone(),
        num_gpu_blocks: ready.num_blocks,
        gpu_memory_utilization: args.gpu_memory_utilization,
        enable_prefix_caching: args.prefix_caching(),
    });
    if let Some(registry) = &adapters {
        metrics.lora.enable(lora.max_loras, registry.clone());
    }
    let link = GroupLink {
        group,
        events,
        broken,
    };
    let scheduling = if engine_config.async_scheduling {
        "async scheduling"
    } else {
        "one step at a time"
    };
    let (engine, status) = start_engine(engine_config, link, tokenizer.clone(), metrics.clone());
    let graphs = if ready.cuda_graphs > 0 {
        format!(
            ", {} captured in {}",
            human::count(ready.cuda_graphs, "CUDA graph"),
            human::seconds(ready.graph_capture_seconds)
        )
    } else {
        String::new()
    };
    if let (Checkpoint::Fp8(Ok(scheme)), "none") = (checkpoint, ready.quantization.as_str()) {
        tracing::warn!(
            "the FP8 checkpoint runs dequantized to {} on {} ({}): FP8 weights are multiplied as \
             stored on CUDA GPUs of compute capability 8.9 or newer, with per-tensor or \
             per-channel scales",
            args.dtype,
            ready.device,
            scheme.describe()
        );
    }
    if let (Checkpoint::PackedInt(Ok(scheme)), "none") = (checkpoint, ready.quantization.as_str()) {
        tracing::warn!(
            "the {} checkpoint runs dequantized to {} on {} ({}): its weights take the dtype's \
             memory, not their packed size",
            scheme.method.as_str(),
            args.dtype,
            ready.device,
            scheme.describe()
        );
    }
    let task_line = match task.pooler() {
        Some(p) => format!(
            "task embed ({:?} pooling{})",
            p.pooling_type,
            if p.normalize { ", normalized" } else { "" }
        ),
        None => "task generate".into(),
    };
    tracing::info!(
        "engine ready in {}: {task_line}, {}, tensor-parallel size {}, quantization {}, {} of {} tokens ({}), max-model-len {max_model_len}, {scheduling}{graphs}",
        human::duration(started.elapsed()),
        ready.device,
        args.tensor_parallel_size,
        ready.quantization,
        human::count(ready.num_blocks, "KV block"),
        args.block_size,
        ready.kv_cache_dtype,
    );
    let model = ServedModel {
        name,
        aliases,
        max_model_len: max_model_len as u32,
        quantization: ready.quantization.clone(),
        structured: Arc::new(GrammarCompiler::new(
            tokenizer.clone(),
            config.eos_token_ids.clone(),
        )),
        tokenizer,
        chat_template,
        tools,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        adapters,
        task,
        hidden_size: config.hidden_size,
    };
    Ok(Launched {
        engine,
        model,
        status,
        ready,
        metrics,
        supervisor,
    })
}

/// Forms the first group from `source`, then hands the source to a supervisor task that
/// re-forms the group whenever it is lost. A group that fails to form has its workers stopped.
async fn start_supervised<S: WorkerSource>(
    mut source: S,
    events: tokio::sync::mpsc::UnboundedSender<crate::workers::GroupEvent>,
    broken: watch::Receiver<u64>,
) -> Result<(WorkerGroup, GroupReady, Supervisor), StartError> {
    match source.form().await {
        Ok((group, ready)) => Ok((group, ready, Supervisor::start(source, events, broken))),
        Err(e) => {
            source.stop().await;
            Err(e)
        }
    }
}

/// `--chat-template`: a file's text, or the flag's text itself when no such file exists (as
/// vLLM reads it), compiled with the model's BOS/EOS strings.
fn chat_template_from_flag(
    flag: &str,
    model_template: Option<ChatTemplate>,
) -> Result<ChatTemplate, StartError> {
    let path = std::path::Path::new(flag);
    let text = if path.is_file() {
        std::fs::read_to_string(path).map_err(|e| StartError::Config {
            detail: format!("--chat-template {}: {e}", path.display()),
        })?
    } else {
        flag.to_string()
    };
    let compiled = match model_template {
        Some(t) => t.with_template(text),
        None => ChatTemplate::new(text, None, None),
    };
    compiled.map_err(|e| StartError::Config {
        detail: format!("--chat-template: {e}"),
    })
}
