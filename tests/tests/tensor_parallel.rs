//! Tensor parallelism through real processes: `tpserve generate` with three workers gives the
//! same greedy text as with one, and a size that does not divide the model is refused at start.

use std::process::Command;

use tpserve_e2e::{binary, default_model};

fn generate(tp: usize, input: &std::path::Path) -> Vec<serde_json::Value> {
    let out = Command::new(binary("tpserve"))
        .args([
            "generate",
            "--model",
            default_model().to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args([
            "-t",
            &tp.to_string(),
            "--max-model-len",
            "1024",
            "--max-tokens",
            "24",
            "--max-num-batched-tokens",
            "256",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tp={tp}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tokens/s"),
        "generate reports its throughput: {stderr}"
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn tensor_parallel_3_gives_the_same_greedy_text_as_1_for_twelve_prompts() {
    let prompts = [
        "What is the capital of France?",
        "Name three primary colors.",
        "Write a haiku about the sea.",
        "What is 12 times 12?",
        "Who wrote Romeo and Juliet?",
        "Explain photosynthesis in one sentence.",
        "List the planets of the solar system.",
        "Translate 'good morning' into Spanish.",
        "What is the boiling point of water?",
        "Give me a tip for learning to code.",
        "Why is the sky blue?",
        "What does a CPU do?",
    ];
    let dir = std::env::temp_dir().join(format!("tpserve-tp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("prompts.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({"messages": [{"role": "user", "content": p}]}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let one = generate(1, &input);
    let three = generate(3, &input);
    assert_eq!(one.len(), prompts.len());
    for (a, b) in one.iter().zip(&three) {
        assert!(!a["text"].as_str().unwrap().is_empty());
        assert_eq!(a["text"], b["text"], "prompt {}", a["index"]);
    }
    assert_eq!(one[0]["text"], "The capital of France is Paris.");
}

#[test]
fn a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused_at_start() {
    let out = Command::new(binary("tpserve"))
        .args([
            "serve",
            "--model",
            default_model().to_str().unwrap(),
            "-t",
            "2",
            "--port",
            "0",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("9 attention heads") && stderr.contains("size 2"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn offline_generate_answers_paris_for_one_prompt() {
    let out = Command::new(binary("tpserve"))
        .args([
            "generate",
            "--model",
            default_model().to_str().unwrap(),
            "--chat",
            "--prompt",
            "What is the capital of France?",
        ])
        .args(["--max-model-len", "1024"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "The capital of France is Paris."
    );
}
