//! LoRA metrics: vLLM's `vllm:lora_requests_info` gauge (which adapters are running and
//! waiting, as labels, the value being when it was set) and tpserve's per-adapter request and
//! token counters and adapter load/eviction counters. Rendered only with `--enable-lora`.
//! Updated by the engine actor once per step; a small lock around maps of a few entries.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::AdapterRegistry;

/// Per adapter: requests started, prompt tokens, generated tokens.
#[derive(Debug, Default, Clone, Copy)]
struct PerAdapter {
    requests: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
}

#[derive(Debug, Default)]
struct Info {
    running: Vec<String>,
    waiting: Vec<String>,
    /// Unix seconds when `running`/`waiting` last changed.
    updated: f64,
}

/// The LoRA series.
#[derive(Debug, Default)]
pub struct LoraMetrics {
    /// `--max-loras`; 0: LoRA is off and nothing is rendered.
    max_loras: AtomicU64,
    per_adapter: Mutex<BTreeMap<String, PerAdapter>>,
    info: Mutex<Info>,
    slot_loads: AtomicU64,
    slot_evictions: AtomicU64,
    disk_loads: AtomicU64,
    preloads: AtomicU64,
    /// Microseconds, summed.
    preload_micros: AtomicU64,
    slot_load_micros: AtomicU64,
    /// The adapters served (their load and unload counts).
    registry: OnceLock<Arc<AdapterRegistry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single assignment or add: a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl LoraMetrics {
    /// Turns the series on, with `--max-loras` and the registry of served adapters.
    pub fn enable(&self, max_loras: usize, registry: Arc<AdapterRegistry>) {
        self.max_loras.store(max_loras as u64, Ordering::Relaxed);
        let _ = self.registry.set(registry);
    }

    /// A request of `adapter` produced its first token.
    pub fn count_request(&self, adapter: &str, prompt_tokens: u64) {
        let mut map = lock(&self.per_adapter);
        let e = map.entry(adapter.to_string()).or_default();
        e.requests += 1;
        e.prompt_tokens += prompt_tokens;
    }

    /// A request of `adapter` produced a token.
    pub fn count_generation_token(&self, adapter: &str) {
        lock(&self.per_adapter)
            .entry(adapter.to_string())
            .or_default()
            .generation_tokens += 1;
    }

    /// An adapter was read into every worker's host cache beside the steps, the slowest rank
    /// taking `seconds`.
    pub fn count_preload(&self, seconds: f64) {
        self.preloads.fetch_add(1, Ordering::Relaxed);
        self.preload_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// What a step's adapter placement did on the workers (rank 0's counts, and the seconds
    /// its slot copies took).
    pub fn count_slots(&self, loads: u32, evictions: u32, disk_loads: u32, seconds: f64) {
        self.slot_load_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.slot_loads
            .fetch_add(u64::from(loads), Ordering::Relaxed);
        self.slot_evictions
            .fetch_add(u64::from(evictions), Ordering::Relaxed);
        self.disk_loads
            .fetch_add(u64::from(disk_loads), Ordering::Relaxed);
    }

    /// The adapters of the running and the waiting requests, by name.
    pub fn set_info(&self, mut running: Vec<String>, mut waiting: Vec<String>) {
        running.sort();
        waiting.sort();
        let mut info = lock(&self.info);
        if info.running != running || info.waiting != waiting || info.updated == 0.0 {
            info.running = running;
            info.waiting = waiting;
            info.updated = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
        }
    }

    /// Appends the series (none while LoRA is off).
    pub fn render(&self, out: &mut String, model: &str) {
        let max = self.max_loras.load(Ordering::Relaxed);
        if max == 0 {
            return;
        }
        let info = lock(&self.info);
        let _ = writeln!(
            out,
            "# HELP vllm:lora_requests_info Running stats on lora requests.\n\
             # TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{max}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {}",
            label(&info.running.join(",")),
            label(&info.waiting.join(",")),
            info.updated
        );
        drop(info);
        let per = lock(&self.per_adapter).clone();
        for (name, help, get) in [
            (
                "tpserve:lora_requests",
                "Requests that started generating, per LoRA adapter.",
                (|p: &PerAdapter| p.requests) as fn(&PerAdapter) -> u64,
            ),
            (
                "tpserve:lora_prompt_tokens",
                "Prompt tokens of those requests, per LoRA adapter.",
                |p| p.prompt_tokens,
            ),
            (
                "tpserve:lora_generation_tokens",
                "Tokens generated, per LoRA adapter.",
                |p| p.generation_tokens,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name}_total {help}\n# TYPE {name}_total counter"
            );
            for (adapter, p) in &per {
                let _ = writeln!(
                    out,
                    "{name}_total{{lora_name=\"{}\",model_name=\"{model}\"}} {}",
                    label(adapter),
                    get(p)
                );
            }
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (loads, unloads) = self.registry.get().map_or((0, 0), |r| r.load_counts());
        for (name, help, v) in [
            (
                "tpserve:lora_adapter_loads",
                "Adapters loaded by name (--lora-modules and /v1/load_lora_adapter).",
                loads,
            ),
            (
                "tpserve:lora_adapter_unloads",
                "Adapters unloaded by name (/v1/unload_lora_adapter).",
                unloads,
            ),
            (
                "tpserve:lora_slot_loads",
                "Adapters copied into a worker's adapter slot (rank 0's count).",
                load(&self.slot_loads),
            ),
            (
                "tpserve:lora_slot_evictions",
                "Slot loads that evicted another adapter (least recently used).",
                load(&self.slot_evictions),
            ),
            (
                "tpserve:lora_disk_loads",
                "Adapters read from disk on a worker's step thread, stalling its steps (not \
                 preloaded, or dropped from its host cache since; rank 0's count).",
                load(&self.disk_loads),
            ),
            (
                "tpserve:lora_preloads",
                "Adapters read into every worker's host cache beside the steps, before their \
                 first request ran.",
                load(&self.preloads),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name}_total {help}\n# TYPE {name}_total counter\n{name}_total{{model_name=\"{model}\"}} {v}"
            );
        }
        for (name, help, micros) in [
            (
                "tpserve:lora_preload_seconds",
                "Seconds the preloads took (disk to host memory; the slowest rank of each).",
                load(&self.preload_micros),
            ),
            (
                "tpserve:lora_slot_load_seconds",
                "Seconds rank 0 spent copying adapters into slots (host memory to the device), \
                 on its step thread.",
                load(&self.slot_load_micros),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name}_total {help}\n# TYPE {name}_total counter\n{name}_total{{model_name=\"{model}\"}} {:.6}",
                micros as f64 / 1e6
            );
        }
    }
}
