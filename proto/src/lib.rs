//! The worker protocol, `tpserve.worker.v1`: the messages and the gRPC client and server that the
//! coordinator and the workers share. See `worker.proto` for what every field means.

#![allow(clippy::all)]

/// Generated code for package `tpserve.worker.v1`.
pub mod v1 {
    tonic::include_proto!("tpserve.worker.v1");
}

pub use v1::*;
