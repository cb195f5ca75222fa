//! What the scheduler hands the workers each step: a `StepPlan` of diffs. A sequence is sent in
//! full once (`NewSequence`), then only what changed (`RunningSequence`); `freed` names the
//! sequences workers must forget. Plain data; the engine converts it to protobuf.
//!
//! Order workers apply a plan in: first drop every id in `freed`, then add `new` (in order),
//! then advance `running`. The same id may appear in `freed` and `new` of one plan (a sequence
//! preempted and re-admitted in the same step, or an id reused after its sequence ended); the
//! order above makes that well defined.

use std::sync::Arc;

use crate::sampling::{Sampling, SamplingExtras};

/// A sequence the workers have no state for: everything they need to compute it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSequence {
    /// Sequence id, unique among live sequences.
    pub id: u64,
    /// All known tokens: the prompt plus, after a preemption, the tokens generated so far
    /// (real ones: a sequence is never sent while a token of it is still being sampled).
    pub token_ids: Vec<u32>,
    /// Leading tokens of `token_ids` that are the prompt.
    pub num_prompt_tokens: usize,
    /// Sampling parameters, passed through from `SequenceSpec`.
    pub sampling: Sampling,
    /// Penalties, biases and log probabilities, passed through from `SequenceSpec`.
    pub extras: Arc<SamplingExtras>,
    /// The block table: KV block ids covering `num_computed_tokens + num_scheduled_tokens`.
    pub block_ids: Vec<u32>,
    /// Leading tokens whose KV is already in `block_ids` (a prefix-cache hit); a multiple of
    /// the block size, always less than `token_ids.len()`.
    pub num_computed_tokens: usize,
    /// Tokens to compute this step, starting at `num_computed_tokens`.
    pub num_scheduled_tokens: usize,
    /// Its LoRA adapter's id (0: the base model), passed through from `SequenceSpec`.
    pub adapter: u32,
}

/// A sequence the workers already hold: only this step's diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningSequence {
    /// Sequence id.
    pub id: u64,
    /// Tokens to compute this step (1 when decoding, a chunk when prefilling).
    pub num_scheduled_tokens: usize,
    /// Blocks appended to the sequence's block table before this step.
    pub new_block_ids: Vec<u32>,
}

/// One step of work for every worker.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepPlan {
    /// Increases by one per plan; `apply` must name it.
    pub step_id: u64,
    /// Sequences sent in full, computed in this order before `running`.
    pub new: Vec<NewSequence>,
    /// Sequences the workers already hold, in order of admission.
    pub running: Vec<RunningSequence>,
    /// Sequences workers must drop before this step: finished, aborted or preempted since the
    /// last plan (including preemptions made while building this plan).
    pub freed: Vec<u64>,
    /// Ids that produce a token this step (their computed tokens reach all known tokens), in
    /// compute order: `new` first, then `running`.
    pub sampled: Vec<u64>,
}

impl StepPlan {
    /// Tokens computed in this step (at most `max_num_batched_tokens`).
    pub fn num_scheduled_tokens(&self) -> usize {
        self.new
            .iter()
            .map(|s| s.num_scheduled_tokens)
            .sum::<usize>()
            + self
                .running
                .iter()
                .map(|s| s.num_scheduled_tokens)
                .sum::<usize>()
    }

    /// Sequences computed in this step (at most `max_num_seqs`).
    pub fn num_seqs(&self) -> usize {
        self.new.len() + self.running.len()
    }
}
