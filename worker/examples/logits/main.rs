//! Prompt logits and greedy continuations from tpserve's own forward pass, on any backend and
//! tensor-parallel size, for numerical checks against a reference implementation
//! (`tests/gpu/run.sh` compares them with Hugging Face transformers on the GPU machine).
//!
//! Each rank is a thread with its own runner (`ThreadGroup`); the logits come from
//! `Runner::prompt_logits` (chunked prefill through the paged cache), the greedy tokens from
//! `Runner::step` plans shaped like the coordinator's (prefill, then one token per step); with
//! `--lora-adapter DIR`, both run with that PEFT adapter.
//!
//!   cargo run --release -p tpserve-worker --example logits -- --model DIR --device cuda \
//!       --dtype bfloat16 --tensor-parallel-size 2 --prompts prompts.json --out logits.f32 \
//!       --greedy 32 --greedy-out greedy.json
//!
//! prompts.json is `{"prompts": [[token ids], ...]}`; the output is raw little-endian f32 rows
//! `[total prompt tokens, vocab]`, prompts concatenated in order.

mod extras_check;
mod mixed_check;

use std::io::Write;
use std::path::PathBuf;

use clap::Parser;
use tpserve_proto as pb;
use tpserve_worker::backend::DeviceChoice;
use tpserve_worker::sampler::SampleSpec;
use tpserve_worker::thread_group::ThreadGroup;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// As `tpserve serve --quantization` (e.g. `fp8`); empty: what the checkpoint holds.
    #[arg(long, default_value = "")]
    quantization: String,
    /// As `tpserve serve --kv-cache-dtype` (`fp8`); empty: the compute dtype.
    #[arg(long, default_value = "")]
    kv_cache_dtype: String,
    #[arg(long, short = 't', default_value_t = 1)]
    tensor_parallel_size: usize,
    #[arg(long)]
    prompts: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Greedy tokens to generate after the first prompt.
    #[arg(long, default_value_t = 0)]
    greedy: usize,
    #[arg(long)]
    greedy_out: Option<PathBuf>,
    /// Also check device sampling on the first prompt: seeded draws repeat, top-k / top-p /
    /// min-p draws stay inside their sets (computed here from the prompt's logits), top-k 1 is
    /// greedy. Exits non-zero on a violation.
    #[arg(long)]
    sampling_check: bool,
    /// Also check logit processing and log probabilities (`extras_check.rs`) on the first
    /// prompt's first token. Exits non-zero on a violation.
    #[arg(long)]
    extras_check: bool,
    /// Also check a prompt step's decode rows against the same rows decoded alone
    /// (`mixed_check.rs`), on the second prompt and the longest. Exits non-zero on a violation.
    #[arg(long)]
    mixed_check: bool,
    /// Decode batch sizes captured as CUDA graphs at warm-up (a one-token step pads to the
    /// smallest that holds it, so `--graph-sizes 8` checks padding).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    graph_sizes: Vec<usize>,
    /// No CUDA graphs: every step eager.
    #[arg(long)]
    enforce_eager: bool,
    /// Batch-invariant kernels (as `tpserve serve --batch-invariant`).
    #[arg(long)]
    batch_invariant: bool,
    /// Every all-reduce on NCCL (as `tpserve serve --disable-custom-all-reduce`).
    #[arg(long)]
    disable_custom_all_reduce: bool,
    /// A PEFT LoRA adapter directory: every prompt and the greedy run use it.
    #[arg(long)]
    lora_adapter: Option<PathBuf>,
    /// The largest adapter rank the LoRA slots hold (as `tpserve serve --max-lora-rank`).
    #[arg(long, default_value_t = 64)]
    max_lora_rank: u32,
    /// Exit non-zero unless every rank's description of its weights (`/v1/models`'
    /// `quantization`, e.g. "act-order") contains this text.
    #[arg(long)]
    require_weights: Option<String>,
}

const BLOCK_SIZE: usize = 16;

