//! The worker's LoRA adapters, whatever the backend: a host cache of adapters read from disk
//! (at most `max_cpu_loras`, least recently used dropped first) and the backend's slots (at most
//! `max_loras`, the adapters one step may use; least recently used replaced first). The runner
//! asks [`Adapters::place`] for a slot per adapter of a step before the step runs; a slot load
//! goes through [`crate::backend::Backend::load_lora`], which cuts this rank's shard and copies
//! it into the device's slot (host memory on the CPU; a GPU backend copies into its stacked slot
//! buffers there).
//!
//! The host cache is shared with the gRPC service ([`HostCache`]): the coordinator preloads an
//! adapter (`PreloadLora`, read on a blocking thread beside the steps) before it schedules the
//! adapter's first sequence, so steps only copy. Recency is the runner's step count, so slot
//! choices agree across a tensor-parallel group; the host caches of the ranks may differ (a rank
//! that lacks an adapter reads it on the runner thread, which is correct, only slower).
//!
//! Costs: a preload reads and checks the whole adapter (`LoraAdapter::open`) off the runner
//! thread; without one (or after the adapter was dropped), the first step that uses it does;
//! a slot load copies one adapter's shard.

pub mod shard;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tpserve_modelfile::{LlamaConfig, LoraAdapter};

use crate::backend::Backend;
use crate::error::{Result, WorkerError};

/// Limits from `LoadModel`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoraLimits {
    /// Slots; 0: LoRA is off.
    pub max_loras: usize,
    pub max_rank: usize,
    /// Adapters kept in host memory.
    pub max_cpu_loras: usize,
}

/// What placing one step's adapters did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PlaceCounts {
    /// Adapters copied into a slot.
    pub slot_loads: u32,
    /// Of those, copies that replaced another adapter.
    pub slot_evictions: u32,
    /// Adapters read from disk (on the runner thread: not preloaded).
    pub disk_loads: u32,
    /// Seconds spent copying adapters into slots.
    pub slot_load_seconds: f64,
}

#[derive(Debug)]
struct Cached {
    adapter: Arc<LoraAdapter>,
    last_used: u64,
    /// Whether a step has used it (a preloaded adapter waits for its first step).
    used: bool,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u32,
    last_used: u64,
}

/// The adapters read into host memory, shared by the runner and the service's preloads.
#[derive(Debug, Default)]
pub struct HostCache {
    /// The loaded model's config and the limits (None before `LoadModel`, or with LoRA off).
    model: Option<(Arc<LlamaConfig>, LoraLimits)>,
    entries: HashMap<u32, Cached>,
    /// Ids dropped since the runner last took them (for the step result).
    dropped: Vec<u32>,
    /// The runner's step count, the recency of entries.
    clock: u64,
}

impl HostCache {
    /// Locks `cache` (a panic elsewhere while holding it leaves plain data behind: go on).
    fn lock(cache: &Mutex<HostCache>) -> MutexGuard<'_, HostCache> {
        cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `adapter` under `id` (`used`: by the step reading it, else preloaded), dropping entries
    /// past `max_cpu_loras`: the least recently used of those a step has used, and only when
    /// there are none, the oldest preloaded one (its sequences are about to run).
    fn insert(&mut self, id: u32, adapter: Arc<LoraAdapter>, used: bool) {
        let max = self
            .model
            .as_ref()
            .map_or(1, |(_, l)| l.max_cpu_loras.max(1));
        while self.entries.len() >= max {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, c)| (!c.used, c.last_used))
                .map(|(id, _)| *id)
                .expect("the cache is not empty");
            self.entries.remove(&oldest);
            self.dropped.push(oldest);
        }
        let last_used = self.clock;
        self.entries.insert(
            id,
            Cached {
                adapter,
                last_used,
                used,
            },
        );
    }
}

