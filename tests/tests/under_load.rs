//! Serving under pressure, end to end on the default model: preemption when KV blocks run out,
//! cancellation by disconnect, admission control, and the Prometheus metrics that show them.

use std::time::Duration;

use serde_json::{json, Value};
use tpserve_e2e::{chat_stream_text, metric, post_json, read_sse, wait_until_idle, Server};

async fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--max-num-batched-tokens", "128"];
    args.extend_from_slice(extra);
    Server::smollm2(&args).await
}

fn chat(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens, "stream": stream, "ignore_eos": true})
}

#[tokio::test]
async fn preempted_requests_finish_with_the_text_they_give_uninterrupted() {
    // 20 blocks of 16 tokens (0.72 MB each at TP=1): eight requests of ~80 tokens need 40.
    let s = server(&[
        "--max-model-len",
        "256",
        "--kv-cache-space",
        "0.0138",
        "--max-num-seqs",
        "8",
    ])
    .await;
    let http = reqwest::Client::new();
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Tell me a short story about a cat named Tom number {i}."))
        .collect();
    let mut alone = Vec::new();
    for p in &prompts {
        let r: Value = post_json(&http, s.url("/v1/chat/completions"), &chat(p, 40, false)).await;
        alone.push(
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(metric(&http, &s, "vllm:num_preemptions_total").await, 0.0);
    let together = futures::future::join_all(prompts.iter().map(|p| {
        let (http, url, body) = (
            http.clone(),
            s.url("/v1/chat/completions"),
            chat(p, 40, false),
        );
        async move {
            let r: Value = post_json(&http, url, &body).await;
            r["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_else(|| panic!("{r}"))
                .to_string()
        }
    }))
    .await;
    assert!(
        metric(&http, &s, "vllm:num_preemptions_total").await > 0.0,
        "the pool is too small for all eight: some must be preempted"
    );
    assert_eq!(alone, together);
    wait_until_idle(&http, &s).await;
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_aborts_its_request_and_frees_its_blocks() {
    let s = server(&["--max-model-len", "1024"]).await;
    let http = reqwest::Client::new();
    for stream in [true, false] {
        let mut body = chat("Count from one to one thousand.", 900, stream);
        body["max_tokens"] = json!(900);
        let request = http.post(s.url("/v1/chat/completions")).json(&body).send();
        // Give it time to start decoding, then hang up.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let resp = request.await.unwrap();
            let _ = resp.bytes().await;
        })
        .await;
        wait_until_idle(&http, &s).await;
    }
    assert!(metric(&http, &s, "vllm:generation_tokens_total").await > 0.0);
    assert_eq!(
        http.get(s.url("/health")).send().await.unwrap().status(),
        200
    );
    s.stop().await;
}

#[tokio::test]
async fn a_full_waiting_queue_answers_429_and_every_accepted_request_completes() {
    let s = server(&[
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "1",
        "--max-waiting-requests",
        "1",
    ])
    .await;
    let http = reqwest::Client::new();
    let results = futures::future::join_all((0..6).map(|i| {
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        async move {
            let resp = http
                .post(url)
                .json(&chat(&format!("Say hello {i}."), 24, true))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry_after = resp.headers().get("retry-after").is_some();
            if status == 200 {
                let (events, done) = read_sse(resp).await;
                assert!(done);
                (status, retry_after, chat_stream_text(&events, 0))
            } else {
                let e: Value = resp.json().await.unwrap();
                assert_eq!(e["error"]["type"], "rate_limit_error", "{e}");
                (status, retry_after, String::new())
            }
        }
    }))
    .await;
    let accepted: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(accepted.len() + refused.len(), 6, "{results:?}");
    assert!(
        !refused.is_empty(),
        "with room for one running and one waiting, some of six are refused"
    );
    assert!(refused.iter().all(|r| r.1), "429 carries Retry-After");
    assert!(
        accepted.len() >= 2 && accepted.iter().all(|r| !r.2.is_empty()),
        "{accepted:?}"
    );
    wait_until_idle(&http, &s).await;
    s.stop().await;
}
