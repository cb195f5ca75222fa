//! The figures of a run: per-request outcomes summed into vLLM's result keys, the summary
//! statistics (mean, median, std, p99 as numpy computes them) and the table vLLM prints.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};

use super::wire::ServerMetrics;
use super::{Outcome, ServeArgs};

/// Mean, median, standard deviation and 99th percentile of a sample, as vLLM reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    /// Population standard deviation (numpy's `std`).
    pub std: f64,
    pub p99: f64,
}

/// Summarizes `values` (any order); all zero when empty, as vLLM's `np.mean(x or 0)`.
/// Percentiles interpolate linearly between closest ranks, numpy's default.
pub fn summarize(values: &[f64]) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    let variance = sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let percentile = |p: f64| {
        let rank = p / 100.0 * (n - 1.0);
        let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
        sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
    };
    Summary {
        mean,
        median: percentile(50.0),
        std: variance.sqrt(),
        p99: percentile(99.0),
    }
}

/// What the benchmark found, with vLLM's key names.
#[derive(Debug, Serialize)]
pub struct ServeReport {
    pub model_id: String,
    pub base_url: String,
    pub endpoint: String,
    pub num_prompts: usize,
    pub random_input_len: usize,
    pub random_output_len: usize,
    pub random_range_ratio: f64,
    pub seed: u64,
    pub cancel_fraction: f64,
    /// `tokenize` when the prompts were counted by the server, else `estimate` (words).
    pub prompt_token_source: String,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub duration: f64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub max_concurrency: Option<usize>,
    /// A number, or `"inf"` as vLLM writes it.
    pub request_rate: Value,
    /// `mean_ttft_ms`, `median_tpot_ms`, `p99_itl_ms`, `std_e2el_ms`, ...
    #[serde(flatten)]
    pub latencies: BTreeMap<String, f64>,
    /// Error message -> requests, the most frequent first up to `MAX_ERRORS` messages.
    pub errors: BTreeMap<String, usize>,
    pub server_kv_cache_usage_after: Option<f64>,
    pub server_num_requests_running_after: Option<f64>,
    pub server_num_requests_waiting_after: Option<f64>,
    pub server_drain_wait_s: Option<f64>,
    /// Prefix-cache hits over queries during the run (from the server's counters). High values
    /// mean the prompts were seen before (same `--seed` against the same server).
    pub server_prefix_cache_hit_rate: Option<f64>,
}

/// Distinct error messages kept in the report; the rest are counted under "(other errors)".
pub(super) const MAX_ERRORS: usize = 20;

/// What a run produced, before it is added up.
pub(super) struct Run<'a> {
    /// Whether `prompt_lens` came from the server's `/tokenize`.
    pub(super) counted: bool,
    /// Prompt tokens of each request.
    pub(super) prompt_lens: &'a [usize],
    /// How each request ended; `None` for one unaccounted for.
    pub(super) outcomes: &'a [Option<Outcome>],
    /// Seconds from the first request sent to the last one ended.
    pub(super) duration: f64,
    /// `/metrics` before the run.
    pub(super) server_before: Option<ServerMetrics>,
    /// `/metrics` after the run, and the seconds waited for the server to drain.
    pub(super) server_after: Option<(ServerMetrics, f64)>,
}

/// Adds up the outcomes.
pub(super) fn report(args: &ServeArgs, run: &Run<'_>) -> ServeReport {
    let Run {
        counted,
        prompt_lens,
        outcomes,
        duration,
        ..
    } = *run;
    let server = run.server_after.map(|s| s.0);
    let (mut completed, mut cancelled, mut failed) = (0, 0, 0);
    let (mut input_tokens, mut output_tokens) = (0u64, 0u64);
    let (mut ttfts, mut tpots, mut itls, mut e2els) = (vec![], vec![], vec![], vec![]);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for (outcome, &prompt_len) in outcomes.iter().zip(prompt_lens) {
        match outcome {
            Some(Outcome::Completed(c)) => {
                completed += 1;
                input_tokens += if counted {
                    prompt_len as u64
                } else {
                    c.usage_prompt_tokens.unwrap_or(prompt_len as u64)
                };
                output_tokens += c.output_tokens;
                ttfts.push(c.ttft * 1e3);
                if c.output_tokens > 1 {
                    tpots.push((c.e2el - c.ttft) * 1e3 / (c.output_tokens - 1) as f64);
                }
                itls.extend(c.itls.iter().map(|s| s * 1e3));
                e2els.push(c.e2el * 1e3);
            }
            Some(Outcome::Cancelled) => cancelled += 1,
            Some(Outcome::Failed(message)) => {
                failed += 1;
                let message: String = message.chars().take(300).collect();
                *errors.entry(message).or_default() += 1;
            }
            None => {}
        }
    }
    if errors.len() > MAX_ERRORS {
        let mut by_count: Vec<(String, usize)> = errors.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other: usize = by_count[MAX_ERRORS..].iter().map(|e| e.1).sum();
        by_count.truncate(MAX_ERRORS);
        errors = by_count.into_iter().collect();
        errors.insert("(other errors)".into(), other);
    }
    let mut latencies = BTreeMap::new();
    for (name, values) in [
        ("ttft", &ttfts),
        ("tpot", &tpots),
        ("itl", &itls),
        ("e2el", &e2els),
    ] {
        let s = summarize(values);
        latencies.insert(format!("mean_{name}_ms"), s.mean);
        latencies.insert(format!("median_{name}_ms"), s.median);
        latencies.insert(format!("std_{name}_ms"), s.std);
        latencies.insert(format!("p99_{name}_ms"), s.p99);
    }
    ServeReport {
        model_id: args.model.clone(),
        base_url: args.base_url.clone(),
        endpoint: args.endpoint.clone(),
        num_prompts: args.num_prompts,
        random_input_len: args.random_input_len,
        random_output_len: args.random_output_len,
        random_range_ratio: args.random_range_ratio,
        seed: args.seed,
        cancel_fraction: args.cancel_fraction,
        prompt_token_source: if counted { "tokenize" } else { "estimate" }.into(),
        completed,
        failed,
        cancelled,
        total_input_tokens: input_tokens,
        total_output_tokens: output_tokens,
        duration,
        request_throughput: completed as f64 / duration,
        output_throughput: output_tokens as f64 / duration,
        total_token_throughput: (input_tokens + output_tokens) as f64 / duration,
        max_concurrency: args.max_concurrency,
        request_rate: if args.request_rate.is_finite() {
            json!(args.request_rate)
        } else {
            json!("inf")
        },
        latencies,
        errors,
        server_kv_cache_usage_after: server.and_then(|s| s.kv_cache_usage),
        server_num_requests_running_after: server.and_then(|s| s.num_requests_running),
        server_num_requests_waiting_after: server.and_then(|s| s.num_requests_waiting),
        server_drain_wait_s: run.server_after.map(|s| s.1),
        server_prefix_cache_hit_rate: server
            .zip(run.server_before)
            .and_then(|(after, before)| after.prefix_cache_hit_rate_since(&before)),
    }
}