fn main() -> anyhow::Result<()> {
    tpserve_worker::logging::init_logging("info", Default::default());
    let args = Args::parse();
    let prompts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&args.prompts)?)?;
    let prompts: Vec<Vec<u32>> = serde_json::from_value(prompts["prompts"].clone())?;
    let device = DeviceChoice::parse(&args.device)?;
    let tp = args.tensor_parallel_size;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let group = ThreadGroup::start(device, tp, (cores / tp).max(1))?;
    let load = pb::LoadModelRequest {
        model_path: args.model.display().to_string(),
        load_format: pb::LoadFormat::Auto as i32,
        dtype: args.dtype.clone(),
        quantization: args.quantization.clone(),
        dummy_seed: 0,
        batch_invariant: args.batch_invariant,
        max_loras: u32::from(args.lora_adapter.is_some()),
        max_lora_rank: args.max_lora_rank,
        max_cpu_loras: 1,
        kv_cache_dtype: args.kv_cache_dtype.clone(),
    };
    let loaded = group.on_all(move |_, r| r.load_model(&load))?;
    for (rank, l) in loaded.iter().enumerate() {
        eprintln!(
            "rank {rank}: weights {} ({})",
            l.quantization, l.weight_types
        );
        if let Some(text) = &args.require_weights {
            anyhow::ensure!(
                l.weight_types.contains(text.as_str()),
                "rank {rank}'s weights are \"{}\", without \"{text}\"",
                l.weight_types
            );
        }
    }
    let fp8 = loaded.first().is_some_and(|l| l.quantization == "fp8");
    let adapter = args.lora_adapter.as_ref().map(|p| p.display().to_string());
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let profile = pb::ProfileMemoryRequest {
        block_size: BLOCK_SIZE as u32,
        kv_cache_bytes: 1 << 30,
        gpu_memory_utilization: 0.9,
        // Room for a whole chunk of sampled rows and the sampling check's 288 requests, so the
        // workspace never grows after warm-up (that would drop the CUDA graphs).
        max_num_batched_tokens: args.chunk.max(512) as u32,
        max_num_seqs: 512,
    };
    let blocks = group.on_all(move |_, r| r.profile_memory(&profile))?;
    let num_blocks = blocks.iter().map(|b| b.num_blocks).min().unwrap_or(0) as usize;
    anyhow::ensure!(
        num_blocks * BLOCK_SIZE >= 2 * (longest + args.greedy),
        "a 1 GiB cache of {num_blocks} blocks is too small for these prompts"
    );
    group.on_all(move |_, r| r.init_cache(num_blocks, BLOCK_SIZE))?;
    let sizes = if args.enforce_eager {
        Vec::new()
    } else {
        args.graph_sizes.clone()
    };
    let tokens = args.chunk.max(512);
    let custom_all_reduce = !args.disable_custom_all_reduce;
    let warm = group.on_all(move |_, r| r.warmup(tokens, 512, &sizes, custom_all_reduce))?;
    eprintln!(
        "warm-up: {} CUDA graphs captured in {:.2} s",
        warm[0].decode.graphs, warm[0].decode.seconds
    );
    let mut file = std::io::BufWriter::new(std::fs::File::create(&args.out)?);
    let mut rows = 0usize;
    let mut first_last_row: Vec<f32> = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let (p, chunk, a) = (prompt.clone(), args.chunk, adapter.clone());
        let logits =
            group.on_all(move |_, r| r.prompt_logits_with_adapter(&p, chunk, a.as_deref()))?;
        let logits = logits
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| anyhow::anyhow!("rank 0 returned no logits"))?;
        for x in &logits {
            file.write_all(&x.to_le_bytes())?;
        }
        if i == 0 {
            let vocab = logits.len() / prompt.len();
            first_last_row = logits[logits.len() - vocab..].to_vec();
        }
        rows += prompt.len();
        eprintln!(
            "prompt {i}: {} tokens, {} logits",
            prompt.len(),
            logits.len()
        );
    }
    file.flush()?;
    eprintln!("wrote {rows} rows of logits to {}", args.out.display());
    // The check's plans run the base model, so its reference row must be the base model's.
    if args.sampling_check && adapter.is_none() {
        sampling_check(&group, &prompts[0], &first_last_row, num_blocks)?;
    }
    if args.extras_check && adapter.is_none() {
        extras_check::extras_check(&group, prompts[0][0], num_blocks, fp8)?;
    }
    // FP8 products scale a step's activations together: the two steps' rows would differ by
    // more than rounding.
    if args.mixed_check && adapter.is_none() && !fp8 {
        let longest = prompts
            .iter()
            .max_by_key(|p| p.len())
            .unwrap_or(&prompts[0]);
        let base = prompts.get(1).unwrap_or(&prompts[0]);
        mixed_check::mixed_check(&group, base, longest, first_last_row.len(), num_blocks)?;
    }
    if args.greedy > 0 {
        let ids = greedy(
            &group,
            &prompts[0],
            args.greedy,
            num_blocks,
            adapter.as_deref(),
        )?;
        let json = serde_json::json!({ "new_ids": ids });
        match &args.greedy_out {
            Some(path) => std::fs::write(path, json.to_string())?,
            None => println!("{json}"),
        }
        eprintln!("greedy: {ids:?}");
    }
    Ok(())
}

