//! Request ids, structured logs and the limits on input, over real HTTP against the real server
//! (SmolLM2 on the CPU): every limit answers in OpenAI's error shape with the right status, a
//! request whose headers or body stop coming gets a 408 and idle connections are closed silently,
//! every response carries `X-Request-Id`, and the logs are JSON
//! lines that name the request id and hold no prompt text or key unless `--log-prompts` is on.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tpserve_e2e::{read_sse, Server};

/// An upper bound on waits, so a broken server fails the test instead of hanging it; never a
/// timing assertion.
const HANG: Duration = Duration::from_secs(60);

async fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--max-model-len", "64"];
    args.extend_from_slice(extra);
    Server::smollm2(&args).await
}

/// Asserts OpenAI's error shape with `status`, `code` and `param`, and an `X-Request-Id`.
async fn expect_error(
    resp: reqwest::Response,
    status: u16,
    code: Option<&str>,
    param: Option<&str>,
) {
    assert_eq!(resp.status().as_u16(), status);
    assert!(resp.headers().contains_key("x-request-id"));
    let body: Value = resp.json().await.expect("a JSON error");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert_eq!(error["code"].as_str(), code, "{body}");
    assert_eq!(error["param"].as_str(), param, "{body}");
}

/// The host and port of `s`.
fn address(s: &Server) -> String {
    s.base_url.trim_start_matches("http://").to_string()
}

/// Reads from `stream` until the server closes it (or `HANG` passes); returns what came.
async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(HANG, stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a `content-length` from `stream`, leaving the connection open.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    loop {
        let n = tokio::time::timeout(HANG, stream.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse::<usize>().ok())
                .expect("a content-length");
            if body.len() >= length {
                return text;
            }
        }
    }
}

/// Asserts that `answer` (raw HTTP) is a 408 with OpenAI's error body naming `flag`, sent with
/// `Connection: close` and an `X-Request-Id`.
fn expect_raw_408(answer: &str, flag: &str) {
    assert!(
        answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{answer}"
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\nconnection: close"), "{answer}");
    assert!(head.contains("\r\nx-request-id: "), "{answer}");
    assert!(
        head.contains("\r\ncontent-type: application/json"),
        "{answer}"
    );
    let body: Value = serde_json::from_str(body).expect("a JSON error body");
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains(flag),
        "{body}"
    );
}

#[tokio::test]
async fn every_limit_answers_in_openais_shape_slow_requests_get_408_and_idle_connections_close() {
    let s = server(&[
        "--max-request-body-bytes",
        "200000",
        "--max-messages",
        "3",
        "--max-n",
        "2",
        "--max-stop-strings",
        "2",
        "--http-header-timeout",
        "1",
        "--http-body-timeout",
        "1",
    ])
    .await;
    let http = reqwest::Client::new();
    let chat = s.url("/v1/chat/completions");
    let completions = s.url("/v1/completions");
    let message = json!({"role": "user", "content": "Hi"});

    // A body over --max-request-body-bytes: 413.
    let big = json!({"model": "smollm2", "prompt": "x".repeat(300_000)});
    let resp = http.post(&completions).json(&big).send().await.unwrap();
    expect_error(resp, 413, Some("payload_too_large"), None).await;

    // More messages than --max-messages.
    let body = json!({"model": "smollm2", "messages": [message, message, message, message]});
    let resp = http.post(&chat).json(&body).send().await.unwrap();
    expect_error(resp, 400, None, Some("messages")).await;

    // `n` over --max-n, and more stop strings than --max-stop-strings.
    let body = json!({"model": "smollm2", "messages": [message], "n": 3});
    let resp = http.post(&chat).json(&body).send().await.unwrap();
    expect_error(resp, 400, None, Some("n")).await;
    let body = json!({"model": "smollm2", "prompt": "Hi", "stop": ["a", "b", "c"]});
    let resp = http.post(&completions).json(&body).send().await.unwrap();
    expect_error(resp, 400, None, Some("stop")).await;
    // At the limits, the same requests run.
    let body =
        json!({"model": "smollm2", "prompt": "Hi", "stop": ["a", "b"], "n": 2, "max_tokens": 2});
    let resp = http.post(&completions).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);

    // A prompt longer than 64 tokens could ever spell is refused before tokenizing, on every
    // route that takes text.
    let long = "word ".repeat(20_000);
    let body = json!({"model": "smollm2", "prompt": long});
    let resp = http.post(&completions).json(&body).send().await.unwrap();
    expect_error(resp, 400, Some("context_length_exceeded"), Some("prompt")).await;
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": long}]});
    let resp = http.post(&chat).json(&body).send().await.unwrap();
    expect_error(resp, 400, Some("context_length_exceeded"), Some("messages")).await;
    let body = json!({"model": "smollm2", "prompt": long});
    let resp = http
        .post(s.url("/tokenize"))
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, Some("context_length_exceeded"), Some("prompt")).await;

    // A body that stops coming: 408 in OpenAI's shape once --http-body-timeout passes.
    let mut stream = TcpStream::connect(address(&s)).await.unwrap();
    stream
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"model\": ",
        )
        .await
        .unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("x-request-id:"),
        "{answer}"
    );

    // Headers that stop coming (slow-loris): 408 in OpenAI's shape, and the connection closes.
    let mut stream = TcpStream::connect(address(&s)).await.unwrap();
    stream
        .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut stream).await;
    expect_raw_408(&answer, "--http-header-timeout");

    // The same on a kept-alive connection whose second request's headers stop coming.
    let mut stream = TcpStream::connect(address(&s)).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
    expect_raw_408(&read_to_close(&mut stream).await, "--http-header-timeout");

    // A first byte that could still start HTTP/2's preface, and then nothing: 408 too.
    let mut stream = TcpStream::connect(address(&s)).await.unwrap();
    stream.write_all(b"P").await.unwrap();
    expect_raw_408(&read_to_close(&mut stream).await, "--http-header-timeout");

    // An idle kept-alive connection is closed after its response, with nothing more.
    let mut stream = TcpStream::connect(address(&s)).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1, "{answer}");

    // A connection that never sends a byte is closed silently.
    let mut stream = TcpStream::connect(address(&s)).await.unwrap();
    assert_eq!(read_to_close(&mut stream).await, "");

    // The server still serves.
    let body = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2});
    let resp = http.post(&completions).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    s.stop().await;
}

