//! Workers found through etcd (`tpserve serve --etcd-endpoints ... --cluster ...`): workers
//! started elsewhere register `/tpserve/<cluster>/<group>/workers/<rank>` under a lease; the
//! group forms once every rank is present, and is lost when any registration it was formed from
//! goes away or is replaced (a worker died and its lease expired, or it restarted).

use tpserve_cluster::{EtcdClient, GroupWatcher, Membership};

use super::group::{GroupInit, GroupReady, WorkerGroup};
use super::supervisor::WorkerSource;
use crate::error::StartError;

/// The workers of one group in etcd.
pub struct EtcdWorkers {
    watcher: GroupWatcher,
    init: GroupInit,
    world_size: usize,
    formed: Option<Membership>,
    cluster: String,
    group: String,
}

impl EtcdWorkers {
    /// Watches group `group` of `cluster` for `world_size` ranks.
    pub fn new(
        endpoints: &[String],
        cluster: &str,
        group: &str,
        world_size: usize,
        init: GroupInit,
    ) -> Result<Self, StartError> {
        let client = EtcdClient::new(endpoints).map_err(|e| StartError::Config {
            detail: format!("--etcd-endpoints: {e}"),
        })?;
        Ok(Self {
            watcher: GroupWatcher::new(client, cluster, group, world_size),
            init,
            world_size,
            formed: None,
            cluster: cluster.to_string(),
            group: group.to_string(),
        })
    }
}

impl WorkerSource for EtcdWorkers {
    async fn form(&mut self) -> Result<(WorkerGroup, GroupReady), StartError> {
        if !self.watcher.current().complete {
            tracing::info!(
                "waiting for {} workers to register under {}",
                self.world_size,
                GroupWatcher::prefix(&self.cluster, &self.group)
            );
        }
        let members =
            self.watcher
                .wait_for(|m| m.complete)
                .await
                .map_err(|e| StartError::Config {
                    detail: format!("watching etcd: {e}"),
                })?;
        let addrs: Vec<String> = members.members.values().cloned().collect();
        tracing::info!(?addrs, "all ranks registered; forming the group");
        let mut group = WorkerGroup::connect(&addrs, &self.init).await?;
        let ready = group.initialize(&self.init).await?;
        self.formed = Some(members);
        Ok((group, ready))
    }

    async fn lost(&mut self) -> String {
        loop {
            let Some(formed) = &self.formed else {
                return "no group is formed".into();
            };
            if !self.watcher.current().same_workers(formed) {
                let now = self.watcher.current();
                let gone: Vec<usize> = formed
                    .revisions
                    .iter()
                    .filter(|(rank, rev)| now.revisions.get(rank) != Some(rev))
                    .map(|(rank, _)| *rank)
                    .collect();
                return format!("worker ranks {gone:?} left or re-registered in etcd");
            }
            if let Err(e) = self.watcher.next_change().await {
                tracing::warn!("watching etcd: {e}");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    }

    /// The workers were started elsewhere and outlive this coordinator: nothing to stop.
    async fn stop(&mut self) {}
}
