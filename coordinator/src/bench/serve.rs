//! `tpserve bench serve`: a load client for any OpenAI-compatible server (ours or vLLM), the
//! counterpart of vLLM's `vllm bench serve` with its random dataset.
//!
//! Prompts are random text from a fixed list of common English words (about one token per word
//! for GPT-2-style BPE, where " word" is one token), so no tokenizer is needed client-side; when
//! the server has `POST /tokenize` each prompt is counted there once before the run. Every request
//! streams with `ignore_eos` and `max_tokens` set, so output lengths are exact; TTFT and
//! inter-token latencies come from the arrival times of SSE chunks that carry text.
//!
//! Invariant: every request ends as exactly one of completed, cancelled (abandoned by us on
//! purpose, `--cancel-fraction`) or failed (with the server's error, or "timeout"); a request
//! unaccounted for fails the run. Costs: one task and one connection per in-flight request; all
//! per-request timings are kept in memory until the end.

mod report;
mod wire;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tpserve_term::human;
use tpserve_term::progress::{Task, Unit};

use report::{print_table, report, Run};
pub use report::{summarize, ServeReport, Summary};
use wire::{
    count_prompt_tokens, error_text, parse_sse_line, request_body, server_after, server_metrics,
};

/// Flags of `tpserve bench serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The server, scheme and authority (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub base_url: String,
    /// `/v1/completions` or `/v1/chat/completions`.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// The model name sent in every request.
    #[arg(long)]
    pub model: String,
    /// Requests to send.
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Prompt length in tokens (about one word each).
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    /// Tokens to generate per request (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)], as vLLM does; 0 <= r < 1.
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Poisson arrivals at this many requests/s; `inf` sends everything at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    pub request_rate: f64,
    /// Most requests in flight at once (default: no cap).
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Seed of the prompts, lengths, arrivals and cancellations. Give each run against the same
    /// server its own seed: repeated prompts are served from its prefix cache.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fraction of requests abandoned on purpose at a random point of their stream, to check
    /// that the server survives it and frees their KV blocks.
    #[arg(long, default_value_t = 0.0)]
    pub cancel_fraction: f64,
    /// Seconds after which a request that has not ended counts as failed ("timeout").
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,
    /// Write the results here as JSON, with vLLM's key names.
    #[arg(long)]
    pub result_json: Option<PathBuf>,
    /// Sampling temperature of every request (vLLM's flag); 0, the default, is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// `top_p` of every request (vLLM's flag); unset: not sent.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f64>,
    /// `top_k` of every request (vLLM's flag; -1 turns it off); unset: not sent.
    #[arg(long, allow_negative_numbers = true)]
    pub top_k: Option<i64>,
    /// `min_p` of every request (vLLM's flag); unset: not sent.
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f64>,
    /// A JSON object merged into every request's body (vLLM's `--extra-body`): for servers that
    /// ignore `ignore_eos`, e.g. `{"logit_bias": {"2": -100}}` keeps llama.cpp's from ending early.
    #[arg(long)]
    pub extra_body: Option<String>,
    /// LoRA adapters served by the server (vLLM's flag): request i names adapter i modulo their
    /// number as its `model` instead of `--model`, so a run spreads evenly over them.
    #[arg(long, num_args = 1..)]
    pub lora_modules: Vec<String>,
}

