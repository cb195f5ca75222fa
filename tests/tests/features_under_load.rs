//! Issue 13's features under load (item 6): log probabilities, sampling controls, structured
//! outputs and tool calls, mixed with plain requests, all at once against one server with
//! prefix caching on (the default; every request shares a long system prompt, so they hit the
//! cache), chunked prefill and a small KV pool, while some streams are cancelled mid-way by
//! their clients. Every request that is not cancelled must end with a 200 and an output that
//! is valid for what it asked (sorted top lists, JSON that follows its schema, calls that parse),
//! and afterwards nothing runs or waits and the KV cache is empty.

use serde_json::{json, Value};
use tpserve_e2e::{
    chat_template, default_model, metric, post_json, read_sse, wait_until_idle, Server,
};

/// Shared by every chat request: ~150 tokens, so each prompt's first blocks are cache hits.
const SYSTEM: &str = "You are a careful assistant for a small bookshop. You answer questions \
about books, authors, opening hours and orders. You are brief and polite. The shop opens at \
nine in the morning and closes at six in the evening, every day but Sunday. It sells new and \
used books, maps and postcards, and it can order any book in print within three days. When \
you do not know something, you say so and offer to ask the owner. Never invent prices.";

/// Requests of each kind run at once; `CANCEL` more streams are dropped after a first chunk.
const PER_KIND: usize = 4;
const CANCEL: usize = 6;

fn person_schema() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": false})
}

fn lookup_tool() -> Value {
    json!({"type": "function", "function": {"name": "find_book",
        "parameters": {"type": "object", "properties": {"title": {"type": "string",
        "maxLength": 24}}, "required": ["title"], "additionalProperties": false}}})
}

fn chat(question: &str, extra: Value) -> Value {
    let mut body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": question}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

/// The kinds of request mixed in the load, each with the check its answer must pass.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Plain,
    LogprobsStreamed,
    Penalties,
    Schema,
    ToolStreamed,
    EchoLogprobs,
}

const KINDS: [Kind; 6] = [
    Kind::Plain,
    Kind::LogprobsStreamed,
    Kind::Penalties,
    Kind::Schema,
    Kind::ToolStreamed,
    Kind::EchoLogprobs,
];

fn request(kind: Kind, i: usize) -> (&'static str, Value) {
    let q = format!("Question {i}: which book would you suggest for a long train ride?");
    let body = match kind {
        Kind::Plain => chat(&q, json!({"ignore_eos": true})),
        Kind::LogprobsStreamed => chat(
            &q,
            json!({"stream": true, "logprobs": true, "top_logprobs": 3}),
        ),
        Kind::Penalties => chat(
            &q,
            json!({"presence_penalty": 0.5, "frequency_penalty": 0.5,
                "repetition_penalty": 1.2, "min_tokens": 8, "bad_words": ["book"],
                "logit_bias": {"2": -5}}),
        ),
        Kind::Schema => chat(
            &format!("Invent customer number {i}."),
            json!({"max_tokens": 64, "response_format": {"type": "json_schema",
                "json_schema": {"name": "person", "schema": person_schema(), "strict": true}}}),
        ),
        Kind::ToolStreamed => chat(
            &q,
            json!({"max_tokens": 48, "stream": true, "tools": [lookup_tool()],
                "tool_choice": "required", "parallel_tool_calls": false}),
        ),
        Kind::EchoLogprobs => {
            return (
                "/v1/completions",
                json!({"model": "smollm2", "prompt": format!("{SYSTEM} {q}"),
                    "max_tokens": 8, "temperature": 0, "logprobs": 2, "echo": true,
                    "prompt_logprobs": 2}),
            )
        }
    };
    ("/v1/chat/completions", body)
}

fn sorted_desc(top: &[Value]) -> bool {
    top.windows(2)
        .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
}

