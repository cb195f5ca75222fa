//! Property tests: a random engine drives the scheduler (arrivals, ids reused after their
//! sequence ended, aborts, finishes, random sampled tokens, a small pool that forces
//! preemption) with up to one or two plans outstanding, scheduling and applying in random
//! interleavings, while a mirror of the workers runs every plan as soon as it is scheduled, as
//! a real worker may. After every operation the block accounting must hold; every plan must
//! respect the budget, the limits and the diff protocol; the prefix cache must hold only
//! blocks of real tokens computed by applied steps; at the end every sequence has ended and the
//! pool is whole.

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;

use super::hash::{block_hash, ROOT_HASH};
use super::*;
use crate::sampling::Sampling;

#[derive(Debug, Clone)]
enum Op {
    Add {
        prompt: Vec<u32>,
        max_tokens: usize,
        priority: i32,
        salt: u64,
        /// Reuse the id of the sequence that ended last, if it is free.
        reuse_id: bool,
    },
    Abort(usize),
    Finish(usize),
    /// Schedule one plan if fewer than the driver's depth are outstanding; the workers run it.
    Schedule {
        token_seed: u32,
    },
    /// Apply the oldest outstanding plan's result; the engine finishes sequences at a limit.
    Apply,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            // A 4-letter alphabet makes equal blocks (prefix hits) common.
            prop::collection::vec(0u32..4, 1..40),
            1usize..24,
            0i32..3,
            0u64..2,
            prop::bool::weighted(0.2),
        )
            .prop_map(|(prompt, max_tokens, priority, salt, reuse_id)| Op::Add {
                prompt,
                max_tokens,
                priority,
                salt,
                reuse_id,
            }),
        1 => any::<usize>().prop_map(Op::Abort),
        1 => any::<usize>().prop_map(Op::Finish),
        4 => any::<u32>().prop_map(|token_seed| Op::Schedule { token_seed }),
        4 => Just(Op::Apply),
    ]
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        prop_oneof![Just(1usize), Just(2), Just(4)],
        6usize..40,
        1usize..6,
        1usize..40,
        any::<bool>(),
        (any::<bool>(), 0usize..3),
    )
        .prop_map(
            |(block_size, num_blocks, max_num_seqs, budget, caching, (priority, max_loras))| {
                SchedulerConfig {
                    block_size,
                    num_blocks,
                    max_num_seqs,
                    max_num_batched_tokens: budget,
                    max_model_len: (block_size * num_blocks).min(48),
                    enable_prefix_caching: caching,
                    policy: if priority {
                        SchedulingPolicy::Priority
                    } else {
                        SchedulingPolicy::Fcfs
                    },
                    max_loras,
                }
            },
        )
}

/// Plans the engine keeps outstanding: 1 is the synchronous protocol, 2 async scheduling.
fn depth() -> impl Strategy<Value = usize> {
    prop_oneof![1 => Just(1usize), 3 => Just(2usize)]
}

/// What one worker holds for a sequence, updated only from plans.
#[derive(Debug, Clone)]
struct WorkerSeq {
    tokens: Vec<u32>,
    computed: usize,
    blocks: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    salt: u64,
    /// Tokens computed by steps the scheduler has applied.
    applied: usize,
    /// (step, computed after it) of each step run and not yet applied, oldest first.
    unapplied: VecDeque<(u64, usize)>,
}

/// A request as the driver added it.
#[derive(Debug, Clone, Copy)]
struct Request {
    prompt_len: usize,
    max_tokens: usize,
    salt: u64,
}

/// Counts of the paths the random traffic reached, so the tests cannot pass vacuously.
#[derive(Debug, Default)]
struct Coverage {
    /// Aborts or finishes of a sequence some outstanding plan computes, with two outstanding.
    ends_with_two_outstanding: usize,
    /// Preemptions of a sequence whose token an outstanding plan still samples.
    preempted_with_sample_in_flight: usize,
    /// Ids reused while an outstanding plan still names the old sequence.
    reused_ids_in_flight: usize,
    /// Sampled tokens `apply` had to ignore (their sequence ended after `schedule`).
    ignored_tokens: usize,
    /// Steps applied while a later plan was outstanding.
    lagging_applies: usize,
}

