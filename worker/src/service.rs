//! The gRPC face of a worker: each RPC becomes a job for the runner thread, which owns all
//! mutable state. `Step` is a bidirectional stream: plans are executed strictly in order and
//! each produces one result. Errors become `tonic::Status` here and nowhere else.
//!
//! A step is submitted to the runner and answered when its tokens are back. While one is in
//! flight the runner thread polls for the next job and for those tokens: a plan the coordinator
//! sent ahead is launched before the step in flight is answered (the device feeds it the
//! tokens), so the GPU does not wait for the host between two decode steps; tokens that come
//! back first are answered at once. Any other job waits for the step in flight to be answered.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use tpserve_proto as pb;
use tpserve_proto::worker_server::Worker;
use tpserve_term::human;

use crate::backend::{create_backend, DeviceChoice, DeviceInfo};
use crate::error::WorkerError;
use crate::lora::HostCache;
use crate::runner::{Runner, StepOutcome, StepReply};

/// Work for the runner thread.
enum Job {
    /// Runs once any step in flight is answered.
    Run(Box<dyn FnOnce(&mut Runner) + Send>),
    /// A step plan, answered through its reply.
    Step(Box<pb::StepPlan>, StepReply),
}

/// The service; cheap to clone, all clones share one runner thread.
#[derive(Clone)]
pub struct WorkerService {
    jobs: mpsc::UnboundedSender<Job>,
    ready: Arc<AtomicBool>,
    device: DeviceInfo,
    /// The runner's LoRA host cache, which `PreloadLora` fills off the runner thread.
    lora_host: Arc<Mutex<HostCache>>,
}

fn status(e: WorkerError) -> Status {
    match e {
        WorkerError::Lifecycle { .. } => Status::failed_precondition(e.to_string()),
        WorkerError::Sharding { .. }
        | WorkerError::Unsupported { .. }
        | WorkerError::Plan { .. } => Status::invalid_argument(e.to_string()),
        WorkerError::Load(_) => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

impl WorkerService {
    /// Starts the runner thread and, on it, the backend `device` names (a CUDA context is bound
    /// to the thread that creates it). Fails when the device cannot be used, with what is
    /// missing. `rank_hint` picks the GPU when `device` does not name one.
    ///
    /// The runner thread is itself the first thread of the global rayon pool of `threads`
    /// threads (0: all cores), so parallel work runs on it directly rather than being handed to
    /// another thread and waited for; with one thread, everything runs inline. That handoff
    /// matters at tensor-parallel sizes beyond the core count, where every extra wake-up costs a
    /// scheduler time slice at each all-reduce.
    pub fn start(
        host: String,
        threads: usize,
        device: DeviceChoice,
        rank_hint: usize,
    ) -> Result<Self, String> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let (built_tx, built_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tpserve-runner".into())
            .spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .use_current_thread()
                    .build_global()
                    .map_err(|e| format!("configuring the CPU thread pool: {e}"));
                let backend = pool.and_then(|()| {
                    create_backend(device, host, threads, rank_hint).map_err(|e| e.to_string())
                });
                let backend = match backend {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return;
                    }
                };
                let info = backend.info();
                let mut runner = Runner::new(backend);
                let _ = built_tx.send(Ok((info, runner.lora_host_cache())));
                while let Some(job) = next_job(&mut rx, &mut runner) {
                    match job {
                        Job::Run(f) => {
                            runner.finish_in_flight();
                            f(&mut runner);
                        }
                        Job::Step(plan, reply) => runner.submit(&plan, reply),
                    }
                }
                runner.finish_in_flight();
            })
            .map_err(|e| format!("spawning the runner thread: {e}"))?;
        let (device, lora_host) = built_rx
            .recv()
            .map_err(|_| "the runner thread died at start".to_string())??;
        Ok(Self {
            jobs,
            ready: Arc::new(AtomicBool::new(false)),
            device,
            lora_host,
        })
    }

    /// The device this worker computes on.
    pub fn device(&self) -> &DeviceInfo {
        &self.device
    }

    /// Queues `f` on the runner thread (jobs run in queue order); the receiver gets its answer.
    fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Runner) -> crate::error::Result<T> + Send + 'static,
    ) -> Result<oneshot::Receiver<crate::error::Result<T>>, Status> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Job::Run(Box::new(move |r: &mut Runner| {
                let _ = tx.send(f(r));
            })))
            .map_err(|_| Status::unavailable("the runner thread has stopped"))?;
        Ok(rx)
    }

    /// Submits a step plan to the runner thread; the receiver gets its outcome, the LoRA
    /// adapters the host cache dropped meanwhile, and the seconds from submission to answer.
    fn submit_step(&self, plan: pb::StepPlan) -> Result<oneshot::Receiver<StepAnswer>, Status> {
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        let reply: StepReply = Box::new(move |r: &mut Runner, outcome| {
            let dropped = r.take_lora_dropped();
            let _ = tx.send(outcome.map(|o| (o, dropped, started.elapsed())));
        });
        self.jobs
            .send(Job::Step(Box::new(plan), reply))
            .map_err(|_| Status::unavailable("the runner thread has stopped"))?;
        Ok(rx)
    }

    /// Runs `f` on the runner thread and waits for its answer.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Runner) -> crate::error::Result<T> + Send + 'static,
    ) -> Result<T, Status> {
        answer(self.submit(f)?).await
    }
}

