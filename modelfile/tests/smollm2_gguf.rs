//! Tests against the real default model, SmolLM2-135M-Instruct Q4_1 GGUF, fetched by
//! `scripts/fetch-default-model.sh`. References (token ids, dequantized weight statistics) come
//! from `tests/fixtures/smollm2_goldens.json`, written by `tests/fixtures/make_smollm2_goldens.py`
//! with Hugging Face `tokenizers` and gguf-py, no tpserve code.

use std::path::PathBuf;
use std::sync::OnceLock;

use tpserve_modelfile::{ChatMessage, Error, Format, ModelSource};

fn model_path() -> PathBuf {
    let path = match std::env::var_os("TPSERVE_DEFAULT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("TPSERVE_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("tpserve")))
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tpserve")))
                .expect("neither TPSERVE_DEFAULT_MODEL, TPSERVE_CACHE_DIR, XDG_CACHE_HOME nor HOME is set");
            cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        path.is_file(),
        "the default model is missing at {}: run scripts/fetch-default-model.sh (or set TPSERVE_DEFAULT_MODEL)",
        path.display()
    );
    path
}

fn source() -> &'static ModelSource {
    static SOURCE: OnceLock<ModelSource> = OnceLock::new();
    SOURCE
        .get_or_init(|| ModelSource::open(&model_path(), None).expect("opening the default model"))
}

fn goldens() -> &'static serde_json::Value {
    static GOLDENS: OnceLock<serde_json::Value> = OnceLock::new();
    GOLDENS.get_or_init(|| {
        let text = include_str!("fixtures/smollm2_goldens.json");
        serde_json::from_str(text).expect("goldens are JSON")
    })
}

const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn gguf_config_matches_smollm2_135m() {
    let src = source();
    assert_eq!(src.format(), Format::Gguf);
    let c = src.config();
    assert_eq!(c.architecture, "LlamaForCausalLM");
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 8192);
    assert_eq!(c.rope_scaling, None);
    assert!(c.tie_word_embeddings);
    assert!(!c.attention_bias);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_ids, vec![2]);
}

#[test]
fn gguf_lists_every_hf_tensor_of_each_llama_layer_with_its_shape() {
    let w = source().weights().unwrap();
    let names = w.names();
    assert_eq!(names.len(), 30 * 9 + 2, "{names:?}");
    assert_eq!(
        w.shape("model.embed_tokens.weight").unwrap(),
        vec![49152, 576]
    );
    assert_eq!(w.shape("model.norm.weight").unwrap(), vec![576]);
    for layer in 0..30 {
        let p = format!("model.layers.{layer}");
        for (suffix, shape) in [
            ("input_layernorm.weight", vec![576]),
            ("post_attention_layernorm.weight", vec![576]),
            ("self_attn.q_proj.weight", vec![576, 576]),
            ("self_attn.k_proj.weight", vec![192, 576]),
            ("self_attn.v_proj.weight", vec![192, 576]),
            ("self_attn.o_proj.weight", vec![576, 576]),
            ("mlp.gate_proj.weight", vec![1536, 576]),
            ("mlp.up_proj.weight", vec![1536, 576]),
            ("mlp.down_proj.weight", vec![576, 1536]),
        ] {
            let name = format!("{p}.{suffix}");
            assert!(w.contains(&name), "{name} missing");
            assert_eq!(w.shape(&name).unwrap(), shape, "{name}");
        }
    }
}

#[test]
fn gguf_without_output_weight_has_no_lm_head_and_ties_embeddings() {
    let w = source().weights().unwrap();
    assert!(!w.contains("lm_head.weight"));
    assert!(source().config().tie_word_embeddings);
    assert!(
        matches!(w.read("lm_head.weight"), Err(Error::MissingTensor { name }) if name == "lm_head.weight")
    );
}

