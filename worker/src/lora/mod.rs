//! The worker's LoRA adapters, whatever the backend: a host cache of adapters read from disk
//! (at most `max_cpu_loras`, least recently used dropped first) and the backend's slots (at most
//! `max_loras`, the adapters one step may use; least recently used replaced first). The runner
//! asks [`Adapters::place`] for a slot per adapter of a step before the step runs; a slot load
//! goes through [`crate::backend::Backend::load_lora`], which cuts this rank's shard and copies
//! it into the device's slot (host memory on the CPU; a GPU backend copies into its stacked slot
//! buffers there).
//!
//! Every rank sees the same plans and makes the same choices (no clocks: recency is the step
//! count), so slots agree across a tensor-parallel group.
//!
//! Costs: a disk load reads and checks the whole adapter (`LoraAdapter::open`) on the runner
//! thread, at the first step that uses it; a slot load copies one adapter's shard.

pub mod shard;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlaceCounts {
    /// Adapters copied into a slot.
    pub slot_loads: u32,
    /// Of those, copies that replaced another adapter.
    pub slot_evictions: u32,
    /// Adapters read from disk.
    pub disk_loads: u32,
}

#[derive(Debug)]
struct Cached {
    adapter: Arc<LoraAdapter>,
    last_used: u64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    id: u32,
    last_used: u64,
}

/// The adapters a worker knows, holds and has in slots.
#[derive(Debug, Default)]
pub struct Adapters {
    limits: LoraLimits,
    /// Every adapter a plan has named: id -> directory (ids are never reused for other weights).
    paths: HashMap<u32, PathBuf>,
    host: HashMap<u32, Cached>,
    slots: Vec<Option<Slot>>,
    /// Steps placed so far: the clock of the LRU choices.
    clock: u64,
}

impl Adapters {
    /// Forgets everything and takes new limits (at `LoadModel`).
    pub fn reset(&mut self, limits: LoraLimits) {
        *self = Self {
            limits,
            slots: vec![None; limits.max_loras],
            ..Self::default()
        };
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
            backend.load_lora(target, &adapter)?;
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
        if let Some(c) = self.host.get_mut(&id) {
            c.last_used = now;
            return Ok(c.adapter.clone());
        }
        let path = self.paths.get(&id).ok_or_else(|| WorkerError::Plan {
            detail: format!("adapter {id} was never sent to this worker"),
        })?;
        let adapter = Arc::new(LoraAdapter::open(path, config, self.limits.max_rank)?);
        counts.disk_loads += 1;
        while self.host.len() >= self.limits.max_cpu_loras.max(1) {
            let oldest = self
                .host
                .iter()
                .min_by_key(|(_, c)| c.last_used)
                .map(|(id, _)| *id)
                .expect("the cache is not empty");
            self.host.remove(&oldest);
        }
        self.host.insert(
            id,
            Cached {
                adapter: adapter.clone(),
                last_used: now,
            },
        );
        Ok(adapter)
    }
}
