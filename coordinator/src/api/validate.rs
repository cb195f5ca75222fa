//! Turns a request's fields into [`GenerateRequest`]s, or into a 400 that names the field at
//! fault. Everything the engine relies on is checked here: sampling ranges, `n`, the model name,
//! token ids inside the vocabulary, and the prompt plus `max_tokens` within max-model-len.
//!
//! Pure functions over already-parsed JSON; no I/O. Ranges follow OpenAI (temperature 0..=2,
//! top_p in (0, 1]) and vLLM for its extensions (top_k -1 or 0 = off, min_p 0..=1).

use std::sync::Arc;

use serde_json::Value;

use super::error::ApiError;
use super::protocol::SamplingFields;
use crate::engine::{GenerateRequest, Sampling, SamplingExtras, Share};
use crate::served_model::ServedModel;
use crate::structured::Grammar;

/// Most choices one prompt may ask for.
pub const MAX_N: u32 = 128;

/// The request's `model` must name the served model (any of its names); absent is accepted for
/// convenience and means the primary name. Returns the name the answer reports.
pub fn check_model(requested: Option<&str>, model: &ServedModel) -> Result<String, ApiError> {
    match requested {
        Some(name) if !model.serves(name) => Err(ApiError::ModelNotFound {
            model: name.to_string(),
        }),
        Some(name) => Ok(name.to_string()),
        None => Ok(model.name.clone()),
    }
}

/// Where a prompt came from, for error messages in the request's own words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// `/v1/chat/completions`: the rendered `messages`.
    Messages,
    /// `/v1/completions`: `prompt`.
    Prompt,
}

impl PromptKind {
    fn param(self) -> &'static str {
        match self {
            Self::Messages => "messages",
            Self::Prompt => "prompt",
        }
    }
}

/// The `max_tokens` a request gave and under which name (`max_tokens` or
/// `max_completion_tokens`), so errors name the field the client used.
#[derive(Debug, Clone, Copy)]
pub struct MaxTokens {
    pub value: Option<i64>,
    pub param: &'static str,
}

/// A request's checked parameters: everything but the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckedParams {
    /// `None`: up to the context length.
    pub max_tokens: Option<u32>,
    max_tokens_param: &'static str,
    pub sampling: Sampling,
    /// Choices per prompt, 1..=[`MAX_N`].
    pub n: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
    pub priority: i32,
    pub stream: bool,
    /// Streaming only: send `usage: null` on chunks and a last chunk with the usage.
    pub include_usage: bool,
    /// Penalties, biases and log probabilities ([`check_extras`] fills the parts that need
    /// the tokenizer or the endpoint's own fields).
    pub extras: SamplingExtras,
    /// The compiled structured-output constraint, when the request has one (the handlers fill
    /// it: compiling needs the server's grammar compiler).
    pub grammar: Option<Arc<Grammar>>,
}

