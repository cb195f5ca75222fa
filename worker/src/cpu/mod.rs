//! The CPU backend: always compiled, the numerical reference, what CI runs. f32 activations;
//! weights f32 or, for GGUF, kept in their quantized blocks ([`quant`]).

pub mod attention;
mod backend;
pub mod linear;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;

pub use attention::KvCache;
pub use backend::CpuBackend;
pub use model::{CpuModel, WeightMode};
