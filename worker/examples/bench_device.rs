//! First figures for a model on one GPU (or on each of `--tensor-parallel-size` GPUs), against
//! the machine's floors measured in the same run: single-sequence decode tokens/s against the
//! memory floor (weight bytes read per token over the measured device copy bandwidth), and
//! prefill tokens/s of one long prompt against the matrix floor (2 x linear-layer parameters
//! FLOPs per token over the measured cuBLAS GEMM rate).
//! Random weights of a real model's shape (`--load-format dummy`): give a config.json; or a
//! checkpoint directory (`--checkpoint`, e.g. a pre-quantized FP8 one that
//! tests/gpu/make_bench_checkpoint.py writes), loaded as `tpserve serve` loads it.
//!
//! Steps go through the runner (the worker's serving path: plan validation, batch building, the
//! forward pass, sampling on the device, tokens back to the host) without gRPC. Decode is
//! measured three times in the same run: eagerly (with the per-phase table), replaying CUDA
//! graphs with each step waited for (`Runner::step`), and replaying them with each step sent
//! ahead as the server's worker runs them (`Runner::submit_all`: step N+1 is launched, its token
//! fed on the device, before step N is answered); the last gives the interval between answers.
//! The linear-kernel choices measured at warm-up are logged.
//!
//!   cargo run --release -p tpserve-worker --example bench_device -- \
//!       --config tests/gpu/llama3-8b-config.json --dtype bfloat16 --json bench.json

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use tpserve_modelfile::LlamaConfig;
use tpserve_proto as pb;
use tpserve_worker::backend::DeviceChoice;
use tpserve_worker::cuda::{measure_floors, take_phase_totals, take_step_gaps, Dtype};
use tpserve_worker::runner::Runner;
use tpserve_worker::sampler::SampleSpec;
use tpserve_worker::thread_group::ThreadGroup;

#[derive(Debug, Parser)]
struct Args {
    /// The model's config.json (random weights of its shape).
    #[arg(long, required_unless_present = "checkpoint")]
    config: Option<PathBuf>,
    /// A checkpoint directory to load instead (its weights as stored; quantization as its
    /// config.json says, or `--quantization`).
    #[arg(long, conflicts_with = "config")]
    checkpoint: Option<PathBuf>,
    #[arg(long, default_value = "bfloat16")]
    dtype: String,
    /// As `tpserve serve --quantization` (`fp8`); empty: none.
    #[arg(long, default_value = "")]
    quantization: String,
    /// As `tpserve serve --kv-cache-dtype` (`fp8`); empty: the compute dtype.
    #[arg(long, default_value = "")]
    kv_cache_dtype: String,
    /// GPU to run on (0 with `--tensor-parallel-size`, whose ranks take GPUs 0, 1, ...).
    #[arg(long, default_value_t = 0)]
    gpu: usize,
    /// Ranks, threads of this process on GPUs 0, 1, ... summing their partial products as
    /// `tpserve serve` does (the one-shot all-reduce over peer memory, NCCL above it); the
    /// figures and phases are the first rank's, its floors its share of the weights.
    #[arg(long, default_value_t = 1)]
    tensor_parallel_size: usize,
    /// Prompt length of the prefill measurement.
    #[arg(long, default_value_t = 2048)]
    prefill_tokens: usize,
    /// Context before the decode measurement starts.
    #[arg(long, default_value_t = 512)]
    decode_context: usize,
    /// Decode steps timed.
    #[arg(long, default_value_t = 128)]
    decode_steps: usize,
    /// Sequences of the serving-shaped steps measured after the rest (0: none): a decode step
    /// of this many rows at `--batch-context`, eager (with phases) and from its CUDA graph; a
    /// step of `--mixed-prompts` prompts of `--mixed-prompt-len` tokens next to the other rows'
    /// decodes (a chunked-prefill step of `tpserve bench serve`'s 1,024/128 workload); and the
    /// same prompts alone.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// Context of each sequence of the serving-shaped decode steps.
    #[arg(long, default_value_t = 1024)]
    batch_context: usize,
    /// Prompts of the mixed and prompt-only serving-shaped steps.
    #[arg(long, default_value_t = 8)]
    mixed_prompts: usize,
    /// Tokens of each of those prompts.
    #[arg(long, default_value_t = 1024)]
    mixed_prompt_len: usize,
    /// Where to write the JSON result.
    #[arg(long)]
    json: Option<PathBuf>,
}

