//! Prebuilt kernels: CUBINs compiled ahead of time for the common architectures, so a worker's
//! first start on a new machine compiles nothing (and needs no NVRTC) on those GPUs.
//!
//! `scripts/prebuild-kernels.sh` runs [`write_bundle`] (through the `tpserve-prebuild-kernels`
//! binary) to write a bundle directory, `kernels/prebuilt/` by default: one CUBIN per
//! (architecture, source) and a [`Manifest`]. `build.rs` embeds that bundle into this crate
//! when it exists (or the one `TPSERVE_PREBUILT_KERNELS` names), and [`Prebuilt::embedded`] is
//! what it embedded: nothing in a build without a bundle, which then works as before.
//!
//! Invariant: [`Prebuilt::find`] returns a CUBIN only when the GPU can run it (the same
//! architecture, or an older minor of the same major: `sm_80` code serves `sm_86` and `sm_89`)
//! and only under the key of this build's expanded source and code-determining options for the
//! entry's architecture ([`prebuilt_key`]); an entry built from an older source or with other
//! options is never used, and the caller falls back to the PTX cache and NVRTC.
//!
//! Costs: a lookup hashes the expanded source (tens of KB, well under a millisecond) and scans
//! a few dozen entries. The bundle costs the binary its size: measured 2026-12 with NVRTC 13.0,
//! ~2.0 MB per architecture (the attention kernels are 80% of it), so the default `sm_80 sm_90`
//! adds ~4 MB and all four of `sm_80 sm_86 sm_89 sm_90` ~8 MB.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::cache::CacheKey;
use crate::compile::{compile_cubin, nvrtc_version, CompileConfig};
use crate::error::{Error, Result};
use crate::manifest::{Manifest, ManifestEntry, MANIFEST_FILE};
use crate::sources::KernelSource;

/// One embedded CUBIN; `build.rs` writes a table of these (the fields of a manifest entry, the
/// file's bytes in place of its name).
#[derive(Clone, Copy)]
pub(crate) struct PrebuiltEntry {
    /// The architecture it was compiled for, e.g. `sm_90`.
    pub(crate) arch: &'static str,
    /// The source file it was compiled from, e.g. `rope.cu`.
    pub(crate) source: &'static str,
    /// [`prebuilt_key`] of that source and configuration.
    pub(crate) key: &'static str,
    /// The CUBIN (an ELF image).
    pub(crate) cubin: &'static [u8],
}

/// Names the CUBIN by its size: its bytes (up to megabytes) have no place in a log.
impl std::fmt::Debug for PrebuiltEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrebuiltEntry")
            .field("arch", &self.arch)
            .field("source", &self.source)
            .field("key", &self.key)
            .field("cubin_bytes", &self.cubin.len())
            .finish()
    }
}

/// The bundle `build.rs` embedded: an empty table when it found none.
static EMBEDDED: &[PrebuiltEntry] = include!(concat!(env!("OUT_DIR"), "/prebuilt.rs"));

/// A set of prebuilt CUBINs, looked up by architecture, source and key.
#[derive(Debug, Clone, Copy)]
pub struct Prebuilt {
    entries: &'static [PrebuiltEntry],
}

impl Prebuilt {
    /// No prebuilt kernels: everything goes to the cache or NVRTC.
    pub const EMPTY: Prebuilt = Prebuilt { entries: &[] };

    pub(crate) const fn new(entries: &'static [PrebuiltEntry]) -> Self {
        Prebuilt { entries }
    }

    /// The bundle embedded in this build (see the module docs); empty when the build had none.
    pub fn embedded() -> Self {
        Self::new(EMBEDDED)
    }

