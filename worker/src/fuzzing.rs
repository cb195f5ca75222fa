//! The step-plan fuzz property, shared by its two harnesses: the bounded proptest run
//! `tests/hostile_plans.rs` (stable toolchain, `cargo test`) and the libFuzzer target
//! `fuzz/fuzz_targets/step_plans.rs` (`cargo +nightly fuzz run`; docs/RELIABILITY.md). Not part
//! of the crate's API (hidden from its docs); nothing outside those harnesses calls it.
//!
//! Property ([`check_step_plans`]): the worker's step-plan decoder (`Runner::submit`, plans sent
//! ahead as the server's worker runs them: admission of new and running sequences, frees, block
//! tables, token ids fed from the step before, trace contexts, adapters, token masks) answers
//! any sequence of plans with results or errors, one answer each and in order, never a panic,
//! and still runs a valid plan afterwards. Costs: [`tiny_llama`] loads the 0.5 MB fixture and a 16-block cache
//! (milliseconds); a check is one CPU step per plan.

use std::collections::BTreeSet;
use std::path::Path;

use tpserve_proto as pb;

use crate::backend::DeviceChoice;
use crate::sampler::SampleSpec;
use crate::thread_group::ThreadGroup;

/// One CPU rank with `model_dir` (the repository's `tests/fixtures/tiny-llama`) loaded and a
/// cache of 16 blocks of 16 tokens, at most 4 sequences and 64 tokens a step.
pub fn tiny_llama(model_dir: &Path) -> ThreadGroup {
    let group = ThreadGroup::start(DeviceChoice::Cpu, 1, 1).expect("a CPU rank starts");
    let load = pb::LoadModelRequest {
        model_path: model_dir.display().to_string(),
        load_format: pb::LoadFormat::Auto as i32,
        dtype: "auto".into(),
        dummy_seed: 0,
        batch_invariant: false,
        ..Default::default()
    };
    group
        .on_all(move |_, r| r.load_model(&load))
        .expect("the fixture loads");
    let profile = pb::ProfileMemoryRequest {
        block_size: 16,
        kv_cache_bytes: 1 << 20,
        gpu_memory_utilization: 0.9,
        max_num_batched_tokens: 64,
        max_num_seqs: 4,
    };
    group
        .on_all(move |_, r| r.profile_memory(&profile))
        .expect("profiling runs");
    group
        .on_all(|_, r| r.init_cache(16, 16))
        .expect("the cache fits");
    group
}

/// Steps `group` through `plans` (any result is fine), then through a valid plan that frees
/// every sequence id the plans named and admits one fresh sequence of 5 tokens on block 0, which
/// must succeed; then frees that sequence too, so that `group` holds no sequence afterwards and can
/// be reused. Panics when the valid plan fails (or when a step panics: on its rank's thread,
/// which then answers the valid plan with an error).
pub fn check_step_plans(group: &ThreadGroup, plans: Vec<pb::StepPlan>) {
    let mut named = BTreeSet::new();
    for plan in &plans {
        named.extend(plan.new_sequences.iter().map(|n| n.sequence_id));
        named.extend(plan.running.iter().map(|r| r.sequence_id));
        named.extend(plan.freed_sequence_ids.iter().copied());
    }
    let last_step = plans.iter().map(|p| p.step_id).max().unwrap_or(0);
    let count = plans.len();
    let answered = group.on_all(move |_, r| Ok(r.submit_all(&plans).len()));
    if let Ok(answered) = answered {
        assert_eq!(answered[0], count, "one answer a plan");
    }
    let fresh = (0..)
        .find(|id| !named.contains(id))
        .expect("fewer ids than u64s");
    let valid = pb::StepPlan {
        step_id: last_step.wrapping_add(1),
        new_sequences: vec![pb::NewSequence {
            sequence_id: fresh,
            token_ids: vec![1, 2, 3, 4, 5],
            sampling: Some(SampleSpec::greedy().params),
            block_ids: vec![0],
            num_computed_tokens: 0,
            num_scheduled_tokens: 5,
            num_prompt_tokens: 5,
            ..Default::default()
        }],
        freed_sequence_ids: named.into_iter().collect(),
        ..Default::default()
    };
    let ran = group.on_all(move |_, r| r.step(&valid));
    assert!(
        ran.is_ok(),
        "a valid plan after hostile ones: {:?}",
        ran.err()
    );
    let free = pb::StepPlan {
        step_id: last_step.wrapping_add(2),
        freed_sequence_ids: vec![fresh],
        ..Default::default()
    };
    let freed = group.on_all(move |_, r| r.step(&free));
    assert!(
        freed.is_ok(),
        "freeing the valid sequence: {:?}",
        freed.err()
    );
}
