//! Workers as local child processes (`tpserve serve` without etcd): spawns one `tpserve-worker`
//! per rank, and notices within `POLL` when one of them exits. Re-forming stops the survivors
//! (and reaps them) and starts a fresh set; `stop` does the same at shutdown.

use std::path::PathBuf;
use std::time::Duration;

use super::group::{GroupInit, GroupReady, WorkerGroup};
use super::spawn::{spawn_local_workers, stop_all, LocalWorker};
use super::supervisor::WorkerSource;
use crate::error::StartError;

/// How often worker processes are checked.
const POLL: Duration = Duration::from_millis(200);

/// Local worker processes.
pub struct LocalWorkers {
    binary: PathBuf,
    count: usize,
    threads: usize,
    device: String,
    init: GroupInit,
    workers: Vec<LocalWorker>,
}

impl LocalWorkers {
    /// `count` workers of `binary` on `device` (`auto`, `cpu` or `cuda`; rank r takes GPU r),
    /// with `threads` CPU threads each.
    pub fn new(
        binary: PathBuf,
        count: usize,
        threads: usize,
        device: String,
        init: GroupInit,
    ) -> Self {
        Self {
            binary,
            count,
            threads,
            device,
            init,
            workers: Vec::new(),
        }
    }

    /// The first worker that is no longer running, described.
    fn dead_worker(&mut self) -> Option<String> {
        self.workers.iter_mut().enumerate().find_map(|(rank, w)| {
            let pid = w.pid;
            w.exit_status()
                .map(|status| format!("worker rank {rank} (pid {pid}) exited: {status}"))
        })
    }
}

impl WorkerSource for LocalWorkers {
    async fn form(&mut self) -> Result<(WorkerGroup, GroupReady), StartError> {
        stop_all(std::mem::take(&mut self.workers)).await;
        self.workers = spawn_local_workers(
            &self.binary,
            self.count,
            self.threads,
            &self.device,
            &self.init,
        )
        .await?;
        let addrs: Vec<String> = self.workers.iter().map(|w| w.addr.clone()).collect();
        let mut group = WorkerGroup::connect(&addrs, &self.init).await?;
        let ready = group.initialize(&self.init).await?;
        Ok((group, ready))
    }

    async fn lost(&mut self) -> String {
        loop {
            if let Some(detail) = self.dead_worker() {
                return detail;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn stop(&mut self) {
        stop_all(std::mem::take(&mut self.workers)).await;
    }
}
