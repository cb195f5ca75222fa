//! One step's work in the shape a backend computes it: the tokens of every scheduled sequence laid
//! end to end, with their positions and KV slots, and where each sequence's queries sit. Built by
//! the runner from its per-sequence state; backends only read it.
//!
//! Each sequence also names its row in the backend's persistent per-sequence state (`slot`) and
//! which of its blocks the backend has not seen in that row yet (`new_blocks_from`), so a device
//! backend keeps block tables on the device and updates them in place instead of uploading
//! every table every step.

/// One sequence's part of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// Rows of this sequence's tokens in the flattened batch.
    pub rows: std::ops::Range<usize>,
    /// Position of the first of those tokens (tokens already in the KV cache before it).
    pub start_pos: usize,
    /// The sequence's block table.
    pub block_ids: Vec<u32>,
    /// The sequence's row in the backend's persistent per-sequence state, below the runner's
    /// sequence capacity; one sequence holds one row from its first step until it is freed.
    pub slot: usize,
    /// `block_ids[new_blocks_from..]` are new to the backend in this row (0 on a sequence's
    /// first step, when the row may hold an earlier sequence's table).
    pub new_blocks_from: usize,
    /// The backend's LoRA slot of the sequence's adapter; `None`: the base model.
    pub lora_slot: Option<usize>,
}

impl SeqSlice {
    /// Tokens the sequence's queries can see after this step's keys are written.
    pub fn context_len(&self) -> usize {
        self.start_pos + self.rows.len()
    }
}

/// The flattened batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// Token id of each row.
    pub token_ids: Vec<u32>,
    /// Position of each row within its sequence.
    pub positions: Vec<usize>,
    /// KV cache slot of each row: `block_id * block_size + offset`.
    pub slots: Vec<usize>,
    /// The sequences, in row order.
    pub seqs: Vec<SeqSlice>,
    /// Rows whose logits are wanted (the last row of each sequence that samples), in order.
    pub sample_rows: Vec<usize>,
    /// `(row, sample)`: the row's token is the previous launched step's token of sample row
    /// `sample`, not yet back on the host (its `token_ids` entry is a placeholder 0).
    pub fed: Vec<(usize, usize)>,
}

impl Batch {
    /// Number of token rows.
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }
}
