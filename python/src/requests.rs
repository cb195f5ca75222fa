//! A Python `SamplingParams` (sent as the JSON object of its fields) and prompts into engine
//! requests, through the HTTP API's own checks (`api::check_params`, `api::check_extras`,
//! `api::check_token_ids`, the structured-output compiler, `CheckedParams::request_for`), so a
//! `ValueError` says what a 400 says.
//!
//! Checks come in two rounds: those that need no model run when a `SamplingParams` is made
//! ([`check_sampling`]); those that need the tokenizer (`logit_bias` ids, `bad_words`) or the
//! grammar compiler (structured outputs) run when a batch is submitted ([`prepare`]).

use std::sync::Arc;

use pyo3::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use tpserve_coordinator::adapters::AdapterInfo;
use tpserve_coordinator::api::{
    check_extras, check_params, check_token_ids, compile_constraint_blocking, requested_constraint,
    top_count, ApiError, CheckedParams, MaxTokens, PromptKind, SamplingFields,
};
use tpserve_coordinator::engine::{GenerateRequest, SamplingExtras};
use tpserve_coordinator::served_model::ServedModel;
use tpserve_coordinator::task::PoolerConfig;

use crate::errors;

/// One prompt as Python gives it: text, or token ids.
#[derive(Debug, FromPyObject)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// vLLM's `SamplingParams` fields that the HTTP API's shared fields do not have.
#[derive(Debug, Default, Deserialize)]
struct SdkFields {
    /// Log probabilities of each generated token with this many top tokens (completions'
    /// `logprobs`).
    logprobs: Option<i64>,
    /// Keep only the prompt's last this many tokens; -1: max-model-len.
    truncate_prompt_tokens: Option<i64>,
}

/// Sampling parameters checked as far as they can be without the model.
pub struct Checked {
    fields: SamplingFields,
    params: CheckedParams,
    logprobs: Option<u32>,
    truncate_prompt_tokens: Option<i64>,
}

/// Checks sampling parameters given as a JSON object of vLLM's `SamplingParams` fields.
fn checked(params: &str) -> Result<Checked, ApiError> {
    let value: Value = serde_json::from_str(params)
        .map_err(|e| ApiError::invalid_body(format!("sampling parameters: {e}")))?;
    refuse_unsupported(&value)?;
    let invalid =
        |e: serde_json::Error| ApiError::invalid_body(format!("sampling parameters: {e}"));
    let sdk: SdkFields = serde_json::from_value(value.clone()).map_err(invalid)?;
    let fields: SamplingFields = serde_json::from_value(value).map_err(invalid)?;
    let max_tokens = MaxTokens {
        value: fields.max_tokens,
        param: "max_tokens",
    };
    let params = check_params(&fields, max_tokens)?;
    let logprobs = top_count(sdk.logprobs, "logprobs")?;
    // The constraint's shape (one kind at most, a schema that parses); compiled at submission.
    requested_constraint(&fields)?;
    if let Some(k) = sdk.truncate_prompt_tokens.filter(|&k| k != -1 && k < 1) {
        return Err(ApiError::invalid(
            "truncate_prompt_tokens",
            format!("`truncate_prompt_tokens` must be -1 (max-model-len) or at least 1, not {k}"),
        ));
    }
    Ok(Checked {
        fields,
        params,
        logprobs,
        truncate_prompt_tokens: sdk.truncate_prompt_tokens,
    })
}

impl Checked {
    /// The remaining checks, against the served model: `logit_bias` ids within its vocabulary,
    /// `bad_words` tokenized, the structured-output constraint compiled.
    fn for_model(&mut self, model: &ServedModel) -> Result<(), ApiError> {
        check_extras(
            &mut self.params,
            &self.fields,
            &model.tokenizer,
            self.logprobs,
            None,
        )?;
        self.params.grammar = compile_constraint_blocking(model, &self.fields)?;
        Ok(())
    }

    /// The prompt's last `truncate_prompt_tokens` tokens (all of them without it).
    fn truncate(&self, ids: &mut Vec<u32>, max_model_len: u32) {
        let keep = match self.truncate_prompt_tokens {
            None => return,
            Some(-1) => max_model_len as usize,
            Some(k) => usize::try_from(k).unwrap_or(usize::MAX),
        };
        ids.drain(..ids.len().saturating_sub(keep));
    }
}

