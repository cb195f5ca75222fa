//! Prometheus metrics under vLLM's names (`vllm:num_requests_running`, ...), so dashboards,
//! autoscalers and gateways built for vLLM work unchanged. A small hand-written registry: atomic
//! counters, gauges and fixed-bucket histograms that the engine actor updates and `/metrics`
//! renders in the text exposition format. Updating is a few atomic adds; rendering allocates.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::adapters::LoraMetrics;
use crate::engine::FinishReason;

/// A float stored in an atomic, for gauges and sums.
#[derive(Debug, Default)]
struct AtomicF64(AtomicU64);

impl AtomicF64 {
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    fn add(&self, v: f64) {
        let mut cur = self.0.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self
                .0
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }
}

/// A histogram with fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum: AtomicF64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicF64::default(),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.add(v);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

// vLLM's bucket bounds for these histograms.
const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
const ITL: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
// Ours: structured outputs' mask computation, 50 µs to 100 ms.
const MASK: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];
const REQUEST: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// The KV cache's configuration, exported as vLLM's `vllm:cache_config_info` (an info gauge:
/// value 1, the facts in its labels).
#[derive(Debug, Clone)]
pub struct CacheConfigInfo {
    pub block_size: usize,
    /// What the cache stores: the compute dtype's name or `fp8_e4m3` (vLLM gives the flag's
    /// value, `auto` included; this is what `auto` resolved to).
    pub cache_dtype: String,
    pub num_gpu_blocks: u64,
    pub gpu_memory_utilization: f32,
    pub enable_prefix_caching: bool,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    model_name: String,
    /// Set once at start.
    cache_config: std::sync::OnceLock<CacheConfigInfo>,
    /// Sequences in the running batch.
    pub num_requests_running: AtomicU64,
    /// Sequences waiting for their first step.
    pub num_requests_waiting: AtomicU64,
    kv_cache_usage: AtomicF64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_cache_queries: AtomicU64,
    /// Of those, tokens found.
    pub prefix_cache_hits: AtomicU64,
    /// Prompt tokens of admitted sequences.
    pub prompt_tokens: AtomicU64,
    /// Generated tokens.
    pub generation_tokens: AtomicU64,
    /// Preemptions by recompute.
    pub num_preemptions: AtomicU64,
    success_stop: AtomicU64,
    success_length: AtomicU64,
    success_abort: AtomicU64,
    /// Arrival to first token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of a sequence.
    pub inter_token_latency: Histogram,
    /// Arrival to last token.
    pub e2e_request_latency: Histogram,
    /// Arrival to first scheduled.
    pub request_queue_time: Histogram,
    /// Computing one guided sequence's allowed-token mask on the engine loop (structured
    /// outputs).
    pub structured_output_mask_time: Histogram,
    /// LoRA series (rendered with `--enable-lora` only).
    pub lora: LoraMetrics,
}

