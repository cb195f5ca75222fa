//! Starts local `tpserve-worker` processes, one per rank, and learns the address each one serves
//! on (asked to, the worker prints `TPSERVE_WORKER_LISTENING <addr>` once it is listening). Workers get a
//! piped stdin and exit when it closes, so they never outlive the coordinator; `LocalWorker::stop`
//! closes it and reaps the process (killing it if it lingers), and a dropped `LocalWorker` is
//! killed. Each worker runs in its own process group, so a Ctrl-C on the terminal reaches only
//! the coordinator, which drains its requests before it stops the workers. Their progress events
//! (weights, kernels, CUDA graphs) come on their stdout and are drawn here under their rank; their
//! logs come on their stderr, coloured when ours are, and are copied to ours.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tpserve_proto::tls::WorkerTls;
use tpserve_term::progress::{self, Mode, Remote};

use super::group::GroupInit;
use crate::error::StartError;

/// How long a worker may take to start listening.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a stopped worker may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A worker process this coordinator started.
#[derive(Debug)]
pub struct LocalWorker {
    /// The gRPC address it serves on.
    pub addr: String,
    /// The process id (kept: the child forgets it once it has exited).
    pub pid: u32,
    child: Child,
    /// Held open: the worker exits when it closes.
    stdin: Option<ChildStdin>,
}

impl LocalWorker {
    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Closes the worker's stdin (it exits), waits for it, kills it if it is still there after
    /// `STOP_GRACE`, and reaps it, so no defunct process is left behind.
    pub async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(STOP_GRACE, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                pid = self.pid,
                "a worker did not exit within {STOP_GRACE:?} of being stopped; killing it"
            );
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// Stops every worker at once and waits until all are reaped.
pub async fn stop_all(workers: Vec<LocalWorker>) {
    futures::future::join_all(workers.into_iter().map(LocalWorker::stop)).await;
}

/// The worker binary: `--worker-binary`, else `tpserve-worker` beside this executable, else on PATH.
pub fn worker_binary(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("tpserve-worker")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("tpserve-worker"))
}

/// Starts `count` workers on `device` with `threads` CPU threads each and waits until all
/// listen. Each gets its rank in `TPSERVE_RANK`, which picks its GPU for `auto` and `cuda`, and
/// `init`'s group token and TLS files through its environment.
pub async fn spawn_local_workers(
    binary: &Path,
    count: usize,
    threads: usize,
    device: &str,
    init: &GroupInit,
) -> Result<Vec<LocalWorker>, StartError> {
    let mut workers = Vec::with_capacity(count);
    // Workers report progress as events for us to draw, unless we show none.
    let worker_progress = match progress::mode() {
        Mode::Off => "off",
        _ => "events",
    };
    let (color_var, color_value) = tpserve_term::color::child_env();
    let (log_var, log_value) = tpserve_term::logging::child_env();
    for rank in 0..count {
        let mut child = Command::new(binary)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--exit-on-stdin-close",
                "--print-listening-address",
                "--progress",
                worker_progress,
                "--device",
                device,
                "--cpu-threads",
            ])
            .arg(threads.to_string())
            .env("TPSERVE_RANK", rank.to_string())
            .env(color_var, color_value)
            .env(log_var, log_value)
            .envs(tpserve_term::telemetry::child_env())
            .envs(
                init.token
                    .text()
                    .map(|t| (tpserve_proto::WORKER_TOKEN_ENV, t)),
            )
            .envs(init.tls.iter().flat_map(WorkerTls::env))
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| StartError::Spawn {
                binary: binary.display().to_string(),
                detail: e.to_string(),
            })?;
        let stdout = child.stdout.take().expect("piped");
        let stdin = child.stdin.take();
        let last_error = forward_stderr(child.stderr.take().expect("piped"));
        let mut lines = BufReader::new(stdout).lines();
        let mut remote = Remote::new(format!("rank {rank}: "));
        let addr = tokio::time::timeout(LISTEN_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("TPSERVE_WORKER_LISTENING ") {
                    return Some(addr.trim().to_string());
                }
                remote.take_line(&line);
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            // The worker's own last words say why (no GPU, a bad flag): wait for its stderr to
            // drain before reporting.
            let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let why = last_error.lock().map(|e| e.clone()).unwrap_or(None);
            return Err(StartError::Spawn {
                binary: binary.display().to_string(),
                detail: match why {
                    Some(why) => format!("worker {rank} exited: {why}"),
                    None => format!(
                        "worker {rank} exited or did not report its address within {LISTEN_TIMEOUT:?}"
                    ),
                },
            });
        };
        // Keep draining stdout, drawing its progress events, so the worker never blocks on a
        // full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                remote.take_line(&line);
            }
        });
        workers.push(LocalWorker {
            addr,
            pid: child.id().unwrap_or(0),
            child,
            stdin,
        });
    }
    Ok(workers)
}

/// Copies a worker's stderr to ours line by line (its logs), remembering its last `error:` line.
fn forward_stderr(stderr: tokio::process::ChildStderr) -> Arc<Mutex<Option<String>>> {
    let last = Arc::new(Mutex::new(None));
    let keep = last.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            progress::write_stderr(format!("{line}\n").as_bytes());
            if let Some(why) = line.strip_prefix("error: ") {
                if let Ok(mut slot) = keep.lock() {
                    *slot = Some(why.to_string());
                }
            }
        }
    });
    last
}
