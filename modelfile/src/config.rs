//! The model's shape and hyper-parameters ([`LlamaConfig`]), read from a Hugging Face
//! `config.json` (+ `generation_config.json`) or from GGUF metadata.
//!
//! Invariants of a built config: `num_attention_heads` and `num_key_value_heads` are non-zero and
//! the second divides the first; `head_dim` is non-zero; `architecture` is one of
//! [`SUPPORTED_ARCHITECTURES`]; `rope_scaling` is `None` or a llama3 scaling. Anything else is an
//! error at load time, never a surprise in the worker. Costs: parsing one small JSON document.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::gguf::{meta_f64, meta_str, meta_u32, meta_usize};

/// The Hugging Face architecture names this crate maps. All are the Llama block (RMSNorm,
/// rotate-half RoPE, SwiGLU MLP, grouped-query attention); Qwen2 adds q/k/v biases. The
/// `*Model` names are the same decoders without a language-model head (embedding checkpoints
/// such as e5-mistral: tensors without the `model.` prefix, no `lm_head`).
pub const SUPPORTED_ARCHITECTURES: [&str; 6] = [
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaModel",
    "MistralModel",
    "Qwen2Model",
];

/// Llama 3 style RoPE frequency scaling (`rope_scaling.rope_type == "llama3"`), the only scaling
/// type supported: any other type is [`Error::UnsupportedRopeScaling`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The decoder's configuration, whatever the source format.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    /// Hugging Face architecture name, one of [`SUPPORTED_ARCHITECTURES`] (GGUF "llama" ->
    /// LlamaForCausalLM, "qwen2" -> Qwen2ForCausalLM).
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// The config's `head_dim`, or `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// The output projection is the embedding matrix (there is no `lm_head.weight` to read).
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2, or `attention_bias: true`).
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Every token id that ends generation, deduplicated, in the order found.
    pub eos_token_ids: Vec<u32>,
}

fn config_err(detail: impl Into<String>) -> Error {
    Error::Config {
        detail: detail.into(),
    }
}

fn get_usize(j: &Json, key: &str) -> Result<Option<usize>> {
    match j.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| config_err(format!("`{key}` is not a non-negative integer: {v}"))),
    }
}

fn req_usize(j: &Json, key: &str) -> Result<usize> {
    get_usize(j, key)?.ok_or_else(|| config_err(format!("`{key}` is missing")))
}

fn get_f64(j: &Json, key: &str) -> Result<Option<f64>> {
    match j.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| config_err(format!("`{key}` is not a number: {v}"))),
    }
}

fn get_bool(j: &Json, key: &str) -> Result<Option<bool>> {
    match j.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| config_err(format!("`{key}` is not a boolean: {v}"))),
    }
}