/// Which OpenAI endpoint the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl ServeArgs {
    /// Checks the flags against each other.
    fn validate(&self) -> anyhow::Result<Endpoint> {
        let endpoint = match self.endpoint.as_str() {
            "/v1/completions" => Endpoint::Completions,
            "/v1/chat/completions" => Endpoint::Chat,
            other => {
                bail!("--endpoint must be /v1/completions or /v1/chat/completions, not {other:?}")
            }
        };
        if !self.base_url.starts_with("http://") {
            bail!(
                "--base-url must start with http:// (no TLS in this client), not {:?}",
                self.base_url
            );
        }
        if self.num_prompts == 0 || self.random_input_len == 0 || self.random_output_len == 0 {
            bail!("--num-prompts, --random-input-len and --random-output-len must be positive");
        }
        if !(0.0..1.0).contains(&self.random_range_ratio) {
            bail!(
                "--random-range-ratio must be in [0, 1), not {}",
                self.random_range_ratio
            );
        }
        if self.request_rate.is_nan() || self.request_rate <= 0.0 {
            bail!(
                "--request-rate must be positive (or inf), not {}",
                self.request_rate
            );
        }
        if self.max_concurrency == Some(0) {
            bail!("--max-concurrency must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.cancel_fraction) {
            bail!(
                "--cancel-fraction must be in [0, 1], not {}",
                self.cancel_fraction
            );
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!(
                "--temperature must be a finite number >= 0, not {}",
                self.temperature
            );
        }
        if let Some(p) = self.top_p.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            bail!("--top-p must be in (0, 1], not {p}");
        }
        if let Some(k) = self.top_k.filter(|k| *k < -1) {
            bail!("--top-k must be -1 (off) or at least 0, not {k}");
        }
        if let Some(p) = self.min_p.filter(|p| !(0.0..=1.0).contains(p)) {
            bail!("--min-p must be in [0, 1], not {p}");
        }
        if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
            bail!(
                "--request-timeout must be positive seconds, not {}",
                self.request_timeout
            );
        }
        Ok(endpoint)
    }

    /// The sampling fields every request carries: `temperature`, and the others that were given.
    fn sampling(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("temperature".into(), self.temperature.into());
        if let Some(p) = self.top_p {
            fields.insert("top_p".into(), p.into());
        }
        if let Some(k) = self.top_k {
            fields.insert("top_k".into(), k.into());
        }
        if let Some(p) = self.min_p {
            fields.insert("min_p".into(), p.into());
        }
        fields
    }
}

/// Common English words, each one GPT-2-style BPE token when preceded by a space.
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "that", "with", "on", "as", "by", "at",
    "from", "his", "her", "it", "an", "are", "were", "which", "this", "be", "or", "had", "not",
    "but", "their", "first", "one", "new", "after", "also", "who", "they", "two", "has", "have",
    "been", "its", "all", "there", "time", "more", "would", "when", "into", "other", "year",
    "some", "over", "city", "only", "people", "most", "world", "where", "many", "state", "out",
    "about", "than", "school", "three", "then", "made", "part", "during", "well", "between",
    "used", "under", "water", "house", "family", "early", "life", "second", "work", "being",
    "through", "game", "known", "before", "began", "film", "team", "day", "against", "each",
    "name", "left", "music", "show", "while", "long", "around", "small", "place", "book", "war",
    "number", "area", "great", "high", "back", "line", "found", "old", "end", "way", "same",
    "river", "good", "home", "light", "road", "market", "power", "story", "model", "system",
    "group", "street", "church", "north", "south", "west", "east", "side", "land", "field", "week",
    "night", "open", "point", "short", "black", "white", "red", "green", "blue", "king", "head",
    "hand", "eyes", "face", "door", "table", "paper", "money", "young", "free", "law", "art",
    "sea", "air", "fire", "food", "child", "friend", "party", "death", "order", "case",
];

/// One request, decided before the run.
struct Planned {
    prompt: String,
    /// Prompt tokens: from `/tokenize`, else the word count.
    prompt_len: usize,
    output_len: usize,
    /// Abandon after this many text chunks (0: right after the response headers).
    cancel_after: Option<usize>,
}

/// A draw from [len * (1 - r), len * (1 + r)], at least 1 (vLLM's random dataset).
fn draw_len(rng: &mut StdRng, len: usize, ratio: f64) -> usize {
    let lo = ((len as f64 * (1.0 - ratio)).floor() as usize).max(1);
    let hi = ((len as f64 * (1.0 + ratio)).floor() as usize).max(lo);
    rng.gen_range(lo..=hi)
}

/// Random text of `words` words.
fn random_text(rng: &mut StdRng, words: usize) -> String {
    let mut text = String::with_capacity(words * 6);
    for i in 0..words {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
    }
    text
}

