//! Table and scenario tests of the scheduler: `budget, queue -> plan`, decode, chunked prefill,
//! admission, preemption, abort/finish, prefix caching, priorities, and the step protocol.

use super::*;
use crate::sampling::Sampling;

pub(super) fn config(block_size: usize, num_blocks: usize) -> SchedulerConfig {
    SchedulerConfig {
        block_size,
        num_blocks,
        max_num_seqs: 16,
        max_num_batched_tokens: 1024,
        max_model_len: block_size * num_blocks,
        enable_prefix_caching: false,
        policy: SchedulingPolicy::Fcfs,
        max_loras: 0,
    }
}

pub(super) fn spec(id: u64, token_ids: Vec<u32>, max_tokens: usize) -> SequenceSpec {
    SequenceSpec {
        id,
        token_ids,
        max_tokens,
        sampling: Sampling::default(),
        extras: Default::default(),
        priority: 0,
        cache_salt: 0,
        share: Share::default(),
        adapter: 0,
        guided: false,
    }
}

/// Prompt of `len` distinct tokens starting at `start`.
pub(super) fn prompt(start: u32, len: usize) -> Vec<u32> {
    (start..start + len as u32).collect()
}

/// Schedules one step and applies it with token `1000 + step_id` for every sampled sequence.
pub(super) fn step(s: &mut Scheduler) -> StepPlan {
    let plan = s.schedule().expect("a plan");
    let token = 1000 + plan.step_id as u32;
    let sampled: Vec<(u64, u32)> = plan.sampled.iter().map(|&id| (id, token)).collect();
    s.apply(plan.step_id, &sampled).expect("apply");
    s.check_invariants().expect("invariants");
    plan
}

/// (id, scheduled tokens) of every sequence in the plan, `new` then `running`.
pub(super) fn scheduled(plan: &StepPlan) -> Vec<(u64, usize)> {
    plan.new
        .iter()
        .map(|s| (s.id, s.num_scheduled_tokens))
        .chain(plan.running.iter().map(|s| (s.id, s.num_scheduled_tokens)))
        .collect()
}

#[test]
fn first_step_follows_budget_seq_limit_and_blocks() {
    struct Case {
        name: &'static str,
        budget: usize,
        max_num_seqs: usize,
        num_blocks: usize,
        prompts: &'static [usize],
        want: &'static [(u64, usize)],
        sampled: &'static [u64],
    }
    let cases = [
        Case {
            name: "everything fits",
            budget: 100,
            max_num_seqs: 8,
            num_blocks: 64,
            prompts: &[10, 20],
            want: &[(0, 10), (1, 20)],
            sampled: &[0, 1],
        },
        Case {
            name: "budget cuts the second prompt into a chunk",
            budget: 25,
            max_num_seqs: 8,
            num_blocks: 64,
            prompts: &[10, 20, 5],
            want: &[(0, 10), (1, 15)],
            sampled: &[0],
        },
        Case {
            name: "a long prompt gets one chunk",
            budget: 8,
            max_num_seqs: 8,
            num_blocks: 64,
            prompts: &[30],
            want: &[(0, 8)],
            sampled: &[],
        },
        Case {
            name: "max_num_seqs bounds the batch",
            budget: 100,
            max_num_seqs: 2,
            num_blocks: 64,
            prompts: &[3, 3, 3],
            want: &[(0, 3), (1, 3)],
            sampled: &[0, 1],
        },
        Case {
            name: "a prompt without blocks waits and nothing overtakes it",
            budget: 100,
            max_num_seqs: 8,
            num_blocks: 3,
            prompts: &[8, 8, 1],
            want: &[(0, 8)],
            sampled: &[0],
        },
    ];
    for case in cases {
        let mut cfg = config(4, case.num_blocks);
        cfg.max_num_batched_tokens = case.budget;
        cfg.max_num_seqs = case.max_num_seqs;
        let mut s = Scheduler::new(cfg);
        for (i, &len) in case.prompts.iter().enumerate() {
            s.add(spec(i as u64, prompt(0, len), 4)).unwrap();
        }
        let plan = s.schedule().unwrap();
        assert_eq!(scheduled(&plan), case.want, "{}", case.name);
        assert_eq!(plan.sampled, case.sampled, "{}", case.name);
        assert!(
            plan.running.is_empty() && plan.freed.is_empty(),
            "{}",
            case.name
        );
    }
}

