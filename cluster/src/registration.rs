//! A worker's registration: one key (its rank's key, holding its gRPC address) attached to a
//! lease that a background task keeps alive.
//!
//! Invariants: while the task runs and etcd is reachable, the key exists. If the lease is lost
//! (expired during a partition or an etcd outage longer than the TTL, or revoked by someone else)
//! the task grants a new lease and writes the key again, so a worker that comes back re-appears
//! by itself. Dropping the [`Registration`] stops refreshing *without* revoking (what a crash looks
//! like: the key vanishes after the TTL); [`Registration::stop`] revokes, so the key goes at once.
//! Costs: one keepalive request every TTL/3.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::client::{EtcdClient, LeaseId};
use crate::error::{Error, Result};

/// Never refresh more often than this, whatever the TTL.
const MIN_REFRESH_PERIOD: Duration = Duration::from_millis(200);

/// A key kept alive under a lease; see the module docs.
#[derive(Debug)]
pub struct Registration {
    client: EtcdClient,
    key: String,
    /// The current lease; the task replaces it after re-registering.
    lease: Arc<AtomicI64>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Grants a lease of `ttl` (rounded up to whole seconds, at least 1; etcd may raise it to its
    /// minimum, 2 s by default), writes `key = value` under it and starts refreshing it every
    /// TTL/3. Fails if etcd cannot be reached now. Needs a tokio runtime.
    pub async fn start(
        client: EtcdClient,
        key: impl Into<String>,
        value: impl Into<String>,
        ttl: Duration,
    ) -> Result<Self> {
        let key = key.into();
        let value = value.into();
        let ttl_secs = (ttl.as_secs_f64().ceil() as i64).max(1);
        let lease = register(&client, &key, &value, ttl_secs).await?;
        tracing::info!(%key, %value, %lease, ttl_secs, "registered in etcd");
        let shared = Arc::new(AtomicI64::new(lease.0));
        let task = tokio::spawn(keep_alive_loop(KeepAlive {
            client: client.clone(),
            key: key.clone(),
            value,
            ttl_secs,
            lease: shared.clone(),
        }));
        Ok(Self {
            client,
            key,
            lease: shared,
            task,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease currently holding the key (it changes after a re-registration).
    pub fn lease(&self) -> LeaseId {
        LeaseId(self.lease.load(Ordering::Acquire))
    }

    /// Stops refreshing and revokes the lease, deleting the key at once (graceful shutdown).
    /// A lease that had already expired is not an error.
    pub async fn stop(mut self) -> Result<()> {
        self.task.abort();
        // Wait until the task is really gone so it cannot re-register after the revoke.
        let _ = (&mut self.task).await;
        let lease = self.lease();
        match self.client.revoke(lease).await {
            Ok(()) | Err(Error::LeaseExpired { .. }) => {
                tracing::info!(key = %self.key, %lease, "deregistered from etcd");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Grants a lease and writes the key under it.
async fn register(client: &EtcdClient, key: &str, value: &str, ttl_secs: i64) -> Result<LeaseId> {
    let lease = client.grant_lease(ttl_secs).await?;
    client.put(key, value, Some(lease)).await?;
    Ok(lease)
}

struct KeepAlive {
    client: EtcdClient,
    key: String,
    value: String,
    ttl_secs: i64,
    lease: Arc<AtomicI64>,
}

async fn keep_alive_loop(k: KeepAlive) {
    let period = Duration::from_millis(k.ttl_secs as u64 * 1000 / 3).max(MIN_REFRESH_PERIOD);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; the key was just written
                        // Log the first failure of a run at warn level, the rest at debug: etcd outages repeat.
    let mut failing = false;
    loop {
        ticks.tick().await;
        let lease = LeaseId(k.lease.load(Ordering::Acquire));
        let result = match k.client.keep_alive(lease).await {
            Ok(_) => Ok(()),
            Err(Error::LeaseExpired { .. }) => {
                tracing::warn!(key = %k.key, %lease, "etcd lease lost; registering again");
                match register(&k.client, &k.key, &k.value, k.ttl_secs).await {
                    Ok(new_lease) => {
                        k.lease.store(new_lease.0, Ordering::Release);
                        tracing::info!(key = %k.key, lease = %new_lease, "registered in etcd again");
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) if failing => {
                failing = false;
                tracing::info!(key = %k.key, "etcd keepalive recovered");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(key = %k.key, error = %e, "etcd keepalive failed; retrying every {period:?}");
            }
            Err(e) => tracing::debug!(key = %k.key, error = %e, "etcd keepalive failed again"),
        }
    }
}
