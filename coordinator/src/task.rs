//! What a server does with its model (`--task`, vLLM's flag): generate text, or embed inputs
//! into vectors (`/v1/embeddings`), and how an embedding model pools its hidden states.
//!
//! `--task auto` (the default) embeds when the checkpoint says it is an embedding model:
//! - a sentence-transformers `modules.json` that lists a `sentence_transformers.models.Pooling`
//!   module (its `config.json`, usually `1_Pooling/config.json`, names the pooling:
//!   `pooling_mode_lasttoken`, `pooling_mode_mean_tokens` or `pooling_mode_cls_token`; the
//!   vectors are normalized when `modules.json` also lists `sentence_transformers.models.Normalize`,
//!   as sentence-transformers does), or
//! - a `config.json` architecture without a language-model head (`LlamaModel`, `MistralModel`,
//!   `Qwen2Model`: e5-mistral style; last-token pooling, normalized).
//!
//! Everything else (and every GGUF file) generates. `--task embed` serves any model we load as
//! an embedding model (a generate checkpoint pools the last token's final normed hidden state,
//! normalized, unless its sentence-transformers files say otherwise);
//! `--override-pooler-config '{"pooling_type": "MEAN", "normalize": false}'` (vLLM's flag and
//! keys) overrides the pooling. Matryoshka truncation (`dimensions`) is allowed only for a
//! model whose `config.json` declares it (`is_matryoshka: true` or `matryoshka_dimensions`), as
//! vLLM does: truncating other models' vectors gives poor results. vLLM's
//! `--hf-overrides '{"is_matryoshka": true}'` declares it for a checkpoint that does not (only
//! those two keys are taken; others are refused rather than ignored).

use std::path::Path;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::StartError;

/// `--task`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TaskArg {
    /// Embed when the checkpoint is an embedding model (see the module header), else generate.
    Auto,
    /// Text generation: `/v1/completions` and `/v1/chat/completions`.
    Generate,
    /// Embeddings: `/v1/embeddings`.
    #[value(alias = "embedding")]
    Embed,
}

/// How an embedding request's vector is pooled from the final normed hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PoolingType {
    /// The last token's state (decoder embedding models).
    Last,
    /// The mean over every prompt token.
    Mean,
    /// The first token's state.
    Cls,
}

impl PoolingType {
    /// Whether the vector needs every prompt position computed for this request (a prefix-cache
    /// hit would skip some), which only last-token pooling does not.
    pub fn needs_every_position(self) -> bool {
        !matches!(self, Self::Last)
    }
}

/// Matryoshka truncation the model declares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Matryoshka {
    /// Not declared: `dimensions` is refused.
    #[default]
    No,
    /// Any number of leading dimensions (`is_matryoshka: true`).
    Any,
    /// Only these (`matryoshka_dimensions`).
    Only(Vec<usize>),
}

/// How an embedding server pools and post-processes its vectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolerConfig {
    pub pooling_type: PoolingType,
    /// L2-normalize each vector (after any `dimensions` truncation).
    pub normalize: bool,
    pub matryoshka: Matryoshka,
}

/// What the server does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    Generate,
    Embed(PoolerConfig),
}

impl Task {
    /// The pooler of an embedding server.
    pub fn pooler(&self) -> Option<&PoolerConfig> {
        match self {
            Self::Generate => None,
            Self::Embed(p) => Some(p),
        }
    }

    /// `--task`'s words for it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Generate => "generate",
            Self::Embed(_) => "embed",
        }
    }
}

/// vLLM's `--override-pooler-config` JSON (the keys tpserve honours).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolerOverride {
    pooling_type: Option<PoolingType>,
    normalize: Option<bool>,
}

/// What the checkpoint says about embedding (`None` fields: it says nothing).
#[derive(Debug, Default)]
struct Detected {
    /// A sentence-transformers pooling module or a headless architecture.
    embedding_model: bool,
    pooling_type: Option<PoolingType>,
    normalize: Option<bool>,
    matryoshka: Matryoshka,
}

