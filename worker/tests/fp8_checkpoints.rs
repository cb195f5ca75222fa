//! Pre-quantized FP8 checkpoints (issue 12) on the CPU: the tiny Llama fixture's linear weights
//! quantized to E4M3 in each layout the loaders read (AutoFP8's per-tensor scalar scales with
//! static activation scales; compressed-tensors' per-tensor and per-channel scales; DeepSeek-style
//! block scales in blocks that do not line up with the tensor-parallel slices), written beside a
//! float32 checkpoint of the same weights dequantized (E4M3 value times scale, in f32). The CPU
//! backend dequantizes FP8 weights at load, so the two must give the same logits bit for bit, at
//! TP=1 and TP=2 (rows and columns of scaled weights sliced across ranks). `read_fp8`, what the
//! CUDA backend loads, must hand over bytes and scales whose products are those same values.

mod common;

use std::path::Path;

use common::checkpoint::{
    f32_tensor, is_linear, tiny_llama_tensors, twin_pairs, write, Stored, TwinPair,
};
use float8::F8E4M3;
use serde_json::{json, Value};
use tpserve_modelfile::{Fp8Scale, ModelSource};

/// How a layout scales a weight `[rows, cols]`.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// One scalar (shape `[]`, AutoFP8), with a static `input_scale`.
    AutoFp8,
    /// One scale of shape `[1]` (compressed-tensors, strategy tensor), no activation scheme.
    Tensor,
    /// `[rows, 1]` (compressed-tensors, strategy channel).
    Channel,
    /// `weight_scale_inv` per block of `[32, 48]`.
    Block,
}

const BLOCK: (usize, usize) = (32, 48);

/// Which scale group an element `(row, col)` of a weight belongs to.
type Group = Box<dyn Fn(usize, usize) -> usize>;

impl Layout {
    fn quantization_config(self) -> Value {
        let float8 = |strategy: &str, dynamic: bool| {
            json!({"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": true,
                   "dynamic": dynamic})
        };
        let compressed = |weights: Value, input: Value| {
            json!({"quant_method": "compressed-tensors", "format": "float-quantized",
                   "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                                 "input_activations": input}},
                   "ignore": ["lm_head"], "quantization_status": "compressed"})
        };
        match self {
            Self::AutoFp8 => json!({"quant_method": "fp8", "activation_scheme": "static"}),
            Self::Tensor => compressed(float8("tensor", false), Value::Null),
            Self::Channel => compressed(float8("channel", false), float8("token", true)),
            Self::Block => json!({"quant_method": "fp8", "activation_scheme": "dynamic",
                                  "weight_block_size": [BLOCK.0, BLOCK.1]}),
        }
    }

    /// The scale groups of a weight: `(scale shape, group of element (r, c), group count)`.
    fn groups(self, rows: usize, cols: usize) -> (Vec<usize>, Group) {
        match self {
            Self::AutoFp8 => (vec![], Box::new(|_, _| 0)),
            Self::Tensor => (vec![1], Box::new(|_, _| 0)),
            Self::Channel => (vec![rows, 1], Box::new(|r, _| r)),
            Self::Block => {
                let grid_cols = cols.div_ceil(BLOCK.1);
                (
                    vec![rows.div_ceil(BLOCK.0), grid_cols],
                    Box::new(move |r, c| (r / BLOCK.0) * grid_cols + c / BLOCK.1),
                )
            }
        }
    }
}

/// Writes the fixture quantized in `layout` to `fp8_dir` and its dequantized weights to `f32_dir`.
fn write_pair(layout: Layout, fp8_dir: &Path, f32_dir: &Path) {
    let (mut fp8, mut plain) = (Vec::new(), Vec::new());
    for (name, shape, values) in tiny_llama_tensors() {
        if !is_linear(&name) {
            fp8.push(f32_tensor(name.clone(), shape.clone(), &values));
            plain.push(f32_tensor(name, shape, &values));
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let (scale_shape, group) = layout.groups(rows, cols);
        let count = scale_shape.iter().product::<usize>().max(1);
        let mut amax = vec![0f32; count];
        for (i, v) in values.iter().enumerate() {
            let g = group(i / cols, i % cols);
            amax[g] = amax[g].max(v.abs());
        }
        let scales: Vec<f32> = amax.iter().map(|a| a / 448.0).collect();
        let mut bytes = Vec::with_capacity(values.len());
        let mut dequantized = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            let s = scales[group(i / cols, i % cols)];
            let q = F8E4M3::from_f32(v / s);
            bytes.push(q.to_bits());
            dequantized.push(q.to_f32() * s);
        }
        let base = name.strip_suffix(".weight").unwrap();
        let scale_name = match layout {
            Layout::Block => format!("{base}.weight_scale_inv"),
            _ => format!("{base}.weight_scale"),
        };
        fp8.push(Stored {
            name: name.clone(),
            dtype: safetensors::Dtype::F8_E4M3,
            shape: shape.clone(),
            bytes,
        });
        fp8.push(f32_tensor(scale_name, scale_shape, &scales));
        if let Layout::AutoFp8 = layout {
            fp8.push(f32_tensor(format!("{base}.input_scale"), vec![], &[0.05]));
        }
        plain.push(f32_tensor(name, shape, &dequantized));
    }
    write(fp8_dir, &fp8, Some(layout.quantization_config()));
    write(f32_dir, &plain, None);
}

