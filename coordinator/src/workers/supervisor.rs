//! Keeps a worker group alive. The supervisor forms the group (spawn local workers, connect,
//! run the start-up sequence), then watches it: when a worker process dies, or the engine
//! reports a failed step, it tells the engine the group is lost (in-flight requests end with a
//! 503-class error and `/health` turns unready), tears the group down, and forms a new one with
//! fresh workers (new communicator, reload, warm-up), retrying until it succeeds; the engine
//! then serves again. Cluster membership through etcd will plug in here as another source of
//! workers.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::group::{GroupInit, GroupReady, WorkerGroup};
use super::spawn::{spawn_local_workers, LocalWorker};
use crate::error::StartError;

/// How often worker processes are checked.
const POLL: Duration = Duration::from_millis(200);
/// Pause between failed attempts to form a group.
const RETRY: Duration = Duration::from_secs(2);

/// What the supervisor tells the engine.
pub enum GroupEvent {
    /// The group broke; `detail` says how.
    Lost { detail: String },
    /// A new group is ready to take steps, with what its start-up found.
    Ready(WorkerGroup, GroupReady),
}

/// Forms and re-forms a group of local worker processes.
pub struct LocalSupervisor {
    binary: PathBuf,
    count: usize,
    threads: usize,
    init: GroupInit,
    workers: Vec<LocalWorker>,
}

impl LocalSupervisor {
    /// A supervisor that will run `count` workers of `binary` with `threads` threads each.
    pub fn new(binary: PathBuf, count: usize, threads: usize, init: GroupInit) -> Self {
        Self {
            binary,
            count,
            threads,
            init,
            workers: Vec::new(),
        }
    }

    /// Starts fresh workers and runs the start-up sequence on them.
    pub async fn form(&mut self) -> Result<(WorkerGroup, GroupReady), StartError> {
        self.workers.clear(); // kills the old processes
        self.workers = spawn_local_workers(&self.binary, self.count, self.threads).await?;
        let addrs: Vec<String> = self.workers.iter().map(|w| w.addr.clone()).collect();
        let mut group = WorkerGroup::connect(&addrs).await?;
        let ready = group.initialize(&self.init).await?;
        Ok((group, ready))
    }

    /// The first worker that is no longer running, described.
    fn dead_worker(&mut self) -> Option<String> {
        self.workers.iter_mut().enumerate().find_map(|(rank, w)| {
            let pid = w.pid;
            w.exit_status()
                .map(|status| format!("worker rank {rank} (pid {pid}) exited: {status}"))
        })
    }

    /// Watches the group until `events` closes. `broken` ticks when the engine saw a step fail.
    pub async fn run(
        mut self,
        events: mpsc::UnboundedSender<GroupEvent>,
        mut broken: watch::Receiver<u64>,
    ) {
        loop {
            let detail = tokio::select! {
                _ = tokio::time::sleep(POLL) => match self.dead_worker() {
                    Some(d) => d,
                    None => {
                        if events.is_closed() {
                            return;
                        }
                        continue;
                    }
                },
                changed = broken.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    "a step failed on the workers".to_string()
                }
            };
            tracing::error!("worker group lost: {detail}; re-forming it");
            if events
                .send(GroupEvent::Lost {
                    detail: format!("{detail}; the worker group is re-forming"),
                })
                .is_err()
            {
                return;
            }
            loop {
                match self.form().await {
                    Ok((group, ready)) => {
                        tracing::info!(kv_blocks = ready.num_blocks, "worker group re-formed");

                        if events.send(GroupEvent::Ready(group, ready)).is_err() {
                            return;
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("re-forming the worker group failed: {e}; retrying");
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
            // Changes that came while re-forming described the old group.
            broken.borrow_and_update();
        }
    }
}
