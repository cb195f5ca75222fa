//! `tpserve generate`: the engine without HTTP, the counterpart of vLLM's `LLM.generate` and
//! `LLM.chat`. Takes one prompt or a JSONL batch, submits everything at once (so continuous
//! batching applies), writes results in input order, and reports throughput when done. An
//! answer that is empty because the model ended at once says so (and, on a model with a chat
//! template, suggests `--chat` or `messages`) rather than printing an empty line.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tpserve_modelfile::chat::ChatMessage;
use tpserve_term::human;

use crate::config::EngineArgs;
use crate::engine::{FinishReason, GenerateEvent, GenerateRequest, Sampling};
use crate::launch::launch;

/// Flags of `tpserve generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// One prompt (printed answer on stdout). Conflicts with --input.
    #[arg(long, conflicts_with = "input")]
    pub prompt: Option<String>,
    /// JSONL file, one request per line: {"prompt": "..."} or {"messages": [{"role", "content"}]},
    /// optionally with max_tokens, temperature, top_p, top_k, min_p, seed, stop.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Where to write JSONL results (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Apply the model's chat template to --prompt (as a user message).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// Default most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Default temperature (0 is greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Default nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Default top-k (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: i32,
    /// Default sampling seed (a JSONL line's own `seed` wins); unseeded sampling differs run to run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens (fixed-length benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
}

/// One JSONL input line.
#[derive(Debug, Deserialize)]
struct InputLine {
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
}

