//! The continuous-batching scheduler: a pure, synchronous state machine (no I/O, clocks, locks
//! or environment reads) that decides, step by step, which tokens of which sequences the workers
//! compute, and which KV blocks hold them. vLLM v1's rules:
//!
//! - One token budget per step (`max_num_batched_tokens`), at most `max_num_seqs` sequences.
//!   Running sequences go first, in order of admission, each taking min(its unscheduled known
//!   tokens, the budget left): 1 when decoding, the next chunk when prefilling. Then waiting
//!   sequences (FCFS, priority or fair-share order) start with a prefill chunk while budget, sequence slots
//!   and blocks allow; the first one that does not fit stops admission (no overtaking).
//! - Out of blocks for a running sequence: preempt the newest running one (under priority: the
//!   worst (priority, arrival); under fair: of the tenant furthest ahead) by recompute, until it
//!   fits or it is itself the victim. After a preemption, no waiting sequence starts in that
//!   step unless nothing else was scheduled.
//! - Fair share: a waiting sequence held back by a full batch or pool whose tenant is below its
//!   weighted share of the slots preempts the newest running sequence of a tenant above its
//!   share (see `policy`); FCFS and priority never preempt for admission.
//! - Prefix caching: full computed blocks are registered under a hash chain; a starting sequence
//!   reuses its longest cached prefix (capped so at least one token is computed).
//! - LoRA: at most `max_loras` distinct adapters among the running sequences (so among any
//!   step's). A waiting sequence whose adapter would be one too many stops admission like one
//!   that does not fit (no overtaking): the running adapters drain, and it is next, so no
//!   adapter's requests starve; a sequence of an adapter already running is admitted as usual.
//!
//! Step protocol (vLLM v1's async scheduling): `schedule` may be called while one plan is
//! outstanding, so at most two are: the engine sends step N+1 while the workers run step N.
//! `apply` must follow the order of `schedule`. Calling `schedule` with nothing outstanding
//! after every `apply` gives the synchronous protocol (one plan outstanding).
//! - `num_computed` advances at `schedule`. A sequence that a plan samples gets a placeholder
//!   for the token it does not know yet; placeholders count as known tokens, so the next plan
//!   computes that token (a decode of 1): the workers append each token they sample to their
//!   own copy of the sequence, so the plan needs no token id. `apply` turns the oldest
//!   placeholder into the real token.
//! - Limits count placeholders: no plan samples beyond `max_tokens` or `max_model_len`. What
//!   cannot be predicted (an end-of-sequence token, a stop string) is found by the engine after
//!   `apply`; a sequence it finishes may already be in the next outstanding plan, whose token
//!   for it `apply` then ignores, as it ignores every token of a sequence ended since
//!   `schedule`.
//! - Prefix-cache registration happens at `apply`, only for full blocks the applied step (or an
//!   earlier one) computed; a block holding a placeholder is never registered, since a step's
//!   tokens are all real once the plans before it are applied.
//! - Preemption with a plan in flight: the victim's blocks go back to the pool at once (the
//!   workers run plans in order, so the in-flight writes land before any later plan reuses
//!   the blocks) and nothing the in-flight plan computed for it is registered. A token that
//!   plan samples for it is still accepted at `apply` (it is a valid token), and a waiting
//!   sequence with a pending placeholder is not admitted (it blocks admission, FCFS-like,
//!   until that `apply`), so a `NewSequence` carries only real tokens.
//!
//! - A guided sequence (structured outputs: the engine computes its next token's allowed set
//!   from its last token) is skipped while it holds a placeholder, so every plan that samples it
//!   comes after its previous token was applied; it decodes every other step while two plans
//!   are in flight, and the others are unaffected.
//!
//! Workers keep per-sequence state, so a plan carries diffs (see `plan`).
//!
//! Frees ride on plans: `abort`, `finish` and preemption queue the id of a sequence the workers
//! know, and the next plan `schedule` returns carries it in `freed`. `schedule` returns `None`
//! when there is nothing to compute, even if frees are pending: they wait for the next plan
//! (workers only hold a little per-sequence metadata; the KV blocks themselves are reusable at
//! once, since the coordinator owns the block table). An id may be reused once its sequence
//! ended; each outstanding plan remembers the arrivals it saw, so it never mistakes the new
//! sequence for the old one.
//!
//! Invariants (checked by `check_invariants` in tests): each block is free or held, with a
//! refcount equal to the number of live block tables containing it; every live sequence is in
//! exactly one of the waiting queue and the running list; no sequence is ever dropped except by
//! `abort` or `finish`; each placeholder belongs to an outstanding plan that samples the
//! sequence; registered blocks hold only real tokens computed by applied steps.
//!
//! Costs per step: O(running + admitted) hash-map lookups and block operations, plus one copy
//! of the tokens of each newly sent sequence; no per-token allocation for decoding sequences
//! except the plan's own vectors (and the outstanding plan's list of scheduled ids).