#[test]
fn decode_step_schedules_one_token_per_running_sequence() {
    let mut s = Scheduler::new(config(4, 32));
    for id in 0..3 {
        s.add(spec(id, prompt(0, 5), 10)).unwrap();
    }
    let first = step(&mut s);
    assert_eq!(first.new.len(), 3);
    // Decode steps computing tokens 6, 7 and 8 fit the prompt's 2 blocks.
    for _ in 0..3 {
        let decode = step(&mut s);
        assert!(decode.new.is_empty());
        assert_eq!(scheduled(&decode), vec![(0, 1), (1, 1), (2, 1)]);
        assert_eq!(decode.sampled, vec![0, 1, 2]);
        assert!(decode.running.iter().all(|r| r.new_block_ids.is_empty()));
    }
    // The 9th token needs a third block.
    let decode = step(&mut s);
    assert!(decode.running.iter().all(|r| r.new_block_ids.len() == 1));
    assert_eq!(
        s.output_token_ids(0).unwrap(),
        &[1000, 1001, 1002, 1003, 1004]
    );
}

#[test]
fn chunked_prefill_splits_a_long_prompt_and_samples_only_at_the_last_chunk() {
    let mut cfg = config(4, 32);
    cfg.max_num_batched_tokens = 8;
    let mut s = Scheduler::new(cfg);
    s.add(spec(7, prompt(0, 20), 5)).unwrap();
    let p0 = step(&mut s);
    assert_eq!(p0.new[0].num_scheduled_tokens, 8);
    assert_eq!(p0.new[0].block_ids.len(), 2);
    assert!(p0.sampled.is_empty());
    let p1 = step(&mut s);
    assert_eq!(p1.running[0].num_scheduled_tokens, 8);
    assert_eq!(p1.running[0].new_block_ids.len(), 2);
    assert!(p1.sampled.is_empty());
    let p2 = step(&mut s);
    assert_eq!(p2.running[0].num_scheduled_tokens, 4);
    assert_eq!(p2.sampled, vec![7]);
    assert_eq!(s.output_token_ids(7).unwrap(), &[1002]);
    let p3 = step(&mut s);
    assert_eq!(scheduled(&p3), vec![(7, 1)]);
}

#[test]
fn request_arriving_while_others_decode_joins_the_next_step() {
    let mut s = Scheduler::new(config(4, 32));
    s.add(spec(1, prompt(0, 3), 10)).unwrap();
    step(&mut s);
    step(&mut s);
    s.add(spec(2, prompt(50, 6), 10)).unwrap();
    let plan = step(&mut s);
    assert_eq!(scheduled(&plan), vec![(2, 6), (1, 1)]);
    assert_eq!(plan.new[0].token_ids, prompt(50, 6));
    assert_eq!(plan.sampled, vec![2, 1]);
    assert_eq!(s.num_running(), 2);
}

#[test]
fn running_sequences_take_the_budget_before_waiting_prefills() {
    let mut cfg = config(4, 64);
    cfg.max_num_batched_tokens = 4;
    let mut s = Scheduler::new(cfg);
    for id in 0..3 {
        s.add(spec(id, prompt(0, 1), 10)).unwrap();
    }
    step(&mut s);
    s.add(spec(9, prompt(0, 10), 10)).unwrap();
    // Three decodes use 3 of the 4 tokens; the newcomer gets a 1-token chunk.
    let plan = step(&mut s);
    assert_eq!(scheduled(&plan), vec![(9, 1), (0, 1), (1, 1), (2, 1)]);
    assert_eq!(plan.sampled, vec![0, 1, 2]);
}

