//! A cluster through a real etcd: three CPU workers started separately register under a lease,
//! a coordinator started with `--etcd-endpoints` spawns none and forms a TP=3 group from them.
//! One worker is killed with SIGKILL during a long stream: the stream ends with an error within
//! 20 s, `/health` turns unready, the worker is restarted, the group re-forms within a minute,
//! and the same greedy request gives the same answer as before.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tpserve_e2e::{binary, post_json, read_sse, signal, start_etcd, Proc, Server};

fn start_worker(etcd: &str, cluster: &str, rank: usize) -> Proc {
    let child = Command::new(binary("tpserve-worker"))
        .args([
            "--etcd-endpoints",
            etcd,
            "--cluster",
            cluster,
            "--rank",
            &rank.to_string(),
        ])
        .args([
            "--tensor-parallel-size",
            "3",
            "--etcd-lease-ttl",
            "2",
            "--cpu-threads",
            "1",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting a worker");
    Proc(child)
}

#[tokio::test]
async fn three_workers_from_etcd_serve_and_a_killed_one_rejoins() {
    let dir = std::env::temp_dir().join(format!("tpserve-etcd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (_etcd, etcd) = start_etcd(&dir);
    let cluster = format!("e2e-{}", std::process::id());
    let mut workers: Vec<Proc> = (0..3).map(|r| start_worker(&etcd, &cluster, r)).collect();
    let s = Server::smollm2(&[
        "--max-model-len",
        "1024",
        "-t",
        "3",
        "--etcd-endpoints",
        &etcd,
        "--cluster",
        &cluster,
    ])
    .await;
    let http = reqwest::Client::new();
    let out = Command::new("pgrep")
        .args(["-P", &s.pid().to_string()])
        .output()
        .unwrap();
    assert!(out.stdout.is_empty(), "the coordinator spawned no workers");

    let greedy = json!({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0});
    let before: Value = post_json(&http, s.url("/v1/chat/completions"), &greedy).await;
    assert_eq!(
        before["choices"][0]["message"]["content"], "The capital of France is Paris.",
        "{before}"
    );

    let long = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0, "max_tokens": 900, "ignore_eos": true, "stream": true});
    let stream = tokio::spawn({
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        async move { read_sse(http.post(url).json(&long).send().await.unwrap()).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let victim = workers[1].0.id();
    assert!(signal(victim, "-KILL"));
    let (events, done) = tokio::time::timeout(Duration::from_secs(20), stream)
        .await
        .expect("the stream ends within 20 s")
        .unwrap();
    assert!(done);
    let error = events
        .iter()
        .find_map(|e| e["error"]["message"].as_str())
        .expect("an error event");
    eprintln!(
        "stream ended {:?} after the kill: {error}",
        killed_at.elapsed()
    );
    let health = http.get(s.url("/health")).send().await.unwrap().status();
    assert_eq!(health, 503, "unready while a worker is missing");
    let r = http
        .post(s.url("/v1/chat/completions"))
        .json(&greedy)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());

    workers[1] = start_worker(&etcd, &cluster, 1);
    let restarted_at = Instant::now();
    loop {
        if http.get(s.url("/health")).send().await.unwrap().status() == 200 {
            break;
        }
        assert!(
            restarted_at.elapsed() < Duration::from_secs(60),
            "the group did not re-form within a minute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("ready again {:?} after the restart", restarted_at.elapsed());
    let after: Value = post_json(&http, s.url("/v1/chat/completions"), &greedy).await;
    assert_eq!(
        after["choices"][0]["message"],
        before["choices"][0]["message"]
    );
    s.stop().await;
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
}
