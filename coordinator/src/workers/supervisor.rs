//! Keeps a worker group alive. A supervisor forms the group from its source of workers (local
//! processes it spawns, or workers registered in etcd), then watches it: when a worker goes
//! away, or the engine reports a failed step, it tells the engine the group is lost (in-flight
//! requests end with a 503-class error and `/health` turns unready), and forms a new group
//! (new communicator, reload, warm-up), retrying until it succeeds; the engine then serves again.
//! [`Supervisor::stop`] (or dropping the [`Supervisor`]) ends the watch and stops the source's
//! workers: local processes exit and are reaped.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

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
    /// Stops the workers this source started, if any, and waits until they are gone.
    fn stop(&mut self) -> impl Future<Output = ()> + Send;
}

/// A running supervisor task.
pub struct Supervisor {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Supervisor {
    /// Starts supervising `source`, whose group is formed: re-forms it when it is lost.
    pub fn start<S: WorkerSource>(
        source: S,
        events: mpsc::UnboundedSender<GroupEvent>,
        broken: watch::Receiver<u64>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        Self {
            stop: Some(stop),
            task: tokio::spawn(supervise(source, events, broken, stopped)),
        }
    }

    /// Ends supervision and waits until the workers are stopped (local ones reaped).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Watches the group formed from `source` until `events` closes or `stop` fires (or its sender
/// is dropped), then stops the source's workers. `broken` ticks when the engine saw a step fail.
async fn supervise<S: WorkerSource>(
    mut source: S,
    events: mpsc::UnboundedSender<GroupEvent>,
    mut broken: watch::Receiver<u64>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let detail = tokio::select! {
            detail = source.lost() => detail,
            changed = broken.changed() => {
                if changed.is_err() {
                    break;
                }
                "a step failed on the workers".to_string()
            }
            _ = events.closed() => break,
            _ = &mut stop => break,
        };
        tracing::error!("worker group lost: {detail}; re-forming it");
        let lost = GroupEvent::Lost {
            detail: format!("{detail}; the worker group is re-forming"),
        };
        if events.send(lost).is_err() {
            break;
        }
        let stopped = loop {
            let formed = tokio::select! {
                formed = source.form() => formed,
                _ = &mut stop => break true,
            };
            match formed {
                Ok((group, ready)) => {
                    tracing::info!(kv_blocks = ready.num_blocks, "worker group re-formed");
                    if events.send(GroupEvent::Ready(group, ready)).is_err() {
                        break true;
                    }
                    break false;
                }
                Err(e) => {
                    tracing::warn!("re-forming the worker group failed: {e}; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = &mut stop => break true,
                    }
                }
            }
        };
        if stopped {
            break;
        }
        // Changes that came while re-forming described the old group.
        broken.borrow_and_update();
    }
    source.stop().await;
}