/// `count` greedy tokens after `prompt`, through step plans as the coordinator sends them:
/// the whole prompt in the first step, then one token per step, blocks added as needed; with
/// the LoRA adapter in the directory `adapter`, if any.
fn greedy(
    group: &ThreadGroup,
    prompt: &[u32],
    count: usize,
    num_blocks: usize,
    adapter: Option<&str>,
) -> anyhow::Result<Vec<u32>> {
    let adapters: Vec<pb::LoraAdapter> = adapter
        .map(|path| pb::LoraAdapter {
            adapter_id: 1,
            path: path.to_string(),
            name: "adapter".into(),
        })
        .into_iter()
        .collect();
    let greedy = SampleSpec::greedy().params;
    let blocks_for = |tokens: usize| tokens.div_ceil(BLOCK_SIZE);
    // Blocks from the middle of the cache, away from prompt_logits' blocks at the end.
    let first_block = num_blocks / 4;
    let mut held = blocks_for(prompt.len());
    let plan = pb::StepPlan {
        step_id: 1,
        new_sequences: vec![pb::NewSequence {
            sequence_id: 7,
            token_ids: prompt.to_vec(),
            sampling: Some(greedy),
            block_ids: (first_block..first_block + held)
                .map(|b| b as u32)
                .collect(),
            num_computed_tokens: 0,
            num_scheduled_tokens: prompt.len() as u32,
            adapter_id: u32::from(adapter.is_some()),
            ..Default::default()
        }],
        running: vec![],
        freed_sequence_ids: vec![],
        adapters,
        ..Default::default()
    };
    let mut out = Vec::with_capacity(count);
    let step = |plan: pb::StepPlan| -> anyhow::Result<u32> {
        let answers = group.on_all(move |_, r| r.step(&plan).map(|o| o.tokens))?;
        Ok(answers[0]
            .first()
            .ok_or_else(|| anyhow::anyhow!("no token sampled"))?
            .token_id)
    };
    out.push(step(plan)?);
    for i in 1..count {
        // Tokens known before this step: the prompt and the i sampled so far.
        let needed = blocks_for(prompt.len() + i);
        let new_block_ids: Vec<u32> = (first_block + held..first_block + needed)
            .map(|b| b as u32)
            .collect();
        held = needed;
        out.push(step(pb::StepPlan {
            step_id: 1 + i as u64,
            new_sequences: vec![],
            running: vec![pb::RunningSequence {
                sequence_id: 7,
                num_scheduled_tokens: 1,
                new_block_ids,
            }],
            freed_sequence_ids: vec![],
            ..Default::default()
        })?);
    }
    Ok(out)
}

