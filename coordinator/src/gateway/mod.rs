//! The tenant gateway: API keys mapped to tenants, routing each request to a served model or
//! adapter, per-tenant quotas, usage attribution and the tenant's scheduling weight and
//! prefix-cache salt. Off unless a policy is given (`--gateway-config`, or an etcd key in a
//! cluster); without one the server behaves as it always did (`--api-key` still works).
//!
//! - `policy`: the YAML schema and its validation (errors name the field);
//! - `keys`: SHA-256 of API keys (the policy holds only hashes) and new keys;
//! - `routing`: the documented rule order and the fallback;
//! - `quota`: requests per second, tokens per minute, concurrent requests (per replica);
//! - `usage`: counters for Prometheus, `/v1/usage` and the JSONL log;
//! - `reload`: the file and etcd watchers that swap the policy in without a restart.
//!
//! The HTTP side (the middleware, the route headers, `/v1/usage`) lives in `api::gateway`. The
//! policy in force is an `Arc` swapped under a lock held only to clone it, so a request sees one
//! policy from start to end and a reload never waits on a request.

pub mod cli;
pub mod keys;
pub mod policy;
pub mod quota;
pub mod reload;
pub mod routing;
pub mod usage;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use clap::Args;

pub use policy::{Policy, PolicyError, Tenant};
pub use quota::Quotas;
pub use usage::UsageLedger;

/// Flags of the gateway (part of `tpserve serve`).
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// The tenant policy (YAML; see deploy/gateway.example.yaml). Watched: a valid change applies
    /// to new requests within --gateway-reload-interval; an invalid one is refused and logged.
    #[arg(long, env = "TPSERVE_GATEWAY_CONFIG")]
    pub gateway_config: Option<PathBuf>,
    /// etcd endpoints whose --gateway-etcd-key holds the policy every replica applies (default:
    /// --etcd-endpoints). The key, when present, replaces the file's policy.
    #[arg(long, env = "TPSERVE_GATEWAY_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub gateway_etcd_endpoints: Vec<String>,
    /// The etcd key of the policy (default: /tpserve/<--cluster>/gateway/policy).
    #[arg(long, env = "TPSERVE_GATEWAY_ETCD_KEY")]
    pub gateway_etcd_key: Option<String>,
    /// Append one JSON line per finished request (tenant, target, feature, variant, status,
    /// tokens) to this file, for billing.
    #[arg(long, env = "TPSERVE_GATEWAY_USAGE_LOG")]
    pub gateway_usage_log: Option<PathBuf>,
    /// Seconds between checks of --gateway-config for changes.
    #[arg(long, env = "TPSERVE_GATEWAY_RELOAD_INTERVAL", default_value_t = 1.0)]
    pub gateway_reload_interval: f64,
}

impl GatewayArgs {
    /// The etcd key of the policy in `cluster`.
    pub fn etcd_key(&self, cluster: &str) -> String {
        self.gateway_etcd_key
            .clone()
            .unwrap_or_else(|| format!("/tpserve/{cluster}/gateway/policy"))
    }

    /// How often the file is checked.
    pub fn reload_interval(&self) -> Duration {
        Duration::from_secs_f64(self.gateway_reload_interval.clamp(0.05, 3600.0))
    }
}

/// A tenant's share of the engine: its id (also the prefix-cache salt) and fair-share weight.
pub fn tenant_id(name: &str) -> u64 {
    // Never 0, which means "no tenant".
    keys::hash64(&["tenant", name]).max(1)
}

/// The gateway's shared state.
#[derive(Debug)]
pub struct Gateway {
    policy: RwLock<Arc<Policy>>,
    pub quotas: Arc<Quotas>,
    pub usage: UsageLedger,
    reloads_applied: AtomicU64,
    reloads_refused: AtomicU64,
}

impl Gateway {
    /// A gateway enforcing `policy`, logging usage to `usage_log` when given.
    pub fn new(policy: Policy, usage_log: Option<&Path>) -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            policy: RwLock::new(Arc::new(policy)),
            quotas: Quotas::new(Instant::now()),
            usage: UsageLedger::new(usage_log)?,
            reloads_applied: AtomicU64::new(0),
            reloads_refused: AtomicU64::new(0),
        }))
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Parses `text` and, if valid, puts it in force; otherwise the policy in force stays and
    /// the error (naming the field) is returned. `source` names where it came from, for logs.
    pub fn reload(&self, text: &str, source: &str) -> Result<bool, PolicyError> {
        match Policy::parse(text) {
            Ok(policy) => {
                let mut current = self.policy.write().unwrap_or_else(|e| e.into_inner());
                if **current == policy {
                    return Ok(false);
                }
                *current = Arc::new(policy);
                drop(current);
                self.reloads_applied.fetch_add(1, Ordering::Relaxed);
                tracing::info!("gateway policy from {source} is in force");
                Ok(true)
            }
            Err(e) => {
                self.reloads_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{e} (from {source}); the previous policy stays in force");
                Err(e)
            }
        }
    }

    /// The gateway's Prometheus series.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "tpserve:gateway_policy_reloads_total";
        let _ = writeln!(
            out,
            "# HELP {name} Policy changes seen after start, by result.\n# TYPE {name} counter\n\
             {name}{{result=\"applied\"}} {}\n{name}{{result=\"refused\"}} {}",
            self.reloads_applied.load(Ordering::Relaxed),
            self.reloads_refused.load(Ordering::Relaxed)
        );
        self.usage.render(out);
    }
}
