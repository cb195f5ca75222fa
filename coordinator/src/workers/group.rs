//! The coordinator's side of a tensor-parallel group: one gRPC client per rank, the start-up
//! sequence (communicator, load, memory profile, cache, warm-up) and the `Step` streams. Every
//! plan goes to every rank; rank 0's reply carries the tokens, the others' only confirm. A plan
//! is sent (`send`) and its result received (`receive`) separately, so the engine can keep a
//! second plan queued on the streams while the first runs; each stream answers in order.

use std::future::Future;
use std::time::Duration;

use futures::future::try_join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;
use tpserve_proto as pb;
use tpserve_proto::tls::WorkerTls;
use tpserve_proto::worker_client::WorkerClient;

use super::token::GroupToken;
use crate::error::{EngineError, StartError};

/// Once a rank has failed a step, how long the others may take to report before the step is
/// declared failed without them.
const FAIL_GRACE: Duration = Duration::from_secs(2);

/// How long a rank may take to answer the probe that starts the start-up sequence.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the group needs to start serving.
#[derive(Debug, Clone)]
pub struct GroupInit {
    /// The model path on the workers' file system.
    pub model_path: String,
    /// How to read it.
    pub load_format: pb::LoadFormat,
    /// Compute dtype.
    pub dtype: String,
    /// How the workers hold quantized weights.
    pub quantization: crate::quantization::Quantization,
    /// What the KV cache stores (`--kv-cache-dtype`).
    pub kv_cache_dtype: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV cache bytes per rank (CPU); 0 lets GPU workers size it from memory utilisation.
    pub kv_cache_bytes: u64,
    /// Fraction of GPU memory to use.
    pub gpu_memory_utilization: f32,
    /// Step limits, for the profile and the warm-up.
    pub max_num_batched_tokens: u32,
    /// Step limits, for the profile and the warm-up.
    pub max_num_seqs: u32,
    /// Seed of dummy weights.
    pub seed: u64,
    /// Decode batch sizes GPU workers capture as CUDA graphs (empty: none).
    pub cuda_graph_sizes: Vec<u32>,
    /// Batch-invariant kernels (`--batch-invariant`).
    pub batch_invariant: bool,
    /// Every all-reduce on NCCL (`--disable-custom-all-reduce`).
    pub disable_custom_all_reduce: bool,
    /// LoRA adapter slots per worker (`--max-loras`); 0: LoRA off.
    pub max_loras: u32,
    /// `--max-lora-rank`.
    pub max_lora_rank: u32,
    /// Adapters each worker keeps in host memory (`--max-cpu-loras`).
    pub max_cpu_loras: u32,
    /// Sent with every RPC; workers started with it refuse calls without it.
    pub token: GroupToken,
    /// Mutual TLS to the workers (`--worker-tls-*`); none: plain text.
    pub tls: Option<WorkerTls>,
}

/// What start-up found.
#[derive(Debug, Clone)]
pub struct GroupReady {
    /// KV blocks every rank holds (the minimum over ranks).
    pub num_blocks: u64,
    /// Weight bytes per rank.
    pub weight_bytes: Vec<u64>,
    /// Device of rank 0, for people: kind and name.
    pub device: String,
    /// Device kind of rank 0, as it reports it: `cpu` or `cuda`.
    pub device_kind: String,
    /// The quantization rank 0 runs: `gguf (Q4_1, Q8_0)` with the block types, or `none`.
    pub quantization: String,
    /// What rank 0's KV cache stores: the compute dtype's name or `fp8_e4m3`.
    pub kv_cache_dtype: String,
    /// CUDA graphs rank 0 captured, and the seconds capture (with kernel tuning) took.
    pub cuda_graphs: u32,
    pub graph_capture_seconds: f64,
}

/// One rank's client: cheap to clone (the clones share its channel).
type Client = WorkerClient<InterceptedService<Channel, GroupToken>>;

/// Calls every rank at once, `call(rank, client)` each with its own handle to that rank's
/// client, and returns the answers in rank order, or the first failure with its rank.
async fn on_every_rank<R, Fut>(
    clients: &[Client],
    call: impl Fn(usize, Client) -> Fut,
) -> Result<Vec<R>, (usize, tonic::Status)>
where
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    try_join_all(clients.iter().enumerate().map(|(rank, c)| {
        let answer = call(rank, c.clone());
        async move {
            answer
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| (rank, s))
        }
    }))
    .await
}

