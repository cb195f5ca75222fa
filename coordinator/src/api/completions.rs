//! POST `/v1/completions`: one or more prompts (text, tokenized with special tokens added, or
//! token ids as given), each run as `n` sequences; answered whole or as SSE chunks.
//!
//! A batch of prompts is one request: choice `prompt_index * n + i` is the `i`th choice of the
//! `prompt_index`th prompt (OpenAI's numbering); usage counts each prompt once. Every prompt is
//! checked before any is submitted, so a bad one refuses the batch without starting the rest.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::Value;

use super::error::{ApiError, ApiJson};
use super::gateway::{place_request, Ask, Caller};
use super::logprobs::{CompletionLogprobs, TokenTexts};
use super::protocol::{CompletionChoice, CompletionRequest, CompletionResponse, Usage};
use super::sequences::{answer_tokens, collect_all, submit_all};
use super::sse::{json_event, stream_response, ChunkWriter, Delta, StreamUsage};
use super::structured::compile_constraint;
use super::tokenize::{decode, encode};
use super::validate::{
    check_extras, check_params, check_token_ids, top_count, MaxTokens, PromptKind,
};
use super::{new_id, unix_now, ApiState, RequestId};
use crate::engine::{FinishReason, TokenLogprobs};

/// A prompt as echoed: its text and its token ids.
#[derive(Debug, Clone)]
struct Echo {
    text: String,
    ids: Vec<u32>,
}

/// The `logprobs` of an echoed prompt: its tokens, the first without a log probability.
fn echo_logprobs(
    texts: &TokenTexts,
    echo: &Echo,
    prompt: &[Option<TokenLogprobs>],
    out: &mut CompletionLogprobs,
    offset: &mut usize,
) {
    for (i, &id) in echo.ids.iter().enumerate() {
        out.push(texts, id, prompt.get(i).and_then(Option::as_ref), offset);
    }
}

/// One prompt of a request as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