pub mod block_pool;
pub mod config;
pub mod error;
pub mod hash;
mod invariants;
pub mod plan;
mod policy;
pub mod sequence;

#[cfg(test)]
mod fair_tests;
#[cfg(test)]
mod pipelined_tests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};

pub use block_pool::BlockPool;
pub use config::{SchedulerConfig, SchedulingPolicy};
pub use error::{SchedulerError, SchedulerResult};
pub use plan::{NewSequence, RunningSequence, StepPlan};
pub use sequence::{SequenceSpec, Share};

use hash::U64HashState;
use policy::WaitingQueue;
use sequence::{SeqStatus, Sequence};

/// Monotonic counters for metrics (`vllm:prefix_cache_queries`, `vllm:prefix_cache_hits`,
/// `vllm:num_preemptions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tokens of starting sequences looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Of those, tokens found (their KV was reused).
    pub prefix_cache_hits: u64,
    /// Sequences preempted (by recompute) since start.
    pub num_preemptions: u64,
}

/// Most plans outstanding at once: the one the workers run and the one queued behind it.
const MAX_OUTSTANDING: usize = 2;

/// A plan the workers are running or will run next: what `apply` must match and advance.
#[derive(Debug)]
struct Outstanding {
    step_id: u64,
    /// The sequences the plan computes and which token positions (preemption removes the
    /// victim's entry: its blocks are gone).
    scheduled: Vec<ScheduledSeq>,
    /// Sampled sequences still alive (abort/finish between schedule and apply decrement it).
    sampled_alive: usize,
    /// Sequences with `arrival >= this` were added after the plan: never in it.
    arrival_watermark: u64,
}

/// One sequence's part of an outstanding plan: it writes the KV of positions `start..end`.
#[derive(Debug, Clone, Copy)]
struct ScheduledSeq {
    id: u64,
    start: usize,
    end: usize,
}

/// The scheduler. See the module header for its rules.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<u64, Sequence, U64HashState>,
    /// Running ids in order of admission.
    running: Vec<u64>,
    waiting: WaitingQueue,
    /// Ids the workers must drop; taken by the next plan.
    pending_frees: Vec<u64>,
    next_step_id: u64,
    next_arrival: u64,
    /// Plans scheduled and not yet applied, oldest first (at most `MAX_OUTSTANDING`).
    outstanding: VecDeque<Outstanding>,
    stats: SchedulerStats,
    /// Reused buffer for prefix-cache hits of a starting sequence.
    scratch_hits: Vec<u32>,
}