/// The random engine plus the worker mirror.
struct Driver {
    s: Scheduler,
    cfg: SchedulerConfig,
    depth: usize,
    workers: HashMap<u64, WorkerSeq>,
    /// Results the workers produced and the engine has not applied, oldest first.
    results: VecDeque<(u64, Vec<(u64, u32)>)>,
    /// Live ids in order of addition (indexes for Abort/Finish ops).
    live: Vec<u64>,
    requests: HashMap<u64, Request>,
    last_ended: Option<u64>,
    num_added: usize,
    num_ended: usize,
    next_id: u64,
    coverage: Coverage,
}

impl Driver {
    fn new(cfg: SchedulerConfig, depth: usize) -> Self {
        cfg.validate().expect("strategy makes valid configs");
        Self {
            s: Scheduler::new(cfg.clone()),
            cfg,
            depth,
            workers: HashMap::new(),
            results: VecDeque::new(),
            live: Vec::new(),
            requests: HashMap::new(),
            last_ended: None,
            num_added: 0,
            num_ended: 0,
            next_id: 0,
            coverage: Coverage::default(),
        }
    }

    fn end(&mut self, idx: usize, abort: bool) {
        if self.live.is_empty() {
            return;
        }
        let id = self.live.remove(idx % self.live.len());
        let in_flight = self
            .s
            .outstanding
            .iter()
            .any(|o| o.scheduled.iter().any(|s| s.id == id));
        if self.s.outstanding.len() == 2 && in_flight {
            self.coverage.ends_with_two_outstanding += 1;
        }
        let ok = if abort {
            self.s.abort(id)
        } else {
            self.s.finish(id)
        };
        assert!(ok, "live sequence {id} unknown to the scheduler");
        self.num_ended += 1;
        self.last_ended = Some(id);
    }

    fn add(&mut self, prompt: Vec<u32>, max_tokens: usize, priority: i32, salt: u64, reuse: bool) {
        let id = match self
            .last_ended
            .filter(|id| reuse && !self.live.contains(id))
        {
            Some(id) => {
                let named = self
                    .results
                    .iter()
                    .any(|(_, r)| r.iter().any(|t| t.0 == id))
                    || self
                        .s
                        .outstanding
                        .iter()
                        .any(|o| o.scheduled.iter().any(|s| s.id == id));
                if named {
                    self.coverage.reused_ids_in_flight += 1;
                }
                id
            }
            None => {
                self.next_id += 1;
                self.next_id - 1
            }
        };
        let too_long = prompt.len() > self.cfg.max_model_len;
        let request = Request {
            prompt_len: prompt.len(),
            max_tokens,
            salt,
        };
        let r = self.s.add(SequenceSpec {
            id,
            token_ids: prompt,
            max_tokens,
            sampling: Sampling::default(),
            extras: Default::default(),
            priority,
            cache_salt: salt,
            share: Default::default(),
            // Three adapters and the base, so `max_loras` (0..3) binds.
            adapter: (max_tokens % 4) as u32,
            // Some sequences guided, so their one-placeholder rule meets preemption and reuse.
            guided: id % 3 == 0,
        });
        if too_long {
            assert!(matches!(r, Err(SchedulerError::PromptTooLong { .. })));
        } else {
            r.expect("a fitting request is accepted under a validated config");
            self.live.push(id);
            self.requests.insert(id, request);
            self.num_added += 1;
        }
    }