/// Token ids given as an integer, a list of integers, or null.
pub(crate) fn token_ids(j: &Json, key: &str) -> Result<Vec<u32>> {
    let one = |v: &Json| {
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| config_err(format!("`{key}` holds a non token id: {v}")))
    };
    match j.get(key) {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// Appends the ids of `more` not already in `ids`, keeping order.
pub(crate) fn merge_ids(ids: &mut Vec<u32>, more: impl IntoIterator<Item = u32>) {
    for id in more {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
}

fn rope_scaling_from_json(v: &Json) -> Result<Option<RopeScaling>> {
    if v.is_null() {
        return Ok(None);
    }
    let rope_type = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Json::as_str)
        .unwrap_or("default");
    match rope_type {
        "default" => Ok(None),
        "llama3" => {
            let field = |k: &str| {
                get_f64(v, k)?.ok_or_else(|| config_err(format!("rope_scaling.{k} is missing")))
            };
            Ok(Some(RopeScaling {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: get_usize(v, "original_max_position_embeddings")?
                    .ok_or_else(|| {
                        config_err("rope_scaling.original_max_position_embeddings is missing")
                    })?,
            }))
        }
        other => Err(Error::UnsupportedRopeScaling {
            rope_type: other.to_string(),
        }),
    }
}

impl LlamaConfig {
    /// True for a decoder without a language-model head (`LlamaModel`, `MistralModel`,
    /// `Qwen2Model`): it can only embed.
    pub fn is_headless(&self) -> bool {
        !self.architecture.ends_with("ForCausalLM")
    }

    /// Parses a Hugging Face `config.json`. The architecture comes from `architectures[0]` (or,
    /// when absent, from `model_type`); one not in [`SUPPORTED_ARCHITECTURES`] is
    /// [`Error::UnsupportedArchitecture`] naming it. Defaults follow transformers' `LlamaConfig`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let j: Json = serde_json::from_str(text)
            .map_err(|e| config_err(format!("config.json is not valid JSON: {e}")))?;
        if !j.is_object() {
            return Err(config_err("config.json is not a JSON object"));
        }
        let architecture = match j.get("architectures").and_then(Json::as_array) {
            Some(list) => match list.first().and_then(Json::as_str) {
                Some(name) => name.to_string(),
                None => return Err(config_err("`architectures` is empty or not strings")),
            },
            None => match j.get("model_type").and_then(Json::as_str) {
                Some("llama") => "LlamaForCausalLM".to_string(),
                Some("mistral") => "MistralForCausalLM".to_string(),
                Some("qwen2") => "Qwen2ForCausalLM".to_string(),
                Some(other) => {
                    return Err(Error::UnsupportedArchitecture {
                        name: other.to_string(),
                    })
                }
                None => return Err(config_err("neither `architectures` nor `model_type` given")),
            },
        };
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(Error::UnsupportedArchitecture { name: architecture });
        }
        let hidden_size = req_usize(&j, "hidden_size")?;
        let num_attention_heads = req_usize(&j, "num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(config_err("num_attention_heads is 0"));
        }
        let head_dim = match get_usize(&j, "head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(config_err(format!(
                        "hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
                    )));
                }
                hidden_size / num_attention_heads
            }
        };
        // transformers >= 5 moves rope settings into `rope_parameters`.
        let rope_params = j.get("rope_parameters").unwrap_or(&Json::Null);
        let rope_theta = match get_f64(&j, "rope_theta")? {
            Some(t) => t,
            None => get_f64(rope_params, "rope_theta")?.unwrap_or(10000.0),
        };
        let rope_scaling = match j.get("rope_scaling") {
            Some(v) if !v.is_null() => rope_scaling_from_json(v)?,
            _ => rope_scaling_from_json(rope_params)?,
        };
        let is_qwen2 = architecture.starts_with("Qwen2");
        let config = LlamaConfig {
            hidden_size,
            intermediate_size: req_usize(&j, "intermediate_size")?,
            num_hidden_layers: req_usize(&j, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: get_usize(&j, "num_key_value_heads")?
                .unwrap_or(num_attention_heads),
            head_dim,
            vocab_size: req_usize(&j, "vocab_size")?,
            rms_norm_eps: get_f64(&j, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get_usize(&j, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: get_bool(&j, "tie_word_embeddings")?.unwrap_or(false),
            attention_bias: is_qwen2 || get_bool(&j, "attention_bias")?.unwrap_or(false),
            bos_token_id: token_ids(&j, "bos_token_id")?.first().copied(),
            eos_token_ids: {
                let mut ids = Vec::new();
                merge_ids(&mut ids, token_ids(&j, "eos_token_id")?);
                ids
            },
            architecture,
        };
        config.validate()?;
        Ok(config)
    }

    /// Builds the config from GGUF metadata. `has_tensor` answers for GGUF tensor names (it
    /// decides tied embeddings and attention biases).
    pub(crate) fn from_gguf(
        md: &HashMap<String, gguf_file::Value>,
        has_tensor: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let arch = meta_str(md, "general.architecture")?;
        let architecture = match arch {
            "llama" => "LlamaForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            other => {
                return Err(Error::UnsupportedArchitecture {
                    name: other.to_string(),
                })
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let opt = |k: &str| md.get(&key(k)).is_some();
        let hidden_size = meta_usize(md, &key("embedding_length"))?;
        let num_attention_heads = meta_usize(md, &key("attention.head_count"))?;
        if num_attention_heads == 0 {
            return Err(config_err("attention.head_count is 0"));
        }
        let num_key_value_heads = if opt("attention.head_count_kv") {
            meta_usize(md, &key("attention.head_count_kv"))?
        } else {
            num_attention_heads
        };
        let head_dim = if opt("attention.key_length") {
            meta_usize(md, &key("attention.key_length"))?
        } else if hidden_size % num_attention_heads == 0 {
            hidden_size / num_attention_heads
        } else {
            return Err(config_err(format!(
                "embedding_length {hidden_size} is not a multiple of head_count {num_attention_heads}"
            )));
        };
        if opt("rope.dimension_count") {
            let rot = meta_usize(md, &key("rope.dimension_count"))?;
            if rot != head_dim {
                return Err(config_err(format!(
                    "partial rotary embeddings (rope.dimension_count {rot} != head_dim {head_dim}) are not supported"
                )));
            }
        }
        let rope_scaling = if opt("rope.scaling.type") {
            match meta_str(md, &key("rope.scaling.type"))? {
                "none" => None,
                other => {
                    return Err(Error::UnsupportedRopeScaling {
                        rope_type: other.to_string(),
                    })
                }
            }
        } else {
            None
        };
        if has_tensor("rope_freqs.weight") {
            // llama.cpp bakes Llama 3.1's scaling into per-frequency factors; recovering the four
            // HF parameters from them is not done, and ignoring them would change the outputs.
            return Err(Error::UnsupportedRopeScaling {
                rope_type: "llama3 as a rope_freqs.weight tensor".to_string(),
            });
        }
        let vocab_size = if opt("vocab_size") {
            meta_usize(md, &key("vocab_size"))?
        } else {
            match md.get("tokenizer.ggml.tokens") {
                Some(gguf_file::Value::Array(tokens)) => tokens.len(),
                _ => {
                    return Err(Error::GgufMetadata {
                        key: key("vocab_size"),
                        detail: "missing, and no tokenizer.ggml.tokens to count".to_string(),
                    })
                }
            }
        };
        let mut eos_token_ids = Vec::new();
        for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if md.contains_key(k) {
                merge_ids(&mut eos_token_ids, [meta_u32(md, k)?]);
            }
        }
        let bos_token_id = if md.contains_key("tokenizer.ggml.bos_token_id") {
            Some(meta_u32(md, "tokenizer.ggml.bos_token_id")?)
        } else {
            None
        };
        let config = LlamaConfig {
            architecture: architecture.to_string(),
            hidden_size,
            intermediate_size: meta_usize(md, &key("feed_forward_length"))?,
            num_hidden_layers: meta_usize(md, &key("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: if opt("attention.layer_norm_rms_epsilon") {
                meta_f64(md, &key("attention.layer_norm_rms_epsilon"))?
            } else {
                1e-5
            },
            rope_theta: if opt("rope.freq_base") {
                meta_f64(md, &key("rope.freq_base"))?
            } else {
                10000.0
            },
            rope_scaling,
            max_position_embeddings: meta_usize(md, &key("context_length"))?,
            tie_word_embeddings: !has_tensor("output.weight"),
            attention_bias: arch == "qwen2" || has_tensor("blk.0.attn_q.bias"),
            bos_token_id,
            eos_token_ids,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return Err(config_err(format!(
                "num_key_value_heads {} must be non-zero and divide num_attention_heads {}",
                self.num_key_value_heads, self.num_attention_heads
            )));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(config_err(format!(
                "head_dim {} must be even and non-zero",
                self.head_dim
            )));
        }
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return Err(config_err(format!("{name} is 0")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "rms_norm_eps": 1e-05, "rope_theta": 100000, "max_position_embeddings": 8192,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": null
    }"#;

    #[test]
    fn smollm2_style_config_json_is_read() {
        let c = LlamaConfig::from_hf_json(LLAMA).unwrap();
        assert_eq!(
            c,
            LlamaConfig {
                architecture: "LlamaForCausalLM".into(),
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                vocab_size: 49152,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                rope_scaling: None,
                max_position_embeddings: 8192,
                tie_word_embeddings: true,
                attention_bias: false,
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
            }
        );
    }

    #[test]
    fn eos_given_as_a_list_keeps_every_id_once() {
        let text = LLAMA.replace(
            r#""eos_token_id": 2"#,
            r#""eos_token_id": [128001, 128008, 128009, 128001]"#,
        );
        let c = LlamaConfig::from_hf_json(&text).unwrap();
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
    }

    #[test]
    fn qwen2_has_attention_bias_and_explicit_head_dim_wins() {
        let text = LLAMA
            .replace("LlamaForCausalLM", "Qwen2ForCausalLM")
            .replacen('{', r#"{"head_dim": 128,"#, 1);
        let c = LlamaConfig::from_hf_json(&text).unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.head_dim, 128);
        let c = LlamaConfig::from_hf_json(&LLAMA.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": null, "attention_bias": true"#,
        ))
        .unwrap();
        assert!(c.attention_bias);
    }

    #[test]
    fn llama3_rope_scaling_is_read_from_either_key_name() {
        for key in ["rope_type", "type"] {
            let text = LLAMA.replace(
                r#""rope_scaling": null"#,
                &format!(r#""rope_scaling": {{"{key}": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#),
            );
            let c = LlamaConfig::from_hf_json(&text).unwrap();
            assert_eq!(
                c.rope_scaling,
                Some(RopeScaling {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192
                })
            );
        }
    }

    #[test]
    fn unsupported_rope_scaling_type_is_named() {
        let text = LLAMA.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "yarn", "factor": 4.0}"#,
        );
        match LlamaConfig::from_hf_json(&text) {
            Err(Error::UnsupportedRopeScaling { rope_type }) => assert_eq!(rope_type, "yarn"),
            other => panic!("unexpected {other:?}"),
        }
        let text = LLAMA.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "default"}"#,
        );
        assert_eq!(LlamaConfig::from_hf_json(&text).unwrap().rope_scaling, None);
    }

    #[test]
    fn transformers_v5_rope_parameters_are_read() {
        let text = LLAMA.replace(r#""rope_theta": 100000,"#, "").replace(
            r#""rope_scaling": null"#,
            r#""rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}"#,
        );
        let c = LlamaConfig::from_hf_json(&text).unwrap();
        assert_eq!(c.rope_theta, 1_000_000.0);
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn unsupported_architecture_is_named() {
        match LlamaConfig::from_hf_json(&LLAMA.replace("LlamaForCausalLM", "MixtralForCausalLM")) {
            Err(Error::UnsupportedArchitecture { name }) => assert_eq!(name, "MixtralForCausalLM"),
            other => panic!("unexpected {other:?}"),
        }
        let no_arch = LLAMA
            .replace(r#""architectures": ["LlamaForCausalLM"],"#, "")
            .replace("\"llama\"", "\"gemma\"");
        match LlamaConfig::from_hf_json(&no_arch) {
            Err(Error::UnsupportedArchitecture { name }) => assert_eq!(name, "gemma"),
            other => panic!("unexpected {other:?}"),
        }
        let mistral = LLAMA
            .replace(r#""architectures": ["LlamaForCausalLM"],"#, "")
            .replace("\"llama\"", "\"mistral\"");
        assert_eq!(
            LlamaConfig::from_hf_json(&mistral).unwrap().architecture,
            "MistralForCausalLM"
        );
    }

    #[test]
    fn missing_or_inconsistent_fields_are_config_errors() {
        let bad = [
            LLAMA.replace(r#""hidden_size": 576,"#, ""),
            LLAMA.replace(r#""num_key_value_heads": 3"#, r#""num_key_value_heads": 4"#),
            LLAMA.replace(r#""num_attention_heads": 9"#, r#""num_attention_heads": 7"#),
            LLAMA.replace(r#""vocab_size": 49152"#, r#""vocab_size": "many""#),
            "[1, 2]".to_string(),
            "not json".to_string(),
        ];
        for text in bad {
            assert!(
                matches!(LlamaConfig::from_hf_json(&text), Err(Error::Config { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn defaults_follow_transformers() {
        let text = r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}"#;
        let c = LlamaConfig::from_hf_json(text).unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rms_norm_eps, 1e-6);
        assert_eq!(c.max_position_embeddings, 2048);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.bos_token_id, None);
        assert!(c.eos_token_ids.is_empty());
    }
}
