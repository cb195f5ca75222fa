//! What goes over the wire to the server under test: request bodies, the SSE lines of a
//! streamed answer, `/tokenize` (prompt counts before the run) and `/metrics` (load after it).
//! The parsers are pure; only `count_prompt_tokens` and `server_after` do I/O.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use super::{Endpoint, Planned};

/// What one SSE `data:` line said.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Chunk {
    pub(super) done: bool,
    pub(super) has_text: bool,
    /// `(prompt_tokens, completion_tokens)`.
    pub(super) usage: Option<(u64, u64)>,
    pub(super) error: Option<String>,
}

/// Reads one SSE line. Comments (keep-alives) and other fields say nothing; text is
/// `choices[].text` (completions) or `choices[].delta.content` (chat).
pub(super) fn parse_sse_line(line: &str) -> Chunk {
    let Some(data) = line.strip_prefix("data:") else {
        return Chunk::default();
    };
    let data = data.trim();
    if data == "[DONE]" {
        return Chunk {
            done: true,
            ..Chunk::default()
        };
    }
    let value: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(e) => {
            return Chunk {
                error: Some(format!("unparsable chunk ({e})")),
                ..Chunk::default()
            }
        }
    };
    if let Some(error) = value.get("error") {
        return Chunk {
            error: Some(error_text(error)),
            ..Chunk::default()
        };
    }
    let has_text = value["choices"].as_array().is_some_and(|choices| {
        choices.iter().any(|c| {
            let text = c.get("text").or_else(|| c.pointer("/delta/content"));
            text.and_then(Value::as_str).is_some_and(|t| !t.is_empty())
        })
    });
    let usage = value.get("usage").and_then(|u| {
        Some((
            u.get("prompt_tokens")?.as_u64()?,
            u.get("completion_tokens")?.as_u64()?,
        ))
    });
    Chunk {
        has_text,
        usage,
        ..Chunk::default()
    }
}

/// The message of an OpenAI error object (or the JSON itself when it has none).
pub(super) fn error_text(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .or_else(|| error.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| error.to_string())
}

