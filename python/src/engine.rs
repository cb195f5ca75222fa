//! `Engine`: one running engine and its workers, brought up by the coordinator's `launch` from
//! the same flags as `tpserve generate` (the Python side turns `LLM(...)`'s keyword arguments
//! into them, see [`engine_flags`]), so defaults, checks and error messages are the CLI's.
//!
//! The engine runs on a tokio runtime owned here; Python threads only wait on it, with the GIL
//! released. [`Engine::shutdown`] (also on drop) stops the engine, then the workers, and waits
//! until they are reaped.

use std::sync::{Arc, Mutex, Once};

use clap::{CommandFactory, Parser};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use tokio::runtime::Runtime;
use tpserve_coordinator::adapters::AdapterInfo;
use tpserve_coordinator::api::{render_chat, ChatMessageIn, PromptKind};
use tpserve_coordinator::config::EngineArgs;
use tpserve_coordinator::engine::EngineHandle;
use tpserve_coordinator::launch::{launch, Launched};
use tpserve_coordinator::served_model::ServedModel;
use tpserve_term::progress;

use crate::batch::{Batch, Layout, Sequences};
use crate::blocking::wait;
use crate::errors;
use crate::requests::{prepare, prepare_embeddings, EmbedSpec, Prepared, Prompt, PromptSpec};

/// The adapter loaded as `name`.
fn adapter(model: &ServedModel, name: &str) -> PyResult<Arc<AdapterInfo>> {
    model
        .adapter(name)
        .ok_or_else(|| PyValueError::new_err(format!("The LoRA adapter `{name}` is not loaded.")))
}

/// A batch's error, naming the prompt at fault when there are several.
fn numbered(py: Python<'_>, batch_size: usize, index: usize, err: PyErr) -> PyErr {
    if batch_size > 1 {
        PyValueError::new_err(format!("prompt {index}: {}", err.value(py)))
    } else {
        err
    }
}

/// The engine's flags, parsed as `tpserve generate` parses them.
#[derive(Debug, Parser)]
#[command(name = "LLM", no_binary_name = true)]
struct Flags {
    #[command(flatten)]
    engine: EngineArgs,
}

/// Every flag of the engine as `(long name, takes a value)`, so the Python side can turn
/// keyword arguments into flags (and refuse names that are none).
#[pyfunction]
pub fn engine_flags() -> Vec<(String, bool)> {
    Flags::command()
        .get_arguments()
        .filter_map(|a| {
            a.get_long()
                .map(|long| (long.to_string(), a.get_action().takes_values()))
        })
        .collect()
}

/// Logs and progress go to standard error as the CLI's do (`RUST_LOG`, `TPSERVE_PROGRESS`);
/// both are process-wide, so they are set up once.
fn init_output() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let mode = std::env::var("TPSERVE_PROGRESS")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(progress::Mode::Auto);
        progress::init(mode);
        tpserve_term::logging::init("info,h2=warn,tower=warn");
    });
}

/// clap's message without its `error: ` prefix and usage lines.
fn flag_error(e: &clap::Error) -> PyErr {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    PyValueError::new_err(first.strip_prefix("error: ").unwrap_or(first).to_string())
}

/// A running engine (see the module header).
#[pyclass(module = "tpserve._tpserve")]
pub struct Engine {
    runtime: Arc<Runtime>,
    launched: Mutex<Option<Launched>>,
    /// A batch submits at most this many sequences at once (`--max-waiting-requests`).
    max_in_flight: usize,
}

impl Engine {
    /// A batch of `prepared` sequences on `engine`.
    fn batch(
        &self,
        engine: EngineHandle,
        model: &ServedModel,
        prepared: Prepared,
        normalize_embeddings: bool,
    ) -> (Batch, Vec<Vec<u32>>) {
        let layout = Layout {
            prompt_of: prepared.sequences.iter().map(|(p, _)| *p).collect(),
            prompt_lens: prepared.prompt_token_ids.iter().map(Vec::len).collect(),
            normalize_embeddings,
        };
        let requests = prepared.sequences.into_iter().map(|(_, r)| r).collect();
        let sequences = Sequences::new(engine, requests, self.max_in_flight);
        let batch = Batch::new(
            self.runtime.clone(),
            model.tokenizer.clone(),
            sequences,
            layout,
        );
        (batch, prepared.prompt_token_ids)
    }

