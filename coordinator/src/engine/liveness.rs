//! The engine loop's heartbeat, behind `/live`. The actor beats at every turn of its loop (and at
//! least every [`BEAT_INTERVAL`] while idle), and marks the time it starts waiting on the workers
//! for a step; `/live` reports the loop stalled once no beat has come for the stall timeout, and
//! says whether it is stuck on the workers (a step that does not come back: a hung collective, a
//! wedged or stopped worker) or in the engine itself.
//!
//! Unlike `/health`, this does not follow the workers' membership: a group that is re-forming
//! (a worker reloading for minutes) leaves the loop idle and beating, so a liveness probe on `/live`
//! never restarts a coordinator that is only waiting for its workers.
//!
//! Costs: two relaxed atomic stores per loop turn; no lock. Times are milliseconds since the
//! heartbeat was made, so readers pass in `Instant`s and the state stays testable.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest the idle engine loop sleeps between beats.
pub const BEAT_INTERVAL: Duration = Duration::from_secs(1);

/// `waiting_step` when the loop is not waiting on the workers.
const NOT_WAITING: u64 = u64::MAX;

/// A cheap, cloneable view of the engine loop's heartbeat; see the module docs.
#[derive(Debug, Clone)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// When the heartbeat was made; every time below counts from here.
    origin: Instant,
    /// How long the loop may go without a beat before it counts as stalled.
    stall_timeout: Duration,
    /// Milliseconds since `origin` of the last beat.
    last_beat_ms: AtomicU64,
    /// The step the loop is waiting on the workers for, or `NOT_WAITING`.
    waiting_step: AtomicU64,
}

/// What `/live` reports.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveStatus {
    /// The loop turned within the stall timeout.
    Alive { since_beat: Duration },
    /// The loop has not turned for `since_beat`, waiting for step `step`'s result from the workers.
    WorkersStalled { since_beat: Duration, step: u64 },
    /// The loop has not turned for `since_beat`, and not because of the workers.
    EngineStalled { since_beat: Duration },
}

impl Liveness {
    /// A heartbeat that beat at `now`, stalled after `stall_timeout` without a beat.
    pub fn new(now: Instant, stall_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                origin: now,
                stall_timeout,
                last_beat_ms: AtomicU64::new(0),
                waiting_step: AtomicU64::new(NOT_WAITING),
            }),
        }
    }

    /// The stall timeout this heartbeat was made with.
    pub fn stall_timeout(&self) -> Duration {
        self.inner.stall_timeout
    }

    /// The loop turned at `now`.
    pub fn beat(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.inner.origin).as_millis() as u64;
        self.inner.last_beat_ms.store(ms, Ordering::Relaxed);
    }

    /// The loop beats at `now` and starts waiting on the workers for `step`; the wait ends when
    /// the returned guard is dropped.
    pub fn wait_on_workers(&self, now: Instant, step: u64) -> WaitingOnWorkers<'_> {
        self.beat(now);
        self.inner.waiting_step.store(step, Ordering::Relaxed);
        WaitingOnWorkers { liveness: self }
    }

    /// The state at `now`.
    pub fn status(&self, now: Instant) -> LiveStatus {
        let beat = self.inner.origin
            + Duration::from_millis(self.inner.last_beat_ms.load(Ordering::Relaxed));
        let since_beat = now.saturating_duration_since(beat);
        if since_beat <= self.inner.stall_timeout {
            return LiveStatus::Alive { since_beat };
        }
        match self.inner.waiting_step.load(Ordering::Relaxed) {
            NOT_WAITING => LiveStatus::EngineStalled { since_beat },
            step => LiveStatus::WorkersStalled { since_beat, step },
        }
    }
}

/// Marks the engine loop as waiting on the workers until dropped.
#[must_use = "the wait ends when this is dropped"]
pub struct WaitingOnWorkers<'a> {
    liveness: &'a Liveness,
}

impl Drop for WaitingOnWorkers<'_> {
    fn drop(&mut self) {
        let inner = &self.liveness.inner;
        inner.waiting_step.store(NOT_WAITING, Ordering::Relaxed);
        inner
            .last_beat_ms
            .store(inner.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALL: Duration = Duration::from_secs(10);

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn a_loop_that_beats_within_the_timeout_is_alive() {
        let t0 = Instant::now();
        let live = Liveness::new(t0, STALL);
        assert!(matches!(live.status(at(t0, 10)), LiveStatus::Alive { .. }));
        live.beat(at(t0, 9));
        assert_eq!(
            live.status(at(t0, 12)),
            LiveStatus::Alive {
                since_beat: Duration::from_secs(3)
            }
        );
    }

    #[test]
    fn a_loop_stuck_on_a_step_is_reported_as_waiting_on_the_workers() {
        let t0 = Instant::now();
        let live = Liveness::new(t0, STALL);
        let waiting = live.wait_on_workers(at(t0, 1), 41);
        assert!(matches!(live.status(at(t0, 5)), LiveStatus::Alive { .. }));
        assert_eq!(
            live.status(at(t0, 12)),
            LiveStatus::WorkersStalled {
                since_beat: Duration::from_secs(11),
                step: 41
            }
        );
        drop(waiting);
        // The step came back: the loop beat when it did.
        assert!(matches!(
            live.status(Instant::now()),
            LiveStatus::Alive { .. }
        ));
    }

    #[test]
    fn a_loop_that_stops_beating_elsewhere_is_reported_as_an_engine_stall() {
        let t0 = Instant::now();
        let live = Liveness::new(t0, STALL);
        drop(live.wait_on_workers(t0, 1));
        assert!(matches!(
            live.status(Instant::now() + Duration::from_secs(11)),
            LiveStatus::EngineStalled { .. }
        ));
    }
}
