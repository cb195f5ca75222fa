//! POST `/v1/chat/completions`: messages rendered with the model's chat template (generation
//! prompt added), tokenized without adding special tokens again (the template has them), run as
//! `n` sequences, answered whole or as SSE chunks (`chat.completion.chunk`).
//!
//! Message content is a string or a list of text parts (joined); other part types (images,
//! audio) are refused with 400, since the models we serve are text-only.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::Value;
use tpserve_modelfile::chat::ChatMessage;

use super::error::{ApiError, ApiJson};
use super::gateway::{place, Ask, Caller, Tokens};
use super::logprobs::TokenTexts;
use super::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatMessageIn, ChatMessageOut, Usage,
};
use super::request_id::annotate;
use super::sequences::{collect_all, submit_all};
use super::sse::{json_event, stream_response, ChunkWriter, Delta, StreamUsage};
use super::structured::compile_constraint;
use super::tokenize::encode;
use super::validate::{check_extras, check_params, top_count, MaxTokens, PromptKind};
use super::{new_id, unix_now, ApiState, RequestId};
use crate::engine::FinishReason;
use crate::served_model::ServedModel;

pub async fn chat_completions(
    State(state): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    if state.model.task.pooler().is_some() {
        return Err(super::embeddings::not_supported("Chat Completions"));
    }
    state.limits.check_messages(request.messages.len())?;
    state.limits.check_sampling(&request.sampling)?;
    let ask = Ask {
        model: request.model.as_deref(),
        user: request.user.as_deref(),
        headers: &headers,
    };
    let placement = place(&state.model, caller.as_deref(), ask)?;
    annotate(
        &placement.model,
        None,
        caller.as_deref().map(Caller::tenant),
    );
    refuse_unsupported(&request)?;
    let logprobs = check_logprobs(&request)?;
    let max_tokens = match request.max_completion_tokens {
        Some(m) => MaxTokens {
            value: Some(m),
            param: "max_completion_tokens",
        },
        None => MaxTokens {
            value: request.sampling.max_tokens,
            param: "max_tokens",
        },
    };
    let mut params = check_params(&request.sampling, max_tokens)?;
    params.cap_max_tokens(placement.max_tokens)?;
    let tokenizer = state.model.tokenizer.clone();
    check_extras(&mut params, &request.sampling, &tokenizer, logprobs, None)?;
    params.grammar = compile_constraint(&state.model, &request.sampling).await?;

    let text = render(&state.model, &request.messages, true)?;
    state.limits.check_prompt_bytes(&text, "messages")?;
    if state.log_prompts {
        tracing::info!(prompt = %text, "chat prompt (--log-prompts)");
    }
    let prompt = encode(&state.model, text, false).await?;
    let prompt_tokens = prompt.len() as u64;
    let mut base = params.request_for(prompt, placement.max_model_len, PromptKind::Messages)?;
    base.share = placement.share;
    base.cache_salt = placement.cache_salt;
    base.adapter = placement.adapter.clone();
    let requests = params.fan_out(&base).into_iter().enumerate();
    let requests = requests.map(|(i, r)| (i as u32, r)).collect();
    let sequences = submit_all(&state.engine, requests).await?;

    let id = new_id("chatcmpl", request_id.as_deref());
    let created = unix_now();
    let model = placement.model;
    if params.stream {
        let writer = ChatChunks {
            id,
            created,
            model,
            include_usage: params.include_usage,
            logprobs: logprobs.is_some(),
            tokenizer,
        };
        let usage = StreamUsage {
            prompt_tokens,
            n: params.n,
            include_usage: params.include_usage,
            ticket: placement.ticket,
        };
        return Ok(stream_response(writer, sequences, usage));
    }

    let collected = collect_all(sequences).await?;
    let completion_tokens = collected
        .iter()
        .map(|c| u64::from(c.completion_tokens))
        .sum();
    let cached_tokens = collected
        .iter()
        .find(|c| c.index == 0)
        .map_or(0, |c| u64::from(c.cached_tokens));
    if let Some(ticket) = &placement.ticket {
        ticket.complete(Tokens {
            prompt: prompt_tokens,
            cached: cached_tokens,
            completion: completion_tokens,
        });
    }
    let texts = TokenTexts::new(&tokenizer);
    // Every choice has the same prompt: the first one's prompt log probabilities serve.
    let prompt_logprobs = collected
        .first()
        .and_then(|c| c.prompt_logprobs.as_deref())
        .map(|p| texts.prompt(p));
    let choices = collected
        .into_iter()
        .map(|c| ChatChoice {
            index: c.index,
            logprobs: logprobs.map(|_| texts.chat(&c.logprobs)),
            message: ChatMessageOut {
                role: "assistant",
                content: c.text,
            },
            finish_reason: Some(c.finish_reason),
        })
        .collect();
    Ok(axum::Json(ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens, cached_tokens),
        prompt_logprobs,
    })
    .into_response())
}