/// A step's outcome, the LoRA adapters dropped from the host cache, and its time in the worker.
type StepAnswer = crate::error::Result<(StepOutcome, Vec<u32>, std::time::Duration)>;

/// The runner thread's next job; `None` once the service is gone. While a step is in flight it
/// polls: the step's tokens, when back first, are answered at once; a job that comes first is
/// returned (a step plan is then launched behind the one in flight).
fn next_job(rx: &mut mpsc::UnboundedReceiver<Job>, runner: &mut Runner) -> Option<Job> {
    while runner.has_in_flight() {
        if runner.in_flight_ready() {
            runner.finish_in_flight();
            break;
        }
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Empty) => std::thread::yield_now(),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
        }
    }
    rx.blocking_recv()
}

/// The answer of a submitted job.
async fn answer<T>(rx: oneshot::Receiver<crate::error::Result<T>>) -> Result<T, Status> {
    rx.await
        .map_err(|_| Status::internal("the runner thread dropped a job (it panicked)"))?
        .map_err(status)
}

type StepStream = Pin<Box<dyn Stream<Item = Result<pb::StepResult, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(pb::InfoResponse {
            device_kind: self.device.kind.into(),
            device_name: self.device.name.clone(),
            total_memory_bytes: self.device.total_memory_bytes,
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: pb::PROTOCOL.into(),
        }))
    }

    async fn communicator_id(
        &self,
        req: Request<pb::CommunicatorIdRequest>,
    ) -> Result<Response<pb::CommunicatorIdResponse>, Status> {
        let world = req.into_inner().world_size as usize;
        let id = self.run(move |r| r.communicator_id(world)).await?;
        Ok(Response::new(pb::CommunicatorIdResponse { id }))
    }

    async fn init_communicator(
        &self,
        req: Request<pb::InitCommunicatorRequest>,
    ) -> Result<Response<pb::InitCommunicatorResponse>, Status> {
        let req = req.into_inner();
        if req.world_size == 0 || req.rank >= req.world_size {
            return Err(Status::invalid_argument(format!(
                "rank {} outside a group of {}",
                req.rank, req.world_size
            )));
        }
        self.run(move |r| r.init_communicator(&req.id, req.rank as usize, req.world_size as usize))
            .await?;
        Ok(Response::new(pb::InitCommunicatorResponse {}))
    }

    async fn load_model(
        &self,
        req: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        let req = req.into_inner();
        self.ready.store(false, Ordering::SeqCst);
        let resp = self.run(move |r| r.load_model(&req)).await?;
        tracing::info!(
            "weights loaded: {} in {}",
            human::bytes(resp.weight_bytes),
            human::seconds(resp.load_seconds)
        );
        Ok(Response::new(resp))
    }

    async fn profile_memory(
        &self,
        req: Request<pb::ProfileMemoryRequest>,
    ) -> Result<Response<pb::ProfileMemoryResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.run(move |r| r.profile_memory(&req)).await?,
        ))
    }

    async fn init_cache(
        &self,
        req: Request<pb::InitCacheRequest>,
    ) -> Result<Response<pb::InitCacheResponse>, Status> {
        let req = req.into_inner();
        let cache_bytes = self
            .run(move |r| r.init_cache(req.num_blocks as usize, req.block_size as usize))
            .await?;
        Ok(Response::new(pb::InitCacheResponse { cache_bytes }))
    }

    async fn warmup(
        &self,
        req: Request<pb::WarmupRequest>,
    ) -> Result<Response<pb::WarmupResponse>, Status> {
        let req = req.into_inner();
        let sizes: Vec<usize> = req.cuda_graph_sizes.iter().map(|s| *s as usize).collect();
        let report = self
            .run(move |r| {
                r.warmup(
                    req.max_num_batched_tokens as usize,
                    req.max_num_seqs as usize,
                    &sizes,
                    !req.disable_custom_all_reduce,
                )
            })
            .await?;
        self.ready.store(true, Ordering::SeqCst);
        let graphs = if report.decode.graphs > 0 {
            format!(
                "; {} captured in {}",
                human::count(report.decode.graphs as u64, "CUDA graph"),
                human::seconds(report.decode.seconds)
            )
        } else {
            String::new()
        };
        tracing::info!("warm-up done in {}{graphs}", human::seconds(report.seconds));
        Ok(Response::new(pb::WarmupResponse {
            seconds: report.seconds,
            cuda_graphs: report.decode.graphs as u32,
            graph_capture_seconds: report.decode.seconds,
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let ready = self.ready.load(Ordering::SeqCst);
        let detail = if ready {
            String::new()
        } else {
            "not warmed up yet".into()
        };
        Ok(Response::new(pb::HealthResponse { ready, detail }))
    }

    async fn preload_lora(
        &self,
        req: Request<pb::LoraAdapter>,
    ) -> Result<Response<pb::PreloadLoraResponse>, Status> {
        let a = req.into_inner();
        if a.adapter_id == 0 {
            return Err(Status::invalid_argument(format!(
                "adapter {:?} has id 0",
                a.name
            )));
        }
        let cache = self.lora_host.clone();
        let path = std::path::PathBuf::from(&a.path);
        let seconds =
            tokio::task::spawn_blocking(move || crate::lora::preload(&cache, a.adapter_id, &path))
                .await
                .map_err(|e| Status::internal(format!("the LoRA preload panicked: {e}")))?
                .map_err(status)?;
        Ok(Response::new(pb::PreloadLoraResponse { seconds }))
    }

    type StepStream = StepStream;

    async fn step(
        &self,
        req: Request<Streaming<pb::StepPlan>>,
    ) -> Result<Response<Self::StepStream>, Status> {
        let mut plans = req.into_inner();
        let this = self.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::StepResult, Status>>(4);
        // Plans go to the runner thread as they arrive, so a plan the coordinator sends ahead
        // (async scheduling) starts the moment the step before it ends, with no hop through
        // this task; results go back in plan order.
        let (queued_tx, mut queued) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(plan) = plans.next().await {
                let plan = match plan {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("step stream broke: {e}");
                        return;
                    }
                };
                let step_id = plan.step_id;
                let job = this.submit_step(plan);
                if queued_tx.send((step_id, job)).await.is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            while let Some((step_id, job)) = queued.recv().await {
                let outcome = match job {
                    Ok(rx) => answer(rx).await,
                    Err(s) => Err(s),
                };
                let result = match outcome {
                    Ok((outcome, dropped, compute)) => pb::StepResult {
                        step_id,
                        tokens: outcome.tokens,
                        error: String::new(),
                        compute_seconds: compute.as_secs_f64(),
                        prompt_logprobs: outcome.prompt_logprobs,
                        lora_slot_loads: outcome.lora.slot_loads,
                        lora_slot_evictions: outcome.lora.slot_evictions,
                        lora_disk_loads: outcome.lora.disk_loads,
                        lora_host_dropped: dropped,
                        lora_slot_load_seconds: outcome.lora.slot_load_seconds,
                        pooled: outcome.pooled,
                    },
                    Err(s) => pb::StepResult {
                        step_id,
                        tokens: Vec::new(),
                        error: s.message().to_string(),
                        compute_seconds: 0.0,
                        prompt_logprobs: Vec::new(),
                        ..Default::default()
                    },
                };
                if tx.send(Ok(result)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
