//! Our CPU forward pass against Hugging Face transformers (PyTorch, float32, eager attention), on
//! the goldens that `scripts/reference/make_goldens.py` writes: random tiny Llama (GQA, llama3
//! rope scaling, sharded safetensors) and Qwen2 (q/k/v bias, tied embeddings) checkpoints, and
//! SmolLM2 from its GGUF. Tolerance is relative, `|ours - hf| / max(1, |hf|)`: 1e-4 for the tiny
//! models (measured: at most 2.7e-5); 1.5e-4 for SmolLM2 (measured: 4.6e-5 at TP=1, 8.1e-5 at
//! TP=3), whose 30 layers amplify summation-order noise: HF's own float32 logits move by 7e-5
//! between f32 and f64 or between its sdpa and eager attention, and the goldens are rounded to six
//! significant digits.

mod common;

use common::{argmax_rows, default_model, max_rel_err, prefill_logits, repo_root};
use serde_json::Value;

fn golden(name: &str) -> Value {
    let path = repo_root().join("tests/fixtures/goldens").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn check_tiny(golden_name: &str, fixture: &str, tp: usize) {
    let g = golden(golden_name);
    let dir = repo_root().join("tests/fixtures").join(fixture);
    for (i, seq) in g["sequences"].as_array().unwrap().iter().enumerate() {
        let input = ids(&seq["input_ids"]);
        let want = floats(&seq["logits"]);
        let got = prefill_logits(&dir, tp, &input, 13);
        let err = max_rel_err(&got, &want);
        eprintln!("{fixture} tp={tp} sequence {i}: max relative error {err:e}");
        assert!(
            err <= 1e-4,
            "{fixture} tp={tp} sequence {i}: max relative error {err:e}"
        );
    }
    // Greedy continuation, one token at a time through the whole prefill again (the KV cache
    // path is covered by the chunked prefill above and by the engine tests).
    let greedy = &g["greedy"];
    let mut seq = ids(&greedy["input_ids"]);
    let vocab = g["sequences"][0]["shape"][1].as_u64().unwrap() as usize;
    for want in ids(&greedy["new_ids"]) {
        let logits = prefill_logits(&dir, tp, &seq, 64);
        let next = *argmax_rows(&logits, vocab).last().unwrap();
        assert_eq!(
            next,
            want,
            "{fixture} tp={tp}: greedy diverged after {} tokens",
            seq.len()
        );
        seq.push(next);
    }
}

#[test]
fn tiny_llama_with_gqa_and_llama3_rope_matches_transformers() {
    check_tiny("tiny-llama.json", "tiny-llama", 1);
}

#[test]
fn tiny_llama_from_sharded_safetensors_matches_transformers() {
    check_tiny("tiny-llama.json", "tiny-llama-sharded", 1);
}

#[test]
fn tiny_qwen2_with_qkv_bias_and_tied_embeddings_matches_transformers() {
    check_tiny("tiny-qwen2.json", "tiny-qwen2", 1);
}

#[test]
fn tensor_parallel_2_and_4_match_transformers_on_tiny_llama() {
    // 4 query heads, 2 KV heads: TP=2 splits the KV heads, TP=4 replicates them.
    check_tiny("tiny-llama.json", "tiny-llama", 2);
    check_tiny("tiny-llama.json", "tiny-llama", 4);
}

#[test]
fn tensor_parallel_2_matches_transformers_on_tiny_qwen2() {
    check_tiny("tiny-qwen2.json", "tiny-qwen2", 2);
}

fn check_smollm2(model: &std::path::Path, tp: usize) {
    let g = golden("smollm2.json");
    for case in ["chat_user_only", "plain"] {
        let c = &g["logits"][case];
        let input = ids(&c["input_ids"]);
        let got = prefill_logits(model, tp, &input, 16);
        let vocab = 49152;
        let last = &got[(input.len() - 1) * vocab..];
        let err = max_rel_err(last, &floats(&c["last_logits"]));
        eprintln!(
            "SmolLM2 {} tp={tp} {case}: last-position max relative error {err:e}",
            model.display()
        );
        assert!(
            err <= 1.5e-4,
            "SmolLM2 tp={tp} {case}: last-position max relative error {err:e}"
        );
        for (pos, top5) in c["top5"].as_array().unwrap().iter().enumerate() {
            let row = &got[pos * vocab..(pos + 1) * vocab];
            for pair in top5.as_array().unwrap() {
                let (idx, value) = (
                    pair[0].as_u64().unwrap() as usize,
                    pair[1].as_f64().unwrap() as f32,
                );
                // Goldens are rounded to 6 significant digits.
                let tol = 1.5e-4 * value.abs().max(1.0) + 1e-5 * value.abs();
                assert!(
                    (row[idx] - value).abs() <= tol,
                    "SmolLM2 {case} position {pos} token {idx}: {} vs {value}",
                    row[idx]
                );
            }
        }
    }
}

#[test]
fn smollm2_gguf_matches_transformers() {
    check_smollm2(&default_model(), 1);
}

#[test]
fn smollm2_gguf_at_tensor_parallel_3_matches_transformers() {
    check_smollm2(&default_model(), 3);
}

/// SmolLM2 through the safetensors path: the GGUF's tensors (dequantized, q/k unpermuted, under
/// Hugging Face names) are written as a Hugging Face directory, which is then loaded like any
/// other checkpoint and compared with the same goldens. The conversion is ours (CI has no
/// PyTorch); `scripts/reference/make_goldens.py` also saves transformers' own conversion to
/// `~/.cache/tpserve/models/SmolLM2-135M-Instruct-hf`, and when that exists it is checked too.
#[test]
fn smollm2_as_safetensors_matches_transformers() {
    use tpserve_modelfile::ModelSource;
    let gguf = ModelSource::open(&default_model(), None).unwrap();
    let weights = gguf.weights().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .names()
        .into_iter()
        .map(|name| {
            let t = weights.read(&name).unwrap();
            let shape = t.dims().to_vec();
            let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let c = gguf.config();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": true,
        "bos_token_id": 1, "eos_token_id": 2
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    drop(tensors);
    check_smollm2(dir.path(), 1);
    let home = std::env::var("HOME").unwrap_or_default();
    let hf = std::path::Path::new(&home).join(".cache/tpserve/models/SmolLM2-135M-Instruct-hf");
    if hf.join("model.safetensors").exists() {
        check_smollm2(&hf, 1);
    }
}