#[test]
fn max_num_seqs_holds_back_a_waiting_sequence_until_a_slot_frees() {
    let mut cfg = config(4, 64);
    cfg.max_num_seqs = 2;
    let mut s = Scheduler::new(cfg);
    for id in 0..3 {
        s.add(spec(id, prompt(0, 2), 10)).unwrap();
    }
    assert_eq!(step(&mut s).num_seqs(), 2);
    assert_eq!(step(&mut s).num_seqs(), 2);
    assert_eq!(s.num_waiting(), 1);
    assert!(s.finish(0));
    let plan = step(&mut s);
    assert_eq!(plan.freed, vec![0]);
    assert_eq!(scheduled(&plan), vec![(2, 2), (1, 1)]);
}

/// Two sequences of 6 tokens in a pool of 4 blocks of 4: the first to need a third block
/// preempts the newer one.
#[test]
fn preempted_sequence_returns_as_new_with_all_tokens_and_its_output_continues() {
    let mut s = Scheduler::new(config(4, 4));
    s.add(spec(1, prompt(0, 6), 8)).unwrap();
    s.add(spec(2, prompt(10, 6), 8)).unwrap();
    step(&mut s); // both prefill: 2 blocks each, 7 tokens known
    step(&mut s); // computed 7
    step(&mut s); // computed 8: both tables full
    let p3 = step(&mut s);
    assert_eq!(p3.freed, vec![2]);
    assert_eq!(scheduled(&p3), vec![(1, 1)]);
    assert_eq!(p3.running[0].new_block_ids.len(), 1);
    assert_eq!(s.stats().num_preemptions, 1);
    assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
    let out2 = s.output_token_ids(2).unwrap().to_vec();
    assert_eq!(out2, vec![1000, 1001, 1002]);
    // Sequence 2 needs 3 blocks to recompute its 9 tokens; only 1 is free while 1 runs.
    let p4 = step(&mut s);
    assert_eq!(scheduled(&p4), vec![(1, 1)]);
    assert!(s.finish(1));
    let p5 = step(&mut s);
    assert_eq!(p5.freed, vec![1]);
    assert_eq!(p5.new.len(), 1);
    let back = &p5.new[0];
    assert_eq!(back.id, 2);
    let mut all = prompt(10, 6);
    all.extend(&out2);
    assert_eq!(back.token_ids, all);
    assert_eq!(back.num_computed_tokens, 0);
    assert_eq!(back.num_scheduled_tokens, 9);
    assert_eq!(p5.sampled, vec![2]);
    let mut want = out2.clone();
    want.push(1000 + p5.step_id as u32);
    assert_eq!(s.output_token_ids(2).unwrap(), want.as_slice());
}

#[test]
fn the_newest_sequence_preempts_itself_when_it_cannot_grow() {
    let mut s = Scheduler::new(config(4, 3));
    s.add(spec(1, prompt(0, 2), 8)).unwrap();
    s.add(spec(2, prompt(10, 8), 4)).unwrap();
    step(&mut s); // 1: 1 block, 2: 2 blocks; pool full
    let p = step(&mut s);
    // 1 still fits its block; 2 needs a third block and is itself the newest: it yields.
    assert_eq!(p.freed, vec![2]);
    assert_eq!(scheduled(&p), vec![(1, 1)]);
    assert_eq!(s.stats().num_preemptions, 1);
    // It waits (3 blocks needed, 2 free) without overtaking or being lost.
    let p = step(&mut s);
    assert_eq!(scheduled(&p), vec![(1, 1)]);
    assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
}

#[test]
fn abort_of_a_waiting_sequence_frees_nothing_on_workers() {
    let mut s = Scheduler::new(config(4, 8));
    s.add(spec(1, prompt(0, 4), 4)).unwrap();
    assert!(s.abort(1));
    assert!(!s.abort(1));
    assert_eq!(s.num_waiting(), 0);
    assert!(s.schedule().is_none());
    s.add(spec(2, prompt(0, 4), 4)).unwrap();
    assert!(step(&mut s).freed.is_empty());
}

