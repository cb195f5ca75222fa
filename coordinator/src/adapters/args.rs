//! The LoRA flags, vLLM's names and forms: `--lora-modules name=path` or the JSON form
//! `{"name": ..., "path": ..., "base_model_name": ...}`, several per flag.

use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

use crate::error::StartError;

/// The LoRA option group, shared by `serve` and `generate`.
#[derive(Debug, Clone, Args)]
pub struct LoraArgs {
    /// Serve LoRA adapters (PEFT format) on top of the base model; a request's `model` picks one.
    #[arg(long, env = "TPSERVE_ENABLE_LORA")]
    pub enable_lora: bool,
    /// Adapters to serve from the start: `name=path` or `{"name": ..., "path": ...,
    /// "base_model_name": ...}`; several after one flag, as vLLM's.
    #[arg(long, env = "TPSERVE_LORA_MODULES", num_args = 1..)]
    pub lora_modules: Vec<String>,
    /// Distinct adapters one step may use (the workers' adapter slots).
    #[arg(long, env = "TPSERVE_MAX_LORAS", default_value_t = 8)]
    pub max_loras: usize,
    /// The largest adapter rank (`r`) accepted.
    #[arg(long, env = "TPSERVE_MAX_LORA_RANK", default_value_t = 64)]
    pub max_lora_rank: usize,
    /// Adapters each worker keeps read in host memory (default: --max-loras); others are read
    /// from disk again when a step needs them.
    #[arg(long, env = "TPSERVE_MAX_CPU_LORAS")]
    pub max_cpu_loras: Option<usize>,
    /// Allow `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's
    /// `VLLM_ALLOW_RUNTIME_LORA_UPDATING`).
    #[arg(long, env = "TPSERVE_ENABLE_RUNTIME_LORA_UPDATES")]
    pub enable_runtime_lora_updates: bool,
}

/// One `--lora-modules` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraModuleSpec {
    pub name: String,
    pub path: PathBuf,
    /// The base model the adapter was trained on (informational, as in vLLM).
    #[serde(default)]
    pub base_model_name: Option<String>,
}

impl LoraArgs {
    /// Largest `--max-lora-rank` accepted (vLLM's largest).
    pub const MAX_RANK: usize = 512;

    /// Checks the flags against each other.
    pub fn validate(&self) -> Result<(), StartError> {
        let bad = |detail: String| Err(StartError::Config { detail });
        if !self.enable_lora {
            if !self.lora_modules.is_empty() {
                return bad("--lora-modules needs --enable-lora".into());
            }
            if self.enable_runtime_lora_updates {
                return bad("--enable-runtime-lora-updates needs --enable-lora".into());
            }
            return Ok(());
        }
        if self.max_loras == 0 {
            return bad("--max-loras must be at least 1".into());
        }
        if self.max_lora_rank == 0 || self.max_lora_rank > Self::MAX_RANK {
            return bad(format!(
                "--max-lora-rank must be in 1..={}, not {}",
                Self::MAX_RANK,
                self.max_lora_rank
            ));
        }
        if self.cpu_loras() < self.max_loras {
            return bad(format!(
                "--max-cpu-loras ({}) must be at least --max-loras ({})",
                self.cpu_loras(),
                self.max_loras
            ));
        }
        self.modules().map(|_| ())
    }

    /// `--max-cpu-loras`, defaulting to `--max-loras`.
    pub fn cpu_loras(&self) -> usize {
        self.max_cpu_loras.unwrap_or(self.max_loras)
    }

    /// The `--lora-modules` entries, parsed.
    pub fn modules(&self) -> Result<Vec<LoraModuleSpec>, StartError> {
        self.lora_modules
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|entry| parse_module(entry.trim()))
            .collect()
    }
}

fn parse_module(entry: &str) -> Result<LoraModuleSpec, StartError> {
    let bad = |detail: String| StartError::Config {
        detail: format!("--lora-modules {entry}: {detail}"),
    };
    let spec = if entry.starts_with('{') {
        serde_json::from_str::<LoraModuleSpec>(entry).map_err(|e| {
            bad(format!(
                "not a valid {{\"name\", \"path\", \"base_model_name\"}} object: {e}"
            ))
        })?
    } else {
        let (name, path) = entry
            .split_once('=')
            .ok_or_else(|| bad("expected name=path or a JSON object".into()))?;
        LoraModuleSpec {
            name: name.trim().to_string(),
            path: PathBuf::from(path.trim()),
            base_model_name: None,
        }
    };
    if spec.name.is_empty() || spec.path.as_os_str().is_empty() {
        return Err(bad("the name and the path must not be empty".into()));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        lora: LoraArgs,
    }

    fn args(argv: &[&str]) -> LoraArgs {
        Cli::parse_from(std::iter::once("t").chain(argv.iter().copied())).lora
    }

    #[test]
    fn modules_take_both_of_vllms_forms() {
        let a = args(&[
            "--enable-lora",
            "--lora-modules",
            "sql=/a/sql",
            r#"{"name": "chat", "path": "/b/chat", "base_model_name": "m"}"#,
        ]);
        a.validate().unwrap();
        let m = a.modules().unwrap();
        assert_eq!(m[0].name, "sql");
        assert_eq!(m[0].path, PathBuf::from("/a/sql"));
        assert_eq!(m[1].name, "chat");
        assert_eq!(m[1].base_model_name.as_deref(), Some("m"));
        assert_eq!((a.max_loras, a.max_lora_rank, a.cpu_loras()), (8, 64, 8));
    }

    #[test]
    fn bad_combinations_are_refused_with_the_flag_named() {
        for (argv, words) in [
            (&["--lora-modules", "a=/x"][..], "needs --enable-lora"),
            (
                &["--enable-runtime-lora-updates"][..],
                "needs --enable-lora",
            ),
            (&["--enable-lora", "--max-loras", "0"][..], "--max-loras"),
            (
                &["--enable-lora", "--max-lora-rank", "1024"][..],
                "--max-lora-rank",
            ),
            (
                &["--enable-lora", "--max-loras", "4", "--max-cpu-loras", "2"][..],
                "--max-cpu-loras",
            ),
            (
                &["--enable-lora", "--lora-modules", "nopath"][..],
                "name=path",
            ),
            (
                &["--enable-lora", "--lora-modules", r#"{"name": "a"}"#][..],
                "missing field `path`",
            ),
        ] {
            let e = args(argv).validate().unwrap_err().to_string();
            assert!(e.contains(words), "{argv:?}: {e}");
        }
    }
}
