//! Limits on what one request may ask for, so a hostile or careless client costs a bounded
//! amount before it is refused: the body's size (413), the number of chat messages, `n` and stop
//! strings (400), and the prompt's size in bytes, checked before the tokenizer sees it (400,
//! `context_length_exceeded`), plus how long a client may take to send its body (408).
//!
//! The prompt bound: a token stands for at least one byte of text and at most as many as the
//! longest entry of the vocabulary, so a text longer than max-model-len times that entry cannot
//! fit however it tokenizes. Checking its length costs nothing; tokenizing megabytes first would
//! cost seconds of CPU. (Tokenizers that normalize text, say by dropping accents, could in theory
//! fit more; `--max-prompt-bytes` raises the bound for them.)
//!
//! Timeouts on connections (slow headers, idle keep-alive) are in `listener`.

use std::time::Duration;

use clap::Args;

use super::error::ApiError;
use super::protocol::SamplingFields;
use crate::served_model::ServedModel;

/// Flags that bound requests and connections (`tpserve serve`).
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest request body in bytes; larger ones get 413. The default fits a 128k-token
    /// prompt as JSON token ids.
    #[arg(long, env = "TPSERVE_MAX_REQUEST_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_request_body_bytes: usize,
    /// Most messages one chat request may hold.
    #[arg(long, env = "TPSERVE_MAX_MESSAGES", default_value_t = 1024)]
    pub max_messages: usize,
    /// Largest `n` (choices per prompt); at most 128.
    #[arg(long, env = "TPSERVE_MAX_N", default_value_t = super::validate::MAX_N)]
    pub max_n: u32,
    /// Most stop strings one request may give.
    #[arg(long, env = "TPSERVE_MAX_STOP_STRINGS", default_value_t = 64)]
    pub max_stop_strings: usize,
    /// Largest prompt text in bytes, checked before tokenizing (default: max-model-len times
    /// the longest token of the vocabulary, the most text that could fit).
    #[arg(long, env = "TPSERVE_MAX_PROMPT_BYTES")]
    pub max_prompt_bytes: Option<usize>,
    /// Seconds a client may take to send a request's headers, counted from the connection's
    /// opening or from the end of the previous response on a kept-alive connection: a request
    /// whose headers stop coming (slow-loris) gets 408 and is closed; a connection that sent
    /// nothing (idle keep-alive) is closed silently, as nginx does.
    #[arg(long, env = "TPSERVE_HTTP_HEADER_TIMEOUT", default_value_t = 15.0)]
    pub http_header_timeout: f64,
    /// Seconds a client may take to send a request's body once its headers have come; slower
    /// ones get 408.
    #[arg(long, env = "TPSERVE_HTTP_BODY_TIMEOUT", default_value_t = 60.0)]
    pub http_body_timeout: f64,
}

/// Why a limit flag is refused.
#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("--{flag} must be {what}, got {value}")]
    OutOfRange {
        flag: &'static str,
        what: &'static str,
        value: String,
    },
}

impl LimitArgs {
    /// The flags within their ranges (before the model is loaded, so a bad flag fails fast).
    pub fn validate(&self) -> Result<(), LimitsError> {
        let out_of_range =
            |flag, what, value: String| LimitsError::OutOfRange { flag, what, value };
        if !(1..=super::validate::MAX_N).contains(&self.max_n) {
            return Err(out_of_range(
                "max-n",
                "between 1 and 128",
                self.max_n.to_string(),
            ));
        }
        for (flag, seconds) in [
            ("http-header-timeout", self.http_header_timeout),
            ("http-body-timeout", self.http_body_timeout),
        ] {
            if !(seconds.is_finite() && seconds > 0.0) {
                return Err(out_of_range(
                    flag,
                    "a positive number of seconds",
                    seconds.to_string(),
                ));
            }
        }
        if self.max_request_body_bytes == 0 || self.max_messages == 0 {
            return Err(out_of_range(
                "max-request-body-bytes and --max-messages",
                "at least 1",
                "0".into(),
            ));
        }
        Ok(())
    }

    /// The limits for `model`, after checking the flags.
    pub fn resolve(&self, model: &ServedModel) -> Result<ApiLimits, LimitsError> {
        self.validate()?;
        Ok(ApiLimits {
            max_body_bytes: self.max_request_body_bytes,
            max_messages: self.max_messages,
            max_n: self.max_n,
            max_stop_strings: self.max_stop_strings,
            max_prompt_bytes: self
                .max_prompt_bytes
                .unwrap_or_else(|| fitting_bytes(model)),
            header_timeout: Duration::from_secs_f64(self.http_header_timeout),
            body_timeout: Duration::from_secs_f64(self.http_body_timeout),
        })
    }
}

