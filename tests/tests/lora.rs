//! Multi-LoRA serving on the CPU, end to end over real HTTP with real processes. The test writes
//! a tiny random Llama (6 heads, 3 KV heads, so tensor-parallel size 3 divides it), three
//! random PEFT adapters (non-zero B; ranks 4, 8 and 2; different target sets; one with rslora)
//! and, per adapter, the base with the adapter merged into its weights (`W + scale * B A`, in
//! f64, stored as f32): our f32 path serving the merged checkpoint is the reference.
//!
//! Tolerance: the log probabilities of the top-5 tokens of every generated position agree within
//! 2e-3 (absolute, f32; the adapter path sums `(x A^T) B^T` where the merged one sums `x W'^T`,
//! and a batch's blocked GEMM sums in another order than a lone row's), and the greedy tokens
//! are equal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tpserve_e2e::{metric, Server};

const HIDDEN: usize = 96;
const HEADS: usize = 6;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 16;
const INTER: usize = 192;
const VOCAB: usize = 256;
const LAYERS: usize = 2;
const TOLERANCE: f64 = 2e-3;

/// A deterministic uniform stream in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn fill(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * amplitude).collect()
    }
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// Writes f32 tensors in the safetensors format.
fn write_safetensors(path: &Path, tensors: &Tensors) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, data) in tensors {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + data.len() * 4]}),
        );
        offset += data.len() * 4;
    }
    let mut text = serde_json::to_string(&Value::Object(header)).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text.as_bytes());
    for (_, _, data) in tensors {
        for v in data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// `(out, in)` of a projection.
fn shape_of(module: &str) -> (usize, usize) {
    match module {
        "q_proj" => (HEADS * HEAD_DIM, HIDDEN),
        "k_proj" | "v_proj" => (KV_HEADS * HEAD_DIM, HIDDEN),
        "o_proj" => (HIDDEN, HEADS * HEAD_DIM),
        "gate_proj" | "up_proj" => (INTER, HIDDEN),
        "down_proj" => (HIDDEN, INTER),
        other => panic!("{other}"),
    }
}

fn parent_of(module: &str) -> &'static str {
    if module.ends_with("_proj") && ["q", "k", "v", "o"].contains(&&module[..1]) {
        "self_attn"
    } else {
        "mlp"
    }
}

const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// The base model's weights by name.
fn base_weights() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut rng = Rng(7);
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        (vec![VOCAB, HIDDEN], rng.fill(VOCAB * HIDDEN, 1.0)),
    );
    w.insert(
        "lm_head.weight".to_string(),
        (vec![VOCAB, HIDDEN], rng.fill(VOCAB * HIDDEN, 0.3)),
    );
    w.insert(
        "model.norm.weight".to_string(),
        (vec![HIDDEN], vec![1.0; HIDDEN]),
    );
    for l in 0..LAYERS {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            w.insert(
                format!("model.layers.{l}.{norm}.weight"),
                (vec![HIDDEN], vec![1.0; HIDDEN]),
            );
        }
        for m in MODULES {
            let (out, inp) = shape_of(m);
            let a = 1.0 / (inp as f32).sqrt();
            w.insert(
                format!("model.layers.{l}.{}.{m}.weight", parent_of(m)),
                (vec![out, inp], rng.fill(out * inp, a)),
            );
        }
    }
    w
}

fn write_model(dir: &Path, weights: &HashMap<String, (Vec<usize>, Vec<f32>)>) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 256, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "model_type": "llama", "torch_dtype": "float32"
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let vocab: serde_json::Map<String, Value> =
        (0..VOCAB).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let tensors: Tensors = names
        .into_iter()
        .map(|n| (n.clone(), weights[n].0.clone(), weights[n].1.clone()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors);
}

/// A random adapter: `(config, per (layer, module): (A, B))`.
struct Adapter {
    rank: usize,
    alpha: f64,
    rslora: bool,
    targets: Vec<&'static str>,
    seed: u64,
}

impl Adapter {
    fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// `(layer, module, A [r, in], B [out, r])` for every target.
    fn weights(&self) -> Vec<(usize, &'static str, Vec<f32>, Vec<f32>)> {
        let mut rng = Rng(self.seed);
        let mut out = Vec::new();
        for l in 0..LAYERS {
            for &m in &self.targets {
                let (o, i) = shape_of(m);
                let a = rng.fill(self.rank * i, 1.0 / (i as f32).sqrt());
                let b = rng.fill(o * self.rank, 0.4);
                out.push((l, m, a, b));
            }
        }
        out
    }

