//! GGUF weights kept quantized on the CPU against our own f32 path on the same file (`--dtype
//! float32`: the same blocks dequantized at load), per block type, and SmolLM2's greedy choices.
//!
//! Tolerance, from the activations' quantization (the weights are the same in both paths): the
//! K-quants on candle's kernels round every activation to 8 bits per block of 256, an error of at
//! most `max|x_block| / 254` per value, uniform and independent, so a dot product over K inputs
//! moves by about `sqrt(K / 3) * |w| * max|x| / 254`, a few tenths of a percent of its scale per
//! layer; two layers and the lm_head compound it. We allow 2% of the largest |logit| (measured:
//! 0.73% to 0.82%). Q4_0/Q4_1/Q8_0 (our kernels), and Q4_K where the CPU has AVX-512 VNNI (the
//! regrouped kernel), round to 16 bits per block of 32, 256 times finer: allowed 0.02% (measured
//! 0.002%). SmolLM2 (Q4_1, 16-bit) compounds it over 30 layers:
//! allowed 0.1% (measured 0.03%). Every position whose f32 top-two margin exceeds twice the
//! tolerance must pick the same token. Prefill chunks of 8 rows keep these products on the block
//! products; from 16 rows, where the CPU has AVX-512 VNNI, the grouped kernel multiplies them the
//! same way (the same bits as 8-row chunks), and elsewhere they multiply dequantized tiles
//! (checked separately).

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::{argmax_rows, default_model, prefill_logits, prefill_logits_as};
use tpserve_worker::cpu::quant::packed;

const HIDDEN: usize = 256;
const FF: usize = 512;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const VOCAB: usize = 96;
const LAYERS: usize = 2;

/// Uniform values in `[-scale, scale)` from a small linear congruential generator.
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// A random two-layer Llama GGUF whose matrices (embedding included) are all `dtype`.
fn write_gguf(path: &Path, dtype: GgmlDType) {
    let tokens: Vec<Value> = (0..VOCAB).map(|i| Value::String(format!("t{i}"))).collect();
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(LAYERS as u32)),
        ("llama.context_length".into(), Value::U32(256)),
        ("llama.embedding_length".into(), Value::U32(HIDDEN as u32)),
        ("llama.feed_forward_length".into(), Value::U32(FF as u32)),
        (
            "llama.attention.head_count".into(),
            Value::U32(HEADS as u32),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(KV_HEADS as u32),
        ),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        ),
        (
            "llama.rope.dimension_count".into(),
            Value::U32(HEAD_DIM as u32),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
    ];
    let mut stored: Vec<(String, QTensor)> = Vec::new();
    let mut seed = 0;
    let mut add = |name: String, shape: Vec<usize>, dtype: GgmlDType, scale: f32| {
        seed += 1;
        let n = shape.iter().product();
        let v = if scale == 0.0 {
            vec![1.0; n]
        } else {
            values(seed, n, scale)
        };
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        stored.push((name, QTensor::quantize(&t, dtype).unwrap()));
    };
    // Unit-gain matrices (uniform of variance 1/cols) keep activations O(1) through the layers.
    let gain = |cols: usize| (3.0 / cols as f32).sqrt();
    add("token_embd.weight".into(), vec![VOCAB, HIDDEN], dtype, 1.0);
    add(
        "output_norm.weight".into(),
        vec![HIDDEN],
        GgmlDType::F32,
        0.0,
    );
    for l in 0..LAYERS {
        let b = |m: &str| format!("blk.{l}.{m}.weight");
        add(b("attn_norm"), vec![HIDDEN], GgmlDType::F32, 0.0);
        add(b("ffn_norm"), vec![HIDDEN], GgmlDType::F32, 0.0);
        add(b("attn_q"), vec![HIDDEN, HIDDEN], dtype, gain(HIDDEN));
        add(
            b("attn_k"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            dtype,
            gain(HIDDEN),
        );
        add(
            b("attn_v"),
            vec![KV_HEADS * HEAD_DIM, HIDDEN],
            dtype,
            gain(HIDDEN),
        );
        add(b("attn_output"), vec![HIDDEN, HIDDEN], dtype, gain(HIDDEN));
        add(b("ffn_gate"), vec![FF, HIDDEN], dtype, gain(HIDDEN));
        add(b("ffn_up"), vec![FF, HIDDEN], dtype, gain(HIDDEN));
        add(b("ffn_down"), vec![HIDDEN, FF], dtype, gain(FF));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = stored.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

/// Largest `|got - want|` over the largest `|want|`.
fn err_of_scale(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    diff / scale
}

/// Positions whose f32 top-two margin is above `tol` of the scale and where the two paths pick
/// different tokens; and how many positions had such a margin.
fn greedy_disagreements(got: &[f32], want: &[f32], vocab: usize, tol: f32) -> (usize, usize) {
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (g, w) = (argmax_rows(got, vocab), argmax_rows(want, vocab));
    let (mut decided, mut differ) = (0, 0);
    for (pos, row) in want.chunks_exact(vocab).enumerate() {
        let mut sorted = row.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        if sorted[0] - sorted[1] > 2.0 * tol * scale {
            decided += 1;
            differ += usize::from(g[pos] != w[pos]);
        }
    }
    (differ, decided)
}

/// 8-bit activations (candle's Q8_K, the K-quants).
const Q8_TOL: f32 = 0.02;

/// 16-bit activations (our Q4_0/Q4_1/Q8_0 kernels).
const Q16_TOL: f32 = 2e-4;

/// SmolLM2's 30 layers against the two of the random models, 16-bit activations.
const SMOLLM2_TOL: f32 = 1e-3;

#[test]
fn each_block_type_matches_the_f32_path_within_the_activation_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % VOCAB) as u32).collect();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        // Q4_K runs on the regrouped kernel (16-bit activations) where the CPU has AVX-512
        // VNNI, on candle's (8-bit) elsewhere.
        let tol = match dtype {
            GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0 => Q16_TOL,
            GgmlDType::Q4K if packed::supported() => Q16_TOL,
            _ => Q8_TOL,
        };
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        write_gguf(&path, dtype);
        let want = prefill_logits(&path, 1, &ids, 7);
        let got = prefill_logits_as(&path, 1, &ids, 7, "auto");
        let err = err_of_scale(&got, &want);
        let (differ, decided) = greedy_disagreements(&got, &want, VOCAB, tol);
        eprintln!(
            "{dtype:?}: max |quantized - f32| = {:.3}% of max |logit|; greedy: {differ} of {decided} decided positions differ",
            err * 100.0
        );
        assert!(err > 0.0, "{dtype:?}: the quantized path was not used");
        assert!(err <= tol, "{dtype:?}: {err} of scale");
        assert_eq!(differ, 0, "{dtype:?}: greedy choices differ");
        assert!(
            decided >= ids.len() / 2,
            "{dtype:?}: too few decided positions"
        );
    }
}