/// The most prompt bytes that could fit in max-model-len tokens: each token stands for at most
/// as many bytes as its vocabulary entry has (byte-level entries spell a byte in one or two
/// bytes, SentencePiece's `▁` a space in three), so the longest entry bounds them all.
fn fitting_bytes(model: &ServedModel) -> usize {
    let longest = model
        .tokenizer
        .get_vocab(true)
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(1)
        .max(1);
    (model.max_model_len as usize).saturating_mul(longest)
}

/// The limits the handlers apply.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiLimits {
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Most chat messages.
    pub max_messages: usize,
    /// Largest `n`.
    pub max_n: u32,
    /// Most stop strings.
    pub max_stop_strings: usize,
    /// Largest prompt text in bytes, before tokenizing.
    pub max_prompt_bytes: usize,
    /// Time for a request's headers (also the idle keep-alive time).
    pub header_timeout: Duration,
    /// Time for a request's body (408 after).
    pub body_timeout: Duration,
}

impl Default for ApiLimits {
    /// The flags' defaults, with an unbounded prompt (no model to bound it by).
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            max_messages: 1024,
            max_n: super::validate::MAX_N,
            max_stop_strings: 64,
            max_prompt_bytes: usize::MAX,
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(60),
        }
    }
}

impl ApiLimits {
    /// `n` and `stop` within their limits (their types and ranges are `check_params`' job).
    pub fn check_sampling(&self, fields: &SamplingFields) -> Result<(), ApiError> {
        if let Some(n) = fields.n.filter(|&n| n > i64::from(self.max_n)) {
            return Err(ApiError::invalid(
                "n",
                format!(
                    "`n` is {n}; this server allows at most {} (--max-n)",
                    self.max_n
                ),
            ));
        }
        if let Some(serde_json::Value::Array(stops)) = &fields.stop {
            if stops.len() > self.max_stop_strings {
                return Err(ApiError::invalid(
                    "stop",
                    format!(
                        "`stop` has {} strings; this server allows at most {} (--max-stop-strings)",
                        stops.len(),
                        self.max_stop_strings
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A chat request's message count within the limit.
    pub fn check_messages(&self, count: usize) -> Result<(), ApiError> {
        if count > self.max_messages {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "`messages` has {count} messages; this server allows at most {} (--max-messages)",
                    self.max_messages
                ),
            ));
        }
        Ok(())
    }

    /// A prompt's text short enough to be worth tokenizing; `param` names the field it came
    /// from.
    pub fn check_prompt_bytes(&self, text: &str, param: &str) -> Result<(), ApiError> {
        if text.len() > self.max_prompt_bytes {
            return Err(ApiError::ContextLengthExceeded {
                message: format!(
                    "The prompt has {} bytes of text, more than can fit in this model's context \
                     (at most {} bytes, --max-prompt-bytes); it was not tokenized",
                    text.len(),
                    self.max_prompt_bytes
                ),
                param: param.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: serde_json::Value) -> SamplingFields {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn n_and_stop_strings_above_their_limits_are_refused_with_the_field_named() {
        let limits = ApiLimits {
            max_n: 2,
            max_stop_strings: 1,
            ..ApiLimits::default()
        };
        assert!(limits
            .check_sampling(&fields(serde_json::json!({"n": 2})))
            .is_ok());
        let e = limits
            .check_sampling(&fields(serde_json::json!({"n": 3})))
            .unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("n"));
        let e = limits
            .check_sampling(&fields(serde_json::json!({"stop": ["a", "b"]})))
            .unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("stop"));
        assert!(limits
            .check_sampling(&fields(serde_json::json!({"stop": "ab"})))
            .is_ok());
    }

    #[test]
    fn a_prompt_over_the_byte_bound_is_a_context_length_error() {
        let limits = ApiLimits {
            max_prompt_bytes: 4,
            ..ApiLimits::default()
        };
        assert!(limits.check_prompt_bytes("abcd", "prompt").is_ok());
        let e = limits.check_prompt_bytes("abcde", "prompt").unwrap_err();
        assert_eq!(
            e.body().error.code.as_deref(),
            Some("context_length_exceeded")
        );
    }
}