/// Reads LoRA adapters into every rank's host cache, beside the steps (`PreloadLora`); cheap to
/// clone, so a preload can run in its own task.
#[derive(Clone)]
pub struct LoraPreloader {
    clients: Vec<Client>,
}

impl LoraPreloader {
    /// A preloader of a group without ranks (its preloads succeed at once), for tests.
    #[cfg(test)]
    pub(crate) fn without_ranks() -> Self {
        Self {
            clients: Vec::new(),
        }
    }

    /// Reads `adapter` on every rank at once; the slowest rank's seconds once all have it.
    pub async fn preload(&self, adapter: pb::LoraAdapter) -> Result<f64, EngineError> {
        let answers = on_every_rank(&self.clients, |_, mut c| {
            let adapter = adapter.clone();
            async move { c.preload_lora(adapter).await }
        })
        .await
        .map_err(|(rank, s)| rank_failed(rank, s.message().to_string()))?;
        Ok(answers.iter().map(|a| a.seconds).fold(0.0, f64::max))
    }
}

/// A connected group.
pub struct WorkerGroup {
    clients: Vec<Client>,
    streams: Vec<(mpsc::Sender<pb::StepPlan>, Streaming<pb::StepResult>)>,
}

/// A step failed on `rank`.
fn rank_failed(rank: usize, detail: String) -> EngineError {
    EngineError::WorkerFailed {
        detail: format!("rank {rank}: {detail}"),
    }
}

fn phase_err(rank: usize, phase: &'static str) -> impl Fn(tonic::Status) -> StartError {
    move |s| StartError::Worker {
        rank,
        phase,
        detail: s.message().to_string(),
    }
}

/// Refuses a rank built from another `worker.proto` than this coordinator (another release, or
/// a build of changed sources): the two would misread each other's messages.
fn check_protocol(rank: usize, info: &pb::InfoResponse) -> Result<(), StartError> {
    if info.protocol == pb::PROTOCOL {
        return Ok(());
    }
    let theirs = if info.protocol.is_empty() {
        "an older protocol (it reports none)".to_string()
    } else {
        format!("protocol {}", info.protocol)
    };
    Err(StartError::Worker {
        rank,
        phase: "Info",
        detail: format!(
            "tpserve-worker {} speaks {theirs}, this tpserve {} speaks protocol {}: run tpserve \
             and tpserve-worker from the same build on every node",
            info.version,
            env!("CARGO_PKG_VERSION"),
            pb::PROTOCOL
        ),
    })
}

/// [`phase_err`] for the failures [`on_every_rank`] returns.
fn phase_failed(phase: &'static str) -> impl Fn((usize, tonic::Status)) -> StartError {
    move |(rank, s)| phase_err(rank, phase)(s)
}

