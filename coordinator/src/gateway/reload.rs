//! Keeping the policy current without a restart.
//!
//! - The file (`--gateway-config`) is polled: every interval its contents are read and, when
//!   they changed, parsed and put in force. Polling needs no inotify and sees an editor's
//!   rename-into-place and a Kubernetes ConfigMap's symlink swap alike.
//! - In a cluster, the etcd key (`--gateway-etcd-key`) is watched by every replica, so one
//!   `etcdctl put` reaches them all within a watch round trip. A lost watch is re-opened after
//!   reading the key again, so no change is missed.
//!
//! Either way an invalid policy is refused with the field named (logged, and counted in
//! `tpserve:gateway_policy_reloads_total{result="refused"}`) and the last valid one stays in
//! force. Whichever source changes last wins.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tpserve_cluster::{EtcdClient, WatchEvent};

use super::Gateway;

/// Pause before re-opening a broken etcd watch.
const RETRY: Duration = Duration::from_secs(1);

/// Polls `path` every `interval` for as long as the gateway lives.
pub fn watch_file(gateway: &Arc<Gateway>, path: PathBuf, interval: Duration) {
    let gateway = Arc::downgrade(gateway);
    let mut last = std::fs::read_to_string(&path).ok();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(gateway) = gateway.upgrade() else {
                return;
            };
            match tokio::fs::read_to_string(&path).await {
                Ok(text) if last.as_deref() != Some(text.as_str()) => {
                    let _ = gateway.reload(&text, &path.display().to_string());
                    last = Some(text);
                }
                Ok(_) => {}
                Err(e) if last.is_some() => {
                    tracing::warn!(
                        "reading the gateway policy {}: {e}; the previous policy stays in force",
                        path.display()
                    );
                    last = None;
                }
                Err(_) => {}
            }
        }
    });
}

/// Reads `key` once: its value, if it exists, and the revision to watch from.
pub async fn read_key(
    client: &EtcdClient,
    key: &str,
) -> Result<(Option<String>, i64), tpserve_cluster::Error> {
    let (kvs, revision) = client.get_prefix(key).await?;
    let value = kvs.into_iter().find(|(k, _)| k == key).map(|(_, v)| v);
    Ok((value, revision))
}

/// Watches `key` from `revision + 1` for as long as the gateway lives.
pub fn watch_etcd(gateway: &Arc<Gateway>, client: EtcdClient, key: String, revision: i64) {
    let gateway = Arc::downgrade(gateway);
    tokio::spawn(async move {
        let mut from = revision + 1;
        loop {
            match client.watch_prefix(&key, from).await {
                Ok(mut events) => {
                    while let Some(event) = events.next().await {
                        let Some(gateway) = gateway.upgrade() else {
                            return;
                        };
                        match event {
                            Ok(WatchEvent::Put {
                                key: k,
                                value,
                                revision,
                            }) if k == key => {
                                from = revision + 1;
                                let _ = gateway.reload(&value, &format!("etcd key {key}"));
                            }
                            Ok(WatchEvent::Delete { key: k, revision }) if k == key => {
                                from = revision + 1;
                                tracing::warn!(
                                    "the etcd key {key} was deleted; the policy in force stays"
                                );
                            }
                            Ok(other) => from = other.revision() + 1,
                            Err(e) => {
                                tracing::warn!("watching the gateway policy at {key}: {e}");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!("watching the gateway policy at {key}: {e}"),
            }
            if gateway.strong_count() == 0 {
                return;
            }
            tokio::time::sleep(RETRY).await;
            // Catch up on what the broken watch may have missed (compaction included).
            match read_key(&client, &key).await {
                Ok((value, revision)) => {
                    if let (Some(value), Some(gateway)) = (value, gateway.upgrade()) {
                        let _ = gateway.reload(&value, &format!("etcd key {key}"));
                    }
                    from = revision + 1;
                }
                Err(e) => tracing::warn!("reading the gateway policy at {key}: {e}"),
            }
        }
    });
}
