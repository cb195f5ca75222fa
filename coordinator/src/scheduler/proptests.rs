//! Property tests: a random engine drives the scheduler (arrivals, aborts, finishes, aborts
//! between schedule and apply, random sampled tokens, a small pool that forces preemption)
//! while a mirror of the workers applies every plan as a real worker would. After every
//! operation the block accounting must hold; every plan must respect the budget and the diff
//! protocol; at the end every sequence has ended and the pool is whole.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;

use super::*;
use crate::engine::Sampling;

#[derive(Debug, Clone)]
enum Op {
    Add {
        prompt: Vec<u32>,
        max_tokens: usize,
        priority: i32,
        salt: u64,
    },
    Abort(usize),
    Finish(usize),
    /// Schedule and apply one step; optionally abort a live sequence in between.
    Step {
        abort_mid_step: Option<usize>,
        token_seed: u32,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            // A 4-letter alphabet makes equal blocks (prefix hits) common.
            prop::collection::vec(0u32..4, 1..40),
            1usize..24,
            0i32..3,
            0u64..2,
        )
            .prop_map(|(prompt, max_tokens, priority, salt)| Op::Add {
                prompt,
                max_tokens,
                priority,
                salt
            }),
        1 => any::<usize>().prop_map(Op::Abort),
        1 => any::<usize>().prop_map(Op::Finish),
        6 => (prop::option::weighted(0.1, any::<usize>()), any::<u32>())
            .prop_map(|(abort_mid_step, token_seed)| Op::Step {
                abort_mid_step,
                token_seed
            }),
    ]
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        prop_oneof![Just(1usize), Just(2), Just(4)],
        6usize..40,
        1usize..6,
        1usize..40,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(block_size, num_blocks, max_num_seqs, budget, caching, priority)| SchedulerConfig {
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
            },
        )
}

/// What one worker holds for a sequence, updated only from plans.
#[derive(Debug, Clone)]
struct WorkerSeq {
    tokens: Vec<u32>,
    computed: usize,
    blocks: Vec<u32>,
}

/// The random engine plus the worker mirror.
struct Driver {
    s: Scheduler,
    cfg: SchedulerConfig,
    workers: HashMap<u64, WorkerSeq>,
    /// Live ids in order of addition (indexes for Abort/Finish ops).
    live: Vec<u64>,
    added: HashSet<u64>,
    ended: HashSet<u64>,
    next_id: u64,
    /// Aborts between schedule and apply of a sequence the plan computes (coverage).
    mid_step_aborts: usize,
}

impl Driver {
    fn new(cfg: SchedulerConfig) -> Self {
        cfg.validate().expect("strategy makes valid configs");
        Self {
            s: Scheduler::new(cfg.clone()),
            cfg,
            workers: HashMap::new(),
            live: Vec::new(),
            added: HashSet::new(),
            ended: HashSet::new(),
            next_id: 0,
            mid_step_aborts: 0,
        }
    }

    fn end(&mut self, idx: usize, abort: bool) {
        if self.live.is_empty() {
            return;
        }
        let id = self.live.remove(idx % self.live.len());
        let ok = if abort {
            self.s.abort(id)
        } else {
            self.s.finish(id)
        };
        assert!(ok, "live sequence {id} unknown to the scheduler");
        self.ended.insert(id);
    }

    fn add(&mut self, prompt: Vec<u32>, max_tokens: usize, priority: i32, salt: u64) {
        let id = self.next_id;
        self.next_id += 1;
        let too_long = prompt.len() > self.cfg.max_model_len;
        let r = self.s.add(SequenceSpec {
            id,
            token_ids: prompt,
            max_tokens,
            sampling: Sampling::default(),
            priority,
            cache_salt: salt,
        });
        if too_long {
            assert!(matches!(r, Err(SchedulerError::PromptTooLong { .. })));
        } else {
            r.expect("a fitting request is accepted under a validated config");
            self.live.push(id);
            self.added.insert(id);
        }
    }

    /// The engine's part: finish every sequence at its length limit.
    fn finish_at_limits(&mut self) {
        let max_model_len = self.cfg.max_model_len;
        let done: Vec<u64> = self
            .live
            .iter()
            .copied()
            .filter(|id| self.s.seqs[id].is_at_limit(max_model_len))
            .collect();
        for id in done {
            let idx = self.live.iter().position(|&l| l == id).unwrap();
            self.end(idx, false);
        }
    }