/// The body of one request: its prompt and length, the sampling fields (`ServeArgs::sampling`),
/// then `extra` (`--extra-body`) over all of them.
pub(super) fn request_body(
    endpoint: Endpoint,
    model: &str,
    planned: &Planned,
    sampling: &serde_json::Map<String, Value>,
    extra: &serde_json::Map<String, Value>,
) -> Value {
    let mut body = json!({
        "model": model,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    match endpoint {
        Endpoint::Completions => {
            body["prompt"] = json!(planned.prompt);
            body["max_tokens"] = json!(planned.output_len);
        }
        Endpoint::Chat => {
            body["messages"] = json!([{"role": "user", "content": planned.prompt}]);
            body["max_completion_tokens"] = json!(planned.output_len);
        }
    }
    for (key, value) in sampling.iter().chain(extra) {
        body[key] = value.clone();
    }
    body
}

/// The sum over label sets of a Prometheus sample named `name`, if any line has it.
pub(super) fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rfind('}').map(|i| &rest[i + 1..])
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None // a longer name with this prefix
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// What the server's `/metrics` says, under vLLM's names; `None` where it lacks a metric.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(super) struct ServerMetrics {
    pub(super) kv_cache_usage: Option<f64>,
    pub(super) num_requests_running: Option<f64>,
    pub(super) num_requests_waiting: Option<f64>,
    /// Counters since the server started, in tokens.
    pub(super) prefix_cache_queries: Option<f64>,
    pub(super) prefix_cache_hits: Option<f64>,
}

impl ServerMetrics {
    /// Reads a Prometheus text page; `None` when it has none of the metrics.
    pub(super) fn parse(text: &str) -> Option<Self> {
        let metrics = Self {
            kv_cache_usage: metric_sum(text, "vllm:kv_cache_usage_perc"),
            num_requests_running: metric_sum(text, "vllm:num_requests_running"),
            num_requests_waiting: metric_sum(text, "vllm:num_requests_waiting"),
            prefix_cache_queries: metric_sum(text, "vllm:prefix_cache_queries_total"),
            prefix_cache_hits: metric_sum(text, "vllm:prefix_cache_hits_total"),
        };
        (metrics != Self::default()).then_some(metrics)
    }

    /// Prefix-cache hits over queries between `before` and `self`, when both have the counters.
    pub(super) fn prefix_cache_hit_rate_since(&self, before: &Self) -> Option<f64> {
        let queries = self.prefix_cache_queries? - before.prefix_cache_queries?;
        let hits = self.prefix_cache_hits? - before.prefix_cache_hits?;
        (queries > 0.0).then_some(hits / queries)
    }
}

/// Reads `/metrics` once; `None` when the server has none (or none of vLLM's metrics).
pub(super) async fn server_metrics(client: &reqwest::Client, base: &str) -> Option<ServerMetrics> {
    let response = client
        .get(format!("{base}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    ServerMetrics::parse(&response.text().await.ok()?)
}

/// Reads `/metrics` until no request is running or waiting, for at most 10 s; returns the last
/// reading and the seconds waited.
pub(super) async fn server_after(
    client: &reqwest::Client,
    base: &str,
) -> Option<(ServerMetrics, f64)> {
    let started = Instant::now();
    loop {
        let after = server_metrics(client, base).await?;
        let busy =
            after.num_requests_running.unwrap_or(0.0) + after.num_requests_waiting.unwrap_or(0.0);
        if busy == 0.0 || started.elapsed() >= Duration::from_secs(10) {
            return Some((after, started.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Counts the prompts with the server's `/tokenize`, eight at a time. `false` (and the word
/// counts kept) when the server has none.
pub(super) async fn count_prompt_tokens(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    endpoint: Endpoint,
    plans: &mut [Planned],
) -> bool {
    let url = format!("{base}/tokenize");
    let count = |prompt: String| {
        let body = match endpoint {
            Endpoint::Completions => json!({"model": model, "prompt": prompt}),
            Endpoint::Chat => {
                json!({"model": model, "messages": [{"role": "user", "content": prompt}]})
            }
        };
        let request = client.post(&url).json(&body).send();
        async move {
            let response = request.await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let value: Value = response.json().await.ok()?;
            value.get("count")?.as_u64().map(|c| c as usize)
        }
    };
    if count(plans[0].prompt.clone()).await.is_none() {
        return false;
    }
    let counts: Vec<Option<usize>> =
        futures::stream::iter(plans.iter().map(|p| count(p.prompt.clone())))
            .buffered(8)
            .collect()
            .await;
    for (plan, n) in plans.iter_mut().zip(counts) {
        if let Some(n) = n {
            plan.prompt_len = n;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_lines_of_both_endpoints_are_read() {
        let text = parse_sse_line(r#"data: {"choices":[{"index":0,"text":" the"}]}"#);
        assert!(text.has_text && !text.done && text.usage.is_none());
        let empty =
            parse_sse_line(r#"data: {"choices":[{"index":0,"text":"","finish_reason":"length"}]}"#);
        assert!(!empty.has_text);
        let chat = parse_sse_line(r#"data:{"choices":[{"delta":{"content":"hi"}}]}"#);
        assert!(chat.has_text);
        let role = parse_sse_line(r#"data: {"choices":[{"delta":{"role":"assistant"}}]}"#);
        assert!(!role.has_text);
        let usage = parse_sse_line(
            r#"data: {"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#,
        );
        assert_eq!(usage.usage, Some((12, 5)));
        assert!(parse_sse_line("data: [DONE]").done);
        assert_eq!(parse_sse_line(": keep-alive"), Chunk::default());
        let error =
            parse_sse_line(r#"data: {"error":{"message":"worker failed","type":"server_error"}}"#);
        assert_eq!(error.error.as_deref(), Some("worker failed"));
        assert!(parse_sse_line("data: {oops").error.is_some());
    }

    #[test]
    fn prometheus_samples_are_summed_over_labels_and_longer_names_ignored() {
        let text = "# HELP vllm:num_requests_running x\n\
                    vllm:num_requests_running{model_name=\"a b\"} 2\n\
                    vllm:num_requests_running{model_name=\"c\"} 3 1700000000\n\
                    vllm:num_requests_running_total 99\n\
                    vllm:kv_cache_usage_perc 0.25\n";
        assert_eq!(metric_sum(text, "vllm:num_requests_running"), Some(5.0));
        assert_eq!(metric_sum(text, "vllm:kv_cache_usage_perc"), Some(0.25));
        assert_eq!(metric_sum(text, "vllm:num_requests_waiting"), None);
    }

    #[test]
    fn the_prefix_cache_hit_rate_is_taken_between_two_readings() {
        let page = |q: u32, h: u32| {
            format!(
                "vllm:prefix_cache_queries_total{{model_name=\"m\"}} {q}\n\
                 vllm:prefix_cache_hits_total{{model_name=\"m\"}} {h}\n"
            )
        };
        let before = ServerMetrics::parse(&page(100, 40)).unwrap();
        let after = ServerMetrics::parse(&page(300, 90)).unwrap();
        assert_eq!(after.prefix_cache_hit_rate_since(&before), Some(0.25));
        assert_eq!(before.prefix_cache_hit_rate_since(&before), None);
        assert_eq!(ServerMetrics::parse("# nothing here\nup 1\n"), None);
    }
}