/// Prints the report in the layout of vLLM's `bench serve`.
pub(super) fn print_table(r: &ServeReport) {
    let row = |label: &str, value: String| println!("{label:<40} {value:<10}");
    let rule = |title: &str| println!("{title:-^50}");
    println!("{:=^50}", " Serving Benchmark Result ");
    row("Successful requests:", r.completed.to_string());
    row("Cancelled requests:", r.cancelled.to_string());
    row("Failed requests:", r.failed.to_string());
    row(
        "Maximum request concurrency:",
        r.max_concurrency
            .map_or_else(|| "none".to_owned(), |c| c.to_string()),
    );
    row(
        "Request rate configured (RPS):",
        match &r.request_rate {
            Value::String(s) => s.clone(),
            v => format!("{:.2}", v.as_f64().unwrap_or_default()),
        },
    );
    row("Benchmark duration (s):", format!("{:.2}", r.duration));
    row("Total input tokens:", r.total_input_tokens.to_string());
    row("Total generated tokens:", r.total_output_tokens.to_string());
    row(
        "Request throughput (req/s):",
        format!("{:.2}", r.request_throughput),
    );
    row(
        "Output token throughput (tok/s):",
        format!("{:.2}", r.output_throughput),
    );
    row(
        "Total Token throughput (tok/s):",
        format!("{:.2}", r.total_token_throughput),
    );
    let latency = |key: &str| r.latencies.get(key).copied().unwrap_or_default();
    for (title, name, label) in [
        ("Time to First Token", "ttft", "TTFT"),
        ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
        ("Inter-token Latency", "itl", "ITL"),
        ("End-to-end Latency", "e2el", "E2EL"),
    ] {
        rule(title);
        for stat in ["mean", "median", "p99"] {
            let mut pretty = stat.to_owned();
            pretty[..1].make_ascii_uppercase();
            if stat == "p99" {
                pretty = "P99".into();
            }
            row(
                &format!("{pretty} {label} (ms):"),
                format!("{:.2}", latency(&format!("{stat}_{name}_ms"))),
            );
        }
    }
    if r.server_drain_wait_s.is_some() {
        rule("Server after the run");
        let show =
            |v: Option<f64>, scale: f64| v.map_or("-".into(), |v| format!("{:.1}", v * scale));
        row(
            "KV cache usage (%):",
            show(r.server_kv_cache_usage_after, 100.0),
        );
        row(
            "Requests running:",
            show(r.server_num_requests_running_after, 1.0),
        );
        row(
            "Requests waiting:",
            show(r.server_num_requests_waiting_after, 1.0),
        );
        row(
            "Prefix cache hit rate in the run (%):",
            show(r.server_prefix_cache_hit_rate, 100.0),
        );
    }
    if !r.errors.is_empty() {
        rule("Errors");
        for (message, n) in &r.errors {
            println!("{n:>6}  {message}");
        }
    }
    println!("{}", "=".repeat(50));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn summary_matches_numpy_on_an_unsorted_sample() {
        // numpy: mean 2.5, median 2.5, std 1.118033988749895, percentile(99) 3.97.
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]);
        assert!(close(s.mean, 2.5) && close(s.median, 2.5), "{s:?}");
        assert!(close(s.std, 1.25f64.sqrt()), "{s:?}");
        assert!(close(s.p99, 3.97), "{s:?}");
        // numpy: percentile(range(101), 99) == 99, median of an odd count is the middle value.
        let hundred: Vec<f64> = (0..=100).rev().map(f64::from).collect();
        let s = summarize(&hundred);
        assert!(close(s.p99, 99.0) && close(s.median, 50.0), "{s:?}");
    }

    #[test]
    fn summary_of_nothing_is_zero_and_of_one_value_is_that_value() {
        assert_eq!(summarize(&[]), Summary::default());
        let s = summarize(&[7.5]);
        assert_eq!((s.mean, s.median, s.std, s.p99), (7.5, 7.5, 0.0, 7.5));
    }
}
