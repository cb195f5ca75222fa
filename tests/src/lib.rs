//! Helpers shared by the end-to-end tests: start the real `tpserve` binary (which spawns real
//! `tpserve-worker` processes), wait until it listens, talk to it over HTTP, and stop it. The
//! binaries come from `target/release` (the test script builds them first).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

mod ports;
pub use ports::free_port;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A binary built in `target/release`.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| repo_root().join("target"), PathBuf::from);
    let p = dir.join("release").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The default model's GGUF (fetched by `scripts/fetch-default-model.sh`).
pub fn default_model() -> PathBuf {
    if let Ok(p) = std::env::var("TPSERVE_DEFAULT_MODEL") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/tpserve/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-default-model.sh",
        p.display()
    );
    p
}

/// A real chat template fetched by `scripts/fetch-chat-templates.sh` (`TPSERVE_CHAT_TEMPLATES`,
/// else its cache folder), e.g. `Qwen-Qwen2.5-7B-Instruct.jinja`.
pub fn chat_template(file: &str) -> PathBuf {
    let dir = match std::env::var_os("TPSERVE_CHAT_TEMPLATES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/tpserve/chat-templates"),
    };
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch-chat-templates.sh",
        path.display()
    );
    path
}

/// An etcd server binary: `TPSERVE_ETCD_BIN`, else `etcd` on `PATH`, else the copy
/// `scripts/install-etcd.sh` caches.
pub fn etcd_binary() -> PathBuf {
    if let Ok(p) = std::env::var("TPSERVE_ETCD_BIN") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.exists() {
            return p;
        }
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/tpserve/tools/etcd/etcd");
    assert!(
        p.exists(),
        "no etcd binary: run scripts/install-etcd.sh (or set TPSERVE_ETCD_BIN)"
    );
    p
}

/// The address a `tpserve-worker --print-listening-address` (spawned with stdout piped) prints.
pub async fn listening_address(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(a) = line.strip_prefix("TPSERVE_WORKER_LISTENING ") {
            return a.trim().to_string();
        }
    }
    panic!("the worker exited without printing its address");
}

/// Starts a standalone `tpserve-worker` on the CPU (`--listen 127.0.0.1:0
/// --print-listening-address --device cpu --progress off`, then `extra`, with `env` set and
/// `RUST_LOG=warn`), killed when dropped, and returns it with the address it listens on.
pub async fn spawn_worker(extra: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> (Child, String) {
    let mut child = Command::new(binary("tpserve-worker"))
        .args(["--listen", "127.0.0.1:0", "--print-listening-address"])
        .args(["--device", "cpu", "--progress", "off"])
        .args(extra)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning tpserve-worker");
    let addr = listening_address(&mut child).await;
    (child, addr)
}

/// Sends `sig` (as `kill` spells it: `-TERM`, `-KILL`, `-STOP`, ...) to `pid`; whether `kill`
/// succeeded.
pub fn signal(pid: u32, sig: &str) -> bool {
    std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// `--model MODEL --served-model-name smollm2`, then `args`.
fn smollm2_args<'a>(model: &'a std::path::Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "--model",
        model.to_str().expect("the default model's path is UTF-8"),
        "--served-model-name",
        "smollm2",
    ];
    all.extend_from_slice(args);
    all
}

/// A running `tpserve serve`.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    child: Child,
}

impl Server {
    /// Starts `tpserve serve --port 0 ARGS...` and waits until it listens (or panics with its
    /// exit status).
    pub async fn start(args: &[&str]) -> Server {
        Self::start_with(args, "warn", None).await
    }

    /// Like [`Server::start`], with `RUST_LOG=rust_log` and the server's standard error (its
    /// logs and its workers') collected line by line into the returned [`Logs`].
    pub async fn start_logged(args: &[&str], rust_log: &str) -> (Server, Logs) {
        let logs = Logs::default();
        let server = Self::start_with(args, rust_log, Some(logs.clone())).await;
        (server, logs)
    }

    /// [`Server::start`] on the default model (SmolLM2), served as `smollm2` (the name the tests'
    /// requests give), with `args` after.
    pub async fn smollm2(args: &[&str]) -> Server {
        let model = default_model();
        Self::start(&smollm2_args(&model, args)).await
    }

    /// [`Server::start_logged`] as [`Server::smollm2`] starts.
    pub async fn smollm2_logged(args: &[&str], rust_log: &str) -> (Server, Logs) {
        let model = default_model();
        Self::start_logged(&smollm2_args(&model, args), rust_log).await
    }

