//! Compiling the embedded sources to PTX with NVRTC, through the on-disk cache.
//!
//! NVRTC is loaded at run time. Every entry point here first checks that the library can be
//! loaded and turns its absence into [`Error::NvrtcNotFound`]; cudarc would otherwise panic on
//! the first NVRTC call. Compiling one kernel file takes ~0.3 s on the GPU machine, so a worker
//! compiles at start-up only what is not in the [`PtxCache`] yet.
//!
//! NVRTC does not find `cuda_bf16.h` on its own: [`CompileConfig::from_env`] passes
//! `$CUDA_INCLUDE_DIR` (and its `cccl` subdirectory when present) as include paths.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{self, CompileError, CompileOptions, Ptx};

use crate::cache::{CacheKey, PtxCache};
use crate::error::{Error, Result};
use crate::sources::KernelSource;

/// Whether the NVRTC shared library can be loaded in this process.
pub fn nvrtc_available() -> bool {
    // SAFETY: loading libnvrtc runs its initialisers, which have no preconditions; cudarc loads
    // the same library the same way on its first NVRTC call.
    unsafe { nvrtc::sys::is_culib_present() }
}

fn ensure_nvrtc() -> Result<()> {
    if nvrtc_available() {
        Ok(())
    } else {
        Err(Error::NvrtcNotFound {
            searched: cudarc::get_lib_name_candidates("nvrtc").join(", "),
        })
    }
}

/// NVRTC's version as `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above), and both pointers are valid for writes
    // of one c_int for the duration of the call.
    let status = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| Error::Nvrtc {
        call: "nvrtcVersion",
        message: format!("{e:?}"),
    })?;
    Ok((major, minor))
}

/// The NVRTC target architecture of a GPU of compute capability `major.minor`: `sm_90` for an
/// H100.
pub fn arch_for_compute_capability(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// What NVRTC is asked to do, apart from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileConfig {
    /// Target architecture, e.g. `sm_90`.
    pub arch: String,
    /// Directories searched for `#include <...>` (the CUDA headers).
    pub include_dirs: Vec<PathBuf>,
    /// Options appended after the ones this crate always passes.
    pub extra_options: Vec<String>,
}

impl CompileConfig {
    /// A configuration for `arch` with no include directories.
    pub fn new(arch: impl Into<String>) -> Self {
        CompileConfig {
            arch: arch.into(),
            include_dirs: Vec::new(),
            extra_options: Vec::new(),
        }
    }

    /// A configuration for `arch` with the include directories named by `CUDA_INCLUDE_DIR`.
    pub fn from_env(arch: impl Into<String>) -> Self {
        let dir = std::env::var_os("CUDA_INCLUDE_DIR")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        CompileConfig {
            include_dirs: Self::include_dirs_for(dir.as_deref()),
            ..Self::new(arch)
        }
    }

    /// The include directories for a CUDA include directory: the directory itself, then its
    /// `cccl` subdirectory if there is one (where the pip wheels put libcu++).
    pub fn include_dirs_for(cuda_include_dir: Option<&Path>) -> Vec<PathBuf> {
        let Some(dir) = cuda_include_dir else {
            return Vec::new();
        };
        let mut dirs = vec![dir.to_path_buf()];
        let cccl = dir.join("cccl");
        if cccl.is_dir() {
            dirs.push(cccl);
        }
        dirs
    }

    /// The complete NVRTC option list, as passed and as hashed into the cache key.
    pub fn nvrtc_options(&self) -> Vec<String> {
        // The architecture goes in as an option rather than through cudarc's
        // `CompileOptions::arch`, which wants a `&'static str`.
        let mut options = vec![
            format!("--gpu-architecture={}", self.arch),
            "--std=c++17".to_string(),
        ];
        options.extend(
            self.include_dirs
                .iter()
                .map(|d| format!("--include-path={}", d.display())),
        );
        options.extend(self.extra_options.iter().cloned());
        options
    }
}