impl Scheduler {
    /// A scheduler with an empty pool of `config.num_blocks` blocks.
    ///
    /// Panics if a size in `config` is zero; run `config.validate()` first for a typed error
    /// (it also checks that the pool holds one `max_model_len` sequence, which `new` does not
    /// demand: `add` refuses any single request the pool cannot hold).
    pub fn new(config: SchedulerConfig) -> Self {
        if let Err(e) = config.check_nonzero() {
            panic!("{e}");
        }
        Self {
            pool: BlockPool::new(config.num_blocks),
            waiting: WaitingQueue::new(config.policy),
            seqs: HashMap::with_capacity_and_hasher(config.max_num_seqs * 2, U64HashState),
            running: Vec::with_capacity(config.max_num_seqs),
            pending_frees: Vec::new(),
            next_step_id: 0,
            next_arrival: 0,
            outstanding: VecDeque::with_capacity(MAX_OUTSTANDING),
            stats: SchedulerStats::default(),
            scratch_hits: Vec::new(),
            config,
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a sequence. Refuses one that can never run: an empty prompt, `max_tokens` 0, a
    /// prompt longer than `max_model_len`, more tokens than the whole pool holds (counting the
    /// tokens it may generate, up to `max_model_len`), or an id already live.
    pub fn add(&mut self, spec: SequenceSpec) -> SchedulerResult<()> {
        self.check(&spec)?;
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let seq = Sequence::new(spec, arrival);
        self.waiting.push_arrival(seq.wait_key());
        self.seqs.insert(seq.id, seq);
        Ok(())
    }

    /// The checks of [`Scheduler::add`], without adding: whether `spec` would be taken now.
    pub fn check(&self, spec: &SequenceSpec) -> SchedulerResult<()> {
        let cfg = &self.config;
        let prompt = spec.token_ids.len();
        if self.seqs.contains_key(&spec.id) {
            return Err(SchedulerError::DuplicateId { id: spec.id });
        }
        if prompt == 0 {
            return Err(SchedulerError::EmptyPrompt { id: spec.id });
        }
        if spec.max_tokens == 0 {
            return Err(SchedulerError::ZeroMaxTokens { id: spec.id });
        }
        if prompt > cfg.max_model_len {
            return Err(SchedulerError::PromptTooLong {
                prompt_tokens: prompt,
                max_model_len: cfg.max_model_len,
            });
        }
        // Most tokens it can ever have computed: the last sampled token is never computed.
        let tokens = (prompt + spec.max_tokens.min(cfg.max_model_len) - 1).min(cfg.max_model_len);
        let blocks_needed = cfg.blocks_for(tokens);
        if blocks_needed > cfg.num_blocks {
            return Err(SchedulerError::ExceedsKvCache {
                tokens,
                blocks_needed,
                block_size: cfg.block_size,
                num_blocks: cfg.num_blocks,
            });
        }
        Ok(())
    }

    /// Stops a waiting or running sequence and frees its blocks; if the workers hold it, its id
    /// rides on the next plan's `freed`. False if no such live sequence. Safe with plans
    /// outstanding: `apply` then ignores the sequence's tokens.
    pub fn abort(&mut self, id: u64) -> bool {
        self.remove(id)
    }

    /// The engine decided the sequence is done (end of sequence, stop string, `max_tokens`,
    /// `max_model_len`). Frees exactly as `abort` does.
    pub fn finish(&mut self, id: u64) -> bool {
        self.remove(id)
    }

    /// Plans the next step, or `None` when nothing can be computed (pending frees then wait for
    /// the next plan). May be called with one plan outstanding (see the module header); panics
    /// with two, a misuse of the step protocol.
    pub fn schedule(&mut self) -> Option<StepPlan> {
        if self.outstanding.len() >= MAX_OUTSTANDING {
            panic!(
                "schedule() while steps {} and {} are outstanding: apply the older first",
                self.outstanding[0].step_id, self.outstanding[1].step_id
            );
        }
        let mut plan = StepPlan {
            step_id: self.next_step_id,
            running: Vec::with_capacity(self.running.len()),
            ..StepPlan::default()
        };
        let mut budget = self.config.max_num_batched_tokens;
        let preempted = self.schedule_running(&mut plan, &mut budget);
        if !preempted || plan.running.is_empty() {
            self.schedule_waiting(&mut plan, &mut budget);
        }
        if plan.new.is_empty() && plan.running.is_empty() {
            return None;
        }
        plan.freed = std::mem::take(&mut self.pending_frees);

        let mut scheduled = Vec::with_capacity(plan.num_seqs());
        for n in &plan.new {
            scheduled.push(ScheduledSeq {
                id: n.id,
                start: n.num_computed_tokens,
                end: n.num_computed_tokens + n.num_scheduled_tokens,
            });
        }
        for r in &plan.running {
            let end = self.seqs[&r.id].num_computed;
            scheduled.push(ScheduledSeq {
                id: r.id,
                start: end - r.num_scheduled_tokens,
                end,
            });
        }
        for s in &scheduled {
            if self.seqs[&s.id].pending_samples.back() == Some(&plan.step_id) {
                plan.sampled.push(s.id);
            }
        }
        self.outstanding.push_back(Outstanding {
            step_id: plan.step_id,
            scheduled,
            sampled_alive: plan.sampled.len(),
            arrival_watermark: self.next_arrival,
        });
        self.next_step_id += 1;
        Some(plan)
    }

    /// Applies the outcome of step `step_id`, the oldest outstanding plan: newly full blocks it
    /// computed enter the prefix cache, and each sampled token replaces its sequence's oldest
    /// placeholder. Tokens of sequences aborted or finished since `schedule` are ignored.
    /// Errors (changing nothing) on a step out of order, a token for a sequence the plan did not
    /// sample (or two for one), or a missing token.
    pub fn apply(&mut self, step_id: u64, sampled: &[(u64, u32)]) -> SchedulerResult<()> {
        let out = match self.outstanding.front() {
            None => return Err(SchedulerError::NoPlanOutstanding { got: step_id }),
            Some(out) if out.step_id != step_id => {
                return Err(SchedulerError::StepMismatch {
                    expected: out.step_id,
                    got: step_id,
                })
            }
            Some(out) => out,
        };
        let mut received = 0;
        let mut bad = None;
        for &(id, _) in sampled {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue; // ended between schedule and apply
            };
            if seq.arrival >= out.arrival_watermark {
                continue; // the id was reused after the plan: that sequence was not in it
            }
            if seq.pending_samples.front() != Some(&step_id) || seq.sample_received {
                bad = Some(SchedulerError::UnexpectedSample { step_id, id });
                break;
            }
            seq.sample_received = true;
            received += 1;
        }
        if bad.is_none() && received != out.sampled_alive {
            bad = Some(SchedulerError::MissingSamples {
                step_id,
                expected: out.sampled_alive,
                got: received,
            });
        }
        if let Some(err) = bad {
            for &(id, _) in sampled {
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.sample_received = false;
                }
            }
            return Err(err);
        }

        let out = self.outstanding.pop_front().expect("checked above");
        if self.config.enable_prefix_caching {
            let bs = self.config.block_size;
            for s in &out.scheduled {
                let Some(seq) = self.seqs.get_mut(&s.id) else {
                    continue;
                };
                if seq.arrival >= out.arrival_watermark {
                    continue;
                }
                // The plans before this one are applied, so every token up to `end` is real.
                let full = s.end / bs;
                if full > seq.num_registered_blocks {
                    seq.ensure_block_hashes(full, bs);
                    for j in seq.num_registered_blocks..full {
                        self.pool.register(seq.block_table[j], seq.block_hashes[j]);
                    }
                    seq.num_registered_blocks = full;
                }
            }
        }
        for &(id, token) in sampled {
            if let Some(seq) = self.seqs.get_mut(&id) {
                if seq.sample_received {
                    seq.sample_received = false;
                    seq.pending_samples.pop_front();
                    seq.token_ids.push(token);
                }
            }
        }
        Ok(())
    }

