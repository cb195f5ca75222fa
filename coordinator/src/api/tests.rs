//! Router tests: real axum routing, extractors, validation, tokenizer and chat template, against
//! a scripted stand-in for the engine actor (it owns the command channel and answers `Submit`
//! with events derived from the request). The end-to-end tests with the real engine live in
//! `tests/`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tower::ServiceExt;
use tpserve_modelfile::chat::ChatTemplate;

use super::{router, ApiState, Health};
use crate::engine::handle::EngineCommand;
use crate::engine::{EngineHandle, FinishReason, GenerateEvent, GenerateRequest, Liveness};
use crate::error::EngineError;
use crate::scheduler::SchedulerError;
use crate::served_model::ServedModel;
use crate::structured::GrammarCompiler;

const MAX_MODEL_LEN: u32 = 16;
const MODEL: &str = "tiny";

/// A word-level tokenizer: whitespace-split words, `<s>` prepended when special tokens are added.
fn tokenizer() -> tokenizers::Tokenizer {
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let words = [
        "<unk>",
        "<s>",
        "</s>",
        "<|user|>",
        "<|assistant|>",
        "hello",
        "world",
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "system",
        "hi",
    ];
    let vocab: serde_json::Map<String, Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), json!(i)))
        .collect();
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>"),
                         special(3, "<|user|>"), special(4, "<|assistant|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    spec.to_string().parse().expect("the test tokenizer parses")
}

/// `<s>` then `<|role|> content` per message, then `<|assistant|>` when asked.
fn chat_template() -> ChatTemplate {
    let source = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} \
                  {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";
    ChatTemplate::new(
        source.to_string(),
        Some("<s>".to_string()),
        Some("</s>".to_string()),
    )
    .expect("the test template compiles")
}

/// What the stand-in engine does with one submission.
#[derive(Debug, Clone)]
enum Reply {
    /// Refuse it at admission.
    Refuse(EngineError),
    /// Accept it and send these events; with `hang`, keep the stream open afterwards.
    Events {
        events: Vec<GenerateEvent>,
        hang: bool,
    },
}

/// Chooses the reply to the `n`th submission (from 0) of the test.
type Script = Arc<dyn Fn(usize, &GenerateRequest) -> Reply + Send + Sync>;

