//! LoRA adapters in PEFT's format: a directory with `adapter_config.json` and
//! `adapter_model.safetensors`, as `PeftModel.save_pretrained` writes it (also for adapters
//! trained on a 4-bit QLoRA base: the adapter's own tensors are f32/bf16/f16 either way).
//!
//! [`LoraAdapter::open`] reads and checks everything against the base model before anything is
//! served: the config's fields, every tensor's name, shape and readability. What we cannot
//! honour is refused with the field or tensor named, never ignored: DoRA (`use_dora`),
//! `modules_to_save`, embedding or `lm_head` adapters, biases other than `"none"`,
//! `fan_in_fan_out`, per-module `rank_pattern` / `alpha_pattern`, PEFT's other LoRA variants
//! (aLoRA, Arrow, BD-LoRA, VeLoRA, MonteCLoRA, KaSA, QA-LoRA), layer replication, retrained
//! token embeddings, initialisations that changed the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA,
//! unless converted when saved), a rank above the server's `--max-lora-rank`, target modules the
//! Llama base lacks, pickled `.bin` weights.
//!
//! The math it describes, per targeted projection `W [out, in]` of a layer:
//! `y = x W^T + scale * (x A^T) B^T` with `A [r, in]`, `B [out, r]` and
//! `scale = lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`).
//!
//! Costs: the tensors are read whole into f32 host memory (`2 * r * (in + out)` floats per
//! module and layer), once per load.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::weights::{SafetensorsReader, WeightReader};

/// The projections of a Llama layer an adapter may target, in PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// Every projection, in layer order.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// PEFT's module name (`q_proj`, ...).
    pub fn module_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    fn parent(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            _ => "mlp",
        }
    }

    fn from_module_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.module_name() == name)
    }

    /// `(out_features, in_features)` of this projection's base weight.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (h, hd) = (c.hidden_size, c.head_dim);
        match self {
            Projection::Q => (c.num_attention_heads * hd, h),
            Projection::K | Projection::V => (c.num_key_value_heads * hd, h),
            Projection::O => (h, c.num_attention_heads * hd),
            Projection::Gate | Projection::Up => (c.intermediate_size, h),
            Projection::Down => (h, c.intermediate_size),
        }
    }

    /// Column-parallel under tensor parallelism (the output features are split); the others
    /// (o, down) are row-parallel (the input features are split).
    pub fn is_column_parallel(self) -> bool {
        !matches!(self, Projection::O | Projection::Down)
    }
}

/// One targeted projection of one layer: `A [rank, in]` and `B [out, rank]`, row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub layer: usize,
    pub projection: Projection,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    /// Input features (`A`'s columns).
    pub in_features: usize,
    /// Output features (`B`'s rows).
    pub out_features: usize,
}

