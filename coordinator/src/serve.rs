//! `tpserve serve`: brings the engine up and serves the OpenAI-compatible API until SIGINT or
//! SIGTERM. `/health` follows the engine's status. Shutdown drains: on the signal `/health`
//! answers 503 (load balancers and readiness probes stop sending) and new requests are refused
//! with 503, while the listener stays open and the running requests finish; once none runs (or
//! `--shutdown-timeout` has passed and they were ended with an error), the listener closes, open
//! responses complete, and the workers are stopped and reaped before the process exits.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::sync::watch;
use tpserve_term::human;

use crate::api::{
    listener, metrics_router, require_api_key, router, with_gateway, with_request_ids, ApiState,
    Health, LimitArgs,
};
use crate::config::EngineArgs;
use crate::engine::{EngineHandle, EngineStatus};
use crate::gateway::{reload, Gateway, GatewayArgs};
use crate::launch::launch;

/// How long responses still open when the listener closes may take to complete.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Flags of `tpserve serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Log each request's prompt text at info level (a debugging aid: prompts are private). Off,
    /// no prompt or output text and no API key is logged at any level.
    #[arg(long, env = "TPSERVE_LOG_PROMPTS")]
    pub log_prompts: bool,
    /// Address to listen on.
    #[arg(long, env = "TPSERVE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the bound address is logged).
    #[arg(long, env = "TPSERVE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// The names clients use in `model` (default: the model path). Several names (space- or
    /// comma-separated, as vLLM's) serve the same model under each; the first is the one the
    /// metrics report. The gateway's routes may name any of them.
    #[arg(long, env = "TPSERVE_SERVED_MODEL_NAME", num_args = 1.., value_delimiter = ',')]
    pub served_model_name: Vec<String>,
    /// Require `Authorization: Bearer <key>` on `/v1/*` (as vLLM's `--api-key`). Not allowed
    /// with a gateway policy, whose tenants have their own keys.
    #[arg(long, env = "TPSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds running requests may take to finish after SIGTERM or Ctrl-C before they are ended.
    #[arg(long, env = "TPSERVE_SHUTDOWN_TIMEOUT", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Print `TPSERVE_LISTENING <url>` on stdout once the server listens (for scripts and tests
    /// that pass `--port 0`).
    #[arg(long, env = "TPSERVE_PRINT_LISTENING_URL")]
    pub print_listening_url: bool,
}

