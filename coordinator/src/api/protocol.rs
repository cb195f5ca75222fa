//! The JSON bodies of the API, with OpenAI's (and, for `/tokenize`, vLLM's) field names.
//!
//! Each request body is read from the parsed JSON object, the shared sampling fields in a second
//! typed pass over the same object, so a type error anywhere names its field.
//! Requests are lenient where OpenAI's are: every optional field may be absent or `null`, and
//! unknown fields are ignored (clients send `metadata` and newer fields we do not know).
//! Fields whose accepted shapes serde's untagged enums would report badly (`prompt`, `stop`,
//! message `content`) arrive as raw JSON and are checked in `validate`, so the error names the
//! field. Ranges are checked there too, never here.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{from_json, ApiError, RequestBody};
use super::logprobs::{ChatLogprobs, CompletionLogprobs, PromptLogprobs};
use crate::engine::FinishReason;

/// Sampling and output fields shared by `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplingFields {
    /// Most tokens to generate; absent means "up to the context length".
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// vLLM's extension: -1 or 0 disable it.
    pub top_k: Option<i64>,
    /// vLLM's extension.
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    /// Choices per prompt.
    pub n: Option<i64>,
    /// A string or a list of strings.
    pub stop: Option<Value>,
    /// vLLM's extension.
    pub stop_token_ids: Option<Vec<u32>>,
    /// vLLM's extension.
    pub ignore_eos: Option<bool>,
    /// vLLM's extension; default true.
    pub skip_special_tokens: Option<bool>,
    /// vLLM's extension; lower runs first.
    pub priority: Option<i32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// -2..=2.
    pub presence_penalty: Option<f64>,
    /// -2..=2.
    pub frequency_penalty: Option<f64>,
    /// vLLM's extension; above 0, 1 is off.
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) to a bias in -100..=100.
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    /// vLLM's extension: end tokens and stop strings do not end the output before this many.
    pub min_tokens: Option<i64>,
    /// vLLM's extension: words never generated.
    pub bad_words: Option<Vec<String>>,
    /// vLLM's extension: log probabilities of the prompt tokens, with this many top tokens.
    pub prompt_logprobs: Option<i64>,
    /// OpenAI's: `{"type": "text" | "json_object" | "json_schema", ...}` (read in `structured`).
    pub response_format: Option<Value>,
    /// vLLM's `structured_outputs` object (read in `structured`).
    pub structured_outputs: Option<Value>,
    /// vLLM's older names: a JSON schema (object or JSON text), a regex, a list of choices, a
    /// Lark grammar.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage of the whole request (and `"usage": null` before it).
    pub include_usage: Option<bool>,
}

/// POST `/v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    /// OpenAI's end-user id: what the gateway's A/B split keeps each user sticky by.
    pub user: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given (as in vLLM).
    pub max_completion_tokens: Option<i64>,
    /// Return the log probability of each output token.
    pub logprobs: Option<bool>,
    /// With `logprobs`: this many most likely tokens per position (0-20).
    pub top_logprobs: Option<i64>,
    /// Function tools the model may call (checked in `tools::request`).
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    pub tool_choice: Option<Value>,
    /// Default true; false keeps at most one call.
    pub parallel_tool_calls: Option<Value>,
    /// Read from the same JSON object (see [`RequestBody`]).
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, a list of `{"type": "text", "text": ...}` parts, or null (assistant turns that
    /// only called tools).
    #[serde(default)]
    pub content: Option<Value>,
    /// An assistant turn's calls: `[{"id", "type", "function": {"name", "arguments"}}]`.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// A `tool` message: the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// The author's name (some templates show it).
    #[serde(default)]
    pub name: Option<String>,
}

/// POST `/v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    /// OpenAI's end-user id: what the gateway's A/B split keeps each user sticky by.
    pub user: Option<String>,
    /// A string, a list of strings, a list of token ids, or a list of lists of token ids.
    pub prompt: Option<Value>,
    /// Put the prompt's text before each choice's text.
    pub echo: Option<bool>,
    /// Log probabilities of the output tokens (and the prompt's with `echo`), with this many
    /// most likely tokens per position (0-20).
    pub logprobs: Option<i64>,
    /// Not supported yet when non-empty.
    pub suffix: Option<String>,
    /// Not supported yet above `n`.
    pub best_of: Option<i64>,
    /// Read from the same JSON object (see [`RequestBody`]).
    #[serde(skip)]
    pub sampling: SamplingFields,
}

/// Token counts of a whole request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Counted once per prompt, however many choices it has.
    pub prompt_tokens: u64,
    /// Summed over all choices.
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// OpenAI's breakdown of the prompt: how much of it came from the prefix cache.
    #[serde(default)]
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV was reused from the prefix cache.
    pub cached_tokens: u64,
}