/// `SamplingParams` fields of vLLM that the engine cannot honour: refused in the API's words
/// unless they hold the value that means "off", never silently ignored.
fn refuse_unsupported(params: &Value) -> Result<(), ApiError> {
    let field = |name: &str| params.get(name).filter(|v| !v.is_null());
    let n = field("n").and_then(Value::as_i64).unwrap_or(1);
    if field("best_of")
        .and_then(Value::as_i64)
        .is_some_and(|b| b > n)
    {
        return Err(ApiError::unsupported("best_of", "`best_of` above `n`"));
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
    for name in ["allowed_token_ids", "logits_processors"] {
        if field(name).is_some() {
            return Err(ApiError::unsupported(name, &format!("`{name}`")));
        }
    }
    Ok(())
}

/// Raises the `ValueError` a 400 would carry when `params` (a JSON object) is not acceptable.
#[pyfunction]
pub fn check_sampling(params: &str) -> PyResult<()> {
    checked(params).map(|_| ()).map_err(errors::request)
}

/// One prompt of a batch: what to run, with which parameters and adapter.
pub struct PromptSpec {
    pub prompt: Prompt,
    /// Its `SamplingParams` as a JSON object.
    pub params: String,
    /// The LoRA adapter it runs with; `None`: the base model.
    pub adapter: Option<Arc<AdapterInfo>>,
}

/// A prompt's token ids: text tokenized (with BOS when `add_bos`: a raw prompt gets it, the
/// chat template writes its own special tokens), ids checked against the vocabulary.
fn prompt_ids(model: &ServedModel, prompt: Prompt, add_bos: bool) -> Result<Vec<u32>, ApiError> {
    match prompt {
        Prompt::Text(text) => Ok(model
            .tokenizer
            .encode_fast(text, add_bos)
            .map_err(|e| ApiError::invalid_body(format!("Could not tokenize the input: {e}")))?
            .get_ids()
            .to_vec()),
        Prompt::Ids(ids) => {
            check_token_ids(&ids, &model.tokenizer, "prompt")?;
            Ok(ids)
        }
    }
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
    prompts: Vec<PromptSpec>,
    kind: PromptKind,
) -> Result<Prepared, (usize, ApiError)> {
    let mut prepared = Prepared {
        sequences: Vec::with_capacity(prompts.len()),
        prompt_token_ids: Vec::with_capacity(prompts.len()),
    };
    for (i, spec) in prompts.into_iter().enumerate() {
        let mut checked = checked(&spec.params).map_err(|e| (i, e))?;
        checked.for_model(model).map_err(|e| (i, e))?;
        let mut ids =
            prompt_ids(model, spec.prompt, kind == PromptKind::Prompt).map_err(|e| (i, e))?;
        checked.truncate(&mut ids, model.max_model_len);
        let mut request = checked
            .params
            .request_for(ids.clone(), model.max_model_len, kind)
            .map_err(|e| (i, e))?;
        request.adapter = spec.adapter;
        let sequences = checked.params.fan_out(&request);
        prepared
            .sequences
            .extend(sequences.into_iter().map(|r| (i, r)));
        prepared.prompt_token_ids.push(ids);
    }
    Ok(prepared)
}

/// How a batch of embedding prompts runs.
pub struct EmbedSpec<'a> {
    /// The served model's pooler.
    pub pooler: &'a PoolerConfig,
    /// Keep each prompt's last that many tokens; -1: max-model-len.
    pub truncate_prompt_tokens: Option<i64>,
}

/// Engine requests for a batch of embedding prompts: each runs as one prefill-only sequence
/// pooled as the server's pooler says (the HTTP API's `/v1/embeddings` rules and messages).
pub fn prepare_embeddings(
    model: &ServedModel,
    prompts: Vec<Prompt>,
    adapters: Vec<Option<Arc<AdapterInfo>>>,
    spec: &EmbedSpec,
) -> Result<Prepared, (usize, ApiError)> {
    let limit = model.max_model_len as usize;
    let keep = match spec.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(limit),
        Some(k) if k >= 1 && k as usize <= limit => Some(k as usize),
        Some(k) => {
            let message = format!(
                "`truncate_prompt_tokens` must be -1 (max-model-len) or between 1 and the \
                 maximum context length {limit}, not {k}"
            );
            return Err((0, ApiError::invalid("truncate_prompt_tokens", message)));
        }
    };
    let mut prepared = Prepared {
        sequences: Vec::with_capacity(prompts.len()),
        prompt_token_ids: Vec::with_capacity(prompts.len()),
    };
    for (i, (prompt, adapter)) in prompts.into_iter().zip(adapters).enumerate() {
        let mut ids = prompt_ids(model, prompt, true).map_err(|e| (i, e))?;
        if let Some(k) = keep {
            ids.drain(..ids.len().saturating_sub(k));
        }
        if ids.is_empty() {
            return Err((i, ApiError::invalid("prompt", "The prompt is empty.")));
        }
        if ids.len() > limit {
            let message = format!(
                "This model's maximum context length is {limit} tokens. However, the prompt has \
                 {} tokens. Please reduce the length of the prompt (or set \
                 `truncate_prompt_tokens`).",
                ids.len()
            );
            let error = ApiError::ContextLengthExceeded {
                message,
                param: "prompt".into(),
            };
            return Err((i, error));
        }
        let mut request = GenerateRequest::fixed_length_greedy(ids.clone(), 1);
        request.extras = Arc::new(SamplingExtras {
            pooling: Some(spec.pooler.pooling_type),
            ..SamplingExtras::default()
        });
        request.adapter = adapter;
        prepared.sequences.push((i, request));
        prepared.prompt_token_ids.push(ids);
    }
    Ok(prepared)
}
