//! Scenario tests of async scheduling: `schedule` runs one step ahead of `apply`, so a plan
//! computes the placeholders of the plan before it. Apply lagging by one step, its order, limits
//! counting placeholders, ends and id reuse with two plans outstanding, preemption with a plan
//! in flight, and prefix-cache registration of computed blocks only.

use super::tests::{caching_config, config, prompt, scheduled, spec, step};
use super::*;

/// Every sampled id of `plan` gets `token`.
fn tokens_for(plan: &StepPlan, token: u32) -> Vec<(u64, u32)> {
    plan.sampled.iter().map(|&id| (id, token)).collect()
}

#[test]
fn the_next_plan_computes_the_placeholder_while_apply_lags_one_step() {
    let mut s = Scheduler::new(config(4, 32));
    s.add(spec(1, prompt(0, 5), 10)).unwrap();
    let p0 = s.schedule().unwrap();
    assert_eq!(p0.sampled, vec![1]);
    // Step 0 is not applied: its token is a placeholder, which the next plan computes.
    let mut behind = p0.step_id;
    let mut new_blocks = Vec::new();
    for _ in 0..4 {
        let plan = s.schedule().unwrap();
        assert_eq!(plan.step_id, behind + 1);
        assert_eq!(scheduled(&plan), vec![(1, 1)]);
        assert_eq!(plan.sampled, vec![1]);
        assert!(plan.new.is_empty() && plan.freed.is_empty());
        new_blocks.push(plan.running[0].new_block_ids.len());
        s.check_invariants().unwrap();
        s.apply(behind, &[(1, 100 + behind as u32)]).unwrap();
        s.check_invariants().unwrap();
        behind += 1;
    }
    // Positions 5, 6 and 7 are in block 1; position 8 needs block 2.
    assert_eq!(new_blocks, vec![0, 0, 0, 1]);
    s.apply(behind, &[(1, 100 + behind as u32)]).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[100, 101, 102, 103, 104]);
    s.check_invariants().unwrap();
}

#[test]
fn apply_must_follow_the_order_of_schedule() {
    let mut s = Scheduler::new(config(4, 32));
    s.add(spec(1, prompt(0, 5), 10)).unwrap();
    let p0 = s.schedule().unwrap();
    let p1 = s.schedule().unwrap();
    assert_eq!(
        s.apply(p1.step_id, &tokens_for(&p1, 7)),
        Err(SchedulerError::StepMismatch {
            expected: p0.step_id,
            got: p1.step_id
        })
    );
    // The lagging plan samples 1 too, but this token belongs to step 0's placeholder only once.
    assert_eq!(
        s.apply(p0.step_id, &[(1, 7), (1, 8)]),
        Err(SchedulerError::UnexpectedSample {
            step_id: p0.step_id,
            id: 1
        })
    );
    s.apply(p0.step_id, &tokens_for(&p0, 7)).unwrap();
    s.apply(p1.step_id, &tokens_for(&p1, 8)).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[7, 8]);
    assert_eq!(
        s.apply(p1.step_id + 1, &[]),
        Err(SchedulerError::NoPlanOutstanding {
            got: p1.step_id + 1
        })
    );
}

#[test]
fn placeholders_count_toward_max_tokens_so_no_plan_samples_one_token_too_many() {
    for max_tokens in [1, 2, 5] {
        let mut s = Scheduler::new(config(4, 32));
        s.add(spec(1, prompt(0, 3), max_tokens)).unwrap();
        // The engine's loop with two plans in flight.
        let mut in_flight = std::collections::VecDeque::new();
        let mut sent = 0;
        loop {
            while in_flight.len() < 2 {
                let Some(plan) = s.schedule() else {
                    break;
                };
                assert_eq!(plan.sampled, vec![1]);
                in_flight.push_back(plan.step_id);
                sent += 1;
            }
            s.check_invariants().unwrap();
            let Some(step_id) = in_flight.pop_front() else {
                break;
            };
            s.apply(step_id, &[(1, step_id as u32)]).unwrap();
        }
        assert_eq!(sent, max_tokens);
        assert_eq!(s.output_token_ids(1).unwrap().len(), max_tokens);
    }
}

