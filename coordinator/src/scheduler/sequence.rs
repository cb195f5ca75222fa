//! Per-sequence state the scheduler keeps: the request as added (`SequenceSpec`) and what it
//! has become (tokens known and computed, block table, prefix-hash chain, step bookkeeping).
//!
//! Invariants: `num_computed <= token_ids.len()`; a waiting sequence has an empty block table
//! and `num_computed == 0`; a running one's table covers `num_computed` tokens (and this step's
//! scheduled tokens while a plan is outstanding); `block_hashes[j]` is the chain hash of full
//! block `j` of `token_ids` and never changes (tokens are only appended), so it survives
//! preemption. Memory: the tokens, one `u32` per block and one `u64` per full block.

use super::hash::{block_hash, ROOT_HASH};
use crate::engine::Sampling;

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
    /// Under `SchedulingPolicy::Priority`, lower runs first.
    pub priority: i32,
    /// Mixed into every prefix hash (tenant salt or adapter id): sequences with different salts
    /// never share cached blocks. 0 by default.
    pub cache_salt: u64,
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
    /// Prompt followed by generated tokens.
    pub token_ids: Vec<u32>,
    pub prompt_len: usize,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub priority: i32,
    pub cache_salt: u64,
    /// Order of `add` calls; the tie-break of the priority policy.
    pub arrival: u64,
    pub status: SeqStatus,
    /// Tokens whose KV is in the blocks (advances at `apply`, or at admission by a cache hit).
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// Chain hashes of the leading full blocks of `token_ids`, filled lazily.
    pub block_hashes: Vec<u64>,
    /// Leading blocks of `block_table` already registered in (or hit from) the prefix cache.
    pub num_registered_blocks: usize,
    /// Workers hold state for it (sent as new, not freed since).
    pub known_to_workers: bool,
    /// Tokens scheduled in the outstanding plan (0 when not in it).
    pub in_flight: usize,
    /// The outstanding plan samples it.
    pub in_flight_sampled: bool,
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
            priority: spec.priority,
            cache_salt: spec.cache_salt,
            arrival,
            status: SeqStatus::Waiting,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            num_registered_blocks: 0,
            known_to_workers: false,
            in_flight: 0,
            in_flight_sampled: false,
            sample_received: false,
        }
    }

    /// Known tokens: prompt plus output.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    pub fn output(&self) -> &[u32] {
        &self.token_ids[self.prompt_len..]
    }

    /// Known tokens whose KV is not computed yet.
    pub fn num_uncomputed(&self) -> usize {
        self.num_tokens() - self.num_computed
    }

    /// The sequence has produced all it may (`max_tokens`, or a context of `max_model_len`
    /// after at least one output token, as vLLM's length check); computing on would sample past
    /// the limit. The engine is expected to `finish` it; until then it is left idle.
    pub fn is_at_limit(&self, max_model_len: usize) -> bool {
        let output = self.num_tokens() - self.prompt_len;
        output >= self.max_tokens || (output > 0 && self.num_tokens() >= max_model_len)
    }

    /// Fills `block_hashes` for the first `num_blocks` full blocks of the known tokens.
    pub fn ensure_block_hashes(&mut self, num_blocks: usize, block_size: usize) {
        debug_assert!(num_blocks * block_size <= self.num_tokens());
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