    /// Sequences waiting to start (including preempted ones).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences admitted and holding blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Fraction of KV blocks held by sequences, 0..=1 (free blocks that still cache a prefix
    /// count as free, as in vLLM's `kv_cache_usage_perc`).
    pub fn kv_cache_usage(&self) -> f64 {
        self.pool.num_used() as f64 / self.pool.num_blocks() as f64
    }

    /// Monotonic counters.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Tokens generated so far by a live sequence (kept across preemption).
    pub fn output_token_ids(&self, id: u64) -> Option<&[u32]> {
        self.seqs.get(&id).map(Sequence::output)
    }

    /// The pool, read-only (for metrics and tests).
    pub fn block_pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Running sequences first. Returns whether any sequence was preempted.
    fn schedule_running(&mut self, plan: &mut StepPlan, budget: &mut usize) -> bool {
        let max_model_len = self.config.max_model_len;
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && *budget > 0 {
            let id = self.running[i];
            let seq = &self.seqs[&id];
            let awaits_token = seq.guided && !seq.pending_samples.is_empty();
            if seq.is_at_limit(max_model_len) || seq.num_uncomputed() == 0 || awaits_token {
                i += 1;
                continue;
            }
            let n = seq.num_uncomputed().min(*budget);
            let needed = self
                .config
                .blocks_for(seq.num_computed + n)
                .saturating_sub(seq.block_table.len());
            let mut self_preempted = false;
            while self.pool.num_free() < needed {
                let victim = self.pick_victim(i);
                self.preempt(victim, plan, budget);
                preempted = true;
                if victim == i {
                    self_preempted = true;
                    break;
                }
                if victim < i {
                    i -= 1;
                }
            }
            if self_preempted {
                continue; // running[i] is now the next sequence
            }
            let seq = self.seqs.get_mut(&id).expect("running ids are live");
            let mut new_block_ids = Vec::with_capacity(needed);
            for _ in 0..needed {
                let b = self.pool.allocate().expect("checked free count");
                seq.block_table.push(b);
                new_block_ids.push(b);
            }
            seq.num_computed += n;
            if seq.num_computed == seq.num_tokens() {
                seq.pending_samples.push_back(plan.step_id);
            }
            let share = seq.share;
            plan.running.push(RunningSequence {
                id,
                num_scheduled_tokens: n,
                new_block_ids,
            });
            self.waiting.charge(share, n);
            *budget -= n;
            i += 1;
        }
        preempted
    }