#[test]
fn a_sequence_at_max_model_len_counting_its_placeholder_is_not_scheduled() {
    let mut cfg = config(4, 8);
    cfg.max_model_len = 6;
    let mut s = Scheduler::new(cfg);
    s.add(spec(1, prompt(0, 5), 100)).unwrap();
    let p0 = s.schedule().unwrap(); // computes 5, samples the 6th token
    assert!(s.schedule().is_none(), "6 tokens with the placeholder");
    s.apply(p0.step_id, &tokens_for(&p0, 9)).unwrap();
    assert!(s.schedule().is_none());
    assert!(s.finish(1));
}

#[test]
fn a_sequence_finished_after_apply_is_ignored_in_the_plan_still_outstanding() {
    let mut s = Scheduler::new(config(4, 32));
    s.add(spec(1, prompt(0, 3), 10)).unwrap();
    s.add(spec(2, prompt(10, 3), 10)).unwrap();
    let p0 = s.schedule().unwrap();
    let p1 = s.schedule().unwrap();
    assert_eq!(p1.sampled, vec![1, 2]);
    s.apply(p0.step_id, &tokens_for(&p0, 5)).unwrap();
    // The engine sees a stop string in 1's output: 1 is done, but step 1 still computes it.
    assert!(s.finish(1));
    assert_eq!(s.block_pool().num_used(), 1, "1's block is free at once");
    let p2 = s.schedule().unwrap();
    assert_eq!(p2.freed, vec![1]);
    assert_eq!(scheduled(&p2), vec![(2, 1)]);
    s.apply(p1.step_id, &tokens_for(&p1, 6)).unwrap();
    assert_eq!(s.output_token_ids(1), None);
    assert_eq!(s.output_token_ids(2).unwrap(), &[5, 6]);
    s.apply(p2.step_id, &tokens_for(&p2, 7)).unwrap();
    assert_eq!(s.output_token_ids(2).unwrap(), &[5, 6, 7]);
    s.check_invariants().unwrap();
}

#[test]
fn aborts_with_two_plans_outstanding_are_ignored_by_both_applies() {
    let mut s = Scheduler::new(config(4, 32));
    for id in 1..=3 {
        s.add(spec(id, prompt(0, 3), 10)).unwrap();
    }
    let p0 = s.schedule().unwrap();
    let p1 = s.schedule().unwrap();
    assert_eq!(p1.sampled, vec![1, 2, 3]);
    assert!(s.abort(2));
    s.check_invariants().unwrap();
    // Only 1 and 3 are expected from each step, though the workers return 2's tokens too.
    assert_eq!(
        s.apply(p0.step_id, &[(1, 5)]),
        Err(SchedulerError::MissingSamples {
            step_id: p0.step_id,
            expected: 2,
            got: 1
        })
    );
    s.apply(p0.step_id, &tokens_for(&p0, 5)).unwrap();
    assert!(s.abort(3));
    s.apply(p1.step_id, &tokens_for(&p1, 6)).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[5, 6]);
    let p2 = s.schedule().unwrap();
    assert_eq!(p2.freed, vec![2, 3]);
    assert_eq!(scheduled(&p2), vec![(1, 1)]);
    s.apply(p2.step_id, &tokens_for(&p2, 7)).unwrap();
    assert!(s.finish(1));
    assert_eq!(s.block_pool().num_free(), 32);
    s.check_invariants().unwrap();
}

