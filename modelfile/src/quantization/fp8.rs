//! The FP8 forms of `quantization_config`: `quant_method: "fp8"` (AutoFP8 and vLLM's `Fp8Config`:
//! `activation_scheme` static or dynamic, optional `weight_block_size`) and llm-compressor's
//! `compressed-tensors` in its float-quantized format (`config_groups` whose weights are 8-bit
//! floats, strategy tensor, channel or block; activations dynamic per token or per tensor, static
//! per tensor, or none).

use serde_json::Value as Json;

/// How an FP8 checkpoint's weights are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8WeightScales {
    Tensor,
    Channel,
    /// Blocks of `[rows, cols]` elements.
    Block(usize, usize),
}

/// How an FP8 checkpoint's activations are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8ActivationScales {
    /// Computed per tensor at run time.
    DynamicTensor,
    /// Computed per token at run time.
    DynamicToken,
    /// Fixed per tensor by the checkpoint (`input_scale`).
    Static,
    /// Not quantized (weight-only FP8).
    None,
}

/// An FP8 checkpoint's scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fp8Checkpoint {
    /// `fp8` or `compressed-tensors`.
    pub method: String,
    pub weights: Fp8WeightScales,
    pub activations: Fp8ActivationScales,
    /// compressed-tensors' `kv_cache_scheme` is set (KV-cache scales in the checkpoint).
    pub kv_cache_scales: bool,
}

impl Fp8Checkpoint {
    /// The block size of `weight_scale_inv` scales, for block-scaled weights.
    pub fn block(&self) -> Option<(usize, usize)> {
        match self.weights {
            Fp8WeightScales::Block(r, c) => Some((r, c)),
            _ => None,
        }
    }

    /// A one-line description: `fp8 (weights per channel, activations dynamic per token)`.
    pub fn describe(&self) -> String {
        let weights = match self.weights {
            Fp8WeightScales::Tensor => "per tensor".to_string(),
            Fp8WeightScales::Channel => "per channel".to_string(),
            Fp8WeightScales::Block(r, c) => format!("per {r} x {c} block"),
        };
        let activations = match self.activations {
            Fp8ActivationScales::DynamicTensor => "dynamic per tensor",
            Fp8ActivationScales::DynamicToken => "dynamic per token",
            Fp8ActivationScales::Static => "static per tensor",
            Fp8ActivationScales::None => "not quantized",
        };
        format!(
            "{} (FP8 E4M3 weights scaled {weights}, activations {activations})",
            self.method
        )
    }
}

/// The FP8 scheme of a `quantization_config` object: `None` when its method is not an FP8 one
/// (`awq`, `gptq`, ...), `Some(Err(why))` for an FP8 method in a form we do not read.
pub fn fp8_scheme(q: &Json) -> Option<Result<Fp8Checkpoint, String>> {
    match q.get("quant_method").and_then(Json::as_str)? {
        "fp8" => Some(fp8_config(q)),
        "compressed-tensors" => Some(compressed_tensors(q)),
        _ => None,
    }
}

fn block_size(v: &Json, key: &str) -> Result<Option<(usize, usize)>, String> {
    match v.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(b) => match b
            .as_array()
            .map(|a| a.iter().map(Json::as_u64).collect::<Vec<_>>())
        {
            Some(dims) if dims.len() == 2 && dims.iter().all(|d| d.is_some_and(|d| d > 0)) => {
                Ok(Some((dims[0].unwrap() as usize, dims[1].unwrap() as usize)))
            }
            _ => Err(format!("{key} {b} is not two positive integers")),
        },
    }
}

/// vLLM's and Hugging Face's `Fp8Config`.
fn fp8_config(q: &Json) -> Result<Fp8Checkpoint, String> {
    let activations = match q.get("activation_scheme").and_then(Json::as_str) {
        None | Some("dynamic") => Fp8ActivationScales::DynamicTensor,
        Some("static") => Fp8ActivationScales::Static,
        Some(other) => {
            return Err(format!(
                "quant_method fp8 with activation_scheme {other:?} (expected static or dynamic)"
            ))
        }
    };
    let weights = match block_size(q, "weight_block_size")? {
        Some((r, c)) => Fp8WeightScales::Block(r, c),
        None => Fp8WeightScales::Tensor,
    };
    let activations = match (weights, activations) {
        // Block-scaled checkpoints quantize activations per token and group of columns at run
        // time; tpserve dequantizes them (see `Fp8WeightScales::Block`'s users).
        (Fp8WeightScales::Block(..), _) => Fp8ActivationScales::DynamicToken,
        (_, a) => a,
    };
    Ok(Fp8Checkpoint {
        method: "fp8".into(),
        weights,
        activations,
        kv_cache_scales: false,
    })
}