/// The default script: an empty delta (which streams must skip), then the prompt's tokens back
/// as text ("word "), one delta each, up to `max_tokens`; `Length` if that cut it, else `Stop`.
fn echo_events(request: &GenerateRequest) -> Vec<GenerateEvent> {
    let tokenizer = tokenizer();
    let take = request
        .prompt_token_ids
        .len()
        .min(request.max_tokens as usize);
    let mut events = vec![GenerateEvent::Delta {
        text: String::new(),
        token_ids: Vec::new(),
        logprobs: None,
        prompt_logprobs: None,
    }];
    for &id in &request.prompt_token_ids[..take] {
        events.push(GenerateEvent::Delta {
            text: format!("{} ", tokenizer.id_to_token(id).unwrap()),
            token_ids: vec![id],
            logprobs: None,
            prompt_logprobs: None,
        });
    }
    let reason = if take == request.max_tokens as usize {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    events.push(GenerateEvent::Finished {
        reason,
        prompt_tokens: request.prompt_token_ids.len() as u32,
        completion_tokens: take as u32,
        cached_tokens: 0,
        embedding: None,
    });
    events
}

fn echo() -> Script {
    Arc::new(|_, r| Reply::Events {
        events: echo_events(r),
        hang: false,
    })
}

struct Harness {
    app: Router,
    /// Every request the engine admitted or refused, in order.
    submitted: mpsc::UnboundedReceiver<GenerateRequest>,
    /// Ids of aborted sequences.
    aborted: mpsc::UnboundedReceiver<u64>,
    health: watch::Sender<Health>,
    /// The engine loop's heartbeat, made `HEARTBEAT_AGE` ago with a stall timeout of
    /// `STALL_TIMEOUT`, and beaten when the harness was built.
    liveness: Liveness,
    /// When `liveness` was made: a beat then is a stalled loop now.
    liveness_origin: Instant,
}

const STALL_TIMEOUT: Duration = Duration::from_secs(30);
const HEARTBEAT_AGE: Duration = Duration::from_secs(60);

fn harness_with(script: Script, chat_template: Option<ChatTemplate>) -> Harness {
    let (commands_tx, mut commands_rx) = mpsc::unbounded_channel();
    let (submitted_tx, submitted) = mpsc::unbounded_channel();
    let (aborted_tx, aborted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut hanging = Vec::new();
        let mut count = 0;
        while let Some(command) = commands_rx.recv().await {
            match command {
                EngineCommand::Submit {
                    request,
                    events,
                    accepted,
                    ..
                } => {
                    let reply = script(count, &request);
                    count += 1;
                    let _ = submitted_tx.send(*request);
                    match reply {
                        Reply::Refuse(e) => {
                            let _ = accepted.send(Err(e));
                        }
                        Reply::Events { events: list, hang } => {
                            let _ = accepted.send(Ok(()));
                            for event in list {
                                let _ = events.send(event);
                            }
                            if hang {
                                hanging.push(events);
                            }
                        }
                    }
                }
                EngineCommand::Abort { id } => {
                    let _ = aborted_tx.send(id);
                }
                EngineCommand::Drain | EngineCommand::AbortAll { .. } => {}
            }
        }
    });
    let (health, health_rx) = watch::channel(Health::Ready);
    let model = ServedModel {
        name: MODEL.to_string(),
        aliases: Vec::new(),
        max_model_len: MAX_MODEL_LEN,
        quantization: "none".into(),
        structured: Arc::new(GrammarCompiler::new(Arc::new(tokenizer()), vec![0])),
        tokenizer: Arc::new(tokenizer()),
        chat_template: chat_template.map(Arc::new),
        tools: crate::tools::ToolConfig::default(),
        created: 1_700_000_000,
        adapters: None,
        task: crate::task::Task::Generate,
        hidden_size: 64,
    };
    let now = Instant::now();
    let liveness_origin = now.checked_sub(HEARTBEAT_AGE).unwrap_or(now);
    let liveness = Liveness::new(liveness_origin, STALL_TIMEOUT);
    liveness.beat(now);
    let app = router(ApiState {
        engine: EngineHandle::new(commands_tx, liveness.clone()),
        model,
        health: health_rx,
        gateway: None,
        limits: crate::api::ApiLimits::default(),
        log_prompts: false,
    });
    Harness {
        app,
        submitted,
        aborted,
        health,
        liveness,
        liveness_origin,
    }
}

fn harness(script: Script) -> Harness {
    harness_with(script, Some(chat_template()))
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of an SSE body, in order.
    fn sse_data(&self) -> Vec<String> {
        let text = std::str::from_utf8(&self.body).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        text.split("\n\n")
            .filter(|event| !event.is_empty())
            .map(|event| {
                event
                    .strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("not a data event: {event:?}"))
                    .to_string()
            })
            .collect()
    }

    /// The JSON chunks of an SSE body (without the final `[DONE]`).
    fn chunks(&self) -> Vec<Value> {
        let data = self.sse_data();
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
        data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    fn assert_error(&self, status: StatusCode, kind: &str, param: Option<&str>) -> String {
        let body = self.json();
        assert_eq!(self.status, status, "{body}");
        let error = &body["error"];
        assert_eq!(error["type"], kind, "{body}");
        assert_eq!(error["param"].as_str(), param, "{body}");
        assert!(error.get("code").is_some(), "{body}");
        error["message"].as_str().unwrap().to_string()
    }
}

