//! GGUF header parsing: the input is a whole `.gguf` file. The property (a model or an error,
//! never a panic nor an allocation the file cannot justify) is
//! `tpserve_modelfile::fuzzing::check_gguf_bytes`, the same the proptest
//! `damaged_gguf_headers_are_errors_not_crashes` checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tpserve_modelfile::fuzzing::check_gguf_bytes(data);
});