#[test]
fn gguf_every_tensor_reads_as_f32_in_its_listed_shape() {
    let w = source().weights().unwrap();
    for name in w.names() {
        let t = w.read(&name).unwrap();
        assert_eq!(t.dtype(), candle_core::DType::F32, "{name}");
        assert_eq!(t.dims(), w.shape(&name).unwrap().as_slice(), "{name}");
    }
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn gguf_weights_match_gguf_py_dequantization_with_q_and_k_unpermuted() {
    // Tolerance: both sides dequantize the same blocks in f32; sums are accumulated in f64 by
    // numpy and in f32 chunks here, so allow 1e-4 relative.
    let w = source().weights().unwrap();
    let tensors = goldens()["tensors"].as_object().unwrap();
    assert!(tensors.len() >= 8);
    for (name, g) in tensors {
        let t = w.read(name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(g["shape"].clone()).unwrap();
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        let flat: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let sum: f64 = flat.iter().map(|&x| x as f64).sum();
        let abs_sum: f64 = flat.iter().map(|&x| (x as f64).abs()).sum();
        assert!(
            close(sum, g["sum"].as_f64().unwrap(), 1e-4),
            "{name}: sum {sum} vs {}",
            g["sum"]
        );
        assert!(
            close(abs_sum, g["abs_sum"].as_f64().unwrap(), 1e-4),
            "{name}: abs_sum"
        );
        let cols: usize = shape[1..].iter().product();
        for (row, want) in g["first_row_sums"].as_array().unwrap().iter().enumerate() {
            let got: f64 = flat[row * cols..(row + 1) * cols]
                .iter()
                .map(|&x| x as f64)
                .sum();
            let want = want.as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "{name} row {row}: {got} vs {want}"
            );
        }
        for (i, want) in g["first_values"].as_array().unwrap().iter().enumerate() {
            // Exact: the same f32 arithmetic on the same blocks (serde_json's float parse may be
            // off by an ulp in f64, so compare in f32).
            assert_eq!(flat[i], want.as_f64().unwrap() as f32, "{name}[{i}]");
        }
    }
}

#[test]
fn gguf_read_slice_equals_narrow_of_read() {
    let w = source().weights().unwrap();
    for (name, dim, start, len) in [
        ("model.layers.3.self_attn.q_proj.weight", 0, 192, 192),
        ("model.layers.3.self_attn.k_proj.weight", 0, 64, 64),
        ("model.layers.3.self_attn.o_proj.weight", 1, 192, 192),
        ("model.layers.3.mlp.down_proj.weight", 1, 768, 768),
    ] {
        let whole = w.read(name).unwrap().narrow(dim, start, len).unwrap();
        let part = w.read_slice(name, dim, start, len).unwrap();
        let diff = (whole - part)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
    assert!(matches!(
        w.read_slice("model.norm.weight", 0, 500, 100),
        Err(Error::Tensor { .. })
    ));
}

#[test]
fn gguf_tokenizer_gives_hugging_face_ids_for_smollm2() {
    let tok = source().tokenizer().unwrap();
    let cases = goldens()["token_ids"].as_array().unwrap();
    assert!(cases.len() >= 9);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let got = tok.encode(text, true).unwrap();
        assert_eq!(got.get_ids(), want.as_slice(), "{text:?}");
    }
    // The first two also checked by hand against the published SmolLM2 tokenizer.
    let ids = tok.encode("What is the capital of France?", true).unwrap();
    assert_eq!(ids.get_ids(), &[1780, 314, 260, 3575, 282, 4649, 47]);
}

#[test]
fn gguf_tokenizer_round_trips_text() {
    let tok = source().tokenizer().unwrap();
    for case in goldens()["token_ids"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(ids.get_ids(), false).unwrap(), text);
    }
}

#[test]
fn gguf_special_tokens_are_single_ids_and_no_bos_is_added() {
    let tok = source().tokenizer().unwrap();
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    // Byte-level 'a' and 'b' sit at 17 + (byte - '!') after the 17 control tokens.
    let ids = tok.encode("a<|im_start|>b<|im_end|>", true).unwrap();
    assert_eq!(ids.get_ids(), &[81, 1, 82, 2]);
    // add_bos_token is false for SmolLM2: nothing is prepended.
    assert_eq!(
        tok.encode("Hi", true).unwrap().get_ids(),
        tok.encode("Hi", false).unwrap().get_ids()
    );
    // Control tokens are special: skipped on request.
    assert_eq!(tok.decode(&[1, 4093, 2], true).unwrap(), "user");
}

#[test]
fn gguf_chat_template_adds_the_default_system_message() {
    let ct = source()
        .chat_template()
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let user = ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    };
    let text = ct.render(std::slice::from_ref(&user), true).unwrap();
    assert_eq!(
        text,
        format!("{SMOL_SYSTEM}<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    );
    // And it tokenizes to the reference ids of the same prompt.
    let want: Vec<u32> = serde_json::from_value(goldens()["token_ids"][1]["ids"].clone()).unwrap();
    let tok = source().tokenizer().unwrap();
    assert_eq!(
        tok.encode(text.as_str(), true).unwrap().get_ids(),
        want.as_slice()
    );

    let system = ChatMessage {
        role: "system".into(),
        content: "Be brief.".into(),
    };
    let text = ct.render(&[system, user], false).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    );
}

#[test]
fn gguf_has_no_generation_defaults() {
    let d = source().generation_defaults();
    assert_eq!((d.temperature, d.top_p, d.top_k), (None, None, None));
}

#[test]
fn gguf_format_is_detected_and_checked() {
    let path = model_path();
    assert_eq!(
        ModelSource::open(&path, Some(Format::Gguf)).unwrap().path(),
        path.as_path()
    );
    let err = ModelSource::open(&path, Some(Format::Safetensors)).unwrap_err();
    assert!(matches!(err, Error::UnknownFormat { .. }), "{err}");
}

/// The reference that matters: ids and chat rendering from Hugging Face transformers' own GGUF
/// conversion (`tests/fixtures/goldens/smollm2.json`, written by `scripts/reference/make_goldens.py`).
#[test]
fn gguf_tokenizer_and_chat_template_match_transformers_goldens() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/goldens/smollm2.json");
    let hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let source = source();
    let tok = source.tokenizer().unwrap();
    let cases = hf["tokenizer"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap().get_ids(),
            want.as_slice(),
            "{text:?}"
        );
    }
    let ct = source
        .chat_template()
        .unwrap()
        .expect("SmolLM2 has a chat template");
    for case in ["user_only", "system_user"] {
        let c = &hf["chat"][case];
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let text = ct.render(&messages, true).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap(), "{case}");
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(text.as_str(), false).unwrap().get_ids(),
            want.as_slice(),
            "{case}"
        );
    }
}