/// Decides the task from the flags and the checkpoint at `model` (`headless`: its architecture
/// has no language-model head).
pub fn resolve(
    arg: TaskArg,
    override_json: Option<&str>,
    hf_overrides: Option<&str>,
    model: &Path,
    headless: bool,
) -> Result<Task, StartError> {
    fn bad<T>(detail: String) -> Result<T, StartError> {
        Err(StartError::Config { detail })
    }
    let over: PoolerOverride = match override_json {
        Some(text) => serde_json::from_str(text).or_else(|e| {
            bad(format!(
                "--override-pooler-config {text:?}: {e} (expected JSON such as \
                 {{\"pooling_type\": \"MEAN\", \"normalize\": true}}; pooling types LAST, MEAN, CLS)"
            ))
        })?,
        None => PoolerOverride::default(),
    };
    let mut found = detect(model, headless)?;
    if let Some(text) = hf_overrides {
        let over: Value = serde_json::from_str(text)
            .or_else(|e| bad(format!("--hf-overrides {text:?} is not JSON: {e}")))?;
        let Some(map) = over.as_object() else {
            return bad(format!("--hf-overrides {text:?} must be a JSON object"));
        };
        if let Some(key) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "is_matryoshka" | "matryoshka_dimensions"))
        {
            return bad(format!(
                "--hf-overrides: tpserve takes only is_matryoshka and matryoshka_dimensions, \
                 not {key:?}"
            ));
        }
        if let Some(m) = matryoshka(&over) {
            found.matryoshka = m;
        }
    }
    let embed = match arg {
        TaskArg::Embed => true,
        TaskArg::Generate if headless => {
            return bad(format!(
                "--task generate: {} has no language-model head (a headless architecture); it \
                 can only embed (--task embed)",
                model.display()
            ))
        }
        TaskArg::Generate => false,
        TaskArg::Auto => found.embedding_model,
    };
    if !embed {
        if override_json.is_some() {
            return bad(
                "--override-pooler-config applies to embedding models; this server generates \
                 (add --task embed to serve the model as an embedding model)"
                    .into(),
            );
        }
        return Ok(Task::Generate);
    }
    Ok(Task::Embed(PoolerConfig {
        pooling_type: over
            .pooling_type
            .or(found.pooling_type)
            .unwrap_or(PoolingType::Last),
        normalize: over.normalize.or(found.normalize).unwrap_or(true),
        matryoshka: found.matryoshka,
    }))
}