/// `logprobs` and `top_logprobs`: the number of top tokens per output token when log
/// probabilities are asked for. `top_logprobs` above 0 needs `logprobs` (OpenAI's and vLLM's
/// rule).
fn check_logprobs(request: &ChatCompletionRequest) -> Result<Option<u32>, ApiError> {
    let top = top_count(request.top_logprobs, "top_logprobs")?;
    if request.logprobs == Some(true) {
        return Ok(Some(top.unwrap_or(0)));
    }
    if top.is_some_and(|k| k > 0) {
        return Err(ApiError::invalid(
            "top_logprobs",
            "`top_logprobs` needs `logprobs` set to true",
        ));
    }
    Ok(None)
}

/// Fields we parse but cannot honour yet: refused, never silently ignored.
fn refuse_unsupported(request: &ChatCompletionRequest) -> Result<(), ApiError> {
    if request.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported("tools", "Tool calling"));
    }
    Ok(())
}

/// The prompt text of `messages` under the model's chat template.
pub fn render(
    model: &ServedModel,
    messages: &[ChatMessageIn],
    add_generation_prompt: bool,
) -> Result<String, ApiError> {
    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "messages",
            format!(
                "The model `{}` has no chat template, so it cannot take chat messages; use \
                 /v1/completions with a prompt instead.",
                model.name
            ),
        )
    })?;
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must not be empty",
        ));
    }
    let messages = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(ChatMessage {
                role: m.role.clone(),
                content: content_text(m.content.as_ref(), i)?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    // A template that raises (say, "roles must alternate") is the request's fault.
    template
        .render(&messages, add_generation_prompt)
        .map_err(|e| ApiError::invalid("messages", format!("The chat template failed: {e}")))
}

/// A message's content as one string: a string as is, text parts joined with newlines (as
/// vLLM does), null as empty.
fn content_text(content: Option<&Value>, message: usize) -> Result<String, ApiError> {
    let param = format!("messages[{message}].content");
    let bad = |what: String| ApiError::InvalidRequest {
        message: what,
        param: Some(param.clone()),
    };
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(text)) => texts.push(text),
                    (Some("text"), None) => {
                        return Err(bad("A text part needs a string `text`".into()))
                    }
                    (Some(other), _) => {
                        return Err(bad(format!(
                            "Content parts of type `{other}` are not supported; only `text` is"
                        )))
                    }
                    (None, _) => return Err(bad("A content part needs a `type`".into())),
                }
            }
            Ok(texts.join("\n"))
        }
        Some(_) => Err(bad(
            "`content` must be a string or a list of content parts".into()
        )),
    }
}

/// `chat.completion.chunk`s: a role chunk opens each choice, a `{}` delta with the reason ends it.
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Chunks carry their token's log probabilities.
    logprobs: bool,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> Event {
        json_event(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn choice(&self, index: u32, delta: ChatDelta, finish_reason: Option<FinishReason>) -> Event {
        let choice = ChatChunkChoice {
            index,
            delta,
            finish_reason,
            logprobs: None,
        };
        self.chunk(vec![choice], None)
    }
}

impl ChunkWriter for ChatChunks {
    fn opening(&mut self, index: u32) -> Option<Event> {
        let delta = ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
        };
        Some(self.choice(index, delta, None))
    }

    fn delta(&mut self, index: u32, delta: Delta) -> Vec<Event> {
        let logprobs = delta
            .logprobs
            .filter(|_| self.logprobs)
            .map(|lp| TokenTexts::new(&self.tokenizer).chat(std::slice::from_ref(&lp)));
        if delta.text.is_empty() && logprobs.is_none() {
            return Vec::new();
        }
        let choice = ChatChunkChoice {
            index,
            delta: ChatDelta {
                role: None,
                content: Some(delta.text),
            },
            finish_reason: None,
            logprobs,
        };
        vec![self.chunk(vec![choice], None)]
    }

    fn finish(&self, index: u32, reason: FinishReason) -> Event {
        self.choice(index, ChatDelta::default(), Some(reason))
    }

    fn usage(&self, usage: Usage) -> Event {
        self.chunk(Vec::new(), Some(usage))
    }
}
