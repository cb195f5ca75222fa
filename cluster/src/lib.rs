//! etcd membership for tpserve clusters.
//!
//! Workers register their gRPC address under a lease at `/tpserve/<cluster>/<group>/workers/<rank>`
//! ([`Registration`]); the coordinator watches that prefix ([`GroupWatcher`]) and forms the
//! tensor-parallel group when all ranks are present. A worker that dies loses its lease and its
//! key vanishes within the TTL; a worker that returns registers again.
//!
//! etcd is reached through its JSON gRPC gateway ([`EtcdClient`]), so building needs no
//! `protoc`; over HTTPS with a client certificate and with etcd's user authentication when
//! configured ([`EtcdSecurity`]). Works with etcd 3.4 and 3.5.

pub mod client;
pub mod error;
pub mod membership;
pub mod registration;
pub mod security;
mod wire;

pub use client::{EtcdClient, KeyValue, LeaseId, WatchEvent, WatchStream};
pub use error::{Error, Op, Result};
pub use membership::{GroupWatcher, Membership};
pub use registration::Registration;
pub use security::EtcdSecurity;
