//! Embedding steps against Hugging Face transformers: the pooled hidden states that a pooling
//! plan returns, multiplied by tiny-qwen2's tied embedding matrix, must give transformers'
//! logits (the goldens of `scripts/reference/make_goldens.py`): for last-token pooling the last
//! position's row, for mean pooling the mean of every position's row (the lm_head is linear, so
//! `E mean(h) = mean(E h)`). That checks the final normed hidden states themselves, through
//! chunked prefill over several steps, at tensor-parallel sizes 1 and 2, and for a headless
//! (`Qwen2Model`, no `model.` prefix) copy of the checkpoint. Tolerance as in `numerics.rs`:
//! `|ours - hf| / max(1, |hf|) <= 1e-4`.

mod common;

use std::path::Path;

use common::{cpu_group, max_rel_err, repo_root};
use serde_json::Value;
use tpserve_proto as pb;

const BLOCK: usize = 16;

fn golden() -> Value {
    let path = repo_root().join("tests/fixtures/goldens/tiny-qwen2.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn numbers<T>(v: &Value, f: impl Fn(&Value) -> T) -> Vec<T> {
    v.as_array().unwrap().iter().map(f).collect()
}

/// The tied embedding matrix `[vocab, hidden]` of the checkpoint in `dir`.
fn embedding_matrix(dir: &Path) -> Vec<f32> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("model.embed_tokens.weight").unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The pooled vector of `ids` (one request, prefilled in steps of `chunk` tokens) on `tp`
/// ranks, as rank 0 reports it.
fn pooled(model: &Path, tp: usize, ids: &[u32], chunk: usize, kind: pb::PoolingType) -> Vec<f32> {
    let blocks = ids.len().div_ceil(BLOCK);
    let group = cpu_group(model, tp, "float32", blocks + 1, BLOCK);
    let mut out = Vec::new();
    let mut start = 0;
    let mut step_id = 0;
    while start < ids.len() {
        let n = chunk.min(ids.len() - start);
        let plan = if start == 0 {
            pb::StepPlan {
                step_id,
                new_sequences: vec![pb::NewSequence {
                    sequence_id: 1,
                    token_ids: ids.to_vec(),
                    sampling: Some(pb::SamplingParams::default()),
                    block_ids: (0..blocks as u32).collect(),
                    num_scheduled_tokens: n as u32,
                    num_prompt_tokens: ids.len() as u32,
                    pooling: Some(pb::Pooling {
                        r#type: kind as i32,
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }
        } else {
            pb::StepPlan {
                step_id,
                running: vec![pb::RunningSequence {
                    sequence_id: 1,
                    num_scheduled_tokens: n as u32,
                    new_block_ids: Vec::new(),
                }],
                ..Default::default()
            }
        };
        let outcome = group
            .on_all(move |_, r| r.step(&plan))
            .unwrap()
            .swap_remove(0);
        assert!(
            outcome.tokens.is_empty(),
            "an embedding step samples nothing"
        );
        start += n;
        step_id += 1;
        if start < ids.len() {
            assert!(outcome.pooled.is_empty(), "no vector before the last chunk");
        } else {
            assert_eq!(outcome.pooled.len(), 1);
            out = outcome.pooled[0].values.clone();
        }
    }
    out
}

/// `E h` for each `hidden`-wide row of `h`.
fn project(e: &[f32], h: &[f32], hidden: usize) -> Vec<f32> {
    e.chunks_exact(hidden)
        .map(|row| row.iter().zip(h).map(|(a, b)| a * b).sum())
        .collect()
}

fn check(model: &Path, tp: usize, chunk: usize) {
    let dir = repo_root().join("tests/fixtures/tiny-qwen2");
    let e = embedding_matrix(&dir);
    let g = golden();
    for (i, seq) in g["sequences"].as_array().unwrap().iter().enumerate() {
        let ids = numbers(&seq["input_ids"], |x| x.as_u64().unwrap() as u32);
        let logits = numbers(&seq["logits"], |x| x.as_f64().unwrap() as f32);
        let vocab = seq["shape"][1].as_u64().unwrap() as usize;
        let hidden = e.len() / vocab;
        let last = pooled(model, tp, &ids, chunk, pb::PoolingType::Last);
        assert_eq!(last.len(), hidden);
        let want_last = &logits[(ids.len() - 1) * vocab..];
        let err = max_rel_err(&project(&e, &last, hidden), want_last);
        eprintln!(
            "tp={tp} chunk={chunk} sequence {i}: last-token pooling, max relative error {err:e}"
        );
        assert!(err <= 1e-4, "last-token pooling: {err:e}");
        let mean = pooled(model, tp, &ids, chunk, pb::PoolingType::Mean);
        let mut want_mean = vec![0.0f32; vocab];
        for row in logits.chunks_exact(vocab) {
            for (m, x) in want_mean.iter_mut().zip(row) {
                *m += x / ids.len() as f32;
            }
        }
        let err = max_rel_err(&project(&e, &mean, hidden), &want_mean);
        eprintln!("tp={tp} chunk={chunk} sequence {i}: mean pooling, max relative error {err:e}");
        assert!(err <= 1e-4, "mean pooling: {err:e}");
    }
}

#[test]
fn pooled_hidden_states_match_transformers_through_chunked_prefill() {
    let dir = repo_root().join("tests/fixtures/tiny-qwen2");
    check(&dir, 1, 3);
    check(&dir, 1, 64);
}

#[test]
fn pooled_hidden_states_match_transformers_at_tensor_parallel_2() {
    check(&repo_root().join("tests/fixtures/tiny-qwen2"), 2, 4);
}

/// A `Qwen2Model` checkpoint (e5-mistral's layout: tensors without the `model.` prefix, no
/// `lm_head`) made from tiny-qwen2 gives the same vectors.
#[test]
fn a_headless_checkpoint_pools_like_its_causal_lm() {
    let src = repo_root().join("tests/fixtures/tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("Qwen2ForCausalLM", "Qwen2Model");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.trim_start_matches("model.").to_string(), view))
        .collect();
    assert!(renamed.iter().all(|(n, _)| !n.starts_with("lm_head")));
    safetensors::serialize_to_file(renamed, None, &dir.path().join("model.safetensors")).unwrap();
    check(dir.path(), 1, 5);
}