async fn send(app: &Router, request: Request<Body>) -> Answer {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(app: &Router, path: &str, body: Value) -> Answer {
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    send(app, request).await
}

async fn get(app: &Router, path: &str) -> Answer {
    send(app, Request::get(path).body(Body::empty()).unwrap()).await
}

fn encode(text: &str, add_special_tokens: bool) -> Vec<u32> {
    tokenizer()
        .encode(text, add_special_tokens)
        .unwrap()
        .get_ids()
        .to_vec()
}

#[tokio::test]
async fn chat_completion_renders_the_template_once_and_answers_openai_style() {
    let mut h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "hello world"}]}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();

    // The template adds `<s>`; tokenizing must not add a second one.
    let prompt = encode("<s><|user|> hello world <|assistant|>", false);
    assert_eq!(prompt, vec![1, 3, 5, 6, 4]);
    let submitted = h.submitted.recv().await.unwrap();
    assert_eq!(submitted.prompt_token_ids, prompt);
    assert_eq!(submitted.max_tokens, MAX_MODEL_LEN - 5);
    assert_eq!(submitted.sampling.temperature, 1.0);
    assert_eq!(submitted.sampling.top_p, 1.0);
    assert!(submitted.skip_special_tokens);

    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(
        body["choices"],
        json!([{
            "index": 0,
            "message": {"role": "assistant", "content": "<s> <|user|> hello world <|assistant|> "},
            "finish_reason": "stop",
            "logprobs": null
        }])
    );
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}})
    );
}

#[tokio::test]
async fn chat_content_parts_are_joined_and_sampling_fields_reach_the_engine() {
    let mut h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}],
            "max_completion_tokens": 3, "max_tokens": 9, "temperature": 0, "top_p": 0.5,
            "top_k": -1, "min_p": 0.1, "seed": 42, "stop": "fox", "stop_token_ids": [2],
            "ignore_eos": true, "skip_special_tokens": false, "priority": -3, "user": "someone",
            "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": false, "n": null
        }),
    )
    .await;
    let body = answer.json();
    assert_eq!(answer.status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    let submitted = h.submitted.recv().await.unwrap();
    assert_eq!(submitted.prompt_token_ids, vec![1, 3, 5, 6, 4]);
    assert_eq!(submitted.max_tokens, 3, "max_completion_tokens wins");
    assert_eq!(submitted.sampling.temperature, 0.0);
    assert_eq!(submitted.sampling.top_p, 0.5);
    assert_eq!(submitted.sampling.top_k, 0);
    assert!((submitted.sampling.min_p - 0.1).abs() < 1e-6);
    assert_eq!(submitted.sampling.seed, Some(42));
    assert_eq!(submitted.stop, vec!["fox".to_string()]);
    assert_eq!(submitted.stop_token_ids, vec![2]);
    assert!(submitted.ignore_eos);
    assert!(!submitted.skip_special_tokens);
    assert_eq!(submitted.priority, -3);
}

#[tokio::test]
async fn chat_with_n_two_answers_both_indexes_with_consecutive_seeds_and_summed_usage() {
    let mut h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hello"}], "n": 2, "seed": 7,
               "max_tokens": 2}),
    )
    .await;
    let body = answer.json();
    assert_eq!(answer.status, StatusCode::OK, "{body}");
    let indexes: Vec<u64> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, vec![0, 1]);
    // Prompt tokens once, completion tokens of both choices.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 0}})
    );
    let seeds = [
        h.submitted.recv().await.unwrap().sampling.seed,
        h.submitted.recv().await.unwrap().sampling.seed,
    ];
    assert_eq!(seeds, [Some(7), Some(8)]);
}

#[tokio::test]
async fn streaming_chat_sends_role_then_content_then_finish_then_done() {
    let h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers[header::CONTENT_TYPE], "text/event-stream");
    let chunks = answer.chunks();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    // <s> <|user|> hi <|assistant|>: four tokens echoed; the engine's empty delta is skipped.
    assert_eq!(
        deltas,
        vec![
            &json!({"role": "assistant", "content": ""}),
            &json!({"content": "<s> "}),
            &json!({"content": "<|user|> "}),
            &json!({"content": "hi "}),
            &json!({"content": "<|assistant|> "}),
            &json!({}),
        ]
    );
    let reasons: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .collect();
    assert!(reasons[..5].iter().all(|r| r.is_null()));
    assert_eq!(reasons[5], "stop");
    let id = &chunks[0]["id"];
    assert!(id.as_str().unwrap().starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(&chunk["id"], id);
        assert!(
            chunk.get("usage").is_none(),
            "no usage without include_usage"
        );
    }
}