impl Usage {
    pub fn new(prompt_tokens: u64, completion_tokens: u64, cached_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// The answer of a non-streaming chat request.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM's: the prompt's log probabilities, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// One choice of a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub finish_reason: Option<ChatFinishReason>,
    /// With `logprobs`: each output token's; else null.
    pub logprobs: Option<ChatLogprobs>,
}

/// Why a chat choice ended: the engine's reasons, plus OpenAI's `tool_calls` when the model
/// stopped after calling tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatFinishReason {
    Stop,
    Length,
    Abort,
    ToolCalls,
}

impl From<FinishReason> for ChatFinishReason {
    fn from(reason: FinishReason) -> Self {
        match reason {
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
            FinishReason::Abort => Self::Abort,
        }
    }
}

/// The assistant's message in a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// The text; null when the model only called tools.
    pub content: Option<String>,
    /// The calls the model made; absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallOut>,
}

/// One call in a chat response.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

/// A call's function: its name and its arguments as a JSON string.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallOut {
    pub name: String,
    pub arguments: String,
}

/// A streamed piece of a call: the first carries `id`, `type` and the name with empty
/// arguments; the next the arguments.
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Serialize)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// One SSE chunk of a streaming chat request.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Absent without `include_usage`; with it, null on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice's part of a chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub finish_reason: Option<ChatFinishReason>,
    /// With `logprobs`: the chunk's token's; else null.
    pub logprobs: Option<ChatLogprobs>,
}

/// What a chat chunk adds to a choice's message; `{}` on the chunk that finishes it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// The answer of a non-streaming completion request, and (with `object` "text_completion" too,
/// as OpenAI does) each SSE chunk of a streaming one.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Always present on a full response; on chunks, as [`ChatCompletionChunk::usage`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice of a completion, or its part of a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub finish_reason: Option<FinishReason>,
    /// With `logprobs`: the tokens' (the prompt's first with `echo`); else null.
    pub logprobs: Option<CompletionLogprobs>,
    /// vLLM's: the prompt's log probabilities, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
}

/// GET `/v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// One served model (vLLM's card: OpenAI's fields plus `root`, `parent`, `max_model_len`).
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    /// The base model of an adapter; null for a base model.
    pub parent: Option<String>,
    pub max_model_len: u32,
    /// How the weights run: `gguf (Q4_1, Q8_0)` (blocks kept quantized, their types) or `none`.
    pub quantization: String,
}

/// POST `/tokenize`: either `prompt` or `messages`.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ChatMessageIn>>,
    /// Default true for `prompt`, false for `messages` (the template adds them), as vLLM.
    pub add_special_tokens: Option<bool>,
    /// For `messages`; default true.
    pub add_generation_prompt: Option<bool>,
}

/// The answer of `/tokenize`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: u32,
    pub tokens: Vec<u32>,
}

/// POST `/detokenize`.
#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// The answer of `/detokenize`.
#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

impl RequestBody for ChatCompletionRequest {
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        let mut request: Self = from_json(value)?;
        request.sampling = from_json(value)?;
        Ok(request)
    }
}

impl RequestBody for CompletionRequest {
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        let mut request: Self = from_json(value)?;
        request.sampling = from_json(value)?;
        Ok(request)
    }
}

/// POST `/v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    /// OpenAI's end-user id (the gateway's A/B split keeps each user sticky by it).
    pub user: Option<String>,
    /// A string, a list of strings, a list of token ids, or a list of lists of token ids.
    pub input: Option<Value>,
    /// Keep this many leading dimensions (Matryoshka models only), then normalize again.
    pub dimensions: Option<i64>,
    /// `float` (default) or `base64` (little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// vLLM's extension: keep only the last this many tokens of each input (-1: max-model-len).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM's extension: add the tokenizer's special tokens to text inputs; default true.
    pub add_special_tokens: Option<bool>,
}

/// One vector of an embeddings response: floats, or base64 of little-endian f32 bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

/// One entry of `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingData {
    /// The input it embeds, in request order.
    pub index: u32,
    /// Always `embedding`.
    pub object: String,
    pub embedding: EmbeddingVector,
}

/// The token counts of an embeddings request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

/// The answer to `/v1/embeddings` (OpenAI's shape, with vLLM's `id` and `created`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingResponse {
    pub id: String,
    /// Always `list`.
    pub object: String,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: EmbeddingUsage,
}

impl RequestBody for EmbeddingRequest {
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        from_json(value)
    }
}

impl RequestBody for TokenizeRequest {
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        from_json(value)
    }
}

impl RequestBody for DetokenizeRequest {
    fn from_json(value: &Value) -> Result<Self, ApiError> {
        from_json(value)
    }
}
