//! `tpserve-worker`: serves one rank of a tensor-parallel group over gRPC.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use tokio_stream::wrappers::TcpListenerStream;
use tpserve_proto::worker_server::WorkerServer;
use tpserve_worker::service::WorkerService;

/// One tpserve worker: a shard of the model and its KV cache, driven by a coordinator.
#[derive(Debug, Parser)]
#[command(name = "tpserve-worker", version)]
struct Args {
    /// Address to serve gRPC on; port 0 picks a free port. The bound address is printed on
    /// stdout as `TPSERVE_WORKER_LISTENING <addr>`.
    #[arg(long, env = "TPSERVE_WORKER_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Compute device. Only `cpu` exists in this build.
    #[arg(long, env = "TPSERVE_DEVICE", default_value = "cpu", value_parser = ["cpu"])]
    device: String,
    /// Threads for the CPU backend (0: all cores).
    #[arg(long, env = "TPSERVE_CPU_THREADS", default_value_t = 0)]
    cpu_threads: usize,
    /// Exit when standard input closes (set by a coordinator that spawns its workers, so they
    /// never outlive it).
    #[arg(long)]
    exit_on_stdin_close: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.cpu_threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.cpu_threads)
            .build_global()
            .context("configuring the CPU thread pool")?;
    }
    if args.exit_on_stdin_close {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
            tracing::info!("standard input closed: the coordinator is gone; exiting");
            std::process::exit(0);
        });
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("TPSERVE_WORKER_LISTENING {addr}");
    tracing::info!(%addr, device = %args.device, threads = rayon::current_num_threads(), "worker serving");
    let service = WorkerService::start(addr.ip().to_string());
    tonic::transport::Server::builder()
        .add_service(WorkerServer::new(service).max_decoding_message_size(256 << 20))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving gRPC")?;
    Ok(())
}
