//! The CPU sampler's cost per row: `sample_row` (what the CPU backend runs for every sampled token,
//! and the CUDA backend for rows with logit processing) over one row of SmolLM2's vocabulary
//! (49,152) and Llama-3's (128,256), for greedy, temperature alone, top-p, top-k and min-p, on a
//! peaked row (a normal-ish body with a few lifted tokens, like a model's) and a flat one (a wide
//! nucleus), and with `--logits FILE` on a model's own rows (raw little-endian f32 rows of
//! `--vocab` entries, as the `logits` example writes them; the time a row, all rows in turn).
//! Prints a table and writes JSON.
//!
//! `cargo run --release -p tpserve-worker --example bench_sampling -- [--logits rows.f32
//! --vocab 49152] [--json out.json]`

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use tpserve_proto::SamplingParams;
use tpserve_worker::sampler::{sample_row, SampleSpec};

#[derive(Debug, Parser)]
struct Args {
    /// A model's logits: raw little-endian f32 rows of `--vocab` entries.
    #[arg(long)]
    logits: Option<PathBuf>,
    /// Entries of a row of `--logits`.
    #[arg(long, default_value_t = 49_152)]
    vocab: usize,
    /// Where to write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// (name, temperature, top_p, top_k, min_p).
const SETS: &[(&str, f32, f32, i32, f32)] = &[
    ("greedy", 0.0, 1.0, 0, 0.0),
    ("temperature 0.7", 0.7, 1.0, 0, 0.0),
    ("temperature 0.7, top-p 0.9", 0.7, 0.9, 0, 0.0),
    ("top-k 50", 1.0, 1.0, 50, 0.0),
    ("min-p 0.05", 1.0, 1.0, 0, 0.05),
];

/// A row of `vocab` logits from `seed`: peaked (a body of sums of four uniforms times 3, every
/// 997th token lifted by 15) or flat (uniform in [-10, 10]).
fn row(vocab: usize, peaked: bool, mut seed: u64) -> Vec<f32> {
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..vocab)
        .map(|i| {
            if peaked {
                let body = (0..4).map(|_| uniform()).sum::<f32>() - 2.0;
                body * 3.0 + if i % 997 == 0 { 15.0 } else { 0.0 }
            } else {
                uniform() * 20.0 - 10.0
            }
        })
        .collect()
}

/// Median microseconds of one `sample_row` over 15 batches of draws with fresh seeds, the rows
/// of `logits` (`vocab` entries each) in turn.
fn micros(params: SamplingParams, logits: &[f32], vocab: usize) -> f64 {
    let draws = 200;
    let mut seed = 0u64;
    let mut rows = logits.chunks_exact(vocab).cycle();
    let mut batch = || {
        let t = Instant::now();
        for _ in 0..draws {
            seed += 1;
            let row = rows.next().expect("at least one row");
            std::hint::black_box(sample_row(&SampleSpec { params, seed }, row));
        }
        t.elapsed().as_secs_f64() * 1e6 / draws as f64
    };
    batch();
    let mut times: Vec<f64> = (0..15).map(|_| batch()).collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model_vocab = args.vocab;
    let model_rows: Option<Vec<f32>> = match &args.logits {
        Some(path) => {
            let bytes = std::fs::read(path)?;
            let rows: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            anyhow::ensure!(
                !rows.is_empty() && rows.len().is_multiple_of(model_vocab),
                "{}: not whole rows of {model_vocab} f32",
                path.display()
            );
            Some(rows)
        }
        None => None,
    };
    let mut rows = Vec::new();
    println!(
        "{:<28} {:>8} {:>12} {:>12} {:>12}",
        "parameters", "vocab", "peaked us", "flat us", "model's us"
    );
    for vocab in [49_152, 128_256] {
        let peaked = row(vocab, true, 11);
        let flat = row(vocab, false, 12);
        let model = model_rows.as_deref().filter(|_| vocab == model_vocab);
        for (name, temperature, top_p, top_k, min_p) in SETS {
            let params = SamplingParams {
                temperature: *temperature,
                top_p: *top_p,
                top_k: *top_k,
                min_p: *min_p,
                seed: None,
            };
            let p = micros(params, &peaked, vocab);
            let f = micros(params, &flat, vocab);
            let m = model.map(|rows| micros(params, rows, vocab));
            let shown = m.map_or("-".to_string(), |m| format!("{m:.1}"));
            println!("{name:<28} {vocab:>8} {p:>12.1} {f:>12.1} {shown:>12}");
            rows.push(serde_json::json!({
                "parameters": name, "vocab": vocab, "peaked_us": p, "flat_us": f,
                "model_rows_us": m,
            }));
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
