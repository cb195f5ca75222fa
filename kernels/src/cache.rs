//! The on-disk cache of compiled PTX, so a worker's second start compiles nothing.
//!
//! Layout: `<root>/kernels/<key>.ptx`, where `<root>` is `$TPSERVE_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/tpserve`, else `$HOME/.cache/tpserve`, and `<key>` is a [`CacheKey`]: a
//! 128-bit hash of everything that determines the PTX (source text, target architecture, NVRTC
//! options, NVRTC version). A changed input therefore means a new file, never a stale hit; old
//! files are simply left behind (a few hundred KB each). The worker keeps its step tuning's
//! choices beside the kernels, in `<root>/step-tuning`.
//!
//! Writes are atomic (a temporary file in the same directory, then a rename), so concurrent
//! workers on one node, or a crash mid-write, never leave a partial file under a key: a reader
//! sees the whole PTX or nothing.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Bumped when the key's recipe or the file format changes, to orphan old entries.
const KEY_FORMAT: &str = "tpserve-kernels-ptx-v1";

/// The format tag of [`CacheKey::for_cubin`], distinct from [`KEY_FORMAT`] so a PTX key and a
/// CUBIN key never coincide.
const CUBIN_KEY_FORMAT: &str = "tpserve-kernels-cubin-v1";

/// The name of a cached PTX file, or the key of a prebuilt CUBIN: 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key of PTX compiled from `source` (the expanded text NVRTC sees) for `arch`
    /// (e.g. `sm_90`) with the full NVRTC `options` list, by NVRTC `nvrtc_version`
    /// (`(major, minor)`, `None` when unknown).
    pub fn new(
        source: &str,
        arch: &str,
        options: &[String],
        nvrtc_version: Option<(i32, i32)>,
    ) -> Self {
        let mut hash = Self::hash_inputs(KEY_FORMAT, source, arch, options);
        match nvrtc_version {
            Some((major, minor)) => hash.field(format!("nvrtc {major}.{minor}").as_bytes()),
            None => hash.field(b"nvrtc unknown"),
        }
        CacheKey(format!("{:032x}", hash.finish()))
    }

    /// The key of a CUBIN compiled from `source` (the expanded text) for `arch` with the NVRTC
    /// `options` that determine the code ([`crate::CompileConfig::code_options`]). Unlike
    /// [`CacheKey::new`] it leaves out NVRTC's version: a CUBIN is final machine code, loaded
    /// without NVRTC, so the key must be computable on a machine that has none.
    pub fn for_cubin(source: &str, arch: &str, options: &[String]) -> Self {
        let hash = Self::hash_inputs(CUBIN_KEY_FORMAT, source, arch, options);
        CacheKey(format!("{:032x}", hash.finish()))
    }

    fn hash_inputs(format: &str, source: &str, arch: &str, options: &[String]) -> Fnv1a128 {
        let mut hash = Fnv1a128::new();
        hash.field(format.as_bytes());
        hash.field(source.as_bytes());
        hash.field(arch.as_bytes());
        hash.field(&(options.len() as u64).to_le_bytes());
        for option in options {
            hash.field(option.as_bytes());
        }
        hash
    }

    /// The key of anything else kept under the cache root: the hash of `format` (a tag naming
    /// the recipe and its version) and `fields`, each length-prefixed.
    pub fn of(format: &str, fields: &[&[u8]]) -> Self {
        let mut hash = Fnv1a128::new();
        hash.field(format.as_bytes());
        for field in fields {
            hash.field(field);
        }
        CacheKey(format!("{:032x}", hash.finish()))
    }

    /// The key as the file stem.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// FNV-1a with the 128-bit parameters: stable across Rust versions and platforms (unlike std's
/// `DefaultHasher`), and with no extra dependency. Not cryptographic: the cache trusts its
/// directory, and the inputs are not adversarial.
struct Fnv1a128(u128);

impl Fnv1a128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;

    fn new() -> Self {
        Fnv1a128(Self::OFFSET)
    }

    fn bytes(&mut self, data: &[u8]) {
        for byte in data {
            self.0 ^= u128::from(*byte);
            self.0 = self.0.wrapping_mul(Self::PRIME);
        }
    }

    /// Hashes a length-prefixed field, so ("ab", "c") and ("a", "bc") differ.
    fn field(&mut self, data: &[u8]) {
        self.bytes(&(data.len() as u64).to_le_bytes());
        self.bytes(data);
    }

    fn finish(&self) -> u128 {
        self.0
    }
}

