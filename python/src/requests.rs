//! A Python `SamplingParams` (sent as the JSON object of its fields) and prompts into engine
//! requests, through the HTTP API's own checks (`api::check_params`, `api::check_token_ids`,
//! `CheckedParams::request_for`), so a `ValueError` says what a 400 says.

use pyo3::prelude::*;
use serde_json::Value;
use tpserve_coordinator::api::{
    check_params, check_token_ids, ApiError, CheckedParams, MaxTokens, PromptKind, SamplingFields,
};
use tpserve_coordinator::engine::GenerateRequest;
use tpserve_coordinator::served_model::ServedModel;

use crate::errors;

/// One prompt as Python gives it: text, or token ids.
#[derive(Debug, FromPyObject)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// Checks sampling parameters given as a JSON object of vLLM's `SamplingParams` fields.
pub fn checked(params: &str) -> Result<CheckedParams, ApiError> {
    let value: Value = serde_json::from_str(params)
        .map_err(|e| ApiError::invalid_body(format!("sampling parameters: {e}")))?;
    refuse_unsupported(&value)?;
    let fields: SamplingFields = serde_json::from_value(value)
        .map_err(|e| ApiError::invalid_body(format!("sampling parameters: {e}")))?;
    let max_tokens = MaxTokens {
        value: fields.max_tokens,
        param: "max_tokens",
    };
    check_params(&fields, max_tokens)
}

/// `SamplingParams` fields of vLLM that the engine cannot honour yet: refused in the API's words
/// unless they hold the value that means "off", never silently ignored.
fn refuse_unsupported(params: &Value) -> Result<(), ApiError> {
    let field = |name: &str| params.get(name).filter(|v| !v.is_null());
    if field("logprobs").is_some() {
        return Err(ApiError::unsupported("logprobs", "`logprobs`"));
    }
    // The HTTP API tokenizes these against the model (`check_extras`); the SDK does not yet.
    if field("logit_bias").is_some() {
        return Err(ApiError::unsupported("logit_bias", "`logit_bias`"));
    }
    if field("bad_words").is_some() {
        return Err(ApiError::unsupported("bad_words", "`bad_words`"));
    }
    if field("prompt_logprobs").is_some() {
        return Err(ApiError::unsupported(
            "prompt_logprobs",
            "`prompt_logprobs`",
        ));
    }
    let n = field("n").and_then(Value::as_i64).unwrap_or(1);
    if field("best_of")
        .and_then(Value::as_i64)
        .is_some_and(|b| b > n)
    {
        return Err(ApiError::unsupported("best_of", "`best_of` above `n`"));
    }
    if field("min_tokens")
        .and_then(Value::as_i64)
        .is_some_and(|m| m != 0)
    {
        return Err(ApiError::unsupported(
            "min_tokens",
            "`min_tokens` other than 0",
        ));
    }
    if field("include_stop_str_in_output") == Some(&Value::Bool(true)) {
        return Err(ApiError::unsupported(
            "include_stop_str_in_output",
            "`include_stop_str_in_output`",
        ));
    }
    if field("detokenize") == Some(&Value::Bool(false)) {
        return Err(ApiError::unsupported("detokenize", "`detokenize` false"));
    }
    Ok(())
}

/// Raises the `ValueError` a 400 would carry when `params` (a JSON object) is not acceptable.
#[pyfunction]
pub fn check_sampling(params: &str) -> PyResult<()> {
    checked(params).map(|_| ()).map_err(errors::request)
}

/// Engine requests for a batch of prompts, each with its own parameters.
pub struct Prepared {
    /// Every sequence with the index of its prompt (`n` sequences per prompt, in order).
    pub sequences: Vec<(usize, GenerateRequest)>,
    /// Each prompt's token ids.
    pub prompt_token_ids: Vec<Vec<u32>>,
}

/// Tokenizes and checks every prompt against its parameters; the first failure is returned
/// with the index of its prompt.
pub fn prepare(
    model: &ServedModel,
    prompts: Vec<Prompt>,
    params: &[String],
    kind: PromptKind,
) -> Result<Prepared, (usize, ApiError)> {
    let mut prepared = Prepared {
        sequences: Vec::with_capacity(prompts.len()),
        prompt_token_ids: Vec::with_capacity(prompts.len()),
    };
    for (i, (prompt, params)) in prompts.into_iter().zip(params).enumerate() {
        let checked = checked(params).map_err(|e| (i, e))?;
        let ids = match prompt {
            Prompt::Text(text) => model
                .tokenizer
                // The chat template writes its own special tokens; a raw prompt gets BOS.
                .encode_fast(text, kind == PromptKind::Prompt)
                .map_err(|e| {
                    let message = format!("Could not tokenize the input: {e}");
                    (i, ApiError::invalid_body(message))
                })?
                .get_ids()
                .to_vec(),
            Prompt::Ids(ids) => {
                check_token_ids(&ids, &model.tokenizer, "prompt").map_err(|e| (i, e))?;
                ids
            }
        };
        let request = checked
            .request_for(ids.clone(), model.max_model_len, kind)
            .map_err(|e| (i, e))?;
        prepared
            .sequences
            .extend(checked.fan_out(&request).into_iter().map(|r| (i, r)));
        prepared.prompt_token_ids.push(ids);
    }
    Ok(prepared)
}