/// Runs the server until a shutdown signal.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    args.limits.validate()?;
    let gateway = start_gateway(&args).await?;
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .or_else(|_| {
            std::net::ToSocketAddrs::to_socket_addrs(&(args.host.as_str(), args.port))
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("cannot resolve --host {}", args.host))?;
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => anyhow::bail!(
            "port {port} is already in use on {host} (another server, perhaps another tpserve, \
             listens there: `ss -ltnp 'sport = :{port}'` names it); stop it, or pick a free port \
             with --port",
            port = addr.port(),
            host = addr.ip(),
        ),
        Err(e) => return Err(e).with_context(|| format!("binding {addr}")),
    };
    // The name of the signal that started shutdown, once one has.
    let (signalled_tx, signalled) = watch::channel(None::<&'static str>);
    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        let _ = signalled_tx.send(Some(signal));
    });
    let mut interrupted = signalled.clone();
    let launched = tokio::select! {
        launched = launch(&args.engine, &args.served_model_name) => launched?,
        _ = interrupted.wait_for(Option::is_some) => {
            // Dropping the start-up kills the workers it has spawned.
            tracing::info!("interrupted while starting; stopped");
            return Ok(());
        }
    };
    let (health_tx, health_rx) = watch::channel(Health::Ready);
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
                _ = stopping.wait_for(Option::is_some) => {
                    health_tx.send_replace(Health::NotReady { reason: "the server is shutting down".into() });
                    return;
                }
            }
        }
    });
    let limits = args.limits.resolve(&launched.model)?;
    let header_timeout = limits.header_timeout;
    let app = router(ApiState {
        engine: launched.engine.clone(),
        model: launched.model.clone(),
        health: health_rx,
        gateway: gateway.clone(),
        limits,
        log_prompts: args.log_prompts,
    })
    .merge(metrics_router(launched.metrics.clone(), gateway.clone()));
    let app = match (gateway, args.api_key.clone().filter(|k| !k.is_empty())) {
        (Some(gateway), _) => with_gateway(app, gateway),
        (None, Some(key)) => require_api_key(app, key),
        (None, None) => app,
    };
    let app = with_request_ids(app);
    let bound = listener.local_addr()?;
    tracing::info!(
        "serving {} on http://{bound} (OpenAI API under /v1; Ctrl-C stops)",
        launched.model.name
    );
    if args.print_listening_url {
        println!("TPSERVE_LISTENING http://{bound}");
    }
    let drained = drain(
        signalled,
        launched.engine.clone(),
        launched.status.clone(),
        Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
    );
    let (closing_tx, closing) = tokio::sync::oneshot::channel::<()>();
    let server = listener::serve(listener, app, header_timeout, async move {
        drained.await;
        let _ = closing_tx.send(());
    });
    let mut server = Box::pin(server);
    tokio::select! {
        () = &mut server => {}
        _ = async move {
            match closing.await {
                Ok(()) => tokio::time::sleep(CLOSE_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        } => {
            tracing::warn!("responses still open {} after the listener closed: dropping them", human::duration(CLOSE_GRACE));
        }
    }
    // The server holds handles to the engine; they must go before the engine can stop.
    drop(server);
    launched.stop().await;
    tracing::info!("stopped");
    Ok(())
}

/// Loads the gateway policy (the file, then the etcd key, which wins when present) and starts
/// watching both; `None` without a policy. A policy that is missing or invalid at start stops
/// the server with the field named.
async fn start_gateway(args: &ServeArgs) -> anyhow::Result<Option<std::sync::Arc<Gateway>>> {
    let g = &args.gateway;
    let endpoints = if g.gateway_etcd_endpoints.is_empty() {
        &args.engine.etcd_endpoints
    } else {
        &g.gateway_etcd_endpoints
    };
    let etcd_source = g.gateway_etcd_key.is_some() || !g.gateway_etcd_endpoints.is_empty();
    if g.gateway_config.is_none() && !etcd_source {
        return Ok(None);
    }
    if args.api_key.as_deref().is_some_and(|k| !k.is_empty()) {
        anyhow::bail!(
            "--api-key and a gateway policy do not go together: give each tenant its keys in the policy"
        );
    }
    let from_file = match &g.gateway_config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --gateway-config {}", path.display()))?;
            crate::gateway::Policy::parse(&text)
                .with_context(|| format!("--gateway-config {}", path.display()))?;
            Some(text)
        }
        None => None,
    };
    let etcd = if endpoints.is_empty() {
        None
    } else {
        let client = tpserve_cluster::EtcdClient::new(endpoints)
            .context("connecting to etcd for the gateway policy")?;
        let key = g.etcd_key(&args.engine.cluster);
        let (value, revision) = reload::read_key(&client, &key)
            .await
            .with_context(|| format!("reading the gateway policy at etcd key {key}"))?;
        Some((client, key, value, revision))
    };
    let from_etcd = etcd.as_ref().and_then(|(_, _, value, _)| value.clone());
    let Some(text) = from_etcd.as_ref().or(from_file.as_ref()) else {
        anyhow::bail!(
            "no gateway policy: the etcd key {} is empty and no --gateway-config was given",
            g.etcd_key(&args.engine.cluster)
        );
    };
    let policy = crate::gateway::Policy::parse(text).context("the etcd gateway policy")?;
    let gateway = Gateway::new(policy, g.gateway_usage_log.as_deref()).with_context(|| {
        format!(
            "opening --gateway-usage-log {}",
            g.gateway_usage_log
                .as_deref()
                .unwrap_or(std::path::Path::new(""))
                .display()
        )
    })?;
    if let Some(path) = &g.gateway_config {
        reload::watch_file(&gateway, path.clone(), g.reload_interval());
    }
    if let Some((client, key, _, revision)) = etcd {
        tracing::info!("gateway policy: watching etcd key {key}");
        reload::watch_etcd(&gateway, client, key, revision);
    }
    Ok(Some(gateway))
}

/// Resolves when the listener may close: after the shutdown signal, once no request is running
/// or waiting, or once `timeout` has passed and the engine has ended those that were.
async fn drain(
    mut signalled: watch::Receiver<Option<&'static str>>,
    engine: EngineHandle,
    mut status: watch::Receiver<EngineStatus>,
    timeout: Duration,
) {
    let signal = signalled
        .wait_for(Option::is_some)
        .await
        .map(|name| name.unwrap_or("a signal"));
    let Ok(signal) = signal else {
        // The signal task is gone: no shutdown will come through here.
        return std::future::pending().await;
    };
    engine.drain();
    let busy = |s: &EngineStatus| s.running + s.waiting;
    let left = busy(&status.borrow());
    if left == 0 {
        tracing::info!("{signal}: shutting down (no request is running)");
        return;
    }
    tracing::info!(
        "{signal}: shutting down: /health answers 503 and new requests are refused while {} finish (up to {}, --shutdown-timeout)",
        human::count(left as u64, "running request"),
        human::duration(timeout)
    );
    let finished = tokio::time::timeout(timeout, status.wait_for(|s| busy(s) == 0))
        .await
        .is_ok();
    if !finished {
        let left = busy(&status.borrow());
        tracing::warn!(
            "{} still running after --shutdown-timeout {}: ending them",
            human::count(left as u64, "request"),
            human::duration(timeout)
        );
        engine.abort_all("the server is shutting down");
    }
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM and returns its name.
async fn shutdown_signal() -> &'static str {
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
    tokio::select! {
        _ = ctrl_c => "SIGINT",
        _ = term => "SIGTERM",
    }
}