const BLOCK_SIZE: usize = 16;

/// Runs `f` on every rank at once (their collectives meet) and keeps the first rank's answer.
fn on_first<T: Send + 'static>(
    group: &ThreadGroup,
    f: impl Fn(&mut Runner) -> tpserve_worker::error::Result<T> + Send + Sync + 'static,
) -> tpserve_worker::error::Result<T> {
    group
        .on_all(move |_, r| f(r))
        .map(|mut answers| answers.swap_remove(0))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Milliseconds a step of the phase `name` in totals gathered over `steps` steps (0 when absent).
fn per_step(phases: &[(&str, f64, u64)], name: &str, steps: usize) -> f64 {
    phases
        .iter()
        .find(|(n, _, _)| *n == name)
        .map_or(0.0, |(_, ms, _)| ms / steps as f64)
}

fn main() -> anyhow::Result<()> {
    tpserve_worker::logging::init_logging("warn,tpserve_worker::cuda=info", Default::default());
    let args = Args::parse();
    let dtype = Dtype::parse(&args.dtype)?;
    let (model_path, load_format, config_path) = match (&args.checkpoint, &args.config) {
        (Some(dir), _) => (dir.clone(), pb::LoadFormat::Auto, dir.join("config.json")),
        (None, Some(config)) => (config.clone(), pb::LoadFormat::Dummy, config.clone()),
        (None, None) => anyhow::bail!("--config or --checkpoint"),
    };
    let config = LlamaConfig::from_hf_json(&std::fs::read_to_string(&config_path)?)?;
    let floors = measure_floors(args.gpu, dtype)?;
    eprintln!(
        "floors: copy {:.0} GB/s, GEMM {:.0} TFLOP/s",
        floors.copy_gb_per_s, floors.gemm_tflops
    );
    let tp = args.tensor_parallel_size.max(1);
    let group = if tp == 1 {
        ThreadGroup::start(DeviceChoice::Cuda(Some(args.gpu)), 1, 1)?
    } else {
        anyhow::ensure!(args.gpu == 0, "--gpu must be 0 with --tensor-parallel-size");
        ThreadGroup::start(DeviceChoice::Cuda(None), tp, 1)?
    };

    let load = pb::LoadModelRequest {
        model_path: model_path.display().to_string(),
        load_format: load_format as i32,
        dtype: args.dtype.clone(),
        quantization: args.quantization.clone(),
        kv_cache_dtype: args.kv_cache_dtype.clone(),
        dummy_seed: 1,
        batch_invariant: false,
        ..Default::default()
    };
    let started = Instant::now();
    let loaded = on_first(&group, move |r| r.load_model(&load))?;
    let load_seconds = started.elapsed().as_secs_f64();
    let mixed_tokens = if args.batch > 0 {
        args.mixed_prompts * args.mixed_prompt_len + args.batch
    } else {
        0
    };
    let max_tokens = args.prefill_tokens.max(256).max(mixed_tokens);
    let profile = pb::ProfileMemoryRequest {
        block_size: BLOCK_SIZE as u32,
        kv_cache_bytes: 0,
        gpu_memory_utilization: 0.9,
        max_num_batched_tokens: max_tokens as u32,
        max_num_seqs: 256,
    };
    // Every rank's cache holds the same blocks: the fewest any rank has room for.
    let num_blocks = group
        .on_all(move |_, r| r.profile_memory(&profile))?
        .iter()
        .map(|b| b.num_blocks as usize)
        .min()
        .unwrap_or(0);
    on_first(&group, move |r| r.init_cache(num_blocks, BLOCK_SIZE))?;
    // Eager first: the phase table needs kernels issued one by one.
    // The one-shot all-reduce over peer memory, as `tpserve serve` sums by default.
    let custom_all_reduce = tp > 1;
    let warmup = on_first(&group, move |r| {
        r.warmup(max_tokens, 256, &[], custom_all_reduce)
    })?
    .seconds;

    let greedy = SampleSpec::greedy().params;
    let mut step_id = 0u64;
    let run = |plan: pb::StepPlan| -> anyhow::Result<f64> {
        let t = Instant::now();
        on_first(&group, move |r| r.step(&plan))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let prompt =
        |len: usize| -> Vec<u32> { (0..len).map(|i| (i * 7919 % 1000) as u32 + 10).collect() };
    // One more token of request 1 (its blocks were all given at its start).
    let decode_step = |step_id: u64| pb::StepPlan {
        step_id,
        new_sequences: vec![],
        running: vec![pb::RunningSequence {
            sequence_id: 1,
            num_scheduled_tokens: 1,
            new_block_ids: vec![],
        }],
        freed_sequence_ids: vec![],
        ..Default::default()
    };
    let new_sequence =
        |id: u64, tokens: Vec<u32>, blocks: std::ops::Range<usize>| pb::NewSequence {
            sequence_id: id,
            num_scheduled_tokens: tokens.len() as u32,
            token_ids: tokens,
            sampling: Some(greedy),
            block_ids: blocks.map(|b| b as u32).collect(),
            num_computed_tokens: 0,
            ..Default::default()
        };

    // Prefill: one prompt of prefill_tokens, five times (the first is a warm-up), each a fresh
    // request on the same blocks.
    let p = args.prefill_tokens;
    let mut prefill = Vec::new();
    for i in 0..5u64 {
        step_id += 1;
        let t = run(pb::StepPlan {
            step_id,
            new_sequences: vec![new_sequence(100 + i, prompt(p), 0..p.div_ceil(BLOCK_SIZE))],
            running: vec![],
            freed_sequence_ids: if i > 0 { vec![100 + i - 1] } else { vec![] },
            ..Default::default()
        })?;
        if i > 0 {
            prefill.push(t);
        }
    }
    let prefill_s = median(prefill);
    // The same prefill with the CUDA-core attention kernel, for comparison.
    std::env::set_var("TPSERVE_CUDA_ATTENTION", "simt");
    let mut prefill_simt = Vec::new();
    for i in 0..3u64 {
        step_id += 1;
        prefill_simt.push(run(pb::StepPlan {
            step_id,
            new_sequences: vec![new_sequence(150 + i, prompt(p), 0..p.div_ceil(BLOCK_SIZE))],
            running: vec![],
            freed_sequence_ids: vec![if i == 0 { 104 } else { 150 + i - 1 }],
            ..Default::default()
        })?);
    }
    std::env::remove_var("TPSERVE_CUDA_ATTENTION");
    let prefill_simt_s = median(prefill_simt);

    // Decode: one sequence, context decode_context, then decode_steps single-token steps (the
    // graph runs take three times as many: waited for, sent ahead, sent ahead with events).
    let ctx = args.decode_context;
    let total = ctx + 3 * args.decode_steps + 32 + 1;
    let blocks = total.div_ceil(BLOCK_SIZE);
    step_id += 1;
    run(pb::StepPlan {
        step_id,
        new_sequences: vec![new_sequence(1, prompt(ctx), 0..blocks)],
        running: vec![],
        freed_sequence_ids: vec![152],
        ..Default::default()
    })?;
    let mut decode = Vec::new();
    for _ in 0..args.decode_steps {
        step_id += 1;
        decode.push(run(decode_step(step_id))?);
    }
    // Phase profile (CUDA events between phases; they cost a little, so separately): 3 more
    // prefills, then 32 more decode steps.
    std::env::set_var("TPSERVE_CUDA_PHASES", "1");
    for i in 0..3u64 {
        step_id += 1;
        run(pb::StepPlan {
            step_id,
            new_sequences: vec![new_sequence(
                200 + i,
                prompt(p),
                blocks..blocks + p.div_ceil(BLOCK_SIZE),
            )],
            running: vec![],
            freed_sequence_ids: if i > 0 { vec![200 + i - 1] } else { vec![] },
            ..Default::default()
        })?;
    }
    let prefill_phases = on_first(&group, |_| Ok(take_phase_totals()))?;
    for _ in 0..32 {
        step_id += 1;
        run(decode_step(step_id))?;
    }
    let decode_phases = on_first(&group, |_| Ok(take_phase_totals()))?;
    std::env::remove_var("TPSERVE_CUDA_PHASES");
    let decode_s = median(decode.clone());
    let decode_mean = decode.iter().sum::<f64>() / decode.len() as f64;

    // The same decode replaying CUDA graphs (vLLM's sizes up to 256), on a fresh request.
    let sizes: Vec<usize> = [1, 2, 4].into_iter().chain((8..=256).step_by(8)).collect();
    let graphs = on_first(&group, move |r| {
        r.warmup(max_tokens, 256, &sizes, custom_all_reduce)
    })?;
    step_id += 1;
    run(pb::StepPlan {
        step_id,
        new_sequences: vec![new_sequence(2, prompt(ctx), 0..blocks)],
        running: vec![],
        freed_sequence_ids: vec![1, 202],
        ..Default::default()
    })?;
    let graph_step = |step_id: u64| {
        let mut plan = decode_step(step_id);
        plan.running[0].sequence_id = 2;
        plan
    };
    let mut decode_graph = Vec::new();
    for _ in 0..args.decode_steps {
        step_id += 1;
        decode_graph.push(run(graph_step(step_id))?);
    }
    let decode_graph_s = median(decode_graph);
    // Sent ahead: every rank submits the plans back to back; rank 0's answer times.
    let run_ahead = |plans: Vec<pb::StepPlan>| -> anyhow::Result<Vec<f64>> {
        let mut answers = group.on_all(move |_, r| {
            r.submit_all(&plans)
                .into_iter()
                .map(|a| a.outcome.map(|_| a.at))
                .collect::<tpserve_worker::error::Result<Vec<Instant>>>()
        })?;
        let times = answers.swap_remove(0);
        Ok(times
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect())
    };
    let mut ahead_plans = || -> Vec<pb::StepPlan> {
        (0..args.decode_steps)
            .map(|_| {
                step_id += 1;
                graph_step(step_id)
            })
            .collect()
    };
    let decode_ahead_s = median(run_ahead(ahead_plans())?);
    // Where a graph step's wall time goes, sent ahead (separately: its events cost a little):
    // the GPU's idle time between consecutive steps and its time within a step.
    std::env::set_var("TPSERVE_CUDA_STEP_GAPS", "1");
    run_ahead(ahead_plans())?;
    std::env::remove_var("TPSERVE_CUDA_STEP_GAPS");
    let (gap_ms, graph_gpu_ms) = on_first(&group, |_| Ok(take_step_gaps()))?
        .map_or((f64::NAN, f64::NAN), |(idle, busy, _)| (idle, busy));

    // Serving-shaped steps: `batch` sequences at `batch_context` decoding together, then a
    // chunked-prefill step (prompts next to the others' decodes), then the prompts alone.
    let batch_steps = if args.batch > 0 {
        let (b, c) = (args.batch, args.batch_context);
        let (mp, ml) = (args.mixed_prompts, args.mixed_prompt_len);
        let per_seq = (c + 64).div_ceil(BLOCK_SIZE);
        let first_block = 2 * blocks + p.div_ceil(BLOCK_SIZE);
        let seq_blocks = |i: usize| first_block + i * per_seq..first_block + (i + 1) * per_seq;
        let prompt_blocks = |i: usize| {
            let base = first_block + b * per_seq + i * ml.div_ceil(BLOCK_SIZE);
            base..base + ml.div_ceil(BLOCK_SIZE)
        };
        let id = |i: usize| 1000 + i as u64;
        // The contexts, 8 sequences a step.
        let mut freed = vec![2u64];
        for chunk in (0..b).collect::<Vec<_>>().chunks(8) {
            step_id += 1;
            run(pb::StepPlan {
                step_id,
                new_sequences: chunk
                    .iter()
                    .map(|&i| new_sequence(id(i), prompt(c), seq_blocks(i)))
                    .collect(),
                freed_sequence_ids: std::mem::take(&mut freed),
                ..Default::default()
            })?;
        }
        let decode_rows = |step_id: u64, rows: usize| pb::StepPlan {
            step_id,
            running: (0..rows)
                .map(|i| pb::RunningSequence {
                    sequence_id: id(i),
                    num_scheduled_tokens: 1,
                    new_block_ids: vec![],
                })
                .collect(),
            ..Default::default()
        };
        let mut graph_ms = Vec::new();
        for _ in 0..16 {
            step_id += 1;
            graph_ms.push(run(decode_rows(step_id, b))? * 1e3);
        }
        std::env::set_var("TPSERVE_CUDA_PHASES", "1");
        // Steps of each kind run with the phase events on.
        const EAGER_DECODES: usize = 8;
        const PHASE_PROMPTS: usize = 2;
        let mut eager_ms = Vec::new();
        for _ in 0..EAGER_DECODES {
            step_id += 1;
            eager_ms.push(run(decode_rows(step_id, b))? * 1e3);
        }
        let decode_phases = on_first(&group, |_| Ok(take_phase_totals()))?;
        std::env::remove_var("TPSERVE_CUDA_PHASES");
        // The prompts take the place of the last `mp` sequences; each step's prompts are new
        // requests on the same blocks, the step before's freed.
        let rows_mixed = b.saturating_sub(mp);
        let mut round = 0u64;
        let mut prompts_step = |step_id: u64, rows: usize| {
            let mut plan = decode_rows(step_id, rows);
            plan.new_sequences = (0..mp)
                .map(|i| new_sequence(5000 + 100 * round + i as u64, prompt(ml), prompt_blocks(i)))
                .collect();
            plan.freed_sequence_ids = if round == 0 {
                (rows_mixed..b).map(id).collect()
            } else {
                (0..mp as u64)
                    .map(|i| 5000 + 100 * (round - 1) + i)
                    .collect()
            };
            round += 1;
            plan
        };
        let mut mixed_ms = Vec::new();
        let mut prompts_ms = Vec::new();
        for _ in 0..4 {
            step_id += 1;
            mixed_ms.push(run(prompts_step(step_id, rows_mixed))? * 1e3);
            step_id += 1;
            prompts_ms.push(run(prompts_step(step_id, 0))? * 1e3);
        }
        std::env::set_var("TPSERVE_CUDA_PHASES", "1");
        for _ in 0..PHASE_PROMPTS {
            step_id += 1;
            run(prompts_step(step_id, rows_mixed))?;
        }
        let mixed_phases = on_first(&group, |_| Ok(take_phase_totals()))?;
        for _ in 0..PHASE_PROMPTS {
            step_id += 1;
            run(prompts_step(step_id, 0))?;
        }
        let prompts_phases = on_first(&group, |_| Ok(take_phase_totals()))?;
        std::env::remove_var("TPSERVE_CUDA_PHASES");
        println!();
        println!(
            "| serving-shaped step | ms (median) | decode {b} rows at {c} (eager), ms | {mp} x {ml}-token prompts + {rows_mixed} decodes, ms | the prompts alone, ms |"
        );
        println!("| --- | --- | --- | --- | --- |");
        let (graph, eager) = (median(graph_ms), median(eager_ms));
        let (mixed, prompts) = (median(mixed_ms), median(prompts_ms));
        println!(
            "| whole step: decode from graphs / mixed / prompts alone | {graph:.2} / {mixed:.2} / {prompts:.2} | {eager:.2} | | |"
        );
        let mut rows_json = Vec::new();
        for (name, _, _) in &mixed_phases {
            let (d, m, q) = (
                per_step(&decode_phases, name, EAGER_DECODES),
                per_step(&mixed_phases, name, PHASE_PROMPTS),
                per_step(&prompts_phases, name, PHASE_PROMPTS),
            );
            println!("| {name} | | {d:.2} | {m:.2} | {q:.2} |");
            rows_json.push(serde_json::json!({
                "phase": name, "decode_ms": d, "mixed_ms": m, "prompts_ms": q,
            }));
        }
        serde_json::json!({
            "batch": b,
            "context": c,
            "prompts": mp,
            "prompt_len": ml,
            "decode_graph_ms_median": graph,
            "decode_eager_ms_median": eager,
            "mixed_ms_median": mixed,
            "prompts_ms_median": prompts,
            "phases": rows_json,
        })
    } else {
        serde_json::Value::Null
    };

    // Floors. Weight bytes a decode step reads: all weights but the embedding table (one row of
    // it is read); the lm_head is read in full. The KV cache it reads is left out (at context
    // 512 of an 8B-shaped model, 0.4% of the weights). The rate is the copy's total traffic
    // (read + write), HBM's whole bandwidth, as shared/GPU.md computes the floor. With tensor
    // parallelism, the first rank's share: its slices of the layers and of the vocabulary.
    let (h, v) = (config.hidden_size, config.vocab_size.div_ceil(tp));
    let elem = 2usize;
    let embed_bytes = v * h * elem;
    let weight_bytes = loaded.weight_bytes as usize;
    let head_bytes = if config.tie_word_embeddings {
        embed_bytes
    } else {
        0
    };
    let decode_bytes = weight_bytes - embed_bytes + head_bytes;
    let memory_floor_s = decode_bytes as f64 / (floors.copy_gb_per_s * 1e9);
    // Matrix floor: the layers' linear weights once per token, plus the lm_head for the one row
    // that samples; attention's own FLOPs are left out (a floor, not an estimate). FP8 linear
    // weights are one byte each (the norms' few bf16 bytes counted as parameters too), and the
    // floor's rate stays the dtype's GEMM rate.
    let lm_head_params = v * h;
    let layer_elem = if loaded.quantization == "fp8" {
        1
    } else {
        elem
    };
    let layer_params = if loaded.quantization == "int4" {
        // 4-bit words and their groups' params: count the layers' linear parameters instead.
        let (q, kv) = (
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        );
        let inter = config.intermediate_size;
        config.num_hidden_layers * (h * (q + 2 * kv) + q * h + 3 * h * inter) / tp
    } else {
        (weight_bytes
            - embed_bytes
            - if config.tie_word_embeddings {
                0
            } else {
                lm_head_params * elem
            })
            / layer_elem
    };
    let flops = 2.0 * layer_params as f64 * p as f64 + 2.0 * lm_head_params as f64;
    let matrix_floor_s = flops / (floors.gemm_tflops * 1e12);

    let decode_tps = 1.0 / decode_s;
    let prefill_tps = p as f64 / prefill_s;
    println!();
    println!("| measurement | figure | floor | ratio to floor |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| device copy bandwidth (read + write) | {:.0} GB/s | | |",
        floors.copy_gb_per_s
    );
    println!(
        "| cuBLAS {} GEMM {n}x{n}x{n} | {:.0} TFLOP/s | | |",
        dtype.name(),
        floors.gemm_tflops,
        n = floors.gemm_size
    );
    println!(
        "| decode, 1 sequence, context {ctx} | {decode_tps:.1} tok/s ({:.2} ms/step median, {:.2} mean) | {:.1} tok/s ({:.2} ms: {:.2} GB read per token) | {:.0}% |",
        decode_s * 1e3,
        decode_mean * 1e3,
        1.0 / memory_floor_s,
        memory_floor_s * 1e3,
        decode_bytes as f64 / 1e9,
        100.0 * memory_floor_s / decode_s
    );
    println!(
        "| decode, same, CUDA graphs ({} captured in {:.2} s) | {:.1} tok/s ({:.2} ms/step median) | | {:.0}% |",
        graphs.decode.graphs,
        graphs.decode.seconds,
        1.0 / decode_graph_s,
        decode_graph_s * 1e3,
        100.0 * memory_floor_s / decode_graph_s
    );
    println!(
        "| decode, same, CUDA graphs, each step sent ahead (interval between answers) | {:.1} tok/s ({:.2} ms/step median) | | {:.0}% |",
        1.0 / decode_ahead_s,
        decode_ahead_s * 1e3,
        100.0 * memory_floor_s / decode_ahead_s
    );
    println!(
        "| decode, sent ahead: the GPU idle between two steps / its time within one | {:.1} us / {:.3} ms | | |",
        gap_ms * 1e3,
        graph_gpu_ms
    );
    println!(
        "| prefill, 1 prompt of {p} tokens | {prefill_tps:.0} tok/s ({:.1} ms) | {:.0} tok/s ({:.1} ms: {:.2} TFLOP) | {:.0}% |",
        prefill_s * 1e3,
        p as f64 / matrix_floor_s,
        matrix_floor_s * 1e3,
        flops / 1e12,
        100.0 * matrix_floor_s / prefill_s
    );
    println!(
        "| prefill, same, CUDA-core attention | {:.0} tok/s ({:.1} ms) | | {:.0}% |",
        p as f64 / prefill_simt_s,
        prefill_simt_s * 1e3,
        100.0 * matrix_floor_s / prefill_simt_s
    );
    println!(
        "(load {load_seconds:.1} s, warm-up {warmup:.2} s, {num_blocks} KV blocks of {BLOCK_SIZE} ({}), {:.2} GB weights)",
        loaded.kv_cache_dtype,
        weight_bytes as f64 / 1e9
    );
    println!();
    println!("| phase (GPU time, CUDA events) | prefill {p} tokens, ms/step | decode, ms/step |");
    println!("| --- | --- | --- |");
    for (name, _, _) in &prefill_phases {
        println!(
            "| {name} | {:.2} | {:.3} |",
            per_step(&prefill_phases, name, 3),
            per_step(&decode_phases, name, 32)
        );
    }
    let phases_json: Vec<_> = prefill_phases
        .iter()
        .map(|(name, _, _)| {
            serde_json::json!({
                "phase": name,
                "prefill_ms": per_step(&prefill_phases, name, 3),
                "decode_ms": per_step(&decode_phases, name, 32),
            })
        })
        .collect();
    let result = serde_json::json!({
        "phases": phases_json,
        "batch_steps": batch_steps,
        "config": config_path.display().to_string(),
        "checkpoint": args.checkpoint.as_ref().map(|d| d.display().to_string()),
        "quantization": loaded.quantization,
        "kv_cache_dtype": loaded.kv_cache_dtype,
        "dtype": dtype.name(),
        "tensor_parallel_size": tp,
        "copy_gb_per_s": floors.copy_gb_per_s,
        "gemm_tflops": floors.gemm_tflops,
        "weight_bytes": weight_bytes,
        "decode_context": ctx,
        "decode_ms_median": decode_s * 1e3,
        "decode_ms_mean": decode_mean * 1e3,
        "decode_tokens_per_s": decode_tps,
        "decode_floor_ms": memory_floor_s * 1e3,
        "decode_ratio_to_floor": memory_floor_s / decode_s,
        "decode_graph_ms_median": decode_graph_s * 1e3,
        "decode_graph_ratio_to_floor": memory_floor_s / decode_graph_s,
        "decode_graph_ahead_ms_median": decode_ahead_s * 1e3,
        "decode_graph_ahead_ratio_to_floor": memory_floor_s / decode_ahead_s,
        "decode_graph_gpu_idle_between_steps_us": gap_ms * 1e3,
        "decode_graph_step_on_gpu_ms": graph_gpu_ms,
        "cuda_graphs": graphs.decode.graphs,
        "graph_capture_seconds": graphs.decode.seconds,
        "prefill_tokens": p,
        "prefill_ms": prefill_s * 1e3,
        "prefill_tokens_per_s": prefill_tps,
        "prefill_floor_ms": matrix_floor_s * 1e3,
        "prefill_ratio_to_floor": matrix_floor_s / prefill_s,
        "prefill_cuda_core_attention_ms": prefill_simt_s * 1e3,
        "kv_blocks": num_blocks,
        "load_seconds": load_seconds,
        "gpu": floors.gpu_name,
        "decode_bytes": decode_bytes,
        "model": {
            "layer_params": layer_params,
            "lm_head_params": lm_head_params,
            "num_layers": config.num_hidden_layers,
            "q_heads": config.num_attention_heads,
            "head_dim": config.head_dim,
        },
    });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&result)?)?;
    }
    Ok(())
}