    /// Whether it holds no kernel at all (a build without a bundle).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The CUBIN of source `name`, whose expanded text is `expanded`, for `config`: the entry
    /// built for `config.arch` itself, else for the newest older architecture of the same major
    /// version, whose code the GPU runs too (CUDA's binary compatibility: `sm_80` code runs on
    /// `sm_86` and `sm_89`). An entry counts only under the key of this source and these options
    /// for its own architecture; `None` when no entry qualifies (a stale entry never does).
    pub fn find(
        &self,
        name: &str,
        expanded: &str,
        config: &CompileConfig,
    ) -> Option<&'static [u8]> {
        let mut candidates: Vec<(u32, &PrebuiltEntry)> = self
            .entries
            .iter()
            .filter(|e| e.source == name)
            .filter_map(|e| Some((runs_on(e.arch, &config.arch)?, e)))
            .collect();
        // The newest compatible architecture first: the exact one when present.
        candidates.sort_by_key(|(minor, _)| std::cmp::Reverse(*minor));
        candidates.into_iter().find_map(|(_, e)| {
            let built = CompileConfig {
                arch: e.arch.to_string(),
                ..config.clone()
            };
            (prebuilt_key(expanded, &built).as_str() == e.key).then_some(e.cubin)
        })
    }

    /// Whether every source of `sources` is here, current, for `config`: then nothing needs
    /// NVRTC.
    pub fn covers(&self, sources: &[KernelSource], config: &CompileConfig) -> bool {
        sources
            .iter()
            .all(|s| self.find(s.name, &s.expanded(), config).is_some())
    }
}

/// The minor version of `built` when a CUBIN for architecture `built` runs on a GPU of
/// architecture `gpu`: the same major version and a minor no newer than the GPU's. An
/// architecture-specific target (`sm_90a`) or a name that is not `sm_<major><minor>` runs only
/// on exactly its own name.
fn runs_on(built: &str, gpu: &str) -> Option<u32> {
    let version = |arch: &str| -> Option<(u32, u32)> {
        let digits = arch.strip_prefix("sm_")?;
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (major, minor) = digits.split_at(digits.len() - 1);
        Some((major.parse().ok()?, minor.parse().ok()?))
    };
    match (version(built), version(gpu)) {
        (Some((major, minor)), Some((gpu_major, gpu_minor))) => {
            (major == gpu_major && minor <= gpu_minor).then_some(minor)
        }
        _ => (built == gpu).then_some(u32::MAX),
    }
}

/// The key of a prebuilt CUBIN of `expanded` (a source's expanded text) for `config`: its
/// architecture and [`CompileConfig::code_options`], so the include directories of the machine
/// that built the bundle do not matter.
pub fn prebuilt_key(expanded: &str, config: &CompileConfig) -> CacheKey {
    CacheKey::for_cubin(expanded, &config.arch, &config.code_options())
}

/// What [`write_bundle`] did for one architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchSummary {
    /// The architecture, e.g. `sm_90`.
    pub arch: String,
    /// Wall-clock seconds to compile every source for it.
    pub seconds: f64,
    /// Total bytes of its CUBINs.
    pub bytes: usize,
}