/// Samples the token after `prompt` for many requests at once (one step) under several
/// parameter sets, and checks each draw against the sets `logits` (the prompt's last row)
/// allows.
fn sampling_check(
    group: &ThreadGroup,
    prompt: &[u32],
    logits: &[f32],
    num_blocks: usize,
) -> anyhow::Result<()> {
    let params =
        |temperature: f32, top_k: i32, top_p: f32, min_p: f32, seed: u64| pb::SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            seed: Some(seed),
        };
    let per_set = 48u64;
    let sets = [
        ("temperature 1", params(1.0, 0, 1.0, 0.0, 0)),
        ("top-k 5", params(1.0, 5, 1.0, 0.0, 0)),
        ("top-p 0.5", params(1.0, 0, 0.5, 0.0, 0)),
        ("min-p 0.3", params(1.0, 0, 1.0, 0.3, 0)),
        ("top-k 1", params(1.0, 1, 1.0, 0.0, 0)),
        (
            "temperature 0.7 top-k 20 top-p 0.9",
            params(0.7, 20, 0.9, 0.0, 0),
        ),
    ];
    let blocks = prompt.len().div_ceil(BLOCK_SIZE);
    let draw = |seed_base: u64| -> anyhow::Result<Vec<u32>> {
        let mut new_sequences = Vec::new();
        for (s, (_, p)) in sets.iter().enumerate() {
            for i in 0..per_set {
                let id = 1000 + s as u64 * per_set + i;
                // Disjoint blocks: the requests run in the same step.
                let first = (id - 1000) as usize * blocks;
                anyhow::ensure!(first + blocks <= num_blocks, "the cache is too small");
                new_sequences.push(pb::NewSequence {
                    sequence_id: id,
                    token_ids: prompt.to_vec(),
                    sampling: Some(pb::SamplingParams {
                        seed: Some(seed_base + i),
                        ..*p
                    }),
                    block_ids: (first..first + blocks).map(|b| b as u32).collect(),
                    num_computed_tokens: 0,
                    num_scheduled_tokens: prompt.len() as u32,
                    ..Default::default()
                });
            }
        }
        let freed: Vec<u64> = (1000..1000 + sets.len() as u64 * per_set).collect();
        let plan = pb::StepPlan {
            step_id: 1,
            new_sequences,
            running: vec![],
            freed_sequence_ids: vec![],
            ..Default::default()
        };
        let answers = group.on_all(move |_, r| r.step(&plan).map(|o| o.tokens))?;
        let free = pb::StepPlan {
            step_id: 2,
            new_sequences: vec![],
            running: vec![],
            freed_sequence_ids: freed,
            ..Default::default()
        };
        group.on_all(move |_, r| r.step(&free))?;
        Ok(answers[0].iter().map(|t| t.token_id).collect())
    };
    let first = draw(1)?;
    let again = draw(1)?;
    let other = draw(1_000_000)?;
    anyhow::ensure!(first == again, "seeded draws did not repeat");
    // Probabilities of the reference row at temperature t.
    let probs = |t: f32| -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f64> = logits
            .iter()
            .map(|l| (((l - max) / t) as f64).exp())
            .collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    };
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
    let rank_of = |token: u32| order.iter().position(|t| *t == token as usize).unwrap();
    let mut failures = Vec::new();
    for (s, (name, p)) in sets.iter().enumerate() {
        let draws: Vec<u32> = first[s * per_set as usize..(s + 1) * per_set as usize]
            .iter()
            .chain(&other[s * per_set as usize..(s + 1) * per_set as usize])
            .copied()
            .collect();
        let pr = probs(p.temperature);
        let top = pr[order[0]];
        let distinct: std::collections::BTreeSet<u32> = draws.iter().copied().collect();
        for &t in &draws {
            let r = rank_of(t);
            // Slack of a few ranks/percent for bf16 rounding at set boundaries.
            let ok = (p.top_k <= 0 || r < p.top_k as usize + 2)
                && (p.min_p <= 0.0 || pr[t as usize] >= 0.8 * p.min_p as f64 * top)
                && (p.top_p >= 1.0 || {
                    let mass: f64 = order[..r].iter().map(|i| pr[*i]).sum();
                    mass < p.top_p as f64 + 0.02
                });
            if !ok {
                failures.push(format!(
                    "{name}: token {t} (rank {r}, p {:.4})",
                    pr[t as usize]
                ));
            }
        }
        if p.top_k == 1 && distinct.len() != 1 {
            failures.push(format!("{name}: {} distinct tokens", distinct.len()));
        }
        eprintln!(
            "sampling {name}: {} draws, {} distinct tokens, highest rank drawn {}",
            draws.len(),
            distinct.len(),
            draws.iter().map(|t| rank_of(*t)).max().unwrap_or(0)
        );
    }
    if failures.is_empty() {
        println!("sampling check: PASS (seeded draws repeat; every draw inside its set)");
        Ok(())
    } else {
        anyhow::bail!("sampling check failed: {}", failures.join("; "))
    }
}
