//! The README's command blocks, run as pasted against the real binaries, so that the README
//! cannot drift from what the code does.
//!
//! Every fenced block of README.md says what it is: ```` ```sh ```` (commands) or ```` ```text ````
//! (anything else). Each `sh` block runs in bash (`set -euo pipefail`), in README order, in one
//! scratch directory laid out like the repository. A comment on the line before a block can say
//! `<!-- readme-test: skip: REASON -->` (not run here: it needs a GPU) or
//! `<!-- readme-test: interrupt: REASON -->` (it serves in the foreground until Ctrl-C) or
//! `<!-- readme-test: timeout: SECONDS: REASON -->` (it may run longer than the usual 420 s). A
//! block passes when:
//! - it exits 0 by itself, or, if marked `interrupt`, it exits 0 after a Ctrl-C (SIGINT to its
//!   process group) sent once it has printed what it must;
//! - when it mentions the capital of France, "Paris" is on its stdout;
//! - the processes it left in the background (a server started with `&`) exit 0 on SIGTERM,
//!   stopped last-started first (etcd may end with the signal's status 143, as it does).
//!
//! What differs from a reader's shell, and why:
//! - `cargo build` is a no-op that checks the binaries are there: they were built before the
//!   tests (`scripts/test.sh` does it), and cargo cannot run inside `cargo test` on the same
//!   target directory;
//! - `scripts/test.sh` is a no-op: this test is part of it;
//! - ports 8000, 2379 and 2380 become free ones, so the test never meets a server already
//!   running on this machine;
//! - `etcd` is the one `scripts/install-etcd.sh` put in place (`TPSERVE_ETCD_BIN`), on `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tpserve_e2e::{binary, default_model, etcd_binary, free_port, repo_root};

/// How long one block may run.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(420);
/// How long a block may take to exit after its Ctrl-C.
const INTERRUPT_TIMEOUT: Duration = Duration::from_secs(60);

/// One fenced block of the README.
#[derive(Debug, Clone, PartialEq)]
struct Block {
    /// 1-based line of its opening fence.
    line: usize,
    /// The fence's info string (`sh`, `text`).
    info: String,
    body: String,
    /// Why it is not run, from a `<!-- readme-test: skip: REASON -->` line right before it.
    skip: Option<String>,
    /// Whether it serves in the foreground until Ctrl-C (`<!-- readme-test: interrupt: ... -->`).
    interrupt: bool,
    /// How long it may run (`<!-- readme-test: timeout: SECONDS: ... -->`; else
    /// [`BLOCK_TIMEOUT`]).
    timeout: Duration,
}

/// The `(key, text)` of a `<!-- readme-test: KEY: TEXT -->` line.
fn directive(line: &str) -> Option<(String, String)> {
    let inner = line
        .trim()
        .strip_prefix("<!-- readme-test:")?
        .strip_suffix("-->")?
        .trim();
    let (key, text) = inner.split_once(':').unwrap_or((inner, ""));
    Some((key.trim().to_string(), text.trim().to_string()))
}

/// The fenced blocks of a Markdown text, in order.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    let mut previous = "";
    for (i, line) in markdown.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match open.take() {
            Some(block) if fence => out.push(block),
            Some(mut block) => {
                block.body.push_str(line);
                block.body.push('\n');
                open = Some(block);
            }
            None if fence => {
                let said = directive(previous);
                if let Some((key, _)) = &said {
                    assert!(
                        ["skip", "interrupt", "timeout"].contains(&key.as_str()),
                        "README.md line {i}: unknown readme-test directive {key:?}"
                    );
                }
                let said = |k: &str| said.as_ref().filter(|(key, _)| key == k);
                open = Some(Block {
                    line: i + 1,
                    info: line.trim_start().trim_start_matches('`').trim().to_string(),
                    body: String::new(),
                    skip: said("skip").map(|(_, text)| text.clone()),
                    interrupt: said("interrupt").is_some(),
                    timeout: said("timeout").map_or(BLOCK_TIMEOUT, |(_, text)| {
                        let seconds = text.split(':').next().unwrap_or_default().trim();
                        Duration::from_secs(seconds.parse().unwrap_or_else(|_| {
                            panic!("README.md line {i}: timeout {seconds:?} is not seconds")
                        }))
                    }),
                });
            }
            None => {}
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    assert!(open.is_none(), "README.md ends inside a fenced block");
    out
}

