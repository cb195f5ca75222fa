//! Hugging Face directories written on the fly: small random checkpoints (single file and
//! sharded), config and generation config, tokenizer_config with chat templates. No real model
//! needed.

use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use tpserve_modelfile::{ChatMessage, Error, Format, ModelSource, WeightReader};

/// Deterministic pseudo-random values in [-1, 1) (a 64-bit LCG; no rand dependency needed).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    /// The exact f32 values the bytes encode.
    f32s: Vec<f32>,
}

fn tensor(name: &str, dtype: Dtype, shape: &[usize], seed: u64) -> T {
    let n = shape.iter().product();
    let v = values(seed, n);
    let (bytes, f32s) = match dtype {
        Dtype::F32 => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), v),
        Dtype::F16 => {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        }
        Dtype::BF16 => {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f32()).collect(),
            )
        }
        Dtype::I64 => (vec![0u8; n * 8], vec![0.0; n]),
        other => panic!("test helper does not write {other:?}"),
    };
    T {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        bytes,
        f32s,
    }
}

fn write_safetensors(path: &Path, tensors: &[&T]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

const CONFIG: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32,
  "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 128,
  "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
}"#;

/// A two-layer Llama with mixed dtypes.
fn llama_tensors() -> Vec<T> {
    let mut out = vec![
        tensor("model.embed_tokens.weight", Dtype::BF16, &[32, 16], 1),
        tensor("model.norm.weight", Dtype::F32, &[16], 2),
        tensor("lm_head.weight", Dtype::F16, &[32, 16], 3),
    ];
    for l in 0..2u64 {
        let p = format!("model.layers.{l}");
        let s = 100 * (l + 1);
        out.push(tensor(
            &format!("{p}.input_layernorm.weight"),
            Dtype::F32,
            &[16],
            s,
        ));
        out.push(tensor(
            &format!("{p}.post_attention_layernorm.weight"),
            Dtype::F32,
            &[16],
            s + 1,
        ));
        out.push(tensor(
            &format!("{p}.self_attn.q_proj.weight"),
            Dtype::F16,
            &[16, 16],
            s + 2,
        ));
        out.push(tensor(
            &format!("{p}.self_attn.k_proj.weight"),
            Dtype::BF16,
            &[8, 16],
            s + 3,
        ));
        out.push(tensor(
            &format!("{p}.self_attn.v_proj.weight"),
            Dtype::F32,
            &[8, 16],
            s + 4,
        ));
        out.push(tensor(
            &format!("{p}.self_attn.o_proj.weight"),
            Dtype::F16,
            &[16, 16],
            s + 5,
        ));
        out.push(tensor(
            &format!("{p}.mlp.gate_proj.weight"),
            Dtype::BF16,
            &[24, 16],
            s + 6,
        ));
        out.push(tensor(
            &format!("{p}.mlp.up_proj.weight"),
            Dtype::F32,
            &[24, 16],
            s + 7,
        ));
        out.push(tensor(
            &format!("{p}.mlp.down_proj.weight"),
            Dtype::F16,
            &[16, 24],
            s + 8,
        ));
    }
    out
}

fn write_dir(dir: &Path, tensors: &[T], shards: usize) {
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    if shards == 1 {
        write_safetensors(
            &dir.join("model.safetensors"),
            &tensors.iter().collect::<Vec<_>>(),
        );
        return;
    }
    let mut weight_map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let part: Vec<&T> = tensors.iter().skip(s).step_by(shards).collect();
        for t in &part {
            weight_map.insert(t.name.clone(), serde_json::Value::String(file.clone()));
        }
        write_safetensors(&dir.join(&file), &part);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn assert_reads_exactly(w: &dyn WeightReader, tensors: &[T]) {
    let mut want: Vec<String> = tensors.iter().map(|t| t.name.clone()).collect();
    want.sort();
    assert_eq!(w.names(), want);
    for t in tensors {
        assert!(w.contains(&t.name));
        assert_eq!(w.shape(&t.name).unwrap(), t.shape, "{}", t.name);
        let got = w.read(&t.name).unwrap();
        assert_eq!(got.dtype(), candle_core::DType::F32);
        assert_eq!(got.dims(), t.shape.as_slice());
        let flat: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(flat, t.f32s, "{} ({:?})", t.name, t.dtype);
    }
}

#[test]
fn single_file_checkpoint_reads_f32_f16_and_bf16_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = llama_tensors();
    write_dir(dir.path(), &tensors, 1);
    let src = ModelSource::open(dir.path(), None).unwrap();
    assert_eq!(src.format(), Format::Safetensors);
    assert_reads_exactly(src.weights().unwrap().as_ref(), &tensors);
}