/// Reads the adapter in `path` into `cache` under `id` unless it is there; returns the seconds
/// spent reading (0 when it was there). Blocks on disk: call it off the runner thread.
pub fn preload(cache: &Mutex<HostCache>, id: u32, path: &Path) -> Result<f64> {
    let (config, limits) = {
        let c = HostCache::lock(cache);
        if c.entries.contains_key(&id) {
            return Ok(0.0);
        }
        c.model.clone().ok_or_else(|| WorkerError::Plan {
            detail: "a LoRA preload before LoadModel, or with LoRA off (max_loras 0)".into(),
        })?
    };
    let started = std::time::Instant::now();
    let adapter = Arc::new(LoraAdapter::open(path, &config, limits.max_rank)?);
    let mut c = HostCache::lock(cache);
    if !c.entries.contains_key(&id) {
        c.insert(id, adapter, false);
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The adapters a worker knows, holds and has in slots.
#[derive(Debug, Default)]
pub struct Adapters {
    limits: LoraLimits,
    /// Every adapter a plan has named: id -> directory (ids are never reused for other weights).
    paths: HashMap<u32, PathBuf>,
    host: Arc<Mutex<HostCache>>,
    slots: Vec<Option<Slot>>,
    /// Steps placed so far: the clock of the LRU choices.
    clock: u64,
}

impl Adapters {
    /// Forgets everything and takes new limits and the model's config (at `LoadModel`). The
    /// host cache stays the same object (the service holds it) but is emptied.
    pub fn reset(&mut self, limits: LoraLimits, config: Option<&LlamaConfig>) {
        let host = self.host.clone();
        {
            let mut c = HostCache::lock(&host);
            *c = HostCache {
                model: config
                    .filter(|_| limits.max_loras > 0)
                    .map(|c| (Arc::new(c.clone()), limits)),
                ..HostCache::default()
            };
        }
        *self = Self {
            limits,
            slots: vec![None; limits.max_loras],
            host,
            ..Self::default()
        };
    }

    /// The host cache, for the service's preloads.
    pub fn host_cache(&self) -> Arc<Mutex<HostCache>> {
        self.host.clone()
    }

    /// Ids dropped from the host cache since the last call.
    pub fn take_dropped(&mut self) -> Vec<u32> {
        std::mem::take(&mut HostCache::lock(&self.host).dropped)
    }

    /// Whether LoRA is on.
    pub fn enabled(&self) -> bool {
        self.limits.max_loras > 0
    }

    /// The most adapters a step may use.
    pub fn max_loras(&self) -> usize {
        self.limits.max_loras
    }

    /// Records a plan's adapter (id -> path).
    pub fn register(&mut self, id: u32, path: &str) {
        self.paths.insert(id, PathBuf::from(path));
    }

    /// Whether a plan or an earlier one named `id`.
    pub fn knows(&self, id: u32) -> bool {
        self.paths.contains_key(&id)
    }

    /// Gives every adapter in `ids` (distinct, at most `max_loras`) a slot, reading it from disk
    /// and copying it into the backend's slot where needed; returns the slot of each, in order.
    pub fn place(
        &mut self,
        ids: &[u32],
        config: &LlamaConfig,
        backend: &mut dyn Backend,
    ) -> Result<(Vec<usize>, PlaceCounts)> {
        self.clock += 1;
        let now = self.clock;
        HostCache::lock(&self.host).clock = now;
        let mut counts = PlaceCounts::default();
        let mut placed = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(i) = self
                .slots
                .iter()
                .position(|s| s.is_some_and(|s| s.id == id))
            {
                self.slots[i] = Some(Slot { id, last_used: now });
                placed.push(i);
                continue;
            }
            let adapter = self.host_copy(id, config, &mut counts)?;
            // A free slot, else the least recently used one not used by this step.
            let target = self
                .slots
                .iter()
                .position(Option::is_none)
                .or_else(|| {
                    self.slots
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| s.map(|s| (i, s)))
                        .filter(|(_, s)| s.last_used < now)
                        .min_by_key(|(_, s)| s.last_used)
                        .map(|(i, _)| i)
                })
                .ok_or_else(|| WorkerError::Plan {
                    detail: format!(
                        "the step uses more than --max-loras {} adapters",
                        self.limits.max_loras
                    ),
                })?;
            let started = std::time::Instant::now();
            backend.load_lora(target, &adapter)?;
            counts.slot_load_seconds += started.elapsed().as_secs_f64();
            if self.slots[target].is_some() {
                counts.slot_evictions += 1;
            }
            counts.slot_loads += 1;
            self.slots[target] = Some(Slot { id, last_used: now });
            placed.push(target);
        }
        Ok((placed, counts))
    }

    /// The adapter from the host cache, read from disk (and the least recently used one dropped
    /// past `max_cpu_loras`) when it is not there.
    fn host_copy(
        &mut self,
        id: u32,
        config: &LlamaConfig,
        counts: &mut PlaceCounts,
    ) -> Result<Arc<LoraAdapter>> {
        let now = self.clock;
        if let Some(c) = HostCache::lock(&self.host).entries.get_mut(&id) {
            c.last_used = now;
            c.used = true;
            return Ok(c.adapter.clone());
        }
        let path = self.paths.get(&id).ok_or_else(|| WorkerError::Plan {
            detail: format!("adapter {id} was never sent to this worker"),
        })?;
        let adapter = Arc::new(LoraAdapter::open(path, config, self.limits.max_rank)?);
        counts.disk_loads += 1;
        HostCache::lock(&self.host).insert(id, adapter.clone(), true);
        Ok(adapter)
    }
}
