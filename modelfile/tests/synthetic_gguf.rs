//! Small GGUF files written on the fly with candle's GGUF writer, laid out the way llama.cpp's
//! converter lays them out (q/k rows permuted for interleaved RoPE in `llama` files, not in
//! `qwen2` ones), to check the mapping back to Hugging Face layout, config extraction and errors.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tpserve_modelfile::{Error, ModelSource};

const HIDDEN: usize = 32;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const FF: usize = 64;
const VOCAB: usize = 8;

/// Deterministic pseudo-random values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// llama.cpp's `permute` (convert_hf_to_gguf.py), written out with indices: HF row
/// h*D + t*D/2 + j is stored at GGUF row h*D + 2j + t.
fn llama_cpp_permute(w: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = rows / heads;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for t in 0..2 {
            for j in 0..d / 2 {
                let hf_row = h * d + t * d / 2 + j;
                let gguf_row = h * d + 2 * j + t;
                out[gguf_row * cols..(gguf_row + 1) * cols]
                    .copy_from_slice(&w[hf_row * cols..(hf_row + 1) * cols]);
            }
        }
    }
    out
}

struct Written {
    /// (HF name, HF-layout values, HF shape)
    hf: Vec<(String, Vec<f32>, Vec<usize>)>,
}

struct Spec<'a> {
    arch: &'a str,
    permute: bool,
    with_output: bool,
    q_bias: bool,
    extra_meta: Vec<(&'a str, Value)>,
}

fn write_gguf(path: &Path, spec: Spec<'_>) -> Written {
    let arch = spec.arch;
    let tokens: Vec<Value> = ["<s>", "</s>", "<eot>", "a", "b", "ab", "Ġ", "Ġa"]
        .iter()
        .map(|s| Value::String(s.to_string()))
        .collect();
    let k = |s: &str| format!("{arch}.{s}");
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (k("block_count"), Value::U32(1)),
        (k("context_length"), Value::U32(256)),
        (k("embedding_length"), Value::U32(HIDDEN as u32)),
        (k("feed_forward_length"), Value::U32(FF as u32)),
        (k("attention.head_count"), Value::U32(HEADS as u32)),
        (k("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (k("rope.freq_base"), Value::F32(10000.0)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (k("rope.dimension_count"), Value::U32(HEAD_DIM as u32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![
                Value::String("a b".into()),
                Value::String("Ġ a".into()),
            ]),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(
                [3, 3, 3, 1, 1, 1, 1, 1]
                    .iter()
                    .map(|&t| Value::I32(t))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eot_token_id".into(), Value::U32(2)),
        (
            "tokenizer.chat_template".into(),
            Value::String(
                "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
                    .into(),
            ),
        ),
    ];
    for (key, v) in spec.extra_meta {
        meta.push((key.to_string(), v));
    }

    let mut hf = Vec::new();
    let mut stored: Vec<(String, QTensor)> = Vec::new();
    let mut add = |gguf: &str,
                   hf_name: &str,
                   shape: Vec<usize>,
                   dtype: GgmlDType,
                   seed: u64,
                   heads: Option<usize>| {
        let n: usize = shape.iter().product();
        let v = values(seed, n);
        let on_disk = match heads {
            Some(h) if spec.permute => {
                let cols = if shape.len() == 2 { shape[1] } else { 1 };
                llama_cpp_permute(&v, shape[0], cols, h)
            }
            _ => v.clone(),
        };
        let t = Tensor::from_vec(on_disk, shape.clone(), &Device::Cpu).unwrap();
        stored.push((gguf.to_string(), QTensor::quantize(&t, dtype).unwrap()));
        hf.push((hf_name.to_string(), v, shape));
    };
    add(
        "token_embd.weight",
        "model.embed_tokens.weight",
        vec![VOCAB, HIDDEN],
        GgmlDType::Q8_0,
        1,
        None,
    );
    add(
        "output_norm.weight",
        "model.norm.weight",
        vec![HIDDEN],
        GgmlDType::F32,
        2,
        None,
    );
    if spec.with_output {
        add(
            "output.weight",
            "lm_head.weight",
            vec![VOCAB, HIDDEN],
            GgmlDType::F16,
            3,
            None,
        );
    }
    let l = "model.layers.0";
    add(
        "blk.0.attn_norm.weight",
        &format!("{l}.input_layernorm.weight"),
        vec![HIDDEN],
        GgmlDType::F32,
        4,
        None,
    );
    add(
        "blk.0.ffn_norm.weight",
        &format!("{l}.post_attention_layernorm.weight"),
        vec![HIDDEN],
        GgmlDType::F32,
        5,
        None,
    );
    add(
        "blk.0.attn_q.weight",
        &format!("{l}.self_attn.q_proj.weight"),
        vec![HIDDEN, HIDDEN],
        GgmlDType::F32,
        6,
        Some(HEADS),
    );
    add(
        "blk.0.attn_k.weight",
        &format!("{l}.self_attn.k_proj.weight"),
        vec![KV_HEADS * HEAD_DIM, HIDDEN],
        GgmlDType::F32,
        7,
        Some(KV_HEADS),
    );
    add(
        "blk.0.attn_v.weight",
        &format!("{l}.self_attn.v_proj.weight"),
        vec![KV_HEADS * HEAD_DIM, HIDDEN],
        GgmlDType::F32,
        8,
        None,
    );
    if spec.q_bias {
        add(
            "blk.0.attn_q.bias",
            &format!("{l}.self_attn.q_proj.bias"),
            vec![HIDDEN],
            GgmlDType::F32,
            9,
            Some(HEADS),
        );
        add(
            "blk.0.attn_k.bias",
            &format!("{l}.self_attn.k_proj.bias"),
            vec![KV_HEADS * HEAD_DIM],
            GgmlDType::F32,
            10,
            Some(KV_HEADS),
        );
    }
    add(
        "blk.0.attn_output.weight",
        &format!("{l}.self_attn.o_proj.weight"),
        vec![HIDDEN, HIDDEN],
        GgmlDType::F16,
        11,
        None,
    );
    add(
        "blk.0.ffn_gate.weight",
        &format!("{l}.mlp.gate_proj.weight"),
        vec![FF, HIDDEN],
        GgmlDType::Q4_1,
        12,
        None,
    );
    add(
        "blk.0.ffn_up.weight",
        &format!("{l}.mlp.up_proj.weight"),
        vec![FF, HIDDEN],
        GgmlDType::Q4_1,
        13,
        None,
    );
    add(
        "blk.0.ffn_down.weight",
        &format!("{l}.mlp.down_proj.weight"),
        vec![HIDDEN, FF],
        GgmlDType::Q8_0,
        14,
        None,
    );

    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = stored.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    Written { hf }
}

