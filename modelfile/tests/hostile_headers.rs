//! Bounded property runs (the stable-toolchain form of fuzzing, run by `cargo test`): GGUF and
//! safetensors files whose headers are cut short or have bytes flipped open as a model or as
//! weights, or fail with an error, and never panic or try to allocate what the file cannot hold.
//! The seeds are small valid files built here. `PROPTEST_CASES` raises the count
//! (docs/RELIABILITY.md).

use std::io::Write;

use proptest::prelude::*;
use tpserve_modelfile::weights::SafetensorsReader;
use tpserve_modelfile::{Format, ModelSource};

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A valid GGUF v3 file: a few Llama metadata keys and one f32 tensor of 4 values.
fn seed_gguf() -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&1u64.to_le_bytes()); // tensors
    let kv: &[(&str, u32)] = &[
        ("llama.block_count", 1),
        ("llama.embedding_length", 4),
        ("llama.attention.head_count", 1),
        ("llama.feed_forward_length", 8),
        ("llama.vocab_size", 4),
        ("llama.context_length", 64),
    ];
    out.extend_from_slice(&(kv.len() as u64 + 1).to_le_bytes());
    gguf_string(&mut out, "general.architecture");
    out.extend_from_slice(&8u32.to_le_bytes()); // string
    gguf_string(&mut out, "llama");
    for (key, value) in kv {
        gguf_string(&mut out, key);
        out.extend_from_slice(&4u32.to_le_bytes()); // u32
        out.extend_from_slice(&value.to_le_bytes());
    }
    gguf_string(&mut out, "token_embd.weight");
    out.extend_from_slice(&1u32.to_le_bytes()); // dims
    out.extend_from_slice(&4u64.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // f32
    out.extend_from_slice(&0u64.to_le_bytes()); // offset
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    for x in [1.0f32, 2.0, 3.0, 4.0] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A valid safetensors file with one f32 tensor of 4 values.
fn seed_safetensors() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    for x in [1.0f32, 2.0, 3.0, 4.0] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn damaged_gguf_headers_are_errors_not_crashes((cut, flips) in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "m.gguf", &mutate(&seed_gguf(), cut, &flips));
        if let Ok(source) = ModelSource::open(&path, Some(Format::Gguf)) {
            let _ = source.weights().map(|w| w.names());
            let _ = source.tokenizer();
        }
    }

    #[test]
    fn damaged_safetensors_headers_are_errors_not_crashes((cut, flips) in mutation()) {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "m.safetensors", &mutate(&seed_safetensors(), cut, &flips));
        let _ = SafetensorsReader::open_file(&path);
    }
}