/// The prompts, lengths and cancellation points of a run, all from `args.seed`.
fn plan(args: &ServeArgs) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut plans: Vec<Planned> = (0..args.num_prompts)
        .map(|_| {
            let input_len = draw_len(&mut rng, args.random_input_len, args.random_range_ratio);
            let output_len = draw_len(&mut rng, args.random_output_len, args.random_range_ratio);
            Planned {
                prompt: random_text(&mut rng, input_len),
                prompt_len: input_len,
                output_len,
                cancel_after: None,
            }
        })
        .collect();
    let cancels = (args.cancel_fraction * args.num_prompts as f64).round() as usize;
    let mut order: Vec<usize> = (0..plans.len()).collect();
    order.shuffle(&mut rng);
    for &i in order.iter().take(cancels) {
        let out = plans[i].output_len;
        plans[i].cancel_after = Some(rng.gen_range(0..out));
    }
    plans
}

/// How one request ended.
#[derive(Debug)]
enum Outcome {
    Completed(Completed),
    Cancelled,
    Failed(String),
}

/// The timings of a completed request, in seconds.
#[derive(Debug)]
struct Completed {
    /// `usage.prompt_tokens` of the last chunk, when the server sent it.
    usage_prompt_tokens: Option<u64>,
    output_tokens: u64,
    ttft: f64,
    itls: Vec<f64>,
    e2el: f64,
}

/// Sends one request and reads its stream to the end, or to its cancellation point.
async fn send(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    cancel_after: Option<usize>,
) -> Outcome {
    let started = Instant::now();
    let response = match client.post(url).json(body).send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("sending: {e}")),
    };
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").map(error_text))
            .unwrap_or(text);
        return Outcome::Failed(format!("HTTP {}: {message}", status.as_u16()));
    }
    if cancel_after == Some(0) {
        // Dropping the response closes the connection: the server sees the client leave.
        return Outcome::Cancelled;
    }
    let mut stream = response.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let (mut first, mut last_text) = (None::<Instant>, None::<Instant>);
    let (mut text_chunks, mut itls, mut usage) = (0usize, Vec::new(), None);
    while let Some(bytes) = stream.next().await {
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => return Outcome::Failed(format!("reading the stream: {e}")),
        };
        // One arrival time for everything in this read, as vLLM's client does.
        let now = Instant::now();
        pending.extend_from_slice(&bytes);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let chunk = parse_sse_line(line.trim_end());
            if let Some(error) = chunk.error {
                return Outcome::Failed(error);
            }
            if chunk.has_text {
                match last_text {
                    Some(previous) => itls.push((now - previous).as_secs_f64()),
                    None => first = Some(now),
                }
                last_text = Some(now);
                text_chunks += 1;
                if cancel_after == Some(text_chunks) {
                    return Outcome::Cancelled;
                }
            }
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
            if chunk.done {
                let Some(first) = first else {
                    return Outcome::Failed("the stream ended without any text".into());
                };
                return Outcome::Completed(Completed {
                    usage_prompt_tokens: usage.map(|u| u.0),
                    output_tokens: usage.map_or(text_chunks as u64, |u| u.1),
                    ttft: (first - started).as_secs_f64(),
                    itls,
                    e2el: (now - started).as_secs_f64(),
                });
            }
        }
    }
    Outcome::Failed("the stream ended without [DONE]".into())
}