    /// The running sequence to preempt while scheduling `running[current]`: the newest (FCFS)
    /// or the worst (priority, arrival) (priority policy), among those not idle at their limit.
    /// `current` itself is always a candidate, so there is one.
    fn pick_victim(&self, current: usize) -> usize {
        let max_model_len = self.config.max_model_len;
        let mut candidates = self
            .running
            .iter()
            .enumerate()
            .filter(|&(i, id)| i == current || !self.seqs[id].is_at_limit(max_model_len));
        match self.config.policy {
            SchedulingPolicy::Fcfs => candidates.next_back().map(|(i, _)| i),
            SchedulingPolicy::Priority => candidates
                .max_by_key(|&(_, id)| {
                    let s = &self.seqs[id];
                    (s.priority, s.arrival)
                })
                .map(|(i, _)| i),
            // The tenant furthest ahead gives back first; within it, the newest.
            SchedulingPolicy::Fair => candidates
                .max_by(|&(_, a), &(_, b)| {
                    let (a, b) = (&self.seqs[a], &self.seqs[b]);
                    let counter = |s: &Sequence| self.waiting.counter(s.share.tenant);
                    counter(a)
                        .total_cmp(&counter(b))
                        .then(a.arrival.cmp(&b.arrival))
                })
                .map(|(i, _)| i),
        }
        .expect("the current sequence is a candidate")
    }

