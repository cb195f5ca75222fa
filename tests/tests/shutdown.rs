//! Graceful shutdown of the real server: SIGTERM lets running requests finish, refuses new ones,
//! and exits cleanly with its workers; past `--shutdown-timeout`, running requests end with an
//! error instead of hanging.

use std::time::{Duration, Instant};

use serde_json::json;
use tpserve_e2e::{chat_stream_text, read_sse, Server};

async fn server(timeout: &str) -> Server {
    Server::smollm2(&["--max-model-len", "1024", "--shutdown-timeout", timeout]).await
}

fn request(max_tokens: u32) -> serde_json::Value {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0, "max_tokens": max_tokens, "ignore_eos": true, "stream": true})
}

#[tokio::test]
async fn sigterm_lets_a_running_stream_finish_and_then_exits_cleanly() {
    let s = server("60").await;
    let http = reqwest::Client::new();
    let url = s.url("/v1/chat/completions");
    let running = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move { read_sse(http.post(url).json(&request(48)).send().await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A new request is refused: the listener is closed, or the engine answers 503.
    match http.post(&url).json(&request(4)).send().await {
        Ok(r) => assert_eq!(r.status(), 503),
        Err(e) => assert!(e.is_connect() || e.is_request(), "{e}"),
    }
    let (events, done) = running.await.unwrap();
    assert!(done, "the running stream completes");
    let last = events
        .iter()
        .rev()
        .find(|e| e["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(
        last["choices"][0]["finish_reason"], "length",
        "it ran to max_tokens: {last}"
    );
    assert!(!chat_stream_text(&events, 0).is_empty());
    let status = s
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the server exits");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn past_the_shutdown_timeout_running_requests_end_with_an_error() {
    let s = server("1").await;
    let http = reqwest::Client::new();
    let running = tokio::spawn({
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        async move { read_sse(http.post(url).json(&request(900)).send().await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = Instant::now();
    s.terminate();
    let (events, done) = running.await.unwrap();
    assert!(
        done,
        "{:?}",
        events.iter().rev().take(3).collect::<Vec<_>>()
    );
    assert!(
        events.iter().any(|e| e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("shutting down"))),
        "{:?}",
        events.last()
    );
    let status = s
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the server exits");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
}