/// llm-compressor's compressed-tensors, float-quantized (or naive-quantized with float types).
fn compressed_tensors(q: &Json) -> Result<Fp8Checkpoint, String> {
    let format = q.get("format").and_then(Json::as_str).unwrap_or("dense");
    let groups = q
        .get("config_groups")
        .and_then(Json::as_object)
        .filter(|g| !g.is_empty())
        .ok_or("compressed-tensors without config_groups")?;
    let mut scheme: Option<(Fp8WeightScales, Fp8ActivationScales)> = None;
    for (name, group) in groups {
        let group_format = group.get("format").and_then(Json::as_str).unwrap_or(format);
        if !matches!(group_format, "float-quantized" | "naive-quantized") {
            return Err(format!(
                "compressed-tensors format {group_format:?} (config group {name}); tpserve reads \
                 the float-quantized (FP8) format"
            ));
        }
        let weights = group
            .get("weights")
            .filter(|w| !w.is_null())
            .ok_or(format!(
                "compressed-tensors config group {name} has no weights scheme"
            ))?;
        let w = float8_args(weights, &format!("config group {name}'s weights"))?;
        if weights.get("dynamic").and_then(Json::as_bool) == Some(true) {
            return Err(format!("config group {name}: dynamic weight scales"));
        }
        let weight_scales = match w {
            "tensor" => Fp8WeightScales::Tensor,
            "channel" => Fp8WeightScales::Channel,
            "block" => {
                let (r, c) = block_size(weights, "block_structure")?.unwrap_or((128, 128));
                Fp8WeightScales::Block(r, c)
            }
            other => {
                return Err(format!(
                    "config group {name}: weight strategy {other:?} (tpserve reads tensor, \
                     channel and block)"
                ))
            }
        };
        let activations = match group.get("input_activations") {
            None | Some(Json::Null) => Fp8ActivationScales::None,
            Some(a) => {
                let strategy = float8_args(a, &format!("config group {name}'s input activations"))?;
                let dynamic = a.get("dynamic").and_then(Json::as_bool).unwrap_or(false);
                match (strategy, dynamic) {
                    ("tensor", false) => Fp8ActivationScales::Static,
                    ("tensor", true) => Fp8ActivationScales::DynamicTensor,
                    ("token" | "group", true) => Fp8ActivationScales::DynamicToken,
                    (s, d) => {
                        return Err(format!(
                            "config group {name}: input activations with strategy {s:?}, \
                             dynamic {d}"
                        ))
                    }
                }
            }
        };
        match scheme {
            None => scheme = Some((weight_scales, activations)),
            Some(s) if s == (weight_scales, activations) => {}
            Some(_) => {
                return Err(
                    "compressed-tensors config groups with different FP8 schemes".to_string(),
                )
            }
        }
    }
    let (weights, activations) = scheme.expect("at least one group");
    Ok(Fp8Checkpoint {
        method: "compressed-tensors".into(),
        weights,
        activations,
        kv_cache_scales: q.get("kv_cache_scheme").is_some_and(|k| !k.is_null()),
    })
}

/// Checks a quantization-args object is 8-bit float and symmetric; returns its strategy.
fn float8_args<'a>(args: &'a Json, what: &str) -> Result<&'a str, String> {
    let kind = args.get("type").and_then(Json::as_str).unwrap_or("int");
    let bits = args.get("num_bits").and_then(Json::as_u64).unwrap_or(8);
    if kind != "float" || bits != 8 {
        return Err(format!(
            "{what}: {bits}-bit {kind} (tpserve reads 8-bit float, FP8 E4M3)"
        ));
    }
    if args.get("symmetric").and_then(Json::as_bool) == Some(false) {
        return Err(format!("{what}: asymmetric FP8"));
    }
    Ok(args
        .get("strategy")
        .and_then(Json::as_str)
        .unwrap_or("tensor"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scheme(q: Json) -> Result<Fp8Checkpoint, String> {
        fp8_scheme(&q).expect("an FP8 method")
    }

    #[test]
    fn fp8_configs_as_autofp8_and_deepseek_write_them() {
        let s = scheme(json!({"quant_method": "fp8", "activation_scheme": "static"})).unwrap();
        assert_eq!(
            (s.weights, s.activations),
            (Fp8WeightScales::Tensor, Fp8ActivationScales::Static)
        );
        let s = scheme(
            json!({"quant_method": "fp8", "activation_scheme": "dynamic",
                              "weight_block_size": [128, 128]}),
        )
        .unwrap();
        assert_eq!(s.block(), Some((128, 128)));
        assert!(
            s.describe().contains("per 128 x 128 block"),
            "{}",
            s.describe()
        );
        assert!(scheme(json!({"quant_method": "fp8", "activation_scheme": "x"})).is_err());
        assert!(scheme(json!({"quant_method": "fp8", "weight_block_size": [0, 1]})).is_err());
        assert!(fp8_scheme(&json!({"quant_method": "awq"})).is_none());
    }

    fn compressed(weights: Json, input: Json, format: &str) -> Json {
        json!({
            "quant_method": "compressed-tensors",
            "format": format,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": input}},
            "ignore": ["lm_head"],
        })
    }

    #[test]
    fn compressed_tensors_float_quantized_schemes_are_read() {
        let w = |strategy: &str| {
            json!({"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": true,
                   "dynamic": false})
        };
        let a = |strategy: &str, dynamic: bool| {
            json!({"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": true,
                   "dynamic": dynamic})
        };
        let s = scheme(compressed(
            w("channel"),
            a("token", true),
            "float-quantized",
        ))
        .unwrap();
        assert_eq!(
            (s.weights, s.activations),
            (Fp8WeightScales::Channel, Fp8ActivationScales::DynamicToken)
        );
        let s = scheme(compressed(
            w("tensor"),
            a("tensor", false),
            "naive-quantized",
        ))
        .unwrap();
        assert_eq!(s.activations, Fp8ActivationScales::Static);
        let s = scheme(compressed(w("tensor"), Json::Null, "float-quantized")).unwrap();
        assert_eq!(s.activations, Fp8ActivationScales::None);
        let int4 = json!({"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128});
        let e = scheme(compressed(int4, Json::Null, "pack-quantized")).unwrap_err();
        assert!(e.contains("pack-quantized"), "{e}");
        let int8 = json!({"num_bits": 8, "type": "int", "strategy": "channel"});
        let e = scheme(compressed(int8, Json::Null, "int-quantized")).unwrap_err();
        assert!(e.contains("int-quantized"), "{e}");
        let int8 = json!({"num_bits": 8, "type": "int", "strategy": "channel"});
        let e = scheme(compressed(int8, Json::Null, "naive-quantized")).unwrap_err();
        assert!(e.contains("8-bit int"), "{e}");
    }
}
