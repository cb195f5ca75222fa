//! Request JSON -> checked parameters: the input is a request body as sent over HTTP. The
//! property (a 400 or parameters, never a panic) is `tpserve_coordinator::api::fuzz`'s, the same
//! the proptest `any_request_json_becomes_checked_params_or_a_400` checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tpserve_coordinator::api::fuzz::check_request_json(data);
});
