//! The tpserve worker: holds one tensor-parallel shard of a model and its paged KV cache, keeps
//! the state of every sequence it has been sent, and turns step plans from the coordinator into
//! sampled tokens. `main.rs` only parses flags and serves `service::WorkerService` over gRPC.

pub mod auth;
pub mod backend;
pub mod batch;
pub mod comm;
pub mod cpu;
pub mod cuda;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod kv_cache_dtype;
pub mod load;
pub mod logging;
pub mod lora;
pub mod pooling;
pub mod rope;
pub mod runner;
pub mod sampler;
pub mod service;
pub mod shard;
pub mod step_trace;
pub mod thread_group;
pub mod weights;

pub use error::{Result, WorkerError};