    fn write(&self, dir: &Path, config_extra: Value) {
        std::fs::create_dir_all(dir).unwrap();
        let mut config = json!({
            "peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha,
            "use_rslora": self.rslora, "target_modules": self.targets, "bias": "none",
            "use_dora": false, "modules_to_save": null, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "tiny"
        });
        for (k, v) in config_extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
        let mut tensors: Tensors = Vec::new();
        for (l, m, a, b) in self.weights() {
            let (o, i) = shape_of(m);
            let prefix = format!("base_model.model.model.layers.{l}.{}.{m}", parent_of(m));
            tensors.push((format!("{prefix}.lora_A.weight"), vec![self.rank, i], a));
            tensors.push((format!("{prefix}.lora_B.weight"), vec![o, self.rank], b));
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &tensors);
    }

    /// The base weights with this adapter merged: `W + scale * B A`, in f64.
    fn merged(
        &self,
        base: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
        let mut w = base.clone();
        let (r, s) = (self.rank, self.scale());
        for (l, m, a, b) in self.weights() {
            let (o, i) = shape_of(m);
            let name = format!("model.layers.{l}.{}.{m}.weight", parent_of(m));
            let entry = w.get_mut(&name).unwrap();
            for row in 0..o {
                for col in 0..i {
                    let delta: f64 = (0..r)
                        .map(|k| b[row * r + k] as f64 * a[k * i + col] as f64)
                        .sum();
                    let v = &mut entry.1[row * i + col];
                    *v = (*v as f64 + s * delta) as f32;
                }
            }
        }
        w
    }
}

fn adapters() -> Vec<(&'static str, Adapter)> {
    vec![
        (
            "alpha",
            Adapter {
                rank: 4,
                alpha: 8.0,
                rslora: false,
                targets: vec!["q_proj", "v_proj"],
                seed: 11,
            },
        ),
        (
            "beta",
            Adapter {
                rank: 8,
                alpha: 8.0,
                rslora: true,
                targets: MODULES.to_vec(),
                seed: 12,
            },
        ),
        (
            "gamma",
            Adapter {
                rank: 2,
                alpha: 4.0,
                rslora: false,
                targets: vec!["k_proj", "o_proj", "gate_proj", "down_proj"],
                seed: 13,
            },
        ),
    ]
}

/// What a greedy completion gave: its tokens and each position's top-5 log probabilities.
#[derive(Debug, Clone)]
struct Output {
    tokens: Vec<String>,
    top: Vec<HashMap<String, f64>>,
}

async fn complete(http: &reqwest::Client, s: &Server, model: &str, prompt: &[u32]) -> Output {
    let resp = http
        .post(s.url("/v1/completions"))
        .json(&json!({
            "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "logprobs": 5, "ignore_eos": true
        }))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{model}: {body}");
    let lp = &body["choices"][0]["logprobs"];
    Output {
        tokens: lp["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect(),
        top: lp["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                m.as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
                    .collect()
            })
            .collect(),
    }
}

fn assert_close(what: &str, got: &Output, want: &Output) {
    assert_eq!(got.tokens, want.tokens, "{what}: greedy tokens");
    for (pos, (g, w)) in got.top.iter().zip(&want.top).enumerate() {
        for (token, lw) in w {
            // A token at the edge of the top 5 may trade places within the tolerance.
            if let Some(lg) = g.get(token) {
                assert!(
                    (lg - lw).abs() <= TOLERANCE,
                    "{what}: position {pos}, token {token}: {lg} vs {lw}"
                );
            }
        }
        let best = |m: &HashMap<String, f64>| m.values().cloned().fold(f64::MIN, f64::max);
        assert!(
            (best(g) - best(w)).abs() <= TOLERANCE,
            "{what}: position {pos}"
        );
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![5, 17, 99, 3, 42],
        vec![200, 13, 7, 7, 150, 61, 88, 9, 31, 4, 250, 16, 77],
        vec![33, 1, 140, 71],
    ]
}