/// A directory laid out like the repository, where the blocks run: every top-level entry is a
/// link to the real one, except `target/release` (the binaries under test) and `scripts/`
/// (links to the real scripts, `test.sh` a no-op); `bin/` holds the `cargo` stand-in.
fn scratch() -> PathBuf {
    use std::os::unix::fs::symlink;
    let root = repo_root();
    let dir = std::env::temp_dir().join(format!("tpserve-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("target")).unwrap();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    for entry in std::fs::read_dir(&root).unwrap() {
        let name = entry.unwrap().file_name();
        if !["target", "scripts", "bin", ".git"].contains(&name.to_str().unwrap_or_default()) {
            symlink(root.join(&name), dir.join(&name)).unwrap();
        }
    }
    let release = binary("tpserve").parent().unwrap().to_path_buf();
    symlink(release, dir.join("target/release")).unwrap();
    for entry in std::fs::read_dir(root.join("scripts")).unwrap() {
        let name = entry.unwrap().file_name();
        if name != "test.sh" {
            symlink(
                root.join("scripts").join(&name),
                dir.join("scripts").join(&name),
            )
            .unwrap();
        }
    }
    let script = |path: &Path, text: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script(
        &dir.join("scripts/test.sh"),
        "#!/bin/sh\necho '(readme test: scripts/test.sh runs this test; not run again)'\n",
    );
    script(
        &dir.join("bin/cargo"),
        "#!/bin/sh\n\
         # readme test: the binaries are built before the tests; cargo cannot run inside them.\n\
         if [ \"$1\" = build ] && [ -x target/release/tpserve ] && [ -x target/release/tpserve-worker ]; then\n\
         \x20 echo '(readme test: cargo build skipped, the binaries are built)' >&2; exit 0\n\
         fi\n\
         echo \"readme test: cannot run cargo $* here\" >&2; exit 1\n",
    );
    dir
}

/// The block with the ports a reader would use (8000, 2379, 2380: whole numbers, not digits
/// inside longer ones) replaced by free ones, each the same port wherever it appears. One pass, so
/// a free port that happens to contain "2379" is never replaced again.
fn with_free_ports(body: &str) -> String {
    let mut ports = std::collections::HashMap::new();
    let mut out = String::with_capacity(body.len());
    let mut rest = body;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        out.push_str(&rest[..start]);
        let digits = &rest[start..];
        let end = digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(digits.len());
        let number = &digits[..end];
        let glued = out.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '.');
        if !glued && ["8000", "2379", "2380"].contains(&number) {
            out.push_str(&ports.entry(number).or_insert_with(free_port).to_string());
        } else {
            out.push_str(number);
        }
        rest = &digits[end..];
    }
    out.push_str(rest);
    out
}

/// What a block did.
struct Outcome {
    status: Option<std::process::ExitStatus>,
    stdout: String,
    stderr: String,
    interrupted: bool,
}

impl Outcome {
    fn describe(&self) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        format!(
            "status {:?}{}\n--- stdout (last lines)\n{}\n--- stderr (last lines)\n{}",
            self.status,
            if self.interrupted {
                " after Ctrl-C"
            } else {
                ""
            },
            tail(&self.stdout),
            tail(&self.stderr)
        )
    }
}

fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", &format!("-{}", child.id())])
        .status();
}

/// Runs one block in `dir` and waits for it as the module header says: with `interrupt`, a Ctrl-C
/// once its stdout has `expect`.
fn run(dir: &Path, block: &Block, expect: Option<&str>) -> Outcome {
    let (body, interrupt) = (&with_free_ports(&block.body), block.interrupt);
    // Background jobs the block leaves are stopped newest first; each must exit 0.
    // etcd ends a SIGTERM by re-raising it (status 143): only ours must exit 0.
    let epilogue = "\n# readme test: stop what the block left running, newest first\n\
        for pid in $(jobs -p | tac); do\n\
        \x20 name=$(cat /proc/$pid/comm 2>/dev/null || echo unknown)\n\
        \x20 kill -TERM \"$pid\" 2>/dev/null || true\n\
        \x20 status=0; wait \"$pid\" || status=$?\n\
        \x20 if [ \"$status\" -ne 0 ] && ! { [ \"$name\" = etcd ] && [ \"$status\" -eq 143 ]; }; then\n\
        \x20   echo \"readme test: background process $pid ($name) exited with $status\" >&2; exit 1\n\
        \x20 fi\n\
        done\n";
    let script = format!("set -euo pipefail\n{body}{epilogue}");
    let (out, err) = (dir.join("stdout.txt"), dir.join("stderr.txt"));
    let etcd_dir = etcd_binary().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}",
        dir.join("bin").display(),
        etcd_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = {
        use std::os::unix::process::CommandExt;
        Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir)
            .env("PATH", path)
            .env("M", default_model())
            .env("PORT", free_port().to_string())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .process_group(0)
            .spawn()
            .expect("running bash")
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let started = Instant::now();
    let mut interrupted = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if interrupt && !interrupted && expect.is_some_and(|e| read(&out).contains(e)) {
            // A server in the foreground that has answered: stop it as a reader would.
            signal_group(&child, "-INT");
            interrupted = true;
        }
        let limit = if interrupted {
            block.timeout + INTERRUPT_TIMEOUT
        } else {
            block.timeout
        };
        if started.elapsed() > limit {
            signal_group(&child, "-KILL");
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Outcome {
        status,
        stdout: read(&out),
        stderr: read(&err),
        interrupted,
    }
}