#[tokio::test]
async fn streaming_with_include_usage_nulls_usage_until_a_last_usage_only_chunk() {
    let h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true, "n": 2,
               "max_tokens": 3, "stream_options": {"include_usage": true}}),
    )
    .await;
    let chunks = answer.chunks();
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}})
    );
    assert!(rest
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    // Both choices open with a role chunk before any content, and each finishes once.
    let roles: Vec<u64> = rest
        .iter()
        .take_while(|c| c["choices"][0]["delta"].get("role").is_some())
        .map(|c| c["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(roles, vec![0, 1]);
    for index in [0, 1] {
        let of_choice: Vec<&Value> = rest
            .iter()
            .map(|c| &c["choices"][0])
            .filter(|c| c["index"] == index)
            .collect();
        assert_eq!(of_choice.len(), 5, "role, 3 tokens, finish");
        assert_eq!(of_choice.last().unwrap()["finish_reason"], "length");
    }
}

#[tokio::test]
async fn completion_batches_number_choices_prompt_major_and_count_each_prompt_once() {
    let mut h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/completions",
        json!({"model": MODEL, "prompt": [[5, 6], [7]], "n": 2}),
    )
    .await;
    let body = answer.json();
    assert_eq!(answer.status, StatusCode::OK, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    let texts: Vec<(u64, &str)> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
        .collect();
    assert_eq!(
        texts,
        vec![
            (0, "hello world "),
            (1, "hello world "),
            (2, "the "),
            (3, "the ")
        ]
    );
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}})
    );
    // Token prompts go to the engine as given, with no BOS added.
    let prompts: Vec<Vec<u32>> = [(); 4]
        .iter()
        .map(|_| h.submitted.try_recv().unwrap().prompt_token_ids)
        .collect();
    assert_eq!(prompts, vec![vec![5, 6], vec![5, 6], vec![7], vec![7]]);
}

#[tokio::test]
async fn completion_text_prompts_get_special_tokens_and_echo_prepends_the_prompt() {
    let mut h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/completions",
        json!({"prompt": "the quick fox", "echo": true, "max_tokens": 2}),
    )
    .await;
    let body = answer.json();
    assert_eq!(answer.status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "the quick fox<s> the ");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        h.submitted.recv().await.unwrap().prompt_token_ids,
        vec![1, 7, 8, 10]
    );
}

#[tokio::test]
async fn streaming_completions_interleave_choices_and_end_each_with_a_reason() {
    let h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/completions",
        json!({"prompt": ["hello", "dog"], "stream": true, "max_tokens": 5}),
    )
    .await;
    let chunks = answer.chunks();
    for chunk in &chunks {
        assert_eq!(chunk["object"], "text_completion");
    }
    for (index, expected) in [(0, "<s> hello "), (1, "<s> dog ")] {
        let of_choice: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0])
            .filter(|c| c["index"] == index)
            .collect();
        let text: String = of_choice
            .iter()
            .map(|c| c["text"].as_str().unwrap())
            .collect();
        assert_eq!(text, expected);
        let (finish, deltas) = of_choice.split_last().unwrap();
        assert_eq!(finish["finish_reason"], "stop");
        assert_eq!(finish["text"], "");
        assert!(deltas
            .iter()
            .all(|c| c["finish_reason"].is_null() && c["text"] != ""));
    }
}