/// The run's counters, shown as its progress (a bar on a terminal, a line every few seconds in a
/// log) while it goes on.
struct Progress {
    completed: AtomicUsize,
    cancelled: AtomicUsize,
    failed: AtomicUsize,
    in_flight: AtomicUsize,
    task: Task,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self {
            completed: AtomicUsize::new(0),
            cancelled: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            task: Task::new("bench serve", total as u64, Unit::items("requests")),
        }
    }

    /// Shows the counters as they are now.
    fn show(&self) {
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let (c, x, f) = (
            load(&self.completed),
            load(&self.cancelled),
            load(&self.failed),
        );
        self.task.set_position((c + x + f) as u64);
        self.task.set_message(format!(
            "{c} completed, {x} cancelled, {f} failed; {} in flight",
            load(&self.in_flight)
        ));
    }

    /// The closing line.
    fn line(&self, total: usize, elapsed: f64) -> String {
        let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let (c, x, f) = (
            load(&self.completed),
            load(&self.cancelled),
            load(&self.failed),
        );
        format!(
            "{}/{total} done in {}: {c} completed, {x} cancelled, {f} failed",
            c + x + f,
            human::seconds(elapsed)
        )
    }
}
/// Runs the benchmark, prints a table and optionally writes JSON. Fails when a request is
/// unaccounted for (after writing the JSON).
pub async fn run(args: ServeArgs) -> anyhow::Result<ServeReport> {
    let endpoint = args.validate()?;
    let base = args.base_url.trim_end_matches('/').to_owned();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let extra: serde_json::Map<String, serde_json::Value> = match &args.extra_body {
        Some(text) => serde_json::from_str(text).context("--extra-body must be a JSON object")?,
        None => serde_json::Map::new(),
    };
    let sampling = args.sampling();
    let mut plans = plan(&args);
    let counted = count_prompt_tokens(&client, &base, &args.model, endpoint, &mut plans).await;
    let url = format!("{base}{}", args.endpoint);
    let total = plans.len();
    let prompt_lens: Vec<usize> = plans.iter().map(|p| p.prompt_len).collect();
    eprintln!(
        "sending {total} requests to {url}: {} prompt tokens on average ({}), {} output tokens on average",
        prompt_lens.iter().sum::<usize>() / total,
        if counted { "counted by /tokenize" } else { "estimated" },
        plans.iter().map(|p| p.output_len).sum::<usize>() / total,
    );

    let server_before = server_metrics(&client, &base).await;
    let progress = Arc::new(Progress::new(total));
    let started = Instant::now();

    let semaphore = args.max_concurrency.map(|c| Arc::new(Semaphore::new(c)));
    let timeout = Duration::from_secs_f64(args.request_timeout);
    let mut arrivals = StdRng::seed_from_u64(args.seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut next_arrival = 0.0f64;
    let mut tasks = JoinSet::new();
    for (index, planned) in plans.into_iter().enumerate() {
        if args.request_rate.is_finite() {
            tokio::time::sleep_until((started + Duration::from_secs_f64(next_arrival)).into())
                .await;
            // Exponential gaps: a Poisson process of `request_rate` per second.
            let u: f64 = arrivals.gen_range(f64::EPSILON..1.0);
            next_arrival += -u.ln() / args.request_rate;
        }
        let permit = match &semaphore {
            Some(s) => Some(Arc::clone(s).acquire_owned().await?),
            None => None,
        };
        let model = match args.lora_modules.len() {
            0 => &args.model,
            n => &args.lora_modules[index % n],
        };
        let body = request_body(endpoint, model, &planned, &sampling, &extra);
        let (client, url, progress) = (client.clone(), url.clone(), Arc::clone(&progress));
        progress.in_flight.fetch_add(1, Ordering::Relaxed);
        progress.show();
        tasks.spawn(async move {
            let outcome =
                tokio::time::timeout(timeout, send(&client, &url, &body, planned.cancel_after))
                    .await
                    .unwrap_or_else(|_| Outcome::Failed("timeout".into()));
            let counter = match &outcome {
                Outcome::Completed(_) => &progress.completed,
                Outcome::Cancelled => &progress.cancelled,
                Outcome::Failed(_) => &progress.failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            progress.in_flight.fetch_sub(1, Ordering::Relaxed);
            progress.show();
            drop(permit);
            (index, outcome)
        });
    }
    let mut outcomes: Vec<Option<Outcome>> = (0..total).map(|_| None).collect();
    let mut lost = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((index, outcome)) => outcomes[index] = Some(outcome),
            Err(e) => lost.push(e.to_string()),
        }
    }
    let duration = started.elapsed().as_secs_f64();
    progress.task.finish();
    eprintln!("{}", progress.line(total, duration));

    let server_after = server_after(&client, &base).await;
    let report = report(
        &args,
        &Run {
            counted,
            prompt_lens: &prompt_lens,
            outcomes: &outcomes,
            duration,
            server_before,
            server_after,
        },
    );
    print_table(&report);
    if let Some(path) = &args.result_json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let unaccounted = outcomes.iter().filter(|o| o.is_none()).count();
    if unaccounted > 0 {
        bail!("{unaccounted} requests are unaccounted for (lost tasks: {lost:?})");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let mut argv = vec!["bench", "--model", "m"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).serve
    }

    #[test]
    fn plans_follow_the_seed_the_length_range_and_the_cancel_fraction() {
        let a = args(&[
            "--num-prompts",
            "200",
            "--random-input-len",
            "100",
            "--random-output-len",
            "10",
            "--random-range-ratio",
            "0.5",
            "--cancel-fraction",
            "0.25",
        ]);
        assert!(a.request_rate.is_infinite());
        let plans = plan(&a);
        let again = plan(&a);
        assert!(plans.iter().zip(&again).all(|(x, y)| x.prompt == y.prompt
            && x.output_len == y.output_len
            && x.cancel_after == y.cancel_after));
        assert!(plans.iter().all(|p| (50..=150).contains(&p.prompt_len)
            && p.prompt.split(' ').count() == p.prompt_len
            && (5..=15).contains(&p.output_len)));
        let cancelled: Vec<&Planned> = plans.iter().filter(|p| p.cancel_after.is_some()).collect();
        assert_eq!(cancelled.len(), 50);
        assert!(cancelled
            .iter()
            .all(|p| p.cancel_after.is_some_and(|k| k < p.output_len)));
        let other_seed = plan(&args(&["--num-prompts", "200", "--seed", "1"]));
        assert_ne!(plans[0].prompt, other_seed[0].prompt);
    }

    #[test]
    fn sampling_flags_reach_every_body_and_extra_body_wins() {
        let planned = plan(&args(&["--num-prompts", "1"])).remove(0);
        let greedy = request_body(
            Endpoint::Completions,
            "m",
            &planned,
            &args(&[]).sampling(),
            &serde_json::Map::new(),
        );
        assert_eq!(greedy["temperature"], 0.0);
        assert!(greedy.get("top_p").is_none() && greedy.get("top_k").is_none());
        let flags = args(&[
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--top-k",
            "-1",
            "--min-p",
            "0.05",
        ]);
        let extra = serde_json::from_str(r#"{"top_p": 0.5, "seed": 3}"#).unwrap();
        let body = request_body(Endpoint::Chat, "m", &planned, &flags.sampling(), &extra);
        assert_eq!(body["temperature"], 0.7);
        assert_eq!(body["top_k"], -1);
        assert_eq!(body["min_p"], 0.05);
        assert_eq!(body["top_p"], 0.5);
        assert_eq!(body["seed"], 3);
        assert!(body.get("messages").is_some());
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(args(&[]).validate().is_ok());
        assert_eq!(
            args(&["--endpoint", "/v1/chat/completions"])
                .validate()
                .ok(),
            Some(Endpoint::Chat)
        );
        for bad in [
            &["--endpoint", "/v1/embeddings"][..],
            &["--base-url", "https://example.com"],
            &["--random-range-ratio", "1"],
            &["--request-rate", "0"],
            &["--max-concurrency", "0"],
            &["--cancel-fraction", "1.5"],
            &["--num-prompts", "0"],
            &["--request-timeout", "0"],
            &["--temperature", "-0.1"],
            &["--top-p", "0"],
            &["--top-p", "1.5"],
            &["--top-k", "-2"],
            &["--min-p", "2"],
        ] {
            assert!(args(bad).validate().is_err(), "{bad:?} was accepted");
        }
    }
}
