//! The engine actor: the one task that owns the scheduler, every sequence's output state and
//! the worker group. Each turn it takes the commands that arrived (submits, aborts), asks the
//! scheduler for a plan and sends it to the workers, then awaits the oldest plan's result,
//! applies the sampled tokens, and sends each sequence its events. Nothing else touches this
//! state, so no locks are needed.
//!
//! Async scheduling (vLLM v1's, on by default): up to two plans are in flight. The actor sends
//! step N, schedules and sends N+1 (the scheduler computes N's tokens as placeholders), and only
//! then awaits N's result, applies it, detokenizes and streams, and sends N+2 before awaiting
//! N+1, so scheduling, gRPC, detokenization and HTTP overlap the workers' compute instead of
//! leaving the GPU idle between steps. The cost: a sequence that ends on an end-of-sequence
//! token or a stop string computes one more token, which is dropped. With
//! `EngineConfig::async_scheduling` off, one plan is in flight (send, await, apply, deliver).
//!
//! Liveness: the loop beats its [`Liveness`] heartbeat at every turn, and at least every
//! [`BEAT_INTERVAL`] while idle; a step the workers do not answer stops the beats, which `/live`
//! reports once they have stopped for `EngineConfig::stall_timeout`.
//!
//! When the worker group is lost (a step fails, a result contradicts the scheduler, or the
//! supervisor sees a worker die), the plans in flight are forgotten, every sequence ends with an
//! `Unavailable` error, new ones are refused, and the engine reports itself unhealthy until the
//! supervisor hands it a re-formed group; then it starts over with a fresh scheduler (the
//! workers' request state is gone, so the old block table means nothing).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokenizers::Tokenizer;
use tokio::sync::{mpsc, watch};
use tpserve_proto as pb;

use super::handle::{EngineCommand, EngineHandle};
use super::liveness::{Liveness, BEAT_INTERVAL};
use super::lora_preload::{LoraPreloads, Preloaded};
use super::output::OutputState;
use super::trace::{engine_step, SequenceTrace};
use super::types::{FinishReason, GenerateEvent, TokenLogprobs};
use super::wire::{logprobs_from_proto, plan_to_proto, sampling_to_proto};
use crate::adapters::AdapterInfo;
use crate::error::{EngineError, StructuredError};
use crate::metrics::Metrics;
use crate::scheduler::{Scheduler, SchedulerConfig, SequenceSpec, StepPlan};
use crate::structured::{Advance, Guide};
use crate::workers::{GroupEvent, WorkerGroup};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The scheduler's limits.
    pub scheduler: SchedulerConfig,
    /// Waiting requests beyond which new ones are refused (429).
    pub max_waiting_requests: usize,
    /// Tokens that end a sequence unless it asks to ignore them.
    pub eos_token_ids: Vec<u32>,
    /// Send the next plan while the workers run the current one (two in flight); false: one
    /// plan at a time (`EngineArgs::async_scheduling_on`).
    pub async_scheduling: bool,
    /// How long the loop may go without turning before `/live` reports it stalled
    /// (`--engine-stall-timeout`).
    pub stall_timeout: Duration,
    /// The server embeds (`--task embed`): every request must pool, and none may on a
    /// generate server (the workers run a step's requests all one way).
    pub embed: bool,
    /// Adapters each worker keeps in host memory (`--max-cpu-loras`): the preloads in flight
    /// plus the preloaded adapters whose requests wait in the queue stay below it, less
    /// `max_loras` (the running adapters' share), so a preload never drops an adapter whose
    /// requests are about to run.
    pub max_cpu_loras: usize,
}

/// Live figures the engine publishes after every step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineStatus {
    /// False once the worker group has failed.
    pub healthy: bool,
    /// Why not, when not healthy.
    pub detail: String,
    /// Sequences running.
    pub running: usize,
    /// Sequences waiting.
    pub waiting: usize,
    /// Fraction of KV blocks in use.
    pub kv_cache_usage: f64,
}