/// tpserve's cache directory for the given values of `TPSERVE_CACHE_DIR`, `XDG_CACHE_HOME` and
/// `HOME` (see the module docs; the kernels live in its `kernels` directory). Empty values count
/// as unset; a relative `XDG_CACHE_HOME` is ignored, as the XDG specification says.
pub fn cache_root_from(
    tpserve_cache_dir: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(tpserve_cache_dir)
        .or_else(|| {
            set(xdg_cache_home)
                .filter(|p| p.is_absolute())
                .map(|p| p.join("tpserve"))
        })
        .or_else(|| set(home).map(|p| p.join(".cache").join("tpserve")))
}

/// tpserve's cache directory in this process's environment, if one can be named.
pub fn cache_root() -> Option<PathBuf> {
    cache_root_from(
        std::env::var_os("TPSERVE_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// A directory of compiled PTX files named by [`CacheKey`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtxCache {
    dir: PathBuf,
}

impl PtxCache {
    /// A cache in `dir` (the `kernels` directory itself; created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: dir.into() }
    }

    /// The cache in the default place for this process's environment (see the module docs).
    pub fn from_env() -> Result<Self> {
        let root = cache_root().ok_or(Error::NoCacheDir)?;
        Ok(Self::new(root.join("kernels")))
    }

    /// The kernels directory for the given values of `TPSERVE_CACHE_DIR`, `XDG_CACHE_HOME` and
    /// `HOME` ([`cache_root_from`]'s `kernels`).
    pub fn default_dir_from(
        tpserve_cache_dir: Option<OsString>,
        xdg_cache_home: Option<OsString>,
        home: Option<OsString>,
    ) -> Option<PathBuf> {
        Some(cache_root_from(tpserve_cache_dir, xdg_cache_home, home)?.join("kernels"))
    }

    /// The directory the PTX files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds (or would hold) the PTX of `key`.
    pub fn path_for(&self, key: &CacheKey) -> PathBuf {
        self.dir.join(format!("{}.ptx", key.as_str()))
    }

    /// The cached PTX of `key`, or `None` on a miss. An empty file counts as a miss.
    pub fn load(&self, key: &CacheKey) -> Result<Option<String>> {
        let path = self.path_for(key);
        match std::fs::read_to_string(&path) {
            Ok(text) if text.is_empty() => Ok(None),
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Cache { path, source }),
        }
    }

    /// Stores `ptx` under `key` atomically and returns the file's path. Replaces any existing
    /// entry (which, having the same key, holds the same PTX).
    pub fn store(&self, key: &CacheKey, ptx: &str) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|source| Error::Cache {
            path: self.dir.clone(),
            source,
        })?;
        let path = self.path_for(key);
        write_atomically(&path, ptx.as_bytes()).map_err(|source| Error::Cache {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }
}

