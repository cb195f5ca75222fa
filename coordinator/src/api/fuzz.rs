//! The request-JSON fuzz property, shared by its two harnesses: the bounded property run below
//! (the stable-toolchain form of fuzzing, run by `cargo test`) and the libFuzzer target
//! `fuzz/fuzz_targets/request_json.rs` (`cargo +nightly fuzz run`; docs/RELIABILITY.md). Not part
//! of the crate's API (hidden from its docs); nothing outside those harnesses calls it.
//!
//! Property ([`check_request_json`]): any request body becomes checked parameters (and a
//! structured-output constraint or none) or a 400 in OpenAI's shape, and never a panic. The
//! proptest feeds any JSON object whose keys are the request fields, with values of any JSON
//! shape; `PROPTEST_CASES` raises its count for longer runs.

use serde_json::Value;

use super::error::RequestBody;
use super::limits::ApiLimits;
use super::protocol::{ChatCompletionRequest, CompletionRequest};
use super::structured::requested_constraint;
use super::validate::{check_params, MaxTokens};

/// Reads `bytes` as the body of a chat and of a completions request the way the handlers do
/// (JSON, then the typed request, then the limit and parameter checks). Panics when a check
/// answers anything but a 400, or panics itself. Bytes that are not a JSON object stop at the
/// body extractor's 400 and are not checked further.
pub fn check_request_json(bytes: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    if !body.is_object() {
        return;
    }
    let limits = ApiLimits::default();
    let max_tokens = |value| MaxTokens {
        value,
        param: "max_tokens",
    };
    let chat = ChatCompletionRequest::from_json(&body).and_then(|r| {
        limits
            .check_messages(r.messages.len())
            .and_then(|()| limits.check_sampling(&r.sampling))
            .and_then(|()| check_params(&r.sampling, max_tokens(r.sampling.max_tokens)))
            .and_then(|_| requested_constraint(&r.sampling).map(drop))
    });
    if let Err(e) = chat {
        assert_eq!(e.status().as_u16(), 400, "chat: {e:?}");
    }
    let completion = CompletionRequest::from_json(&body).and_then(|r| {
        limits
            .check_sampling(&r.sampling)
            .and_then(|()| check_params(&r.sampling, max_tokens(r.sampling.max_tokens)))
            .map(drop)
    });
    if let Err(e) = completion {
        assert_eq!(e.status().as_u16(), 400, "completion: {e:?}");
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::check_request_json;

    /// The fields a request may hold (and a stray one).
    const KEYS: &[&str] = &[
        "model",
        "messages",
        "prompt",
        "n",
        "stop",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "max_tokens",
        "max_completion_tokens",
        "seed",
        "logprobs",
        "top_logprobs",
        "stream",
        "stream_options",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logit_bias",
        "min_tokens",
        "bad_words",
        "prompt_logprobs",
        "echo",
        "priority",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "user",
        "tools",
        "response_format",
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "unknown_field",
    ];

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop_oneof![
                Just(0i64),
                Just(1),
                Just(-1),
                Just(128),
                Just(129),
                Just(i64::MAX)
            ]
            .prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON numbers are finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ]
    }

    fn json() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::vec(("[a-z_]{1,8}", inner), 0..4)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    fn body() -> impl Strategy<Value = Value> {
        prop::collection::vec((prop::sample::select(KEYS), json()), 0..10).prop_map(|kv| {
            Value::Object(
                kv.into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect::<Map<_, _>>(),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_request_json_becomes_checked_params_or_a_400(body in body()) {
            check_request_json(&serde_json::to_vec(&body).unwrap());
        }
    }
}
