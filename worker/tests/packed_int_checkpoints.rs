//! AWQ and GPTQ checkpoints (issue 12) on the CPU: the tiny Llama fixture's linear weights
//! quantized to 4- or 8-bit integers the way AutoAWQ and AutoGPTQ/GPTQModel do (groups of 32
//! inputs or one group per output, zero points or symmetric, act-order groups from `g_idx`, the
//! original GPTQ format's `zero - 1`), packed into int32 words as each stores them, and written
//! beside a float32 checkpoint of the same weights dequantized (`(q - zero) * scale`, the scale
//! rounded to f16 as stored). The readers dequantize packed layers at load, so both must give
//! the same logits bit for bit at TP=1 and TP=2 (column-parallel slices across packed output
//! words, row-parallel slices across groups), and any slice read must equal the twin's.

mod common;

use std::path::Path;

use common::checkpoint::{
    f32_tensor, is_linear, tiny_llama_tensors, twin_pairs, write, Stored, TwinPair,
};
use half::f16;
use serde_json::{json, Value};
use tpserve_modelfile::weights::packed_int::AWQ_VALUE_OF_COLUMN;
use tpserve_modelfile::ModelSource;

#[derive(Clone, Copy, Debug)]
enum Variant {
    /// AutoAWQ, GEMM packing, groups of 32.
    Awq,
    /// GPTQ, 4-bit, groups of 32, symmetric, `g_idx` stored in order (AutoGPTQ writes it).
    GptqSymmetric,
    /// GPTQ, 4-bit, groups of 32 with zero points, act-order: `g_idx` out of order.
    GptqActOrder,
    /// GPTQModel's `gptq_v2` format, 8-bit, one group per output, no `g_idx`.
    GptqV2Int8Channel,
}

const GROUP: usize = 32;

impl Variant {
    fn bits(self) -> u32 {
        match self {
            Self::GptqV2Int8Channel => 8,
            _ => 4,
        }
    }

    fn group(self) -> Option<usize> {
        match self {
            Self::GptqV2Int8Channel => None,
            _ => Some(GROUP),
        }
    }

    fn symmetric(self) -> bool {
        matches!(self, Self::GptqSymmetric)
    }

    /// What the format adds to a stored zero point.
    fn zero_offset(self) -> u32 {
        match self {
            Self::GptqSymmetric | Self::GptqActOrder => 1,
            _ => 0,
        }
    }

