//! Waiting on the engine from Python. The GIL is released while a future runs, so other Python
//! threads (and asyncio loops) go on; every [`SIGNAL_CHECK`] the waiting thread takes the GIL
//! back for a moment to run Python's signal handlers, so Ctrl-C raises `KeyboardInterrupt` in the
//! caller and drops the future (which drops its sequences' streams, and that aborts them).

use std::future::Future;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;
use tokio::time::MissedTickBehavior;

/// How often a waiting thread looks for a pending signal: short enough that Ctrl-C feels
/// immediate, long enough that taking the GIL costs nothing measurable.
const SIGNAL_CHECK: Duration = Duration::from_millis(50);

/// Runs the future that `make` returns on `runtime` without the GIL and returns its output, or
/// the exception a signal handler raised meanwhile (the future is then dropped).
pub fn wait<M, F>(py: Python<'_>, runtime: &Runtime, make: M) -> PyResult<F::Output>
where
    M: FnOnce() -> F + Send,
    F: Future,
    F::Output: Send,
{
    py.allow_threads(|| {
        runtime.block_on(async {
            let mut future = std::pin::pin!(make());
            let mut tick = tokio::time::interval(SIGNAL_CHECK);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    biased;
                    out = &mut future => return Ok(out),
                    _ = tick.tick() => Python::with_gil(|py| py.check_signals())?,
                }
            }
        })
    })
}
