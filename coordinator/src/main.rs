//! `tpserve`: the coordinator binary. Parses flags and hands over to the library.

use clap::{Parser, Subcommand};
use tpserve_coordinator::{bench, gateway, offline, serve};
use tpserve_term::logging::LogFormat;
use tpserve_term::progress;

/// tpserve: tensor-parallel LLM serving with an OpenAI-compatible API.
#[derive(Debug, Parser)]
#[command(name = "tpserve", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How progress (loading weights, compiling kernels, capturing CUDA graphs, benchmark runs)
    /// is shown: `auto` (bars on a terminal, a plain line every few seconds otherwise), `bars`,
    /// `lines` or `off`.
    #[arg(
        long,
        global = true,
        env = "TPSERVE_PROGRESS",
        default_value = "auto",
        value_parser = parse_progress
    )]
    progress: progress::Mode,
    /// Log lines as `text` or `json` (one JSON object per line, with the request's span and its
    /// `request_id`). Workers this process spawns log the same way.
    #[arg(
        long,
        global = true,
        env = "TPSERVE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
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
    /// Tenant gateway tools: make API keys, check a policy file.
    #[command(subcommand)]
    Gateway(gateway::cli::GatewayCommand),
}

fn parse_progress(s: &str) -> Result<progress::Mode, String> {
    match s.parse()? {
        progress::Mode::Events => {
            Err("`events` is for workers; use auto, bars, lines or off".into())
        }
        mode => Ok(mode),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    progress::init(cli.progress);
    tpserve_term::logging::init_with("info,h2=warn,tower=warn", cli.log_format, Vec::new());
    let result = match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Generate(args) => offline::run(args).await,
        Command::Bench(command) => bench::run(command).await,
        Command::Gateway(command) => gateway::cli::run(command),
    };
    if let Err(e) = result {
        let message = tpserve_term::errors::one_line(e.chain().map(ToString::to_string));
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