    /// The engine's part after a step's tokens arrive: finish every sequence whose real
    /// tokens reached a length limit (the engine cannot see placeholders).
    fn finish_at_limits(&mut self) {
        let max_model_len = self.cfg.max_model_len;
        let done: Vec<u64> = self
            .live
            .iter()
            .copied()
            .filter(|id| {
                let output = self.s.output_token_ids(*id).unwrap().len();
                let len = self.requests[id].prompt_len + output;
                output >= self.requests[id].max_tokens || (output > 0 && len >= max_model_len)
            })
            .collect();
        for id in done {
            let idx = self.live.iter().position(|&l| l == id).unwrap();
            self.end(idx, false);
        }
    }

    /// Schedules one plan (the caller keeps within the depth) and the workers run it. Returns
    /// false when the scheduler had nothing to do.
    fn schedule(&mut self, token_seed: u32) -> bool {
        let had_outstanding = !self.s.outstanding.is_empty();
        let Some(plan) = self.s.schedule() else {
            assert!(
                had_outstanding || self.live.is_empty(),
                "no plan and none outstanding while {} sequences are live: {:?}",
                self.live.len(),
                self.live
            );
            return false;
        };
        for id in &plan.freed {
            if let Some(seq) = self.s.seqs.get(id) {
                if seq.status == SeqStatus::Waiting && !seq.pending_samples.is_empty() {
                    self.coverage.preempted_with_sample_in_flight += 1;
                }
            }
        }
        let sampled = self.run_plan(&plan, token_seed);
        self.results.push_back((plan.step_id, sampled));
        self.s.check_invariants().unwrap();
        true
    }

    /// Applies the oldest result, checks the scheduler against the workers, finishes
    /// sequences at their limits.
    fn apply(&mut self) {
        let Some((step_id, sampled)) = self.results.pop_front() else {
            return;
        };
        if !self.results.is_empty() {
            self.coverage.lagging_applies += 1;
        }
        for &(id, _) in &sampled {
            let arrival_watermark = self.s.outstanding[0].arrival_watermark;
            if self
                .s
                .seqs
                .get(&id)
                .is_none_or(|seq| seq.arrival >= arrival_watermark)
            {
                self.coverage.ignored_tokens += 1;
            }
        }
        self.s.apply(step_id, &sampled).expect("apply");
        for w in self.workers.values_mut() {
            if w.unapplied
                .front()
                .is_some_and(|&(step, _)| step == step_id)
            {
                w.applied = w.unapplied.pop_front().unwrap().1;
            }
        }
        self.s.check_invariants().unwrap();
        self.check_agreement();
        self.finish_at_limits();
    }

    /// The scheduler and the workers agree on every live sequence the workers hold; every
    /// block the prefix cache knows holds real tokens computed by applied steps.
    fn check_agreement(&self) {
        let bs = self.cfg.block_size;
        for (id, w) in &self.workers {
            let Some(seq) = self.s.seqs.get(id).filter(|s| s.known_to_workers) else {
                continue;
            };
            let real = seq.token_ids.len();
            assert_eq!(&w.tokens[..real], &seq.token_ids[..], "tokens of {id}");
            assert_eq!(w.tokens.len(), seq.num_tokens(), "placeholders of {id}");
            assert_eq!(w.computed, seq.num_computed, "computed of {id}");
            assert_eq!(&w.blocks, &seq.block_table, "blocks of {id}");
            let mut parent = ROOT_HASH;
            for (j, &b) in w.blocks.iter().enumerate() {
                if (j + 1) * bs <= w.tokens.len() {
                    parent = block_hash(parent, &w.tokens[j * bs..(j + 1) * bs], w.salt);
                }
                if let Some(hash) = self.s.block_pool().block_hash(b) {
                    assert!(
                        (j + 1) * bs <= w.applied,
                        "{id}: block {b} cached before computed"
                    );
                    assert_eq!(hash, parent, "{id}: block {b} cached under other tokens");
                }
            }
        }
    }