impl WorkerGroup {
    /// Connects to every rank (retrying for a while: workers may still be starting), with
    /// `init`'s token and, when it has them, its TLS files.
    pub async fn connect(addrs: &[String], init: &GroupInit) -> Result<Self, StartError> {
        let mut clients = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let scheme = if init.tls.is_some() { "https" } else { "http" };
            let url = if addr.contains("://") {
                addr.clone()
            } else {
                format!("{scheme}://{addr}")
            };
            let connect_err = |detail: String| StartError::Connect {
                addr: addr.clone(),
                detail,
            };
            let mut endpoint = Endpoint::from_shared(url)
                .map_err(|e| connect_err(e.to_string()))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            if let Some(tls) = &init.tls {
                endpoint = endpoint
                    .tls_config(tls.client())
                    .map_err(|e| connect_err(format!("--worker-tls-*: {e:?}")))?;
            }
            let mut last = String::new();
            let mut channel = None;
            for _ in 0..100 {
                match endpoint.connect().await {
                    Ok(c) => {
                        channel = Some(c);
                        break;
                    }
                    Err(e) => {
                        last = e.to_string();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            let channel = channel.ok_or_else(|| connect_err(last))?;
            clients.push(
                WorkerClient::with_interceptor(channel, init.token.clone())
                    .max_decoding_message_size(256 << 20)
                    .max_encoding_message_size(256 << 20),
            );
        }
        Ok(Self {
            clients,
            streams: Vec::new(),
        })
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.clients.len()
    }

    /// Runs the start-up sequence on every rank and opens the step streams.
    pub async fn initialize(&mut self, init: &GroupInit) -> Result<GroupReady, StartError> {
        let world = self.clients.len() as u32;
        // Every rank must answer before any of them is asked to join: a rank 0 waiting for a
        // peer that is gone would block its runner until the join times out.
        on_every_rank(&self.clients, |_, mut c| async move {
            match tokio::time::timeout(PROBE_TIMEOUT, c.health(pb::HealthRequest {})).await {
                Ok(answer) => answer,
                Err(_) => Err(tonic::Status::deadline_exceeded("no answer")),
            }
        })
        .await
        .map_err(phase_failed("Health"))?;
        let infos = on_every_rank(&self.clients, |_, mut c| async move {
            c.info(pb::InfoRequest {}).await
        })
        .await
        .map_err(phase_failed("Info"))?;
        for (rank, info) in infos.iter().enumerate() {
            check_protocol(rank, info)?;
        }
        let info = &infos[0];
        let id = self.clients[0]
            .communicator_id(pb::CommunicatorIdRequest { world_size: world })
            .await
            .map_err(phase_err(0, "CommunicatorId"))?
            .into_inner()
            .id;
        on_every_rank(&self.clients, |rank, mut c| {
            let req = pb::InitCommunicatorRequest {
                id: id.clone(),
                rank: rank as u32,
                world_size: world,
            };
            async move { c.init_communicator(req).await }
        })
        .await
        .map_err(phase_failed("InitCommunicator"))?;
        let loaded = on_every_rank(&self.clients, |_, mut c| {
            let req = pb::LoadModelRequest {
                model_path: init.model_path.clone(),
                load_format: init.load_format as i32,
                dtype: init.dtype.clone(),
                dummy_seed: init.seed,
                batch_invariant: init.batch_invariant,
                max_loras: init.max_loras,
                max_lora_rank: init.max_lora_rank,
                max_cpu_loras: init.max_cpu_loras,
                quantization: init.quantization.as_str().into(),
                kv_cache_dtype: init.kv_cache_dtype.clone(),
            };
            async move { c.load_model(req).await }
        })
        .await
        .map_err(phase_failed("LoadModel"))?;
        let profiles = on_every_rank(&self.clients, |_, mut c| {
            let req = pb::ProfileMemoryRequest {
                block_size: init.block_size,
                kv_cache_bytes: init.kv_cache_bytes,
                gpu_memory_utilization: init.gpu_memory_utilization,
                max_num_batched_tokens: init.max_num_batched_tokens,
                max_num_seqs: init.max_num_seqs,
            };
            async move { c.profile_memory(req).await }
        })
        .await
        .map_err(phase_failed("ProfileMemory"))?;
        let num_blocks = profiles.iter().map(|p| p.num_blocks).min().unwrap_or(0);
        if num_blocks == 0 {
            return Err(StartError::Config {
                detail: "no KV cache block fits in the memory given; raise --kv-cache-space".into(),
            });
        }
        on_every_rank(&self.clients, |_, mut c| {
            let req = pb::InitCacheRequest {
                num_blocks,
                block_size: init.block_size,
            };
            async move { c.init_cache(req).await }
        })
        .await
        .map_err(phase_failed("InitCache"))?;
        let warmups = on_every_rank(&self.clients, |_, mut c| {
            let req = pb::WarmupRequest {
                max_num_batched_tokens: init.max_num_batched_tokens,
                max_num_seqs: init.max_num_seqs,
                cuda_graph_sizes: init.cuda_graph_sizes.clone(),
                disable_custom_all_reduce: init.disable_custom_all_reduce,
            };
            async move { c.warmup(req).await }
        })
        .await
        .map_err(phase_failed("Warmup"))?;
        self.streams.clear();
        for (rank, c) in self.clients.iter_mut().enumerate() {
            let (tx, rx) = mpsc::channel(4);
            let results = c
                .step(ReceiverStream::new(rx))
                .await
                .map_err(phase_err(rank, "Step"))?
                .into_inner();
            self.streams.push((tx, results));
        }
        Ok(GroupReady {
            num_blocks,
            weight_bytes: loaded.iter().map(|l| l.weight_bytes).collect(),
            device: format!("{} ({})", info.device_kind, info.device_name),
            device_kind: info.device_kind.clone(),
            quantization: loaded.first().map_or_else(String::new, |l| {
                if l.weight_types.is_empty() {
                    l.quantization.clone()
                } else {
                    format!("{} ({})", l.quantization, l.weight_types)
                }
            }),
            kv_cache_dtype: loaded
                .first()
                .map_or_else(String::new, |l| l.kv_cache_dtype.clone()),
            cuda_graphs: warmups.first().map_or(0, |w| w.cuda_graphs),
            graph_capture_seconds: warmups.first().map_or(0.0, |w| w.graph_capture_seconds),
        })
    }

    /// A handle that preloads LoRA adapters on this group's ranks.
    pub fn lora_preloader(&self) -> LoraPreloader {
        LoraPreloader {
            clients: self.clients.clone(),
        }
    }

    /// Sends `plan` to every rank without waiting for its result, so the next plan can follow
    /// while the workers run this one. Each rank runs its plans in order and answers them in
    /// order: one `receive` per `send` collects the results, oldest first.
    pub async fn send(&mut self, plan: pb::StepPlan) -> Result<(), EngineError> {
        self.check_initialised()?;
        for (rank, (tx, _)) in self.streams.iter().enumerate() {
            tx.send(plan.clone())
                .await
                .map_err(|_| rank_failed(rank, "step stream closed".into()))?;
        }
        Ok(())
    }

    /// Waits for the result of step `step_id`, the oldest plan sent and not yet received, and
    /// returns rank 0's result once every rank has answered it, with the adapters any rank
    /// dropped from its host cache.
    pub async fn receive(&mut self, step_id: u64) -> Result<pb::StepResult, EngineError> {
        self.check_initialised()?;
        // Replies are awaited together: once one rank has failed, the others get
        // `FAIL_GRACE` to report, so a rank stuck on a dead peer cannot hold the engine.
        let mut replies: FuturesUnordered<_> = self
            .streams
            .iter_mut()
            .enumerate()
            .map(|(rank, (_, rx))| async move { (rank, rx.message().await) })
            .collect();
        let mut result = pb::StepResult::default();
        let mut dropped: Vec<u32> = Vec::new();
        let mut first_error = None;
        let mut deadline = None;
        loop {
            let next = match deadline {
                None => replies.next().await,
                Some(d) => match tokio::time::timeout_at(d, replies.next()).await {
                    Ok(n) => n,
                    Err(_) => break,
                },
            };
            let Some((rank, reply)) = next else {
                break;
            };
            let error = match reply {
                Ok(Some(r)) if r.step_id != step_id => {
                    Some(format!("answered step {} to step {step_id}", r.step_id))
                }
                Ok(Some(r)) if !r.error.is_empty() => Some(r.error),
                Ok(Some(mut r)) => {
                    dropped.append(&mut r.lora_host_dropped);
                    if rank == 0 {
                        result = r;
                    }
                    None
                }
                Ok(None) => Some("the worker closed its step stream".into()),
                Err(s) => Some(s.message().to_string()),
            };
            if let Some(e) = error {
                first_error.get_or_insert(rank_failed(rank, e));
                deadline.get_or_insert(tokio::time::Instant::now() + FAIL_GRACE);
            }
        }
        dropped.sort_unstable();
        dropped.dedup();
        result.lora_host_dropped = dropped;
        match first_error {
            Some(e) => Err(e),
            None => Ok(result),
        }
    }

    fn check_initialised(&self) -> Result<(), EngineError> {
        if self.streams.is_empty() {
            return Err(EngineError::Unavailable {
                detail: "the worker group is not initialised".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_built_from_another_protocol_is_refused_with_both_digests() {
        let mut info = pb::InfoResponse {
            version: "0.1.0".into(),
            protocol: pb::PROTOCOL.into(),
            ..Default::default()
        };
        assert!(check_protocol(1, &info).is_ok());
        info.protocol = "0123456789abcdef".into();
        let refused = check_protocol(2, &info).unwrap_err().to_string();
        for part in [
            "worker 2 failed during Info",
            "tpserve-worker 0.1.0 speaks protocol 0123456789abcdef",
            pb::PROTOCOL,
            "same build",
        ] {
            assert!(refused.contains(part), "{part:?} not in {refused:?}");
        }
        info.protocol.clear();
        let refused = check_protocol(0, &info).unwrap_err().to_string();
        assert!(refused.contains("reports none"), "{refused}");
    }
}
