//! The tenant gateway over real HTTP against the real server and model: keys and their statuses
//! (401, 403, 404, 429, 503) with OpenAI's error bodies; routing by feature, A/B split (a
//! thousand users, sticky), tenant default and tier, with the route headers; the fallback;
//! quotas tripping for one tenant only; usage totals equal to what the clients were told after
//! a mixed run with cancellations; a policy file reloaded (an invalid one refused). And two
//! coordinators on one real etcd applying a policy change made there.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tpserve_e2e::{binary, default_model, read_sse, start_etcd, Server};

const NAMES: &str = "smollm2,smollm2-summarize,smollm2-exp";

/// The `sha256:` hash of `key`, from `tpserve gateway hash-key --stdin`.
fn hash(key: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(binary("tpserve"))
        .args(["gateway", "hash-key", "--stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(key.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn policy() -> String {
    format!(
        r#"admin_key_hashes: ["{admin}"]
tiers:
  free: {{weight: 1, route: smollm2-exp}}
tenants:
  acme:
    key_hashes: ["{acme}", "{acme2}"]
    models: [smollm2, smollm2-summarize, smollm2-exp, smollm2-retired]
    features: {{summarize: smollm2-summarize}}
    limits: {{max_tokens: 64}}
    experiment:
      name: exp
      variants: [{{name: control, route: smollm2, weight: 50}}, {{name: treatment, route: smollm2-exp, weight: 50}}]
  beta:
    key_hashes: ["{beta}"]
    tier: free
    models: [smollm2, smollm2-exp]
    limits: {{requests_per_second: 0.001, max_tokens: 4}}
  gamma:
    key_hashes: ["{gamma}"]
    default_route: smollm2-retired
    fallback: smollm2
    limits: {{tokens_per_minute: 10}}
  delta:
    key_hashes: ["{delta}"]
    models: [smollm2-retired]
    default_route: smollm2-retired
    limits: {{max_concurrent_requests: 1}}
  eps:
    key_hashes: ["{eps}"]
"#,
        admin = hash("admin-key"),
        acme = hash("acme-key"),
        acme2 = hash("acme-key-2"),
        beta = hash("beta-key"),
        gamma = hash("gamma-key"),
        delta = hash("delta-key"),
        eps = hash("eps-key"),
    )
}

fn chat(max_tokens: u32) -> Value {
    json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": max_tokens, "temperature": 0})
}

async fn send(
    http: &reqwest::Client,
    s: &Server,
    key: Option<&str>,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = http.post(s.url("/v1/chat/completions")).json(body);
    if let Some(key) = key {
        r = r.bearer_auth(key);
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

/// Status, error code, and the header `name`.
async fn status_code(resp: reqwest::Response, name: &str) -> (u16, Option<String>, Option<String>) {
    let status = resp.status().as_u16();
    let header = resp
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.unwrap();
    if status >= 400 {
        let e = &body["error"];
        assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
    }
    (
        status,
        body["error"]["code"].as_str().map(str::to_string),
        header,
    )
}

fn usage_of(v: &Value) -> (u64, u64) {
    (
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn tenants_get_their_routes_limits_errors_and_exact_usage() {
    let dir = std::env::temp_dir().join(format!("tpserve-gateway-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let policy_path = dir.join("policy.yaml");
    let log_path = dir.join("usage.jsonl");
    std::fs::write(&policy_path, policy()).unwrap();
    let model = default_model();
    let s = Server::start(&[
        "--model",
        model.to_str().unwrap(),
        "--served-model-name",
        NAMES,
        "--max-model-len",
        "1024",
        "--gateway-config",
        policy_path.to_str().unwrap(),
        "--gateway-usage-log",
        log_path.to_str().unwrap(),
        "--gateway-reload-interval",
        "0.2",
        "--scheduling-policy",
        "fair",
    ])
    .await;
    let http = reqwest::Client::new();

    // Keys.
    let (st, code, _) = status_code(send(&http, &s, None, &chat(1), &[]).await, "").await;
    assert_eq!((st, code.as_deref()), (401, Some("invalid_api_key")));
    let (st, _, _) = status_code(send(&http, &s, Some("nope"), &chat(1), &[]).await, "").await;
    assert_eq!(st, 401);
    let mut not_allowed = chat(1);
    not_allowed["model"] = json!("smollm2-summarize");
    let (st, code, _) = status_code(
        send(&http, &s, Some("delta-key"), &not_allowed, &[]).await,
        "",
    )
    .await;
    assert_eq!((st, code.as_deref()), (403, Some("model_not_allowed")));
    let mut retired = chat(1);
    retired["model"] = json!("smollm2-retired");
    let (st, code, _) =
        status_code(send(&http, &s, Some("acme-key"), &retired, &[]).await, "").await;
    assert_eq!((st, code.as_deref()), (404, Some("model_not_found")));
    let usage = |key: &'static str| {
        let http = http.clone();
        let url = s.url("/v1/usage");
        async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(usage("acme-key").await, 403);
    assert_eq!(usage("nope").await, 401);
    assert_eq!(usage("admin-key").await, 200);
    assert_eq!(
        send(&http, &s, Some("admin-key"), &chat(1), &[])
            .await
            .status(),
        401,
        "admin keys run nothing"
    );

    // Routing: feature, tier, fallback, 503 without one, explicit.
    let r = send(
        &http,
        &s,
        Some("acme-key"),
        &chat(1),
        &[("x-feature", "summarize")],
    )
    .await;
    assert_eq!(r.headers()["x-tpserve-route"], "feature:summarize");
    assert_eq!(r.headers()["x-tpserve-target"], "smollm2-summarize");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["model"], "smollm2-summarize");
    let r = send(&http, &s, Some("beta-key"), &chat(1), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tpserve-route"], "tier:free");
    assert_eq!(r.headers()["x-tpserve-target"], "smollm2-exp");
    let r = send(&http, &s, Some("gamma-key"), &chat(1), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tpserve-target"], "smollm2");
    assert_eq!(r.headers()["x-tpserve-fallback-from"], "smollm2-retired");
    let (st, code, retry) = status_code(
        send(&http, &s, Some("delta-key"), &chat(1), &[]).await,
        "retry-after",
    )
    .await;
    assert_eq!((st, code.as_deref()), (503, Some("model_unavailable")));
    assert!(retry.is_some());
    let mut explicit = chat(1);
    explicit["model"] = json!("smollm2-exp");
    let r = send(&http, &s, Some("acme-key-2"), &explicit, &[]).await;
    assert_eq!(r.headers()["x-tpserve-route"], "explicit");
    let (st, code, _) =
        status_code(send(&http, &s, Some("acme-key"), &chat(100), &[]).await, "").await;
    assert_eq!((st, code), (400, None), "above the tenant's max_tokens cap");

    // A/B: a thousand users, each always on one variant, split within 3 points of 50/50.
    let mut first: HashMap<String, String> = HashMap::new();
    let users: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let assign = |user: String| {
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        async move {
            let mut body = chat(1);
            body["user"] = json!(user);
            let r = http
                .post(url)
                .bearer_auth("acme-key")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.headers()["x-tpserve-route"], "experiment:exp");
            let variant = r.headers()["x-tpserve-variant"]
                .to_str()
                .unwrap()
                .to_string();
            (user, variant)
        }
    };
    let mut assigned =
        futures::stream::iter(users.iter().cloned().map(assign)).buffer_unordered(16);
    while let Some((user, variant)) = assigned.next().await {
        first.insert(user, variant);
    }
    drop(assigned);
    let treatment = first.values().filter(|v| *v == "treatment").count();
    assert!(
        (470..=530).contains(&treatment),
        "treatment got {treatment} of 1000"
    );
    for user in users.iter().take(50) {
        let (u, variant) = assign(user.clone()).await;
        assert_eq!(first[&u], variant, "{u} stays on its variant");
    }
    // The header names the user when the body does not.
    let mut by_header = chat(1);
    by_header["user"] = Value::Null;
    let r = send(
        &http,
        &s,
        Some("acme-key"),
        &by_header,
        &[("x-user-id", "user-7")],
    )
    .await;
    assert_eq!(
        r.headers()["x-tpserve-variant"].to_str().unwrap(),
        first["user-7"]
    );

    // Quotas trip for one tenant only.
    let (st, code, retry) = status_code(
        send(&http, &s, Some("beta-key"), &chat(1), &[]).await,
        "retry-after",
    )
    .await;
    assert_eq!(
        (st, code.as_deref()),
        (429, Some("rate_limit_exceeded")),
        "rps"
    );
    assert!(retry.unwrap().parse::<u32>().unwrap() >= 1);
    // Gamma's one request (the fallback above) used more than its 10 tokens a minute.
    let r = send(&http, &s, Some("gamma-key"), &chat(1), &[]).await;
    let (st, code, _) = status_code(r, "").await;
    assert_eq!(
        (st, code.as_deref()),
        (429, Some("rate_limit_exceeded")),
        "tokens per minute"
    );
    assert_eq!(
        send(&http, &s, Some("acme-key"), &chat(1), &[])
            .await
            .status(),
        200,
        "acme unaffected"
    );

    // A mixed run for `eps` with cancellations: what its clients were told is what is counted.
    let (mut prompt, mut completion, mut cancelled) = (0u64, 0u64, 0u64);
    for i in 0..6u32 {
        let mut body = chat(3 + i);
        body["messages"][0]["content"] = json!(format!("Count to {i}."));
        match i % 3 {
            0 => {
                let v: Value = send(&http, &s, Some("eps-key"), &body, &[])
                    .await
                    .json()
                    .await
                    .unwrap();
                let (p, c) = usage_of(&v);
                prompt += p;
                completion += c;
            }
            1 => {
                body["stream"] = json!(true);
                body["n"] = json!(2);
                body["stream_options"] = json!({"include_usage": true});
                let (events, done) =
                    read_sse(send(&http, &s, Some("eps-key"), &body, &[]).await).await;
                assert!(done);
                let (p, c) = usage_of(events.last().unwrap());
                prompt += p;
                completion += c;
            }
            _ => {
                body["stream"] = json!(true);
                body["max_tokens"] = json!(500);
                body["ignore_eos"] = json!(true);
                let r = send(&http, &s, Some("eps-key"), &body, &[]).await;
                let mut chunks = r.bytes_stream();
                chunks.next().await.unwrap().unwrap();
                drop(chunks);
                cancelled += 1;
            }
        }
    }
    let admin = |query: String| {
        let (http, url) = (http.clone(), s.url(&format!("/v1/usage{query}")));
        async move {
            let v: Value = http
                .get(url)
                .bearer_auth("admin-key")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let v = admin("?tenant=eps".into()).await;
        let rows = v["data"].as_array().unwrap().clone();
        let requests: u64 = rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum();
        if requests == 6 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "eps's 6 requests were not all counted: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let sum = |field: &str| rows.iter().map(|r| r[field].as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum("prompt_tokens"), prompt);
    assert_eq!(sum("completion_tokens"), completion);
    let aborted: u64 = rows
        .iter()
        .filter_map(|r| r["errors"]["499"].as_u64())
        .sum();
    assert_eq!(aborted, cancelled);

    // Metrics and logs carry tenants, never keys.
    let metrics = http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(&format!(
        "tpserve:tenant_prompt_tokens_total{{tenant=\"eps\",model=\"smollm2\",feature=\"none\",variant=\"-\"}} {prompt}"
    )), "{metrics}");
    assert!(metrics.contains("tpserve:tenant_request_errors_total{tenant=\"beta\",model=\"-\",feature=\"-\",variant=\"-\",status=\"429\"} 1"), "{metrics}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    for key in ["acme-key", "beta-key", "eps-key", "admin-key"] {
        assert!(!metrics.contains(key) && !log.contains(key));
    }
    let all = admin(String::new()).await;
    let logged_requests = log.lines().count() as u64;
    let counted: u64 = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(logged_requests, counted, "one log line per counted request");

    // The file reloads: an invalid policy is refused and the old one stays; a valid one applies.
    std::fs::write(&policy_path, policy().replace("tier: free", "tier: gold")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains("tpserve:gateway_policy_reloads_total{result=\"refused\"} 1")
    {
        assert!(Instant::now() < deadline, "the invalid policy was not seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        send(&http, &s, Some("eps-key"), &chat(1), &[])
            .await
            .status(),
        200
    );
    std::fs::write(
        &policy_path,
        policy().replace(&hash("eps-key"), &hash("eps-new-key")),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while send(&http, &s, Some("eps-new-key"), &chat(1), &[])
        .await
        .status()
        != 200
    {
        assert!(Instant::now() < deadline, "the new policy did not apply");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        send(&http, &s, Some("eps-key"), &chat(1), &[])
            .await
            .status(),
        401
    );
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn two_coordinators_apply_a_policy_changed_in_etcd() {
    let dir = std::env::temp_dir().join(format!("tpserve-gateway-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_etcd, etcd) = start_etcd(&dir);
    let key = "/tpserve/gw-test/gateway/policy";
    let client = tpserve_cluster::EtcdClient::new(std::slice::from_ref(&etcd)).unwrap();
    let v1 = format!(
        "tenants:\n  t:\n    key_hashes: [\"{}\"]\n",
        hash("key-one")
    );
    client.put(key, &v1, None).await.unwrap();
    let model = default_model();
    let args = [
        "--model",
        model.to_str().unwrap(),
        "--max-model-len",
        "512",
        "--gateway-etcd-endpoints",
        &etcd,
        "--gateway-etcd-key",
        key,
    ];
    let a = Server::start(&args).await;
    let b = Server::start(&args).await;
    let http = reqwest::Client::new();
    let models = |s: &Server, key: &'static str| {
        let (http, url) = (http.clone(), s.url("/v1/models"));
        async move {
            http.get(url)
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for s in [&a, &b] {
        assert_eq!(models(s, "key-one").await, 200);
        assert_eq!(models(s, "key-two").await, 401);
    }
    let v2 = format!(
        "tenants:\n  t:\n    key_hashes: [\"{}\"]\n",
        hash("key-two")
    );
    client.put(key, &v2, None).await.unwrap();
    for s in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while models(s, "key-two").await != 200 {
            assert!(
                Instant::now() < deadline,
                "{} did not apply the new policy",
                s.base_url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(models(s, "key-one").await, 401);
    }
    client
        .put(
            key,
            "tenants:\n  t:\n    key_hashes: [\"sk-plain\"]\n",
            None,
        )
        .await
        .unwrap();
    for s in [&a, &b] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http
            .get(s.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .contains("tpserve:gateway_policy_reloads_total{result=\"refused\"} 1")
        {
            assert!(
                Instant::now() < deadline,
                "{} did not see the invalid policy",
                s.base_url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            models(s, "key-two").await,
            200,
            "the last valid policy stays"
        );
    }
    a.stop().await;
    b.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
