//! Loopback ports for the servers a test starts (etcd, `tpserve serve`, a README block's).
//!
//! A port taken from `bind(127.0.0.1:0)` and released lies in the kernel's ephemeral range, the
//! range every other `bind(0)` (a worker listening on port 0) and every outgoing connection (an
//! etcd client) draws from. Until the test's server binds it, any of those can take it: CI once
//! saw a README block's etcd fail to start because its client port had gone to a worker's gRPC
//! listener, whose HTTP/2 server then held the etcd clients' HTTP/1 requests until they timed
//! out. So the ports here come from below that range, where the kernel hands out nothing by
//! itself. This file is shared by path with `cluster/tests/support`.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The lowest port handed out here; below it lie the well-known and registered services tests
/// must not meet.
const FIRST: u32 = 10_000;

/// A loopback TCP port that was free a moment ago and that the kernel does not give to anyone
/// else by itself (it lies below the ephemeral range). Ports are distinct within a process, and
/// each process starts at its own place, so test binaries running side by side rarely meet.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let span = ephemeral_start().saturating_sub(FIRST);
    if span < 1_000 {
        // An unusual range leaves no room below it: take the kernel's.
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
    }
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(7_919).wrapping_add(nanos) % span
    });
    for _ in 0..span {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and the ephemeral range");
}

/// The first port of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}
