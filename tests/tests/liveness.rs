//! `/live` (liveness) against `/health` (readiness) with the real binaries. The engine loop is
//! stalled on purpose: one of three workers is stopped with SIGSTOP during a stream, so its peers
//! wait in the all-reduce and the step never comes back. `/live` turns 503 with the code
//! `workers_stalled` while `/health` still follows the workers (none has exited, so it stays 200);
//! after SIGCONT the stream finishes whole and `/live` is 200 again. Then a worker is killed:
//! `/health` turns unready while the group re-forms and ready again after, and `/live` answers 200
//! throughout, so a liveness probe never restarts a coordinator that only waits for its workers.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tpserve_e2e::{chat_stream_text, read_sse, signal, Server};

/// The engine loop may stand still this long before `/live` says so.
const STALL_TIMEOUT_S: &str = "3";

/// A worker stopped with SIGSTOP; continued when dropped, so a failing test leaves nothing frozen.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Self {
        assert!(signal(pid, "-STOP"), "kill -STOP {pid}");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = signal(self.0, "-CONT");
    }
}

/// GETs `path` and returns the status and the body as JSON (null when empty).
async fn probe(http: &reqwest::Client, s: &Server, path: &str) -> (u16, Value) {
    let resp = http.get(s.url(path)).send().await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Polls `path` until it answers `want`, for at most `limit`; returns its last body.
async fn until_status(
    http: &reqwest::Client,
    s: &Server,
    path: &str,
    want: u16,
    limit: Duration,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (status, body) = probe(http, s, path).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} did not answer {want} within {limit:?}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn live_turns_unhealthy_when_a_step_hangs_and_stays_healthy_while_workers_reload() {
    let s = Server::smollm2(&[
        "--max-model-len",
        "1024",
        "-t",
        "3",
        "--engine-stall-timeout",
        STALL_TIMEOUT_S,
    ])
    .await;
    let http = reqwest::Client::new();
    assert_eq!(probe(&http, &s, "/live").await.0, 200);
    assert_eq!(probe(&http, &s, "/health").await.0, 200);

    let long = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about the sea."}],
                      "temperature": 0, "max_tokens": 200, "ignore_eos": true, "stream": true});
    let stream = tokio::spawn({
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        async move { read_sse(http.post(url).json(&long).send().await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let workers = s.workers();
    assert_eq!(workers.len(), 3, "three workers run: {workers:?}");

    // Stall the engine loop: a stopped worker never answers its step.
    let stopped = Stopped::new(workers[1]);
    let body = until_status(&http, &s, "/live", 503, Duration::from_secs(60)).await;
    assert_eq!(body["error"]["code"], "workers_stalled", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("from the workers"), "{message}");
    assert_eq!(
        probe(&http, &s, "/health").await.0,
        200,
        "readiness follows the workers, none of which has exited"
    );

    // Continued: the step comes back, the loop turns, the stream ends whole.
    drop(stopped);
    until_status(&http, &s, "/live", 200, Duration::from_secs(60)).await;
    let (events, done) = tokio::time::timeout(Duration::from_secs(120), stream)
        .await
        .expect("the stream ends")
        .unwrap();
    assert!(done);
    assert!(
        events.iter().all(|e| e.get("error").is_none()),
        "the stalled stream finished without an error"
    );
    assert!(!chat_stream_text(&events, 0).is_empty());

    // A worker dies: unready while the group re-forms, alive all along.
    assert!(signal(workers[0], "-KILL"));
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut saw_unready = false;
    loop {
        let (health, _) = probe(&http, &s, "/health").await;
        let (live, body) = probe(&http, &s, "/live").await;
        assert_eq!(live, 200, "/live while /health is {health}: {body}");
        if health == 503 {
            saw_unready = true;
        } else if health == 200 && saw_unready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not re-form within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}