#[test]
fn an_id_reused_with_two_plans_outstanding_is_a_different_sequence_for_each() {
    let mut s = Scheduler::new(config(4, 32));
    s.add(spec(1, prompt(0, 3), 10)).unwrap();
    let p0 = s.schedule().unwrap();
    // The old 1 ends after step 0 was sent; a new 1 starts in step 1 beside it in `freed`.
    assert!(s.abort(1));
    s.add(spec(1, prompt(50, 2), 10)).unwrap();
    let p1 = s.schedule().unwrap();
    assert_eq!(p1.freed, vec![1]);
    assert_eq!(p1.new[0].token_ids, prompt(50, 2));
    assert_eq!(p1.sampled, vec![1]);
    // Step 0's token is the old 1's: ignored. Step 1's is the new 1's first.
    s.apply(p0.step_id, &[(1, 5)]).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[] as &[u32]);
    let p2 = s.schedule().unwrap();
    assert!(s.abort(1));
    s.add(spec(1, prompt(70, 2), 10)).unwrap();
    s.apply(p1.step_id, &[(1, 6)]).unwrap();
    s.apply(p2.step_id, &[(1, 7)]).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[] as &[u32]);
    let p3 = s.schedule().unwrap();
    assert_eq!(p3.freed, vec![1]);
    assert_eq!(p3.new[0].token_ids, prompt(70, 2));
    s.check_invariants().unwrap();
}

/// Seq 1 (max_tokens 1) idles at its limit holding a block while 2 needs a third block of a
/// pool of 3: 2 preempts itself while step 0 still samples it.
#[test]
fn a_sequence_preempted_with_a_sample_in_flight_keeps_that_token_and_restarts_with_it() {
    let mut s = Scheduler::new(config(4, 3));
    s.add(spec(1, prompt(0, 2), 1)).unwrap();
    s.add(spec(2, prompt(10, 8), 4)).unwrap();
    let p0 = s.schedule().unwrap();
    assert_eq!(p0.sampled, vec![1, 2]);
    // 1 is at max_tokens counting its placeholder; 2 yields its blocks, but is not re-admitted
    // while its token is unknown, though the pool could hold it again.
    assert!(s.schedule().is_none());
    assert_eq!(s.stats().num_preemptions, 1);
    assert_eq!(
        s.block_pool().num_free(),
        2,
        "2's blocks are back in the pool"
    );
    assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
    s.check_invariants().unwrap();
    s.apply(p0.step_id, &[(1, 40), (2, 41)]).unwrap();
    assert_eq!(
        s.output_token_ids(2).unwrap(),
        &[41],
        "the in-flight token is kept"
    );
    assert!(s.finish(1));
    let p1 = s.schedule().unwrap();
    assert_eq!(p1.freed, vec![2, 1]);
    let back = &p1.new[0];
    assert_eq!(back.id, 2);
    let mut all = prompt(10, 8);
    all.push(41);
    assert_eq!(back.token_ids, all);
    assert_eq!(
        (back.num_computed_tokens, back.num_scheduled_tokens),
        (0, 9)
    );
    assert_eq!(p1.sampled, vec![2]);
    s.check_invariants().unwrap();
}

/// Two sequences of 6 tokens in a pool of 4 blocks of 4, decoding two steps ahead: when 1
/// needs a third block, 2 is preempted although step 1 (not applied) computes and samples it.
#[test]
fn preemption_with_a_plan_in_flight_frees_the_blocks_and_registers_nothing_it_computed() {
    let mut cfg = config(4, 4);
    cfg.enable_prefix_caching = true;
    let mut s = Scheduler::new(cfg);
    s.add(spec(1, prompt(0, 6), 8)).unwrap();
    s.add(spec(2, prompt(10, 6), 8)).unwrap();
    step(&mut s); // both prefill: 2 blocks each, 7 tokens known
    let p1 = s.schedule().unwrap(); // computes 7
    let p2 = s.schedule().unwrap(); // computes 8: both tables full
    s.apply(p1.step_id, &tokens_for(&p1, 21)).unwrap();
    let p3 = s.schedule().unwrap();
    assert_eq!(p3.freed, vec![2]);
    assert_eq!(scheduled(&p3), vec![(1, 1)]);
    assert_eq!(p3.running[0].new_block_ids.len(), 1);
    s.check_invariants().unwrap();
    // Step 2 computed 2's second block full, but that block is free now: not cached.
    s.apply(p2.step_id, &tokens_for(&p2, 22)).unwrap();
    s.check_invariants().unwrap();
    assert_eq!(s.output_token_ids(2).unwrap(), &[1000, 21, 22]);
    let cached = (0..4)
        .filter(|&b| s.block_pool().block_hash(b).is_some())
        .count();
    assert_eq!(cached, 3, "1's two full blocks and 2's first");
    s.apply(p3.step_id, &tokens_for(&p3, 23)).unwrap();
    assert!(s.finish(1));
    let p4 = s.schedule().unwrap();
    assert_eq!(p4.new[0].id, 2);
    assert_eq!(
        p4.new[0].num_computed_tokens, 4,
        "only the block computed before the preemption"
    );
    s.check_invariants().unwrap();
}

