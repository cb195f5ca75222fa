//! The tpserve coordinator: OpenAI-compatible HTTP API, tokenization, the continuous-batching
//! scheduler and paged KV block table, and the worker group it drives over gRPC.

pub mod adapters;
pub mod api;
pub mod bench;
pub mod config;
pub mod engine;
pub mod error;
pub mod gateway;
pub mod launch;
pub mod metrics;
pub mod offline;
pub mod quantization;
pub mod sampling;
pub mod scheduler;
pub mod serve;
pub mod served_model;
pub mod structured;
pub mod task;
pub mod tools;
pub mod workers;
