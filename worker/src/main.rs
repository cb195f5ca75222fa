//! `tpserve-worker`: serves one rank of a tensor-parallel group over gRPC.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tpserve_cluster::{EtcdClient, GroupWatcher, Registration};
use tpserve_proto::tls::{WorkerTls, WORKER_TLS_CA_ENV, WORKER_TLS_CERT_ENV, WORKER_TLS_KEY_ENV};
use tpserve_proto::worker_server::WorkerServer;
use tpserve_term::telemetry::{self, TraceConfig, TraceDetail, TraceProtocol};
use tpserve_worker::auth::TokenCheck;
use tpserve_worker::backend::DeviceChoice;
use tpserve_worker::service::WorkerService;

/// One tpserve worker: a shard of the model and its KV cache, driven by a coordinator.
#[derive(Debug, Parser)]
#[command(name = "tpserve-worker", version)]
struct Args {
    /// Address to serve gRPC on; port 0 picks a free port (the bound address is logged).
    #[arg(long, env = "TPSERVE_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Print `TPSERVE_WORKER_LISTENING <addr>` on stdout once listening (for the coordinator
    /// that spawned this worker).
    #[arg(long)]
    print_listening_address: bool,
    /// Compute device: `auto` (a GPU when a CUDA driver and a GPU are present, else the CPU),
    /// `cpu`, `cuda` (the GPU of this worker's rank, modulo the visible GPUs) or `cuda:N`.
    #[arg(long, env = "TPSERVE_DEVICE", default_value = "auto")]
    device: String,
    /// Threads for the CPU backend (0: all cores).
    #[arg(long, env = "TPSERVE_CPU_THREADS", default_value_t = 0)]
    cpu_threads: usize,
    /// etcd endpoints (comma-separated): register this worker's address there under a lease so
    /// a coordinator started with the same `--cluster` finds it.
    #[arg(long, env = "TPSERVE_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// The cluster to register in.
    #[arg(long, env = "TPSERVE_CLUSTER", default_value = "default")]
    cluster: String,
    /// The worker group (tensor-parallel group) within the cluster.
    #[arg(long, env = "TPSERVE_GROUP", default_value = "default")]
    group: String,
    /// This worker's rank in its group (with --etcd-endpoints).
    #[arg(long, env = "TPSERVE_RANK")]
    rank: Option<usize>,
    /// Ranks in the group (with --etcd-endpoints); the rank must be below it.
    #[arg(long, env = "TPSERVE_TENSOR_PARALLEL_SIZE")]
    tensor_parallel_size: Option<usize>,
    /// The address registered in etcd (default: the bound --listen address).
    #[arg(long, env = "TPSERVE_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// Seconds the etcd registration lives without a refresh; a crashed worker disappears after it.
    #[arg(long, env = "TPSERVE_ETCD_LEASE_TTL", default_value_t = 10)]
    etcd_lease_ttl: u64,
    /// Exit when standard input closes (set by a coordinator that spawns its workers, so they
    /// never outlive it).
    #[arg(long)]
    exit_on_stdin_close: bool,
    /// How progress (loading weights, compiling kernels, capturing CUDA graphs) is shown: `auto`
    /// (bars on a terminal, a plain line every few seconds otherwise), `bars`, `lines`, `events`
    /// (lines on stdout for the coordinator that spawned this worker to draw) or `off`.
    #[arg(long, env = "TPSERVE_PROGRESS", default_value = "auto")]
    progress: tpserve_term::progress::Mode,
    /// Log lines as `text` or `json` (one JSON object per line).
    #[arg(long, env = "TPSERVE_LOG_FORMAT", default_value = "text")]
    log_format: tpserve_term::logging::LogFormat,
    /// Export traces over OTLP to this endpoint (set by a coordinator that spawns its workers
    /// to its own `--otlp-traces-endpoint`). Off when absent.
    #[arg(long, env = "TPSERVE_OTLP_TRACES_ENDPOINT")]
    otlp_traces_endpoint: Option<String>,
    /// The OTLP transport: `grpc` or `http/protobuf`.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        default_value = "grpc"
    )]
    otlp_traces_protocol: TraceProtocol,
    /// `worker` (step spans under each traced request, as the coordinator asks per step),
    /// `model` or `all` (also each all-reduce); `requests`: none from the worker.
    #[arg(
        long,
        env = "TPSERVE_COLLECT_DETAILED_TRACES",
        default_value = "requests"
    )]
    collect_detailed_traces: TraceDetail,
    /// The group's shared token: calls that do not carry it are refused (UNAUTHENTICATED). Give
    /// it through the environment (a Secret), not the command line; a coordinator that spawns
    /// its workers sets a fresh one itself.
    #[arg(long, env = "TPSERVE_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// PEM certificate this worker serves gRPC with, over TLS (with --worker-tls-key and
    /// --worker-tls-ca). Its names must include the address coordinators dial (an IP SAN such as
    /// 127.0.0.1, or a DNS name).
    #[arg(long, env = WORKER_TLS_CERT_ENV)]
    worker_tls_cert: Option<PathBuf>,
    /// PEM private key of --worker-tls-cert.
    #[arg(long, env = WORKER_TLS_KEY_ENV)]
    worker_tls_key: Option<PathBuf>,
    /// PEM CA certificate: only callers presenting a client certificate it signed are served.
    #[arg(long, env = WORKER_TLS_CA_ENV)]
    worker_tls_ca: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tpserve_term::progress::init(args.progress);
    let traces = TraceConfig {
        endpoint: args.otlp_traces_endpoint.clone(),
        protocol: args.otlp_traces_protocol,
        detail: args.collect_detailed_traces,
        service_name: "tpserve-worker",
    };
    let layers = match telemetry::layer(&traces) {
        Ok(layer) => layer.into_iter().collect(),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    tpserve_term::logging::init_with("info", args.log_format, layers);
    let result = run(args).await;
    let _ = tokio::task::spawn_blocking(telemetry::shutdown).await;
    if let Err(e) = result {
        let message = tpserve_term::errors::one_line(e.chain().map(ToString::to_string));
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let device = DeviceChoice::parse(&args.device)?;
    let tls = WorkerTls::from_flags(
        args.worker_tls_cert.as_deref(),
        args.worker_tls_key.as_deref(),
        args.worker_tls_ca.as_deref(),
    )?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        server = server
            .tls_config(tls.server())
            .context("--worker-tls-cert / --worker-tls-key")?;
    }
    if args.exit_on_stdin_close {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            // The coordinator stopped this worker (or is gone): its own log says which.
            tracing::debug!("standard input closed; exiting");
            telemetry::shutdown();
            std::process::exit(0);
        });
    }
    let service = WorkerService::start(
        args.listen.ip().to_string(),
        args.cpu_threads,
        device,
        args.rank.unwrap_or(0),
    )
    .map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    if args.print_listening_address {
        println!("TPSERVE_WORKER_LISTENING {addr}");
    }
    tracing::info!(
        "worker serving gRPC{} on {addr}: {} ({})",
        if tls.is_some() {
            " over mutual TLS"
        } else {
            ""
        },
        service.device().kind,
        service.device().name
    );
    let registration = if args.etcd_endpoints.is_empty() {
        None
    } else {
        let (Some(rank), Some(tp)) = (args.rank, args.tensor_parallel_size) else {
            anyhow::bail!("--etcd-endpoints needs --rank and --tensor-parallel-size");
        };
        anyhow::ensure!(
            rank < tp,
            "--rank {rank} is not below --tensor-parallel-size {tp}"
        );
        let client = EtcdClient::new(&args.etcd_endpoints).context("--etcd-endpoints")?;
        let key = GroupWatcher::key(&args.cluster, &args.group, rank);
        let value = args
            .advertise_addr
            .clone()
            .unwrap_or_else(|| addr.to_string());
        let ttl = std::time::Duration::from_secs(args.etcd_lease_ttl.max(1));
        // etcd may still be starting (a pod's neighbours come up in any order): keep trying.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let reg = loop {
            match Registration::start(client.clone(), key.clone(), value.clone(), ttl).await {
                Ok(reg) => break reg,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::warn!("registering {key} in etcd: {e}; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("registering {key} in etcd")),
            }
        };
        tracing::info!(%key, %value, "registered in etcd");
        Some(reg)
    };
    server
        .add_service(InterceptedService::new(
            WorkerServer::new(service).max_decoding_message_size(256 << 20),
            TokenCheck::new(args.worker_token.as_deref()),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal())
        .await
        .context("serving gRPC")?;
    if let Some(reg) = registration {
        // Leave the group at once rather than when the lease runs out.
        if let Err(e) = reg.stop().await {
            tracing::warn!("leaving etcd: {e}");
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
