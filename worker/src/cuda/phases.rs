//! Where a forward pass spends its GPU time, by phase, when `TPSERVE_CUDA_PHASES=1`: CUDA events
//! recorded between phases on the worker's stream, summed per phase name over every layer and
//! step of this thread. For performance work (`bench_device` prints the table); off by default,
//! and when off it records nothing.

use std::cell::RefCell;
use std::collections::BTreeMap;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaEvent;

use super::device::Gpu;

thread_local! {
    static TOTALS: RefCell<BTreeMap<&'static str, (f64, u64)>> = const { RefCell::new(BTreeMap::new()) };
}

/// Whether phase timing is on for this process.
pub fn enabled() -> bool {
    std::env::var("TPSERVE_CUDA_PHASES").is_ok_and(|v| v == "1")
}

/// The events of one forward pass.
pub struct PhaseTimer {
    marks: Option<Vec<(&'static str, CudaEvent)>>,
}

impl PhaseTimer {
    /// Starts timing when enabled.
    pub fn start(gpu: &Gpu) -> Self {
        let mut timer = Self {
            marks: enabled().then(Vec::new),
        };
        timer.mark(gpu, "start");
        timer
    }

    /// A timer that records nothing (CUDA-graph capture, replays).
    pub fn off() -> Self {
        Self { marks: None }
    }

    /// Ends the phase `name` (the GPU work issued since the previous mark).
    pub fn mark(&mut self, gpu: &Gpu, name: &'static str) {
        let Some(marks) = &mut self.marks else {
            return;
        };
        if let Some(event) = record(gpu) {
            marks.push((name, event));
        }
    }

    /// Waits for the pass and adds its phases to this thread's totals.
    pub fn finish(self) {
        let Some(marks) = self.marks else {
            return;
        };
        TOTALS.with(|totals| {
            let mut totals = totals.borrow_mut();
            for pair in marks.windows(2) {
                if let Ok(ms) = pair[0].1.elapsed_ms(&pair[1].1) {
                    let entry = totals.entry(pair[1].0).or_insert((0.0, 0));
                    entry.0 += ms as f64;
                    entry.1 += 1;
                }
            }
        });
    }
}

/// This thread's totals, `(phase, milliseconds, times)`, and resets them.
pub fn take_phase_totals() -> Vec<(&'static str, f64, u64)> {
    TOTALS.with(|totals| {
        std::mem::take(&mut *totals.borrow_mut())
            .into_iter()
            .map(|(name, (ms, n))| (name, ms, n))
            .collect()
    })
}

/// Whether the GPU's idle time between graph-replayed steps is timed
/// (`TPSERVE_CUDA_STEP_GAPS=1`; graphs stay on). For performance work: `bench_device` prints it
/// ([`take_step_gaps`]).
pub fn step_gaps_enabled() -> bool {
    std::env::var("TPSERVE_CUDA_STEP_GAPS").is_ok_and(|v| v == "1")
}

/// The events of the steps timed for [`step_gaps_enabled`], in order: a graph step's begin,
/// recorded on the stream just before its graph is replayed (its inputs packed on the host), so
/// the GPU reaches it as soon as the host does, and its end after the replay's last kernel;
/// `None` for a step that was not timed so (its work breaks the chain).
#[derive(Default)]
struct StepGaps {
    steps: Vec<Option<(CudaEvent, CudaEvent)>>,
}

thread_local! {
    static STEP_GAPS: RefCell<StepGaps> = RefCell::new(StepGaps::default());
}

/// A new event recorded on the worker's stream.
fn record(gpu: &Gpu) -> Option<CudaEvent> {
    let event = gpu
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .ok()?;
    event.record(&gpu.stream).ok().map(|()| event)
}

/// Runs `replay` (a graph step's launch) between a begin and an end event, when timing step gaps.
pub fn time_graph_step<T>(gpu: &Gpu, replay: impl FnOnce() -> T) -> T {
    if !step_gaps_enabled() {
        return replay();
    }
    let begin = record(gpu);
    let out = replay();
    let pair = begin.zip(record(gpu));
    STEP_GAPS.with(|g| g.borrow_mut().steps.push(pair));
    out
}

/// Marks GPU work outside a timed graph step (an eager step, the extras after a graph step), so
/// no gap is measured across it.
pub fn break_step_gaps() {
    if step_gaps_enabled() {
        STEP_GAPS.with(|g| g.borrow_mut().steps.push(None));
    }
}

/// Every 256 steps timed on this thread (a worker's runner thread, when serving with
/// `TPSERVE_CUDA_STEP_GAPS=1`), logs [`take_step_gaps`]'s figures.
pub fn log_step_gaps() {
    if !step_gaps_enabled() || STEP_GAPS.with(|g| g.borrow().steps.len()) < 256 {
        return;
    }
    if let Some((idle, busy, n)) = take_step_gaps() {
        tracing::info!(
            gaps = n,
            idle_us = idle * 1e3,
            step_ms = busy,
            "GPU idle between graph steps (TPSERVE_CUDA_STEP_GAPS)"
        );
    }
}

/// Over the steps timed on this thread since the last call, for consecutive graph steps: the
/// mean GPU time from one step's end to the next one's begin (the host's turnaround between
/// them, the GPU idle) and the mean from a step's begin to its end, in milliseconds, with the
/// number of gaps; `None` when there were none.
pub fn take_step_gaps() -> Option<(f64, f64, usize)> {
    let steps = STEP_GAPS.with(|g| std::mem::take(&mut g.borrow_mut().steps));
    let (mut idle, mut busy, mut n) = (0.0, 0.0, 0usize);
    for pair in steps.windows(2) {
        let (Some((_, end)), Some((begin, next_end))) = (&pair[0], &pair[1]) else {
            continue;
        };
        next_end.synchronize().ok()?;
        idle += f64::from(end.elapsed_ms(begin).ok()?);
        busy += f64::from(begin.elapsed_ms(next_end).ok()?);
        n += 1;
    }
    (n > 0).then(|| (idle / n as f64, busy / n as f64, n))
}
