//! Bounded property runs (the stable-toolchain form of fuzzing, run by `cargo test`): the
//! worker's step-plan decoder (`Runner::step`: admission of new and running requests, frees,
//! block tables, token ids, trace contexts) takes sequences of arbitrary plans on the tiny Llama
//! fixture and answers each with a result or an error, never a panic, and still runs a valid
//! plan afterwards. `PROPTEST_CASES` raises the count (docs/RELIABILITY.md). The fixture and the
//! property are in `tpserve_worker::fuzzing`, shared with the libFuzzer target
//! `fuzz/fuzz_targets/step_plans.rs`.

use proptest::prelude::*;
use tpserve_proto as pb;
use tpserve_worker::fuzzing::{check_step_plans, tiny_llama};

/// Small numbers mostly (so plans are often almost valid), sometimes anything.
fn small() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..20, 1 => any::<u32>()]
}

fn new_sequence() -> impl Strategy<Value = pb::NewSequence> {
    (
        0u64..6,
        prop::collection::vec(prop_oneof![4 => 0u32..256, 1 => any::<u32>()], 0..40),
        prop::collection::vec(small(), 0..5),
        small(),
        small(),
        small(),
        (any::<bool>(), -2.0f32..3.0, any::<i32>()),
    )
        .prop_map(
            |(id, token_ids, block_ids, computed, scheduled, prompt, sampling)| pb::NewSequence {
                sequence_id: id,
                token_ids,
                sampling: sampling.0.then_some(pb::SamplingParams {
                    temperature: sampling.1,
                    top_p: sampling.1,
                    top_k: sampling.2,
                    min_p: sampling.1,
                    seed: Some(7),
                }),
                block_ids,
                num_computed_tokens: computed,
                num_scheduled_tokens: scheduled,
                num_prompt_tokens: prompt,
                ..Default::default()
            },
        )
}

fn plan() -> impl Strategy<Value = pb::StepPlan> {
    (
        prop::collection::vec(new_sequence(), 0..3),
        prop::collection::vec(
            (0u64..6, small(), prop::collection::vec(small(), 0..3)).prop_map(
                |(sequence_id, num_scheduled_tokens, new_block_ids)| pb::RunningSequence {
                    sequence_id,
                    num_scheduled_tokens,
                    new_block_ids,
                },
            ),
            0..3,
        ),
        prop::collection::vec(0u64..6, 0..3),
        prop::collection::hash_map(0u64..6, ".{0,60}", 0..2),
    )
        .prop_map(
            |(new_sequences, running, freed_sequence_ids, traceparents)| pb::StepPlan {
                step_id: 0,
                new_sequences,
                running,
                freed_sequence_ids,
                traceparents,
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn arbitrary_plans_are_results_or_errors_and_a_valid_plan_runs_after(
        plans in prop::collection::vec(plan(), 1..5)
    ) {
        let group = tiny_llama(&tpserve_e2e::repo_root().join("tests/fixtures/tiny-llama"));
        let plans = plans
            .into_iter()
            .enumerate()
            .map(|(i, plan)| pb::StepPlan { step_id: i as u64 + 1, ..plan })
            .collect();
        check_step_plans(&group, plans);
    }
}