/// Compiles every source of `sources` to CUBIN for each configuration of `configs` (one per
/// architecture, usually [`CompileConfig::from_env`]) and writes the bundle to `dir`, replacing
/// the bundle there if any. The sources of one architecture compile on `threads` threads.
///
/// The bundle is written next to `dir` first and renamed into place, so `dir` never holds a
/// partial bundle. A `dir` that exists and is not a bundle (no manifest) and not empty is
/// refused rather than replaced.
pub fn write_bundle(
    dir: &Path,
    configs: &[CompileConfig],
    sources: &[KernelSource],
    threads: usize,
) -> Result<Vec<ArchSummary>> {
    // Fails early, before touching any directory, when NVRTC is missing.
    nvrtc_version()?;
    if dir.exists() && !dir.join(MANIFEST_FILE).is_file() {
        let empty = std::fs::read_dir(dir)
            .map_err(io_error(dir))?
            .next()
            .is_none();
        if !empty {
            return Err(Error::NotABundle {
                path: dir.to_path_buf(),
            });
        }
    }
    let staging = sibling(dir, &format!(".partial-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    }
    let written = write_staging(&staging, configs, sources, threads);
    let summaries = match written {
        Ok(summaries) => summaries,
        Err(e) => {
            // Best effort: the compile or write error matters more than a leftover directory.
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    if dir.exists() {
        // Checked above: an empty directory or an older bundle.
        std::fs::remove_dir_all(dir).map_err(io_error(dir))?;
    }
    std::fs::rename(&staging, dir).map_err(io_error(dir))?;
    Ok(summaries)
}

/// The bundle of [`write_bundle`], written into `staging`, the manifest last.
fn write_staging(
    staging: &Path,
    configs: &[CompileConfig],
    sources: &[KernelSource],
    threads: usize,
) -> Result<Vec<ArchSummary>> {
    let mut manifest = Manifest {
        nvrtc_version: nvrtc_version()?,
        entries: Vec::new(),
    };
    let mut summaries = Vec::new();
    for config in configs {
        let arch_dir = staging.join(&config.arch);
        std::fs::create_dir_all(&arch_dir).map_err(io_error(&arch_dir))?;
        let started = Instant::now();
        let cubins = parallel_map(sources, threads, |s| compile_cubin(s, config))?;
        let seconds = started.elapsed().as_secs_f64();
        let mut bytes = 0;
        for (source, cubin) in sources.iter().zip(cubins) {
            let file = format!(
                "{}/{}.cubin",
                config.arch,
                source.name.trim_end_matches(".cu")
            );
            let path = staging.join(&file);
            std::fs::write(&path, &cubin).map_err(io_error(&path))?;
            bytes += cubin.len();
            manifest.entries.push(ManifestEntry {
                arch: config.arch.clone(),
                source: source.name.to_string(),
                key: prebuilt_key(&source.expanded(), config)
                    .as_str()
                    .to_string(),
                file,
            });
        }
        summaries.push(ArchSummary {
            arch: config.arch.clone(),
            seconds,
            bytes,
        });
    }
    let manifest_path = staging.join(MANIFEST_FILE);
    std::fs::write(&manifest_path, manifest.render()).map_err(io_error(&manifest_path))?;
    Ok(summaries)
}

/// Maps an I/O error on `path` to [`Error::Bundle`].
fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Bundle { path, source }
}

/// `dir` with `suffix` appended to its last component.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    dir.with_file_name(name)
}

/// `f` of every item, in order, on up to `threads` threads; the first error in item order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<R>>>> =
        Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, items.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let result = f(item);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(result);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every item was taken by a thread"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::tests::smallest_source;
    use crate::compile::{nvrtc_available, Compiler, KernelCode};
    use crate::sources::{KERNELS, SOURCES};

    const FAKE_CUBIN: &[u8] = b"\x7fELF fake cubin";

    fn leak<T>(value: T) -> &'static T {
        Box::leak(Box::new(value))
    }

    /// An entry for `src` on `config`'s architecture under its current key.
    fn current_entry(
        src: &'static KernelSource,
        config: &CompileConfig,
        cubin: &'static [u8],
    ) -> PrebuiltEntry {
        let key = prebuilt_key(&src.expanded(), config);
        PrebuiltEntry {
            arch: leak(config.arch.clone()),
            source: src.name,
            key: leak(key.as_str().to_string()),
            cubin,
        }
    }

    /// A bundle that holds every source for `config`.
    fn full_bundle(config: &CompileConfig) -> Prebuilt {
        let entries: Vec<PrebuiltEntry> = SOURCES
            .iter()
            .map(|s| current_entry(s, config, FAKE_CUBIN))
            .collect();
        Prebuilt::new(leak(entries))
    }

    #[test]
    fn a_current_entry_is_found_and_served_without_nvrtc() {
        let config = CompileConfig::new("sm_90");
        let bundle = full_bundle(&config);
        assert!(bundle.covers(SOURCES, &config));
        // Whether or not NVRTC is loadable here, every source comes from the bundle.
        let compiler = Compiler::new(config, None, bundle);
        for kernel in compiler.compile_all(SOURCES).unwrap() {
            assert!(
                matches!(kernel.code, KernelCode::EmbeddedCubin(c) if c == FAKE_CUBIN),
                "{}",
                kernel.source
            );
        }
    }

    #[test]
    fn include_dirs_do_not_change_the_key() {
        let built = CompileConfig::new("sm_90");
        let bundle = full_bundle(&built);
        let mut running = CompileConfig::new("sm_90");
        running.include_dirs = vec![PathBuf::from("/usr/local/cuda/include")];
        assert!(bundle.covers(SOURCES, &running));
    }

    #[test]
    fn a_stale_entry_is_never_used() {
        let config = CompileConfig::from_env("sm_90");
        let src = smallest_source();
        let bundle = full_bundle(&config);
        // The source changed since the bundle was built.
        let edited = format!("{}\n// edited\n", src.expanded());
        assert_eq!(bundle.find(src.name, &edited, &config), None);
        // Other options than the bundle's.
        let mut other = config.clone();
        other.extra_options.push("-lineinfo".into());
        assert!(!bundle.covers(SOURCES, &other));
        assert_eq!(bundle.find(src.name, &src.expanded(), &other), None);
        // An entry whose key is not that of this build's source, e.g. from an older checkout.
        let mut stale = current_entry(src, &config, FAKE_CUBIN);
        stale.key = "0123456789abcdef0123456789abcdef";
        let stale_bundle = Prebuilt::new(leak(vec![stale]));
        assert_eq!(stale_bundle.find(src.name, &src.expanded(), &config), None);
        let compiled = Compiler::new(config, None, stale_bundle).compile(src);
        match compiled {
            Ok(kernel) => assert!(matches!(kernel.code, KernelCode::CompiledPtx(_))),
            Err(e) => assert!(matches!(e, Error::NvrtcNotFound { .. }), "{e}"),
        }
    }

    #[test]
    fn a_missing_arch_or_source_falls_back_to_nvrtc() {
        let bundle = full_bundle(&CompileConfig::from_env("sm_90"));
        let sm80 = CompileConfig::from_env("sm_80");
        assert!(!bundle.covers(SOURCES, &sm80));
        let src = smallest_source();
        assert_eq!(bundle.find(src.name, &src.expanded(), &sm80), None);
        match Compiler::new(sm80, None, bundle).compile(src) {
            Ok(kernel) => assert!(matches!(kernel.code, KernelCode::CompiledPtx(_))),
            Err(e) => assert!(matches!(e, Error::NvrtcNotFound { .. }), "{e}"),
        }
        let sm90 = CompileConfig::from_env("sm_90");
        let partial = Prebuilt::new(leak(vec![current_entry(src, &sm90, FAKE_CUBIN)]));
        assert!(partial.find(src.name, &src.expanded(), &sm90).is_some());
        assert!(!partial.covers(SOURCES, &sm90), "one source is not all");
        assert!(!Prebuilt::EMPTY.covers(SOURCES, &sm90));
        assert!(Prebuilt::EMPTY.is_empty());
    }

    #[test]
    fn code_for_an_older_minor_of_the_same_major_serves_the_newer_gpus() {
        let sm80 = CompileConfig::new("sm_80");
        let bundle = full_bundle(&sm80);
        for gpu in ["sm_80", "sm_86", "sm_87", "sm_89"] {
            assert!(bundle.covers(SOURCES, &CompileConfig::new(gpu)), "{gpu}");
        }
        for gpu in ["sm_75", "sm_90", "sm_100", "sm_90a"] {
            assert!(!bundle.covers(SOURCES, &CompileConfig::new(gpu)), "{gpu}");
        }
        // The exact architecture wins over an older one; a stale exact entry gives way to a
        // current older one.
        let src = smallest_source();
        let sm86 = CompileConfig::new("sm_86");
        const EXACT: &[u8] = b"\x7fELF sm_86";
        let both = Prebuilt::new(leak(vec![
            current_entry(src, &sm80, FAKE_CUBIN),
            current_entry(src, &sm86, EXACT),
        ]));
        assert_eq!(both.find(src.name, &src.expanded(), &sm86), Some(EXACT));
        let mut stale = current_entry(src, &sm86, EXACT);
        stale.key = "0123456789abcdef0123456789abcdef";
        let older = Prebuilt::new(leak(vec![stale, current_entry(src, &sm80, FAKE_CUBIN)]));
        assert_eq!(
            older.find(src.name, &src.expanded(), &sm86),
            Some(FAKE_CUBIN)
        );
    }

    #[test]
    fn architecture_compatibility_follows_major_and_minor() {
        assert_eq!(runs_on("sm_80", "sm_89"), Some(0));
        assert_eq!(runs_on("sm_86", "sm_89"), Some(6));
        assert_eq!(runs_on("sm_89", "sm_86"), None);
        assert_eq!(runs_on("sm_90", "sm_90"), Some(0));
        assert_eq!(runs_on("sm_90", "sm_100"), None);
        assert_eq!(runs_on("sm_100", "sm_103"), Some(0));
        assert_eq!(runs_on("sm_90a", "sm_90"), None);
        assert_eq!(runs_on("sm_90a", "sm_90a"), Some(u32::MAX));
    }

    #[test]
    fn the_embedded_bundle_is_the_one_the_build_found() {
        // build.rs embeds TPSERVE_PREBUILT_KERNELS's bundle, else kernels/prebuilt/ if it has a
        // manifest; cargo runs tests with the environment it built them with.
        let named = std::env::var_os("TPSERVE_PREBUILT_KERNELS").is_some_and(|v| !v.is_empty());
        let default = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("prebuilt")
            .join(MANIFEST_FILE)
            .is_file();
        let embedded = Prebuilt::embedded();
        assert_eq!(!embedded.is_empty(), named || default);
        // scripts/check-kernels.sh builds with a fresh bundle for this architecture.
        let Some(arch) = std::env::var("TPSERVE_REQUIRE_PREBUILT")
            .ok()
            .filter(|a| !a.is_empty())
        else {
            return;
        };
        let config = CompileConfig::from_env(arch.as_str());
        assert!(
            embedded.covers(SOURCES, &config),
            "the embedded bundle does not hold every current source for {arch}"
        );
        let compiler = Compiler::new(config, None, embedded);
        for ((file, entries), kernel) in KERNELS.iter().zip(compiler.compile_all(SOURCES).unwrap())
        {
            let KernelCode::EmbeddedCubin(cubin) = kernel.code else {
                panic!("{file} did not come from the bundle");
            };
            assert_cubin_has(cubin, entries, file);
        }
    }

    fn assert_cubin_has(cubin: &[u8], entries: &[&str], file: &str) {
        assert!(
            cubin.starts_with(b"\x7fELF"),
            "the CUBIN of {file} is not ELF"
        );
        for entry in entries {
            assert!(
                cubin
                    .windows(entry.len() + 1)
                    .any(|w| w[..entry.len()] == *entry.as_bytes() && w[entry.len()] == 0),
                "{entry} missing from the CUBIN of {file}"
            );
        }
    }

    #[test]
    fn prebuild_of_one_source_yields_a_cubin_with_every_entry_point() {
        if !nvrtc_available() {
            // Needs NVRTC (scripts/check-kernels.sh requires it); the lookup is covered above.
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let bundle_dir = dir.path().join("prebuilt");
        let src = *smallest_source();
        let config = CompileConfig::from_env("sm_90");
        let summaries = write_bundle(&bundle_dir, std::slice::from_ref(&config), &[src], 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].arch, "sm_90");
        let text = std::fs::read_to_string(bundle_dir.join(MANIFEST_FILE)).unwrap();
        let manifest = Manifest::parse(&text).unwrap();
        assert_eq!(manifest.nvrtc_version, nvrtc_version().unwrap());
        let [entry] = manifest.entries.as_slice() else {
            panic!("{manifest:?}");
        };
        assert_eq!(
            (entry.arch.as_str(), entry.source.as_str()),
            ("sm_90", src.name)
        );
        let cubin = std::fs::read(bundle_dir.join(&entry.file)).unwrap();
        assert_eq!(summaries[0].bytes, cubin.len());
        let entries = KERNELS.iter().find(|(f, _)| *f == src.name).unwrap().1;
        assert_cubin_has(&cubin, entries, src.name);
        // The manifest's key is the one a worker computes, so the compiler serves this CUBIN.
        let bundle = Prebuilt::new(leak(vec![PrebuiltEntry {
            arch: "sm_90",
            source: src.name,
            key: leak(entry.key.clone()),
            cubin: leak(cubin),
        }]));
        let kernel = Compiler::new(config.clone(), None, bundle)
            .compile(&src)
            .unwrap();
        assert!(matches!(kernel.code, KernelCode::EmbeddedCubin(_)));
        // A second run replaces the bundle; a directory that is not a bundle is refused.
        write_bundle(&bundle_dir, std::slice::from_ref(&config), &[src], 1).unwrap();
        let stranger = dir.path().join("stranger");
        std::fs::create_dir(&stranger).unwrap();
        std::fs::write(stranger.join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            write_bundle(&stranger, &[config], &[src], 1),
            Err(Error::NotABundle { .. })
        ));
        assert!(stranger.join("notes.txt").is_file());
    }

    #[test]
    fn parallel_map_keeps_order_and_reports_the_first_error() {
        let items: Vec<usize> = (0..20).collect();
        let doubled = parallel_map(&items, 3, |&i| Ok(i * 2)).unwrap();
        assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let failed = parallel_map(&items, 4, |&i| {
            if i % 7 == 3 {
                Err(Error::UnknownSource {
                    name: i.to_string(),
                })
            } else {
                Ok(i)
            }
        });
        assert!(matches!(failed, Err(Error::UnknownSource { name }) if name == "3"));
        assert!(parallel_map(&[] as &[usize], 4, |&i| Ok(i))
            .unwrap()
            .is_empty());
    }
}
