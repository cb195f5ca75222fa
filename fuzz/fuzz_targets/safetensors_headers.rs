//! Safetensors header parsing: the input is a whole `.safetensors` file. The property (a reader
//! or an error, never a panic) is `tpserve_modelfile::fuzzing::check_safetensors_bytes`, the same
//! the proptest `damaged_safetensors_headers_are_errors_not_crashes` checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tpserve_modelfile::fuzzing::check_safetensors_bytes(data);
});
