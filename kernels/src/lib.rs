//! tpserve's CUDA kernels, as CUDA C sources embedded in the binary.
//!
//! The sources (`kernels/cuda/*.cu`) are compiled with NVRTC for the GPU's architecture when a
//! worker starts ([`Compiler`]), and the PTX is cached on disk ([`PtxCache`]) under a key of the
//! source text, the target architecture, the NVRTC options and NVRTC's version, so a second start
//! compiles nothing. NVRTC is loaded at run time (cudarc's `dynamic-loading`): this crate builds
//! and its CPU-side logic runs on machines without CUDA, and a missing NVRTC is a typed error,
//! never a panic. CI compiles the same sources with `nvcc -ptx` (`scripts/check-kernels.sh`).
//!
//! Every kernel exists once per activation dtype (`_bf16`, `_f16`); [`KERNELS`] lists the entry
//! points of each source file, which the launch wrappers load by name
//! ([`entry_point`]). Each kernel's arguments, shapes, dtypes and launch geometry are documented
//! in the comment block above it in its `.cu` file.

pub mod cache;
pub mod compile;
mod error;
pub mod sources;

pub use cache::{CacheKey, PtxCache};
pub use compile::{
    arch_for_compute_capability, compile_uncached, nvrtc_available, nvrtc_version, CompileConfig,
    CompiledKernel, Compiler,
};
pub use error::{Error, Result};
pub use sources::{
    entry_point, source, KernelDtype, KernelSource, COMMON_HEADER, KERNELS, SOURCES,
};