#[test]
fn tensor_parallel_quantized_matches_the_f32_path() {
    // TP=2 splits o_proj and down_proj by columns (128 and 256 of each row): whole Q4_1 blocks,
    // so both stay quantized and each rank quantizes its own slice of the activations.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4_1.gguf");
    write_gguf(&path, GgmlDType::Q4_1);
    let ids: Vec<u32> = (0..24).map(|i| (i * 11 % VOCAB) as u32).collect();
    let want = prefill_logits(&path, 1, &ids, 8);
    for tp in [1, 2] {
        let got = prefill_logits_as(&path, tp, &ids, 8, "auto");
        let err = err_of_scale(&got, &want);
        eprintln!(
            "Q4_1 TP={tp}: max |quantized - f32| = {:.4}% of max |logit|",
            err * 100.0
        );
        assert!(err > 0.0 && err <= Q16_TOL, "TP={tp}: {err}");
    }
}

#[test]
fn prefill_chunks_of_many_rows_keep_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q4_1.gguf");
    write_gguf(&path, GgmlDType::Q4_1);
    let ids: Vec<u32> = (0..48).map(|i| (i * 5 % VOCAB) as u32).collect();
    let whole = prefill_logits_as(&path, 1, &ids, 48, "auto");
    if packed::supported() {
        // The grouped kernel multiplies any count of rows alike: one 48-row chunk gives the
        // logits of six 8-row ones (decode-sized products) bit for bit.
        let by_8 = prefill_logits_as(&path, 1, &ids, 8, "auto");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(
            bits(&whole) == bits(&by_8),
            "48-row and 8-row chunks differ"
        );
        eprintln!("Q4_1 prefill of 48 rows: the 8-row chunks' bits");
    } else {
        // From 16 rows a product dequantizes weight tiles for the f32 GEMM: the f32 path's
        // numbers up to the GEMM's summation order over differently sized tiles.
        let want = prefill_logits(&path, 1, &ids, 48);
        let err = err_of_scale(&whole, &want);
        eprintln!("Q4_1 prefill of 48 rows: {err:e} of max |logit|");
        assert!(err <= 1e-5, "{err}");
    }
}

#[test]
fn smollm2_quantized_keeps_the_f32_greedy_choices() {
    // Teacher-forced: both paths see the same tokens (the goldens' prompts and HF's greedy
    // continuations) and must pick the same next token wherever f32's margin is clear.
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::repo_root().join("tests/fixtures/goldens/smollm2.json"))
            .unwrap(),
    )
    .unwrap();
    let vocab = 49152;
    let (mut differ, mut decided) = (0, 0);
    for case in ["user_only", "system_user"] {
        let c = &g["generation"][case];
        let mut ids: Vec<u32> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        ids.extend(
            c["new_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32),
        );
        let want = prefill_logits(&default_model(), 1, &ids, 8);
        let got = prefill_logits_as(&default_model(), 1, &ids, 8, "auto");
        let err = err_of_scale(&got, &want);
        let (d, n) = greedy_disagreements(&got, &want, vocab, SMOLLM2_TOL);
        eprintln!(
            "SmolLM2 {case}: max |quantized - f32| = {:.3}% of max |logit|; greedy: {d} of {n} decided positions differ",
            err * 100.0
        );
        assert!(err > 0.0 && err <= SMOLLM2_TOL, "{case}: {err}");
        differ += d;
        decided += n;
    }
    assert_eq!(
        differ, 0,
        "{differ} of {decided} clear greedy choices differ"
    );
}
