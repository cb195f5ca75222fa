//! The tpserve coordinator: OpenAI-compatible HTTP API, tokenization, the continuous-batching
//! scheduler and paged KV block table, and the worker group it drives over gRPC.

pub mod api;
pub mod engine;
pub mod error;
pub mod scheduler;
pub mod served_model;
pub mod workers;
pub mod config;
pub mod launch;
pub mod offline;
pub mod serve;
pub mod bench;