fn llama_spec<'a>() -> Spec<'a> {
    Spec {
        arch: "llama",
        permute: true,
        with_output: true,
        q_bias: false,
        extra_meta: vec![],
    }
}

/// A tensor a test read, flattened to f32.
fn values_of(read: Result<Tensor, Error>) -> Vec<f32> {
    read.unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn llama_gguf_tensors_come_back_in_hugging_face_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let written = write_gguf(
        &path,
        Spec {
            q_bias: true,
            ..llama_spec()
        },
    );
    let src = ModelSource::open(&path, None).unwrap();
    let w = src.weights().unwrap();
    let mut names: Vec<String> = written.hf.iter().map(|(n, _, _)| n.clone()).collect();
    names.sort();
    assert_eq!(w.names(), names);
    for (name, want, shape) in &written.hf {
        assert_eq!(&w.shape(name).unwrap(), shape, "{name}");
        let got: Vec<f32> = values_of(w.read(name));
        // Tolerances are the formats' rounding for values in [-1, 1): F32 exact; F16 2^-11;
        // Q8_0 half a step of max/127; Q4_1 half a step of (max-min)/15.
        let tol = if name.contains("gate_proj") || name.contains("up_proj") {
            0.07
        } else if name.contains("embed_tokens") || name.contains("down_proj") {
            0.005
        } else if name.contains("o_proj") || name.contains("lm_head") {
            1e-3
        } else {
            0.0
        };
        let diff = max_abs_diff(&got, want);
        assert!(diff <= tol, "{name}: max diff {diff} > {tol}");
    }
}

#[test]
fn gguf_q_and_k_are_unpermuted_to_hf_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let written = write_gguf(
        &path,
        Spec {
            q_bias: true,
            ..llama_spec()
        },
    );
    let w = ModelSource::open(&path, None).unwrap().weights().unwrap();
    for (name, want, shape) in written
        .hf
        .iter()
        .filter(|(n, _, _)| n.contains("q_proj") || n.contains("k_proj"))
    {
        let got: Vec<f32> = values_of(w.read(name));
        assert_eq!(&got, want, "{name}");
        // A slice of a head is that head's HF rows.
        let cols: usize = shape[1..].iter().product();
        let part: Vec<f32> = values_of(w.read_slice(name, 0, HEAD_DIM, HEAD_DIM));
        assert_eq!(
            part,
            want[HEAD_DIM * cols..2 * HEAD_DIM * cols].to_vec(),
            "{name}"
        );
    }
}

