//! The adapters served, by name. Read on every request (`model` -> adapter), written by start-up
//! and the runtime load/unload endpoints: one read-mostly lock around a small map, never held
//! across a file read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tpserve_modelfile::{LlamaConfig, LoraAdapter};

/// A served adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    /// Unique for the server's lifetime, at least 1 (0 is the base model on the wire).
    pub id: u32,
    /// The name clients put in `model`.
    pub name: String,
    /// Its directory (the workers read it from there too).
    pub path: PathBuf,
    /// `r`.
    pub rank: usize,
    /// Unix seconds when it was loaded (`/v1/models`' `created`).
    pub created: u64,
}

/// Why loading or unloading an adapter failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoraError {
    /// The name is taken (by an adapter or the base model).
    #[error("The name `{name}` is already in use{}.", if *base { " by the base model" } else { " by a loaded LoRA adapter; unload it first" })]
    NameTaken { name: String, base: bool },
    /// No adapter of that name is loaded.
    #[error("The LoRA adapter `{name}` is not loaded.")]
    NotFound { name: String },
    /// The adapter cannot be served; the message names the field, file or tensor.
    #[error("{message}")]
    Invalid { message: String },
    /// The server was not started with runtime adapter updates.
    #[error("Runtime LoRA updates are off: start the server with --enable-lora and --enable-runtime-lora-updates.")]
    RuntimeUpdatesOff,
}

/// The adapters served, by name.
#[derive(Debug)]
pub struct AdapterRegistry {
    base: LlamaConfig,
    base_names: Vec<String>,
    max_rank: usize,
    /// `--enable-runtime-lora-updates`.
    pub runtime_updates: bool,
    adapters: RwLock<BTreeMap<String, Arc<AdapterInfo>>>,
    next_id: AtomicU32,
    /// Adapters loaded and unloaded so far.
    loads: AtomicU64,
    unloads: AtomicU64,
}

impl AdapterRegistry {
    /// An empty registry for adapters of `base` (served as `base_names`) up to `max_rank`.
    pub fn new(
        base: LlamaConfig,
        base_names: Vec<String>,
        max_rank: usize,
        runtime_updates: bool,
    ) -> Self {
        Self {
            base,
            base_names,
            max_rank,
            runtime_updates,
            adapters: RwLock::new(BTreeMap::new()),
            next_id: AtomicU32::new(1),
            loads: AtomicU64::new(0),
            unloads: AtomicU64::new(0),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<AdapterInfo>>> {
        // A panic while holding the lock cannot leave the map half-changed (each write is one
        // insert or remove), so a poisoned lock is still consistent.
        self.adapters.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<AdapterInfo>>> {
        self.adapters.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The adapter served as `name`.
    pub fn get(&self, name: &str) -> Option<Arc<AdapterInfo>> {
        self.read().get(name).cloned()
    }

    /// Every adapter, by name.
    pub fn list(&self) -> Vec<Arc<AdapterInfo>> {
        self.read().values().cloned().collect()
    }

    /// Reads and checks the adapter in `path` in full, then serves it as `name`. Blocking (it
    /// reads the adapter's files): call it off the async runtime's worker threads.
    pub fn load(&self, name: &str, path: &Path) -> Result<Arc<AdapterInfo>, LoraError> {
        self.check_name(name)?;
        let adapter =
            LoraAdapter::open(path, &self.base, self.max_rank).map_err(|e| LoraError::Invalid {
                message: e.to_string(),
            })?;
        let info = Arc::new(AdapterInfo {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            path: path.to_path_buf(),
            rank: adapter.rank,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        });
        let mut map = self.write();
        // Another load of the same name may have finished while this one read its files.
        if map.contains_key(name) {
            return Err(LoraError::NameTaken {
                name: name.to_string(),
                base: false,
            });
        }
        map.insert(name.to_string(), info.clone());
        self.loads.fetch_add(1, Ordering::Relaxed);
        Ok(info)
    }

    /// Stops serving `name`: new requests for it get 404; requests already accepted finish.
    pub fn unload(&self, name: &str) -> Result<Arc<AdapterInfo>, LoraError> {
        let removed = self
            .write()
            .remove(name)
            .ok_or_else(|| LoraError::NotFound {
                name: name.to_string(),
            })?;
        self.unloads.fetch_add(1, Ordering::Relaxed);
        Ok(removed)
    }

    /// Adapters loaded (checked and served) and unloaded since start.
    pub fn load_counts(&self) -> (u64, u64) {
        (
            self.loads.load(Ordering::Relaxed),
            self.unloads.load(Ordering::Relaxed),
        )
    }

    fn check_name(&self, name: &str) -> Result<(), LoraError> {
        if name.trim().is_empty() {
            return Err(LoraError::Invalid {
                message: "`lora_name` must not be empty".into(),
            });
        }
        let base = self.base_names.iter().any(|b| b == name);
        if base || self.read().contains_key(name) {
            return Err(LoraError::NameTaken {
                name: name.to_string(),
                base,
            });
        }
        Ok(())
    }
}
