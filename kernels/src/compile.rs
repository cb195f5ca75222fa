//! Turning the embedded sources into loadable code for one architecture: from the prebuilt
//! bundle embedded at build time ([`Prebuilt`]), else from the on-disk PTX cache, else with NVRTC.
//!
//! Invariant: an embedded CUBIN is used only when its key, a hash of the expanded source and the
//! code-determining NVRTC options ([`CompileConfig::code_options`]), matches this build's source
//! and this configuration, so a stale bundle falls through to the cache and NVRTC.
//!
//! NVRTC is loaded at run time, and only when something is not embedded: every path to it first
//! checks that the library can be loaded and turns its absence into [`Error::NvrtcNotFound`];
//! cudarc would otherwise panic on the first NVRTC call. Costs: an embedded source costs a hash of
//! its text (well under a millisecond); compiling one kernel file takes ~0.3-3 s on the GPU
//! machine (all of them ~17-20 s on an H200), so a worker compiles at start-up only what is
//! neither embedded nor in the [`PtxCache`].
//!
//! NVRTC does not find `cuda_bf16.h` on its own: [`CompileConfig::from_env`] passes
//! `$CUDA_INCLUDE_DIR` (and its `cccl` subdirectory when present) as include paths.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{self, Ptx};

use crate::cache::{CacheKey, PtxCache};
use crate::error::{Error, Result};
use crate::prebuilt::Prebuilt;
use crate::sources::KernelSource;

/// The option prefix of an include directory: it names a place on the compiling machine, not
/// code, so [`CompileConfig::code_options`] leaves it out.
const INCLUDE_PATH_OPTION: &str = "--include-path=";

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

/// The NVRTC target architecture of a GPU of compute capability `major.minor`: `sm_86` for an
/// A10; for Hopper (9.0) the architecture-specific `sm_90a`, whose warpgroup instructions
/// (wgmma) the prefill attention kernel uses (attention_wgmma.cu).
pub fn arch_for_compute_capability(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
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

    /// The complete NVRTC option list, as passed and as hashed into the PTX cache key.
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
                .map(|d| format!("{INCLUDE_PATH_OPTION}{}", d.display())),
        );
        options.extend(self.extra_options.iter().cloned());
        options
    }

    /// The options that determine the generated code, as hashed into a prebuilt CUBIN's key:
    /// [`CompileConfig::nvrtc_options`] without the include directories, which differ between
    /// the machine that builds the bundle and the one that runs it (the headers they hold are
    /// fixed by the CUDA version the bundle was built with).
    pub fn code_options(&self) -> Vec<String> {
        self.nvrtc_options()
            .into_iter()
            .filter(|o| !o.starts_with(INCLUDE_PATH_OPTION))
            .collect()
    }
}

/// The code of one source file, and where it came from.
#[derive(Debug)]
pub enum KernelCode {
    /// CUBIN (machine code for exactly this architecture) from the bundle embedded at build time.
    EmbeddedCubin(&'static [u8]),
    /// PTX from the on-disk cache; the driver compiles it to machine code when loading it.
    CachedPtx(String),
    /// PTX that NVRTC compiled in this call (and stored in the cache, if there is one).
    CompiledPtx(String),
}

/// The code of one source file, ready for `CudaContext::load_module`.
#[derive(Debug)]
pub struct CompiledKernel {
    /// The source file name, e.g. `rope.cu`.
    pub source: &'static str,
    /// The CUBIN or PTX, with its origin.
    pub code: KernelCode,
    /// A cache read or write that failed; the code is still good, the caller may log this.
    pub cache_error: Option<Error>,
}

impl CompiledKernel {
    /// The code in the form `CudaContext::load_module` takes (which loads a CUBIN or PTX image
    /// through `cuModuleLoadData`). Copies it: a few hundred KB, once per module load.
    pub fn to_ptx(&self) -> Ptx {
        match &self.code {
            KernelCode::EmbeddedCubin(cubin) => Ptx::from_binary(cubin.to_vec()),
            KernelCode::CachedPtx(ptx) | KernelCode::CompiledPtx(ptx) => Ptx::from_src(ptx.clone()),
        }
    }
}

/// Prepares kernel sources for one architecture: from an embedded bundle, an optional on-disk
/// cache, or NVRTC, in that order.
#[derive(Debug, Clone)]
pub struct Compiler {
    config: CompileConfig,
    cache: Option<PtxCache>,
    prebuilt: Prebuilt,
}

impl Compiler {
    /// A compiler with `config` that serves what `prebuilt` holds (usually
    /// [`Prebuilt::embedded`]) and caches what it compiles in `cache` if given. Loads nothing:
    /// NVRTC is needed only when a source is not in `prebuilt`.
    pub fn new(config: CompileConfig, cache: Option<PtxCache>, prebuilt: Prebuilt) -> Self {
        Compiler {
            config,
            cache,
            prebuilt,
        }
    }

    /// The configuration every source is compiled with.
    pub fn config(&self) -> &CompileConfig {
        &self.config
    }