/// What a config (or `--hf-overrides`) declares about Matryoshka truncation; `None`: nothing.
fn matryoshka(config: &Value) -> Option<Matryoshka> {
    match config
        .get("matryoshka_dimensions")
        .and_then(Value::as_array)
    {
        Some(dims) => Some(Matryoshka::Only(
            dims.iter()
                .filter_map(Value::as_u64)
                .map(|d| d as usize)
                .collect(),
        )),
        None => config
            .get("is_matryoshka")
            .and_then(Value::as_bool)
            .map(|on| if on { Matryoshka::Any } else { Matryoshka::No }),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, StartError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StartError::Config {
                detail: format!("reading {}: {e}", path.display()),
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| StartError::Config {
            detail: format!("{} is not valid JSON: {e}", path.display()),
        })
}

/// Reads the sentence-transformers files and `config.json` of a model directory (a GGUF file
/// has neither).
fn detect(model: &Path, headless: bool) -> Result<Detected, StartError> {
    let mut found = Detected {
        embedding_model: headless,
        ..Detected::default()
    };
    if !model.is_dir() {
        return Ok(found);
    }
    if let Some(config) = read_json(&model.join("config.json"))? {
        found.matryoshka = match config
            .get("matryoshka_dimensions")
            .and_then(Value::as_array)
        {
            Some(dims) => Matryoshka::Only(
                dims.iter()
                    .filter_map(Value::as_u64)
                    .map(|d| d as usize)
                    .collect(),
            ),
            None if config.get("is_matryoshka").and_then(Value::as_bool) == Some(true) => {
                Matryoshka::Any
            }
            None => Matryoshka::No,
        };
    }
    let Some(modules) = read_json(&model.join("modules.json"))? else {
        return Ok(found);
    };
    let modules = modules.as_array().cloned().unwrap_or_default();
    let of_type = |t: &str| {
        modules
            .iter()
            .find(|m| m.get("type").and_then(Value::as_str) == Some(t))
    };
    let Some(pooling) = of_type("sentence_transformers.models.Pooling") else {
        return Ok(found);
    };
    found.embedding_model = true;
    found.normalize = Some(of_type("sentence_transformers.models.Normalize").is_some());
    let dir = pooling
        .get("path")
        .and_then(Value::as_str)
        .unwrap_or("1_Pooling");
    if let Some(cfg) = read_json(&model.join(dir).join("config.json"))? {
        let on = |key: &str| cfg.get(key).and_then(Value::as_bool) == Some(true);
        found.pooling_type = if on("pooling_mode_lasttoken") {
            Some(PoolingType::Last)
        } else if on("pooling_mode_mean_tokens") {
            Some(PoolingType::Mean)
        } else if on("pooling_mode_cls_token") {
            Some(PoolingType::Cls)
        } else {
            return Err(StartError::Config {
                detail: format!(
                    "{}/config.json asks for a pooling other than last-token, mean or CLS \
                     (supported: pooling_mode_lasttoken, pooling_mode_mean_tokens, \
                     pooling_mode_cls_token); override it with --override-pooler-config",
                    model.join(dir).display()
                ),
            });
        };
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    const ST_MODULES: &str = r#"[
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
    ]"#;

    #[test]
    fn a_sentence_transformers_checkpoint_embeds_with_its_own_pooling() {
        let dir = dir_with(&[
            ("config.json", r#"{"architectures": ["Qwen2ForCausalLM"]}"#),
            ("modules.json", ST_MODULES),
            (
                "1_Pooling/config.json",
                r#"{"pooling_mode_mean_tokens": true, "pooling_mode_lasttoken": false}"#,
            ),
        ]);
        let task = resolve(TaskArg::Auto, None, None, dir.path(), false).unwrap();
        assert_eq!(
            task,
            Task::Embed(PoolerConfig {
                pooling_type: PoolingType::Mean,
                normalize: true,
                matryoshka: Matryoshka::No,
            })
        );
    }

    #[test]
    fn a_generate_checkpoint_generates_unless_told_to_embed_last_token_normalized() {
        let dir = dir_with(&[("config.json", r#"{"is_matryoshka": true}"#)]);
        assert_eq!(
            resolve(TaskArg::Auto, None, None, dir.path(), false).unwrap(),
            Task::Generate
        );
        let embed = resolve(TaskArg::Embed, None, None, dir.path(), false).unwrap();
        assert_eq!(
            embed,
            Task::Embed(PoolerConfig {
                pooling_type: PoolingType::Last,
                normalize: true,
                matryoshka: Matryoshka::Any,
            })
        );
    }

    #[test]
    fn a_headless_architecture_embeds_and_refuses_to_generate() {
        let dir = dir_with(&[("config.json", "{}")]);
        assert!(matches!(
            resolve(TaskArg::Auto, None, None, dir.path(), true).unwrap(),
            Task::Embed(_)
        ));
        let e = resolve(TaskArg::Generate, None, None, dir.path(), true).unwrap_err();
        assert!(e.to_string().contains("can only embed"), "{e}");
    }

    #[test]
    fn the_pooler_override_wins_and_bad_overrides_are_named() {
        let dir = dir_with(&[("config.json", "{}")]);
        let over = r#"{"pooling_type": "CLS", "normalize": false}"#;
        let task = resolve(TaskArg::Embed, Some(over), None, dir.path(), false).unwrap();
        let p = task.pooler().unwrap();
        assert_eq!((p.pooling_type, p.normalize), (PoolingType::Cls, false));
        for bad in [r#"{"pooling_type": "MAX"}"#, r#"{"pool": "LAST"}"#, "nope"] {
            let e = resolve(TaskArg::Embed, Some(bad), None, dir.path(), false).unwrap_err();
            assert!(e.to_string().contains("--override-pooler-config"), "{e}");
        }
        let e = resolve(TaskArg::Generate, Some(over), None, dir.path(), false).unwrap_err();
        assert!(e.to_string().contains("--task embed"), "{e}");
    }

    #[test]
    fn hf_overrides_declare_matryoshka_and_refuse_other_keys() {
        let dir = dir_with(&[("config.json", "{}")]);
        let dims = Some(r#"{"matryoshka_dimensions": [32, 64]}"#);
        let task = resolve(TaskArg::Embed, None, dims, dir.path(), false).unwrap();
        assert_eq!(
            task.pooler().unwrap().matryoshka,
            Matryoshka::Only(vec![32, 64])
        );
        let e = resolve(
            TaskArg::Embed,
            None,
            Some(r#"{"rope_theta": 1}"#),
            dir.path(),
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("rope_theta"), "{e}");
    }
}
