//! Keeps a worker group alive. A supervisor forms the group from its source of workers (local
//! processes it spawns, or workers registered in etcd), then watches it: when a worker goes
//! away, or the engine reports a failed step, it tells the engine the group is lost (in-flight
//! requests end with a 503-class error and `/health` turns unready), and forms a new group
//! (new communicator, reload, warm-up), retrying until it succeeds; the engine then serves again.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::group::{GroupReady, WorkerGroup};
use crate::error::StartError;

/// Pause between failed attempts to form a group.
const RETRY: Duration = Duration::from_secs(2);

/// What the supervisor tells the engine.
pub enum GroupEvent {
    /// The group broke; `detail` says how.
    Lost { detail: String },
    /// A new group is ready to take steps, with what its start-up found.
    Ready(WorkerGroup, GroupReady),
}

/// Where workers come from.
pub trait WorkerSource: Send + 'static {
    /// Gets a full set of workers and runs the start-up sequence on them.
    fn form(
        &mut self,
    ) -> impl Future<Output = Result<(WorkerGroup, GroupReady), StartError>> + Send;
    /// Resolves when the group last formed has lost a worker, saying how.
    fn lost(&mut self) -> impl Future<Output = String> + Send;
}

/// Watches the group formed from `source` until `events` closes. `broken` ticks when the engine
/// saw a step fail.
pub async fn supervise<S: WorkerSource>(
    mut source: S,
    events: mpsc::UnboundedSender<GroupEvent>,
    mut broken: watch::Receiver<u64>,
) {
    loop {
        let detail = tokio::select! {
            detail = source.lost() => detail,
            changed = broken.changed() => {
                if changed.is_err() {
                    return;
                }
                "a step failed on the workers".to_string()
            }
            _ = events.closed() => return,
        };
        tracing::error!("worker group lost: {detail}; re-forming it");
        let lost = GroupEvent::Lost {
            detail: format!("{detail}; the worker group is re-forming"),
        };
        if events.send(lost).is_err() {
            return;
        }
        loop {
            match source.form().await {
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
