//! End to end on the default model: the real `tpserve` binary with real worker processes,
//! talked to over HTTP with a real client. Greedy answers, streaming, errors, the small routes.

use serde_json::{json, Value};
use tpserve_e2e::{chat_stream_text, default_model, post_json, read_sse, Server};

const FRANCE: &str = "What is the capital of France?";
const PARIS: &str = "The capital of France is Paris.";

async fn server(extra: &[&str]) -> Server {
    let mut args = vec!["--max-model-len", "2048", "--max-num-batched-tokens", "128"];
    args.extend_from_slice(extra);
    Server::smollm2(&args).await
}

fn chat(messages: Value, stream: bool) -> Value {
    json!({"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 40, "stream": stream})
}

#[tokio::test]
async fn greedy_chat_answers_paris_streamed_and_not_with_and_without_a_system_message() {
    let s = server(&[]).await;
    let http = reqwest::Client::new();
    for messages in [
        json!([{"role": "user", "content": FRANCE}]),
        json!([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": FRANCE}]),
    ] {
        let r: Value = http
            .post(s.url("/v1/chat/completions"))
            .json(&chat(messages.clone(), false))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(r["choices"][0]["message"]["content"], PARIS, "{r}");
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        let usage = &r["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );

        let mut body = chat(messages, true);
        body["stream_options"] = json!({"include_usage": true});
        let resp = http
            .post(s.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let (events, done) = read_sse(resp).await;
        assert!(done, "the stream ends with [DONE]");
        assert_eq!(chat_stream_text(&events, 0), PARIS);
        // The same counts (the prompt is cached by now, so its cached-token detail may differ).
        let usage = &events.last().unwrap()["usage"];
        for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(
                usage[count], r["usage"][count],
                "the last chunk carries the same {count}"
            );
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn completions_stop_strings_n_and_seeds_behave_like_openai() {
    let s = server(&[]).await;
    let http = reqwest::Client::new();
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "seed": 11, "n": 2});
    let a: Value = post_json(&http, s.url("/v1/completions"), &body).await;
    let b: Value = post_json(&http, s.url("/v1/completions"), &body).await;
    assert_eq!(a["choices"].as_array().unwrap().len(), 2);
    assert_eq!(
        a["choices"], b["choices"],
        "the same seed gives the same samples"
    );
    assert_eq!(a["usage"]["completion_tokens"], 24);
    assert_eq!(a["choices"][0]["finish_reason"], "length");

    // A stop string ends generation and is not part of the text.
    let greedy = json!({"model": "smollm2", "messages": [{"role": "user", "content": FRANCE}], "temperature": 0, "stop": [" Paris"]});
    let r: Value = post_json(&http, s.url("/v1/chat/completions"), &greedy).await;
    assert_eq!(
        r["choices"][0]["message"]["content"],
        "The capital of France is"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    s.stop().await;
}

#[tokio::test]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = server(&[]).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: String| {
        http.post(s.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };

    let r = post("/v1/chat/completions", "{not json".into())
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");

    let r = post(
        "/v1/completions",
        json!({"model": "gpt-9", "prompt": "hi"}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("gpt-9"));

    let long = "hello ".repeat(3000);
    let r = post(
        "/v1/completions",
        json!({"model": "smollm2", "prompt": long, "max_tokens": 10}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let msg = r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("2048") && msg.contains("3001"),
        "both numbers are in the message: {msg}"
    );

    let r = post(
        "/v1/completions",
        json!({"model": "smollm2", "prompt": "hi", "temperature": 7}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["param"],
        "temperature"
    );

    let r = post(
        "/v1/completions",
        json!({"model": "smollm2", "prompt": "hi", "top_p": 0}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);

    // The server is still healthy and answering after all that.
    assert_eq!(
        http.get(s.url("/health")).send().await.unwrap().status(),
        200
    );
    s.stop().await;
}

#[tokio::test]
async fn models_tokenize_and_detokenize_routes_answer() {
    let s = server(&[]).await;
    let http = reqwest::Client::new();
    let m: Value = http
        .get(s.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["data"][0]["id"], "smollm2");
    assert_eq!(m["data"][0]["max_model_len"], 2048);
    // The GGUF's blocks stay quantized on the CPU: Q4_1 layers, the Q8_0 embedding.
    assert_eq!(m["data"][0]["quantization"], "gguf (Q4_1,Q8_0)");
    let t: Value = post_json(
        &http,
        s.url("/tokenize"),
        &json!({"model": "smollm2", "prompt": FRANCE}),
    )
    .await;
    assert_eq!(
        t["tokens"],
        json!([1780, 314, 260, 3575, 282, 4649, 47]),
        "the same ids as HF's tokenizer"
    );
    assert_eq!(t["count"], 7);
    let d: Value = post_json(
        &http,
        s.url("/detokenize"),
        &json!({"model": "smollm2", "tokens": t["tokens"]}),
    )
    .await;
    assert_eq!(d["prompt"], FRANCE);
    s.stop().await;
}

#[tokio::test]
async fn thirty_two_concurrent_streams_each_return_what_they_return_alone() {
    let s = server(&[]).await;
    let http = reqwest::Client::new();
    let prompts: Vec<String> = (0..32)
        .map(|i| format!("Write one sentence about the number {i}."))
        .collect();
    let request = |p: &str| json!({"model": "smollm2", "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 12, "stream": true});
    let mut alone = Vec::new();
    for p in &prompts {
        let (events, done) = read_sse(
            http.post(s.url("/v1/chat/completions"))
                .json(&request(p))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert!(done);
        alone.push(chat_stream_text(&events, 0));
    }
    let together = futures::future::join_all(prompts.iter().map(|p| {
        let http = http.clone();
        let url = s.url("/v1/chat/completions");
        let body = request(p);
        async move {
            let (events, done) = read_sse(http.post(url).json(&body).send().await.unwrap()).await;
            assert!(done);
            chat_stream_text(&events, 0)
        }
    }))
    .await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert!(!a.is_empty());
        assert_eq!(a, t, "prompt {i} differs when batched");
    }
    s.stop().await;
}

/// Runs `tpserve serve` with `args` and returns its exit status and stderr; for start refusals.
fn serve_refused(args: &[&str]) -> String {
    let out = std::process::Command::new(tpserve_e2e::binary("tpserve"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} started: {stderr}");
    stderr
}

#[test]
fn quantization_methods_we_do_not_run_are_refused_at_start_by_name() {
    let model = default_model().display().to_string();
    let err = serve_refused(&["--model", &model, "--quantization", "bitsandbytes"]);
    assert!(
        err.contains("--quantization bitsandbytes is not supported"),
        "{err}"
    );
    let err = serve_refused(&["--model", &model, "--quantization", "awq"]);
    assert!(err.contains("does not fit a GGUF file"), "{err}");
    let err = serve_refused(&["--model", &model, "-q", "gguf", "--dtype", "float32"]);
    assert!(
        err.contains("--quantization gguf") && err.contains("--dtype float32"),
        "{err}"
    );
    // A Hugging Face checkpoint whose config.json says it is GPTQ-quantized, though its weights
    // are not packed.
    let fixture = tpserve_e2e::repo_root().join("tests/fixtures/tiny-llama");
    let dir = std::env::temp_dir().join(format!("tpserve-gptq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["quantization_config"] = json!({"quant_method": "gptq", "bits": 4, "group_size": 128});
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = serve_refused(&["--model", &dir.display().to_string()]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        err.contains("says gptq, but no layer is stored packed"),
        "{err}"
    );
    let err = serve_refused(&["--model", &fixture.display().to_string(), "-q", "gguf"]);
    assert!(err.contains("--quantization gguf needs"), "{err}");
    // FP8 runs on CUDA GPUs of compute capability 8.9 or newer, in bf16/f16 activations, on an
    // unquantized checkpoint (the CPU worker's own refusal is a unit test of its backend).
    let tiny = fixture.display().to_string();
    let err = serve_refused(&["--model", &tiny, "-q", "fp8", "--device", "cpu"]);
    assert!(err.contains("--device cpu"), "{err}");
    let err = serve_refused(&["--model", &tiny, "-q", "fp8", "--dtype", "float32"]);
    assert!(err.contains("--dtype float32"), "{err}");
    let err = serve_refused(&["--model", &model, "-q", "fp8", "--device", "cuda"]);
    assert!(err.contains("GGUF file"), "{err}");
}