    /// The code of `source`: the embedded CUBIN when the bundle holds it under a matching key,
    /// else the cached PTX, else PTX compiled now and stored. Fails with
    /// [`Error::NvrtcNotFound`] only when NVRTC is needed and absent. Cache failures do not fail
    /// the call; they are reported in [`CompiledKernel::cache_error`].
    pub fn compile(&self, source: &KernelSource) -> Result<CompiledKernel> {
        let code = source.expanded();
        if let Some(cubin) = self.prebuilt.find(source.name, &code, &self.config) {
            return Ok(CompiledKernel {
                source: source.name,
                code: KernelCode::EmbeddedCubin(cubin),
                cache_error: None,
            });
        }
        let options = self.config.nvrtc_options();
        let key = CacheKey::new(&code, &self.config.arch, &options, Some(nvrtc_version()?));
        let mut cache_error = None;
        if let Some(cache) = &self.cache {
            match cache.load(&key) {
                Ok(Some(ptx)) => {
                    return Ok(CompiledKernel {
                        source: source.name,
                        code: KernelCode::CachedPtx(ptx),
                        cache_error: None,
                    })
                }
                Ok(None) => {}
                Err(e) => cache_error = Some(e),
            }
        }
        let ptx = nvrtc_ptx(source.name, &code, &self.config.arch, options)?;
        if let Some(cache) = &self.cache {
            if let Err(e) = cache.store(&key, &ptx) {
                cache_error = Some(e);
            }
        }
        Ok(CompiledKernel {
            source: source.name,
            code: KernelCode::CompiledPtx(ptx),
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
    nvrtc_ptx(
        source.name,
        &source.expanded(),
        &config.arch,
        config.nvrtc_options(),
    )
}

/// Compiles `source` with `config` to CUBIN, machine code for exactly `config.arch` (which must
/// be a real architecture, `sm_XX`), as the prebuilt bundle holds it.
pub fn compile_cubin(source: &KernelSource, config: &CompileConfig) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let program = NvrtcProgram::compile(
        source.name,
        &source.expanded(),
        &config.arch,
        config.nvrtc_options(),
    )?;
    program.output(Output::Cubin)
}

fn nvrtc_ptx(name: &str, code: &str, arch: &str, options: Vec<String>) -> Result<String> {
    let program = NvrtcProgram::compile(name, code, arch, options)?;
    let mut ptx = program.output(Output::Ptx)?;
    // NVRTC's PTX is a C string: its size counts the terminating NUL.
    while ptx.last() == Some(&0) {
        ptx.pop();
    }
    String::from_utf8(ptx).map_err(|e| program.fail("PTX is not UTF-8", e.to_string()))
}

/// Which of a compiled program's outputs to take.
#[derive(Debug, Clone, Copy)]
enum Output {
    Ptx,
    Cubin,
}

/// NVRTC's calls for the size of an output and for the output itself.
type SizeFn = unsafe fn(nvrtc::sys::nvrtcProgram, *mut usize) -> nvrtc::sys::nvrtcResult;
type GetFn = unsafe fn(nvrtc::sys::nvrtcProgram, *mut std::ffi::c_char) -> nvrtc::sys::nvrtcResult;

/// [`Error::Compile`] for source `name` on `arch` with `options`.
fn compile_error(name: &str, arch: &str, options: &[String], message: &str, log: String) -> Error {
    Error::Compile {
        kernel: name.to_string(),
        arch: arch.to_string(),
        options: options.to_vec(),
        message: message.to_string(),
        log,
    }
}

/// One compiled NVRTC program; destroyed on drop. NVRTC is loaded (the caller checked).
struct NvrtcProgram {
    program: nvrtc::sys::nvrtcProgram,
    name: String,
    arch: String,
    options: Vec<String>,
    // NVRTC may keep pointers into the source and name until the program is destroyed.
    _code: CString,
    _name: CString,
}

impl NvrtcProgram {
    fn compile(name: &str, code: &str, arch: &str, options: Vec<String>) -> Result<Self> {
        let fail = |message: &str| compile_error(name, arch, &options, message, String::new());
        let c_code = CString::new(code).map_err(|_| fail("the source contains a NUL byte"))?;
        let c_name = CString::new(name).map_err(|_| fail("the name contains a NUL byte"))?;
        let program = nvrtc::result::create_program(&c_code, Some(&c_name))
            .map_err(|e| fail(&format!("nvrtcCreateProgram: {e:?}")))?;
        let program = NvrtcProgram {
            program,
            name: name.to_string(),
            arch: arch.to_string(),
            options,
            _code: c_code,
            _name: c_name,
        };
        // SAFETY: `program` was created above and is destroyed only by Drop.
        let compiled = unsafe { nvrtc::result::compile_program(program.program, &program.options) };
        if let Err(e) = compiled {
            // SAFETY: as above.
            let log = unsafe { nvrtc::result::get_program_log(program.program) }
                .map(|raw| {
                    // `c_char` is i8 on x86_64 and u8 on AArch64: the same bytes either way.
                    let bytes: Vec<u8> = raw.iter().map(|c| c.to_ne_bytes()[0]).collect();
                    CStr::from_bytes_until_nul(&bytes)
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .unwrap_or_default();
            return Err(program.fail(&format!("{e:?}"), log));
        }
        Ok(program)
    }

    fn fail(&self, message: &str, log: String) -> Error {
        compile_error(&self.name, &self.arch, &self.options, message, log)
    }

    /// The PTX (NUL-terminated) or CUBIN bytes of the compiled program.
    fn output(&self, output: Output) -> Result<Vec<u8>> {
        let (size_call, get_call) = match output {
            Output::Ptx => (
                nvrtc::sys::nvrtcGetPTXSize as SizeFn,
                nvrtc::sys::nvrtcGetPTX as GetFn,
            ),
            Output::Cubin => (
                nvrtc::sys::nvrtcGetCUBINSize as SizeFn,
                nvrtc::sys::nvrtcGetCUBIN as GetFn,
            ),
        };
        let mut size = 0usize;
        // SAFETY: the program is compiled and alive; `size` is valid for one write.
        unsafe { size_call(self.program, &mut size) }
            .result()
            .map_err(|e| {
                self.fail(
                    &format!("getting the {output:?} size: {e:?}"),
                    String::new(),
                )
            })?;
        let mut bytes = vec![0u8; size];
        // SAFETY: `bytes` holds exactly the `size` bytes NVRTC reported for this output.
        unsafe { get_call(self.program, bytes.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| self.fail(&format!("getting the {output:?}: {e:?}"), String::new()))?;
        if bytes.is_empty() {
            return Err(self.fail(&format!("NVRTC produced no {output:?}"), String::new()));
        }
        Ok(bytes)
    }
}

impl Drop for NvrtcProgram {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram and is destroyed only here.
        // A failure to free it leaks a little host memory; there is nothing better to do in drop.
        let _ = unsafe { nvrtc::result::destroy_program(self.program) };
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sources::{KERNELS, SOURCES};

    /// The shortest embedded source: the quickest to compile.
    pub(crate) fn smallest_source() -> &'static KernelSource {
        SOURCES
            .iter()
            .min_by_key(|s| s.code.len())
            .expect("sources are embedded")
    }

    /// The PTX of a kernel that did not come from the bundle.
    fn ptx(kernel: &CompiledKernel) -> &str {
        match &kernel.code {
            KernelCode::CachedPtx(ptx) | KernelCode::CompiledPtx(ptx) => ptx,
            KernelCode::EmbeddedCubin(_) => panic!("{} came from the bundle", kernel.source),
        }
    }

    #[test]
    fn compiling_without_nvrtc_is_a_typed_error_and_with_it_yields_every_entry_point() {
        let config = CompileConfig::from_env("sm_90");
        let compiled = Compiler::new(config.clone(), None, Prebuilt::EMPTY).compile_all(SOURCES);
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
            let src = smallest_source();
            assert!(matches!(
                compile_uncached(src, &config),
                Err(Error::NvrtcNotFound { .. })
            ));
            assert!(matches!(
                compile_cubin(src, &config),
                Err(Error::NvrtcNotFound { .. })
            ));
            assert!(matches!(nvrtc_version(), Err(Error::NvrtcNotFound { .. })));
            return;
        }
        // NVRTC is present (the GPU machine, with CUDA_INCLUDE_DIR set): everything compiles.
        let compiled = compiled.unwrap_or_else(|e| panic!("{e}"));
        for ((file, entries), kernel) in KERNELS.iter().zip(&compiled) {
            assert_eq!(*file, kernel.source);
            assert!(matches!(kernel.code, KernelCode::CompiledPtx(_)));
            for entry in *entries {
                assert!(
                    ptx(kernel).contains(&format!(".entry {entry}(")),
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
            Prebuilt::EMPTY,
        );
        let src = smallest_source();
        let first = compiler.compile(src).unwrap();
        assert!(matches!(first.code, KernelCode::CompiledPtx(_)));
        assert!(first.cache_error.is_none(), "{:?}", first.cache_error);
        let second = compiler.compile(src).unwrap();
        assert!(matches!(second.code, KernelCode::CachedPtx(_)));
        assert_eq!(ptx(&first), ptx(&second));
    }

    #[test]
    fn code_options_are_the_nvrtc_options_without_include_dirs() {
        let mut config = CompileConfig::new("sm_90");
        config.extra_options.push("-lineinfo".to_string());
        let bare = config.nvrtc_options();
        config.include_dirs = vec![PathBuf::from("/a"), PathBuf::from("/b/cccl")];
        assert_eq!(config.nvrtc_options().len(), bare.len() + 2);
        assert_eq!(config.code_options(), bare);
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
        assert_eq!(arch_for_compute_capability(9, 0), "sm_90a");
        assert_eq!(arch_for_compute_capability(8, 6), "sm_86");
    }
}