    /// Preempts `running[idx]` by recompute: its blocks go back to the pool, it forgets its
    /// computed tokens (keeping its generated ones and its placeholders) and waits at the front.
    /// If it was already scheduled in this plan, that is undone and its budget refunded; what
    /// outstanding plans compute for it is never registered (see the module header).
    fn preempt(&mut self, idx: usize, plan: &mut StepPlan, budget: &mut usize) {
        let id = self.running.remove(idx);
        let seq = self.seqs.get_mut(&id).expect("running ids are live");
        if let Some(pos) = plan.running.iter().position(|r| r.id == id) {
            *budget += plan.running.remove(pos).num_scheduled_tokens;
            if seq.pending_samples.back() == Some(&plan.step_id) {
                seq.pending_samples.pop_back();
            }
        }
        for out in &mut self.outstanding {
            out.scheduled.retain(|s| s.id != id);
        }
        for &b in seq.block_table.iter().rev() {
            self.pool.release(b);
        }
        seq.block_table.clear();
        seq.num_computed = 0;
        seq.num_registered_blocks = 0;
        seq.status = SeqStatus::Waiting;
        if seq.known_to_workers {
            seq.known_to_workers = false;
            self.pending_frees.push(id);
        }
        self.waiting.stopped(seq.share);
        self.waiting.push_preempted(seq.wait_key());
        self.stats.num_preemptions += 1;
    }

    /// Waiting sequences start while budget, sequence slots and blocks allow. Under the fair
    /// policy, a sequence held back by a full batch or pool may preempt a running sequence of
    /// a tenant above its share (see `preempt_for_share`).
    fn schedule_waiting(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        let bs = self.config.block_size;
        while *budget > 0 {
            let Some(id) = self.waiting.peek() else {
                break;
            };
            if !self.adapter_fits(self.seqs[&id].adapter) {
                break; // it waits for a running adapter to drain; nothing overtakes it
            }
            if !self.seqs[&id].pending_samples.is_empty() {
                // Preempted with a token still being sampled: it starts again once that token
                // is known, so `NewSequence` carries only real tokens. Nothing overtakes it.
                break;
            }
            if self.running.len() >= self.config.max_num_seqs {
                if self.preempt_for_share(id, plan, budget) {
                    continue;
                }
                break;
            }
            let seq = self.seqs.get_mut(&id).expect("waiting ids are live");
            let num_tokens = seq.num_tokens();
            let hits = &mut self.scratch_hits;
            hits.clear();
            let every_position = seq.extras.prompt_logprobs.is_some()
                || seq.extras.pooling.is_some_and(|p| p.needs_every_position());
            if self.config.enable_prefix_caching && !every_position {
                // Never the whole sequence: at least one token is computed, so it can sample.
                let max_hit_blocks = (num_tokens - 1) / bs;
                seq.ensure_block_hashes(max_hit_blocks, bs);
                for &h in &seq.block_hashes[..max_hit_blocks] {
                    match self.pool.lookup(h) {
                        Some(b) => hits.push(b),
                        None => break,
                    }
                }
            }
            let hit_tokens = hits.len() * bs;
            let n = (num_tokens - hit_tokens).min(*budget);
            let needed = self.config.blocks_for(hit_tokens + n) - hits.len();
            let free_hits = hits.iter().filter(|&&b| self.pool.refcount(b) == 0).count();
            if self.pool.num_free() < needed + free_hits {
                if self.preempt_for_share(id, plan, budget) {
                    continue;
                }
                break; // it waits; nothing behind it overtakes
            }
            let seq = self.seqs.get_mut(&id).expect("waiting ids are live");
            let hits = &self.scratch_hits;
            self.waiting.pop();
            if self.config.enable_prefix_caching {
                self.stats.prefix_cache_queries += num_tokens as u64;
                self.stats.prefix_cache_hits += hit_tokens as u64;
            }
            for &b in hits.iter() {
                self.pool.acquire(b);
            }
            seq.block_table.extend_from_slice(hits);
            for _ in 0..needed {
                let b = self.pool.allocate().expect("checked free count");
                seq.block_table.push(b);
            }
            seq.num_computed = hit_tokens + n;
            seq.num_registered_blocks = hits.len();
            seq.status = SeqStatus::Running;
            seq.known_to_workers = true;
            if seq.num_computed == num_tokens {
                seq.pending_samples.push_back(plan.step_id);
            }
            plan.new.push(NewSequence {
                id,
                token_ids: seq.token_ids.clone(),
                num_prompt_tokens: seq.prompt_len,
                sampling: seq.sampling,
                extras: seq.extras.clone(),
                block_ids: seq.block_table.clone(),
                num_computed_tokens: hit_tokens,
                num_scheduled_tokens: n,
                adapter: seq.adapter,
            });
            self.waiting.charge(seq.share, n);
            self.waiting.started(seq.share);
            self.running.push(id);
            *budget -= n;
        }
    }