/// Checks the shared sampling and output fields.
pub fn check_params(
    fields: &SamplingFields,
    max_tokens: MaxTokens,
) -> Result<CheckedParams, ApiError> {
    let penalty = |value: Option<f64>, param: &str| match value {
        None => Ok(0.0),
        Some(v) if (-2.0..=2.0).contains(&v) => Ok(v as f32),
        Some(v) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be between -2 and 2, got {v}"),
        )),
    };
    let presence_penalty = penalty(fields.presence_penalty, "presence_penalty")?;
    let frequency_penalty = penalty(fields.frequency_penalty, "frequency_penalty")?;
    let repetition_penalty = match fields.repetition_penalty {
        None => 1.0,
        Some(r) if r > 0.0 && r.is_finite() => r as f32,
        Some(r) => {
            return Err(ApiError::invalid(
                "repetition_penalty",
                format!("`repetition_penalty` must be above 0, got {r}"),
            ))
        }
    };
    let min_tokens = match fields.min_tokens.unwrap_or(0) {
        m if m < 0 => {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("`min_tokens` must be at least 0, got {m}"),
            ))
        }
        m => u32::try_from(m).unwrap_or(u32::MAX),
    };
    // A negative max_tokens is its own error, reported below.
    if let Some(max) = max_tokens
        .value
        .filter(|&m| m >= 0 && i64::from(min_tokens) > m)
    {
        return Err(ApiError::invalid(
            "min_tokens",
            format!(
                "`min_tokens` ({min_tokens}) must not exceed `{}` ({max})",
                max_tokens.param
            ),
        ));
    }
    let prompt_logprobs = top_count(fields.prompt_logprobs, "prompt_logprobs")?;
    let stream_requested = fields.stream.unwrap_or(false);
    if prompt_logprobs.is_some() && stream_requested {
        return Err(ApiError::invalid(
            "prompt_logprobs",
            "`prompt_logprobs` is not available when `stream` is true",
        ));
    }

    let max_tokens_value = match max_tokens.value {
        None => None,
        Some(m) if m < 1 => {
            return Err(ApiError::invalid(
                max_tokens.param,
                format!("`{}` must be at least 1, got {m}", max_tokens.param),
            ))
        }
        // Anything past u32 is over every context length; the length check reports it.
        Some(m) => Some(u32::try_from(m).unwrap_or(u32::MAX)),
    };

    let temperature = fields.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = fields.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match fields.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k >= 1 => i32::try_from(k).unwrap_or(i32::MAX),
        k => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be -1 or 0 (disabled) or at least 1, got {k}"),
            ))
        }
    };
    let min_p = fields.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(ApiError::invalid(
            "min_p",
            format!("`min_p` must be between 0 and 1, got {min_p}"),
        ));
    }
    let n = fields.n.unwrap_or(1);
    if n < 1 || n > i64::from(MAX_N) {
        return Err(ApiError::invalid(
            "n",
            format!("`n` must be between 1 and {MAX_N}, got {n}"),
        ));
    }

    let stream = fields.stream.unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let include_usage = fields
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);

    Ok(CheckedParams {
        max_tokens: max_tokens_value,
        max_tokens_param: max_tokens.param,
        sampling: Sampling {
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            min_p: min_p as f32,
            // OpenAI's seed is a signed integer; the engine's stream takes its bits.
            seed: fields.seed.map(|s| s as u64),
        },
        n: n as u32,
        stop: stop_strings(fields.stop.as_ref())?,
        stop_token_ids: fields.stop_token_ids.clone().unwrap_or_default(),
        ignore_eos: fields.ignore_eos.unwrap_or(false),
        skip_special_tokens: fields.skip_special_tokens.unwrap_or(true),
        priority: fields.priority.unwrap_or(0),
        stream,
        include_usage,
        extras: SamplingExtras {
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            min_tokens,
            prompt_logprobs,
            ..SamplingExtras::default()
        },
        grammar: None,
    })
}

/// Most top tokens a position's log probabilities may list (OpenAI's `top_logprobs` limit;
/// vLLM's default `--max-logprobs`).
pub const MAX_LOGPROBS: i64 = 20;

/// A count of top log probabilities, 0..=[`MAX_LOGPROBS`]; null is `None`.
pub fn top_count(value: Option<i64>, param: &str) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(k) if (0..=MAX_LOGPROBS).contains(&k) => Ok(Some(k as u32)),
        Some(k) => Err(ApiError::invalid(
            param,
            format!("`{param}` must be between 0 and {MAX_LOGPROBS}, got {k}"),
        )),
    }
}

/// Fills the parts of `params.extras` that need the tokenizer (`logit_bias` ids checked against
/// the vocabulary, `bad_words` tokenized) and the endpoint's log probabilities: `logprobs` for
/// the output, and `echo_logprobs` for the prompt (completions' `echo` with `logprobs`; it
/// wins over `prompt_logprobs` when larger).
pub fn check_extras(
    params: &mut CheckedParams,
    fields: &SamplingFields,
    tokenizer: &tokenizers::Tokenizer,
    logprobs: Option<u32>,
    echo_logprobs: Option<u32>,
) -> Result<(), ApiError> {
    let extras = &mut params.extras;
    extras.logprobs = logprobs;
    extras.prompt_logprobs = match (extras.prompt_logprobs, echo_logprobs) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let vocab = tokenizer.get_vocab_size(true);
    for (key, value) in fields.logit_bias.iter().flatten() {
        let token = key.parse::<u32>().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("`logit_bias` keys must be token ids, got {key:?}"),
            )
        })?;
        if token as usize >= vocab {
            return Err(ApiError::invalid(
                "logit_bias",
                format!(
                    "`logit_bias` names token id {token}, which is out of vocabulary (the \
                     vocabulary has {vocab} tokens)"
                ),
            ));
        }
        let bias = value
            .as_f64()
            .filter(|b| (-100.0..=100.0).contains(b))
            .ok_or_else(|| {
                ApiError::invalid(
                    "logit_bias",
                    format!("`logit_bias` values must be numbers between -100 and 100, got {value} for token {token}"),
                )
            })?;
        extras.logit_bias.push((token, bias as f32));
    }
    for word in fields.bad_words.iter().flatten() {
        extras
            .bad_words
            .extend(bad_word_token_ids(word, tokenizer)?);
    }
    Ok(())
}