    /// Runs the plan on the worker mirror the way a worker would, checking it on the way, and
    /// returns rank 0's sampled tokens.
    fn run_plan(&mut self, plan: &StepPlan, token_seed: u32) -> Vec<(u64, u32)> {
        let bs = self.cfg.block_size;
        assert!(plan.num_scheduled_tokens() <= self.cfg.max_num_batched_tokens);
        assert!(plan.num_seqs() <= self.cfg.max_num_seqs);
        assert!(plan.num_seqs() > 0);
        for id in &plan.freed {
            assert!(self.workers.remove(id).is_some(), "free of unknown {id}");
        }
        let mut want_sampled = Vec::new();
        for n in &plan.new {
            assert!(!self.workers.contains_key(&n.id), "{} sent twice", n.id);
            assert_eq!(n.num_computed_tokens % bs, 0);
            assert!(n.num_computed_tokens < n.token_ids.len());
            assert!(n.num_scheduled_tokens > 0);
            if !self.cfg.enable_prefix_caching {
                assert_eq!(n.num_computed_tokens, 0);
            }
            let request = self.requests[&n.id];
            let w = WorkerSeq {
                tokens: n.token_ids.clone(),
                computed: n.num_computed_tokens,
                blocks: n.block_ids.clone(),
                prompt_len: request.prompt_len,
                max_tokens: request.max_tokens,
                salt: request.salt,
                applied: n.num_computed_tokens,
                unapplied: VecDeque::new(),
            };
            if n.num_computed_tokens + n.num_scheduled_tokens == w.tokens.len() {
                want_sampled.push(n.id);
            }
            self.workers.insert(n.id, w);
        }
        let mut steps = Vec::new();
        for n in &plan.new {
            steps.push((n.id, n.num_scheduled_tokens));
        }
        for r in &plan.running {
            let w = self.workers.get_mut(&r.id).expect("running id known");
            w.blocks.extend(&r.new_block_ids);
            assert!(r.num_scheduled_tokens > 0);
            if w.computed + r.num_scheduled_tokens == w.tokens.len() {
                want_sampled.push(r.id);
            }
            steps.push((r.id, r.num_scheduled_tokens));
        }
        assert_eq!(plan.sampled, want_sampled);
        // Every block a step writes belongs to exactly one worker sequence; shared blocks are
        // full, already computed prefix blocks.
        let mut owners: HashMap<u32, usize> = HashMap::new();
        for w in self.workers.values() {
            for &b in &w.blocks {
                *owners.entry(b).or_default() += 1;
            }
        }
        for &(id, n) in &steps {
            let w = self.workers.get_mut(&id).unwrap();
            let end = w.computed + n;
            assert!(end <= w.tokens.len(), "{id} computes unknown tokens");
            assert!(w.blocks.len() * bs >= end, "{id} lacks blocks");
            assert!(end <= self.cfg.max_model_len);
            for &b in &w.blocks[w.computed / bs..] {
                assert_eq!(owners[&b], 1, "{id} writes shared block {b}");
            }
            w.computed = end;
            w.unapplied.push_back((plan.step_id, end));
        }
        let mut sampled = Vec::with_capacity(plan.sampled.len());
        for (k, &id) in plan.sampled.iter().enumerate() {
            let w = self.workers.get_mut(&id).unwrap();
            let output = w.tokens.len() - w.prompt_len;
            // Never one token too many, even for a sequence the engine has finished since.
            assert!(output < w.max_tokens, "{id} samples beyond max_tokens");
            assert!(
                output == 0 || w.tokens.len() < self.cfg.max_model_len,
                "{id} samples beyond max_model_len"
            );
            let token = token_seed.wrapping_mul(31).wrapping_add(k as u32) % 4;
            w.tokens.push(token);
            sampled.push((id, token));
        }
        sampled
    }

