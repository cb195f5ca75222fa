//! The crate's error type: one variant per phase that can fail (finding NVRTC, compiling, the
//! on-disk cache, writing a prebuilt bundle). A bundle's manifest has its own error type,
//! [`crate::manifest::ManifestError`], because `build.rs` shares that module.

use std::path::PathBuf;

/// What went wrong while preparing kernels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The NVRTC shared library could not be loaded.
    #[error(
        "NVRTC library not found: searched {searched}; put CUDA 13's libnvrtc on LD_LIBRARY_PATH, \
         or use --device cpu"
    )]
    NvrtcNotFound {
        /// The library names that were tried, comma-separated.
        searched: String,
    },
    /// NVRTC loaded but a call into it failed outside compilation.
    #[error("NVRTC {call} failed: {message}")]
    Nvrtc {
        /// The NVRTC call that failed.
        call: &'static str,
        /// NVRTC's own description.
        message: String,
    },
    /// NVRTC rejected a kernel source.
    #[error("compiling kernel source {kernel} for {arch} failed ({message}); options {options:?}; log:\n{log}")]
    Compile {
        /// The source file, e.g. `rms_norm.cu`.
        kernel: String,
        /// The target architecture, e.g. `sm_90`.
        arch: String,
        /// The NVRTC options used.
        options: Vec<String>,
        /// NVRTC's error code or failing step.
        message: String,
        /// NVRTC's compilation log (empty if there was none).
        log: String,
    },
    /// No directory to cache compiled kernels in could be determined.
    #[error("no kernel cache directory: set TPSERVE_CACHE_DIR, XDG_CACHE_HOME or HOME")]
    NoCacheDir,
    /// Reading or writing the on-disk kernel cache failed.
    #[error("kernel cache {}: {source}", path.display())]
    Cache {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing a prebuilt kernel bundle failed.
    #[error("prebuilt kernel bundle {}: {source}", path.display())]
    Bundle {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The directory asked for a bundle holds something else.
    #[error(
        "{} is not empty and not a prebuilt kernel bundle (it has no manifest); refusing to \
         replace it",
        path.display()
    )]
    NotABundle {
        /// The directory.
        path: PathBuf,
    },
    /// A kernel source name that is not embedded in this build.
    #[error("unknown kernel source {name}")]
    UnknownSource {
        /// The name asked for.
        name: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
