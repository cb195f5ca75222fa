//! A request's spans inside the engine, under the request span the API opened: `queue` (from
//! admission to its first step), one `prefill_chunk` per step that computes prompt tokens,
//! `decode` (from its first generated token to its end) and, with detailed traces, one
//! `detokenize` per token; at the end the request span gets the usage and finish reason.
//! With `--collect-detailed-traces worker` or more, each step also gets an `engine_step` span
//! linked to the requests it carries, and the workers get, per traced request, the
//! `traceparent` of the span its work in that step belongs to.
//!
//! Costs: nothing unless traces are exported and the request was sampled ([`SequenceTrace::start`]
//! answers `None` and no span is made); then a few spans per request and one per prefill chunk
//! (and per token with detailed traces).

use std::collections::VecDeque;

use opentelemetry::trace::TraceContextExt;
use tpserve_term::telemetry::{self, TraceDetail};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::types::FinishReason;

/// Whether per-step spans (coordinator steps, worker steps) are collected.
pub fn detailed() -> bool {
    telemetry::detail().is_some_and(|d| d >= TraceDetail::Worker)
}

/// The spans of one traced sequence.
#[derive(Debug)]
pub struct SequenceTrace {
    request: Span,
    queue: Option<Span>,
    /// Prefill chunks in flight, by step.
    chunks: VecDeque<(u64, Span)>,
    decode: Option<Span>,
    /// Tokens computed once the steps sent so far have run.
    computed: usize,
    prompt_tokens: usize,
}

impl SequenceTrace {
    /// The trace of a sequence submitted under `request` (the API's request span); `None`
    /// when traces are off or the request is not sampled.
    pub fn start(request: Span, prompt_tokens: usize) -> Option<Self> {
        if !telemetry::enabled() || request.is_disabled() {
            return None;
        }
        if !request.context().span().span_context().is_sampled() {
            return None;
        }
        let queue = tracing::info_span!(parent: &request, "queue");
        Some(Self {
            request,
            queue: Some(queue),
            chunks: VecDeque::new(),
            decode: None,
            computed: 0,
            prompt_tokens,
        })
    }

    /// The request span, for links from engine steps.
    pub fn request(&self) -> &Span {
        &self.request
    }

    /// The sequence is in step `step_id` with `tokens` tokens; `restart_at` is set when it
    /// (re)joins the batch with that many tokens already computed (the prefix cache, or a
    /// restart after preemption). Returns the `traceparent` for the workers' spans of this step
    /// when detailed traces are on.
    pub fn step(
        &mut self,
        step_id: u64,
        tokens: usize,
        restart_at: Option<usize>,
    ) -> Option<String> {
        self.queue = None;
        if let Some(at) = restart_at {
            self.computed = at;
        }
        let start = self.computed;
        self.computed += tokens;
        let span = if start < self.prompt_tokens {
            let chunk = tracing::info_span!(
                parent: &self.request,
                "prefill_chunk",
                step_id,
                first_token = start,
                tokens = tokens.min(self.prompt_tokens - start),
            );
            self.chunks.push_back((step_id, chunk.clone()));
            chunk
        } else {
            self.decode
                .get_or_insert_with(|| tracing::info_span!(parent: &self.request, "decode"))
                .clone()
        };
        detailed()
            .then(|| telemetry::traceparent(&span.context()))
            .flatten()
    }

    /// Step `step_id`'s result has come: its prefill chunk (if any) ends.
    pub fn step_done(&mut self, step_id: u64) {
        while self.chunks.front().is_some_and(|(s, _)| *s <= step_id) {
            self.chunks.pop_front();
        }
    }

    /// A span around one token's detokenization (a disabled one without detailed traces).
    pub fn detokenize(&self) -> Span {
        if detailed() {
            tracing::info_span!(parent: &self.request, "detokenize")
        } else {
            Span::none()
        }
    }

    /// The sequence ended: the request span gets its figures (OpenTelemetry's gen_ai names).
    pub fn finish(self, reason: Option<FinishReason>, completion_tokens: u32, cached_tokens: u32) {
        let r = &self.request;
        r.set_attribute("gen_ai.usage.prompt_tokens", self.prompt_tokens as i64);
        r.set_attribute(
            "gen_ai.usage.completion_tokens",
            i64::from(completion_tokens),
        );
        r.set_attribute("gen_ai.usage.cached_tokens", i64::from(cached_tokens));
        let reason = match reason {
            Some(FinishReason::Stop) => "stop",
            Some(FinishReason::Length) => "length",
            Some(FinishReason::Abort) | None => "abort",
        };
        r.set_attribute("gen_ai.response.finish_reasons", reason);
    }
}

/// The span of one engine step carrying `traced` requests, linked to each; `None` without
/// detailed traces or traced requests.
pub fn engine_step<'a>(
    step_id: u64,
    traced: impl Iterator<Item = &'a SequenceTrace>,
) -> Option<Span> {
    if !detailed() {
        return None;
    }
    let mut traced = traced.peekable();
    traced.peek()?;
    let span = tracing::info_span!(parent: None, "engine_step", step_id);
    for t in traced {
        span.add_link(t.request.context().span().span_context().clone());
    }
    Some(span)
}
