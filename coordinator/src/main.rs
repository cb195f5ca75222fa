//! `tpserve`: the coordinator binary. Parses flags and hands over to the library.

use clap::{Parser, Subcommand};
use tpserve_coordinator::{bench, offline, serve};

/// tpserve: tensor-parallel LLM serving with an OpenAI-compatible API.
#[derive(Debug, Parser)]
#[command(name = "tpserve", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a model over the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Run the engine offline on one prompt or a JSONL batch.
    Generate(offline::GenerateArgs),
    /// Benchmarks that print a table and write JSON.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,h2=warn,tower=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Generate(args) => offline::run(args).await,
        Command::Bench(command) => bench::run(command).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