#[test]
fn sharded_checkpoint_is_read_through_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = llama_tensors();
    write_dir(dir.path(), &tensors, 3);
    assert!(!dir.path().join("model.safetensors").exists());
    let src = ModelSource::open(dir.path(), Some(Format::Safetensors)).unwrap();
    assert_reads_exactly(src.weights().unwrap().as_ref(), &tensors);
}

#[test]
fn index_naming_the_wrong_shard_is_a_parse_error() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 2);
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).unwrap();
    let text = text.replacen("model-00001-of-00002", "model-00002-of-00002", 1);
    std::fs::write(&index_path, text).unwrap();
    let err = ModelSource::open(dir.path(), None)
        .unwrap()
        .weights()
        .err()
        .unwrap();
    assert!(matches!(err, Error::Parse { .. }), "{err}");
}

#[test]
fn read_slice_equals_narrow_of_read_along_every_dim() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    let w = ModelSource::open(dir.path(), None)
        .unwrap()
        .weights()
        .unwrap();
    for name in [
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
    ] {
        let whole = w.read(name).unwrap();
        for dim in 0..2 {
            let size = whole.dims()[dim];
            for (start, len) in [
                (0, size),
                (0, size / 2),
                (size / 2, size - size / 2),
                (3, 5),
                (size - 1, 1),
                (4, 0),
            ] {
                let want: Vec<f32> = whole
                    .narrow(dim, start, len)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let got = w.read_slice(name, dim, start, len).unwrap();
                let mut shape = whole.dims().to_vec();
                shape[dim] = len;
                assert_eq!(got.dims(), shape.as_slice());
                assert_eq!(
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want,
                    "{name} dim {dim} {start}+{len}"
                );
            }
        }
    }
    let norm = w.read("model.norm.weight").unwrap();
    let part = w.read_slice("model.norm.weight", 0, 4, 8).unwrap();
    assert_eq!(
        part.to_vec1::<f32>().unwrap(),
        norm.narrow(0, 4, 8).unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn out_of_range_slices_and_unknown_names_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    let w = ModelSource::open(dir.path(), None)
        .unwrap()
        .weights()
        .unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert!(matches!(
        w.read_slice(name, 0, 10, 7),
        Err(Error::Tensor { .. })
    ));
    assert!(matches!(
        w.read_slice(name, 2, 0, 1),
        Err(Error::Tensor { .. })
    ));
    assert!(matches!(
        w.read_slice(name, 1, usize::MAX, 2),
        Err(Error::Tensor { .. })
    ));
    assert!(matches!(w.read("nope"), Err(Error::MissingTensor { name }) if name == "nope"));
    assert!(matches!(w.shape("nope"), Err(Error::MissingTensor { .. })));
    assert!(!w.contains("nope"));
}

#[test]
fn unsupported_safetensors_dtype_names_the_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let good = tensor("model.norm.weight", Dtype::F32, &[16], 1);
    let bad = tensor("model.position_ids", Dtype::I64, &[4], 2);
    write_safetensors(&dir.path().join("model.safetensors"), &[&good, &bad]);
    let err = ModelSource::open(dir.path(), None)
        .unwrap()
        .weights()
        .err()
        .unwrap();
    match err {
        Error::UnsupportedTensorType { tensor, dtype } => {
            assert_eq!(tensor, "model.position_ids");
            assert_eq!(dtype, "I64");
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn corrupt_safetensors_file_is_a_parse_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let good = tensor("model.norm.weight", Dtype::F32, &[16], 1);
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, &[&good]);
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 4, 12, bytes.len() - 3] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = ModelSource::open(dir.path(), None)
            .unwrap()
            .weights()
            .err()
            .unwrap();
        assert!(matches!(err, Error::Parse { .. }), "cut {cut}: {err}");
    }
    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert!(matches!(
        ModelSource::open(dir.path(), None).unwrap().weights(),
        Err(Error::Parse { .. })
    ));
}

