//! The scheduler's invariant checker: every structure against the others (the block pool, the
//! block tables, the queues, the outstanding plans, the prefix cache). The property tests run
//! it after their operations, the unit tests where they check a state.

use super::sequence::{SeqStatus, Sequence};
use super::{Scheduler, MAX_OUTSTANDING};

impl Scheduler {
    /// Checks every cross-structure invariant: pool consistency, refcount = number of live
    /// tables holding the block, each live sequence in exactly one queue, table sizes, the
    /// outstanding plans against the placeholders, and prefix-cache registration of computed
    /// real tokens only. For tests and debugging; O(blocks + table entries + plan entries).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.pool.check_invariants()?;
        let mut holders = vec![0u32; self.pool.num_blocks()];
        for seq in self.seqs.values() {
            for &b in &seq.block_table {
                holders[b as usize] += 1;
            }
            let needed = self.config.blocks_for(seq.num_computed);
            match seq.status {
                SeqStatus::Waiting
                    if !seq.block_table.is_empty()
                        || seq.num_computed != 0
                        || seq.known_to_workers =>
                {
                    return Err(format!("waiting sequence {} holds blocks", seq.id));
                }
                SeqStatus::Running if seq.block_table.len() < needed => {
                    return Err(format!("sequence {} table too short", seq.id));
                }
                _ => {}
            }
            if seq.num_computed > seq.num_tokens() {
                return Err(format!("sequence {} computes unknown tokens", seq.id));
            }
            if seq.num_registered_blocks * self.config.block_size > seq.token_ids.len() {
                return Err(format!("sequence {} registered a placeholder", seq.id));
            }
            if seq.pending_samples.len() > self.outstanding.len()
                || (seq.guided && seq.pending_samples.len() > 1)
                || !seq.pending_samples.iter().is_sorted_by(|a, b| a < b)
            {
                return Err(format!(
                    "sequence {} has placeholders {:?}",
                    seq.id, seq.pending_samples
                ));
            }
        }
        for (b, &n) in holders.iter().enumerate() {
            if self.pool.refcount(b as u32) != n {
                return Err(format!(
                    "block {b}: refcount {} but {n} tables hold it",
                    self.pool.refcount(b as u32)
                ));
            }
        }
        self.check_outstanding()?;
        let mut listed: Vec<u64> = self.running.clone();
        if listed
            .iter()
            .any(|id| self.seqs.get(id).map(|s| s.status) != Some(SeqStatus::Running))
        {
            return Err("running list names a non-running sequence".into());
        }
        let waiting = self.waiting.ids();
        if waiting
            .iter()
            .any(|id| self.seqs.get(id).map(|s| s.status) != Some(SeqStatus::Waiting))
        {
            return Err("waiting queue names a non-waiting sequence".into());
        }
        listed.extend(waiting);
        listed.sort_unstable();
        listed.dedup();
        if listed.len() != self.seqs.len()
            || self.running.len() + self.waiting.len() != listed.len()
        {
            return Err("a live sequence is lost or listed twice".into());
        }
        if self.running.len() > self.config.max_num_seqs {
            return Err("more running sequences than max_num_seqs".into());
        }
        let adapters = self.running_adapters().len();
        if self.config.max_loras > 0 && adapters > self.config.max_loras {
            return Err(format!(
                "{adapters} adapters running, more than max_loras {}",
                self.config.max_loras
            ));
        }
        Ok(())
    }

    /// The outstanding plans against the sequences: consecutive step ids; each live sequence a
    /// plan samples holds that plan's placeholder and is counted in `sampled_alive`; a running
    /// sequence's plan entries end at its `num_computed`, and its registered blocks lie before
    /// the first position an outstanding plan writes (computed by applied steps).
    fn check_outstanding(&self) -> Result<(), String> {
        if self.outstanding.len() > MAX_OUTSTANDING {
            return Err(format!("{} plans outstanding", self.outstanding.len()));
        }
        for (k, out) in self.outstanding.iter().enumerate() {
            let want = self.next_step_id - (self.outstanding.len() - k) as u64;
            if out.step_id != want {
                return Err(format!("outstanding step {} should be {want}", out.step_id));
            }
            let in_plan = |seq: &Sequence| seq.arrival < out.arrival_watermark;
            let sampled = self
                .seqs
                .values()
                .filter(|seq| in_plan(seq) && seq.pending_samples.contains(&out.step_id))
                .count();
            if sampled != out.sampled_alive {
                return Err(format!(
                    "step {}: {sampled} live placeholders but sampled_alive {}",
                    out.step_id, out.sampled_alive
                ));
            }
            for s in &out.scheduled {
                let Some(seq) = self.seqs.get(&s.id).filter(|seq| in_plan(seq)) else {
                    continue;
                };
                if seq.status != SeqStatus::Running || s.end > seq.num_computed {
                    return Err(format!(
                        "step {}: sequence {} ({:?}, {} computed) scheduled up to {}",
                        out.step_id, s.id, seq.status, seq.num_computed, s.end
                    ));
                }
                if seq.num_registered_blocks * self.config.block_size > s.start {
                    return Err(format!(
                        "step {}: sequence {} registered blocks that step writes",
                        out.step_id, s.id
                    ));
                }
            }
        }
        if let Some(last) = self.outstanding.back() {
            for s in &last.scheduled {
                match self.seqs.get(&s.id) {
                    Some(seq)
                        if seq.arrival < last.arrival_watermark && seq.num_computed != s.end =>
                    {
                        return Err(format!(
                            "sequence {} computed {}, the newest plan ends at {}",
                            s.id, seq.num_computed, s.end
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}
