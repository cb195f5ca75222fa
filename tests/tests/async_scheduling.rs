//! Async scheduling end to end on the default model: the same concurrent greedy workload gives
//! the same answers with `--async-scheduling` (on the CPU it is off unless asked for) and with
//! `--no-async-scheduling`. A
//! request that its length limit ends reports exactly `max_tokens` completion tokens, although
//! the next plan is made before its last token is known; one that a stop string or an
//! end-of-sequence token ends is not charged the token async scheduling computes after it.

use serde_json::{json, Value};
use tpserve_e2e::{chat_stream_text, metric, post_json, read_sse, Server};

async fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--max-model-len", "1024", "--max-num-batched-tokens", "64"];
    args.extend_from_slice(extra);
    Server::smollm2(&args).await
}

/// How a request is expected to end.
#[derive(Debug, Clone, Copy)]
enum Ends {
    /// At `max_tokens` (end-of-sequence ignored).
    Length(u64),
    /// On a stop string or the end-of-sequence token, with this text.
    Stop(&'static str),
}

struct Case {
    path: &'static str,
    body: Value,
    ends: Ends,
}

/// What a request returned.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    text: String,
    finish_reason: String,
    completion_tokens: u64,
}

fn user(content: &str) -> Value {
    json!([{"role": "user", "content": content}])
}

/// Different lengths (1 and 2 end while the prefill of others is still running), a stop
/// string, an end-of-sequence token, and two streams.
fn cases() -> Vec<Case> {
    let france = "What is the capital of France?";
    let length = |path, mut body: Value, max_tokens: u64, stream: bool| {
        body["model"] = json!("smollm2");
        body["temperature"] = json!(0);
        body["max_tokens"] = json!(max_tokens);
        body["ignore_eos"] = json!(true);
        body["stream"] = json!(stream);
        if stream {
            body["stream_options"] = json!({"include_usage": true});
        }
        Case {
            path,
            body,
            ends: Ends::Length(max_tokens),
        }
    };
    vec![
        length(
            "/v1/completions",
            json!({"prompt": "Once upon a time"}),
            1,
            false,
        ),
        length(
            "/v1/completions",
            json!({"prompt": "The quick brown fox"}),
            2,
            false,
        ),
        length(
            "/v1/completions",
            json!({"prompt": "In 1492, Columbus"}),
            7,
            false,
        ),
        length(
            "/v1/chat/completions",
            json!({"messages": user("Count from one to twenty.")}),
            23,
            true,
        ),
        length(
            "/v1/chat/completions",
            json!({"messages": user("Write a haiku about the sea.")}),
            16,
            true,
        ),
        Case {
            path: "/v1/chat/completions",
            body: json!({"model": "smollm2", "messages": user(france), "temperature": 0, "max_tokens": 40, "stop": [" Paris"]}),
            ends: Ends::Stop("The capital of France is"),
        },
        Case {
            path: "/v1/chat/completions",
            body: json!({"model": "smollm2", "messages": user(france), "temperature": 0, "max_tokens": 40}),
            ends: Ends::Stop("The capital of France is Paris."),
        },
    ]
}

async fn run(http: &reqwest::Client, s: &Server, case: &Case) -> Outcome {
    let url = s.url(case.path);
    let chat = case.path.contains("chat");
    if case.body["stream"] == json!(true) {
        let resp = http.post(url).json(&case.body).send().await.unwrap();
        let (events, done) = read_sse(resp).await;
        assert!(done, "the stream ends with [DONE]");
        let finish_reason = events
            .iter()
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
            .next_back()
            .expect("a chunk with a finish reason")
            .to_string();
        let usage = &events.last().unwrap()["usage"];
        return Outcome {
            text: chat_stream_text(&events, 0),
            finish_reason,
            completion_tokens: usage["completion_tokens"].as_u64().unwrap(),
        };
    }
    let r: Value = post_json(http, url, &case.body).await;
    let choice = &r["choices"][0];
    let text = if chat {
        &choice["message"]["content"]
    } else {
        &choice["text"]
    };
    Outcome {
        text: text.as_str().unwrap_or_else(|| panic!("{r}")).to_string(),
        finish_reason: choice["finish_reason"].as_str().unwrap().to_string(),
        completion_tokens: r["usage"]["completion_tokens"].as_u64().unwrap(),
    }
}

/// Sends every case at once and returns the outcomes, and the tokens the server counted.
async fn workload(extra: &[&str]) -> (Vec<Outcome>, f64) {
    let s = server(extra).await;
    let http = reqwest::Client::new();
    let cases = cases();
    let outcomes = futures::future::join_all(cases.iter().map(|c| run(&http, &s, c))).await;
    let generated = metric(&http, &s, "vllm:generation_tokens_total").await;
    s.stop().await;
    for (case, outcome) in cases.iter().zip(&outcomes) {
        match case.ends {
            Ends::Length(max_tokens) => {
                assert_eq!(outcome.finish_reason, "length", "{outcome:?} ({extra:?})");
                assert_eq!(
                    outcome.completion_tokens, max_tokens,
                    "exactly max_tokens ({extra:?})"
                );
                assert!(!outcome.text.is_empty(), "{extra:?}");
            }
            Ends::Stop(text) => {
                assert_eq!(outcome.finish_reason, "stop", "{outcome:?} ({extra:?})");
                assert_eq!(outcome.text, text, "{extra:?}");
            }
        }
    }
    (outcomes, generated)
}

#[tokio::test]
async fn greedy_outputs_are_the_same_with_and_without_async_scheduling() {
    let (pipelined, pipelined_tokens) = workload(&["--async-scheduling"]).await;
    let (one_at_a_time, one_at_a_time_tokens) = workload(&["--no-async-scheduling"]).await;
    assert_eq!(pipelined, one_at_a_time);
    let charged: u64 = pipelined.iter().map(|o| o.completion_tokens).sum();
    assert_eq!(
        pipelined_tokens, charged as f64,
        "tokens computed after a stop are not counted"
    );
    assert_eq!(pipelined_tokens, one_at_a_time_tokens);
}
