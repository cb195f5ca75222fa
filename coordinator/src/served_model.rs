//! What the API needs to know about the model it serves: its names, its context length, its
//! tokenizer and its chat template. Built once at start; shared read-only.

use std::sync::Arc;

use tpserve_modelfile::chat::ChatTemplate;

/// The model behind the API.
#[derive(Clone)]
pub struct ServedModel {
    /// The name clients put in `model` (`--served-model-name`, else the model path).
    pub name: String,
    /// The longest sequence (prompt plus output) a request may have.
    pub max_model_len: u32,
    /// The tokenizer (also used for `/tokenize` and `/detokenize`).
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    /// The chat template, when the model has one.
    pub chat_template: Option<Arc<ChatTemplate>>,
    /// Unix seconds when the server started (OpenAI's `created`).
    pub created: u64,
}