/// What the engine keeps about a sequence it runs: where its events go, its output so far, its
/// timings, and what it asked for beyond plain sampling.
struct LiveSequence {
    events: mpsc::UnboundedSender<GenerateEvent>,
    output: OutputState,
    prompt_tokens: u32,
    /// When the engine accepted it.
    arrived: Instant,
    /// When it was first part of a step.
    scheduled: Option<Instant>,
    /// When its latest token came.
    last_token: Option<Instant>,
    /// Prompt tokens found in the prefix cache when it first started.
    cached_tokens: u32,
    /// With prompt log probabilities asked for: one entry per prompt token, filled as the
    /// prefill steps report them (a recomputation after preemption changes nothing), sent with
    /// the first token.
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// Its LoRA adapter (kept until it ends, even if the adapter is unloaded meanwhile).
    adapter: Option<Arc<AdapterInfo>>,
    /// Its spans, when its request is traced.
    trace: Option<SequenceTrace>,
    /// Structured outputs: where its output stands in its grammar (advanced with each token).
    guide: Option<Guide>,
}

/// A plan sent to the workers whose result is not applied yet.
struct InFlight {
    step_id: u64,
    sent: Instant,
    /// Tokens and sequences computed in the step (for the per-step trace line).
    tokens: usize,
    seqs: usize,
    /// The step's span, with detailed traces; it ends when the result is applied.
    _span: Option<tracing::Span>,
}

struct Engine {
    config: EngineConfig,
    scheduler: Scheduler,
    /// `None` while the group is lost.
    group: Option<WorkerGroup>,
    /// Plans sent on `group`, oldest first; empty while the group is lost.
    in_flight: VecDeque<InFlight>,
    /// The supervisor's news about the group.
    group_events: mpsc::UnboundedReceiver<GroupEvent>,
    /// Ticks when a step fails, so the supervisor re-forms the group.
    broken: watch::Sender<u64>,
    tokenizer: Arc<Tokenizer>,
    sequences: HashMap<u64, LiveSequence>,
    commands: mpsc::UnboundedReceiver<EngineCommand>,
    status: watch::Sender<EngineStatus>,
    failure: Option<String>,
    /// Set once the server is shutting down: new sequences are refused.
    draining: bool,
    metrics: Arc<Metrics>,
    /// The loop's heartbeat, read by `/live`.
    liveness: Liveness,
    /// Requests parked until their LoRA adapter is in the workers' host caches.
    lora: LoraPreloads,
}

/// How the engine hears about its worker group: the group it starts with, the supervisor's
/// later news, and where it reports failed steps.
pub struct GroupLink {
    /// The group formed at start.
    pub group: WorkerGroup,
    /// Losses and re-formed groups from the supervisor.
    pub events: mpsc::UnboundedReceiver<GroupEvent>,
    /// Ticked by the engine when a step fails.
    pub broken: watch::Sender<u64>,
}

/// Starts the actor on the current tokio runtime.
pub fn start_engine(
    config: EngineConfig,
    link: GroupLink,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Metrics>,
) -> (EngineHandle, watch::Receiver<EngineStatus>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let liveness = Liveness::new(Instant::now(), config.stall_timeout);
    let (status_tx, status_rx) = watch::channel(EngineStatus {
        healthy: true,
        ..EngineStatus::default()
    });
    let engine = Engine {
        scheduler: Scheduler::new(config.scheduler.clone()),
        group: Some(link.group),
        in_flight: VecDeque::with_capacity(2),
        group_events: link.events,
        broken: link.broken,
        tokenizer,
        sequences: HashMap::new(),
        commands: rx,
        status: status_tx,
        failure: None,
        draining: false,
        metrics,
        liveness: liveness.clone(),
        lora: LoraPreloads::new(
            config
                .max_cpu_loras
                .saturating_sub(config.scheduler.max_loras)
                .max(1),
        ),
        config,
    };
    tokio::spawn(engine.run());
    (EngineHandle::new(tx, liveness), status_rx)
}