    /// Runs the engine until nothing is left; every sequence must end.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            while self.results.len() < self.depth && self.schedule(1) {}
            if self.results.is_empty() {
                break;
            }
            self.apply();
        }
        assert!(
            self.live.is_empty(),
            "sequences never ended: {:?}",
            self.live
        );
        assert!(self.s.outstanding.is_empty());
        assert_eq!(self.s.num_waiting() + self.s.num_running(), 0);
        assert_eq!(self.num_added, self.num_ended, "every added sequence ended");
        assert_eq!(self.s.block_pool().num_free(), self.cfg.num_blocks);
        assert_eq!(self.s.kv_cache_usage(), 0.0);
        self.s.check_invariants().unwrap();
    }

    fn run_op(&mut self, op: Op) {
        match op {
            Op::Add {
                prompt,
                max_tokens,
                priority,
                salt,
                reuse_id,
            } => self.add(prompt, max_tokens, priority, salt, reuse_id),
            Op::Abort(i) => self.end(i, true),
            Op::Finish(i) => self.end(i, false),
            Op::Schedule { token_seed } => {
                if self.results.len() < self.depth {
                    self.schedule(token_seed);
                }
            }
            Op::Apply => self.apply(),
        }
        self.s.check_invariants().unwrap();
        assert!(self.s.kv_cache_usage() <= 1.0);
    }
}

fn run(d: &mut Driver, ops: Vec<Op>) {
    for op in ops {
        d.run_op(op);
    }
    d.drain();
}

/// Guards the property tests against passing vacuously: the generated traffic must reach the
/// paths they are meant to check.
#[test]
fn the_random_driver_reaches_preemption_prefix_hits_and_pipelined_paths() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let (mut preemptions, mut hits) = (0, 0);
    let mut total = Coverage::default();
    for _ in 0..64 {
        let cfg = config().new_tree(&mut runner).unwrap().current();
        let depth = depth().new_tree(&mut runner).unwrap().current();
        let ops = prop::collection::vec(op(), 1..150)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut d = Driver::new(cfg, depth);
        run(&mut d, ops);
        preemptions += d.s.stats().num_preemptions;
        hits += d.s.stats().prefix_cache_hits;
        let c = &d.coverage;
        total.ends_with_two_outstanding += c.ends_with_two_outstanding;
        total.preempted_with_sample_in_flight += c.preempted_with_sample_in_flight;
        total.reused_ids_in_flight += c.reused_ids_in_flight;
        total.ignored_tokens += c.ignored_tokens;
        total.lagging_applies += c.lagging_applies;
    }
    assert!(preemptions > 10, "{preemptions} preemptions");
    assert!(hits > 10, "{hits} prefix-cache hit tokens");
    assert!(total.ends_with_two_outstanding > 3, "{total:?}");
    assert!(total.preempted_with_sample_in_flight > 3, "{total:?}");
    assert!(total.reused_ids_in_flight > 3, "{total:?}");
    assert!(total.ignored_tokens > 3, "{total:?}");
    assert!(total.lagging_applies > 100, "{total:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn block_accounting_holds_and_no_sequence_is_lost_under_random_traffic(
        cfg in config(),
        depth in depth(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let mut d = Driver::new(cfg, depth);
        run(&mut d, ops);
    }

    #[test]
    fn stats_are_monotonic_and_hits_never_exceed_queries(
        cfg in config(),
        depth in depth(),
        ops in prop::collection::vec(op(), 1..100),
    ) {
        let mut d = Driver::new(cfg, depth);
        let mut last = d.s.stats();
        for op in ops {
            d.run_op(op);
            let now = d.s.stats();
            prop_assert!(now.prefix_cache_queries >= last.prefix_cache_queries);
            prop_assert!(now.prefix_cache_hits >= last.prefix_cache_hits);
            prop_assert!(now.num_preemptions >= last.num_preemptions);
            prop_assert!(now.prefix_cache_hits <= now.prefix_cache_queries);
            last = now;
        }
        d.drain();
    }
}
