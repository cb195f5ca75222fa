//! Per-sequence state the scheduler keeps: the request as added (`SequenceSpec`) and what it
//! has become (tokens known, placeholders for tokens being sampled, tokens scheduled, block
//! table, prefix-hash chain).
//!
//! A placeholder stands for the token an outstanding plan samples: its value is unknown until
//! `apply`, but the sequence counts it, so the next plan can already compute it (the workers
//! append each token they sample to their own copy of the sequence).
//!
//! Invariants: `num_computed <= num_tokens()` (real tokens plus placeholders); a waiting
//! sequence has an empty block table and `num_computed == 0`; a running one's table covers
//! `num_computed` tokens; `pending_samples` names outstanding plans, oldest first, at most two;
//! `block_hashes[j]` is the chain hash of full block `j` of the real `token_ids` and never
//! changes (tokens are only appended), so it survives preemption. Memory: the tokens, one `u32`
//! per block, one `u64` per full block and two `u64` slots for pending samples.

use std::collections::VecDeque;

use std::sync::Arc;

use super::hash::{block_hash, ROOT_HASH};
use super::policy::WaitKey;
use crate::sampling::{Sampling, SamplingExtras};

/// A tenant's share of the engine under `SchedulingPolicy::Fair`: which tenant a sequence
/// belongs to and the tenant's weight. Tenant 0 is everyone without a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Share {
    pub tenant: u64,
    /// At least 1; a tenant of weight 3 gets three times the tokens of one of weight 1.
    pub weight: u32,
}

impl Default for Share {
    fn default() -> Self {
        Self {
            tenant: 0,
            weight: 1,
        }
    }
}

/// A request as `Scheduler::add` takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceSpec {
    /// Unique among live sequences (the engine assigns it).
    pub id: u64,
    /// The prompt's token ids (at least one).
    pub token_ids: Vec<u32>,
    /// Most tokens to generate (at least one). The scheduler never schedules a step that would
    /// sample beyond it; the engine calls `finish` when it is reached.
    pub max_tokens: usize,
    /// Opaque here; passed through into `NewSequence`.
    pub sampling: Sampling,
    /// Passed through into `NewSequence`; prompt log probabilities, and mean or CLS pooling of
    /// an embedding request, also keep the sequence out of the prefix cache's hits (every prompt
    /// position must be computed to be scored or pooled).
    pub extras: Arc<SamplingExtras>,
    /// Under `SchedulingPolicy::Priority`, lower runs first.
    pub priority: i32,
    /// Mixed into every prefix hash (tenant salt or adapter id): sequences with different salts
    /// never share cached blocks. 0 by default.
    pub cache_salt: u64,
    /// Its tenant and weight (used by the fair policy only).
    pub share: Share,
    /// Its LoRA adapter's id; 0: the base model. At most `max_loras` distinct adapters run at
    /// once.
    pub adapter: u32,
    /// Its next token's allowed set depends on its last one (structured outputs): it is never
    /// planned while a token of it is in flight, so it holds at most one placeholder.
    pub guided: bool,
}

/// Where a live sequence is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqStatus {
    /// In the waiting queue; holds no blocks.
    Waiting,
    /// Admitted; holds blocks; in the running list.
    Running,
}

#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub id: u64,
    /// Prompt followed by generated tokens (real ones: placeholders are not in it).
    pub token_ids: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub extras: Arc<SamplingExtras>,
    pub priority: i32,
    pub cache_salt: u64,
    pub share: Share,
    pub adapter: u32,
    /// See `SequenceSpec::guided`.
    pub guided: bool,
    /// Order of `add` calls; the tie-break of the priority policy.
    pub arrival: u64,
    pub status: SeqStatus,
    /// Tokens whose KV is in the blocks or written by an outstanding plan (advances at
    /// `schedule`, and at admission by a prefix-cache hit).
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// Chain hashes of the leading full blocks of `token_ids`, filled lazily.
    pub block_hashes: Vec<u64>,
    /// Leading blocks of `block_table` already registered in (or hit from) the prefix cache.
    pub num_registered_blocks: usize,
    /// Workers hold state for it (sent as new, not freed since).
    pub known_to_workers: bool,
    /// Step ids of the outstanding plans that sample it, oldest first: one placeholder token
    /// each. Kept across preemption (the workers still sample the token; `apply` accepts it).
    pub pending_samples: VecDeque<u64>,
    /// Scratch flag of `apply`'s validation pass.
    pub sample_received: bool,
}

impl Sequence {
    pub fn new(spec: SequenceSpec, arrival: u64) -> Self {
        Self {
            id: spec.id,
            prompt_len: spec.token_ids.len(),
            token_ids: spec.token_ids,
            max_tokens: spec.max_tokens,
            sampling: spec.sampling,
            extras: spec.extras,
            priority: spec.priority,
            cache_salt: spec.cache_salt,
            share: spec.share,
            adapter: spec.adapter,
            guided: spec.guided,
            arrival,
            status: SeqStatus::Waiting,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered_blocks: 0,
            known_to_workers: false,
            pending_samples: VecDeque::with_capacity(2),
            sample_received: false,
        }
    }

    /// Its place in the waiting queue.
    pub(crate) fn wait_key(&self) -> WaitKey {
        WaitKey {
            priority: self.priority,
            arrival: self.arrival,
            id: self.id,
            share: self.share.into(),
        }
    }

    /// Tokens as far as scheduling knows: prompt plus output plus placeholders.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len() + self.pending_samples.len()
    }

    /// The real generated tokens.
    pub fn output(&self) -> &[u32] {
        &self.token_ids[self.prompt_len..]
    }

    /// Tokens (placeholders included) whose KV is not computed or scheduled yet.
    pub fn num_uncomputed(&self) -> usize {
        self.num_tokens() - self.num_computed
    }

    /// The sequence has produced, or is producing in an outstanding plan, all it may
    /// (`max_tokens`, or a context of `max_model_len` after at least one output token, as
    /// vLLM's length check); placeholders count, so computing on would sample past the limit.
    /// The engine is expected to `finish` it; until then it is left idle.
    pub fn is_at_limit(&self, max_model_len: usize) -> bool {
        let output = self.num_tokens() - self.prompt_len;
        output >= self.max_tokens || (output > 0 && self.num_tokens() >= max_model_len)
    }

    /// Fills `block_hashes` for the first `num_blocks` full blocks of the real tokens (never a
    /// block that holds a placeholder).
    pub fn ensure_block_hashes(&mut self, num_blocks: usize, block_size: usize) {
        debug_assert!(num_blocks * block_size <= self.token_ids.len());
        while self.block_hashes.len() < num_blocks {
            let j = self.block_hashes.len();
            let parent = if j == 0 {
                ROOT_HASH
            } else {
                self.block_hashes[j - 1]
            };
            let tokens = &self.token_ids[j * block_size..(j + 1) * block_size];
            self.block_hashes
                .push(block_hash(parent, tokens, self.cache_salt));
        }
    }
}