#[test]
fn every_command_block_of_the_readme_runs_as_pasted() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let all = blocks(&readme);
    for b in &all {
        assert!(
            ["sh", "text"].contains(&b.info.as_str()),
            "README.md line {}: a fenced block must say `sh` (commands, run by this test) or \
             `text`, not {:?}",
            b.line,
            b.info
        );
    }
    let dir = scratch();
    let mut failures = Vec::new();
    let mut ran = 0;
    for b in all.iter().filter(|b| b.info == "sh") {
        if let Some(why) = &b.skip {
            eprintln!("README.md line {}: not run here: {why}", b.line);
            continue;
        }
        let expect = b.body.contains("capital of France").then_some("Paris");
        let started = Instant::now();
        assert!(
            !b.interrupt || expect.is_some(),
            "README.md line {}: a block stopped with Ctrl-C must ask the capital of France, so \
             the test knows when to stop it",
            b.line
        );
        let outcome = run(&dir, b, expect);
        ran += 1;
        let ok = outcome.status.is_some_and(|s| s.success())
            && expect.is_none_or(|e| outcome.stdout.contains(e));
        eprintln!(
            "README.md line {}: {} in {:.0?}{}",
            b.line,
            if ok { "ok" } else { "FAILED" },
            started.elapsed(),
            if outcome.interrupted {
                " (stopped with Ctrl-C)"
            } else {
                ""
            }
        );
        if !ok {
            failures.push(format!(
                "README.md line {}:\n{}\n{}",
                b.line,
                b.body,
                outcome.describe()
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ran >= 4, "only {ran} README blocks ran");
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn fenced_blocks_are_found_with_their_language_and_skip_reason() {
    let md = "intro\n\n```sh\necho hi\n```\n\n<!-- readme-test: skip: needs a GPU -->\n```sh\nnvidia-smi\n```\n```text\na -> b\n```\n<!-- readme-test: interrupt: serves -->\n```sh\nserve\n```\n<!-- readme-test: timeout: 900: installs torch -->\n```sh\npip install\n```\n";
    let found = blocks(md);
    assert_eq!(found.len(), 5);
    assert_eq!(
        (
            found[0].line,
            found[0].info.as_str(),
            found[0].body.as_str()
        ),
        (3, "sh", "echo hi\n")
    );
    assert_eq!(found[0].skip, None);
    assert_eq!(found[1].skip.as_deref(), Some("needs a GPU"));
    assert_eq!(found[2].info, "text");
    assert!(found[3].interrupt && !found[0].interrupt);
    assert_eq!(found[0].timeout, BLOCK_TIMEOUT);
    assert_eq!(found[4].timeout, Duration::from_secs(900));
}

#[test]
fn ports_are_replaced_once_each_and_only_as_whole_numbers() {
    let body = "etcd --listen-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380\n\
                worker --etcd-endpoints http://127.0.0.1:2379\nserve --port 8000 # not 18000 or v2.2380\n";
    let out = with_free_ports(body);
    let numbers: Vec<&str> = out
        .split(|c: char| !c.is_ascii_digit())
        .filter(|n| n.len() >= 4)
        .collect();
    // 127.0.0.1 splits into short pieces; what is left: client, peer, client again, serve,
    // and the two numbers that are not ports.
    assert_eq!(numbers.len(), 6, "{out}");
    let (client, peer, again, serve) = (numbers[0], numbers[1], numbers[2], numbers[3]);
    assert_eq!(client, again, "{out}");
    assert!(client != peer && peer != serve && client != serve, "{out}");
    assert!(!["2379", "2380", "8000"].contains(&client), "{out}");
    assert_eq!(&numbers[4..], ["18000", "2380"], "{out}");
}
