//! POST `/v1/chat/completions`: messages rendered with the model's chat template (generation
//! prompt added), tokenized without adding special tokens again (the template has them), run as
//! `n` sequences, answered whole or as SSE chunks (`chat.completion.chunk`).
//!
//! Message content is a string or a list of text parts (joined); other part types (images,
//! audio) are refused with 400, since the models we serve are text-only.
//!
//! Tools (see `crate::tools`): the template gets them as `tools` whatever `tool_choice` says
//! (vLLM's default, without `--exclude-tools-when-tool-choice-none`); unless it is `none`, each
//! choice's text goes through a tool-call parser, whole or as it streams, with
//! `skip_special_tokens` off so call markers that are special tokens survive (as vLLM does).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Map, Value};

use super::error::{ApiError, ApiJson};
use super::gateway::{place_request, Ask, Caller};
use super::logprobs::TokenTexts;
use super::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatFinishReason, ChatMessageIn, ChatMessageOut,
    FunctionCallDelta, FunctionCallOut, ToolCallDelta, ToolCallOut, Usage,
};
use super::sequences::{answer_tokens, collect_all, submit_all};
use super::sse::{json_event, stream_response, ChunkWriter, Delta, StreamUsage};
use super::structured::{compile_constraint, compile_tool_call_schema};
use super::tokenize::encode;
use super::validate::{check_extras, check_params, top_count, MaxTokens, PromptKind};
use super::{new_id, unix_now, ApiState, RequestId};
use crate::engine::FinishReason;
use crate::served_model::ServedModel;
use crate::tools::messages::template_tool_calls;
use crate::tools::{
    Mode, Parsed, Piece, ToolCall, ToolCallParser, ToolChoice, ToolFields, ToolRequest,
};

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
    let placement = place_request(&state.model, caller.as_deref(), ask)?;
    let tools = ToolRequest::parse(ToolFields {
        tools: request.tools.as_ref(),
        tool_choice: request.tool_choice.as_ref(),
        parallel_tool_calls: request.parallel_tool_calls.as_ref(),
    })?;
    let calls = call_parsing(&state.model, tools.as_ref())?;
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
    let forced = tools
        .as_ref()
        .map(ToolRequest::required_call_schema)
        .transpose()?;
    if let Some(schema) = forced.flatten() {
        if params.grammar.is_some() {
            return Err(ApiError::invalid(
                "tool_choice",
                "`tool_choice` \"required\" or a named function constrains the whole output, so it \
                 cannot be combined with `response_format` or another structured-output field",
            ));
        }
        params.grammar = Some(compile_tool_call_schema(&state.model, schema).await?);
    }
    if calls.is_some() {
        params.skip_special_tokens = false;
    }

    let template_tools = tools.as_ref().map(ToolRequest::template_tools);
    let text = render(
        &state.model,
        &request.messages,
        template_tools.as_deref(),
        true,
    )?;
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
            calls: calls.clone(),
            parsers: Vec::new(),
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
    let tokens = answer_tokens(
        &collected,
        params.n,
        prompt_tokens,
        placement.ticket.as_deref(),
    );
    let texts = TokenTexts::new(&tokenizer);
    // Every choice has the same prompt: the first one's prompt log probabilities serve.
    let prompt_logprobs = collected
        .first()
        .and_then(|c| c.prompt_logprobs.as_deref())
        .map(|p| texts.prompt(p));
    let choices = collected
        .into_iter()
        .map(|c| {
            let (message, finish_reason) = match &calls {
                None => (
                    ChatMessageOut {
                        role: "assistant",
                        content: Some(c.text),
                        tool_calls: Vec::new(),
                    },
                    c.finish_reason.into(),
                ),
                Some(calls) => {
                    let parsed = ToolCallParser::parse(calls.mode.clone(), calls.parallel, &c.text);
                    let reason = calls.finish_reason(c.finish_reason, !parsed.calls.is_empty());
                    (answer(parsed), reason)
                }
            };
            ChatChoice {
                index: c.index,
                logprobs: logprobs.map(|_| texts.chat(&c.logprobs)),
                message,
                finish_reason: Some(finish_reason),
            }
        })
        .collect();
    Ok(axum::Json(ChatCompletionResponse {
        id,
        object: "chat.completion",
        created,
        model,
        choices,
        usage: Usage::new(tokens.prompt, tokens.completion, tokens.cached),
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

/// How a request's output is read for tool calls.
#[derive(Clone)]
struct CallParsing {
    mode: Mode,
    parallel: bool,
}

impl CallParsing {
    /// OpenAI's reasons: `tool_calls` when the model stopped after calling, except for a
    /// named function, where the call was asked for and the reason stays `stop`.
    fn finish_reason(&self, reason: FinishReason, called: bool) -> ChatFinishReason {
        let named = matches!(
            self.mode,
            Mode::Forced {
                function: Some(_),
                ..
            }
        );
        if called && reason == FinishReason::Stop && !named {
            ChatFinishReason::ToolCalls
        } else {
            reason.into()
        }
    }
}

/// Whether and how the output is parsed for calls: never for `tool_choice: none`; `auto` needs
/// the server's `--enable-auto-tool-choice` (vLLM's rule and message).
fn call_parsing(
    model: &ServedModel,
    tools: Option<&ToolRequest>,
) -> Result<Option<CallParsing>, ApiError> {
    let Some(tools) = tools else {
        return Ok(None);
    };
    let mode = match &tools.choice {
        ToolChoice::None => return Ok(None),
        ToolChoice::Auto => match (model.tools.auto, model.tools.parser) {
            (true, Some(kind)) => Mode::Auto(kind),
            _ => {
                return Err(ApiError::invalid(
                    "tool_choice",
                    "\"auto\" tool choice requires --enable-auto-tool-choice and \
                     --tool-call-parser to be set",
                ))
            }
        },
        ToolChoice::Required => Mode::Forced {
            function: None,
            fallback: model.tools.parser,
        },
        ToolChoice::Function(name) => Mode::Forced {
            function: Some(name.clone()),
            fallback: model.tools.parser,
        },
    };
    Ok(Some(CallParsing {
        mode,
        parallel: tools.parallel,
    }))
}

/// The assistant message of a parsed output.
fn answer(parsed: Parsed) -> ChatMessageOut {
    ChatMessageOut {
        role: "assistant",
        content: parsed.content,
        tool_calls: parsed.calls.into_iter().map(call_out).collect(),
    }
}

fn call_out(call: ToolCall) -> ToolCallOut {
    ToolCallOut {
        id: call.id,
        kind: "function",
        function: FunctionCallOut {
            name: call.name,
            arguments: call.arguments,
        },
    }
}

/// The prompt text of `messages` (and `tools`, in the template's `tools`) under the model's
/// chat template.
pub fn render(
    model: &ServedModel,
    messages: &[ChatMessageIn],
    tools: Option<&[Value]>,
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
        .map(|(i, m)| template_message(m, i))
        .collect::<Result<Vec<_>, ApiError>>()?;
    // A template that raises (say, "roles must alternate") is the request's fault.
    template
        .render_json(&messages, tools, add_generation_prompt)
        .map_err(|e| ApiError::invalid("messages", format!("The chat template failed: {e}")))
}

/// A message as the template sees it: `role` and `content` (a string), and only when given,
/// `name`, `tool_calls` (arguments as objects) and `tool_call_id`: templates test for the keys
/// (Llama 3.1's `'tool_calls' in message`), so absent ones stay absent. A `tool` message needs
/// its `tool_call_id`, as OpenAI's API says.
pub(super) fn template_message(m: &ChatMessageIn, i: usize) -> Result<Value, ApiError> {
    let mut out = Map::new();
    out.insert("role".into(), json!(m.role));
    out.insert(
        "content".into(),
        json!(content_text(m.content.as_ref(), i)?),
    );
    if let Some(name) = &m.name {
        out.insert("name".into(), json!(name));
    }
    match (&m.tool_calls, m.role.as_str()) {
        (None | Some(Value::Null), _) => {}
        (Some(calls), "assistant") => {
            out.insert("tool_calls".into(), template_tool_calls(calls, i)?);
        }
        (Some(_), role) => {
            return Err(ApiError::invalid(
                &format!("messages[{i}].tool_calls"),
                format!("Only assistant messages carry `tool_calls`, not `{role}` ones"),
            ))
        }
    }
    match (&m.tool_call_id, m.role.as_str()) {
        (Some(id), _) => {
            out.insert("tool_call_id".into(), json!(id));
        }
        (None, "tool") => {
            return Err(ApiError::invalid(
                &format!("messages[{i}].tool_call_id"),
                "A `tool` message needs the `tool_call_id` of the call it answers",
            ))
        }
        (None, _) => {}
    }
    Ok(Value::Object(out))
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
/// With tool calls parsed, each choice's text goes through its parser: content deltas carry the
/// text outside calls, and each call is two deltas (OpenAI's shape): index, id, type and name
/// with empty arguments, then the arguments.
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// Chunks carry their token's log probabilities.
    logprobs: bool,
    tokenizer: Arc<tokenizers::Tokenizer>,
    calls: Option<CallParsing>,
    /// Each choice's parser, by index, made at its opening.
    parsers: Vec<Option<ToolCallParser>>,
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

    fn choice(
        &self,
        index: u32,
        delta: ChatDelta,
        finish_reason: Option<ChatFinishReason>,
    ) -> Event {
        let choice = ChatChunkChoice {
            index,
            delta,
            finish_reason,
            logprobs: None,
        };
        self.chunk(vec![choice], None)
    }

    fn parser(&mut self, index: u32) -> Option<&mut ToolCallParser> {
        self.parsers.get_mut(index as usize)?.as_mut()
    }

    /// The deltas of parsed pieces.
    fn piece_deltas(pieces: Vec<Piece>) -> Vec<ChatDelta> {
        let mut deltas = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(text) => deltas.push(ChatDelta {
                    content: Some(text),
                    ..ChatDelta::default()
                }),
                Piece::Call { index, call } => {
                    deltas.push(ChatDelta {
                        tool_calls: Some(vec![ToolCallDelta {
                            index,
                            id: Some(call.id),
                            kind: Some("function"),
                            function: FunctionCallDelta {
                                name: Some(call.name),
                                arguments: String::new(),
                            },
                        }]),
                        ..ChatDelta::default()
                    });
                    deltas.push(ChatDelta {
                        tool_calls: Some(vec![ToolCallDelta {
                            index,
                            id: None,
                            kind: None,
                            function: FunctionCallDelta {
                                name: None,
                                arguments: call.arguments,
                            },
                        }]),
                        ..ChatDelta::default()
                    });
                }
            }
        }
        deltas
    }
}

impl ChunkWriter for ChatChunks {
    fn opening(&mut self, index: u32) -> Option<Event> {
        if let Some(calls) = &self.calls {
            let slot = index as usize;
            if self.parsers.len() <= slot {
                self.parsers.resize_with(slot + 1, || None);
            }
            self.parsers[slot] = Some(ToolCallParser::new(calls.mode.clone(), calls.parallel));
        }
        let delta = ChatDelta {
            role: Some("assistant"),
            content: Some(String::new()),
            tool_calls: None,
        };
        Some(self.choice(index, delta, None))
    }

    fn delta(&mut self, index: u32, delta: Delta) -> Vec<Event> {
        let mut logprobs = delta
            .logprobs
            .filter(|_| self.logprobs)
            .map(|lp| TokenTexts::new(&self.tokenizer).chat(std::slice::from_ref(&lp)));
        let deltas = match self.parser(index) {
            Some(parser) => {
                let deltas = Self::piece_deltas(parser.push(&delta.text));
                // A token whose text the parser holds still reports its log probabilities.
                if deltas.is_empty() && logprobs.is_some() {
                    vec![ChatDelta {
                        content: Some(String::new()),
                        ..ChatDelta::default()
                    }]
                } else {
                    deltas
                }
            }
            None if delta.text.is_empty() && logprobs.is_none() => Vec::new(),
            None => vec![ChatDelta {
                content: Some(delta.text),
                ..ChatDelta::default()
            }],
        };
        deltas
            .into_iter()
            .map(|delta| {
                let choice = ChatChunkChoice {
                    index,
                    delta,
                    finish_reason: None,
                    logprobs: logprobs.take(),
                };
                self.chunk(vec![choice], None)
            })
            .collect()
    }

    fn finish(&mut self, index: u32, reason: FinishReason) -> Vec<Event> {
        let calls = self.calls.clone();
        let (deltas, reason) = match (self.parser(index), calls) {
            (Some(parser), Some(calls)) => {
                let deltas = Self::piece_deltas(parser.finish());
                (deltas, calls.finish_reason(reason, parser.called()))
            }
            _ => (Vec::new(), reason.into()),
        };
        let mut events: Vec<Event> = deltas
            .into_iter()
            .map(|delta| self.choice(index, delta, None))
            .collect();
        events.push(self.choice(index, ChatDelta::default(), Some(reason)));
        events
    }

    fn usage(&self, usage: Usage) -> Event {
        self.chunk(Vec::new(), Some(usage))
    }
}
