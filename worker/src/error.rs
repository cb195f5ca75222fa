//! Errors of the worker library, named after the phase that failed. The gRPC service turns them
//! into `tonic::Status` in one place (`service::status`).

use thiserror::Error;

/// Why a worker operation failed.
#[derive(Debug, Error)]
pub enum WorkerError {
    /// Reading or interpreting the model failed.
    #[error("loading the model failed: {0}")]
    Load(#[from] tpserve_modelfile::Error),
    /// The model cannot be split over this many ranks.
    #[error("tensor parallelism: {detail}")]
    Sharding { detail: String },
    /// The model uses something this worker does not implement.
    #[error("unsupported model: {detail}")]
    Unsupported { detail: String },
    /// Joining or using the tensor-parallel group failed.
    #[error("communicator: {detail}")]
    Communicator { detail: String },
    /// An operation came in the wrong lifecycle order (e.g. a step before the cache exists).
    #[error("{operation} called before {needs}")]
    Lifecycle {
        operation: &'static str,
        needs: &'static str,
    },
    /// A step plan that contradicts the worker's state (unknown sequence, missing blocks).
    #[error("invalid step plan: {detail}")]
    Plan { detail: String },
    /// The requested KV cache does not fit.
    #[error("KV cache: {detail}")]
    Cache { detail: String },
    /// The device was asked for something it cannot do.
    #[error("device: {detail}")]
    Device { detail: String },
}

/// Result alias of the worker.
pub type Result<T> = std::result::Result<T, WorkerError>;
