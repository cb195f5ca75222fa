//! The worker's step-plan decoder: the input is up to 4 length-delimited protobuf `StepPlan`s (as
//! on the wire, so prost's decoder is under test too; decoding stops at the first error). The
//! property (each plan a result or an error, never a panic, and a valid plan runs after) is
//! `tpserve_worker::fuzzing::check_step_plans`, the same the proptest
//! `arbitrary_plans_are_results_or_errors_and_a_valid_plan_runs_after` checks.
//!
//! Unlike the proptest, which loads the fixture for every case, one worker is loaded per process
//! and reused: `check_step_plans` leaves it holding no request, so an input sees the same
//! admission state as on a fresh worker (only KV cache contents carry over, and no admission
//! decision reads them); loading per input would cost most of the run.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tpserve_proto as pb;
use tpserve_worker::fuzzing::{check_step_plans, tiny_llama};
use tpserve_worker::thread_group::ThreadGroup;

static GROUP: OnceLock<ThreadGroup> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let group = GROUP.get_or_init(|| {
        tiny_llama(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama"))
    });
    let mut buf = data;
    let mut plans = Vec::new();
    while plans.len() < 4 && !buf.is_empty() {
        match pb::StepPlan::decode_length_delimited(&mut buf) {
            Ok(plan) => plans.push(plan),
            Err(_) => break,
        }
    }
    check_step_plans(group, plans);
});