#[test]
fn a_block_completed_by_a_placeholder_is_cached_only_after_the_step_that_computes_it() {
    let mut s = Scheduler::new(caching_config());
    s.add(spec(1, prompt(0, 7), 8)).unwrap();
    let p0 = s.schedule().unwrap(); // positions 0..7; samples position 7, the end of block 1
                                    // Block 0 is computed by step 0 but not applied: a twin prompt cannot hit it yet.
    s.add(spec(2, prompt(0, 7), 8)).unwrap();
    let p1 = s.schedule().unwrap(); // 1 computes its placeholder at position 7
    assert_eq!(p1.new[0].num_computed_tokens, 0);
    let table = p0.new[0].block_ids.clone();
    assert_eq!(s.block_pool().block_hash(table[0]), None);
    s.apply(p0.step_id, &[(1, 3), (2, 3)]).unwrap();
    assert!(s.block_pool().block_hash(table[0]).is_some());
    assert_eq!(
        s.block_pool().block_hash(table[1]),
        None,
        "block 1's last token was a placeholder when step 0 ran"
    );
    s.check_invariants().unwrap();
    s.apply(p1.step_id, &tokens_for(&p1, 4)).unwrap();
    assert!(s.block_pool().block_hash(table[1]).is_some());
    // A prompt continuing 1's real tokens now reuses both blocks.
    let mut cont = prompt(0, 7);
    cont.extend([3, 9]);
    s.add(spec(3, cont, 8)).unwrap();
    let p2 = s.schedule().unwrap();
    assert_eq!(p2.new[0].num_computed_tokens, 8);
    assert_eq!(p2.new[0].block_ids[..2], table[..2]);
    s.check_invariants().unwrap();
}

#[test]
fn a_guided_sequence_waits_for_its_token_while_a_plain_one_runs_every_step() {
    let mut s = Scheduler::new(config(4, 32));
    s.add(SequenceSpec {
        guided: true,
        ..spec(1, prompt(0, 5), 10)
    })
    .unwrap();
    s.add(spec(2, prompt(50, 5), 10)).unwrap();
    let p0 = s.schedule().unwrap();
    assert_eq!(p0.sampled, vec![1, 2]);
    // Step 0 is in flight: the guided sequence's next mask needs its token, so it sits out.
    let p1 = s.schedule().unwrap();
    assert_eq!(scheduled(&p1), vec![(2, 1)]);
    assert_eq!(p1.sampled, vec![2]);
    s.check_invariants().unwrap();
    s.apply(p0.step_id, &tokens_for(&p0, 7)).unwrap();
    // Its token is known now: the next plan samples it again, next to the plain one.
    let p2 = s.schedule().unwrap();
    assert_eq!(scheduled(&p2), vec![(1, 1), (2, 1)]);
    s.check_invariants().unwrap();
    s.apply(p1.step_id, &tokens_for(&p1, 8)).unwrap();
    let p3 = s.schedule().unwrap();
    assert_eq!(scheduled(&p3), vec![(2, 1)]);
    s.apply(p2.step_id, &tokens_for(&p2, 9)).unwrap();
    s.apply(p3.step_id, &tokens_for(&p3, 10)).unwrap();
    assert_eq!(s.output_token_ids(1).unwrap(), &[7, 9]);
    assert_eq!(s.output_token_ids(2).unwrap(), &[7, 8, 9, 10]);
    s.check_invariants().unwrap();
}