/// Checks that `answer` (the whole JSON, or the streamed events) is valid for `kind`.
fn check(kind: Kind, answer: &Value, events: &[Value]) {
    match kind {
        Kind::Plain => {
            assert_eq!(answer["usage"]["completion_tokens"], 24, "{answer}");
        }
        Kind::LogprobsStreamed => {
            let mut text = String::new();
            let mut entries = 0;
            for e in events {
                let choice = &e["choices"][0];
                text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
                for lp in choice["logprobs"]["content"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let top = lp["top_logprobs"].as_array().unwrap();
                    assert_eq!(top.len(), 3, "{lp}");
                    assert!(sorted_desc(top), "{lp}");
                    assert_eq!(top[0]["token"], lp["token"], "greedy: {lp}");
                    entries += 1;
                }
            }
            assert!(entries > 0 && !text.is_empty(), "{events:?}");
        }
        Kind::Penalties => {
            let usage = &answer["usage"];
            assert!(
                usage["completion_tokens"].as_u64().unwrap() >= 8,
                "{answer}"
            );
            let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
            assert!(
                !text.split_whitespace().any(|w| w == "book"),
                "bad word: {text}"
            );
        }
        Kind::Schema => {
            let c = &answer["choices"][0];
            assert_eq!(c["finish_reason"], "stop", "{answer}");
            let v: Value = serde_json::from_str(c["message"]["content"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("not JSON ({e}): {answer}"));
            let o = v.as_object().unwrap();
            assert_eq!(o.len(), 2, "{v}");
            assert!(o["name"].as_str().unwrap().chars().count() <= 12, "{v}");
            assert!((0..=120).contains(&o["age"].as_i64().unwrap()), "{v}");
        }
        Kind::ToolStreamed => {
            let mut args = String::new();
            let mut names = Vec::new();
            let mut finish = Value::Null;
            for e in events {
                let choice = &e["choices"][0];
                for call in choice["delta"]["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    assert_eq!(call["index"], 0, "one call per choice: {call}");
                    if let Some(name) = call["function"]["name"].as_str() {
                        names.push(name.to_string());
                    }
                    args.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
                }
                if !choice["finish_reason"].is_null() {
                    finish = choice["finish_reason"].clone();
                }
            }
            assert_eq!(names, ["find_book"], "{events:?}");
            assert_eq!(finish, "tool_calls", "{events:?}");
            let v: Value = serde_json::from_str(&args)
                .unwrap_or_else(|e| panic!("arguments not JSON ({e}): {args}"));
            assert!(v["title"].is_string(), "{v}");
        }
        Kind::EchoLogprobs => {
            let c = &answer["choices"][0];
            let lp = &c["logprobs"];
            let n = lp["tokens"].as_array().unwrap().len();
            let usage = &answer["usage"];
            let total = usage["prompt_tokens"].as_u64().unwrap()
                + usage["completion_tokens"].as_u64().unwrap();
            assert_eq!(n as u64, total, "{answer}");
            assert_eq!(lp["token_logprobs"][0], Value::Null);
            let prompt = c["prompt_logprobs"].as_array().unwrap();
            assert_eq!(
                prompt.len() as u64,
                usage["prompt_tokens"].as_u64().unwrap()
            );
        }
    }
}

#[tokio::test]
async fn mixed_feature_requests_under_load_with_cancellations_all_end_valid_and_free_the_cache() {
    let model = default_model();
    let template = chat_template("Qwen-Qwen2.5-7B-Instruct.jinja");
    // 60 blocks of 16 tokens (0.72 MB each): fewer than the 30 requests' ~200 tokens each would
    // need without sharing, so they queue (and may be preempted); 64-token steps split each
    // prompt into several chunks.
    let s = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--served-model-name",
        "smollm2",
        "--max-model-len",
        "512",
        "--max-num-batched-tokens",
        "64",
        "--kv-cache-space",
        "0.0415",
        "--chat-template",
        template.to_str().unwrap(),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ])
    .await;
    let http = reqwest::Client::new();

    let mut tasks = Vec::new();
    for i in 0..PER_KIND {
        for kind in KINDS {
            let (path, body) = request(kind, i);
            let (http, url) = (http.clone(), s.url(path));
            tasks.push(tokio::spawn(async move {
                let resp = http.post(url).json(&body).send().await.unwrap();
                let status = resp.status().as_u16();
                if body["stream"] == true {
                    let (events, done) = read_sse(resp).await;
                    assert_eq!(status, 200, "{kind:?}: {events:?}");
                    assert!(done, "{kind:?}: no [DONE]");
                    check(kind, &Value::Null, &events);
                } else {
                    let answer: Value = resp.json().await.unwrap();
                    assert_eq!(status, 200, "{kind:?}: {answer}");
                    check(kind, &answer, &[]);
                }
            }));
        }
    }
    // Streams that hang up after their first chunk: plain, logprobs, guided and tool calls.
    for i in 0..CANCEL {
        let extra = match i % 4 {
            0 => json!({}),
            1 => json!({"logprobs": true, "top_logprobs": 5}),
            2 => json!({"guided_regex": "[a-z]+( [a-z]+)*"}),
            _ => json!({"tools": [lookup_tool()], "tool_choice": "required"}),
        };
        let mut body = chat(&format!("Tell me a very long story, number {i}."), extra);
        body["stream"] = json!(true);
        body["max_tokens"] = json!(200);
        body["ignore_eos"] = json!(true);
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let mut resp = http.post(url).json(&body).send().await.unwrap();
            if resp.status() != 200 {
                panic!("stream {i} to cancel: {}", resp.text().await.unwrap());
            }
            assert!(resp.chunk().await.unwrap().is_some(), "a first chunk");
            drop(resp);
        }));
    }
    for t in tasks {
        t.await.expect("a request's checks");
    }

    wait_until_idle(&http, &s).await;
    assert!(
        metric(&http, &s, "vllm:prefix_cache_hits_total").await > 0.0,
        "the shared system prompt is served from the prefix cache"
    );
    // Whether the small pool also preempted depends on timing; shown, not asserted.
    let preemptions = metric(&http, &s, "vllm:num_preemptions_total").await;
    eprintln!("preemptions during the load: {preemptions}");
    // The server still answers, and what was cancelled left nothing behind.
    let (path, body) = request(Kind::Schema, 99);
    let answer = post_json(&http, s.url(path), &body).await;
    check(Kind::Schema, &answer, &[]);
    assert_eq!(
        http.get(s.url("/health")).send().await.unwrap().status(),
        200
    );
    s.stop().await;
}