#[tokio::test]
async fn malformed_bodies_are_400s_in_openai_shape() {
    let h = harness(echo());
    let syntax = send(
        &h.app,
        Request::post("/v1/chat/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{\"messages\": ["))
            .unwrap(),
    )
    .await;
    syntax.assert_error(StatusCode::BAD_REQUEST, "invalid_request_error", None);
    assert_eq!(syntax.headers[header::CONTENT_TYPE], "application/json");

    let no_content_type = send(
        &h.app,
        Request::post("/v1/completions")
            .body(Body::from(json!({"prompt": "hi"}).to_string()))
            .unwrap(),
    )
    .await;
    let message =
        no_content_type.assert_error(StatusCode::BAD_REQUEST, "invalid_request_error", None);
    assert!(message.contains("Content-Type"), "{message}");

    let wrong_type = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
    )
    .await;
    let message = wrong_type.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("temperature"),
    );
    assert!(message.contains("invalid type"), "{message}");

    let nested = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": 5, "content": "hi"}]}),
    )
    .await;
    nested.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("messages[0].role"),
    );

    let not_an_object = post(&h.app, "/v1/completions", json!(["tiny", "hi"])).await;
    not_an_object.assert_error(StatusCode::BAD_REQUEST, "invalid_request_error", None);

    let missing = post(&h.app, "/v1/chat/completions", json!({"model": MODEL})).await;
    let message = missing.assert_error(StatusCode::BAD_REQUEST, "invalid_request_error", None);
    assert!(message.contains("messages"), "{message}");
}

#[tokio::test]
async fn an_unknown_model_is_404_model_not_found() {
    let h = harness(echo());
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let answer = post(
            &h.app,
            path,
            json!({"model": "gpt-5", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        let message = answer.assert_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model"),
        );
        assert_eq!(message, "The model `gpt-5` does not exist.");
        assert_eq!(answer.json()["error"]["code"], "model_not_found");
    }
    let answer = get(&h.app, "/v1/models/gpt-5").await;
    answer.assert_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("model"),
    );
}

#[tokio::test]
async fn a_prompt_plus_max_tokens_past_the_context_is_400_with_both_numbers() {
    let mut h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 12}),
    )
    .await;
    let message = answer.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("max_tokens"),
    );
    assert_eq!(
        message,
        "This model's maximum context length is 16 tokens. However, you requested 17 tokens \
         (5 in the messages, 12 in the completion). Please reduce the length of the messages or \
         completion."
    );
    assert_eq!(answer.json()["error"]["code"], "context_length_exceeded");

    let fits = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 11}),
    )
    .await;
    assert_eq!(fits.status, StatusCode::OK);
    assert_eq!(h.submitted.recv().await.unwrap().max_tokens, 11);
    assert!(
        h.submitted.try_recv().is_err(),
        "the refused one never reached the engine"
    );
}

#[tokio::test]
async fn a_prompt_that_fills_the_context_alone_is_400_with_its_length() {
    let h = harness(echo());
    let prompt: Vec<u32> = vec![5; MAX_MODEL_LEN as usize];
    let answer = post(&h.app, "/v1/completions", json!({"prompt": prompt})).await;
    let message = answer.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("prompt"),
    );
    assert!(message.contains("16 tokens"), "{message}");
    assert!(message.contains("has 16 tokens"), "{message}");

    let empty = post(&h.app, "/v1/completions", json!({"prompt": []})).await;
    let message = empty.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("prompt"),
    );
    assert_eq!(message, "The prompt is empty.");

    let out_of_vocab = post(&h.app, "/v1/completions", json!({"prompt": [5, 999]})).await;
    let message = out_of_vocab.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("prompt"),
    );
    assert!(message.contains("999"), "{message}");
}