#[test]
fn abort_of_a_running_sequence_frees_its_blocks_and_rides_on_the_next_plan() {
    let mut s = Scheduler::new(config(4, 8));
    s.add(spec(1, prompt(0, 9), 4)).unwrap();
    s.add(spec(2, prompt(0, 2), 4)).unwrap();
    step(&mut s);
    assert_eq!(s.block_pool().num_used(), 4);
    assert!(s.abort(1));
    assert_eq!(s.block_pool().num_used(), 1);
    let plan = step(&mut s);
    assert_eq!(plan.freed, vec![1]);
    assert_eq!(scheduled(&plan), vec![(2, 1)]);
    assert!(step(&mut s).freed.is_empty(), "a free is sent once");
}

#[test]
fn frees_wait_for_the_next_plan_when_there_is_nothing_to_compute() {
    let mut s = Scheduler::new(config(4, 8));
    s.add(spec(1, prompt(0, 3), 4)).unwrap();
    step(&mut s);
    assert!(s.finish(1));
    assert_eq!(s.kv_cache_usage(), 0.0);
    assert!(s.schedule().is_none());
    // The same id may come back: the plan drops the old state before adding the new.
    s.add(spec(1, prompt(5, 3), 4)).unwrap();
    let plan = step(&mut s);
    assert_eq!(plan.freed, vec![1]);
    assert_eq!(plan.new[0].id, 1);
    assert_eq!(plan.new[0].token_ids, prompt(5, 3));
}

#[test]
fn abort_between_schedule_and_apply_is_ignored_by_apply() {
    let mut s = Scheduler::new(config(4, 8));
    s.add(spec(1, prompt(0, 3), 4)).unwrap();
    s.add(spec(2, prompt(0, 3), 4)).unwrap();
    let plan = s.schedule().unwrap();
    assert!(s.abort(1));
    // Workers ran the step and return a token for 1 anyway.
    s.apply(plan.step_id, &[(1, 5), (2, 6)]).unwrap();
    assert_eq!(s.output_token_ids(2).unwrap(), &[6]);
    assert_eq!(s.output_token_ids(1), None);
    let next = step(&mut s);
    assert_eq!(next.freed, vec![1]);
    s.check_invariants().unwrap();
}

#[test]
fn an_id_reused_before_apply_is_a_different_sequence() {
    let mut s = Scheduler::new(config(4, 8));
    s.add(spec(1, prompt(0, 3), 4)).unwrap();
    let plan = s.schedule().unwrap();
    assert!(s.abort(1));
    s.add(spec(1, prompt(9, 2), 4)).unwrap();
    s.apply(plan.step_id, &[(1, 5)]).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[] as &[u32]);
    let next = step(&mut s);
    assert_eq!(next.freed, vec![1]);
    assert_eq!(next.new[0].token_ids, prompt(9, 2));
}

#[test]
fn apply_rejects_protocol_misuse_and_changes_nothing() {
    let mut s = Scheduler::new(config(4, 8));
    assert_eq!(
        s.apply(0, &[]),
        Err(SchedulerError::NoPlanOutstanding { got: 0 })
    );
    let mut cfg = config(4, 8);
    cfg.max_num_batched_tokens = 10;
    let mut s = Scheduler::new(cfg);
    s.add(spec(1, prompt(0, 3), 4)).unwrap();
    s.add(spec(2, prompt(0, 30), 4)).unwrap();
    let plan = s.schedule().unwrap();
    assert_eq!(plan.sampled, vec![1]);
    assert_eq!(
        s.apply(plan.step_id + 1, &[(1, 0)]),
        Err(SchedulerError::StepMismatch {
            expected: plan.step_id,
            got: plan.step_id + 1
        })
    );
    assert_eq!(
        s.apply(plan.step_id, &[(2, 0)]),
        Err(SchedulerError::UnexpectedSample {
            step_id: plan.step_id,
            id: 2
        })
    );
    assert_eq!(
        s.apply(plan.step_id, &[(1, 0), (1, 0)]),
        Err(SchedulerError::UnexpectedSample {
            step_id: plan.step_id,
            id: 1
        })
    );
    assert_eq!(
        s.apply(plan.step_id, &[]),
        Err(SchedulerError::MissingSamples {
            step_id: plan.step_id,
            expected: 1,
            got: 0
        })
    );
    s.apply(plan.step_id, &[(1, 42)]).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[42]);
    assert_eq!(s.output_token_ids(2).unwrap(), &[] as &[u32]);
}