/// Writes `bytes` to `path` atomically: into a temporary file in its directory (created if
/// missing), then renamed over `path`, so a reader sees the whole file or the one before; on a
/// failure the temporary file is removed (best effort).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // Best effort: the temporary file may not exist, and the original error matters more.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cache_key_changes_with_source_arch_options_and_nvrtc_version() {
        let base = CacheKey::new("src", "sm_90", &opts(&["-a"]), Some((13, 0)));
        assert_eq!(
            base,
            CacheKey::new("src", "sm_90", &opts(&["-a"]), Some((13, 0))),
            "the key is deterministic"
        );
        let variants = [
            CacheKey::new("src2", "sm_90", &opts(&["-a"]), Some((13, 0))),
            CacheKey::new("src", "sm_80", &opts(&["-a"]), Some((13, 0))),
            CacheKey::new("src", "sm_90", &opts(&["-b"]), Some((13, 0))),
            CacheKey::new("src", "sm_90", &opts(&[]), Some((13, 0))),
            CacheKey::new("src", "sm_90", &opts(&["-a", ""]), Some((13, 0))),
            CacheKey::new("src", "sm_90", &opts(&["-a"]), Some((13, 1))),
            CacheKey::new("src", "sm_90", &opts(&["-a"]), None),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(&base, v, "variant {i}");
        }
        assert_eq!(base.as_str().len(), 32);
        assert!(base.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn cubin_key_differs_from_the_ptx_key_and_changes_with_source_arch_and_options() {
        let base = CacheKey::for_cubin("src", "sm_90", &opts(&["-a"]));
        assert_eq!(base, CacheKey::for_cubin("src", "sm_90", &opts(&["-a"])));
        assert_ne!(base, CacheKey::new("src", "sm_90", &opts(&["-a"]), None));
        for (i, v) in [
            CacheKey::for_cubin("src2", "sm_90", &opts(&["-a"])),
            CacheKey::for_cubin("src", "sm_80", &opts(&["-a"])),
            CacheKey::for_cubin("src", "sm_90", &opts(&["-a", "-b"])),
        ]
        .iter()
        .enumerate()
        {
            assert_ne!(&base, v, "variant {i}");
        }
    }

    #[test]
    fn cache_key_fields_are_length_prefixed() {
        let a = CacheKey::new("ab", "c", &[], None);
        let b = CacheKey::new("a", "bc", &[], None);
        assert_ne!(a, b);
        let c = CacheKey::new("s", "sm_90", &opts(&["-ab"]), None);
        let d = CacheKey::new("s", "sm_90", &opts(&["-a", "b"]), None);
        assert_ne!(c, d);
    }

    #[test]
    fn cache_key_is_stable_across_builds() {
        // A changed hash would silently orphan every cached kernel; change KEY_FORMAT instead.
        // The expected value was computed independently (a Python FNV-1a 128 over the same
        // length-prefixed fields).
        let key = CacheKey::new("x", "sm_90", &opts(&["--std=c++17"]), Some((13, 0)));
        assert_eq!(key.as_str(), "292c2967091e9b4c7806cf85995a90d6");
        let mut h = Fnv1a128::new();
        h.bytes(b"a");
        // The published FNV-1a 128 test vector for "a".
        assert_eq!(h.finish(), 0xd228cb696f1a8caf78912b704e4a8964);
    }

    #[test]
    fn other_keys_hash_their_format_and_framed_fields() {
        let key = CacheKey::of("tag-v1", &[b"ab", b"c"]);
        assert_eq!(key, CacheKey::of("tag-v1", &[b"ab", b"c"]));
        assert_ne!(key, CacheKey::of("tag-v1", &[b"a", b"bc"]));
        assert_ne!(key, CacheKey::of("tag-v2", &[b"ab", b"c"]));
        assert_eq!(key.as_str().len(), 32);
    }

    #[test]
    fn a_file_written_atomically_replaces_the_old_one_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub").join("f.txt");
        write_atomically(&file, b"one").unwrap();
        write_atomically(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.txt"]);
    }

    #[test]
    fn ptx_round_trips_through_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path().join("kernels"));
        let key = CacheKey::new("src", "sm_90", &[], Some((13, 0)));
        assert_eq!(cache.load(&key).unwrap(), None, "miss before any store");
        let path = cache.store(&key, ".version 9.0\n.target sm_90\n").unwrap();
        assert_eq!(path, cache.path_for(&key));
        assert_eq!(
            cache.load(&key).unwrap().as_deref(),
            Some(".version 9.0\n.target sm_90\n")
        );
        cache.store(&key, "replaced").unwrap();
        assert_eq!(cache.load(&key).unwrap().as_deref(), Some("replaced"));
        let other = CacheKey::new("src", "sm_80", &[], Some((13, 0)));
        assert_eq!(
            cache.load(&other).unwrap(),
            None,
            "another key still misses"
        );
        let leftovers: Vec<_> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn empty_cache_file_counts_as_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let cache = PtxCache::new(dir.path());
        let key = CacheKey::new("src", "sm_90", &[], None);
        std::fs::write(cache.path_for(&key), "").unwrap();
        assert_eq!(cache.load(&key).unwrap(), None);
    }

    #[test]
    fn store_into_an_unwritable_place_is_a_cache_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let cache = PtxCache::new(file.join("kernels"));
        let key = CacheKey::new("src", "sm_90", &[], None);
        assert!(matches!(cache.store(&key, "ptx"), Err(Error::Cache { .. })));
    }

    #[test]
    fn cache_dir_prefers_tpserve_then_xdg_then_home() {
        let os = |s: &str| Some(OsString::from(s));
        let dir = PtxCache::default_dir_from;
        assert_eq!(
            dir(os("/t"), os("/x"), os("/h")),
            Some(PathBuf::from("/t/kernels"))
        );
        assert_eq!(
            dir(None, os("/x"), os("/h")),
            Some(PathBuf::from("/x/tpserve/kernels"))
        );
        assert_eq!(
            dir(os(""), os(""), os("/h")),
            Some(PathBuf::from("/h/.cache/tpserve/kernels"))
        );
        assert_eq!(
            dir(None, os("relative"), os("/h")),
            Some(PathBuf::from("/h/.cache/tpserve/kernels")),
            "a relative XDG_CACHE_HOME is ignored"
        );
        assert_eq!(dir(None, None, None), None);
    }
}
