//! `--device` on a machine without CUDA (CI, laptops): the one binary runs the CPU backend for
//! `auto`, and `cuda` is refused at start with a message that names what is missing, by the worker
//! and by a coordinator that spawns it. On a machine with an NVIDIA driver these tests check
//! nothing and say so; `tests/gpu/run.sh` covers the CUDA side there.

use std::process::Command;

use tpserve_e2e::{binary, default_model, repo_root};

/// True when this machine has an NVIDIA driver, where `--device cuda` is expected to work.
fn has_nvidia_driver() -> bool {
    std::path::Path::new("/dev/nvidiactl").exists()
}

fn run(bin: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(binary(bin))
        .args(args)
        .current_dir(repo_root())
        .env("TPSERVE_WORKER_BINARY", binary("tpserve-worker"))
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn worker_refuses_cuda_without_a_driver_and_says_what_is_missing() {
    if has_nvidia_driver() {
        eprintln!("this machine has an NVIDIA driver: nothing to check here");
        return;
    }
    for device in ["cuda", "cuda:1"] {
        let (code, stderr) = run("tpserve-worker", &["--device", device]);
        assert_eq!(code, 1, "{stderr}");
        assert!(
            stderr.contains("no CUDA driver found") && stderr.contains("--device cpu"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn worker_rejects_an_unknown_device() {
    let (code, stderr) = run("tpserve-worker", &["--device", "tpu"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--device tpu: expected auto, cpu, cuda or cuda:N"),
        "{stderr}"
    );
}

#[test]
fn coordinator_reports_the_workers_reason_when_cuda_is_missing() {
    if has_nvidia_driver() {
        eprintln!("this machine has an NVIDIA driver: nothing to check here");
        return;
    }
    let model = default_model();
    let model = model.to_str().unwrap();
    let (code, stderr) = run(
        "tpserve",
        &[
            "generate", "--model", model, "--device", "cuda", "--prompt", "hi",
        ],
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("worker 0 exited: device: no CUDA driver found"),
        "{stderr}"
    );
    let (code, stderr) = run(
        "tpserve",
        &[
            "generate", "--model", model, "--device", "gpu", "--prompt", "hi",
        ],
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("unknown --device \"gpu\""), "{stderr}");
}
