//! What the API needs to know about the model it serves: its names, its context length, its
//! tokenizer, its chat template and its structured-output compiler. Built once at start; shared read-only.

use std::sync::Arc;

use tpserve_modelfile::chat::ChatTemplate;

use crate::adapters::{AdapterInfo, AdapterRegistry};
use crate::structured::GrammarCompiler;
use crate::task::Task;
use crate::tools::ToolConfig;

/// The model behind the API.
#[derive(Clone)]
pub struct ServedModel {
    /// The name clients put in `model` (the first `--served-model-name`, else the model path);
    /// the `model_name` of the metrics.
    pub name: String,
    /// Further names the same model answers to (the other `--served-model-name`s, as vLLM's):
    /// what the gateway's routes name until adapters exist.
    pub aliases: Vec<String>,
    /// The longest sequence (prompt plus output) a request may have.
    pub max_model_len: u32,
    /// The quantization the workers run (`/v1/models`' `quantization`): `gguf (Q4_1, Q8_0)`
    /// with the block types, or `none`.
    pub quantization: String,
    /// The tokenizer (also used for `/tokenize` and `/detokenize`).
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// The chat template, when the model has one.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// Tool calling: whether `tool_choice: auto` is served and the call format.
    pub tools: ToolConfig,
    /// Unix seconds when the server started (OpenAI's `created`).
    pub created: u64,
    /// The LoRA adapters served on top of it (`None` without `--enable-lora`).
    pub adapters: Option<Arc<AdapterRegistry>>,
    /// What it is served for (`--task`): generation, or embeddings and their pooling.
    pub task: Task,
    /// Width of its hidden states (an embedding's full dimension).
    pub hidden_size: usize,
    /// Compiles structured-output constraints against `tokenizer` (cached by their text).
    pub structured: Arc<GrammarCompiler>,
}

impl ServedModel {
    /// Whether `model` is one of the names this server answers to.
    pub fn serves(&self, model: &str) -> bool {
        self.name == model || self.aliases.iter().any(|a| a == model)
    }

    /// The adapter served as `name`, if any.
    pub fn adapter(&self, name: &str) -> Option<Arc<AdapterInfo>> {
        self.adapters.as_ref().and_then(|a| a.get(name))
    }

    /// Whether `name` is the base model or a loaded adapter.
    pub fn serves_model_or_adapter(&self, name: &str) -> bool {
        self.serves(name) || self.adapter(name).is_some()
    }

    /// Every name, the primary one first.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.aliases.iter().map(String::as_str))
    }
}