/// The PTX of one source file.
#[derive(Debug)]
pub struct CompiledKernel {
    /// The source file name, e.g. `rope.cu`.
    pub source: &'static str,
    /// The PTX text.
    pub ptx: String,
    /// Whether it came from the on-disk cache rather than NVRTC.
    pub from_cache: bool,
    /// A cache read or write that failed; the PTX is still good, the caller may log this.
    pub cache_error: Option<Error>,
}

impl CompiledKernel {
    /// The PTX in the form `CudaContext::load_module` takes.
    pub fn to_ptx(&self) -> Ptx {
        Ptx::from_src(self.ptx.clone())
    }
}

/// Compiles kernel sources for one architecture, through an optional on-disk cache.
#[derive(Debug, Clone)]
pub struct Compiler {
    config: CompileConfig,
    cache: Option<PtxCache>,
    nvrtc_version: (i32, i32),
}

impl Compiler {
    /// A compiler with `config`, caching in `cache` if given. Fails with
    /// [`Error::NvrtcNotFound`] when NVRTC cannot be loaded.
    pub fn new(config: CompileConfig, cache: Option<PtxCache>) -> Result<Self> {
        let nvrtc_version = nvrtc_version()?;
        Ok(Compiler {
            config,
            cache,
            nvrtc_version,
        })
    }

    /// The configuration every source is compiled with.
    pub fn config(&self) -> &CompileConfig {
        &self.config
    }

    /// The loaded NVRTC's version, `(major, minor)`.
    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.nvrtc_version
    }

    /// The cache key of `source` under this compiler's configuration.
    pub fn cache_key(&self, source: &KernelSource) -> CacheKey {
        CacheKey::new(
            &source.expanded(),
            &self.config.arch,
            &self.config.nvrtc_options(),
            Some(self.nvrtc_version),
        )
    }

    /// The PTX of `source`: from the cache when present, else compiled and stored. Cache
    /// failures do not fail the call; they are reported in [`CompiledKernel::cache_error`].
    pub fn compile(&self, source: &KernelSource) -> Result<CompiledKernel> {
        let code = source.expanded();
        let options = self.config.nvrtc_options();
        let key = CacheKey::new(&code, &self.config.arch, &options, Some(self.nvrtc_version));
        let mut cache_error = None;
        if let Some(cache) = &self.cache {
            match cache.load(&key) {
                Ok(Some(ptx)) => {
                    return Ok(CompiledKernel {
                        source: source.name,
                        ptx,
                        from_cache: true,
                        cache_error: None,
                    })
                }
                Ok(None) => {}
                Err(e) => cache_error = Some(e),
            }
        }
        let ptx = nvrtc_compile(source.name, &code, &self.config.arch, options)?;
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.store(&key, &ptx) {
                cache_error = Some(e);
            }
        }
        Ok(CompiledKernel {
            source: source.name,
            ptx,
            from_cache: false,
            cache_error,
        })
    }

    /// Every source of `sources` (usually [`crate::SOURCES`]), in order; stops at the first
    /// compile error.
    pub fn compile_all(&self, sources: &[KernelSource]) -> Result<Vec<CompiledKernel>> {
        sources.iter().map(|s| self.compile(s)).collect()
    }
}

/// Compiles `source` with `config`, without any cache: the PTX text.
pub fn compile_uncached(source: &KernelSource, config: &CompileConfig) -> Result<String> {
    ensure_nvrtc()?;
    nvrtc_compile(
        source.name,
        &source.expanded(),
        &config.arch,
        config.nvrtc_options(),
    )
}

