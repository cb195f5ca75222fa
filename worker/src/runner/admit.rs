//! Applying a plan's diff to the runner's sequences: its adapters, frees and new sequences,
//! checked completely before any state changes (so every rank accepts or refuses it alike).

use std::collections::VecDeque;

use tpserve_proto as pb;

use super::sequence::{Scheduled, SequenceState};
use super::Runner;
use crate::error::{Result, WorkerError};
use crate::pooling::{check_start, PoolKind, PoolState};
use crate::sampler::logprobs::MAX_TOP_LOGPROBS;
use crate::sampler::processors::History;
use crate::sampler::SequenceRng;

impl Runner {
    /// Checks the plan's LoRA adapters: LoRA on, every new sequence's adapter named by this
    /// plan or an earlier one, and at most `max_loras` adapters among the sequences the plan
    /// computes.
    fn check_adapters(&mut self, plan: &pb::StepPlan) -> Result<()> {
        let bad = |detail: String| Err(WorkerError::Plan { detail });
        if !plan.adapters.is_empty() && !self.adapters.enabled() {
            return bad("the plan names LoRA adapters but LoRA is off (max_loras 0)".into());
        }
        for a in &plan.adapters {
            if a.adapter_id == 0 {
                return bad(format!("adapter {:?} has id 0", a.name));
            }
            self.adapters.register(a.adapter_id, &a.path);
        }
        let mut ids: Vec<u32> = Vec::new();
        for new in plan.new_sequences.iter().filter(|n| n.adapter_id != 0) {
            if !self.adapters.knows(new.adapter_id) {
                return bad(format!(
                    "sequence {} names adapter {}, which no plan has sent",
                    new.sequence_id, new.adapter_id
                ));
            }
            if new.num_scheduled_tokens > 0 && !ids.contains(&new.adapter_id) {
                ids.push(new.adapter_id);
            }
        }
        for run in plan.running.iter().filter(|r| r.num_scheduled_tokens > 0) {
            let id = self
                .sequences
                .get(&run.sequence_id)
                .map_or(0, |s| s.adapter);
            if id != 0 && !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.len() > self.adapters.max_loras() && !ids.is_empty() {
            return bad(format!(
                "the step uses {} LoRA adapters, more than max_loras {}",
                ids.len(),
                self.adapters.max_loras()
            ));
        }
        Ok(())
    }

    /// Applies the plan's frees and additions and checks every scheduled sequence, changing no
    /// state when the plan is invalid.
    pub(super) fn admit(&mut self, plan: &pb::StepPlan) -> Result<Vec<Scheduled>> {
        self.check_adapters(plan)?;
        let bad = |detail: String| Err(WorkerError::Plan { detail });
        for new in &plan.new_sequences {
            if self.sequences.contains_key(&new.sequence_id)
                && !plan.freed_sequence_ids.contains(&new.sequence_id)
            {
                return bad(format!("sequence {} is already running", new.sequence_id));
            }
            if new.num_computed_tokens as usize + new.num_scheduled_tokens as usize
                > new.token_ids.len()
            {
                return bad(format!(
                    "sequence {} schedules past its known tokens",
                    new.sequence_id
                ));
            }
        }
        let mut kinds = (false, false); // (a step pools, a step samples)
        for new in &plan.new_sequences {
            if let Some(p) = &new.pooling {
                check_start(
                    new.sequence_id,
                    PoolKind::from_proto(p),
                    new.num_computed_tokens as usize,
                )?;
            }
            if new.num_scheduled_tokens > 0 {
                let pools = new.pooling.is_some();
                kinds = (kinds.0 || pools, kinds.1 || !pools);
            }
        }
        for run in &plan.running {
            let known = self.sequences.contains_key(&run.sequence_id)
                && !plan.freed_sequence_ids.contains(&run.sequence_id);
            if !known {
                return bad(format!(
                    "sequence {} is not running on this worker",
                    run.sequence_id
                ));
            }
            if run.num_scheduled_tokens > 0 {
                let pools = self.sequences[&run.sequence_id].pooling.is_some();
                kinds = (kinds.0 || pools, kinds.1 || !pools);
            }
        }
        if kinds.0 && kinds.1 {
            return bad("the plan mixes embedding and generate sequences in one step".into());
        }
        let mut freed: Vec<u64> = plan.freed_sequence_ids.clone();
        freed.sort_unstable();
        freed.dedup();
        let rows_freed = freed
            .iter()
            .filter(|id| self.sequences.contains_key(id))
            .count();
        if plan.new_sequences.len() > self.slots.free.len() + rows_freed {
            return bad(format!(
                "the plan would hold {} sequences on this worker, more than the {} a step may \
                 carry",
                self.sequences.len() - rows_freed + plan.new_sequences.len(),
                self.slots.capacity
            ));
        }
        for id in &plan.freed_sequence_ids {
            if let Some(state) = self.sequences.remove(id) {
                self.slots.give_back(state.slot);
            }
        }
        let mut scheduled = Vec::with_capacity(plan.new_sequences.len() + plan.running.len());
        for new in &plan.new_sequences {
            let sampling = new.sampling.unwrap_or_default();
            // An older coordinator that does not send it: all known tokens.
            let num_prompt = match new.num_prompt_tokens as usize {
                0 => new.token_ids.len(),
                n => n,
            };
            let logprobs = new.logprobs.unwrap_or_default();
            let top = |k: Option<u32>| k.map(|k| (k as usize).min(MAX_TOP_LOGPROBS));
            self.sequences.insert(
                new.sequence_id,
                SequenceState {
                    tokens: new.token_ids.clone(),
                    num_computed: new.num_computed_tokens as usize,
                    block_ids: new.block_ids.clone(),
                    rng: SequenceRng::new(sampling.seed),
                    sampling,
                    slot: self.slots.take().expect("counted above"),
                    blocks_seen: 0,
                    num_prompt,
                    history: new
                        .controls
                        .clone()
                        .and_then(|c| History::new(c, &new.token_ids, num_prompt)),
                    sample_logprobs: top(logprobs.sample),
                    prompt_logprobs: top(logprobs.prompt),
                    adapter: new.adapter_id,
                    lora_slot: None,
                    pooling: new
                        .pooling
                        .as_ref()
                        .map(|p| PoolState::new(PoolKind::from_proto(p))),
                    generation: self.next_generation,
                    pending: VecDeque::new(),
                },
            );
            self.next_generation += 1;
            scheduled.push(Scheduled {
                id: new.sequence_id,
                count: new.num_scheduled_tokens as usize,
            });
        }
        for run in &plan.running {
            let state = self
                .sequences
                .get_mut(&run.sequence_id)
                .expect("checked above");
            state.block_ids.extend_from_slice(&run.new_block_ids);
            scheduled.push(Scheduled {
                id: run.sequence_id,
                count: run.num_scheduled_tokens as usize,
            });
        }
        Ok(scheduled)
    }
}
