//! LoRA adapters on the coordinator: the flags (vLLM's `--enable-lora`, `--lora-modules`,
//! `--max-loras`, `--max-lora-rank`, `--max-cpu-loras`, `--enable-runtime-lora-updates`) and the
//! registry of adapters served under their names. An adapter is read and checked in full
//! (`tpserve_modelfile::LoraAdapter::open`: config, tensor names, shapes against the base,
//! readability) before its name answers; the workers read it again from the same path the first
//! time a step uses it (see `worker/src/lora.rs`).
//!
//! Ids are never reused: an adapter unloaded and loaded again under the same name gets a new id,
//! so neither the workers' caches nor the prefix cache (salted by the id) mix its weights up.

mod args;
mod metrics;
mod registry;

pub use args::{LoraArgs, LoraModuleSpec};
pub use metrics::LoraMetrics;
pub use registry::{AdapterInfo, AdapterRegistry, LoraError};