/// A checked adapter, whole (not yet cut for a tensor-parallel rank).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    /// The directory it was read from.
    pub path: PathBuf,
    /// `r`.
    pub rank: usize,
    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`.
    pub scale: f32,
    /// The projections the config targets.
    pub targets: Vec<Projection>,
    /// Every (layer, projection) with weights, sorted.
    pub modules: Vec<LoraModule>,
}

impl LoraAdapter {
    /// Reads and checks the adapter in `dir` against `base`, refusing ranks above `max_rank`.
    pub fn open(dir: &Path, base: &LlamaConfig, max_rank: usize) -> Result<Self> {
        let refuse = |field: &str, detail: String| Error::Lora {
            path: dir.to_path_buf(),
            field: field.to_string(),
            detail,
        };
        if !dir.is_dir() {
            return Err(refuse(
                "lora_path",
                "does not exist or is not a directory (a PEFT adapter is a directory with \
                 adapter_config.json and adapter_model.safetensors)"
                    .into(),
            ));
        }
        let config_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            refuse(
                "adapter_config.json",
                format!("cannot be read ({e}); a PEFT adapter directory has one"),
            )
        })?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| refuse("adapter_config.json", format!("is not valid JSON: {e}")))?;
        let header = parse_config(&config, max_rank, &refuse)?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() {
            let detail = if dir.join("adapter_model.bin").is_file() {
                "is missing and adapter_model.bin (pickled PyTorch) is not read: save the \
                 adapter with safe_serialization=True (PEFT's default) or convert it"
            } else {
                "is missing"
            };
            return Err(refuse("adapter_model.safetensors", detail.into()));
        }
        let reader = SafetensorsReader::open_file(&weights_path)?;
        let modules = read_modules(&reader, base, &header, &refuse)?;
        Ok(Self {
            path: dir.to_path_buf(),
            rank: header.rank,
            scale: header.scale,
            targets: header.targets,
            modules,
        })
    }

    /// Bytes of the f32 weights held.
    pub fn bytes(&self) -> usize {
        self.modules
            .iter()
            .map(|m| (m.a.len() + m.b.len()) * 4)
            .sum()
    }
}

/// What `adapter_config.json` says, checked.
#[derive(Debug)]
struct Header {
    rank: usize,
    scale: f32,
    targets: Vec<Projection>,
}

fn parse_config(
    config: &Value,
    max_rank: usize,
    refuse: &dyn Fn(&str, String) -> Error,
) -> Result<Header> {
    let field = |name: &str| config.get(name).filter(|v| !v.is_null());
    if let Some(t) = field("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(refuse(
                "peft_type",
                format!("is {t:?}; only LORA is served"),
            ));
        }
    }
    let truthy = |name: &str| field(name).is_some_and(|v| v.as_bool() == Some(true));
    if truthy("use_dora") {
        return Err(refuse(
            "use_dora",
            "is true: DoRA adapters are not supported (merge the adapter into the model instead)"
                .into(),
        ));
    }
    if let Some(m) = field("modules_to_save") {
        if m.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(refuse(
                "modules_to_save",
                format!(
                    "is {m}: adapters that replace whole modules (e.g. a retrained lm_head) are \
                     not supported"
                ),
            ));
        }
    }
    if truthy("fan_in_fan_out") {
        return Err(refuse(
            "fan_in_fan_out",
            "is true: only Llama-style (out, in) weights are served".into(),
        ));
    }
    if truthy("lora_bias") {
        return Err(refuse(
            "lora_bias",
            "is true: adapters with a bias on B are not supported".into(),
        ));
    }
    match field("bias").map(|b| b.as_str()) {
        None | Some(Some("none")) => {}
        Some(other) => {
            return Err(refuse(
                "bias",
                format!(
                    "is {}: only \"none\" is supported (trained biases would change the base \
                     model's layers)",
                    other.map_or_else(|| "not a string".to_string(), |s| format!("{s:?}"))
                ),
            ))
        }
    }
    for name in ["rank_pattern", "alpha_pattern"] {
        if field(name).is_some_and(|p| p.as_object().is_none_or(|o| !o.is_empty())) {
            return Err(refuse(
                name,
                "is set: per-module ranks or alphas are not supported".into(),
            ));
        }
    }
    if field("target_parameters").is_some_and(|p| p.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(refuse(
            "target_parameters",
            "is set: adapters on raw parameters are not supported".into(),
        ));
    }
    // PEFT's LoRA variants and extras that change the forward pass or the model around it:
    // each must be left at its default (null, false or empty).
    for (name, what) in [
        (
            "alora_invocation_tokens",
            "activated LoRA applies the adapter only after its invocation tokens",
        ),
        (
            "arrow_config",
            "Arrow routes each token among several adapters",
        ),
        ("use_bdlora", "block-diagonal LoRA"),
        ("velora_config", "VeLoRA's layers"),
        (
            "monteclora_config",
            "MonteCLoRA samples the adapter's weights",
        ),
        (
            "kasa_config",
            "KaSA rescales the base weights' singular values",
        ),
        ("use_qalora", "QA-LoRA pools the layer input before A"),
        ("layer_replication", "the adapted model repeats base layers"),
        (
            "trainable_token_indices",
            "the adapter retrains token embeddings",
        ),
    ] {
        let set = field(name).is_some_and(|v| match v {
            Value::Bool(b) => *b,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        });
        if set {
            return Err(refuse(
                name,
                format!("is set: {what}, which is not supported"),
            ));
        }
    }
    // Initialisations that change the base weights too (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA):
    // the adapter only works on that changed base unless PEFT converted it when saving
    // (`path_initial_model_for_weight_conversion`, which writes `init_lora_weights: true`).
    if let Some(init) = field("init_lora_weights").and_then(Value::as_str) {
        if !matches!(init, "gaussian" | "eva" | "orthogonal") {
            return Err(refuse(
                "init_lora_weights",
                format!(
                    "is {init:?}: this initialisation changes the base model's weights; save \
                     the adapter with PEFT's path_initial_model_for_weight_conversion to serve \
                     it on the original base"
                ),
            ));
        }
    }
    let rank = match field("r").and_then(Value::as_u64) {
        Some(r) if r > 0 => r as usize,
        _ => {
            return Err(refuse(
                "r",
                format!(
                    "must be a positive integer, not {}",
                    field("r").map_or("absent".to_string(), Value::to_string)
                ),
            ))
        }
    };
    if rank > max_rank {
        return Err(refuse(
            "r",
            format!("is {rank}, above --max-lora-rank {max_rank}"),
        ));
    }
    let alpha = match field("lora_alpha") {
        None => 8.0, // PEFT's default
        Some(v) => match v.as_f64() {
            Some(a) if a.is_finite() => a,
            _ => return Err(refuse("lora_alpha", format!("must be a number, not {v}"))),
        },
    };
    let rslora = truthy("use_rslora");
    let scale = if rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    } as f32;
    let targets = match field("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Projection::ALL.to_vec(),
        Some(Value::String(s)) => {
            return Err(refuse(
                "target_modules",
                format!("is the pattern {s:?}: give a list of module names or \"all-linear\""),
            ))
        }
        Some(Value::Array(names)) => {
            let mut targets = Vec::with_capacity(names.len());
            for n in names {
                let name = n.as_str().unwrap_or_default();
                // PEFT also accepts full paths ending in the module name.
                let short = name.rsplit('.').next().unwrap_or(name);
                match Projection::from_module_name(short) {
                    Some(p) => targets.push(p),
                    None if matches!(short, "embed_tokens" | "lm_head") => {
                        return Err(refuse(
                            "target_modules",
                            format!(
                                "names {name:?}: embedding and lm_head adapters are not supported"
                            ),
                        ))
                    }
                    None => {
                        return Err(refuse(
                            "target_modules",
                            format!(
                                "names {n}, which the base model does not have (it has q_proj, \
                                 k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                            ),
                        ))
                    }
                }
            }
            targets.sort();
            targets.dedup();
            targets
        }
        other => {
            return Err(refuse(
                "target_modules",
                format!(
                    "must be a list of module names or \"all-linear\", not {}",
                    other.map_or("absent".to_string(), Value::to_string)
                ),
            ))
        }
    };
    if targets.is_empty() {
        return Err(refuse("target_modules", "is empty".into()));
    }
    Ok(Header {
        rank,
        scale,
        targets,
    })
}

/// Which tensor a PEFT name is: `(layer, projection, is_a)`, or why it is refused.
fn parse_tensor_name(name: &str) -> std::result::Result<(usize, Projection, bool), String> {
    let rest = name
        .strip_prefix("base_model.model.model.layers.")
        .ok_or_else(|| {
            if name.contains("lora_embedding") || name.contains("embed_tokens") {
                "embedding adapters are not supported".to_string()
            } else if name.contains("lm_head") {
                "lm_head adapters are not supported".to_string()
            } else {
                "is not a LoRA weight of a decoder layer".to_string()
            }
        })?;
    if name.contains("lora_magnitude_vector") {
        return Err("is a DoRA magnitude: DoRA adapters are not supported".into());
    }
    let parts: Vec<&str> = rest.split('.').collect();
    // layer . parent . module . lora_A|lora_B [. adapter name] . weight
    let ok = matches!(parts.len(), 5 | 6) && parts.last() == Some(&"weight");
    let layer = parts.first().and_then(|l| l.parse::<usize>().ok());
    let projection = parts.get(2).and_then(|m| Projection::from_module_name(m));
    let is_a = match parts.get(3) {
        Some(&"lora_A") => Some(true),
        Some(&"lora_B") => Some(false),
        _ => None,
    };
    match (ok, layer, projection, is_a) {
        (true, Some(layer), Some(p), Some(is_a)) if parts[1] == p.parent() => Ok((layer, p, is_a)),
        (_, _, None, _) => Err(format!(
            "targets module {:?}, which the base model does not have",
            parts.get(2).copied().unwrap_or_default()
        )),
        _ => Err("is not a lora_A / lora_B weight".into()),
    }
}

fn read_modules(
    reader: &SafetensorsReader,
    base: &LlamaConfig,
    header: &Header,
    refuse: &dyn Fn(&str, String) -> Error,
) -> Result<Vec<LoraModule>> {
    use std::collections::BTreeMap;
    let mut found: BTreeMap<(usize, Projection), (Option<String>, Option<String>)> =
        BTreeMap::new();
    for name in reader.names() {
        let (layer, p, is_a) =
            parse_tensor_name(&name).map_err(|d| refuse(&format!("tensor {name}"), d))?;
        if layer >= base.num_hidden_layers {
            return Err(refuse(
                &format!("tensor {name}"),
                format!(
                    "is for layer {layer}, but the base model has {} layers",
                    base.num_hidden_layers
                ),
            ));
        }
        if !header.targets.contains(&p) {
            return Err(refuse(
                &format!("tensor {name}"),
                format!(
                    "is for {}, which target_modules does not list",
                    p.module_name()
                ),
            ));
        }
        let entry = found.entry((layer, p)).or_default();
        if is_a {
            entry.0 = Some(name);
        } else {
            entry.1 = Some(name);
        }
    }
    if found.is_empty() {
        return Err(refuse(
            "adapter_model.safetensors",
            "holds no LoRA weights".into(),
        ));
    }
    let r = header.rank;
    let mut modules = Vec::with_capacity(found.len());
    for ((layer, p), names) in found {
        let (Some(a_name), Some(b_name)) = names else {
            return Err(refuse(
                &format!("layer {layer} {}", p.module_name()),
                "has only one of lora_A and lora_B".into(),
            ));
        };
        let (out, inp) = p.shape(base);
        for (name, want) in [(&a_name, [r, inp]), (&b_name, [out, r])] {
            let shape = reader.shape(name)?;
            if shape != want {
                return Err(refuse(
                    &format!("tensor {name}"),
                    format!(
                        "has shape {shape:?}; the base model and r = {r} need {want:?} \
                         (lora_A is [r, in_features], lora_B [out_features, r])"
                    ),
                ));
            }
        }
        let read = |name: &str| -> Result<Vec<f32>> {
            let t = reader.read(name)?;
            let v = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| Error::tensor(name, e))?;
            if v.iter().any(|x| !x.is_finite()) {
                return Err(refuse(
                    &format!("tensor {name}"),
                    "holds non-finite values".into(),
                ));
            }
            Ok(v)
        };
        modules.push(LoraModule {
            layer,
            projection: p,
            a: read(&a_name)?,
            b: read(&b_name)?,
            in_features: inp,
            out_features: out,
        });
    }
    Ok(modules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refuse(field: &str, detail: String) -> Error {
        Error::Lora {
            path: PathBuf::from("a"),
            field: field.into(),
            detail,
        }
    }

    fn header(v: serde_json::Value) -> std::result::Result<Header, String> {
        parse_config(&v, 64, &refuse).map_err(|e| e.to_string())
    }

    #[test]
    fn scale_is_alpha_over_r_or_over_its_root_with_rslora() {
        let h =
            header(serde_json::json!({"r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]}))
                .unwrap();
        assert_eq!(h.scale, 2.0);
        let h = header(serde_json::json!({"r": 16, "lora_alpha": 32, "use_rslora": true, "target_modules": "all-linear"}))
            .unwrap();
        assert_eq!(h.scale, 8.0);
        assert_eq!(h.targets.len(), 7);
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_field() {
        let base = serde_json::json!({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]});
        let with = |k: &str, v: serde_json::Value| {
            let mut c = base.clone();
            c[k] = v;
            header(c).unwrap_err()
        };
        for (key, value, words) in [
            ("use_dora", serde_json::json!(true), "DoRA"),
            (
                "modules_to_save",
                serde_json::json!(["lm_head"]),
                "modules_to_save",
            ),
            ("bias", serde_json::json!("all"), "\"none\""),
            ("r", serde_json::json!(128), "--max-lora-rank 64"),
            ("r", serde_json::json!(0), "positive integer"),
            (
                "target_modules",
                serde_json::json!(["embed_tokens"]),
                "embedding",
            ),
            (
                "target_modules",
                serde_json::json!(["c_attn"]),
                "does not have",
            ),
            ("target_modules", serde_json::json!(".*proj"), "pattern"),
            ("fan_in_fan_out", serde_json::json!(true), "fan_in_fan_out"),
            (
                "alora_invocation_tokens",
                serde_json::json!([1, 2]),
                "activated LoRA",
            ),
            ("use_qalora", serde_json::json!(true), "QA-LoRA"),
            ("kasa_config", serde_json::json!({"rank": 4}), "KaSA"),
            (
                "layer_replication",
                serde_json::json!([[0, 2]]),
                "repeats base layers",
            ),
            (
                "trainable_token_indices",
                serde_json::json!([5]),
                "token embeddings",
            ),
            (
                "init_lora_weights",
                serde_json::json!("pissa"),
                "path_initial_model_for_weight_conversion",
            ),
            (
                "rank_pattern",
                serde_json::json!({"q_proj": 4}),
                "rank_pattern",
            ),
        ] {
            let e = with(key, value);
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(words),
                "{key}: {e}"
            );
        }
        // Empty or null versions of the optional fields are fine.
        let mut c = base.clone();
        c["modules_to_save"] = serde_json::Value::Null;
        c["rank_pattern"] = serde_json::json!({});
        c["bias"] = serde_json::json!("none");
        c["init_lora_weights"] = serde_json::json!("gaussian");
        c["use_qalora"] = serde_json::json!(false);
        header(c).unwrap();
        // Every field PEFT 0.21.2 writes, at its default, from a real save_pretrained.
        let peft: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/lora-json-answer/adapter_config.json"
        ))
        .unwrap();
        assert_eq!(header(peft).unwrap().rank, 8);
    }

    #[test]
    fn tensor_names_follow_peft() {
        assert_eq!(
            parse_tensor_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"),
            Ok((3, Projection::Q, true))
        );
        assert_eq!(
            parse_tensor_name(
                "base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"
            ),
            Ok((0, Projection::Down, false))
        );
        assert!(
            parse_tensor_name("base_model.model.model.embed_tokens.lora_embedding_A")
                .unwrap_err()
                .contains("embedding")
        );
        assert!(parse_tensor_name(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight"
        )
        .unwrap_err()
        .contains("DoRA"));
        assert!(
            parse_tensor_name("base_model.model.model.layers.0.mlp.fc1.lora_A.weight")
                .unwrap_err()
                .contains("does not have")
        );
    }
}
