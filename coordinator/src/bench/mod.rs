//! `tpserve bench ...`: benchmark commands. They print a table and write JSON; they measure the
//! machine's floor in the same run, so figures are ratios that travel between machines.

pub mod decode;
pub mod membw;
pub mod serve;
pub mod throughput;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Single-stream decode tokens/s against the memory-bandwidth floor.
    Decode(decode::DecodeArgs),
    /// Load client for an OpenAI-compatible server: TTFT, TPOT, ITL and throughput under
    /// random prompts, Poisson arrivals and optional cancellations (vLLM's `bench serve`).
    Serve(serve::ServeArgs),
    /// Offline engine throughput with random prompts, all submitted at once.
    Throughput(throughput::ThroughputArgs),
}

/// Runs one benchmark.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Decode(args) => decode::run(args).await.map(|_| ()),
        BenchCommand::Serve(args) => serve::run(args).await.map(|_| ()),
        BenchCommand::Throughput(args) => throughput::run(args).await.map(|_| ()),
    }
}
