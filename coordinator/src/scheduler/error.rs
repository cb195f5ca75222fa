//! The scheduler's typed errors: a request refused at `add` (with the numbers a 400 answer
//! needs), a misused step protocol at `apply`, or a bad configuration. No I/O, no allocation
//! on the success path.

use thiserror::Error;

/// Why the scheduler refused a request, a step result or a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchedulerError {
    /// The prompt is longer than the model's context.
    #[error("prompt has {prompt_tokens} tokens, max-model-len is {max_model_len}")]
    PromptTooLong {
        prompt_tokens: usize,
        max_model_len: usize,
    },
    /// The prompt has no tokens: there would be nothing to compute.
    #[error("sequence {id} has an empty prompt")]
    EmptyPrompt { id: u64 },
    /// `max_tokens` is zero: the sequence could never produce its first token.
    #[error("sequence {id} asks for max_tokens 0; at least 1 is needed")]
    ZeroMaxTokens { id: u64 },
    /// Even alone in the pool, the sequence could not hold all the tokens it may reach
    /// (prompt plus `max_tokens`, at most max-model-len).
    #[error(
        "sequence needs up to {tokens} tokens of KV cache ({blocks_needed} blocks of \
         {block_size}), the pool has {num_blocks} blocks"
    )]
    ExceedsKvCache {
        tokens: usize,
        blocks_needed: usize,
        block_size: usize,
        num_blocks: usize,
    },
    /// A live sequence already has this id.
    #[error("sequence {id} already exists")]
    DuplicateId { id: u64 },
    /// `apply` was called with no plan outstanding.
    #[error("apply for step {got} but no plan is outstanding")]
    NoPlanOutstanding { got: u64 },
    /// `apply` was called for another step than the oldest outstanding one.
    #[error("apply for step {got} but the oldest outstanding plan is step {expected}")]
    StepMismatch { expected: u64, got: u64 },
    /// A sampled token for a sequence the plan did not sample (or a second one for it).
    #[error("step {step_id}: unexpected sampled token for sequence {id}")]
    UnexpectedSample { step_id: u64, id: u64 },
    /// Fewer sampled tokens than the plan's live sampled sequences.
    #[error("step {step_id}: expected {expected} sampled tokens, got {got}")]
    MissingSamples {
        step_id: u64,
        expected: usize,
        got: usize,
    },
    /// A configuration field is out of range or inconsistent with another.
    #[error("invalid scheduler config ({field}): {reason}")]
    InvalidConfig { field: &'static str, reason: String },
}

/// Result alias of the scheduler.
pub type SchedulerResult<T> = std::result::Result<T, SchedulerError>;