    /// Fair policy: waiting sequence `id` cannot start for want of a slot or blocks; if its
    /// tenant is below its share and another is above (`WaitingQueue::preemption_victim`),
    /// preempts that tenant's newest running sequence (the least work lost), neither one that
    /// has produced all it may (it is about to free its slot) nor one this plan starts. Returns
    /// whether it preempted; the caller then tries `id` again. Each call lowers the victim
    /// tenant's running count toward its share, so a step preempts at most `max_num_seqs`.
    fn preempt_for_share(&mut self, id: u64, plan: &mut StepPlan, budget: &mut usize) -> bool {
        let tenant = self.seqs[&id].share.tenant;
        let Some(victim) = self
            .waiting
            .preemption_victim(tenant, self.config.max_num_seqs)
        else {
            return false;
        };
        let max_model_len = self.config.max_model_len;
        let idx = self.running.iter().rposition(|r| {
            let s = &self.seqs[r];
            s.share.tenant == victim
                && !s.is_at_limit(max_model_len)
                && !plan.new.iter().any(|n| n.id == *r)
        });
        match idx {
            Some(idx) => {
                self.preempt(idx, plan, budget);
                true
            }
            None => false,
        }
    }

    /// Whether a sequence of `adapter` may start now without more than `max_loras` distinct
    /// adapters running.
    fn adapter_fits(&self, adapter: u32) -> bool {
        let limit = self.config.max_loras;
        if adapter == 0 || limit == 0 {
            return true;
        }
        let mut running: Vec<u32> = Vec::with_capacity(limit + 1);
        for id in &self.running {
            let a = self.seqs[id].adapter;
            if a == adapter {
                return true;
            }
            if a != 0 && !running.contains(&a) {
                running.push(a);
            }
        }
        running.len() < limit
    }

    /// Distinct adapters among the running sequences (0, the base model, left out).
    pub fn running_adapters(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for id in &self.running {
            let a = self.seqs[id].adapter;
            if a != 0 && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    /// Distinct adapters among the waiting sequences (0 left out).
    pub fn waiting_adapters(&self) -> Vec<u32> {
        let mut out: Vec<u32> = Vec::new();
        for id in self.waiting.ids() {
            let a = self.seqs[&id].adapter;
            if a != 0 && !out.contains(&a) {
                out.push(a);
            }
        }
        out
    }

    fn remove(&mut self, id: u64) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        match seq.status {
            SeqStatus::Waiting => {
                let removed = self.waiting.remove(seq.wait_key());
                debug_assert!(removed);
            }
            SeqStatus::Running => {
                let pos = self.running.iter().position(|&r| r == id);
                self.running
                    .remove(pos.expect("running sequence is listed"));
                self.waiting.stopped(seq.share);
            }
        }
        // Tail blocks first, so under LRU they are evicted before the shared prefix.
        for &b in seq.block_table.iter().rev() {
            self.pool.release(b);
        }
        if seq.known_to_workers {
            self.pending_frees.push(id);
        }
        for step_id in &seq.pending_samples {
            let out = self.outstanding.iter_mut().find(|o| o.step_id == *step_id);
            out.expect("a placeholder belongs to an outstanding plan")
                .sampled_alive -= 1;
        }
        true
    }
}