#[tokio::test]
async fn invalid_sampling_values_are_400s_naming_the_param() {
    let h = harness(echo());
    let cases = [
        (json!({"temperature": 3}), "temperature"),
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"top_k": -2}), "top_k"),
        (json!({"min_p": 1.5}), "min_p"),
        (json!({"n": 0}), "n"),
        (json!({"n": 129}), "n"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (
            json!({"max_completion_tokens": -1}),
            "max_completion_tokens",
        ),
        (json!({"stop": 5}), "stop"),
        (json!({"stop": ["a", 1]}), "stop"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "stream_options",
        ),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            json!({"logprobs": true, "top_logprobs": -1}),
            "top_logprobs",
        ),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"repetition_penalty": 0}), "repetition_penalty"),
        (json!({"logit_bias": {"5": 101}}), "logit_bias"),
        (json!({"logit_bias": {"99999999": 1}}), "logit_bias"),
        (json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"min_tokens": -1}), "min_tokens"),
        (json!({"min_tokens": 5, "max_tokens": 2}), "min_tokens"),
        (json!({"prompt_logprobs": 21}), "prompt_logprobs"),
        (
            json!({"prompt_logprobs": 1, "stream": true}),
            "prompt_logprobs",
        ),
        (
            json!({"tools": [{"type": "function"}]}),
            "tools[0].function",
        ),
        (
            json!({"response_format": {"type": "yaml"}}),
            "response_format",
        ),
        (
            json!({"guided_regex": "a", "guided_choice": ["a"]}),
            "guided_choice",
        ),
    ];
    for (fields, param) in cases {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let answer = post(&h.app, "/v1/chat/completions", body).await;
        answer.assert_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some(param),
        );
    }
    let temperature = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}),
    )
    .await;
    assert_eq!(
        temperature.json()["error"]["message"],
        "`temperature` must be between 0 and 2, got 3"
    );
    let logprobs = post(
        &h.app,
        "/v1/completions",
        json!({"prompt": "hi", "logprobs": 21}),
    )
    .await;
    let message = logprobs.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("logprobs"),
    );
    assert!(message.contains("between 0 and 20, got 21"), "{message}");
}

#[tokio::test]
async fn chat_refuses_non_text_parts_and_models_without_a_template() {
    let h = harness(echo());
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
    )
    .await;
    let message = answer.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("messages[0].content"),
    );
    assert!(message.contains("image_url"), "{message}");

    let empty = post(&h.app, "/v1/chat/completions", json!({"messages": []})).await;
    empty.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("messages"),
    );

    let h = harness_with(echo(), None);
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let message = answer.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("messages"),
    );
    assert!(message.contains("no chat template"), "{message}");
}

/// A plain completion, streamed or not, on a harness whose engine refuses every request.
async fn refused_completion(h: &Harness, stream: bool) -> Answer {
    post(
        &h.app,
        "/v1/completions",
        json!({"prompt": "hi", "stream": stream}),
    )
    .await
}

#[tokio::test]
async fn a_full_queue_is_429_and_an_unavailable_engine_503_both_with_retry_after() {
    for (error, status, kind) in [
        (
            EngineError::QueueFull { waiting: 4 },
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
        ),
        (
            EngineError::Unavailable {
                detail: "worker 1 is down".into(),
            },
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
        ),
    ] {
        let refusal = error.clone();
        let h = harness(Arc::new(move |_, _| Reply::Refuse(refusal.clone())));
        for stream in [false, true] {
            let answer = refused_completion(&h, stream).await;
            let message = answer.assert_error(status, kind, None);
            assert_eq!(message, error.to_string());
            let retry_after = answer.headers[header::RETRY_AFTER].to_str().unwrap();
            assert!(retry_after.parse::<u32>().unwrap() >= 1);
        }
    }
}

#[tokio::test]
async fn a_request_the_kv_cache_cannot_hold_keeps_the_context_length_code() {
    // The engine's own check (the scheduler: prompt plus max_tokens against the pool), after the
    // API's max-model-len check passed: the code clients trim their input on must survive it.
    let refusal = EngineError::from(SchedulerError::ExceedsKvCache {
        tokens: 300,
        blocks_needed: 19,
        block_size: 16,
        num_blocks: 10,
    });
    let h = harness(Arc::new(move |_, _| Reply::Refuse(refusal.clone())));
    for stream in [false, true] {
        let answer = refused_completion(&h, stream).await;
        let message = answer.assert_error(StatusCode::BAD_REQUEST, "invalid_request_error", None);
        assert!(message.contains("the pool has 10 blocks"), "{message}");
        assert_eq!(answer.json()["error"]["code"], "context_length_exceeded");
    }
    let other = EngineError::from(SchedulerError::DuplicateId { id: 3 });
    assert!(
        matches!(other, EngineError::InvalidRequest { .. }),
        "{other:?}"
    );
}

