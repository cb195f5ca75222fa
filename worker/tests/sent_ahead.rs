//! Steps sent ahead (`Runner::submit`, as the server's worker runs them: step N+1 is launched
//! before step N is answered, its decode rows fed the tokens step N sampled) answer exactly what
//! the same plans answer one at a time (`Runner::step`), in plan order, on one rank and on two:
//! through frees of a sequence whose token is in flight, an id reused in the plan after, a
//! sequence joining, a bad plan between two good ones (refused, nothing changed), and a step
//! with log probabilities (which needs the tokens on the host first). Tiny Llama on the CPU,
//! sampled at temperature 1 with seeds, so a token fed to the wrong row shows.

mod common;

use common::tiny_llama_group;
use tpserve_proto as pb;

/// A request of `tokens` prompt tokens (`id`, `id + 1`, ...) on 4 blocks from `first_block` on,
/// sampled at temperature 1 with seed `id`.
fn new_sequence(id: u64, tokens: u32, first_block: u32) -> pb::NewSequence {
    pb::NewSequence {
        sequence_id: id,
        token_ids: (id as u32..id as u32 + tokens).collect(),
        sampling: Some(pb::SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: Some(id),
        }),
        block_ids: (first_block..first_block + 4).collect(),
        num_computed_tokens: 0,
        num_scheduled_tokens: tokens,
        ..Default::default()
    }
}

fn decode(ids: &[u64]) -> Vec<pb::RunningSequence> {
    ids.iter()
        .map(|&id| pb::RunningSequence {
            sequence_id: id,
            num_scheduled_tokens: 1,
            new_block_ids: vec![],
        })
        .collect()
}

/// The plans, numbered in order.
fn plans() -> Vec<pb::StepPlan> {
    let plan = |new: Vec<pb::NewSequence>, running: Vec<pb::RunningSequence>, freed: Vec<u64>| {
        pb::StepPlan {
            new_sequences: new,
            running,
            freed_sequence_ids: freed,
            ..Default::default()
        }
    };
    let mut with_logprobs = new_sequence(4, 6, 16);
    with_logprobs.logprobs = Some(pb::LogprobsRequest {
        sample: Some(3),
        prompt: None,
    });
    let mut plans = vec![
        plan(
            vec![new_sequence(1, 5, 0), new_sequence(2, 7, 4)],
            vec![],
            vec![],
        ),
        plan(vec![], decode(&[1, 2]), vec![]),
        plan(vec![], decode(&[1, 2]), vec![]),
        // 3 joins next to two decodes.
        plan(vec![new_sequence(3, 9, 8)], decode(&[1, 2]), vec![]),
        plan(vec![], decode(&[1, 2, 3]), vec![]),
        // 2 is freed with its token in flight; a bad plan (2 is gone) changes nothing.
        plan(vec![], decode(&[1, 3]), vec![2]),
        plan(vec![], decode(&[2]), vec![]),
        plan(vec![], decode(&[1, 3]), vec![]),
        // Id 1 again: a new request in the plan that frees the old one (token in flight).
        plan(vec![new_sequence(1, 4, 12)], decode(&[3]), vec![1]),
        plan(vec![], decode(&[1, 3]), vec![]),
        // A sequence with log probabilities joins: this step waits for the tokens.
        plan(vec![with_logprobs], decode(&[1, 3]), vec![]),
        plan(vec![], decode(&[1, 3, 4]), vec![]),
        plan(vec![], decode(&[1, 3, 4]), vec![]),
        plan(vec![], decode(&[1, 3]), vec![]),
        plan(vec![], decode(&[1, 3]), vec![4]),
    ];
    for (i, p) in plans.iter_mut().enumerate() {
        p.step_id = i as u64 + 1;
    }
    plans
}

/// What a step answered on rank 0: its tokens (with their log probabilities' top tokens), or
/// its error.
type Answer = Result<Vec<(u64, u32, usize)>, String>;

fn summary(outcome: tpserve_worker::error::Result<tpserve_worker::runner::StepOutcome>) -> Answer {
    outcome
        .map(|o| {
            o.tokens
                .iter()
                .map(|t| {
                    let top = t.logprobs.as_ref().map_or(0, |l| l.top_token_ids.len());
                    (t.sequence_id, t.token_id, top)
                })
                .collect()
        })
        .map_err(|e| e.to_string())
}

fn one_at_a_time(tp: usize) -> Vec<Answer> {
    let group = tiny_llama_group(tp);
    let plans = plans();
    let mut answers = group
        .on_all(move |_, r| Ok(plans.iter().map(|p| summary(r.step(p))).collect()))
        .unwrap();
    answers.swap_remove(0)
}

fn sent_ahead(tp: usize) -> Vec<Answer> {
    let group = tiny_llama_group(tp);
    let plans = plans();
    let mut answers = group
        .on_all(move |_, r| {
            let answers = r.submit_all(&plans);
            let order: Vec<u64> = answers.iter().map(|a| a.step_id).collect();
            assert_eq!(order, (1..=plans.len() as u64).collect::<Vec<_>>());
            Ok(answers.into_iter().map(|a| summary(a.outcome)).collect())
        })
        .unwrap();
    answers.swap_remove(0)
}

fn check(tp: usize) {
    let expected = one_at_a_time(tp);
    let got = sent_ahead(tp);
    assert_eq!(got, expected);
    // The scenario is what it says: the bad plan is refused, the rest answer.
    let errors: Vec<usize> = expected
        .iter()
        .enumerate()
        .filter(|(_, a)| a.is_err())
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(errors, vec![7], "{expected:?}");
    assert!(
        expected[6]
            .as_ref()
            .unwrap_err()
            .contains("sequence 2 is not running"),
        "{:?}",
        expected[6]
    );
    let step = |n: usize| expected[n - 1].as_ref().unwrap();
    assert_eq!(step(1).len(), 2);
    assert_eq!(step(5).len(), 3);
    assert!(
        step(12).iter().any(|t| t.0 == 4 && t.2 == 3),
        "{:?}",
        step(12)
    );
}

#[test]
fn steps_sent_ahead_answer_what_steps_run_one_at_a_time() {
    check(1);
}

#[test]
fn steps_sent_ahead_answer_the_same_at_two_ranks() {
    check(2);
}