/// Mixes a LoRA adapter's id into a prefix-cache salt, so sequences of different adapters (and
/// of an adapter and the base) never share KV blocks.
fn salt_with_adapter(salt: u64, adapter: u32) -> u64 {
    if adapter == 0 {
        salt
    } else {
        salt ^ (u64::from(adapter) | 1 << 32).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

impl Engine {
    async fn run(mut self) {
        let mut supervised = true;
        let depth = if self.config.async_scheduling { 2 } else { 1 };
        loop {
            self.liveness.beat(Instant::now());
            while let Ok(c) = self.commands.try_recv() {
                self.handle(c);
            }
            while let Ok(e) = self.group_events.try_recv() {
                self.on_group_event(e);
            }
            while let Some(done) = self.lora.try_next() {
                self.on_preloaded(done);
            }
            self.start_preloads();
            while self.in_flight.len() < depth && self.send_next().await {}
            if !self.in_flight.is_empty() {
                self.receive_oldest().await;
                self.publish();
                continue;
            }
            // Nothing can run now: wait for a command or news about the group.
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(c) => self.handle(c),
                    None => return,
                },
                event = self.group_events.recv(), if supervised => match event {
                    Some(e) => self.on_group_event(e),
                    None => supervised = false,
                },
                done = self.lora.next() => self.on_preloaded(done),
                // Idle is alive: beat at the top of the loop.
                _ = tokio::time::sleep(BEAT_INTERVAL) => {}
            }
        }
    }

    fn on_group_event(&mut self, event: GroupEvent) {
        match event {
            GroupEvent::Lost { detail } => self.lose_group(detail),
            GroupEvent::Ready(group, ready) => {
                self.lora.forget_group();
                self.group = Some(group);
                self.config.scheduler.num_blocks = ready.num_blocks as usize;
                self.scheduler = Scheduler::new(self.config.scheduler.clone());
                self.failure = None;
                self.publish();
            }
        }
    }

    fn publish(&self) {
        let m = &self.metrics;
        let stats = self.scheduler.stats();
        m.num_requests_running
            .store(self.scheduler.num_running() as u64, Ordering::Relaxed);
        let waiting = self.scheduler.num_waiting() + self.lora.num_parked();
        m.num_requests_waiting
            .store(waiting as u64, Ordering::Relaxed);
        m.set_kv_cache_usage(self.scheduler.kv_cache_usage());
        m.prefix_cache_queries
            .store(stats.prefix_cache_queries, Ordering::Relaxed);
        m.prefix_cache_hits
            .store(stats.prefix_cache_hits, Ordering::Relaxed);
        m.num_preemptions
            .store(stats.num_preemptions, Ordering::Relaxed);
        if self.config.scheduler.max_loras > 0 {
            let names = |ids: Vec<u32>| -> Vec<String> {
                ids.into_iter()
                    .filter_map(|id| {
                        self.sequences.values().find_map(|s| {
                            s.adapter
                                .as_ref()
                                .filter(|a| a.id == id)
                                .map(|a| a.name.clone())
                        })
                    })
                    .collect()
            };
            m.lora.set_info(
                names(self.scheduler.running_adapters()),
                names(self.scheduler.waiting_adapters()),
            );
        }
        self.status.send_replace(EngineStatus {
            healthy: self.failure.is_none(),
            detail: self.failure.clone().unwrap_or_default(),
            running: self.scheduler.num_running(),
            waiting,
            kv_cache_usage: self.scheduler.kv_cache_usage(),
        });
    }

    fn handle(&mut self, command: EngineCommand) {
        match command {
            EngineCommand::Submit {
                id,
                request,
                events,
                accepted,
                span,
            } => {
                if self.draining {
                    let _ = accepted.send(Err(EngineError::Unavailable {
                        detail: "the server is shutting down".into(),
                    }));
                    return;
                }
                if let Some(detail) = &self.failure {
                    let _ = accepted.send(Err(EngineError::Unavailable {
                        detail: detail.clone(),
                    }));
                    return;
                }
                let waiting = self.scheduler.num_waiting() + self.lora.num_parked();
                if waiting >= self.config.max_waiting_requests {
                    let _ = accepted.send(Err(EngineError::QueueFull { waiting }));
                    return;
                }
                if request.extras.pooling.is_some() != self.config.embed {
                    let message = if self.config.embed {
                        "this server embeds (--task embed): it runs embedding requests only"
                    } else {
                        "this server generates: it runs no embedding requests (--task embed)"
                    };
                    let _ = accepted.send(Err(EngineError::InvalidRequest {
                        message: message.into(),
                        param: None,
                    }));
                    return;
                }
                let mut extras = request.extras.clone();
                if extras.min_tokens > 0 {
                    let e = Arc::make_mut(&mut extras);
                    e.min_tokens_stop_ids = request.stop_token_ids.clone();
                    if !request.ignore_eos {
                        e.min_tokens_stop_ids
                            .extend_from_slice(&self.config.eos_token_ids);
                    }
                }
                let adapter = request.adapter.as_ref().map_or(0, |a| a.id);
                let spec = SequenceSpec {
                    id,
                    token_ids: request.prompt_token_ids.clone(),
                    max_tokens: request.max_tokens as usize,
                    sampling: request.sampling,
                    extras: extras.clone(),
                    priority: request.priority,
                    cache_salt: salt_with_adapter(request.cache_salt, adapter),
                    share: request.share,
                    adapter,
                    guided: request.grammar.is_some(),
                };
                // A request of an adapter not yet in the workers' host caches waits for its
                // preload outside the scheduler (checked now, added once the adapter is there).
                let taken = match request.adapter.as_deref() {
                    Some(a) if !self.lora.is_ready(a.id) => self
                        .scheduler
                        .check(&spec)
                        .map(|()| self.lora.park(spec, a)),
                    _ => self.scheduler.add(spec),
                };
                if let Err(e) = taken {
                    let _ = accepted.send(Err(EngineError::from(e)));
                    return;
                }
                self.sequences.insert(
                    id,
                    LiveSequence {
                        events,
                        output: OutputState::new(&request),
                        prompt_tokens: request.prompt_token_ids.len() as u32,
                        arrived: Instant::now(),
                        scheduled: None,
                        last_token: None,
                        cached_tokens: 0,
                        prompt_logprobs: extras
                            .prompt_logprobs
                            .map(|_| vec![None; request.prompt_token_ids.len()]),
                        adapter: request.adapter.clone(),
                        trace: SequenceTrace::start(span, request.prompt_token_ids.len()),
                        guide: request.grammar.as_ref().map(|g| g.start()),
                    },
                );
                if accepted.send(Ok(())).is_err() {
                    // The caller went away before it heard back.
                    self.forget(id);
                    self.sequences.remove(&id);
                }
            }
            EngineCommand::Drain => self.draining = true,
            EngineCommand::AbortAll { detail } => {
                self.end_all(&detail);
                self.publish();
            }
            EngineCommand::Abort { id } => {
                if self.sequences.remove(&id).is_some() {
                    self.forget(id);
                    self.metrics.count_success(FinishReason::Abort);
                    self.publish();
                }
            }
        }
    }

    /// Starts the preloads of parked adapters the workers' host caches have room for.
    fn start_preloads(&mut self) {
        if !self.lora.has_pending() {
            return;
        }
        if let Some(group) = self.group.as_ref().map(WorkerGroup::lora_preloader) {
            let queued = self.scheduler.waiting_adapters().len();
            self.lora.start_pending(&group, queued);
        }
    }

    /// Takes sequence `id` out of the scheduler, or out of the parked requests.
    fn forget(&mut self, id: u64) {
        if !self.lora.abort(id) {
            self.scheduler.abort(id);
        }
    }

    /// A preload ended: its parked requests join the scheduler's queue, or fail with what the
    /// workers said.
    fn on_preloaded(&mut self, done: Preloaded) {
        let Some((adapter, parked)) = self.lora.finish(&done) else {
            return;
        };
        match &done.outcome {
            Ok(seconds) => {
                self.metrics.lora.count_preload(*seconds);
                for spec in parked {
                    let id = spec.id;
                    if !self.sequences.contains_key(&id) {
                        continue;
                    }
                    if let Err(e) = self.scheduler.add(spec) {
                        self.fail_sequence(id, EngineError::from(e));
                    }
                }
            }
            Err(detail) => {
                tracing::warn!(adapter = %adapter.name, "LoRA preload failed: {detail}");
                for spec in parked {
                    self.fail_sequence(
                        spec.id,
                        EngineError::WorkerFailed {
                            detail: format!(
                                "LoRA adapter {:?} could not be read on the workers: {detail}",
                                adapter.name
                            ),
                        },
                    );
                }
            }
        }
        self.publish();
    }

    /// Ends a sequence (not in the scheduler) with `error`.
    fn fail_sequence(&mut self, id: u64, error: EngineError) {
        if let Some(seq) = self.sequences.remove(&id) {
            let _ = seq.events.send(GenerateEvent::Error(error));
        }
    }

    /// Schedules the next plan and sends it to the workers. False when nothing went out: no
    /// group, nothing to compute, or the send failed (then the group is lost).
    async fn send_next(&mut self) -> bool {
        if self.group.is_none() {
            return false;
        }
        let Some(plan) = self.scheduler.schedule() else {
            return false;
        };
        let sent = Instant::now();
        for new in &plan.new {
            if let Some(seq) = self.sequences.get_mut(&new.id) {
                if seq.scheduled.is_none() {
                    seq.scheduled = Some(sent);
                    seq.cached_tokens = new.num_computed_tokens as u32;
                    self.metrics
                        .request_queue_time
                        .observe((sent - seq.arrived).as_secs_f64());
                }
            }
        }
        let token_masks = self.token_masks(&plan);
        let sequences = &self.sequences;
        let mut request = plan_to_proto(&plan, sampling_to_proto, |id| {
            sequences.get(&id).and_then(|s| s.adapter.as_deref())
        });
        request.token_masks = token_masks;
        let span = self.trace_step(&plan, &mut request.traceparents);
        let group = self.group.as_mut().expect("checked above");
        let waiting = self.liveness.wait_on_workers(sent, plan.step_id);
        let sent_ok = group.send(request).await;
        drop(waiting);
        match sent_ok {
            Ok(()) => {
                self.in_flight.push_back(InFlight {
                    step_id: plan.step_id,
                    sent,
                    tokens: plan.num_scheduled_tokens(),
                    seqs: plan.num_seqs(),
                    _span: span,
                });
                true
            }
            Err(e) => {
                self.step_failed(plan.step_id, e.to_string());
                false
            }
        }
    }

    /// The allowed-token masks of the guided sequences `plan` samples. The scheduler plans a
    /// guided sequence only once its previous token is applied, so each guide is up to date. A
    /// guide that fails ends its sequence with an error (the plan's token for it is then
    /// ignored).
    fn token_masks(&mut self, plan: &StepPlan) -> Vec<pb::TokenMask> {
        let mut masks = Vec::new();
        let mut failed = Vec::new();
        for &id in &plan.sampled {
            let Some(guide) = self.sequences.get_mut(&id).and_then(|s| s.guide.as_mut()) else {
                continue;
            };
            let started = Instant::now();
            match guide.mask() {
                Ok(allowed) => masks.push(pb::TokenMask {
                    sequence_id: id,
                    allowed,
                }),
                Err(e) => failed.push((id, e)),
            }
            self.metrics
                .structured_output_mask_time
                .observe(started.elapsed().as_secs_f64());
        }
        for (id, e) in failed {
            self.fail_guided(id, e);
        }
        masks
    }

    /// Ends a guided sequence whose grammar engine failed.
    fn fail_guided(&mut self, id: u64, e: StructuredError) {
        if let Some(seq) = self.sequences.remove(&id) {
            tracing::warn!("sequence {id}: {e}");
            let _ = seq
                .events
                .send(GenerateEvent::Error(EngineError::WorkerFailed {
                    detail: e.to_string(),
                }));
            self.scheduler.abort(id);
        }
    }

    /// With traces: each traced sequence's spans for this step, the workers' `traceparents`,
    /// and the step's own span (detailed traces only).
    fn trace_step(
        &mut self,
        plan: &StepPlan,
        traceparents: &mut HashMap<u64, String>,
    ) -> Option<tracing::Span> {
        if !tpserve_term::telemetry::enabled() {
            return None;
        }
        let entries = plan
            .new
            .iter()
            .map(|n| (n.id, n.num_scheduled_tokens, Some(n.num_computed_tokens)))
            .chain(
                plan.running
                    .iter()
                    .map(|r| (r.id, r.num_scheduled_tokens, None)),
            );
        for (id, tokens, restart_at) in entries {
            let Some(trace) = self.sequences.get_mut(&id).and_then(|s| s.trace.as_mut()) else {
                continue;
            };
            if let Some(tp) = trace.step(plan.step_id, tokens, restart_at) {
                traceparents.insert(id, tp);
            }
        }
        let ids = plan
            .new
            .iter()
            .map(|n| n.id)
            .chain(plan.running.iter().map(|r| r.id));
        let traced = ids.filter_map(|id| self.sequences.get(&id).and_then(|s| s.trace.as_ref()));
        engine_step(plan.step_id, traced)
    }

    /// Awaits the oldest plan's result, applies it to the scheduler and delivers its tokens.
    async fn receive_oldest(&mut self) {
        let (Some(step), Some(group)) = (self.in_flight.pop_front(), self.group.as_mut()) else {
            return; // `in_flight` is emptied whenever the group goes
        };
        let waiting = self.liveness.wait_on_workers(Instant::now(), step.step_id);
        let received = group.receive(step.step_id).await;
        drop(waiting);
        let result = match received {
            Ok(result) => result,
            Err(e) => return self.step_failed(step.step_id, e.to_string()),
        };
        // An embedding request's vector stands for the one token the scheduler expects of
        // its last prefill step (the workers sample none for it).
        let sampled: Vec<(u64, u32)> = result
            .tokens
            .iter()
            .map(|t| (t.sequence_id, t.token_id))
            .chain(result.pooled.iter().map(|p| (p.sequence_id, 0)))
            .collect();
        if let Err(e) = self.scheduler.apply(step.step_id, &sampled) {
            return self.step_failed(step.step_id, format!("scheduler: {e}"));
        }
        self.metrics.lora.count_slots(
            result.lora_slot_loads,
            result.lora_slot_evictions,
            result.lora_disk_loads,
            result.lora_slot_load_seconds,
        );
        self.lora.dropped(&result.lora_host_dropped);
        if tpserve_term::telemetry::enabled() {
            for trace in self.sequences.values_mut().filter_map(|s| s.trace.as_mut()) {
                trace.step_done(step.step_id);
            }
        }
        for chunk in result.prompt_logprobs {
            self.record_prompt_logprobs(chunk);
        }
        for t in result.tokens {
            let logprobs = t.logprobs.map(logprobs_from_proto);
            self.deliver(t.sequence_id, t.token_id, logprobs);
        }
        for p in result.pooled {
            self.deliver_embedding(p.sequence_id, p.values);
        }
        tracing::trace!(
            step = step.step_id,
            tokens = step.tokens,
            seqs = step.seqs,
            elapsed = ?step.sent.elapsed(),
            "step"
        );
    }

    /// A step failed, or its result contradicts the scheduler: the workers' state is no use
    /// any more. The supervisor re-forms the group; until then every sequence ends.
    fn step_failed(&mut self, step_id: u64, detail: String) {
        tracing::error!("step {step_id} failed: {detail}");
        self.broken.send_modify(|n| *n += 1);
        self.lose_group(format!("{detail}; the worker group is re-forming"));
    }

    /// The group is gone: forget the plans in flight on it (their results never come) and end
    /// every sequence with `detail`.
    fn lose_group(&mut self, detail: String) {
        self.lora.forget_group();
        self.group = None;
        self.in_flight.clear();
        self.fail_all(detail);
    }

    /// Keeps the prompt log probabilities a step reported, where none are known yet.
    fn record_prompt_logprobs(&mut self, chunk: pb::PromptLogprobs) {
        let Some(all) = self
            .sequences
            .get_mut(&chunk.sequence_id)
            .and_then(|s| s.prompt_logprobs.as_mut())
        else {
            return; // aborted, or not asked for
        };
        let first = chunk.first_position as usize;
        for (slot, entry) in all.iter_mut().skip(first).zip(chunk.entries) {
            slot.get_or_insert_with(|| logprobs_from_proto(entry));
        }
    }

    fn deliver(&mut self, id: u64, token: u32, logprobs: Option<TokenLogprobs>) {
        let Some(seq) = self.sequences.get_mut(&id) else {
            return; // aborted while the step ran
        };
        let now = Instant::now();
        let m = &self.metrics;
        match seq.last_token {
            None => {
                m.time_to_first_token
                    .observe((now - seq.arrived).as_secs_f64());
                m.prompt_tokens
                    .fetch_add(seq.prompt_tokens as u64, Ordering::Relaxed);
                if let Some(a) = &seq.adapter {
                    m.lora.count_request(&a.name, seq.prompt_tokens as u64);
                }
            }
            Some(prev) => m.inter_token_latency.observe((now - prev).as_secs_f64()),
        }
        if let Some(a) = &seq.adapter {
            m.lora.count_generation_token(&a.name);
        }
        seq.last_token = Some(now);
        m.generation_tokens.fetch_add(1, Ordering::Relaxed);
        let detokenize = seq.trace.as_ref().map(|t| t.detokenize().entered());
        let mut update = seq
            .output
            .push(token, &self.tokenizer, &self.config.eos_token_ids);
        drop(detokenize);
        if let (Some(guide), None) = (seq.guide.as_mut(), update.finished) {
            match guide.advance(token) {
                Ok(Advance::Continue) => {}
                Ok(Advance::Complete) => {
                    // The grammar allows nothing more: the output is complete.
                    update.text.push_str(&seq.output.flush());
                    update.finished = Some(FinishReason::Stop);
                }
                Err(e) => return self.fail_guided(id, e),
            }
        }
        let client_gone = seq
            .events
            .send(GenerateEvent::Delta {
                text: update.text,
                token_ids: vec![token],
                logprobs,
                prompt_logprobs: seq.prompt_logprobs.take(),
            })
            .is_err();
        let mut gone = client_gone;
        if client_gone && update.finished.is_none() {
            // The caller dropped its stream; its abort command may still be on its way.
            m.count_success(FinishReason::Abort);
        }
        if let Some(reason) = update.finished {
            m.count_success(reason);
            m.e2e_request_latency
                .observe((now - seq.arrived).as_secs_f64());
            let completion_tokens = seq.output.num_tokens() as u32;
            if let Some(trace) = seq.trace.take() {
                trace.finish(Some(reason), completion_tokens, seq.cached_tokens);
            }
            let _ = seq.events.send(GenerateEvent::Finished {
                reason,
                prompt_tokens: seq.prompt_tokens,
                completion_tokens,
                cached_tokens: seq.cached_tokens,
                embedding: None,
            });
            gone = true;
        }
        if gone {
            self.sequences.remove(&id);
            self.scheduler.finish(id);
        }
    }

    /// Ends an embedding request with its pooled vector. Counted in the request metrics as a
    /// request that finished (`stop`) with its prompt tokens and no generated ones.
    fn deliver_embedding(&mut self, id: u64, values: Vec<f32>) {
        let Some(seq) = self.sequences.remove(&id) else {
            return; // aborted while the step ran
        };
        self.scheduler.finish(id);
        let now = Instant::now();
        let m = &self.metrics;
        m.prompt_tokens
            .fetch_add(seq.prompt_tokens as u64, Ordering::Relaxed);
        m.count_success(FinishReason::Stop);
        m.e2e_request_latency
            .observe((now - seq.arrived).as_secs_f64());
        if let Some(trace) = seq.trace {
            trace.finish(Some(FinishReason::Stop), 0, seq.cached_tokens);
        }
        let _ = seq.events.send(GenerateEvent::Finished {
            reason: FinishReason::Stop,
            prompt_tokens: seq.prompt_tokens,
            completion_tokens: 0,
            cached_tokens: seq.cached_tokens,
            embedding: Some(values),
        });
    }

    /// The workers and the scheduler no longer agree: end every sequence, refuse new ones until
    /// a new group arrives.
    fn fail_all(&mut self, detail: String) {
        self.end_all(&detail);
        self.failure = Some(detail);
        self.publish();
    }

    /// Ends every sequence with an `Unavailable` error saying `detail`.
    fn end_all(&mut self, detail: &str) {
        self.lora.take_all();
        for (id, seq) in self.sequences.drain() {
            let error = EngineError::Unavailable {
                detail: detail.to_string(),
            };
            let _ = seq.events.send(GenerateEvent::Error(error));
            self.scheduler.abort(id);
        }
    }
}
