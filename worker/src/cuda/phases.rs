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
        if let Ok(event) = gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
            if event.record(&gpu.stream).is_ok() {
                marks.push((name, event));
            }
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