/// vLLM's tokenization of a bad word: the word (leading spaces stripped) as is, and with one
/// leading space when that tokenizes differently in its first token but not in length.
fn bad_word_token_ids(
    word: &str,
    tokenizer: &tokenizers::Tokenizer,
) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |text: String| -> Result<Vec<u32>, ApiError> {
        tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::invalid("bad_words", format!("cannot tokenize {word:?}: {e}")))
    };
    let bare = word.trim_start();
    let mut out: Vec<Vec<u32>> = Vec::new();
    let plain = encode(bare.to_string())?;
    if plain.is_empty() {
        return Err(ApiError::invalid(
            "bad_words",
            format!("the bad word {word:?} has no tokens"),
        ));
    }
    let spaced = encode(format!(" {bare}"))?;
    let differs = spaced.first() != plain.first() && spaced.len() == plain.len();
    out.push(plain);
    if differs {
        out.push(spaced);
    }
    Ok(out)
}

/// `stop`: null, a string, or a list of strings. Empty strings are dropped: they would stop
/// before the first token, which no client means.
fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid("stop", "`stop` must be a string or a list of strings");
    let stops = match stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

impl CheckedParams {
    /// The engine request for one prompt, after checking its length against `max_model_len`.
    /// Without `max_tokens`, the completion may fill the rest of the context.
    pub fn request_for(
        &self,
        prompt_token_ids: Vec<u32>,
        max_model_len: u32,
        kind: PromptKind,
    ) -> Result<GenerateRequest, ApiError> {
        let what = kind.param();
        let prompt_len = prompt_token_ids.len() as u64;
        let limit = u64::from(max_model_len);
        if prompt_len == 0 {
            let message = match kind {
                PromptKind::Messages => "The messages render to an empty prompt.",
                PromptKind::Prompt => "The prompt is empty.",
            };
            return Err(ApiError::invalid(what, message));
        }
        if prompt_len >= limit {
            return Err(ApiError::ContextLengthExceeded {
                message: format!(
                    "This model's maximum context length is {limit} tokens. However, your {what} \
                     {verb} {prompt_len} tokens, which leaves no room for the completion. Please \
                     reduce the length of the {what}.",
                    verb = if kind == PromptKind::Prompt {
                        "has"
                    } else {
                        "have"
                    },
                ),
                param: what.to_string(),
            });
        }
        let max_tokens = match self.max_tokens {
            None => (limit - prompt_len) as u32,
            Some(m) if prompt_len + u64::from(m) > limit => {
                return Err(ApiError::ContextLengthExceeded {
                    message: format!(
                        "This model's maximum context length is {limit} tokens. However, you \
                         requested {total} tokens ({prompt_len} in the {what}, {m} in the \
                         completion). Please reduce the length of the {what} or completion.",
                        total = prompt_len + u64::from(m),
                    ),
                    param: self.max_tokens_param.to_string(),
                });
            }
            Some(m) => m,
        };
        Ok(GenerateRequest {
            prompt_token_ids,
            max_tokens,
            sampling: self.sampling,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            skip_special_tokens: self.skip_special_tokens,
            priority: self.priority,
            share: Share::default(),
            cache_salt: 0,
            extras: Arc::new(self.extras.clone()),
            adapter: None,
            grammar: self.grammar.clone(),
        })
    }

    /// Applies a tenant's `max_tokens` cap: asking for more is a 400 naming the field; asking
    /// for nothing asks for the cap.
    pub fn cap_max_tokens(&mut self, cap: Option<u32>) -> Result<(), ApiError> {
        let Some(cap) = cap else {
            return Ok(());
        };
        match self.max_tokens {
            Some(m) if m > cap => Err(ApiError::invalid(
                self.max_tokens_param,
                format!(
                    "`{}` is {m}, above your API key's limit of {cap}",
                    self.max_tokens_param
                ),
            )),
            Some(_) => Ok(()),
            None => {
                self.max_tokens = Some(cap);
                Ok(())
            }
        }
    }

    /// The `n` sequences of one prompt. With a seed, choice `i` gets `seed + i`, so choices
    /// differ but the request as a whole is reproducible.
    pub fn fan_out(&self, request: &GenerateRequest) -> Vec<GenerateRequest> {
        (0..self.n)
            .map(|i| {
                let mut r = request.clone();
                r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(u64::from(i)));
                r
            })
            .collect()
    }
}

/// Token ids a client sent must exist in the tokenizer's vocabulary (added tokens included).
pub fn check_token_ids(
    ids: &[u32],
    tokenizer: &tokenizers::Tokenizer,
    param: &str,
) -> Result<(), ApiError> {
    let vocab = tokenizer.get_vocab_size(true);
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(ApiError::invalid(
            param,
            format!("Token id {id} is out of vocabulary (the vocabulary has {vocab} tokens)"),
        )),
        None => Ok(()),
    }
}