#[test]
fn qwen2_gguf_rows_are_not_permuted_and_biases_are_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-qwen.gguf");
    let written = write_gguf(
        &path,
        Spec {
            arch: "qwen2",
            permute: false,
            with_output: true,
            q_bias: true,
            extra_meta: vec![],
        },
    );
    let src = ModelSource::open(&path, None).unwrap();
    assert_eq!(src.config().architecture, "Qwen2ForCausalLM");
    assert!(src.config().attention_bias);
    let w = src.weights().unwrap();
    for (name, want, _) in written
        .hf
        .iter()
        .filter(|(n, _, _)| n.contains("q_proj") || n.contains("k_proj"))
    {
        let got: Vec<f32> = values_of(w.read(name));
        assert_eq!(&got, want, "{name}");
    }
    assert!(w.contains("model.layers.0.self_attn.q_proj.bias"));
}

#[test]
fn gguf_config_comes_from_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&path, llama_spec());
    let src = ModelSource::open(&path, None).unwrap();
    let c = src.config();
    assert_eq!(c.architecture, "LlamaForCausalLM");
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
        (HIDDEN, FF, 1)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (HEADS, KV_HEADS, HEAD_DIM)
    );
    assert_eq!(
        c.vocab_size, VOCAB,
        "no vocab_size key: counted from the tokens"
    );
    assert_eq!(
        (c.rms_norm_eps, c.rope_theta, c.max_position_embeddings),
        (1e-6, 10000.0, 256)
    );
    assert!(!c.tie_word_embeddings, "output.weight is present");
    assert!(!c.attention_bias);
    assert_eq!(c.bos_token_id, Some(0));
    assert_eq!(c.eos_token_ids, vec![1, 2], "eos then eot");
    assert!(src.weights().unwrap().contains("lm_head.weight"));
    // Chat template with the BOS/EOS strings, and a tokenizer with control tokens kept whole.
    let ct = src.chat_template().unwrap().unwrap();
    let m = tpserve_modelfile::ChatMessage {
        role: "user".into(),
        content: "ab a".into(),
    };
    let text = ct.render(&[m], false).unwrap();
    assert_eq!(text, "<s>ab a</s>");
    let tok = src.tokenizer().unwrap();
    assert_eq!(
        tok.encode(text.as_str(), true).unwrap().get_ids(),
        &[0, 5, 7, 1]
    );
}

#[test]
fn gguf_without_output_ties_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tied.gguf");
    write_gguf(
        &path,
        Spec {
            with_output: false,
            ..llama_spec()
        },
    );
    let src = ModelSource::open(&path, None).unwrap();
    assert!(src.config().tie_word_embeddings);
    assert!(!src.weights().unwrap().contains("lm_head.weight"));
}

#[test]
fn unsupported_gguf_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("phi.gguf");
    write_gguf(
        &path,
        Spec {
            arch: "phi3",
            permute: false,
            with_output: true,
            q_bias: false,
            extra_meta: vec![],
        },
    );
    match ModelSource::open(&path, None) {
        Err(Error::UnsupportedArchitecture { name }) => assert_eq!(name, "phi3"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unsupported_gguf_rope_scaling_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("yarn.gguf");
    write_gguf(
        &path,
        Spec {
            extra_meta: vec![("llama.rope.scaling.type", Value::String("yarn".into()))],
            ..llama_spec()
        },
    );
    match ModelSource::open(&path, None) {
        Err(Error::UnsupportedRopeScaling { rope_type }) => assert_eq!(rope_type, "yarn"),
        other => panic!("unexpected {other:?}"),
    }
    write_gguf(
        &path,
        Spec {
            extra_meta: vec![("llama.rope.scaling.type", Value::String("none".into()))],
            ..llama_spec()
        },
    );
    assert_eq!(
        ModelSource::open(&path, None)
            .unwrap()
            .config()
            .rope_scaling,
        None
    );
}

#[test]
fn unknown_gguf_tensor_type_is_an_unsupported_tensor_type_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.gguf");
    write_gguf(&path, llama_spec());
    let mut bytes = std::fs::read(&path).unwrap();
    // The tensor info is: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    let name = b"blk.0.attn_v.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let type_at = at + 4 + 8 * n_dims;
    bytes[type_at..type_at + 4].copy_from_slice(&39u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    match ModelSource::open(&path, None) {
        Err(Error::UnsupportedTensorType { dtype, .. }) => assert!(dtype.contains("39"), "{dtype}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn truncated_gguf_is_a_parse_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.gguf");
    write_gguf(&path, llama_spec());
    let bytes = std::fs::read(&path).unwrap();
    // Cut inside the tensor data: the header still parses, the last tensors cannot be read.
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let src = ModelSource::open(&path, None).unwrap();
    let w = src.weights().unwrap();
    let errors = w
        .names()
        .iter()
        .filter(|n| matches!(w.read(n), Err(Error::Parse { .. })))
        .count();
    assert!(errors >= 1);
    // Cut inside the header.
    for cut in [3, 20, 200, 600] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        assert!(
            matches!(ModelSource::open(&path, None), Err(Error::Parse { .. })),
            "cut at {cut}"
        );
    }
}
