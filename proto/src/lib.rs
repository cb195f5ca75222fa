//! The worker protocol, `tpserve.worker.v1`: the messages and the gRPC client and server that the
//! coordinator and the workers share. See `worker.proto` for what every field means.

#![allow(clippy::all)]

/// Generated code for package `tpserve.worker.v1`.
pub mod v1 {
    tonic::include_proto!("tpserve.worker.v1");
}

pub use v1::*;

pub mod tls;

/// A digest of `worker.proto` as this build compiled it (see build.rs). Workers report it in
/// `InfoResponse.protocol`; the coordinator starts only with workers that report its own.
pub const PROTOCOL: &str = env!("TPSERVE_PROTOCOL_DIGEST");

/// The gRPC metadata key that carries a worker group's shared token: every RPC from the
/// coordinator sends it, and a worker started with a token refuses calls without it.
pub const WORKER_TOKEN_METADATA: &str = "x-tpserve-worker-token";

/// The environment variable that hands the token to a worker (never a command-line argument,
/// which other users of the host can read).
pub const WORKER_TOKEN_ENV: &str = "TPSERVE_WORKER_TOKEN";
