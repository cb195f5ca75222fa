//! The worker processes behind the coordinator: starting local ones, and driving a group of
//! them (start-up sequence and step streams) over gRPC.

pub mod group;
pub mod spawn;
pub mod supervisor;

pub use group::{GroupInit, GroupReady, WorkerGroup};
pub use spawn::{spawn_local_workers, worker_binary, LocalWorker};
pub use supervisor::{GroupEvent, LocalSupervisor};