/// Every layout's checkpoint pair.
fn pairs() -> Vec<(Layout, TwinPair)> {
    twin_pairs(
        &[
            Layout::AutoFp8,
            Layout::Tensor,
            Layout::Channel,
            Layout::Block,
        ],
        write_pair,
    )
}

#[test]
fn fp8_checkpoints_dequantize_on_the_cpu_exactly_as_their_f32_twins() {
    for (layout, pair) in pairs() {
        let source = ModelSource::open(&pair.quantized(), None).unwrap();
        let scheme = source.fp8_scheme().expect("an FP8 checkpoint").unwrap();
        eprintln!("{layout:?}: {}", scheme.describe());
        pair.assert_same_logits(&format!("FP8 {layout:?}"));
    }
}

#[test]
fn read_fp8_hands_over_bytes_and_scales_whose_products_are_the_weights() {
    for (layout, pair) in pairs() {
        let (fp8, plain) = pair.readers();
        for (name, dim, start, len) in [
            ("model.layers.0.self_attn.k_proj.weight", 0, 16, 16),
            ("model.layers.1.self_attn.o_proj.weight", 1, 32, 32),
            ("model.layers.1.mlp.down_proj.weight", 1, 0, 80),
            ("model.layers.0.mlp.up_proj.weight", 0, 80, 80),
        ] {
            let got = fp8.read_fp8(name, Some((dim, start, len))).unwrap();
            let Some(t) = got else {
                assert!(
                    matches!(layout, Layout::Block),
                    "{layout:?} {name}: not read as FP8"
                );
                continue;
            };
            assert!(
                !matches!(layout, Layout::Block),
                "block scales are not handed over"
            );
            let want: Vec<f32> = plain
                .read_slice(name, dim, start, len)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let rows = t.row_scales();
            let products: Vec<f32> = t
                .data
                .iter()
                .enumerate()
                .map(|(i, b)| F8E4M3::from_bits(*b).to_f32() * rows[i / t.cols])
                .collect();
            assert_eq!(products, want, "{layout:?} {name}");
            assert_eq!(
                matches!(t.scale, Fp8Scale::Rows(_)),
                matches!(layout, Layout::Channel),
                "{layout:?}"
            );
            let static_scale = matches!(layout, Layout::AutoFp8).then_some(0.05);
            assert_eq!(t.input_scale, static_scale, "{layout:?}");
        }
        // Norms and embeddings are not FP8.
        assert!(fp8
            .read_fp8("model.embed_tokens.weight", None)
            .unwrap()
            .is_none());
    }
}

#[test]
fn read_stored_gives_any_slice_as_stored_borrowing_contiguous_ones() {
    use std::borrow::Cow;
    use tpserve_modelfile::StoredDtype;
    let (_, pair) = pairs().swap_remove(2);
    let (fp8, plain) = pair.readers();
    let name = "model.layers.1.self_attn.o_proj.weight";
    for (dim, start, len, borrowed) in [(0, 16, 16, true), (1, 32, 32, false)] {
        let t = plain
            .read_stored(name, Some((dim, start, len)))
            .unwrap()
            .unwrap();
        assert_eq!(t.dtype, StoredDtype::F32);
        assert_eq!(matches!(t.bytes, Cow::Borrowed(_)), borrowed, "dim {dim}");
        let want: Vec<u8> = plain
            .read_slice(name, dim, start, len)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(t.bytes.as_ref(), want.as_slice(), "dim {dim}");
        assert_eq!(t.shape[dim], len);
    }
    assert_eq!(plain.stored_dtype(name), Some(StoredDtype::F32));
    assert_eq!(plain.stored_dtype("no.such.weight"), None);
    let t = fp8.read_stored(name, None).unwrap().unwrap();
    assert_eq!(
        (t.dtype, t.shape.as_slice()),
        (StoredDtype::F8E4M3, &[64usize, 64][..])
    );
    assert_eq!(fp8.stored_dtype(name), Some(StoredDtype::F8E4M3));
}
