//! The crate's error type. Variants are named after the phase that failed: reaching etcd at all
//! (`Connect`), TLS files and credentials that cannot be used (`Security`), etcd refusing a request (`Rpc`), an answer we could not read (`Decode`), a lease
//! that no longer exists (`LeaseExpired`), and a watch that ended (`WatchCanceled`, `WatchBroken`).

use crate::client::LeaseId;

/// Which etcd call failed; carried by errors so logs say what was being attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Authenticate,
    Grant,
    KeepAlive,
    Revoke,
    Put,
    Range,
    Delete,
    Watch,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Authenticate => "authenticate",
            Op::Grant => "lease grant",
            Op::KeepAlive => "lease keepalive",
            Op::Revoke => "lease revoke",
            Op::Put => "put",
            Op::Range => "range",
            Op::Delete => "delete",
            Op::Watch => "watch",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("invalid etcd endpoint {endpoint:?}: {reason}")]
    Config { endpoint: String, reason: String },
    /// The TLS files or credentials are missing, unreadable or do not go together.
    #[error("etcd TLS or authentication settings: {detail}")]
    Security { detail: String },
    /// No endpoint answered (connection refused, timeout, connection reset).
    #[error("etcd {op}: no endpoint answered (tried {endpoints}): {last_error}")]
    Connect {
        op: Op,
        endpoints: String,
        last_error: String,
    },
    /// etcd answered with an error status (gRPC code as in google.golang.org/grpc/codes).
    #[error("etcd {op} refused: {message} (grpc code {code})")]
    Rpc { op: Op, code: i32, message: String },
    #[error("etcd {op}: unreadable answer: {detail}")]
    Decode { op: Op, detail: String },
    /// The lease is gone: it expired (no keepalive within its TTL) or was revoked.
    #[error("etcd lease {lease} has expired or was revoked")]
    LeaseExpired { lease: LeaseId },
    /// etcd ended the watch; `compact_revision` is set when the start revision was compacted.
    #[error("etcd watch on {prefix:?} canceled (compact revision {compact_revision}): {reason}")]
    WatchCanceled {
        prefix: String,
        compact_revision: i64,
        reason: String,
    },
    /// The watch stream broke (etcd restarted, connection dropped); re-list and watch again.
    #[error("etcd watch on {prefix:?} broke: {detail}")]
    WatchBroken { prefix: String, detail: String },
    /// The group watcher's background task is gone (it only ends if it panicked).
    #[error("group watcher stopped")]
    WatcherStopped,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