#[tokio::test]
async fn a_refused_sibling_aborts_the_sequences_already_admitted() {
    // The second of n=3 is refused: the first, admitted and hanging, must be aborted.
    let mut h = harness(Arc::new(|count, r| match count {
        1 => Reply::Refuse(EngineError::QueueFull { waiting: 1 }),
        _ => Reply::Events {
            events: echo_events(r)[..2].to_vec(),
            hang: true,
        },
    }));
    let answer = post(&h.app, "/v1/completions", json!({"prompt": "hi", "n": 3})).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h.aborted.recv().await, Some(1));
    assert_eq!(h.submitted.len(), 2, "the third was never submitted");
}

#[tokio::test]
async fn a_failed_sequence_fails_the_whole_request_and_aborts_the_others() {
    let mut h = harness(Arc::new(|count, _| {
        if count == 1 {
            Reply::Events {
                events: vec![GenerateEvent::Error(EngineError::WorkerFailed {
                    detail: "rank 1 lost".into(),
                })],
                hang: false,
            }
        } else {
            // Never finishes: only the sibling's failure can end the request.
            Reply::Events {
                events: Vec::new(),
                hang: true,
            }
        }
    }));
    let answer = post(&h.app, "/v1/completions", json!({"prompt": "hi", "n": 2})).await;
    let message = answer.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", None);
    assert!(message.contains("rank 1 lost"), "{message}");
    assert_eq!(h.aborted.recv().await, Some(1));
}

#[tokio::test]
async fn an_engine_error_midstream_sends_an_error_event_then_done() {
    let h = harness(Arc::new(|_, _| Reply::Events {
        events: vec![
            GenerateEvent::Delta {
                text: "hello".into(),
                token_ids: vec![5],
                logprobs: None,
                prompt_logprobs: None,
            },
            GenerateEvent::Error(EngineError::WorkerFailed {
                detail: "rank 0 lost".into(),
            }),
        ],
        hang: false,
    }));
    let answer = post(
        &h.app,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let chunks = answer.chunks();
    assert_eq!(chunks.len(), 3, "{chunks:?}");
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "hello");
    let error = &chunks[2]["error"];
    assert_eq!(error["type"], "server_error");
    assert!(error["message"].as_str().unwrap().contains("rank 0 lost"));
}

#[tokio::test]
async fn a_client_that_disconnects_midstream_aborts_its_sequence() {
    let mut h = harness(Arc::new(|_, r| Reply::Events {
        events: echo_events(r)[..2].to_vec(),
        hang: true,
    }));
    let request = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"prompt": "hi", "stream": true}).to_string(),
        ))
        .unwrap();
    let response = h.app.clone().oneshot(request).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("<s>"));
    assert!(
        h.aborted.try_recv().is_err(),
        "nothing aborted while the client listens"
    );
    drop(body);
    let aborted = tokio::time::timeout(Duration::from_secs(5), h.aborted.recv()).await;
    assert_eq!(aborted.unwrap(), Some(1));
}

#[tokio::test]
async fn health_follows_the_watch_channel() {
    let h = harness(echo());
    let ready = get(&h.app, "/health").await;
    assert_eq!(ready.status, StatusCode::OK);
    assert!(ready.body.is_empty());

    h.health.send_replace(Health::NotReady {
        reason: "worker 1 is down".into(),
    });
    let down = get(&h.app, "/health").await;
    let message = down.assert_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable_error",
        None,
    );
    assert!(message.contains("worker 1 is down"), "{message}");
    assert!(down.headers.contains_key(header::RETRY_AFTER));

    h.health.send_replace(Health::Ready);
    assert_eq!(get(&h.app, "/health").await.status, StatusCode::OK);
}

