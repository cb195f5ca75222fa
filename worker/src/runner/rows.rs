//! A step's rows: the scheduled sequences laid end to end as the backend's batch, and the
//! extras (logit edits, log probabilities) of a sample row.

use std::collections::HashMap;

use super::sequence::{RowRole, Scheduled, SequenceState};
use crate::batch::{Batch, SeqSlice};
use crate::error::{Result, WorkerError};
use crate::sampler::RowExtras;

/// The extras of one sample row of `state`'s sequence.
pub(super) fn row_extras(state: &SequenceState, role: &RowRole) -> RowExtras {
    match role.prompt_position {
        Some(p) => RowExtras {
            edits: Vec::new(),
            logprobs: state.prompt_logprobs,
            target: Some(state.tokens[p]),
            allowed: None,
        },
        None => RowExtras {
            edits: state.history.as_ref().map_or_else(Vec::new, |h| {
                h.edits(&state.tokens[state.num_prompt.min(state.tokens.len())..])
            }),
            logprobs: state.sample_logprobs,
            target: None,
            allowed: None,
        },
    }
}

/// Lays the scheduled sequences end to end. Fails on a sequence that schedules past its tokens or
/// its blocks.
pub(super) fn build_batch(
    sequences: &HashMap<u64, SequenceState>,
    scheduled: &[Scheduled],
    block_size: usize,
    num_blocks: usize,
) -> Result<(Batch, Vec<RowRole>)> {
    let mut batch = Batch::default();
    let mut roles = Vec::new();
    for s in scheduled {
        if s.count == 0 {
            continue;
        }
        let state = &sequences[&s.id];
        let start = state.num_computed;
        let end = start + s.count;
        if end > state.known() {
            return Err(WorkerError::Plan {
                detail: format!(
                    "sequence {} schedules {} tokens but knows only {}",
                    s.id,
                    end,
                    state.known()
                ),
            });
        }
        if end > state.block_ids.len() * block_size {
            return Err(WorkerError::Plan {
                detail: format!(
                    "sequence {} needs {} tokens of KV but has {} blocks",
                    s.id,
                    end,
                    state.block_ids.len()
                ),
            });
        }
        if let Some(b) = state.block_ids.iter().find(|b| **b as usize >= num_blocks) {
            return Err(WorkerError::Plan {
                detail: format!("block {b} is outside the cache of {num_blocks}"),
            });
        }
        let first = batch.token_ids.len();
        for p in start..end {
            match state.tokens.get(p) {
                Some(token) => batch.token_ids.push(*token),
                None => {
                    // Sampled by the step in flight: the backend feeds it (or the runner
                    // answers that step and builds the batch again).
                    let sample = state.pending[p - state.tokens.len()];
                    batch.fed.push((batch.token_ids.len(), sample));
                    batch.token_ids.push(0);
                }
            }
            batch.positions.push(p);
            batch
                .slots
                .push(state.block_ids[p / block_size] as usize * block_size + p % block_size);
        }
        batch.seqs.push(SeqSlice {
            rows: first..first + s.count,
            start_pos: start,
            block_ids: state.block_ids.clone(),
            slot: state.slot,
            new_blocks_from: state.blocks_seen,
            lora_slot: state.lora_slot,
        });
        if state.prompt_logprobs.is_some() {
            // Rows whose next token is a prompt token score it (before the sample row).
            for p in start..end.min(state.num_prompt.saturating_sub(1)) {
                batch.sample_rows.push(first + p - start);
                roles.push(RowRole {
                    id: s.id,
                    prompt_position: Some(p + 1),
                });
            }
        }
        // Embedding sequences pool instead of sampling (`Runner::pool_step`).
        if end == state.known() && state.pooling.is_none() {
            batch.sample_rows.push(first + s.count - 1);
            roles.push(RowRole {
                id: s.id,
                prompt_position: None,
            });
        }
    }
    Ok((batch, roles))
}