fn serve_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--model",
        model,
        "--device",
        "cpu",
        "--served-model-name",
        "base",
        "--kv-cache-space",
        "0.02",
        "--max-model-len",
        "256",
    ];
    args.extend_from_slice(extra);
    args
}

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    /// Writes the models and adapters under a directory of this test's own.
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tpserve-lora-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let base = base_weights();
        write_model(&dir.join("base"), &base);
        for (name, a) in adapters() {
            a.write(&dir.join(name), json!({}));
            write_model(&dir.join(format!("merged-{name}")), &a.merged(&base));
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn modules(&self) -> Vec<String> {
        adapters()
            .iter()
            .map(|(n, _)| format!("{n}={}", self.path(n)))
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_match_their_merged_checkpoints_alone_mixed_and_over_three_ranks() {
    let fx = Fixture::new("numerics");
    let http = reqwest::Client::new();
    let base = fx.path("base");
    let modules = fx.modules();
    let mut args = serve_args(
        &base,
        &["--enable-lora", "--max-loras", "3", "--lora-modules"],
    );
    args.extend(modules.iter().map(String::as_str));
    let server = Server::start(&args).await;

    // /v1/models lists the adapters with their parent.
    let models: Value = http
        .get(server.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["base", "alpha", "beta", "gamma"]);
    assert_eq!(models["data"][1]["parent"], "base");
    assert_eq!(models["data"][0]["parent"], Value::Null);

    // Each adapter alone (and the base), one request at a time.
    let names = ["base", "alpha", "beta", "gamma"];
    let mut alone: HashMap<(usize, &str), Output> = HashMap::new();
    for (p, prompt) in prompts().iter().enumerate() {
        for name in names {
            alone.insert((p, name), complete(&http, &server, name, prompt).await);
        }
    }
    for (p, _) in prompts().iter().enumerate() {
        for name in &names[1..] {
            assert_ne!(
                alone[&(p, *name)].tokens,
                alone[&(p, "base")].tokens,
                "adapter {name} changes prompt {p}'s greedy output (else this test proves nothing)"
            );
        }
    }

    // Mixed: every prompt under every name at once, so steps hold the base and three adapters.
    let mixed = futures::future::join_all(prompts().iter().enumerate().flat_map(|(p, prompt)| {
        let (http, server) = (&http, &server);
        names.iter().map(move |name| {
            let prompt = prompt.clone();
            async move { ((p, *name), complete(http, server, name, &prompt).await) }
        })
    }))
    .await;
    for (key, out) in &mixed {
        assert_close(&format!("mixed {key:?}"), out, &alone[key]);
    }
    let requests = metric(&http, &server, "tpserve:lora_requests_total").await;
    assert!(requests >= 6.0, "per-adapter requests counted: {requests}");
    // Every adapter was read beside the steps before its first request ran (the host cache
    // holds all three): no step read one from disk.
    let preloads = metric(&http, &server, "tpserve:lora_preloads_total").await;
    assert_eq!(preloads, 3.0, "one preload per adapter");
    let stalls = metric(&http, &server, "tpserve:lora_disk_loads_total").await;
    assert_eq!(stalls, 0.0, "adapters read on the step thread");
    server.stop().await;

    // Each adapter against its merged checkpoint, served as a plain model.
    for (name, _) in adapters() {
        let merged = fx.path(&format!("merged-{name}"));
        let reference = Server::start(&serve_args(&merged, &[])).await;
        for (p, prompt) in prompts().iter().enumerate() {
            let want = complete(&http, &reference, "base", prompt).await;
            assert_close(
                &format!("{name} vs merged, prompt {p}"),
                &alone[&(p, name)],
                &want,
            );
        }
        reference.stop().await;
    }

    // Tensor parallelism 3: adapters sharded like their base layers.
    let mut args = serve_args(&base, &["--enable-lora", "-t", "3", "--lora-modules"]);
    args.extend(modules.iter().map(String::as_str));
    let tp3 = Server::start(&args).await;
    for (p, prompt) in prompts().iter().enumerate() {
        for name in names {
            let got = complete(&http, &tp3, name, prompt).await;
            assert_close(
                &format!("tp=3 {name}, prompt {p}"),
                &got,
                &alone[&(p, name)],
            );
        }
    }
    tp3.stop().await;
}

async fn post(http: &reqwest::Client, s: &Server, path: &str, body: Value) -> (u16, String) {
    let resp = http.post(s.url(path)).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_load_checks_everything_before_200_and_unload_lets_running_requests_finish() {
    let fx = Fixture::new("runtime");
    let http = reqwest::Client::new();
    let base = fx.path("base");
    let server = Server::start(&serve_args(
        &base,
        &[
            "--enable-lora",
            "--enable-runtime-lora-updates",
            "--max-lora-rank",
            "8",
            "--max-loras",
            "1",
        ],
    ))
    .await;
    let alpha = &adapters()[0].1;
    let bad = |name: &str, extra: Value| {
        let dir = fx.dir.join(name);
        alpha.write(&dir, extra);
        dir.display().to_string()
    };
    // Every refusal: 400 (or 404) naming the field, before anything is served.
    let wrong_shape = {
        let dir = fx.dir.join("wrong-shape");
        Adapter {
            rank: 4,
            alpha: 8.0,
            rslora: false,
            targets: vec!["q_proj"],
            seed: 1,
        }
        .write(&dir, json!({}));
        // Swap in a tensor of the wrong shape.
        let t: Tensors = vec![
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".into(),
                vec![4, 64],
                vec![0.1; 256],
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".into(),
                vec![96, 4],
                vec![0.1; 384],
            ),
        ];
        write_safetensors(&dir.join("adapter_model.safetensors"), &t);
        dir.display().to_string()
    };
    let bin_only = {
        let dir = fx.dir.join("bin-only");
        alpha.write(&dir, json!({}));
        std::fs::rename(
            dir.join("adapter_model.safetensors"),
            dir.join("adapter_model.bin"),
        )
        .unwrap();
        dir.display().to_string()
    };
    let refusals = [
        (fx.path("nowhere"), "`lora_path` does not exist"),
        (bin_only, "adapter_model.bin"),
        (bad("dora", json!({"use_dora": true})), "`use_dora`"),
        (
            bad("save", json!({"modules_to_save": ["lm_head"]})),
            "`modules_to_save`",
        ),
        (bad("bias", json!({"bias": "lora_only"})), "`bias`"),
        (bad("rank", json!({"r": 16})), "above --max-lora-rank 8"),
        (
            bad("embed", json!({"target_modules": ["embed_tokens"]})),
            "embedding",
        ),
        (
            bad("unknown", json!({"target_modules": ["c_attn"]})),
            "does not have",
        ),
        (wrong_shape, "has shape [4, 64]"),
    ];
    for (path, words) in &refusals {
        let (status, body) = post(
            &http,
            &server,
            "/v1/load_lora_adapter",
            json!({"lora_name": "x", "lora_path": path}),
        )
        .await;
        assert_eq!(status, 400, "{path}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{path}: {message}");
        assert_eq!(body["error"]["param"], "lora_path");
    }
    // None of them is served.
    let (status, _) = post(
        &http,
        &server,
        "/v1/completions",
        json!({"model": "x", "prompt": [5, 6], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 404);

    // A good one loads, serves, and its name cannot be taken twice (nor the base's).
    let load = json!({"lora_name": "alpha", "lora_path": fx.path("alpha")});
    let (status, body) = post(&http, &server, "/v1/load_lora_adapter", load.clone()).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(&http, &server, "/v1/load_lora_adapter", load).await;
    assert_eq!(status, 400);
    let (status, _) = post(
        &http,
        &server,
        "/v1/load_lora_adapter",
        json!({"lora_name": "base", "lora_path": fx.path("alpha")}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, body) = post(
        &http,
        &server,
        "/v1/load_lora_adapter",
        json!({"lora_name": "gamma", "lora_path": fx.path("gamma")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // With one slot, the two adapters take turns (slot evictions) and both finish.
    let both = futures::future::join(
        complete(&http, &server, "alpha", &[5, 17, 99]),
        complete(&http, &server, "gamma", &[5, 17, 99]),
    )
    .await;
    assert_eq!(both.0.tokens.len(), 8);
    assert_eq!(both.1.tokens.len(), 8);
    let evictions = metric(&http, &server, "tpserve:lora_slot_evictions_total").await;
    assert!(evictions >= 1.0, "one slot, two adapters: {evictions}");

    // Unloading an adapter in use: the running request finishes; new ones get 404.
    let stream = http
        .post(server.url("/v1/completions"))
        .json(
            &json!({"model": "alpha", "prompt": [5, 6, 7], "max_tokens": 120,
                      "temperature": 0, "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut stream = stream;
    let first = stream.chunk().await.unwrap().expect("a first chunk");
    assert!(!first.is_empty());
    let (status, body) = post(
        &http,
        &server,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "alpha"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut rest = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.contains("[DONE]"));
    let (status, body) = post(
        &http,
        &server,
        "/v1/completions",
        json!({"model": "alpha", "prompt": [5, 6], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = post(
        &http,
        &server,
        "/v1/unload_lora_adapter",
        json!({"lora_name": "alpha"}),
    )
    .await;
    assert_eq!(status, 404);
    let text = http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("vllm:lora_requests_info{max_lora=\"1\""),
        "{text}"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_adapter_that_cannot_be_served_stops_start_up_with_the_field_named() {
    let fx = Fixture::new("flags");
    let base = fx.path("base");
    // A bad adapter at start stops the server with the field named.
    let out = std::process::Command::new(tpserve_e2e::binary("tpserve"))
        .arg("serve")
        .args(serve_args(
            &base,
            &["--port", "0", "--enable-lora", "--max-lora-rank", "2"],
        ))
        .arg("--lora-modules")
        .arg(format!("alpha={}", fx.path("alpha")))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("above --max-lora-rank 2"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
