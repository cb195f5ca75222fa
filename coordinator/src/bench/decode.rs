//! `tpserve bench decode`: single-stream decode speed against the memory floor of the same
//! machine, measured in the same run. Starts the engine (workers and all) on the model, runs one
//! greedy request of a fixed length several times, and reports decode tokens/s (tokens after the
//! first, over the time after the first), time to first token, and the floor: memory read
//! bandwidth over the bytes of weights one decode step reads (every layer, plus the lm_head).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use serde::Serialize;
use tpserve_term::progress::{Task, Unit};

use super::membw::read_bandwidth;
use crate::config::EngineArgs;
use crate::engine::{GenerateEvent, GenerateRequest};
use crate::launch::launch;

/// Flags of `tpserve bench decode`.
#[derive(Debug, Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt tokens.
    #[arg(long, default_value_t = 32)]
    pub input_len: usize,
    /// Tokens to generate per run (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    pub output_len: u32,
    /// Runs; the median counts.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    pub result_json: Option<PathBuf>,
}

/// What the benchmark found.
#[derive(Debug, Serialize)]
pub struct DecodeReport {
    pub model: String,
    pub tensor_parallel_size: usize,
    pub device: String,
    pub input_len: usize,
    pub output_len: u32,
    pub ttft_ms: f64,
    pub decode_tokens_per_s: f64,
    pub decode_ms_per_token: f64,
    pub weight_bytes_per_token: u64,
    pub memory_read_gb_per_s: f64,
    pub floor_tokens_per_s: f64,
    pub fraction_of_floor: f64,
}

/// Runs the benchmark, prints a table and optionally writes JSON.
pub async fn run(args: DecodeArgs) -> anyhow::Result<DecodeReport> {
    let tp = args.engine.tensor_parallel_size;
    let launched = launch(&args.engine, &[]).await?;
    // Its floor is host memory bandwidth: meaningless for GPU workers, whose floor is the GPU's
    // (`bench_device`, worker/examples, measures that in the same run).
    anyhow::ensure!(
        !launched.ready.device.starts_with("cuda"),
        "bench decode measures against the host's memory bandwidth, which is not the floor of GPU \
         workers ({}); use --device cpu, or worker/examples/bench_device.rs for GPUs",
        launched.ready.device
    );
    let prompt: Vec<u32> = (0..args.input_len)
        .map(|i| 1000 + (i as u32 * 37) % 5000)
        .collect();
    let mut runs = Vec::new();
    let progress = Task::new(
        "bench decode",
        args.runs.max(1) as u64 * u64::from(args.output_len),
        Unit::items("tokens"),
    );
    for _ in 0..args.runs.max(1) {
        let request = GenerateRequest::fixed_length_greedy(prompt.clone(), args.output_len);
        let started = Instant::now();
        let mut stream = launched.engine.generate(request).await?;
        let (mut first, mut last, mut tokens) = (None, started, 0u32);
        while let Some(event) = stream.next().await {
            match event {
                GenerateEvent::Delta { token_ids, .. } => {
                    tokens += token_ids.len() as u32;
                    progress.inc(token_ids.len() as u64);
                    last = Instant::now();
                    first.get_or_insert(last);
                }
                GenerateEvent::Finished { .. } => break,
                GenerateEvent::Error(e) => anyhow::bail!("the run failed: {e}"),
            }
        }
        let first = first.context("no token came back")?;
        let decode_s = (last - first).as_secs_f64();
        runs.push((
            (first - started).as_secs_f64(),
            (tokens.saturating_sub(1)) as f64 / decode_s,
        ));
    }
    progress.finish();
    runs.sort_by(|a, b| a.1.total_cmp(&b.1));
    let (ttft, tps) = runs[runs.len() / 2];
    let threads = args.engine.threads_per_worker() * tp;
    let bandwidth = read_bandwidth(1 << 30, threads, 5);
    let bytes: u64 = launched.ready.weight_bytes.iter().sum();
    let floor = bandwidth / bytes as f64;
    let report = DecodeReport {
        model: args.engine.model.display().to_string(),
        tensor_parallel_size: tp,
        device: launched.ready.device.clone(),
        input_len: args.input_len,
        output_len: args.output_len,
        ttft_ms: ttft * 1e3,
        decode_tokens_per_s: tps,
        decode_ms_per_token: 1e3 / tps,
        weight_bytes_per_token: bytes,
        memory_read_gb_per_s: bandwidth / 1e9,
        floor_tokens_per_s: floor,
        fraction_of_floor: tps / floor,
    };
    println!("| model | TP | decode tok/s | ms/token | TTFT ms | weights GB/token | read GB/s | floor tok/s | of floor |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {:.1} | {:.1} | {:.0} | {:.3} | {:.1} | {:.1} | {:.0}% |",
        report.model.rsplit('/').next().unwrap_or_default(),
        tp,
        report.decode_tokens_per_s,
        report.decode_ms_per_token,
        report.ttft_ms,
        bytes as f64 / 1e9,
        report.memory_read_gb_per_s,
        report.floor_tokens_per_s,
        report.fraction_of_floor * 100.0
    );
    if let Some(path) = &args.result_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    launched.stop().await;
    Ok(report)
}