    fn running(&self) -> PyResult<(EngineHandle, ServedModel)> {
        let launched = self.launched.lock().map_err(|_| errors::shut_down())?;
        launched
            .as_ref()
            .map(|l| (l.engine.clone(), l.model.clone()))
            .ok_or_else(errors::shut_down)
    }
}

#[pymethods]
impl Engine {
    /// Parses `argv` (the flags of `tpserve generate`'s engine) and starts the engine: raises
    /// `ValueError` for bad flags or a model that cannot be served, `RuntimeError` when a
    /// worker fails to start, with the CLI's messages.
    #[new]
    fn new(py: Python<'_>, argv: Vec<String>) -> PyResult<Self> {
        let args = Flags::try_parse_from(&argv)
            .map_err(|e| flag_error(&e))?
            .engine;
        init_output();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("tpserve-engine")
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("starting the engine's runtime: {e}")))?;
        let launched = wait(py, &runtime, || launch(&args, &[]))?.map_err(errors::start)?;
        Ok(Self {
            runtime: Arc::new(runtime),
            launched: Mutex::new(Some(launched)),
            max_in_flight: args.max_waiting_requests,
        })
    }

    /// The longest sequence (prompt plus output) a request may have.
    #[getter]
    fn max_model_len(&self) -> PyResult<u32> {
        Ok(self.running()?.1.max_model_len)
    }

    /// What the model is served for: `"generate"` or `"embed"` (`task=`).
    #[getter]
    fn task(&self) -> PyResult<&'static str> {
        Ok(self.running()?.1.task.name())
    }

    /// Tokens in the vocabulary, added tokens included.
    #[getter]
    fn vocab_size(&self) -> PyResult<usize> {
        Ok(self.running()?.1.tokenizer.get_vocab_size(true))
    }

    /// Token ids of `text`.
    #[pyo3(signature = (text, add_special_tokens = true))]
    fn tokenize(
        &self,
        py: Python<'_>,
        text: String,
        add_special_tokens: bool,
    ) -> PyResult<Vec<u32>> {
        let (_, model) = self.running()?;
        py.allow_threads(|| model.tokenizer.encode_fast(text, add_special_tokens))
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| PyValueError::new_err(format!("Could not tokenize the input: {e}")))
    }

    /// Text of token ids.
    #[pyo3(signature = (token_ids, skip_special_tokens = true))]
    fn decode(&self, token_ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        let (_, model) = self.running()?;
        model
            .tokenizer
            .decode(&token_ids, skip_special_tokens)
            .map_err(|e| PyValueError::new_err(format!("Could not decode the token ids: {e}")))
    }

    /// The prompt text of one conversation (a JSON list of `{"role", "content"}` messages, as
    /// `/v1/chat/completions` takes them) under the model's chat template.
    fn render_chat(&self, messages: &str, add_generation_prompt: bool) -> PyResult<String> {
        let (_, model) = self.running()?;
        let messages: Vec<ChatMessageIn> = serde_json::from_str(messages)
            .map_err(|e| PyValueError::new_err(format!("messages: {e}")))?;
        render_chat(&model, &messages, None, add_generation_prompt).map_err(errors::request)
    }

    /// Submits one sequence per prompt and choice (`n`); `params[i]` is prompt `i`'s sampling
    /// parameters as a JSON object and `adapters[i]` the name of its LoRA adapter (loaded by
    /// [`Engine::load_lora`]) or `None`; `kind` is `"prompt"` (raw prompts get the tokenizer's
    /// special tokens) or `"messages"` (rendered conversations already have them). Returns the
    /// batch and each prompt's token ids.
    fn submit(
        &self,
        py: Python<'_>,
        prompts: Vec<Prompt>,
        params: Vec<String>,
        adapters: Vec<Option<String>>,
        kind: &str,
    ) -> PyResult<(Batch, Vec<Vec<u32>>)> {
        let kind = match kind {
            "prompt" => PromptKind::Prompt,
            "messages" => PromptKind::Messages,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown prompt kind {other:?} (prompt, messages)"
                )))
            }
        };
        if prompts.len() != params.len() || prompts.len() != adapters.len() {
            return Err(PyValueError::new_err(format!(
                "{} prompts but {} sampling parameters and {} adapters",
                prompts.len(),
                params.len(),
                adapters.len()
            )));
        }
        let (engine, model) = self.running()?;
        let batch_size = prompts.len();
        let adapters = adapters
            .iter()
            .map(|name| name.as_deref().map(|n| adapter(&model, n)).transpose())
            .collect::<PyResult<Vec<_>>>()?;
        let specs = prompts
            .into_iter()
            .zip(params)
            .zip(adapters)
            .map(|((prompt, params), adapter)| PromptSpec {
                prompt,
                params,
                adapter,
            })
            .collect();
        let prepared = py
            .allow_threads(|| prepare(&model, specs, kind))
            .map_err(|(i, e)| numbered(py, batch_size, i, errors::request(e)))?;
        Ok(self.batch(engine, &model, prepared, false))
    }

    /// Submits one embedding sequence per prompt (a server started with `task="embed"`): each
    /// prompt's pooled hidden state, normalized as the model's pooler says, comes back as the
    /// batch's `embedding`. `truncate_prompt_tokens` keeps each prompt's last that many tokens
    /// (-1: max-model-len), as vLLM's.
    #[pyo3(signature = (prompts, adapters, truncate_prompt_tokens = None))]
    fn submit_embeddings(
        &self,
        py: Python<'_>,
        prompts: Vec<Prompt>,
        adapters: Vec<Option<String>>,
        truncate_prompt_tokens: Option<i64>,
    ) -> PyResult<(Batch, Vec<Vec<u32>>)> {
        let (engine, model) = self.running()?;
        let Some(pooler) = model.task.pooler().cloned() else {
            return Err(PyValueError::new_err(
                "embed() needs an embedding model: start the LLM with task=\"embed\"",
            ));
        };
        if prompts.len() != adapters.len() {
            return Err(PyValueError::new_err(format!(
                "{} prompts but {} adapters",
                prompts.len(),
                adapters.len()
            )));
        }
        let adapters = adapters
            .iter()
            .map(|name| name.as_deref().map(|n| adapter(&model, n)).transpose())
            .collect::<PyResult<Vec<_>>>()?;
        let batch_size = prompts.len();
        let embed = EmbedSpec {
            pooler: &pooler,
            truncate_prompt_tokens,
        };
        let prepared = py
            .allow_threads(|| prepare_embeddings(&model, prompts, adapters, &embed))
            .map_err(|(i, e)| numbered(py, batch_size, i, errors::request(e)))?;
        Ok(self.batch(engine, &model, prepared, pooler.normalize))
    }

    /// Serves the PEFT adapter in `path` as `name` (vLLM's `LoRARequest`), reading and checking
    /// it in full the first time; a name already loaded from the same path is reused. Raises
    /// `ValueError` when LoRA is off, the adapter cannot be served (the message names the file,
    /// field or tensor), or the name is taken by another path.
    fn load_lora(&self, py: Python<'_>, name: String, path: std::path::PathBuf) -> PyResult<u32> {
        let (_, model) = self.running()?;
        let Some(registry) = model.adapters.clone() else {
            return Err(PyValueError::new_err(format!(
                "Got lora_request {name:?} but LoRA is not enabled! Start the LLM with \
                 enable_lora=True."
            )));
        };
        if let Some(info) = registry.get(&name) {
            if info.path == path {
                return Ok(info.id);
            }
            return Err(PyValueError::new_err(format!(
                "The LoRA adapter name {name:?} is in use by {}; give {} another name",
                info.path.display(),
                path.display()
            )));
        }
        py.allow_threads(|| registry.load(&name, &path))
            .map(|info| info.id)
            .map_err(|e| PyValueError::new_err(format!("LoRA adapter {name:?}: {e}")))
    }

    /// Stops the engine and its workers and waits until they are gone; later calls do nothing.
    fn shutdown(&self, py: Python<'_>) {
        let launched = self.launched.lock().ok().and_then(|mut l| l.take());
        if let Some(launched) = launched {
            let runtime = &self.runtime;
            py.allow_threads(|| runtime.block_on(launched.stop()));
        }
    }

    /// Whether `shutdown` has run.
    #[getter]
    fn is_shut_down(&self) -> bool {
        self.launched.lock().map_or(true, |l| l.is_none())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let launched = self.launched.get_mut().ok().and_then(Option::take);
        if let Some(launched) = launched {
            let runtime = &self.runtime;
            Python::with_gil(|py| py.allow_threads(|| runtime.block_on(launched.stop())));
        }
    }
}