#[test]
fn directory_config_merges_generation_config_eos_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20}"#,
    )
    .unwrap();
    let src = ModelSource::open(dir.path(), None).unwrap();
    let c = src.config();
    assert_eq!(c.eos_token_ids, vec![2, 7]);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.head_dim, 4);
    assert_eq!(c.rope_theta, 500000.0);
    let rs = c.rope_scaling.as_ref().unwrap();
    assert_eq!(
        (
            rs.factor,
            rs.low_freq_factor,
            rs.high_freq_factor,
            rs.original_max_position_embeddings
        ),
        (8.0, 1.0, 4.0, 64)
    );
    let g = src.generation_defaults();
    assert_eq!(
        (g.temperature, g.top_p, g.top_k),
        (Some(0.6), Some(0.9), Some(20))
    );
}

#[test]
fn directory_without_generation_config_has_empty_defaults() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    let src = ModelSource::open(dir.path(), None).unwrap();
    assert_eq!(src.generation_defaults(), Default::default());
    assert_eq!(src.config().eos_token_ids, vec![2]);
}

fn chat() -> Vec<ChatMessage> {
    vec![
        ChatMessage {
            role: "system".into(),
            content: "  Be brief.  ".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "Hi".into(),
        },
    ]
}

#[test]
fn chat_template_list_takes_the_default_entry_with_token_strings() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    let tc = serde_json::json!({
        "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content.strip() }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}
        ]
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), tc.to_string()).unwrap();
    let ct = ModelSource::open(dir.path(), None)
        .unwrap()
        .chat_template()
        .unwrap()
        .unwrap();
    assert_eq!(
        ct.render(&chat(), true).unwrap(),
        "<s>[system]Be brief.</s>[user]Hi</s>[assistant]"
    );
}

#[test]
fn chat_template_jinja_file_wins_over_tokenizer_config() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": "OLD", "eos_token": "</s>"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}\n",
    )
    .unwrap();
    let ct = ModelSource::open(dir.path(), None)
        .unwrap()
        .chat_template()
        .unwrap()
        .unwrap();
    assert_eq!(
        ct.render(&chat(), false).unwrap(),
        "  Be brief.  </s>Hi</s>"
    );
}

#[test]
fn directory_without_chat_template_or_tokenizer_says_so() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    let src = ModelSource::open(dir.path(), None).unwrap();
    assert!(src.chat_template().unwrap().is_none());
    assert!(matches!(src.tokenizer(), Err(Error::Tokenizer { .. })));
}

#[test]
fn directory_tokenizer_json_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &llama_tensors(), 1);
    let tokenizer_json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}
    });
    std::fs::write(
        dir.path().join("tokenizer.json"),
        tokenizer_json.to_string(),
    )
    .unwrap();
    let tok = ModelSource::open(dir.path(), None)
        .unwrap()
        .tokenizer()
        .unwrap();
    assert_eq!(tok.encode("hello world", false).unwrap().get_ids(), &[1, 2]);
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        CONFIG.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"),
    )
    .unwrap();
    match ModelSource::open(dir.path(), None).unwrap_err() {
        Error::UnsupportedArchitecture { name } => assert_eq!(name, "GPTNeoXForCausalLM"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn paths_that_are_no_model_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A directory without config.json.
    assert!(matches!(
        ModelSource::open(dir.path(), None),
        Err(Error::Io { .. })
    ));
    // A file that is not .gguf.
    let txt = dir.path().join("model.bin");
    std::fs::write(&txt, b"x").unwrap();
    assert!(matches!(
        ModelSource::open(&txt, None),
        Err(Error::UnknownFormat { .. })
    ));
    // A directory asked to be GGUF.
    assert!(matches!(
        ModelSource::open(dir.path(), Some(Format::Gguf)),
        Err(Error::UnknownFormat { .. })
    ));
    // A missing path.
    assert!(matches!(
        ModelSource::open(&dir.path().join("absent"), None),
        Err(Error::Io { .. })
    ));
    // A .gguf that is not GGUF, and one cut short.
    let gguf = dir.path().join("bad.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    assert!(matches!(
        ModelSource::open(&gguf, None),
        Err(Error::Parse { .. })
    ));
    std::fs::write(&gguf, b"not a gguf at all").unwrap();
    assert!(matches!(
        ModelSource::open(&gguf, None),
        Err(Error::Parse { .. })
    ));
}

#[test]
fn format_parses_load_format_names() {
    assert_eq!("gguf".parse::<Format>().unwrap(), Format::Gguf);
    assert_eq!(
        "Safetensors".parse::<Format>().unwrap(),
        Format::Safetensors
    );
    assert!("pt".parse::<Format>().is_err());
    assert_eq!(Format::Gguf.to_string(), "gguf");
}