/// One JSONL output line.
#[derive(Debug, Serialize)]
struct OutputLine {
    index: usize,
    text: String,
    finish_reason: Option<FinishReason>,
    prompt_tokens: u32,
    completion_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Runs `tpserve generate`.
pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let lines: Vec<InputLine> = match (&args.prompt, &args.input) {
        (Some(p), None) => {
            let (prompt, messages) = if args.chat {
                let mut m = Vec::new();
                if let Some(s) = &args.system {
                    m.push(ChatMessage {
                        role: "system".into(),
                        content: s.clone(),
                    });
                }
                m.push(ChatMessage {
                    role: "user".into(),
                    content: p.clone(),
                });
                (None, Some(m))
            } else {
                (Some(p.clone()), None)
            };
            vec![InputLine {
                prompt,
                messages,
                max_tokens: None,
                temperature: None,
                top_p: None,
                top_k: None,
                min_p: None,
                seed: None,
                stop: Vec::new(),
            }]
        }
        (None, Some(path)) => {
            let file =
                std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let mut v = Vec::new();
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line?;
                if line.trim().is_empty() {
                    continue;
                }
                v.push(
                    serde_json::from_str(&line)
                        .with_context(|| format!("{} line {}", path.display(), i + 1))?,
                );
            }
            v
        }
        _ => bail!("give --prompt or --input"),
    };
    if args.engine.lora.enable_lora {
        bail!("tpserve generate runs the base model only; serve LoRA adapters with tpserve serve --enable-lora");
    }
    let launched = launch(&args.engine, &[]).await?;
    let (engine, model) = (&launched.engine, &launched.model);
    let mut requests = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let text = match (&line.prompt, &line.messages) {
            (Some(p), None) => p.clone(),
            (None, Some(m)) => model
                .chat_template
                .as_ref()
                .context("the model has no chat template")?
                .render(m, true)
                .with_context(|| format!("request {i}: chat template"))?,
            _ => bail!("request {i}: give exactly one of prompt and messages"),
        };
        let add_special = line.prompt.is_some();
        let ids = model
            .tokenizer
            .encode(text.as_str(), add_special)
            .map_err(|e| anyhow::anyhow!("request {i}: tokenizing: {e}"))?
            .get_ids()
            .to_vec();
        let room = (model.max_model_len as usize).saturating_sub(ids.len());
        if ids.is_empty() || room == 0 {
            bail!(
                "request {i}: prompt has {} tokens; max-model-len is {}",
                ids.len(),
                model.max_model_len
            );
        }
        let max_tokens = line.max_tokens.unwrap_or(args.max_tokens).min(room as u32);
        requests.push(GenerateRequest {
            prompt_token_ids: ids,
            max_tokens,
            sampling: Sampling {
                temperature: line.temperature.unwrap_or(args.temperature),
                top_p: line.top_p.unwrap_or(args.top_p),
                top_k: line.top_k.unwrap_or(args.top_k),
                min_p: line.min_p.unwrap_or(0.0),
                seed: line.seed.or(args.seed),
            },
            stop: line.stop.clone(),
            stop_token_ids: Vec::new(),
            ignore_eos: args.ignore_eos,
            skip_special_tokens: true,
            priority: 0,
            share: Default::default(),
            cache_salt: 0,
            extras: Default::default(),
            adapter: None,
            grammar: None,
        });
    }
    let started = Instant::now();
    let mut streams = Vec::with_capacity(requests.len());
    for r in requests {
        streams.push(engine.generate(r).await?);
    }
    let results = futures::future::join_all(streams.into_iter().enumerate().map(
        |(index, mut s)| async move {
            let mut out = OutputLine {
                index,
                text: String::new(),
                finish_reason: None,
                prompt_tokens: 0,
                completion_tokens: 0,
                error: None,
            };
            while let Some(event) = s.next().await {
                match event {
                    GenerateEvent::Delta { text, .. } => out.text.push_str(&text),
                    GenerateEvent::Finished {
                        reason,
                        prompt_tokens,
                        completion_tokens,
                        ..
                    } => {
                        out.finish_reason = Some(reason);
                        out.prompt_tokens = prompt_tokens;
                        out.completion_tokens = completion_tokens;
                    }
                    GenerateEvent::Error(e) => out.error = Some(e.to_string()),
                }
            }
            out
        },
    ))
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let generated: u64 = results.iter().map(|r| r.completion_tokens as u64).sum();
    let prompt: u64 = results.iter().map(|r| r.prompt_tokens as u64).sum();
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    let has_template = model.chat_template.is_some();
    if args.prompt.is_some() && args.output.is_none() {
        let r = &results[0];
        match &r.error {
            Some(e) => bail!("generation failed: {e}"),
            None if r.ended_at_once() => {
                tracing::warn!(
                    "{}",
                    ended_at_once_hint(has_template && !args.chat, "--chat")
                )
            }
            None => println!("{}", r.text),
        }
    } else {
        let empty = results.iter().filter(|r| r.ended_at_once()).count();
        let raw_prompts = lines.iter().any(|l| l.prompt.is_some());
        if empty > 0 {
            tracing::warn!(
                "{} of {} empty: {}",
                human::count(empty as u64, "answer"),
                results.len(),
                ended_at_once_hint(
                    has_template && raw_prompts,
                    "{\"messages\": [...]} lines (or --chat with --prompt)"
                )
            );
        }
        let mut sink: Box<dyn Write> = match &args.output {
            Some(p) => Box::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            ),
            None => Box::new(std::io::stdout().lock()),
        };
        for r in &results {
            writeln!(sink, "{}", serde_json::to_string(r)?)?;
        }
        sink.flush()?;
    }
    let failures = if failed > 0 {
        format!(" ({failed} failed)")
    } else {
        String::new()
    };
    eprintln!(
        "{}{failures}, {prompt} prompt + {generated} generated tokens in {}: {:.1} generated tokens/s, {:.1} total tokens/s",
        human::count(results.len() as u64, "request"),
        human::seconds(elapsed),
        generated as f64 / elapsed,
        (generated + prompt) as f64 / elapsed
    );
    launched.stop().await;
    if failed > 0 {
        bail!("{} failed", human::count(failed as u64, "request"));
    }
    Ok(())
}

impl OutputLine {
    /// The model stopped before writing anything: its first token ended the sequence.
    fn ended_at_once(&self) -> bool {
        self.error.is_none()
            && self.finish_reason == Some(FinishReason::Stop)
            && self.completion_tokens <= 1
            && self.text.trim().is_empty()
    }
}

/// What to tell the user when an answer is empty because the model ended at once; `suggest`
/// names what would apply the chat template, when the model has one and it was not applied.
fn ended_at_once_hint(chat_model: bool, suggest: &str) -> String {
    let what = "the model ended at once (its first token was end-of-sequence)";
    if chat_model {
        format!(
            "{what}: it has a chat template, so it is probably an instruct model that expects \
             chat turns; try {suggest}"
        )
    } else {
        what.to_string()
    }
}