pub async fn completions(
    State(state): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    if state.model.task.pooler().is_some() {
        return Err(super::embeddings::not_supported("Completions"));
    }
    let model = &state.model;
    state.limits.check_sampling(&request.sampling)?;
    let ask = Ask {
        model: request.model.as_deref(),
        user: request.user.as_deref(),
        headers: &headers,
    };
    let placement = place_request(model, caller.as_deref(), ask)?;
    refuse_unsupported(&request)?;
    let max_tokens = MaxTokens {
        value: request.sampling.max_tokens,
        param: "max_tokens",
    };
    let mut params = check_params(&request.sampling, max_tokens)?;
    params.cap_max_tokens(placement.max_tokens)?;
    let echo = request.echo.unwrap_or(false);
    let logprobs = top_count(request.logprobs, "logprobs")?;
    let echo_lp = logprobs.filter(|_| echo);
    check_extras(
        &mut params,
        &request.sampling,
        &model.tokenizer,
        logprobs,
        echo_lp,
    )?;
    params.grammar = compile_constraint(model, &request.sampling).await?;
    let prompt_field = request.sampling.prompt_logprobs.is_some();

    let inputs = parse_prompts(request.prompt.as_ref(), "prompt")?;
    let mut requests = Vec::with_capacity(inputs.len() * params.n as usize);
    let mut echoes = Vec::with_capacity(inputs.len());
    let mut prompt_tokens = 0u64;
    for (prompt_index, input) in inputs.into_iter().enumerate() {
        let (ids, text) = match input {
            PromptInput::Text(text) => {
                state.limits.check_prompt_bytes(&text, "prompt")?;
                if state.log_prompts {
                    tracing::info!(prompt = %text, prompt_index, "prompt (--log-prompts)");
                }
                (encode(model, text.clone(), true).await?, text)
            }
            PromptInput::Tokens(ids) => {
                check_token_ids(&ids, &model.tokenizer, "prompt")?;
                let text = if echo {
                    decode(model, &ids, params.skip_special_tokens)?
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        prompt_tokens += ids.len() as u64;
        let echoed = Echo {
            text,
            ids: if echo { ids.clone() } else { Vec::new() },
        };
        let mut base = params.request_for(ids, placement.max_model_len, PromptKind::Prompt)?;
        base.share = placement.share;
        base.cache_salt = placement.cache_salt;
        base.adapter = placement.adapter.clone();
        let first_choice = prompt_index as u32 * params.n;
        requests.extend((first_choice..).zip(params.fan_out(&base)));
        echoes.push(echoed);
    }
    let sequences = submit_all(&state.engine, requests).await?;

    let id = new_id("cmpl", request_id.as_deref());
    let created = unix_now();
    let name = placement.model;
    if params.stream {
        let writer = CompletionChunks {
            id,
            created,
            model: name,
            include_usage: params.include_usage,
            echoes: echo.then_some(echoes),
            n: params.n,
            logprobs: logprobs.is_some(),
            offsets: HashMap::new(),
            tokenizer: model.tokenizer.clone(),
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
    let texts = TokenTexts::new(&model.tokenizer);
    let choices = collected
        .into_iter()
        .map(|c| {
            let echoed = &echoes[(c.index / params.n) as usize];
            let prompt_lps = c.prompt_logprobs.as_deref().unwrap_or_default();
            let choice_logprobs = logprobs.map(|_| {
                let mut out = CompletionLogprobs::default();
                let mut offset = 0;
                if echo {
                    echo_logprobs(&texts, echoed, prompt_lps, &mut out, &mut offset);
                }
                for lp in &c.logprobs {
                    out.push(&texts, lp.token_id, Some(lp), &mut offset);
                }
                out
            });
            let text = if echo {
                echoed.text.clone() + &c.text
            } else {
                c.text
            };
            CompletionChoice {
                index: c.index,
                text,
                finish_reason: Some(c.finish_reason),
                logprobs: choice_logprobs,
                prompt_logprobs: prompt_field.then(|| texts.prompt(prompt_lps)),
            }
        })
        .collect();
    Ok(axum::Json(CompletionResponse {
        id,
        object: "text_completion",
        created,
        model: name,
        choices,
        usage: Some(Some(Usage::new(
            tokens.prompt,
            tokens.completion,
            tokens.cached,
        ))),
    })
    .into_response())
}

/// Fields we parse but cannot honour yet: refused, never silently ignored.
fn refuse_unsupported(request: &CompletionRequest) -> Result<(), ApiError> {
    if request.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "`suffix`"));
    }
    let n = request.sampling.n.unwrap_or(1);
    if request.best_of.is_some_and(|b| b > n) {
        return Err(ApiError::unsupported("best_of", "`best_of` above `n`"));
    }
    Ok(())
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
/// The prompts of field `param` (`prompt`, or `/v1/embeddings`' `input`).
pub(super) fn parse_prompts(
    prompt: Option<&Value>,
    param: &str,
) -> Result<Vec<PromptInput>, ApiError> {
    let bad = || {
        ApiError::invalid(
            param,
            format!(
                "`{param}` must be a string, a list of strings, a list of token ids, or a list \
                 of lists of token ids"
            ),
        )
    };
    let token_ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    match prompt {
        None | Some(Value::Null) => Err(ApiError::invalid(param, format!("`{param}` is required"))),
        Some(Value::String(s)) => Ok(vec![PromptInput::Text(s.clone())]),
        Some(Value::Array(items)) => match items.first() {
            // `[]` is one empty prompt, refused by the length check with its own message.
            None => Ok(vec![PromptInput::Tokens(Vec::new())]),
            Some(Value::String(_)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| PromptInput::Text(s.to_string()))
                        .ok_or_else(bad)
                })
                .collect(),
            Some(Value::Number(_)) => Ok(vec![PromptInput::Tokens(token_ids(items)?)]),
            Some(Value::Array(_)) => items
                .iter()
                .map(|v| match v {
                    Value::Array(ids) => Ok(PromptInput::Tokens(token_ids(ids)?)),
                    _ => Err(bad()),
                })
                .collect(),
            Some(_) => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// `text_completion` chunks: the echoed prompt opens a choice when asked, an empty text with
/// the reason ends it.
struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    /// The prompts, by prompt index, when `echo` is on.
    echoes: Option<Vec<Echo>>,
    n: u32,
    /// Chunks carry their tokens' log probabilities.
    logprobs: bool,
    /// Characters of each choice's text streamed so far (for `text_offset`).
    offsets: HashMap<u32, usize>,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl CompletionChunks {
    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> Event {
        json_event(&CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }

    fn choice(&self, index: u32, text: String, finish_reason: Option<FinishReason>) -> Event {
        self.choice_with(index, text, finish_reason, None)
    }

    fn choice_with(
        &self,
        index: u32,
        text: String,
        finish_reason: Option<FinishReason>,
        logprobs: Option<CompletionLogprobs>,
    ) -> Event {
        let choice = CompletionChoice {
            index,
            text,
            finish_reason,
            logprobs,
            prompt_logprobs: None,
        };
        self.chunk(vec![choice], None)
    }
}

impl ChunkWriter for CompletionChunks {
    fn opening(&mut self, index: u32) -> Option<Event> {
        // With log probabilities the echo waits for the prompt's, which come with the first
        // token.
        if self.logprobs {
            return None;
        }
        let echoes = self.echoes.as_ref()?;
        let text = echoes[(index / self.n) as usize].text.clone();
        Some(self.choice(index, text, None))
    }

    fn delta(&mut self, index: u32, delta: Delta) -> Vec<Event> {
        if !self.logprobs {
            return if delta.text.is_empty() {
                Vec::new()
            } else {
                vec![self.choice(index, delta.text, None)]
            };
        }
        let texts = TokenTexts::new(&self.tokenizer);
        let mut offset = self.offsets.get(&index).copied().unwrap_or(0);
        let mut events = Vec::new();
        if let (Some(echoes), Some(prompt)) = (&self.echoes, &delta.prompt_logprobs) {
            let echoed = &echoes[(index / self.n) as usize];
            let mut lps = CompletionLogprobs::default();
            echo_logprobs(&texts, echoed, prompt, &mut lps, &mut offset);
            events.push(self.choice_with(index, echoed.text.clone(), None, Some(lps)));
        }
        let mut lps = CompletionLogprobs::default();
        for (i, &token) in delta.token_ids.iter().enumerate() {
            let lp = delta.logprobs.as_ref().filter(|_| i == 0);
            lps.push(&texts, token, lp, &mut offset);
        }
        self.offsets.insert(index, offset);
        events.push(self.choice_with(index, delta.text, None, Some(lps)));
        events
    }

    fn finish(&mut self, index: u32, reason: FinishReason) -> Vec<Event> {
        vec![self.choice(index, String::new(), Some(reason))]
    }

    fn usage(&self, usage: Usage) -> Event {
        self.chunk(Vec::new(), Some(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_openai_prompt_shape_parses() {
        let parse = |v: Value| parse_prompts(Some(&v), "prompt");
        assert_eq!(
            parse(json!("hi")).unwrap(),
            vec![PromptInput::Text("hi".into())]
        );
        assert_eq!(
            parse(json!(["a", "b"])).unwrap(),
            vec![PromptInput::Text("a".into()), PromptInput::Text("b".into())]
        );
        assert_eq!(
            parse(json!([1, 2])).unwrap(),
            vec![PromptInput::Tokens(vec![1, 2])]
        );
        assert_eq!(
            parse(json!([[1], [2, 3]])).unwrap(),
            vec![
                PromptInput::Tokens(vec![1]),
                PromptInput::Tokens(vec![2, 3])
            ]
        );
    }

    #[test]
    fn mixed_or_negative_prompts_are_refused_naming_prompt() {
        for bad in [
            json!(["a", 1]),
            json!([1, -2]),
            json!([[1], "a"]),
            json!(3),
            json!({}),
        ] {
            let err = parse_prompts(Some(&bad), "prompt").unwrap_err();
            assert_eq!(err.body().error.param.as_deref(), Some("prompt"), "{bad}");
        }
        assert!(parse_prompts(None, "prompt").is_err());
    }
}