fn nvrtc_compile(name: &str, code: &str, arch: &str, options: Vec<String>) -> Result<String> {
    let opts = CompileOptions {
        options: options.clone(),
        name: Some(name.to_string()),
        ..Default::default()
    };
    let fail = |message: String, log: String| Error::Compile {
        kernel: name.to_string(),
        arch: arch.to_string(),
        options: options.clone(),
        message,
        log,
    };
    let ptx = nvrtc::compile_ptx_with_opts(code, opts).map_err(|e| match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            fail(format!("{nvrtc:?}"), log.to_string_lossy().into_owned())
        }
        other => fail(format!("{other:?}"), String::new()),
    })?;
    Ok(ptx.to_src())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::{source, KERNELS, SOURCES};

    #[test]
    fn compiling_without_nvrtc_is_a_typed_error_and_with_it_yields_every_entry_point() {
        let config = CompileConfig::from_env("sm_90");
        let compiled = Compiler::new(config.clone(), None).and_then(|c| c.compile_all(SOURCES));
        // scripts/check-kernels.sh sets this, so a lost library fails instead of passing below.
        let required = std::env::var_os("TPSERVE_REQUIRE_NVRTC").is_some_and(|v| v == "1");
        assert!(
            nvrtc_available() || !required,
            "TPSERVE_REQUIRE_NVRTC=1 but NVRTC cannot be loaded"
        );
        if !nvrtc_available() {
            let err = compiled.expect_err("no NVRTC, yet compiling succeeded");
            assert!(matches!(err, Error::NvrtcNotFound { .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.starts_with("NVRTC library not found"), "{message}");
            assert!(message.contains("libnvrtc.so"), "{message}");
            assert!(message.contains("use --device cpu"), "{message}");
            let uncached = compile_uncached(source("rope.cu").unwrap(), &config);
            assert!(matches!(uncached, Err(Error::NvrtcNotFound { .. })));
            assert!(matches!(nvrtc_version(), Err(Error::NvrtcNotFound { .. })));
            return;
        }
        // NVRTC is present (the GPU machine, with CUDA_INCLUDE_DIR set): everything compiles.
        let compiled = compiled.unwrap_or_else(|e| panic!("{e}"));
        for ((file, entries), kernel) in KERNELS.iter().zip(&compiled) {
            assert_eq!(*file, kernel.source);
            for entry in *entries {
                assert!(
                    kernel.ptx.contains(&format!(".entry {entry}(")),
                    "{entry} missing from the PTX of {file}"
                );
            }
        }
    }

    #[test]
    fn second_compile_is_served_from_the_cache() {
        if !nvrtc_available() {
            // Needs NVRTC; the cache alone is covered in cache.rs.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let compiler = Compiler::new(
            CompileConfig::from_env("sm_90"),
            Some(PtxCache::new(dir.path())),
        )
        .unwrap();
        let src = source("silu_mul.cu").unwrap();
        let first = compiler.compile(src).unwrap();
        assert!(!first.from_cache);
        assert!(first.cache_error.is_none(), "{:?}", first.cache_error);
        let second = compiler.compile(src).unwrap();
        assert!(second.from_cache);
        assert_eq!(first.ptx, second.ptx);
    }

    #[test]
    fn nvrtc_options_name_the_arch_and_every_include_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cccl")).unwrap();
        let mut config = CompileConfig::new("sm_90");
        config.include_dirs = CompileConfig::include_dirs_for(Some(dir.path()));
        config.extra_options.push("-lineinfo".to_string());
        let options = config.nvrtc_options();
        assert_eq!(options[0], "--gpu-architecture=sm_90");
        assert!(options.contains(&format!("--include-path={}", dir.path().display())));
        assert!(options.contains(&format!(
            "--include-path={}",
            dir.path().join("cccl").display()
        )));
        assert_eq!(options.last().map(String::as_str), Some("-lineinfo"));
    }

    #[test]
    fn include_dirs_skip_a_missing_cccl_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            CompileConfig::include_dirs_for(Some(dir.path())),
            vec![dir.path().to_path_buf()]
        );
        assert!(CompileConfig::include_dirs_for(None).is_empty());
    }

    #[test]
    fn arch_comes_from_the_compute_capability() {
        assert_eq!(arch_for_compute_capability(9, 0), "sm_90");
        assert_eq!(arch_for_compute_capability(8, 6), "sm_86");
    }
}
