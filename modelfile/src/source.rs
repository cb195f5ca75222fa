//! [`ModelSource`]: one model on disk, a Hugging Face directory or a single GGUF file, opened
//! once and asked for its config, tokenizer, chat template, generation defaults and weights.
//!
//! Invariants: `open` reads and validates the config eagerly (a source that opened has a usable
//! [`LlamaConfig`]); a GGUF file is mapped and parsed exactly once and shared with the weight
//! reader; tokenizer, chat template and weights are built on request, so the coordinator never
//! maps weights and the worker never builds a tokenizer. Costs: opening a HF directory reads two
//! small JSON files; opening a GGUF maps it and parses its header and metadata.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

use crate::chat::ChatTemplate;
use crate::config::{merge_ids, token_ids, LlamaConfig};
use crate::error::{Error, Result};
use crate::gguf::{meta_str, GgufFile};
use crate::quantization::{Fp8Checkpoint, PackedIntCheckpoint};
use crate::weights::{GgufReader, SafetensorsReader, WeightReader};

/// How a model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A Hugging Face directory: `config.json`, `*.safetensors`, `tokenizer.json`, ...
    Safetensors,
    /// A single GGUF file holding config, weights and tokenizer.
    Gguf,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    /// Parses vLLM's `--load-format` names that apply: `safetensors`, `gguf`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "safetensors" => Ok(Format::Safetensors),
            "gguf" => Ok(Format::Gguf),
            other => Err(format!(
                "unknown load format `{other}` (expected safetensors or gguf)"
            )),
        }
    }
}

/// Sampling defaults a model ships in `generation_config.json` (empty for GGUF).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i32>,
}

enum Inner {
    HfDir {
        generation: GenerationDefaults,
        /// config.json's `quantization_config`, when the checkpoint has one.
        quant: Option<CheckpointQuantization>,
    },
    Gguf(Arc<GgufFile>),
}

/// One model on disk. `Send + Sync`; cheap to share behind an `Arc`.
pub struct ModelSource {
    path: PathBuf,
    format: Format,
    config: LlamaConfig,
    inner: Inner,
}

impl std::fmt::Debug for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelSource")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::parse(path, e))
}