#[tokio::test]
async fn live_follows_the_engine_heartbeat_and_not_the_workers_readiness() {
    let h = harness(echo());
    assert!(
        h.liveness_origin + STALL_TIMEOUT < Instant::now(),
        "the harness's heartbeat must be old enough to look stalled"
    );
    let alive = get(&h.app, "/live").await;
    assert_eq!(alive.status, StatusCode::OK);
    assert!(alive.body.is_empty());

    // Workers down (a group re-forming): unready, but alive.
    h.health.send_replace(Health::NotReady {
        reason: "worker 1 is down".into(),
    });
    assert_eq!(
        get(&h.app, "/health").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&h.app, "/live").await.status, StatusCode::OK);
    h.health.send_replace(Health::Ready);

    // Waiting on the workers for step 7 since long before the timeout: stalled on them.
    let waiting = h.liveness.wait_on_workers(h.liveness_origin, 7);
    let stalled = get(&h.app, "/live").await;
    let message = stalled.assert_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "service_unavailable_error",
        None,
    );
    assert_eq!(stalled.json()["error"]["code"], "workers_stalled");
    assert!(message.contains("step 7"), "{message}");
    assert!(message.contains("--engine-stall-timeout 30"), "{message}");
    assert_eq!(get(&h.app, "/health").await.status, StatusCode::OK);

    // The step came back: alive again.
    drop(waiting);
    assert_eq!(get(&h.app, "/live").await.status, StatusCode::OK);

    // No beat for as long, with no step outstanding: the engine itself is stuck.
    h.liveness.beat(h.liveness_origin);
    let stuck = get(&h.app, "/live").await;
    assert_eq!(stuck.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(stuck.json()["error"]["code"], "engine_stalled");
}

#[tokio::test]
async fn models_lists_the_served_model() {
    let h = harness(echo());
    let expected = json!({"id": MODEL, "object": "model", "created": 1_700_000_000u64,
                          "owned_by": "tpserve", "root": MODEL, "parent": null,
                          "max_model_len": MAX_MODEL_LEN, "quantization": "none"});
    let list = get(&h.app, "/v1/models").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(
        list.json(),
        json!({"object": "list", "data": [expected.clone()]})
    );
    let one = get(&h.app, &format!("/v1/models/{MODEL}")).await;
    assert_eq!(one.json(), expected);
}

#[tokio::test]
async fn tokenize_and_detokenize_round_trip_as_vllm_does() {
    let h = harness(echo());
    let prompt = post(
        &h.app,
        "/tokenize",
        json!({"model": MODEL, "prompt": "hello world"}),
    )
    .await;
    assert_eq!(
        prompt.json(),
        json!({"count": 3, "max_model_len": MAX_MODEL_LEN, "tokens": [1, 5, 6]})
    );
    let bare = post(
        &h.app,
        "/tokenize",
        json!({"prompt": "hello world", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(bare.json()["tokens"], json!([5, 6]));
    let chat = post(
        &h.app,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(chat.json()["tokens"], json!([1, 3, 16, 4]));
    let no_generation_prompt = post(
        &h.app,
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": false}),
    )
    .await;
    assert_eq!(no_generation_prompt.json()["tokens"], json!([1, 3, 16]));
    let neither = post(&h.app, "/tokenize", json!({})).await;
    neither.assert_error(StatusCode::BAD_REQUEST, "invalid_request_error", None);

    let text = post(&h.app, "/detokenize", json!({"tokens": [1, 5, 6]})).await;
    assert_eq!(text.json(), json!({"prompt": "<s> hello world"}));
    let bad = post(&h.app, "/detokenize", json!({"tokens": [5, 17]})).await;
    bad.assert_error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        Some("tokens"),
    );
    let unknown = post(&h.app, "/detokenize", json!({"model": "x", "tokens": [5]})).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_openai_shape() {
    let h = harness(echo());
    let missing = post(&h.app, "/v1/audio/speech", json!({})).await;
    let message = missing.assert_error(StatusCode::NOT_FOUND, "invalid_request_error", None);
    assert_eq!(message, "Invalid URL (POST /v1/audio/speech)");
    // `/v1/embeddings` exists; a generate server answers it with vLLM's 400.
    let embed = post(&h.app, "/v1/embeddings", json!({"input": "hi"})).await;
    let message = embed.assert_error(StatusCode::BAD_REQUEST, "invalid_request_error", None);
    assert_eq!(message, "The model does not support Embeddings API");
    let wrong_method = get(&h.app, "/v1/chat/completions").await;
    wrong_method.assert_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        None,
    );
}
