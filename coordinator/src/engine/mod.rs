//! The engine: one actor task that owns the scheduler, the output state of every sequence and the
//! worker group, and the handle through which the API and the offline runner talk to it.

pub mod actor;
pub mod handle;
pub mod liveness;
pub mod lora_preload;
pub mod output;
pub mod trace;
pub mod types;
mod wire;

pub use actor::{start_engine, EngineConfig, EngineStatus, GroupLink};
pub use handle::{EngineHandle, GenerationStream};
pub use liveness::{LiveStatus, Liveness};
pub use types::{
    FinishReason, GenerateEvent, GenerateRequest, Sampling, SamplingExtras, Share, TokenLogprobs,
};
