//! Bounded property runs (the stable-toolchain form of fuzzing, run by `cargo test`): GGUF and
//! safetensors files whose headers are cut short or have bytes flipped open as a model or as
//! weights, or fail with an error, and never panic or try to allocate what the file cannot hold.
//! The seeds are small valid files. `PROPTEST_CASES` raises the count (docs/RELIABILITY.md). The
//! seeds and the properties are in `tpserve_modelfile::fuzzing`, shared with the libFuzzer targets
//! `fuzz/fuzz_targets/{gguf,safetensors}_headers.rs`.

use std::io::Write;

use proptest::prelude::*;
use tpserve_modelfile::fuzzing::{
    check_gguf_bytes, check_safetensors_bytes, seed_gguf, seed_safetensors,
};
use tpserve_modelfile::weights::SafetensorsReader;
use tpserve_modelfile::{Format, ModelSource};

/// `seed` cut at `cut` (when shorter) with `flips` applied (position modulo the length).
fn mutate(seed: &[u8], cut: usize, flips: &[(usize, u8)]) -> Vec<u8> {
    let mut bytes = seed[..cut.min(seed.len())].to_vec();
    if !bytes.is_empty() {
        let n = bytes.len();
        for &(at, value) in flips {
            bytes[at % n] = value;
        }
    }
    bytes
}

fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(bytes))
        .unwrap();
    path
}

fn mutation() -> impl Strategy<Value = (usize, Vec<(usize, u8)>)> {
    (
        prop_oneof![Just(usize::MAX), 0usize..400],
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    )
}

#[test]
fn the_seeds_are_valid_files() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = write(&dir, "m.gguf", &seed_gguf());
    let source = ModelSource::open(&gguf, Some(Format::Gguf));
    assert!(source.is_ok(), "{:?}", source.err());
    let st = write(&dir, "m.safetensors", &seed_safetensors());
    assert!(SafetensorsReader::open_file(&st).is_ok());
}

/// The libFuzzer targets' GGUF and safetensors seeds (`fuzz/corpus/*_headers/seed-valid`) are
/// this file's seed files; `TPSERVE_WRITE_FUZZ_SEEDS=1` (re)writes them.
#[test]
fn the_fuzz_corpus_seeds_are_the_seed_files() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, bytes) in [
        ("gguf_headers", seed_gguf()),
        ("safetensors_headers", seed_safetensors()),
    ] {
        let path = corpus.join(target).join("seed-valid");
        if std::env::var_os("TPSERVE_WRITE_FUZZ_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == bytes,
            "{} differs from the seed: rerun with TPSERVE_WRITE_FUZZ_SEEDS=1",
            path.display()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn damaged_gguf_headers_are_errors_not_crashes((cut, flips) in mutation()) {
        check_gguf_bytes(&mutate(&seed_gguf(), cut, &flips));
    }

    #[test]
    fn damaged_safetensors_headers_are_errors_not_crashes((cut, flips) in mutation()) {
        check_safetensors_bytes(&mutate(&seed_safetensors(), cut, &flips));
    }
}
