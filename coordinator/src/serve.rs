//! `tpserve serve`: brings the engine up and serves the OpenAI-compatible API until SIGINT or
//! SIGTERM. `/health` follows the engine's status. Shutdown is graceful: `/health` turns
//! unready, new requests are refused, running ones finish (up to `--shutdown-timeout`, then they
//! end with an error), and the workers exit with the server.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Args;

use crate::api::{metrics_router, require_api_key, router, ApiState, Health};
use crate::config::EngineArgs;
use crate::launch::launch;

/// Flags of `tpserve serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, env = "TPSERVE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the bound address is logged).
    #[arg(long, env = "TPSERVE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// The name clients use in `model` (default: the model path).
    #[arg(long, env = "TPSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer <key>` on `/v1/*` (as vLLM's `--api-key`).
    #[arg(long, env = "TPSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds running requests may take to finish after SIGTERM or Ctrl-C before they are ended.
    #[arg(long, env = "TPSERVE_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

/// Runs the server until a shutdown signal.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(args.host.as_str(), args.port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("cannot resolve --host {}", args.host))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let launched = launch(&args.engine, args.served_model_name.clone()).await?;
    let (health_tx, health_rx) = tokio::sync::watch::channel(Health::Ready);
    let (signalled_tx, signalled) = tokio::sync::watch::channel(false);
    // /health follows the engine's status, and turns unready for good once shutdown starts.
    let mut status = launched.status.clone();
    let mut stopping = signalled.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = status.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let s = status.borrow().clone();
                    health_tx.send_replace(if s.healthy { Health::Ready } else { Health::NotReady { reason: s.detail } });
                }
                _ = stopping.wait_for(|s| *s) => {
                    health_tx.send_replace(Health::NotReady { reason: "the server is shutting down".into() });
                    return;
                }
            }
        }
    });
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(true);
    });
    let app = router(ApiState {
        engine: launched.engine.clone(),
        model: launched.model.clone(),
        health: health_rx,
    })
    .merge(metrics_router(launched.metrics.clone()));
    let app = match args.api_key.clone().filter(|k| !k.is_empty()) {
        Some(key) => require_api_key(app, key),
        None => app,
    };
    let bound = listener.local_addr()?;
    tracing::info!(model = %launched.model.name, "serving the OpenAI API on http://{bound}");
    println!("TPSERVE_LISTENING http://{bound}");
    let engine = launched.engine.clone();
    let mut graceful = signalled.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|s| *s).await;
        tracing::info!("shutting down: refusing new requests, finishing the running ones");
        engine.drain();
    });
    let server = std::future::IntoFuture::into_future(server);
    tokio::pin!(server);
    let timeout = std::time::Duration::from_secs_f64(args.shutdown_timeout);
    let mut deadline = signalled.clone();
    tokio::select! {
        result = &mut server => result.context("serving HTTP")?,
        _ = async move {
            let _ = deadline.wait_for(|s| *s).await;
            tokio::time::sleep(timeout).await;
        } => {
            tracing::warn!("requests still running after --shutdown-timeout {timeout:?}: ending them");
            launched.engine.abort_all("the server is shutting down");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut server).await;
        }
    }
    drop(launched);
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
