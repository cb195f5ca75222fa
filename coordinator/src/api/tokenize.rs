//! POST `/tokenize` and `/detokenize`, as vLLM has them, and the tokenizer calls every endpoint
//! shares.
//!
//! Encoding runs on the blocking pool: a long prompt takes milliseconds of CPU, which would stall
//! every other connection served by the same runtime thread. Decoding is only used on short
//! inputs (echo, `/detokenize`) and runs inline.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::chat::render;
use super::error::{ApiError, ApiJson};
use super::protocol::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use super::validate::{check_model, check_token_ids};
use super::ApiState;
use crate::served_model::ServedModel;

/// `text` to token ids, adding the tokenizer's special tokens (BOS) when asked.
pub async fn encode(
    model: &ServedModel,
    text: String,
    add_special_tokens: bool,
) -> Result<Vec<u32>, ApiError> {
    let tokenizer = Arc::clone(&model.tokenizer);
    let encoded = tokio::task::spawn_blocking(move || {
        tokenizer.encode_fast(text.as_str(), add_special_tokens)
    })
    .await
    .map_err(|e| ApiError::Internal {
        message: format!("the tokenizer task failed: {e}"),
    })?;
    let encoding = encoded
        .map_err(|e| ApiError::invalid_body(format!("Could not tokenize the input: {e}")))?;
    Ok(encoding.get_ids().to_vec())
}

/// Token ids (already checked against the vocabulary) to text.
pub fn decode(
    model: &ServedModel,
    ids: &[u32],
    skip_special_tokens: bool,
) -> Result<String, ApiError> {
    model
        .tokenizer
        .decode(ids, skip_special_tokens)
        .map_err(|e| ApiError::invalid_body(format!("Could not decode the tokens: {e}")))
}

/// `{prompt, add_special_tokens = true}` or `{messages, add_generation_prompt = true,
/// add_special_tokens = false}` -> `{count, max_model_len, tokens}`.
pub async fn tokenize(
    State(state): State<Arc<ApiState>>,
    ApiJson(request): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let model = &state.model;
    check_model(request.model.as_deref(), model)?;
    let tokens = match (request.prompt, request.messages) {
        (Some(prompt), None) => {
            state.limits.check_prompt_bytes(&prompt, "prompt")?;
            encode(model, prompt, request.add_special_tokens.unwrap_or(true)).await?
        }
        (None, Some(messages)) => {
            let add_generation_prompt = request.add_generation_prompt.unwrap_or(true);
            state.limits.check_messages(messages.len())?;
            let text = render(model, &messages, None, add_generation_prompt)?;
            state.limits.check_prompt_bytes(&text, "messages")?;
            encode(model, text, request.add_special_tokens.unwrap_or(false)).await?
        }
        _ => {
            return Err(ApiError::invalid_body(
                "Give exactly one of `prompt` and `messages`",
            ))
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.max_model_len,
        tokens,
    }))
}

/// `{tokens}` -> `{prompt}`, special tokens kept (vLLM's behaviour).
pub async fn detokenize(
    State(state): State<Arc<ApiState>>,
    ApiJson(request): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    check_model(request.model.as_deref(), &state.model)?;
    check_token_ids(&request.tokens, &state.model.tokenizer, "tokens")?;
    let prompt = decode(&state.model, &request.tokens, false)?;
    Ok(Json(DetokenizeResponse { prompt }))
}
