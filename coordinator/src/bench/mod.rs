//! `tpserve bench ...`: benchmark commands. They print a table and write JSON; they measure the
//! machine's floor in the same run, so figures are ratios that travel between machines.

pub mod decode;
pub mod membw;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Single-stream decode tokens/s against the memory-bandwidth floor.
    Decode(decode::DecodeArgs),
}

/// Runs one benchmark.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Decode(args) => decode::run(args).await.map(|_| ()),
    }
}
