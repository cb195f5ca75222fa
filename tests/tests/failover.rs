//! Losing a worker without restarting the server: SIGKILL one of three worker processes during a
//! long stream. The stream ends promptly with an error, `/health` turns unready and new requests
//! get 503, the supervisor starts fresh workers and the group re-forms, `/health` is ready again,
//! and the same greedy request gives the same answer as before.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tpserve_e2e::{post_json, read_sse, signal, Server};

#[tokio::test]
async fn a_killed_worker_fails_its_requests_fast_and_the_group_re_forms() {
    let s = Server::smollm2(&["--max-model-len", "1024", "-t", "3"]).await;
    let http = reqwest::Client::new();
    let greedy = json!({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0});
    let before: Value = post_json(&http, s.url("/v1/chat/completions"), &greedy).await;
    assert_eq!(
        before["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );

    let long = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0, "max_tokens": 900, "ignore_eos": true, "stream": true});
    let stream = tokio::spawn({
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        async move { read_sse(http.post(url).json(&long).send().await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let workers = s.workers();
    assert_eq!(workers.len(), 3, "three workers run: {workers:?}");
    let killed_at = Instant::now();
    assert!(signal(workers[1], "-KILL"));

    let (events, done) = tokio::time::timeout(Duration::from_secs(20), stream)
        .await
        .expect("the stream ends within 20 s")
        .unwrap();
    assert!(done, "the stream closes properly");
    let error = events
        .iter()
        .find_map(|e| e["error"]["message"].as_str())
        .expect("an error event")
        .to_string();
    assert!(error.contains("worker"), "{error}");
    eprintln!(
        "stream ended {:?} after the kill: {error}",
        killed_at.elapsed()
    );

    // Unready while the group re-forms, then ready again.
    let mut saw_unready = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = http.get(s.url("/health")).send().await.unwrap().status();
        if status == 503 {
            saw_unready = true;
            let r = http
                .post(s.url("/v1/chat/completions"))
                .json(&greedy)
                .send()
                .await
                .unwrap();
            if r.status() == 503 {
                assert!(r.headers().get("retry-after").is_some());
            }
        } else if status == 200 && saw_unready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not re-form within a minute"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ready again {:?} after the kill", killed_at.elapsed());
    let new_workers = s.workers();
    assert_eq!(new_workers.len(), 3);
    assert!(!new_workers.contains(&workers[1]));
    let after: Value = post_json(&http, s.url("/v1/chat/completions"), &greedy).await;
    assert_eq!(
        after["choices"][0]["message"],
        before["choices"][0]["message"]
    );
    s.stop().await;
}
