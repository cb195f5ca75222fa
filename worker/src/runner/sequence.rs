//! What the runner keeps about each sequence between steps, the rows of the backend's
//! persistent per-sequence state they hold, and the roles of a step's sample rows.

use std::collections::VecDeque;

use tpserve_proto as pb;

use crate::pooling::PoolState;
use crate::sampler::processors::History;
use crate::sampler::SequenceRng;

/// What the worker keeps about one sequence between steps.
#[derive(Debug)]
pub(super) struct SequenceState {
    /// Every known token: prompt, then sampled ones.
    pub(super) tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    pub(super) num_computed: usize,
    pub(super) block_ids: Vec<u32>,
    pub(super) sampling: pb::SamplingParams,
    pub(super) rng: SequenceRng,
    /// The sequence's row of the backend's persistent state.
    pub(super) slot: usize,
    /// Leading blocks of `block_ids` the backend has in that row.
    pub(super) blocks_seen: usize,
    /// Leading tokens of `tokens` that are the prompt.
    pub(super) num_prompt: usize,
    /// Logit processors and the token history they need; `None` for plain sequences.
    pub(super) history: Option<History>,
    /// Top tokens wanted with each sampled token's log probability.
    pub(super) sample_logprobs: Option<usize>,
    /// Top tokens wanted with each prompt token's log probability.
    pub(super) prompt_logprobs: Option<usize>,
    /// Its LoRA adapter's id; 0: the base model.
    pub(super) adapter: u32,
    /// The slot the adapter has in the current step.
    pub(super) lora_slot: Option<usize>,
    /// Set for an embedding sequence: it pools instead of sampling.
    pub(super) pooling: Option<PoolState>,
    /// Tells this sequence from an earlier one of the same id.
    pub(super) generation: u64,
    /// Its tokens sampled by launched steps and not back yet (their sample rows, oldest
    /// first); they follow `tokens`.
    pub(super) pending: VecDeque<usize>,
}

impl SequenceState {
    /// Tokens known or being sampled.
    pub(super) fn known(&self) -> usize {
        self.tokens.len() + self.pending.len()
    }

    /// True when a step that samples or scores this sequence needs [`RowExtras`].
    pub(super) fn needs_extras(&self) -> bool {
        self.history.is_some() || self.sample_logprobs.is_some() || self.prompt_logprobs.is_some()
    }
}

/// What a sample row of a step is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RowRole {
    pub(super) id: u64,
    /// `Some(p)`: the row scores prompt token `p` (it is the row of position `p - 1`) and its
    /// sampled token is dropped; `None`: the row samples the sequence's next token.
    pub(super) prompt_position: Option<usize>,
}

/// Rows of the backend's persistent per-sequence state not held by a sequence, lowest first.
#[derive(Debug)]
pub(super) struct SlotPool {
    pub(super) capacity: usize,
    /// Free rows, highest first (popped from the end).
    pub(super) free: Vec<usize>,
}

impl SlotPool {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            free: (0..capacity).rev().collect(),
        }
    }

    pub(super) fn take(&mut self) -> Option<usize> {
        self.free.pop()
    }

    pub(super) fn give_back(&mut self, slot: usize) {
        self.free.push(slot);
        // Keep handing out the lowest rows first (a few dozen entries at most per step).
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }
}

/// A validated slice of a plan: which sequence, and how many tokens.
pub(super) struct Scheduled {
    pub(super) id: u64,
    pub(super) count: usize,
}
