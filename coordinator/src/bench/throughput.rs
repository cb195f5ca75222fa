//! `tpserve bench throughput`: offline throughput of the engine without HTTP, the counterpart of
//! vLLM's `vllm bench throughput` with random prompts. Starts the engine as `tpserve generate`
//! does, submits every request at once (random token ids from a seeded generator, greedy,
//! end-of-sequence ignored, so every request generates exactly `--output-len` tokens) and reports
//! requests/s, output tokens/s and total tokens/s over the time from the first submission to the
//! last finished sequence. Start-up (loading, warm-up) is not timed.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tpserve_term::progress::{Task, Unit};

use crate::config::EngineArgs;
use crate::engine::{GenerateEvent, GenerateRequest};
use crate::launch::launch;

/// Prompt token ids are drawn from `[FIRST_ID, LAST_ID)`: past the special and byte tokens at
/// the start of most vocabularies, inside every vocabulary this project serves.
const FIRST_ID: u32 = 1000;
const LAST_ID: u32 = 20000;

/// Flags of `tpserve bench throughput`.
#[derive(Debug, Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Requests, all submitted at once.
    #[arg(long, default_value_t = 200)]
    pub num_prompts: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Tokens generated per request (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: u32,
    /// Seed of the prompt token ids.
    #[arg(long = "prompt-seed", default_value_t = 0)]
    pub prompt_seed: u64,
    /// Write the results here as JSON.
    #[arg(long)]
    pub result_json: Option<PathBuf>,
}

/// What the benchmark found; the first five keys are vLLM's.
#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    pub elapsed_time: f64,
    pub num_requests: usize,
    pub total_num_tokens: u64,
    pub requests_per_second: f64,
    pub tokens_per_second: f64,
    pub output_tokens_per_second: f64,
    pub total_prompt_tokens: u64,
    pub total_output_tokens: u64,
    pub model: String,
    pub tensor_parallel_size: usize,
    pub device: String,
    pub input_len: usize,
    pub output_len: u32,
}

/// Runs the benchmark, prints a table and optionally writes JSON. Fails if any request fails.
pub async fn run(args: ThroughputArgs) -> anyhow::Result<ThroughputReport> {
    if args.num_prompts == 0 || args.input_len == 0 || args.output_len == 0 {
        bail!("--num-prompts, --input-len and --output-len must be positive");
    }
    let launched = launch(&args.engine, &[]).await?;
    let (engine, model, ready) = (&launched.engine, &launched.model, &launched.ready);
    let vocab = model.tokenizer.get_vocab_size(true) as u32;
    let last = LAST_ID.min(vocab);
    if last <= FIRST_ID {
        bail!("the vocabulary has {vocab} tokens; this benchmark draws ids from {FIRST_ID}..{LAST_ID}");
    }
    let needed = args.input_len + args.output_len as usize;
    if needed > model.max_model_len as usize {
        bail!(
            "--input-len + --output-len is {needed}, more than max-model-len {}",
            model.max_model_len
        );
    }
    let mut rng = StdRng::seed_from_u64(args.prompt_seed);
    let requests: Vec<GenerateRequest> = (0..args.num_prompts)
        .map(|_| {
            let prompt = (0..args.input_len)
                .map(|_| rng.gen_range(FIRST_ID..last))
                .collect();
            GenerateRequest::fixed_length_greedy(prompt, args.output_len)
        })
        .collect();

    let started = Instant::now();
    let mut streams = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        streams.push(
            engine
                .generate(r)
                .await
                .with_context(|| format!("submitting request {i}"))?,
        );
    }
    let progress = Task::new(
        "bench throughput",
        args.num_prompts as u64,
        Unit::items("requests"),
    );
    let finished = futures::future::join_all(streams.into_iter().map(|mut s| {
        let progress = progress.clone();
        async move {
            let result = loop {
                match s.next().await {
                    Some(GenerateEvent::Delta { .. }) => {}
                    Some(GenerateEvent::Finished {
                        prompt_tokens,
                        completion_tokens,
                        ..
                    }) => break Ok((u64::from(prompt_tokens), u64::from(completion_tokens))),
                    Some(GenerateEvent::Error(e)) => break Err(e.to_string()),
                    None => break Err("the stream ended without a result".to_owned()),
                }
            };
            progress.inc(1);
            result
        }
    }))
    .await;
    progress.finish();
    let elapsed = started.elapsed().as_secs_f64();
    let (mut prompt, mut output, mut errors) = (0u64, 0u64, Vec::new());
    for result in finished {
        match result {
            Ok((p, o)) => {
                prompt += p;
                output += o;
            }
            Err(e) => errors.push(e),
        }
    }
    if let Some(first) = errors.first() {
        bail!(
            "{} of {} requests failed; the first: {first}",
            errors.len(),
            args.num_prompts
        );
    }
    let report = ThroughputReport {
        elapsed_time: elapsed,
        num_requests: args.num_prompts,
        total_num_tokens: prompt + output,
        requests_per_second: args.num_prompts as f64 / elapsed,
        tokens_per_second: (prompt + output) as f64 / elapsed,
        output_tokens_per_second: output as f64 / elapsed,
        total_prompt_tokens: prompt,
        total_output_tokens: output,
        model: args.engine.model.display().to_string(),
        tensor_parallel_size: args.engine.tensor_parallel_size,
        device: ready.device.clone(),
        input_len: args.input_len,
        output_len: args.output_len,
    };
    println!("| model | TP | requests | in/out tokens | elapsed s | req/s | output tok/s | total tok/s |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {}/{} | {:.2} | {:.2} | {:.1} | {:.1} |",
        report.model.rsplit('/').next().unwrap_or_default(),
        report.tensor_parallel_size,
        report.num_requests,
        report.input_len,
        report.output_len,
        report.elapsed_time,
        report.requests_per_second,
        report.output_tokens_per_second,
        report.tokens_per_second
    );
    if let Some(path) = &args.result_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    launched.stop().await;
    Ok(report)
}