impl Metrics {
    /// An empty registry whose series carry `model_name`.
    pub fn new(model_name: &str) -> Self {
        Self {
            model_name: model_name.replace('\\', "\\\\").replace('"', "\\\""),
            cache_config: std::sync::OnceLock::new(),
            num_requests_running: AtomicU64::new(0),
            num_requests_waiting: AtomicU64::new(0),
            kv_cache_usage: AtomicF64::default(),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            num_preemptions: AtomicU64::new(0),
            success_stop: AtomicU64::new(0),
            success_length: AtomicU64::new(0),
            success_abort: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT),
            inter_token_latency: Histogram::new(ITL),
            e2e_request_latency: Histogram::new(REQUEST),
            request_queue_time: Histogram::new(REQUEST),
            structured_output_mask_time: Histogram::new(MASK),
            lora: LoraMetrics::default(),
        }
    }

    /// Records the KV cache's configuration (the first call wins).
    pub fn set_cache_config(&self, info: CacheConfigInfo) {
        let _ = self.cache_config.set(info);
    }

    /// Sets the KV cache usage (0..=1).
    pub fn set_kv_cache_usage(&self, fraction: f64) {
        self.kv_cache_usage.set(fraction);
    }

    /// Counts a sequence that finished.
    pub fn count_success(&self, reason: FinishReason) {
        match reason {
            FinishReason::Stop => &self.success_stop,
            FinishReason::Length => &self.success_length,
            FinishReason::Abort => &self.success_abort,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// Renders everything in Prometheus' text format.
    pub fn render(&self) -> String {
        let m = &self.model_name;
        let mut out = String::with_capacity(8 << 10);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{m}\"}} {v}"
            );
        };
        gauge(
            &mut out,
            "vllm:num_requests_running",
            "Number of requests in the running batch.",
            load(&self.num_requests_running) as f64,
        );
        gauge(
            &mut out,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            load(&self.num_requests_waiting) as f64,
        );
        gauge(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            self.kv_cache_usage.get(),
        );
        if let Some(c) = self.cache_config.get() {
            let _ = writeln!(
                out,
                "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n\
                 # TYPE vllm:cache_config_info gauge\n\
                 vllm:cache_config_info{{block_size=\"{}\",cache_dtype=\"{}\",\
                 enable_prefix_caching=\"{}\",gpu_memory_utilization=\"{}\",\
                 model_name=\"{m}\",num_gpu_blocks=\"{}\"}} 1",
                c.block_size,
                c.cache_dtype,
                if c.enable_prefix_caching {
                    "True"
                } else {
                    "False"
                },
                c.gpu_memory_utilization,
                c.num_gpu_blocks
            );
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name}_total {help}\n# TYPE {name}_total counter\n{name}_total{{model_name=\"{m}\"}} {v}");
        };
        counter(
            &mut out,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            load(&self.prefix_cache_queries),
        );
        counter(
            &mut out,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            load(&self.prefix_cache_hits),
        );
        counter(
            &mut out,
            "vllm:prompt_tokens",
            "Number of prefill tokens processed.",
            load(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            load(&self.generation_tokens),
        );
        counter(
            &mut out,
            "vllm:num_preemptions",
            "Cumulative number of preemptions.",
            load(&self.num_preemptions),
        );
        let _ = writeln!(out, "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter");
        for (reason, v) in [
            ("stop", &self.success_stop),
            ("length", &self.success_length),
            ("abort", &self.success_abort),
        ] {
            let _ = writeln!(
                out,
                "vllm:request_success_total{{finished_reason=\"{reason}\",model_name=\"{m}\"}} {}",
                load(v)
            );
        }
        for (name, help, h) in [
            (
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                &self.time_to_first_token,
            ),
            (
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                &self.inter_token_latency,
            ),
            (
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                &self.e2e_request_latency,
            ),
            (
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                &self.request_queue_time,
            ),
            (
                "tpserve:structured_output_mask_seconds",
                "Histogram of the time to compute one structured-output token mask, in seconds.",
                &self.structured_output_mask_time,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            let mut cumulative = 0u64;
            for (b, c) in h.bounds.iter().zip(&h.buckets) {
                cumulative += load(c);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{le=\"{b}\",model_name=\"{m}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"+Inf\",model_name=\"{m}\"}} {}",
                h.count()
            );
            let _ = writeln!(out, "{name}_sum{{model_name=\"{m}\"}} {}", h.sum.get());
            let _ = writeln!(out, "{name}_count{{model_name=\"{m}\"}} {}", h.count());
        }
        self.lora.render(&mut out, m);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_carry_total() {
        let m = Metrics::new("smol\"lm");
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(0.05);
        m.time_to_first_token.observe(1e6);
        m.generation_tokens.fetch_add(5, Ordering::Relaxed);
        m.count_success(FinishReason::Length);
        let text = m.render();
        assert!(
            text.contains(
                "vllm:time_to_first_token_seconds_bucket{le=\"0.005\",model_name=\"smol\\\"lm\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{le=\"0.06\",model_name=\"smol\\\"lm\"} 2"
        ));
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{le=\"+Inf\",model_name=\"smol\\\"lm\"} 3"
        ));
        assert!(text.contains("vllm:generation_tokens_total{model_name=\"smol\\\"lm\"} 5"));
        assert!(text.contains(
            "vllm:request_success_total{finished_reason=\"length\",model_name=\"smol\\\"lm\"} 1"
        ));
    }

    #[test]
    fn cache_config_info_is_rendered_once_set() {
        let m = Metrics::new("m");
        assert!(!m.render().contains("vllm:cache_config_info"));
        m.set_cache_config(CacheConfigInfo {
            block_size: 16,
            cache_dtype: "fp8_e4m3".into(),
            num_gpu_blocks: 1234,
            gpu_memory_utilization: 0.9,
            enable_prefix_caching: true,
        });
        let text = m.render();
        assert!(
            text.contains(
                "vllm:cache_config_info{block_size=\"16\",cache_dtype=\"fp8_e4m3\",\
                 enable_prefix_caching=\"True\",gpu_memory_utilization=\"0.9\",\
                 model_name=\"m\",num_gpu_blocks=\"1234\"} 1"
            ),
            "{text}"
        );
    }
}
