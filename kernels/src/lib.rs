//! tpserve's CUDA kernels, as CUDA C sources embedded in the binary, and optionally as CUBINs
//! prebuilt for the common architectures.
//!
//! A worker gets each source's code from [`Compiler`]: the CUBIN of the bundle embedded at build
//! time ([`Prebuilt`], written by `scripts/prebuild-kernels.sh` and embedded by `build.rs` when
//! present) if it holds this source for this architecture under a current key; else the PTX
//! cached on disk ([`PtxCache`]) under a key of the source text, the target architecture, the
//! NVRTC options and NVRTC's version; else PTX compiled now with NVRTC for the GPU's
//! architecture, and cached. So a first start on an architecture of the bundle compiles nothing,
//! and a second start anywhere compiles nothing. NVRTC is loaded at run time (cudarc's
//! `dynamic-loading`), and only when something is not embedded: this crate builds and its
//! CPU-side logic runs on machines without CUDA, and a missing NVRTC is a typed error, never a
//! panic. CI compiles the same sources with `nvcc -ptx` and NVRTC, and prebuilds a bundle
//! (`scripts/check-kernels.sh`).
//!
//! Every kernel exists once per activation dtype (`_bf16`, `_f16`); [`KERNELS`] lists the entry
//! points of each source file, which the launch wrappers load by name
//! ([`entry_point`]). Each kernel's arguments, shapes, dtypes and launch geometry are documented
//! in the comment block above it in its `.cu` file.

pub mod cache;
pub mod compile;
mod error;
pub mod manifest;
pub mod prebuilt;
pub mod sources;

pub use cache::{cache_root, write_atomically, CacheKey, PtxCache};
pub use compile::{
    arch_for_compute_capability, compile_cubin, compile_uncached, nvrtc_available, nvrtc_version,
    CompileConfig, CompiledKernel, Compiler, KernelCode,
};
pub use error::{Error, Result};
pub use manifest::{Manifest, ManifestEntry, ManifestError, MANIFEST_FILE};
pub use prebuilt::{prebuilt_key, write_bundle, ArchSummary, Prebuilt};
pub use sources::{
    entry_point, source, KernelDtype, KernelSource, COMMON_HEADER, KERNELS, SOURCES,
};