#[test]
#[should_panic(expected = "outstanding")]
fn schedule_with_two_plans_outstanding_panics() {
    let mut s = Scheduler::new(config(4, 8));
    s.add(spec(1, prompt(0, 3), 4)).unwrap();
    assert!(s.schedule().is_some());
    assert!(s.schedule().is_some(), "the placeholder can be computed");
    let _ = s.schedule();
}

#[test]
fn add_refuses_requests_that_can_never_run_with_numbers() {
    let mut cfg = config(4, 8);
    cfg.max_model_len = 20;
    let mut s = Scheduler::new(cfg);
    let err = s.add(spec(1, prompt(0, 21), 1)).unwrap_err();
    assert_eq!(
        err,
        SchedulerError::PromptTooLong {
            prompt_tokens: 21,
            max_model_len: 20
        }
    );
    assert_eq!(err.to_string(), "prompt has 21 tokens, max-model-len is 20");
    assert_eq!(
        s.add(spec(2, vec![], 1)),
        Err(SchedulerError::EmptyPrompt { id: 2 })
    );
    assert_eq!(
        s.add(spec(3, prompt(0, 1), 0)),
        Err(SchedulerError::ZeroMaxTokens { id: 3 })
    );
    s.add(spec(4, prompt(0, 1), 1)).unwrap();
    assert_eq!(
        s.add(spec(4, prompt(0, 1), 1)),
        Err(SchedulerError::DuplicateId { id: 4 })
    );
    // A pool smaller than max_model_len (config not validated): 40 tokens cannot fit 32.
    let mut cfg = config(4, 8);
    cfg.max_model_len = 64;
    let mut s = Scheduler::new(cfg);
    assert_eq!(
        s.add(spec(5, prompt(0, 33), 1)),
        Err(SchedulerError::ExceedsKvCache {
            tokens: 33,
            blocks_needed: 9,
            block_size: 4,
            num_blocks: 8
        })
    );
    assert!(matches!(
        s.add(spec(6, prompt(0, 10), 30)),
        Err(SchedulerError::ExceedsKvCache { tokens: 39, .. })
    ));
    s.add(spec(7, prompt(0, 10), 23)).unwrap();
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn a_sequence_at_max_tokens_is_left_idle_until_finished() {
    let mut s = Scheduler::new(config(4, 8));
    s.add(spec(1, prompt(0, 3), 2)).unwrap();
    s.add(spec(2, prompt(0, 3), 5)).unwrap();
    step(&mut s);
    step(&mut s);
    assert_eq!(s.output_token_ids(1).unwrap().len(), 2);
    let plan = step(&mut s);
    assert_eq!(scheduled(&plan), vec![(2, 1)]);
}

#[test]
fn a_sequence_stops_at_max_model_len() {
    let mut cfg = config(4, 8);
    cfg.max_model_len = 5;
    let mut s = Scheduler::new(cfg);
    s.add(spec(1, prompt(0, 5), 100)).unwrap();
    step(&mut s); // computes 5, samples the 6th token
    assert_eq!(s.output_token_ids(1).unwrap().len(), 1);
    assert!(s.schedule().is_none());
    assert!(s.finish(1));
}

pub(super) fn caching_config() -> SchedulerConfig {
    SchedulerConfig {
        enable_prefix_caching: true,
        ..config(4, 16)
    }
}

#[test]
fn a_repeated_prompt_skips_its_cached_blocks() {
    let mut s = Scheduler::new(caching_config());
    s.add(spec(1, prompt(0, 10), 1)).unwrap();
    let first = step(&mut s);
    assert!(s.finish(1));
    s.add(spec(2, prompt(0, 10), 1)).unwrap();
    let plan = step(&mut s);
    let again = &plan.new[0];
    assert_eq!(again.num_computed_tokens, 8);
    assert_eq!(again.num_scheduled_tokens, 2);
    assert_eq!(again.block_ids[..2], first.new[0].block_ids[..2]);
    assert_eq!(plan.sampled, vec![2]);
    let stats = s.stats();
    assert_eq!(
        (stats.prefix_cache_queries, stats.prefix_cache_hits),
        (20, 8)
    );
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_block() {
    let mut s = Scheduler::new(caching_config());
    s.add(spec(1, prompt(0, 8), 1)).unwrap();
    step(&mut s);
    s.finish(1);
    s.add(spec(2, prompt(0, 8), 1)).unwrap();
    let plan = step(&mut s);
    assert_eq!(plan.new[0].num_computed_tokens, 4);
    assert_eq!(plan.new[0].num_scheduled_tokens, 4);
}

#[test]
fn two_sequences_share_a_cached_block_with_refcount_two() {
    let mut s = Scheduler::new(caching_config());
    s.add(spec(1, prompt(0, 6), 8)).unwrap();
    let p0 = step(&mut s);
    let shared = p0.new[0].block_ids[0];
    s.add(spec(2, prompt(0, 6), 8)).unwrap();
    let p1 = step(&mut s);
    assert_eq!(p1.new[0].block_ids[0], shared);
    assert_ne!(p1.new[0].block_ids[1], p0.new[0].block_ids[1]);
    assert_eq!(s.block_pool().refcount(shared), 2);
    s.finish(1);
    assert_eq!(s.block_pool().refcount(shared), 1);
    s.finish(2);
    assert_eq!(s.block_pool().refcount(shared), 0);
    s.check_invariants().unwrap();
}

#[test]
fn different_cache_salts_do_not_share_blocks() {
    let mut s = Scheduler::new(caching_config());
    s.add(spec(1, prompt(0, 9), 1)).unwrap();
    step(&mut s);
    let mut other = spec(2, prompt(0, 9), 1);
    other.cache_salt = 99;
    s.add(other).unwrap();
    let plan = step(&mut s);
    assert_eq!(plan.new[0].num_computed_tokens, 0);
}

#[test]
fn lru_eviction_reuses_least_recently_freed_blocks_first() {
    // Pool of 4 blocks of 4. A (blocks 0,1) and B (blocks 2,3) each cache two full blocks.
    let mut cfg = caching_config();
    cfg.num_blocks = 4;
    cfg.max_model_len = 16;
    let mut s = Scheduler::new(cfg);
    s.add(spec(1, prompt(0, 9), 1)).unwrap();
    step(&mut s);
    s.finish(1); // A's blocks 2,1,0 freed tail first
    s.add(spec(2, prompt(100, 8), 1)).unwrap();
    let p = step(&mut s);
    // Block 3 was never used and is first; then A's tail block 2 (its hash evicted).
    assert_eq!(p.new[0].block_ids, vec![3, 2]);
    s.finish(2);
    // Free list now: 1, 0 (A's prefix, older), 2, 3 (B, newer).
    // A prompt needing 2 fresh blocks evicts A's cached blocks, not B's.
    s.add(spec(3, prompt(200, 8), 1)).unwrap();
    let p = step(&mut s);
    assert_eq!(p.new[0].block_ids, vec![1, 0]);
    s.finish(3);
    s.add(spec(4, prompt(100, 8), 1)).unwrap();
    let p = step(&mut s);
    assert_eq!(p.new[0].num_computed_tokens, 4, "B's first block survived");
    s.finish(4);
    s.add(spec(5, prompt(0, 9), 1)).unwrap();
    let p = step(&mut s);
    assert_eq!(p.new[0].num_computed_tokens, 0, "A's prefix was evicted");
}

#[test]
fn priority_policy_starts_lower_values_first_and_ties_by_arrival() {
    let mut cfg = config(4, 32);
    cfg.policy = SchedulingPolicy::Priority;
    cfg.max_num_seqs = 2;
    let mut s = Scheduler::new(cfg);
    for (id, priority) in [(1, 5), (2, 0), (3, 5), (4, 0)] {
        let mut sp = spec(id, prompt(0, 2), 4);
        sp.priority = priority;
        s.add(sp).unwrap();
    }
    let plan = step(&mut s);
    assert_eq!(scheduled(&plan), vec![(2, 2), (4, 2)]);
    s.finish(2);
    s.finish(4);
    let plan = step(&mut s);
    assert_eq!(scheduled(&plan), vec![(1, 2), (3, 2)]);
}

#[test]
fn fcfs_policy_ignores_priority() {
    let mut s = Scheduler::new(config(4, 32));
    for (id, priority) in [(1, 5), (2, 0)] {
        let mut sp = spec(id, prompt(0, 2), 4);
        sp.priority = priority;
        s.add(sp).unwrap();
    }
    assert_eq!(scheduled(&step(&mut s)), vec![(1, 2), (2, 2)]);
}

#[test]
fn priority_policy_preempts_the_worst_priority_sequence_even_if_already_scheduled() {
    // 1 (priority 9) is admitted first, 2 (priority 0) second; when 2 needs a block, 1 is
    // preempted although it was scheduled earlier in the same step.
    let mut cfg = config(4, 4);
    cfg.policy = SchedulingPolicy::Priority;
    let mut s = Scheduler::new(cfg);
    let mut low = spec(1, prompt(0, 4), 8);
    low.priority = 9;
    s.add(low).unwrap();
    step(&mut s);
    let mut high = spec(2, prompt(10, 8), 8);
    high.priority = 0;
    s.add(high).unwrap();
    step(&mut s); // 1 decodes into a second block, 2 takes 2 blocks: pool full
    let plan = step(&mut s);
    // 1 needs no block (6 tokens in 2 blocks); 2 needs a third: the victim is 1.
    assert_eq!(plan.freed, vec![1]);
    assert_eq!(scheduled(&plan), vec![(2, 1)]);
    assert_eq!(s.stats().num_preemptions, 1);
}

#[test]
fn usage_and_stats_track_blocks_and_preemptions() {
    let mut s = Scheduler::new(config(4, 8));
    assert_eq!(s.kv_cache_usage(), 0.0);
    s.add(spec(1, prompt(0, 8), 4)).unwrap();
    step(&mut s);
    assert_eq!(s.kv_cache_usage(), 0.25);
    assert_eq!(
        s.stats(),
        SchedulerStats::default(),
        "caching off: no queries"
    );
    s.finish(1);
    assert_eq!(s.kv_cache_usage(), 0.0);
}

#[test]
fn a_third_adapter_waits_for_a_running_one_to_drain_and_nothing_overtakes_it() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_loras: 2,
        ..config(4, 64)
    });
    let with = |id, adapter| SequenceSpec {
        adapter,
        ..spec(id, prompt(id as u32 * 10, 4), 3)
    };
    s.add(with(1, 1)).unwrap();
    s.add(with(2, 2)).unwrap();
    s.add(with(3, 0)).unwrap(); // the base model never counts
    s.add(with(4, 3)).unwrap(); // a third adapter: waits
    s.add(with(5, 1)).unwrap(); // adapter 1 runs, but 4 came first: no overtaking
    let plan = step(&mut s);
    let started: Vec<u64> = plan.new.iter().map(|n| n.id).collect();
    assert_eq!(started, vec![1, 2, 3]);
    assert_eq!(s.running_adapters(), vec![1, 2]);
    assert_eq!(s.waiting_adapters(), vec![3, 1]);
    s.check_invariants().unwrap();
    // Adapter 2's only request ends: the third adapter starts, then adapter 1's second one.
    assert!(s.finish(2));
    let plan = step(&mut s);
    let started: Vec<u64> = plan.new.iter().map(|n| n.id).collect();
    assert_eq!(started, vec![4, 5]);
    assert_eq!(plan.new[0].adapter, 3);
    s.check_invariants().unwrap();
}
