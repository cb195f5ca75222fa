//! The properties the fuzz targets check, shared by their two forms: the bounded proptest runs on
//! the stable toolchain (`tests/hostile_chat.rs`, `tests/hostile_headers.rs`) and the libFuzzer
//! targets under `fuzz/` (`cargo +nightly fuzz run`; docs/RELIABILITY.md). Not part of the
//! crate's API (hidden from its docs); nothing outside those harnesses calls it.
//!
//! Each `check_*` function panics when its property fails, so both harnesses report the input
//! (proptest catches the panic and shrinks; libFuzzer saves the crashing input). The header checks
//! write their bytes to a file of their own under the system temporary directory (the readers
//! take paths: they map files) and remove it afterwards; costs are one small file write per call.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::weights::SafetensorsReader;
use crate::{ChatMessage, ChatTemplate, Format, ModelSource};

/// SmolLM2's chat template (ChatML): it raises on nothing, so any messages must render.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Renders `messages` through [`CHATML`]. Property: the render succeeds, every role and content
/// appears verbatim (as text, never evaluated as template code), and the text ends with the
/// assistant header exactly when `add_generation_prompt` is set.
pub fn check_chatml_render(messages: &[ChatMessage], add_generation_prompt: bool) {
    // Compiled once per process: the fuzz loop calls this millions of times.
    static TEMPLATE: OnceLock<ChatTemplate> = OnceLock::new();
    let template = TEMPLATE.get_or_init(|| {
        ChatTemplate::new(CHATML.to_string(), None, None).expect("ChatML compiles")
    });
    let text = template
        .render(messages, add_generation_prompt)
        .expect("ChatML renders any strings");
    for m in messages {
        assert!(text.contains(&m.content), "content rendered verbatim");
        assert!(text.contains(&m.role), "role rendered verbatim");
    }
    assert_eq!(
        text.ends_with("<|im_start|>assistant\n"),
        add_generation_prompt,
        "the generation prompt ends the text exactly when asked for"
    );
}

/// Opens `bytes` as a GGUF model file and, when that works, lists its weights and builds its
/// tokenizer. Property: every step is a result or an error, never a panic (nor, under libFuzzer,
/// an allocation larger than the file could justify).
pub fn check_gguf_bytes(bytes: &[u8]) {
    let file = ScratchFile::new("gguf", bytes);
    if let Ok(source) = ModelSource::open(&file.0, Some(Format::Gguf)) {
        let _ = source.weights().map(|w| w.names());
        let _ = source.tokenizer();
    }
}

/// Opens `bytes` as a single `.safetensors` file. Property: a reader or an error, never a panic.
pub fn check_safetensors_bytes(bytes: &[u8]) {
    let file = ScratchFile::new("safetensors", bytes);
    let _ = SafetensorsReader::open_file(&file.0);
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A valid GGUF v3 file (the seed both harnesses damage): a few Llama metadata keys and one f32
/// tensor of 4 values.
pub fn seed_gguf() -> Vec<u8> {
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

/// A valid safetensors file (the other seed) with one f32 tensor of 4 values.
pub fn seed_safetensors() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    for x in [1.0f32, 2.0, 3.0, 4.0] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A file holding the bytes under test, named uniquely within the process (the proptest runs
/// are concurrent threads of one process), removed when dropped (also when a check panics).
struct ScratchFile(PathBuf);

impl ScratchFile {
    fn new(extension: &str, bytes: &[u8]) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "tpserve-fuzz-{}-{n}.{extension}",
            std::process::id()
        ));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        ScratchFile(path)
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
