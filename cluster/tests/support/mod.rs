//! What the tests against a real etcd share: finding the etcd binary and free loopback ports.

use std::path::PathBuf;

use anyhow::bail;

#[path = "../../../tests/src/ports.rs"]
mod ports;
pub use ports::free_port;

/// The etcd binary: `TPSERVE_ETCD_BIN`, else `etcd` on PATH, else the cache dir that
/// `scripts/install-etcd.sh` fills; an error naming that script when there is none.
pub fn etcd_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("TPSERVE_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        if bin.is_file() {
            return Ok(bin);
        }
        bail!("TPSERVE_ETCD_BIN={} is not a file", bin.display());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("etcd").is_file() {
                return Ok(dir.join("etcd"));
            }
        }
    }
    // Same cache location as scripts/install-etcd.sh.
    let cache = match std::env::var_os("TPSERVE_CACHE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) => PathBuf::from(dir).join("tpserve"),
            None => {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/tpserve")
            }
        },
    };
    let cached = cache.join("tools/etcd/etcd");
    if cached.is_file() {
        return Ok(cached);
    }
    bail!(
        "no etcd binary: not in TPSERVE_ETCD_BIN, on PATH, or at {}; run scripts/install-etcd.sh",
        cached.display()
    )
}
