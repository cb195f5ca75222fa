//! A worker's spans of one step, in the traces of the sequences the step computes. The
//! coordinator names, per traced sequence, the span the sequence's work in this step belongs to
//! (`StepPlan.traceparents`); each rank then emits under each of them a `worker_step` span
//! (rank, step id, batch size) with children for the phases it timed: `model_step` (the forward
//! pass and the logits' gather), `sampling`, and with `--collect-detailed-traces model` or `all`
//! each `all_reduce`. The phases are timed once per step and the spans are written afterwards
//! with those timestamps, so a batch of N traced sequences times its work once and reports it N
//! times, each in its own trace.
//!
//! Costs: none when the plan names no trace (the recorder is never armed; [`phase`] then only
//! reads a thread-local flag); otherwise two clock reads per phase and per all-reduce.
//! The phases are recorded on the thread that runs the step (the runner thread); the CUDA
//! backend's forward pass samples on the device, so it reports one `model_step` and no
//! separate sampling or all-reduce spans; its steps are launched without waiting for the device
//! (the tokens are collected later), so its `model_step` is the time to issue the pass.

use std::cell::RefCell;
use std::time::SystemTime;

use opentelemetry::trace::{Span, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use tpserve_proto as pb;
use tpserve_term::telemetry::{self, TraceDetail};

/// A timed part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The forward pass and the gather of the logits.
    ModelStep,
    /// Picking the tokens from the logits.
    Sampling,
    /// One all-reduce between the ranks.
    AllReduce,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Self::ModelStep => "model_step",
            Self::Sampling => "sampling",
            Self::AllReduce => "all_reduce",
        }
    }
}

thread_local! {
    /// The phases of the step being traced on this thread; `None` when none is.
    static RECORDER: RefCell<Option<Vec<(Phase, SystemTime, SystemTime)>>> =
        const { RefCell::new(None) };
}

/// Runs `f`, timing it as `phase` when a traced step is running on this thread.
pub fn phase<R>(phase: Phase, f: impl FnOnce() -> R) -> R {
    let armed = RECORDER.with(|r| r.borrow().is_some());
    if !armed {
        return f();
    }
    let start = SystemTime::now();
    let out = f();
    let end = SystemTime::now();
    RECORDER.with(|r| {
        if let Some(phases) = r.borrow_mut().as_mut() {
            phases.push((phase, start, end));
        }
    });
    out
}

/// One traced step, from [`StepTrace::begin`] to [`StepTrace::end`].
pub struct StepTrace {
    parents: Vec<(u64, Context)>,
    step_id: u64,
    start: SystemTime,
    all_reduces: bool,
}

impl StepTrace {
    /// Arms the recorder for `plan` when it names traces and this worker exports them.
    pub fn begin(plan: &pb::StepPlan) -> Option<Self> {
        if plan.traceparents.is_empty() {
            return None;
        }
        let detail = telemetry::detail()?;
        if detail < TraceDetail::Worker {
            return None;
        }
        let parents = plan
            .traceparents
            .iter()
            .map(|(&id, tp)| (id, telemetry::context_from(tp, None)))
            .filter(|(_, cx)| cx.span().span_context().is_valid())
            .collect::<Vec<_>>();
        if parents.is_empty() {
            return None;
        }
        RECORDER.with(|r| *r.borrow_mut() = Some(Vec::new()));
        Some(Self {
            parents,
            step_id: plan.step_id,
            start: SystemTime::now(),
            all_reduces: detail >= TraceDetail::All,
        })
    }

    /// Disarms the recorder and writes the spans: under each traced sequence's span, this
    /// rank's `worker_step` and its phases.
    pub fn end(self, rank: usize, batch_tokens: usize) {
        let end = SystemTime::now();
        let phases = RECORDER.with(|r| r.borrow_mut().take()).unwrap_or_default();
        let tracer = opentelemetry::global::tracer("tpserve-worker");
        for (sequence_id, parent) in &self.parents {
            let step = tracer
                .span_builder("worker_step")
                .with_start_time(self.start)
                .with_attributes(vec![
                    KeyValue::new("tpserve.rank", rank as i64),
                    KeyValue::new("tpserve.step_id", self.step_id as i64),
                    KeyValue::new("tpserve.sequence_id", *sequence_id as i64),
                    KeyValue::new("tpserve.batch_tokens", batch_tokens as i64),
                ])
                .start_with_context(&tracer, parent);
            let cx = parent.with_span(step);
            for &(phase, start, stop) in &phases {
                if phase == Phase::AllReduce && !self.all_reduces {
                    continue;
                }
                let mut span = tracer
                    .span_builder(phase.name())
                    .with_start_time(start)
                    .with_attributes(vec![KeyValue::new("tpserve.rank", rank as i64)])
                    .start_with_context(&tracer, &cx);
                span.end_with_timestamp(stop);
            }
            cx.span().end_with_timestamp(end);
        }
    }
}

impl Drop for StepTrace {
    /// A step that failed midway leaves the recorder disarmed too.
    fn drop(&mut self) {
        RECORDER.with(|r| r.borrow_mut().take());
    }
}