/// The prompt text of the log test: it must not appear in the logs without `--log-prompts`.
const SECRET_PROMPT: &str = "The password is swordfish-7731";
const API_KEY: &str = "sk-test-key-9f8e7d";

async fn logged_server(extra: &[&str]) -> (Server, tpserve_e2e::Logs) {
    let mut args = vec![
        "--max-model-len",
        "256",
        "--log-format",
        "json",
        "--api-key",
        API_KEY,
    ];
    args.extend_from_slice(extra);
    Server::smollm2_logged(&args, "debug,h2=warn,hyper=warn,tower=warn,tonic=warn").await
}

#[tokio::test]
async fn request_ids_come_back_everywhere_and_json_logs_name_them_without_prompts_or_keys() {
    let (s, logs) = logged_server(&[]).await;
    let http = reqwest::Client::new();
    let url = s.url("/v1/chat/completions");
    let request = json!({"model": "smollm2", "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3});

    // A client's id comes back and names the completion.
    let resp = http
        .post(&url)
        .bearer_auth(API_KEY)
        .header("X-Request-Id", "client-id-42")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "client-id-42");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["id"], "chatcmpl-client-id-42");

    // Without one, the server makes one; streams carry it too.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let resp = http
        .post(&url)
        .bearer_auth(API_KEY)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let made = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(made.len(), 32, "a fresh uuid: {made}");
    let (events, done) = read_sse(resp).await;
    assert!(done);
    assert_eq!(events[0]["id"], format!("chatcmpl-{made}"));

    // Errors carry it: a refused key, a bad field, and an unusable id (400).
    let resp = http
        .post(&url)
        .header("X-Request-Id", "no-key-1")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-request-id"], "no-key-1");
    let mut bad = request.clone();
    bad["temperature"] = json!(7);
    let resp = http
        .post(&url)
        .bearer_auth(API_KEY)
        .header("X-Request-Id", "bad-temperature-1")
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.headers()["x-request-id"], "bad-temperature-1");
    let resp = http
        .post(&url)
        .bearer_auth(API_KEY)
        .header("X-Request-Id", "has a space")
        .json(&request)
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, None, None).await;

    // A prompt of the wrong type: serde's message quotes it back to the client, never to the logs.
    let resp = http
        .post(&url)
        .bearer_auth(API_KEY)
        .json(&json!({"model": "smollm2", "messages": SECRET_PROMPT}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("swordfish"));

    // The logs: JSON lines; the refusal is logged under its request id; no prompt, no key.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = logs.lines();
    assert!(!lines.is_empty());
    for line in &lines {
        let parsed: Result<Value, _> = serde_json::from_str(line);
        assert!(parsed.is_ok(), "not a JSON log line: {line}");
        assert!(
            !line.contains("swordfish"),
            "prompt text in the logs: {line}"
        );
        assert!(!line.contains(API_KEY), "the API key in the logs: {line}");
    }
    let refusal = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|l| l["fields"]["message"] == "request refused")
        .map(|l| l.to_string());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"request_id\":\"bad-temperature-1\"")),
        "no log line names the request id; a refusal: {refusal:?}"
    );
    s.stop().await;

    // With --log-prompts the prompt is logged, under its request's id.
    let (s, logs) = logged_server(&["--log-prompts"]).await;
    let resp = http
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(API_KEY)
        .header("X-Request-Id", "logged-prompt-1")
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(logs
        .lines()
        .iter()
        .any(|l| l.contains("swordfish") && l.contains("logged-prompt-1")));
    s.stop().await;
}