    async fn start_with(args: &[&str], rust_log: &str, logs: Option<Logs>) -> Server {
        let mut child = Command::new(binary("tpserve"))
            .arg("serve")
            .args([
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                "--print-listening-url",
            ])
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(if logs.is_some() {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("spawning tpserve");
        if let (Some(logs), Some(stderr)) = (logs, child.stderr.take()) {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    logs.0.lock().unwrap().push(line);
                }
            });
        }
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(120), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("TPSERVE_LISTENING ") {
                    return Some(url.trim().to_string());
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(base_url) = url else {
            let status = child.wait().await;
            panic!("tpserve did not start: {status:?}");
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Server { base_url, child }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the server is running")
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub async fn stop(self) {
        self.terminate();
        let _ = self.wait_exit(Duration::from_secs(30)).await;
    }

    /// The process ids of the `tpserve-worker` processes the server spawned.
    pub fn workers(&self) -> Vec<u32> {
        let out = std::process::Command::new("pgrep")
            .args(["-P", &self.pid().to_string(), "tpserve-worker"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends SIGTERM (graceful shutdown) without waiting.
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            signal(pid, "-TERM");
        }
    }

    /// Waits up to `limit` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

/// A server's log lines, as they come.
#[derive(Debug, Clone, Default)]
pub struct Logs(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Logs {
    /// The lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// POSTs `body` as JSON to `url` and returns the JSON answer, whatever its status.
pub async fn post_json(
    http: &reqwest::Client,
    url: String,
    body: &serde_json::Value,
) -> serde_json::Value {
    http.post(url)
        .json(body)
        .send()
        .await
        .expect("sending the request")
        .json()
        .await
        .expect("a JSON answer")
}

/// Reads an SSE response to its end and returns the JSON of every `data:` event before `[DONE]`,
/// and whether `[DONE]` came.
pub async fn read_sse(resp: reqwest::Response) -> (Vec<serde_json::Value>, bool) {
    let body = resp.text().await.expect("reading the SSE body");
    let mut events = Vec::new();
    let mut done = false;
    for block in body.split("\n\n") {
        for line in block.lines() {
            if let Some(data) = line.strip_prefix("data: ") {
                if data == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(data).expect("an SSE event that is JSON"));
                }
            }
        }
    }
    (events, done)
}

/// The text of a streamed chat completion: its content deltas, concatenated, per choice index.
pub fn chat_stream_text(events: &[serde_json::Value], index: u64) -> String {
    events
        .iter()
        .flat_map(|e| e["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["index"].as_u64() == Some(index))
        .filter_map(|c| c["delta"]["content"].as_str().map(str::to_string))
        .collect()
}

/// The value of a series of `name` in the server's `/metrics` text (the first one, whatever its
/// labels).
pub async fn metric(http: &reqwest::Client, s: &Server, name: &str) -> f64 {
    let text = http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} is not in /metrics:\n{text}"))
}

/// Waits until nothing runs or waits and the KV cache is empty again (polling `/metrics` for
/// up to 20 s), or panics.
pub async fn wait_until_idle(http: &reqwest::Client, s: &Server) {
    for _ in 0..200 {
        let running = metric(http, s, "vllm:num_requests_running").await;
        let waiting = metric(http, s, "vllm:num_requests_waiting").await;
        let usage = metric(http, s, "vllm:kv_cache_usage_perc").await;
        if running == 0.0 && waiting == 0.0 && usage == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the server did not return to idle with an empty KV cache");
}

/// A child process killed when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a one-member etcd in `dir` (its data in `dir/data`, its log in `dir/etcd.log`, which a
/// failed start prints; removing `dir` removes both); returns it and its client URL once it
/// answers `/health` as healthy (an open client port alone was not enough: CI once saw the port
/// open and the first request refused).
pub fn start_etcd(dir: &Path) -> (Proc, String) {
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    std::fs::create_dir_all(dir).expect("etcd's directory");
    let log_path = dir.join("etcd.log");
    let log = std::fs::File::create(&log_path).expect("etcd's log file");
    let data = dir.join("data");
    let child = std::process::Command::new(etcd_binary())
        .args(["--name", "test", "--data-dir", data.to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting etcd");
    let mut etcd = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcd_is_healthy(client) {
        let exited = etcd.0.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() >= deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            panic!(
                "etcd on port {client} did not become healthy ({}); its log's end:\n{}",
                exited.map_or("still running after 30 s".to_string(), |s| format!(
                    "exited: {s}"
                )),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (etcd, url)
}

/// Whether the etcd at loopback `port` answers `GET /health` with `"health":"true"`.
fn etcd_is_healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}
