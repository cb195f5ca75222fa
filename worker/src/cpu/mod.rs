//! The CPU backend: always compiled, the numerical reference, what CI runs. f32 throughout.

pub mod attention;
mod backend;
pub mod linear;
pub mod lora;
pub mod model;
pub mod ops;

pub use attention::KvCache;
pub use backend::CpuBackend;
pub use model::CpuModel;