fn read_json_if_exists(path: &Path) -> Result<Option<Json>> {
    if path.is_file() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object.
/// A checkpoint's `quantization_config`: its `quant_method`, and for the FP8 methods the scheme
/// (or why we do not read it).
struct CheckpointQuantization {
    method: String,
    fp8: Option<std::result::Result<Fp8Checkpoint, String>>,
    packed_int: Option<std::result::Result<PackedIntCheckpoint, String>>,
}

/// The `quantization_config` of a config.json's text (already parsed once as valid).
fn checkpoint_quantization(config_json: &str) -> Option<CheckpointQuantization> {
    let j: Json = serde_json::from_str(config_json).ok()?;
    let q = j.get("quantization_config")?;
    Some(CheckpointQuantization {
        method: q
            .get("quant_method")
            .and_then(Json::as_str)
            .unwrap_or("unknown (quantization_config without quant_method)")
            .to_string(),
        fp8: crate::quantization::fp8_scheme(q),
        packed_int: crate::quantization::packed_int_scheme(q),
    })
}

fn token_content(j: &Json, key: &str) -> Option<String> {
    match j.get(key)? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn generation_defaults(j: &Json) -> GenerationDefaults {
    let float = |k: &str| j.get(k).and_then(Json::as_f64).map(|x| x as f32);
    GenerationDefaults {
        temperature: float("temperature"),
        top_p: float("top_p"),
        top_k: j
            .get("top_k")
            .and_then(Json::as_i64)
            .and_then(|x| i32::try_from(x).ok()),
    }
}

impl ModelSource {
    /// Opens a model. `format: None` decides from the path: a directory is
    /// [`Format::Safetensors`], a `*.gguf` file is [`Format::Gguf`]; anything else is
    /// [`Error::UnknownFormat`].
    pub fn open(path: &Path, format: Option<Format>) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let is_gguf_name = path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
        let format = match format {
            Some(f) => f,
            None if meta.is_dir() => Format::Safetensors,
            None if meta.is_file() && is_gguf_name => Format::Gguf,
            None => {
                return Err(Error::UnknownFormat {
                    path: path.to_path_buf(),
                    detail: "expected a Hugging Face model directory or a .gguf file".to_string(),
                })
            }
        };
        match (format, meta.is_dir()) {
            (Format::Safetensors, true) => Self::open_hf_dir(path),
            (Format::Gguf, false) => Self::open_gguf(path),
            (Format::Safetensors, false) => Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                detail: "the safetensors format needs a Hugging Face model directory".to_string(),
            }),
            (Format::Gguf, true) => Err(Error::UnknownFormat {
                path: path.to_path_buf(),
                detail: "the gguf format needs a .gguf file, not a directory".to_string(),
            }),
        }
    }

    fn open_hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let mut config = LlamaConfig::from_hf_json(&text)?;
        let quant = checkpoint_quantization(&text);
        let mut generation = GenerationDefaults::default();
        if let Some(g) = read_json_if_exists(&dir.join("generation_config.json"))? {
            merge_ids(&mut config.eos_token_ids, token_ids(&g, "eos_token_id")?);
            if config.bos_token_id.is_none() {
                config.bos_token_id = token_ids(&g, "bos_token_id")?.first().copied();
            }
            generation = generation_defaults(&g);
        }
        Ok(ModelSource {
            path: dir.to_path_buf(),
            format: Format::Safetensors,
            config,
            inner: Inner::HfDir { generation, quant },
        })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let file = Arc::new(GgufFile::open(path)?);
        let infos = &file.content.tensor_infos;
        let config = LlamaConfig::from_gguf(file.metadata(), &|name| infos.contains_key(name))?;
        Ok(ModelSource {
            path: path.to_path_buf(),
            format: Format::Gguf,
            config,
            inner: Inner::Gguf(file),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The directory or file this source was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The tokenizer: `tokenizer.json` for a Hugging Face directory, rebuilt from metadata for a
    /// GGUF file (see [`crate::gguf_tokenizer`]).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        match &self.inner {
            Inner::HfDir { .. } => {
                let path = self.path.join("tokenizer.json");
                if !path.is_file() {
                    return Err(Error::Tokenizer {
                        detail: format!("{} does not exist", path.display()),
                    });
                }
                tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
                    detail: format!("loading {}: {e}", path.display()),
                })
            }
            Inner::Gguf(file) => crate::gguf_tokenizer::from_gguf_metadata(file.metadata()),
        }
    }

    /// The chat template, or `None` when the model has none. Hugging Face: `chat_template.jinja`,
    /// else `tokenizer_config.json`'s `chat_template` (a string, or a list of `{name, template}`
    /// of which `default` is taken), with its `bos_token` / `eos_token`. GGUF:
    /// `tokenizer.chat_template` with the BOS/EOS token strings.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        match &self.inner {
            Inner::HfDir { .. } => self.hf_chat_template(),
            Inner::Gguf(file) => {
                let md = file.metadata();
                if !md.contains_key("tokenizer.chat_template") {
                    return Ok(None);
                }
                let template = meta_str(md, "tokenizer.chat_template")?.to_string();
                let token = |k: &str| crate::gguf_tokenizer::token_string(md, k);
                ChatTemplate::new(
                    template,
                    token("tokenizer.ggml.bos_token_id"),
                    token("tokenizer.ggml.eos_token_id"),
                )
                .map(Some)
            }
        }
    }

    fn hf_chat_template(&self) -> Result<Option<ChatTemplate>> {
        let tc_path = self.path.join("tokenizer_config.json");
        let tc = read_json_if_exists(&tc_path)?.unwrap_or(Json::Null);
        let jinja_path = self.path.join("chat_template.jinja");
        let template = if jinja_path.is_file() {
            Some(std::fs::read_to_string(&jinja_path).map_err(|e| Error::io(&jinja_path, e))?)
        } else {
            match tc.get("chat_template") {
                None | Some(Json::Null) => None,
                Some(Json::String(s)) => Some(s.clone()),
                Some(Json::Array(list)) => {
                    let named = |n: &str| {
                        list.iter().find_map(|t| {
                            (t.get("name")?.as_str()? == n)
                                .then(|| t.get("template")?.as_str().map(str::to_string))
                                .flatten()
                        })
                    };
                    match named("default") {
                        Some(t) => Some(t),
                        None => {
                            return Err(Error::ChatTemplate {
                                detail: format!(
                                    "{}: chat_template is a list without a `default` entry",
                                    tc_path.display()
                                ),
                            })
                        }
                    }
                }
                Some(other) => {
                    return Err(Error::parse(
                        &tc_path,
                        format!("chat_template is neither a string nor a list: {other}"),
                    ))
                }
            }
        };
        match template {
            None => Ok(None),
            Some(t) => ChatTemplate::new(
                t,
                token_content(&tc, "bos_token"),
                token_content(&tc, "eos_token"),
            )
            .map(Some),
        }
    }

    /// Sampling defaults from `generation_config.json`; all `None` for GGUF or when absent.
    pub fn generation_defaults(&self) -> GenerationDefaults {
        match &self.inner {
            Inner::HfDir { generation, .. } => *generation,
            Inner::Gguf(_) => GenerationDefaults::default(),
        }
    }

    /// The weights under Hugging Face names. For a directory this maps the safetensors files
    /// (`model.safetensors.index.json` shards, or `model.safetensors`); for GGUF it shares the
    /// already-mapped file.
    /// How the checkpoint's weights are quantized: `gguf` for a GGUF file (whatever its block
    /// types), a Hugging Face checkpoint's `quantization_config.quant_method` (`fp8`, `awq`,
    /// `gptq`, `compressed-tensors`, ...), or `None` for plain floating-point weights.
    pub fn quantization(&self) -> Option<&str> {
        match &self.inner {
            Inner::HfDir { quant, .. } => quant.as_ref().map(|q| q.method.as_str()),
            Inner::Gguf(_) => Some("gguf"),
        }
    }

    /// The FP8 scheme of a checkpoint quantized with `fp8` or `compressed-tensors`
    /// ([`crate::quantization`]): `None` for any other checkpoint, `Some(Err(why))` for a form
    /// of those methods that tpserve does not read.
    pub fn fp8_scheme(&self) -> Option<std::result::Result<&Fp8Checkpoint, &str>> {
        match &self.inner {
            Inner::HfDir {
                quant: Some(CheckpointQuantization { fp8: Some(s), .. }),
                ..
            } => Some(s.as_ref().map_err(String::as_str)),
            _ => None,
        }
    }

    /// The scheme of an AWQ or GPTQ checkpoint ([`crate::quantization::packed_int`]): `None`
    /// for any other checkpoint, `Some(Err(why))` for a form of those methods that tpserve does
    /// not read.
    pub fn packed_int_scheme(&self) -> Option<std::result::Result<&PackedIntCheckpoint, &str>> {
        match &self.inner {
            Inner::HfDir {
                quant:
                    Some(CheckpointQuantization {
                        packed_int: Some(s),
                        ..
                    }),
                ..
            } => Some(s.as_ref().map_err(String::as_str)),
            _ => None,
        }
    }

    pub fn weights(&self) -> Result<Box<dyn WeightReader>> {
        match &self.inner {
            Inner::HfDir { .. } => {
                let block = self
                    .fp8_scheme()
                    .and_then(|s| s.ok())
                    .and_then(Fp8Checkpoint::block);
                let packed = self.packed_int_scheme().and_then(|s| s.ok()).cloned();
                Ok(Box::new(
                    SafetensorsReader::open_dir(&self.path)?
                        .with_fp8_block(block)
                        .with_packed_int(packed)?,
                ))
            }
            Inner::Gguf(file) => Ok(Box::new(GgufReader::new(file.clone(), &self.config))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_readers_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ModelSource>();
        assert_send_sync::<SafetensorsReader>();
        assert_send_sync::<GgufReader>();
        assert_send_sync::<Box<dyn WeightReader>>();
    }

    #[test]
    fn tokenizer_config_special_tokens_may_be_strings_or_added_token_objects() {
        let tc = serde_json::json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true}, "pad_token": null});
        assert_eq!(token_content(&tc, "bos_token").as_deref(), Some("<s>"));
        assert_eq!(token_content(&tc, "eos_token").as_deref(), Some("</s>"));
        assert_eq!(token_content(&tc, "pad_token"), None);
        assert_eq!(token_content(&tc, "unk_token"), None);
    }
}