    fn quantization_config(self) -> Value {
        match self {
            Self::Awq => json!({"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                "zero_point": true, "version": "gemm"}),
            Self::GptqSymmetric => json!({"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                          "desc_act": false, "sym": true}),
            Self::GptqActOrder => json!({"quant_method": "gptq", "bits": 4, "group_size": GROUP,
                                         "desc_act": true, "sym": false}),
            Self::GptqV2Int8Channel => json!({"quant_method": "gptq", "bits": 8, "group_size": -1,
                                              "desc_act": false, "sym": false,
                                              "checkpoint_format": "gptq_v2"}),
        }
    }
}

/// A weight `[n_out, k_in]` quantized: values `[n][k]`, zero points and f16 scales
/// `[group][n]`, each input's group.
struct Quantized {
    q: Vec<u32>,
    zeros: Vec<u32>,
    scales: Vec<f16>,
    groups: usize,
    group_of: Vec<usize>,
}

fn quantize(variant: Variant, w: &[f32], n_out: usize, k_in: usize) -> Quantized {
    let group_of: Vec<usize> = match (variant, variant.group()) {
        // Act-order: inputs taken in a scrambled order (a permutation, since 37 is prime to the
        // fixture's widths 64 and 160), each run of GROUP of them a group.
        (Variant::GptqActOrder, Some(g)) => (0..k_in).map(|k| (k * 37 + 11) % k_in / g).collect(),
        (_, Some(g)) => (0..k_in).map(|k| k / g).collect(),
        (_, None) => vec![0; k_in],
    };
    let groups = group_of.iter().max().unwrap() + 1;
    let maxq = (1u32 << variant.bits()) - 1;
    let (mut zeros, mut scales) = (vec![0u32; groups * n_out], vec![f16::ZERO; groups * n_out]);
    let mut q = vec![0u32; n_out * k_in];
    for g in 0..groups {
        let members: Vec<usize> = (0..k_in).filter(|&k| group_of[k] == g).collect();
        for n in 0..n_out {
            let values = members.iter().map(|&k| w[n * k_in + k]);
            let lo = values.clone().fold(f32::INFINITY, f32::min).min(0.0);
            let hi = values.fold(f32::NEG_INFINITY, f32::max).max(0.0);
            let (scale, zero) = if variant.symmetric() {
                (2.0 * hi.max(-lo) / maxq as f32, maxq.div_ceil(2))
            } else {
                let scale = (hi - lo) / maxq as f32;
                let zero = (-lo / scale).round() as u32;
                // The original GPTQ format stores zero - 1: keep it representable.
                (scale, zero.clamp(variant.zero_offset(), maxq))
            };
            let scale = f16::from_f32(if scale > 0.0 { scale } else { 1e-3 });
            scales[g * n_out + n] = scale;
            zeros[g * n_out + n] = zero;
            for &k in &members {
                let v = (w[n * k_in + k] / scale.to_f32()).round() + zero as f32;
                q[n * k_in + k] = v.clamp(0.0, maxq as f32) as u32;
            }
        }
    }
    Quantized {
        q,
        zeros,
        scales,
        groups,
        group_of,
    }
}

fn words(name: String, shape: Vec<usize>, words: &[u32]) -> Stored {
    Stored {
        name,
        dtype: safetensors::Dtype::I32,
        shape,
        bytes: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
    }
}

/// The tensors a checkpoint of `variant` stores for the layer `base` (`X` of `X.weight`).
fn packed(variant: Variant, base: &str, t: &Quantized, n_out: usize, k_in: usize) -> Vec<Stored> {
    let bits = variant.bits() as usize;
    let per_word = 32 / bits;
    let offset = variant.zero_offset();
    let mut out = Vec::new();
    match variant {
        Variant::Awq => {
            let cols = n_out / 8;
            let mut qweight = vec![0u32; k_in * cols];
            for k in 0..k_in {
                for n in 0..n_out {
                    qweight[k * cols + n / 8] |=
                        t.q[n * k_in + k] << (4 * AWQ_VALUE_OF_COLUMN[n % 8]);
                }
            }
            let mut qzeros = vec![0u32; t.groups * cols];
            for g in 0..t.groups {
                for n in 0..n_out {
                    qzeros[g * cols + n / 8] |=
                        t.zeros[g * n_out + n] << (4 * AWQ_VALUE_OF_COLUMN[n % 8]);
                }
            }
            out.push(words(format!("{base}.qweight"), vec![k_in, cols], &qweight));
            out.push(words(
                format!("{base}.qzeros"),
                vec![t.groups, cols],
                &qzeros,
            ));
        }
        _ => {
            let mut qweight = vec![0u32; k_in / per_word * n_out];
            for k in 0..k_in {
                for n in 0..n_out {
                    qweight[(k / per_word) * n_out + n] |=
                        t.q[n * k_in + k] << (bits * (k % per_word));
                }
            }
            let cols = n_out.div_ceil(per_word);
            let mut qzeros = vec![0u32; t.groups * cols];
            for g in 0..t.groups {
                for n in 0..n_out {
                    qzeros[g * cols + n / per_word] |=
                        (t.zeros[g * n_out + n] - offset) << (bits * (n % per_word));
                }
            }
            out.push(words(
                format!("{base}.qweight"),
                vec![k_in / per_word, n_out],
                &qweight,
            ));
            out.push(words(
                format!("{base}.qzeros"),
                vec![t.groups, cols],
                &qzeros,
            ));
            if !matches!(variant, Variant::GptqV2Int8Channel) {
                let g_idx: Vec<u32> = t.group_of.iter().map(|&g| g as u32).collect();
                out.push(words(format!("{base}.g_idx"), vec![k_in], &g_idx));
            }
        }
    }
    out.push(Stored {
        name: format!("{base}.scales"),
        dtype: safetensors::Dtype::F16,
        shape: vec![t.groups, n_out],
        bytes: t.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
    });
    out
}

/// Writes the fixture quantized as `variant` to `packed_dir` and its dequantized weights to
/// `f32_dir`.
fn write_pair(variant: Variant, packed_dir: &Path, f32_dir: &Path) {
    let (mut quantized, mut plain) = (Vec::new(), Vec::new());
    for (name, shape, values) in tiny_llama_tensors() {
        if !is_linear(&name) {
            quantized.push(f32_tensor(name.clone(), shape.clone(), &values));
            plain.push(f32_tensor(name, shape, &values));
            continue;
        }
        let (n_out, k_in) = (shape[0], shape[1]);
        let t = quantize(variant, &values, n_out, k_in);
        let dequantized: Vec<f32> = (0..n_out * k_in)
            .map(|i| {
                let (n, k) = (i / k_in, i % k_in);
                let g = t.group_of[k];
                (t.q[i] as f32 - t.zeros[g * n_out + n] as f32) * t.scales[g * n_out + n].to_f32()
            })
            .collect();
        let base = name.strip_suffix(".weight").unwrap();
        quantized.extend(packed(variant, base, &t, n_out, k_in));
        plain.push(f32_tensor(name, shape, &dequantized));
    }
    write(packed_dir, &quantized, Some(variant.quantization_config()));
    write(f32_dir, &plain, None);
}

fn pairs() -> Vec<(Variant, TwinPair)> {
    twin_pairs(
        &[
            Variant::Awq,
            Variant::GptqSymmetric,
            Variant::GptqActOrder,
            Variant::GptqV2Int8Channel,
        ],
        write_pair,
    )
}

#[test]
fn awq_and_gptq_checkpoints_run_on_the_cpu_exactly_as_their_dequantized_twins() {
    for (variant, pair) in pairs() {
        let source = ModelSource::open(&pair.quantized(), None).unwrap();
        let scheme = source
            .packed_int_scheme()
            .expect("a packed checkpoint")
            .unwrap();
        eprintln!("{variant:?}: {}", scheme.describe());
        pair.assert_same_logits(&format!("{variant:?}"));
    }
}

#[test]
fn packed_layers_are_listed_as_weights_and_any_slice_reads_as_the_twins() {
    for (variant, pair) in pairs() {
        let (packed, plain) = pair.readers();
        let name = "model.layers.1.mlp.down_proj.weight";
        assert!(packed.contains(name) && packed.names().iter().any(|n| n == name));
        assert_eq!(packed.shape(name).unwrap(), vec![64, 160], "{variant:?}");
        assert_eq!(packed.stored_dtype(name), None);
        assert!(packed.read_stored(name, None).unwrap().is_none());
        for (name, dim, start, len) in [
            ("model.layers.0.self_attn.k_proj.weight", 0, 16, 16),
            ("model.layers.1.self_attn.o_proj.weight", 1, 32, 32),
            ("model.layers.1.mlp.down_proj.weight", 1, 17, 80),
            ("model.layers.0.mlp.up_proj.weight", 0, 80, 80),
        ] {
            let read = |w: &dyn tpserve_modelfile::WeightReader| -> Vec<f32> {
                w.read_slice(name, dim, start, len)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            assert_eq!(
                read(packed.as_ref()),
                read(plain.as_ref()),
                "{variant:?} {name}"
            );
        }
        let e = packed.read_slice(name, 1, 100, 100).unwrap_err();
        assert!(e.to_string().contains("slice"), "{e}");
    }
}

#[test]
fn read_int4_gives_4_bit_layers_in_the_gpu_layout_where_their_groups_allow() {
    for (variant, pair) in pairs() {
        let (packed, plain) = pair.readers();
        // (name, slice, whether the layout holds it): the tensor-parallel slices of TP=2.
        for (name, dim, start, len, holds) in [
            ("model.layers.0.self_attn.q_proj.weight", 0, 32, 32, true),
            ("model.layers.1.mlp.gate_proj.weight", 0, 0, 80, true),
            ("model.layers.1.self_attn.o_proj.weight", 1, 32, 32, true),
            // 80 inputs: groups of 32 cut in the middle.
            ("model.layers.0.mlp.down_proj.weight", 1, 80, 80, false),
            ("model.layers.0.mlp.down_proj.weight", 1, 0, 160, true),
        ] {
            let got = packed.read_int4(name, Some((dim, start, len))).unwrap();
            // 8-bit weights are not in the layout; act-order groups are where the slice keeps
            // every input (sorted by group), not where it cuts them.
            let holds = holds
                && match variant {
                    Variant::Awq | Variant::GptqSymmetric => true,
                    Variant::GptqActOrder => dim == 0 || (start, len) == (0, 160),
                    Variant::GptqV2Int8Channel => false,
                };
            let Some(t) = got else {
                assert!(
                    !holds,
                    "{variant:?} {name} {dim} {start} {len}: not read as int4"
                );
                continue;
            };
            assert!(holds, "{variant:?} {name}: read as int4 where it cannot be");
            let want: Vec<f32> = plain
                .read_slice(name, dim, start, len)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                t.perm.is_some(),
                matches!(variant, Variant::GptqActOrder),
                "{variant:?} {name}: inputs reordered"
            );
            let values: Vec<f32> = (0..t.rows).flat_map(|n| t.row(n)).collect();
            assert_eq!(values, want, "{variant:?} {name} {dim} {start} {len}");
        }
    }
}
