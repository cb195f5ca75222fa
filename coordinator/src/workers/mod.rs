//! The worker processes behind the coordinator: starting local ones, and driving a group of
//! them (start-up sequence and step streams) over gRPC.

pub mod etcd;
pub mod group;
pub mod local;
pub mod spawn;
pub mod supervisor;
pub mod token;

pub use etcd::EtcdWorkers;
pub use group::{GroupInit, GroupReady, WorkerGroup};
pub use local::LocalWorkers;
pub use spawn::{spawn_local_workers, stop_all, worker_binary, LocalWorker};
pub use supervisor::{GroupEvent, Supervisor, WorkerSource};
pub use token::GroupToken;
