//! `tpserve`: the coordinator binary. Parses flags and hands over to the library.

use clap::{Parser, Subcommand};
use tpserve_coordinator::{bench, gateway, offline, serve};
use tpserve_term::logging::LogFormat;
use tpserve_term::progress;
use tpserve_term::telemetry::{self, TraceConfig, TraceDetail, TraceProtocol};

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
    #[command(flatten)]
    traces: TraceArgs,
}

/// OpenTelemetry traces (vLLM's flag names).
#[derive(Debug, clap::Args)]
struct TraceArgs {
    /// Export traces over OTLP to this endpoint (e.g. `http://collector:4317` for gRPC,
    /// `http://collector:4318` for HTTP, to which `/v1/traces` is added). Off when absent.
    /// Workers this process spawns export to the same place.
    #[arg(long, global = true, env = "TPSERVE_OTLP_TRACES_ENDPOINT")]
    otlp_traces_endpoint: Option<String>,
    /// The OTLP transport: `grpc` or `http/protobuf`.
    #[arg(
        long,
        global = true,
        env = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        default_value = "grpc"
    )]
    otlp_traces_protocol: TraceProtocol,
    /// Spans beyond each request's own (queue, prefill chunks, decode, detokenize, stream):
    /// `worker` adds the engine's steps and every worker rank's step spans (model step,
    /// sampling) inside each request's trace; `model` or `all` also each all-reduce.
    #[arg(
        long,
        global = true,
        env = "TPSERVE_COLLECT_DETAILED_TRACES",
        default_value = "requests"
    )]
    collect_detailed_traces: TraceDetail,
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
    let traces = TraceConfig {
        endpoint: cli.traces.otlp_traces_endpoint.clone(),
        protocol: cli.traces.otlp_traces_protocol,
        detail: cli.traces.collect_detailed_traces,
        service_name: "tpserve",
    };
    let layers = match telemetry::layer(&traces) {
        Ok(layer) => layer.into_iter().collect(),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    tpserve_term::logging::init_with("info,h2=warn,tower=warn", cli.log_format, layers);
    let result = match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Generate(args) => offline::run(args).await,
        Command::Bench(command) => bench::run(command).await,
        Command::Gateway(command) => gateway::cli::run(command),
    };
    // Export the spans still buffered (off the runtime's threads: it blocks).
    let _ = tokio::task::spawn_blocking(telemetry::shutdown).await;
    if let Err(e) = result {
        let message = tpserve_term::errors::one_line(e.chain().map(ToString::to_string));
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}