    /// One schedule/apply cycle. Returns false when the scheduler had nothing to do.
    fn step(&mut self, abort_mid_step: Option<usize>, token_seed: u32) -> bool {
        let Some(plan) = self.s.schedule() else {
            assert!(
                self.live.is_empty(),
                "no plan while {} sequences are live: {:?}",
                self.live.len(),
                self.live
            );
            return false;
        };
        self.check_plan(&plan);
        self.s.check_invariants().unwrap();
        if let Some(idx) = abort_mid_step.filter(|_| !self.live.is_empty()) {
            let id = self.live[idx % self.live.len()];
            if self.s.seqs[&id].in_flight > 0 {
                self.mid_step_aborts += 1;
            }
            self.end(idx, true);
            self.s.check_invariants().unwrap();
        }
        // Workers compute the step; rank 0 samples for every sampled id (aborted ones too).
        let mut sampled = Vec::new();
        for r in plan
            .new
            .iter()
            .map(|n| (n.id, n.num_scheduled_tokens))
            .chain(plan.running.iter().map(|r| (r.id, r.num_scheduled_tokens)))
        {
            let w = self.workers.get_mut(&r.0).unwrap();
            w.computed += r.1;
        }
        for (k, &id) in plan.sampled.iter().enumerate() {
            let token = token_seed.wrapping_mul(31).wrapping_add(k as u32) % 4;
            self.workers.get_mut(&id).unwrap().tokens.push(token);
            sampled.push((id, token));
        }
        self.s.apply(plan.step_id, &sampled).expect("apply");
        self.s.check_invariants().unwrap();
        // Workers and scheduler agree on the tokens and tables of every live sequence.
        for (id, w) in &self.workers {
            if let Some(seq) = self.s.seqs.get(id) {
                if seq.known_to_workers {
                    assert_eq!(&w.tokens, &seq.token_ids, "tokens of {id}");
                    assert_eq!(w.computed, seq.num_computed, "computed of {id}");
                    assert_eq!(&w.blocks, &seq.block_table, "blocks of {id}");
                }
            }
        }
        self.finish_at_limits();
        true
    }

    /// Applies the plan to the worker mirror the way a worker would, checking it on the way.
    fn check_plan(&mut self, plan: &StepPlan) {
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
            let w = WorkerSeq {
                tokens: n.token_ids.clone(),
                computed: n.num_computed_tokens,
                blocks: n.block_ids.clone(),
            };
            if !self.cfg.enable_prefix_caching {
                assert_eq!(n.num_computed_tokens, 0);
            }
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
            let w = &self.workers[&id];
            let end = w.computed + n;
            assert!(end <= w.tokens.len(), "{id} computes unknown tokens");
            assert!(w.blocks.len() * bs >= end, "{id} lacks blocks");
            assert!(end <= self.cfg.max_model_len);
            for &b in &w.blocks[w.computed / bs..] {
                assert_eq!(owners[&b], 1, "{id} writes shared block {b}");
            }
        }
    }

    /// Runs the engine until nothing is left; every sequence must end.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if !self.step(None, 1) {
                break;
            }
        }
        assert!(
            self.live.is_empty(),
            "sequences never ended: {:?}",
            self.live
        );
        assert_eq!(self.s.num_waiting() + self.s.num_running(), 0);
        assert_eq!(&self.added, &self.ended, "every added sequence ended");
        assert_eq!(self.s.block_pool().num_free(), self.cfg.num_blocks);
        assert_eq!(self.s.kv_cache_usage(), 0.0);
        self.s.check_invariants().unwrap();
    }
}

fn run(d: &mut Driver, ops: Vec<Op>) {
    for op in ops {
        match op {
            Op::Add {
                prompt,
                max_tokens,
                priority,
                salt,
            } => d.add(prompt, max_tokens, priority, salt),
            Op::Abort(i) => d.end(i, true),
            Op::Finish(i) => d.end(i, false),
            Op::Step {
                abort_mid_step,
                token_seed,
            } => {
                d.step(abort_mid_step, token_seed);
            }
        }
        d.s.check_invariants().unwrap();
        assert!(d.s.kv_cache_usage() <= 1.0);
    }
    d.drain();
}

/// Guards the property tests against passing vacuously: the generated traffic must reach the
/// paths they are meant to check.
#[test]
fn the_random_driver_reaches_preemption_prefix_hits_and_mid_step_aborts() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let mut runner = TestRunner::deterministic();
    let (mut preemptions, mut hits, mut mid_step_aborts) = (0, 0, 0);
    for _ in 0..64 {
        let cfg = config().new_tree(&mut runner).unwrap().current();
        let ops = prop::collection::vec(op(), 1..150)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let mut d = Driver::new(cfg);
        run(&mut d, ops);
        preemptions += d.s.stats().num_preemptions;
        hits += d.s.stats().prefix_cache_hits;
        mid_step_aborts += d.mid_step_aborts;
    }
    assert!(preemptions > 10, "{preemptions} preemptions");
    assert!(hits > 10, "{hits} prefix-cache hit tokens");
    assert!(mid_step_aborts > 3, "{mid_step_aborts} mid-step aborts");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn block_accounting_holds_and_no_sequence_is_lost_under_random_traffic(
        cfg in config(),
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let mut d = Driver::new(cfg);
        run(&mut d, ops);
    }

    #[test]
    fn stats_are_monotonic_and_hits_never_exceed_queries(
        cfg in config(),
        ops in prop::collection::vec(op(), 1..100),
    ) {
        let mut d = Driver::new(cfg);
        let mut last = d.s.stats();
        for op in ops {
            match op {
                Op::Add { prompt, max_tokens, priority, salt } => {
                    d.add(prompt, max_tokens, priority, salt)
                }
                Op::Abort(i) => d.end(i, true),
                Op::Finish(i) => d.end(i, false),
                Op::Step { token_seed, .. } => {
                    d.step(None, token_seed);
                }
            }
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
