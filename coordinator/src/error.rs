//! Errors of the coordinator library, one enum per concern. Mapping to HTTP statuses and OpenAI's
//! error JSON happens in exactly one place: `api::error`.

use thiserror::Error;

use crate::scheduler::SchedulerError;

/// Why the engine could not take or finish a request.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EngineError {
    /// The waiting queue is at `--max-waiting-requests`.
    #[error("the server is overloaded: {waiting} requests are waiting (the limit); retry later")]
    QueueFull { waiting: usize },
    /// The request's tokens (prompt, plus `max_tokens` for the KV cache) can never fit: longer
    /// than max-model-len, or more KV blocks than exist. OpenAI's `context_length_exceeded`,
    /// which clients look for to trim their input.
    #[error("{message}")]
    ContextLengthExceeded { message: String },
    /// The request can never run here for another reason.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// A worker failed while running the request's step.
    #[error("worker failure: {detail}")]
    WorkerFailed { detail: String },
    /// The engine is not serving (workers down, starting, or shutting down).
    #[error("the engine is unavailable: {detail}")]
    Unavailable { detail: String },
}

impl From<SchedulerError> for EngineError {
    /// The scheduler's refusal with its kind kept: too many tokens is `ContextLengthExceeded`,
    /// anything else an invalid request.
    fn from(e: SchedulerError) -> Self {
        match e {
            SchedulerError::PromptTooLong { .. } | SchedulerError::ExceedsKvCache { .. } => {
                Self::ContextLengthExceeded {
                    message: e.to_string(),
                }
            }
            _ => Self::InvalidRequest {
                message: e.to_string(),
                param: None,
            },
        }
    }
}

/// Result alias of the engine.
pub type EngineResult<T> = std::result::Result<T, EngineError>;

/// Why the server could not start (bad flags, a model that does not split, a worker that failed
/// to come up). The binary prints it and exits non-zero.
#[derive(Debug, Error)]
pub enum StartError {
    /// Flags that contradict each other or the model.
    #[error("invalid configuration: {detail}")]
    Config { detail: String },
    /// The model could not be read.
    #[error("model: {0}")]
    Model(#[from] tpserve_modelfile::Error),
    /// A worker process could not be started.
    #[error("starting worker {binary}: {detail}")]
    Spawn { binary: String, detail: String },
    /// A worker could not be reached over gRPC.
    #[error("connecting to worker {addr}: {detail}")]
    Connect { addr: String, detail: String },
    /// A worker failed one phase of start-up.
    #[error("worker {rank} failed during {phase}: {detail}")]
    Worker {
        rank: usize,
        phase: &'static str,
        detail: String,
    },
}

/// Why a structured-output constraint could not be compiled or followed (`structured`).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum StructuredError {
    /// The tokenizer cannot be described to the grammar engine (llguidance needs each token's
    /// bytes: byte-level or byte-fallback tokenizers).
    #[error("structured outputs are not available for this model's tokenizer: {detail}")]
    Tokenizer { detail: String },
    /// The schema, regex, choice list or grammar does not compile; `detail` is llguidance's
    /// own message.
    #[error("{detail}")]
    Compile { detail: String },
    /// The grammar engine failed while following a sequence (a limit it enforces, or a token
    /// the mask did not allow).
    #[error("structured output failed: {detail}")]
    Match { detail: String },
}

/// Result alias of `structured`.
pub type StructuredResult<T> = std::result::Result<T, StructuredError>;
