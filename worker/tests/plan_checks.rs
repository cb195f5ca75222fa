//! The runner refuses, on every rank and before any collective, a batch whose token ids are
//! outside the vocabulary or whose positions have no rotary table (tiny Llama: vocabulary 256,
//! 512 positions), and keeps working afterwards.

mod common;

use common::tiny_llama_group;
use tpserve_proto as pb;

#[test]
fn token_ids_outside_the_vocabulary_and_positions_past_the_tables_are_refused() {
    let group = tiny_llama_group(2);
    let errors = group
        .on_all(|_, r| Ok(r.prompt_logits(&[1, 2, 256], 8).unwrap_err().to_string()))
        .unwrap();
    for e in &errors {
        assert!(
            e.contains("token id 256 is outside the vocabulary of 256"),
            "{e}"
        );
    }
    let long: Vec<u32> = (0..513).map(|i| i % 200).collect();
    let errors = group
        .on_all(move |_, r| Ok(r.prompt_logits(&long, 64).unwrap_err().to_string()))
        .unwrap();
    for e in &errors {
        assert!(
            e.contains("position 512 is beyond the model's 512 positions"),
            "{e}"
        );
    }
    let fine = group
        .on_all(|_, r| r.prompt_logits(&[1, 2, 255], 8))
        .unwrap();
    assert_eq!(fine[0].as_ref().map(Vec::len), Some(3 * 256));
}

/// A new request of `tokens` prompt tokens on the blocks from `first_block` on.
fn new_sequence(id: u64, tokens: usize, first_block: u32) -> pb::NewSequence {
    pb::NewSequence {
        sequence_id: id,
        token_ids: (1..=tokens as u32).collect(),
        sampling: Some(tpserve_worker::sampler::SampleSpec::greedy().params),
        block_ids: (first_block..first_block + tokens.div_ceil(16) as u32).collect(),
        num_computed_tokens: 0,
        num_scheduled_tokens: tokens as u32,
        ..Default::default()
    }
}

#[test]
fn a_plan_holding_more_sequences_than_a_step_may_carry_is_refused_and_freed_rows_are_reused() {
    let group = tiny_llama_group(1);
    let profile = pb::ProfileMemoryRequest {
        block_size: 16,
        kv_cache_bytes: 1 << 20,
        gpu_memory_utilization: 0.9,
        max_num_batched_tokens: 64,
        max_num_seqs: 2,
    };
    group
        .on_all(move |_, r| r.profile_memory(&profile))
        .unwrap();
    group.on_all(|_, r| r.init_cache(64, 16)).unwrap();
    let plan = |step_id, new: Vec<pb::NewSequence>, freed: Vec<u64>| pb::StepPlan {
        step_id,
        new_sequences: new,
        running: vec![],
        freed_sequence_ids: freed,
        ..Default::default()
    };
    let three = plan(
        1,
        vec![
            new_sequence(1, 5, 0),
            new_sequence(2, 5, 1),
            new_sequence(3, 5, 2),
        ],
        vec![],
    );
    let err = group
        .on_all(move |_, r| Ok(r.step(&three).unwrap_err().to_string()))
        .unwrap();
    assert!(
        err[0].contains("3 sequences on this worker, more than the 2 a step may carry"),
        "{}",
        err[0]
    );
    // Two fit; freeing one makes room for a third in the same plan, and its answer is the
    // same as the same prompt's answer before.
    let two = plan(
        2,
        vec![new_sequence(1, 5, 0), new_sequence(2, 7, 1)],
        vec![],
    );
    let first = group
        .on_all(move |_, r| r.step(&two).map(|o| o.tokens))
        .unwrap();
    let swap = plan(3, vec![new_sequence(3, 5, 2)], vec![1]);
    let second = group
        .on_all(move |_, r| r.step(&swap).map(|o| o.tokens))
        .unwrap();
    assert_eq!(first[0][0].token_id, second[0][0].token_id);
}
