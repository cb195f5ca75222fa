//! `tpserve-prebuild-kernels [--out DIR] [--threads N] [ARCH...]`: compiles every embedded
//! kernel source to CUBIN with NVRTC for each architecture and writes the bundle `build.rs`
//! embeds (default `kernels/prebuilt`), then prints the time and size per architecture. NVRTC
//! comes from LD_LIBRARY_PATH and the CUDA headers from `CUDA_INCLUDE_DIR`, exactly as for a
//! worker; `scripts/prebuild-kernels.sh` provides both.
//!
//! The default architectures are `sm_80`, `sm_89` and `sm_90a` (A100, L4/L40S/RTX 4090,
//! H100/H200: Hopper runs the architecture-specific `sm_90a`, for its warpgroup instructions;
//! ~2 MB each). A worker also runs `sm_80` code on `sm_86` GPUs (A10/A40: CUDA's binary
//! compatibility within a major version); name `sm_86` as well for code tuned for those.
//!
//! The arguments are parsed by hand: the crate has no argument parser, and two flags do not
//! justify adding one to a library every worker links.

use std::path::PathBuf;
use std::process::ExitCode;

use tpserve_kernels::{write_bundle, CompileConfig, SOURCES};

const DEFAULT_ARCHS: &[&str] = &["sm_80", "sm_89", "sm_90a"];
const USAGE: &str = "usage: tpserve-prebuild-kernels [--out DIR] [--threads N] [ARCH...]";

struct Args {
    out: PathBuf,
    threads: usize,
    archs: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        out: PathBuf::from("kernels/prebuilt"),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        archs: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match arg.as_str() {
            "--out" => args.out = PathBuf::from(value("--out")?),
            "--threads" => {
                let text = value("--threads")?;
                args.threads = text
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or(format!("--threads {text:?} is not a positive number"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            arch if arch.starts_with("sm_") => args.archs.push(arch.to_string()),
            other => return Err(format!("{other:?} is not a real architecture (sm_XX)")),
        }
    }
    if args.archs.is_empty() {
        args.archs = DEFAULT_ARCHS.iter().map(|a| a.to_string()).collect();
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("{message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let configs: Vec<CompileConfig> = args
        .archs
        .iter()
        .map(|a| CompileConfig::from_env(a.as_str()))
        .collect();
    let started = std::time::Instant::now();
    let summaries = match write_bundle(&args.out, &configs, SOURCES, args.threads) {
        Ok(summaries) => summaries,
        Err(e) => {
            eprintln!("prebuild failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} sources x {} architectures -> {} ({} threads)",
        SOURCES.len(),
        summaries.len(),
        args.out.display(),
        args.threads
    );
    println!("{:<8} {:>9} {:>12}", "arch", "seconds", "bytes");
    for s in &summaries {
        println!("{:<8} {:>9.1} {:>12}", s.arch, s.seconds, s.bytes);
    }
    let bytes: usize = summaries.iter().map(|s| s.bytes).sum();
    println!(
        "{:<8} {:>9.1} {:>12}",
        "total",
        started.elapsed().as_secs_f64(),
        bytes
    );
    ExitCode::SUCCESS
}
