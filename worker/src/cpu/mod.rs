//! The CPU backend: always compiled, the numerical reference, what CI runs. f32 throughout.

pub mod attention;
pub mod linear;
pub mod model;
pub mod ops;

pub use attention::KvCache;
pub use model::{CpuModel, WeightSource};
