//! Measures the scheduler's own cost per step: `num_running` sequences (default 256) decoding
//! together, one `schedule` + `apply` per step, with block allocation and prefix-cache
//! registration as they happen in real decoding. Prints mean/p50/p99 microseconds per step and
//! writes them as JSON.
//!
//! Usage: `cargo run -p tpserve-coordinator --release --example scheduler_step_cost --
//!         [OUT.json] [ITERS] [NUM_RUNNING]` (defaults: scheduler_step_cost.json, 5000, 256).

use std::time::Instant;

use tpserve_coordinator::engine::Sampling;
use tpserve_coordinator::scheduler::{Scheduler, SchedulerConfig, SchedulingPolicy, SequenceSpec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args
        .first()
        .cloned()
        .unwrap_or_else(|| "scheduler_step_cost.json".into());
    let iters: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5000);
    let num_running: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let prompt_len = 512;
    let block_size = 16;
    // Room for the prefill steps and the timed steps, so no sequence reaches a limit.
    let max_tokens = iters + 256;
    let max_model_len = prompt_len + max_tokens;
    let config = SchedulerConfig {
        block_size,
        num_blocks: num_running * max_model_len.div_ceil(block_size) + 64,
        max_num_seqs: num_running,
        max_num_batched_tokens: 8192,
        max_model_len,
        enable_prefix_caching: true,
        policy: SchedulingPolicy::Fcfs,
        max_loras: 0,
    };
    config.validate()?;
    let mut s = Scheduler::new(config);
    for id in 0..num_running as u64 {
        // A shared 256-token system prompt, then a per-sequence part.
        let token_ids = (0..prompt_len as u32)
            .map(|i| {
                if i < 256 {
                    i
                } else {
                    i * 7 + id as u32 * 1_000
                }
            })
            .collect();
        s.add(SequenceSpec {
            id,
            token_ids,
            max_tokens,
            sampling: Sampling::default(),
            extras: Default::default(),
            priority: 0,
            cache_salt: 0,
            share: Default::default(),
            adapter: 0,
            guided: false,
        })?;
    }
    let mut sampled = Vec::with_capacity(num_running);
    let mut step = |s: &mut Scheduler, token: u32| -> anyhow::Result<usize> {
        let plan = s.schedule().expect("work to do");
        sampled.clear();
        sampled.extend(plan.sampled.iter().map(|&id| (id, token)));
        s.apply(plan.step_id, &sampled)?;
        Ok(plan.num_seqs())
    };
    // Prefill until every sequence decodes.
    let mut warm = 0;
    while s.num_running() < num_running || s.num_waiting() > 0 {
        step(&mut s, 1)?;
        warm += 1;
    }
    for _ in 0..4 {
        step(&mut s, 1)?;
    }
    let mut micros = Vec::with_capacity(iters);
    for i in 0..iters {
        let t = Instant::now();
        let n = step(&mut s, (i % 30_000) as u32)?;
        micros.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(
            n,
            num_running,
            "every sequence decodes in every step (step {i}, running {}, waiting {})",
            s.num_running(),
            s.num_waiting()
        );
    }
    let mean = micros.iter().sum::<f64>() / micros.len() as f64;
    let mut sorted = micros.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    let (p50, p99, max) = (pct(0.50), pct(0.99), sorted[sorted.len() - 1]);
    println!("scheduler step cost ({warm} prefill steps before timing)");
    println!("| running | steps | mean us | p50 us | p99 us | max us | kv usage |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {num_running} | {iters} | {mean:.1} | {p50:.1} | {p99:.1} | {max:.1} | {:.3} |",
        s.kv_cache_usage()
    );
    let json = serde_json::json!({
        "benchmark": "scheduler_step_cost",
        "num_running": num_running,
        "iters": iters,
        "block_size": block_size,
        "prompt_len": prompt_len,
        "mean_us": mean,
        "p50_us": p50,
        "p99_us": p99,
        "max_us": max,
        "kv_cache_usage": s.kv_cache_usage(),
        "prefix_cache_hits": s.stats().prefix_cache_hits,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {out}");
    Ok(())
}
