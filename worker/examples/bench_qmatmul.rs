//! Quantized matrix products on the CPU, ours against candle-core's, on the same weights: for
//! each block type and each of SmolLM2's projection shapes, the time of one product with each
//! count of input rows (`--rows`, default 1, 8, 16 and 128) through (a) what the model runs
//! (`KernelChoice::Fastest`: our own kernels for Q4_0/Q4_1/Q8_0, handing 16 rows and more to the
//! f32 GEMM where the kernel says so), (b) the same kernel alone at every count (`matmul_rows`),
//! (c) the block dots in GGUF's layout (`KernelChoice::OwnRows`, the same as (b) where the CPU
//! has no AVX-512 VNNI), (d) our row loop over candle's block dot products
//! (`KernelChoice::Candle`), and (e) candle's own `QMatMul::forward` (its thread pool,
//! activations wrapped in a tensor). Prints a table and writes JSON.
//!
//! `cargo run --release -p tpserve-worker --example bench_qmatmul -- [--threads 2] [--rows 1,8,16,128] [--json out.json]`

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use tpserve_modelfile::QuantizedTensor;
use tpserve_worker::cpu::quant::{KernelChoice, QuantLinear};

/// SmolLM2-135M's products: (name, rows, cols).
const SHAPES: &[(&str, usize, usize)] = &[
    ("qkv", 960, 576),
    ("o", 576, 576),
    ("gate_up", 3072, 576),
    ("down", 576, 1536),
    ("lm_head", 49152, 576),
];

/// Llama-3-8B's products, for the 256-value K-quants (SmolLM2's 576 columns are not a multiple
/// of 256): (name, rows, cols).
const SHAPES_8B: &[(&str, usize, usize)] = &[("qkv", 6144, 4096), ("down", 4096, 14336)];

/// Median seconds of `f` over enough runs to take about 0.3 s (at least 5).
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let once = {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    let runs = ((0.3 / once.max(1e-6)) as usize).clamp(5, 2000);
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let threads: usize = flag("--threads").map_or(Ok(2), |t| t.parse())?;
    let counts: Vec<usize> = flag("--rows")
        .unwrap_or_else(|| "1,8,16,128".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()?;
    let mut rows_out = Vec::new();
    println!("{threads} threads; microseconds per product (lower is better)");
    println!(
        "| type | shape | n | ours | our kernel alone | block dots | candle dots, our loop | candle QMatMul | ours vs best candle | kernel vs block dots, max rel. diff |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let dtypes: Vec<GgmlDType> = match flag("--types").as_deref() {
        None => vec![
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
        ],
        Some(list) => list
            .split(',')
            .map(|t| match t {
                "q4_0" => Ok(GgmlDType::Q4_0),
                "q4_1" => Ok(GgmlDType::Q4_1),
                "q8_0" => Ok(GgmlDType::Q8_0),
                "q4_k" => Ok(GgmlDType::Q4K),
                other => Err(anyhow::anyhow!("--types: unknown block type {other:?}")),
            })
            .collect::<anyhow::Result<_>>()?,
    };
    for dtype in dtypes {
        let shapes = if dtype == GgmlDType::Q4K {
            SHAPES_8B
        } else {
            SHAPES
        };
        for &(name, rows, cols) in shapes {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1009) as f32 - 504.0) / 5000.0)
                .collect();
            let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu)?;
            let q = QTensor::quantize(&t, dtype)?;
            let bytes = q.data()?.to_vec();
            let raw = QuantizedTensor::new(dtype, rows, cols, bytes)?;
            let ours = QuantLinear::new(vec![raw.clone()], KernelChoice::Fastest)
                .expect("a kernel for the type");
            let own_rows = QuantLinear::new(vec![raw.clone()], KernelChoice::OwnRows)
                .expect("a kernel for the type");
            let via_candle =
                QuantLinear::new(vec![raw], KernelChoice::Candle).expect("candle runs the type");
            let qmm = QMatMul::from_qtensor(q)?;
            for &n in &counts {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) / 20.0)
                    .collect();
                let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu)?;
                let mut out = vec![0.0f32; n * rows];
                let a = time(|| ours.matmul(&x, n, &mut out));
                let kernel = time(|| ours.matmul_rows(&x, n, &mut out));
                let dots = time(|| own_rows.matmul_rows(&x, n, &mut out));
                // The kernel's results against the block dots' (the same quantized activations):
                // the largest difference relative to the largest result.
                let mut by_dots = vec![0.0f32; n * rows];
                own_rows.matmul_rows(&x, n, &mut by_dots);
                // Into a buffer no other product wrote: an output the kernel misses stays NaN.
                let mut out = vec![f32::NAN; n * rows];
                ours.matmul_rows(&x, n, &mut out);
                let top = by_dots.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let diff = out.iter().zip(&by_dots).fold(0.0f32, |m, (a, b)| {
                    let d = (a - b).abs();
                    if d.is_nan() {
                        f32::INFINITY
                    } else {
                        m.max(d)
                    }
                });
                let rel_diff = diff / top.max(f32::MIN_POSITIVE);
                let b = time(|| via_candle.matmul(&x, n, &mut out));
                let c = time(|| {
                    qmm.forward(&xt).expect("candle's product");
                });
                let us = |s: f64| s * 1e6;
                println!(
                    "| {dtype:?} | {name} {rows}x{cols} | {n} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {rel_diff:.1e} |",
                    us(a),
                    us(kernel),
                    us(dots),
                    us(b),
                    us(c),
                    b.min(c) / a
                );
                rows_out.push(serde_json::json!({
                    "dtype": format!("{dtype:?}"), "shape": name, "rows": rows, "cols": cols,
                    "n": n, "ours_us": us(a), "our_kernel_us": us(kernel), "block_dots_us": us(dots),
                    "kernel_vs_block_dots_max_rel_diff": rel_diff, "candle_dots_us": us(b), "candle_qmatmul_us": us(c),
                }));
            }
        }
    }
    if let Some(path) = flag("--json") {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&serde_json::json!({
                "threads": threads, "results": rows_out
            }))?,
        )?;
        println!("wrote {path}");
    }
    Ok(())
}
