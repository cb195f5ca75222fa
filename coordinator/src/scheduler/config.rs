//! Scheduler configuration: the KV pool's shape, the per-step limits and the waiting-queue
//! policy. Plain data; `validate` holds the cross-field checks the engine runs once at start.
//!
//! Invariants after `validate()`: every size is non-zero and the pool can hold one sequence of
//! `max_model_len` tokens, so any admitted sequence can always run alone (no livelock).

use super::error::SchedulerError;

/// Which waiting sequence starts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulingPolicy {
    /// First come, first served; a preempted sequence goes back to the front.
    #[default]
    Fcfs,
    /// Lower `priority` value first, ties by arrival (vLLM's rule). Under memory pressure the
    /// running sequence with the highest (priority, arrival) is preempted first.
    Priority,
    /// Weighted fair share between tenants (virtual token counters, see `policy`); within a
    /// tenant, first come first served. Under memory pressure the tenant furthest ahead of its
    /// share gives back first.
    Fair,
}

/// The scheduler's knobs. Names follow vLLM's flags (`--block-size`, `--max-num-seqs`,
/// `--max-num-batched-tokens`, `--max-model-len`, `--enable-prefix-caching`,
/// `--scheduling-policy`); `num_blocks` comes from the workers' memory profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool (the minimum over worker ranks).
    pub num_blocks: usize,
    /// Most sequences in one step (and most running at once).
    pub max_num_seqs: usize,
    /// Token budget of one step; long prompts are prefilled in chunks under it.
    pub max_num_batched_tokens: usize,
    /// Most tokens a sequence may hold (prompt plus output).
    pub max_model_len: usize,
    /// Reuse the KV blocks of full, previously computed blocks with the same prefix.
    pub enable_prefix_caching: bool,
    /// Order of the waiting queue and choice of preemption victim.
    pub policy: SchedulingPolicy,
    /// Most distinct LoRA adapters among the running sequences (`--max-loras`); 0: no limit
    /// (LoRA off, every sequence runs on the base model).
    pub max_loras: usize,
}

impl Default for SchedulerConfig {
    /// vLLM-like defaults with a 4096-block pool; the engine overrides `num_blocks` and
    /// `max_model_len` from the workers and the model.
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 4096,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 8192,
            enable_prefix_caching: true,
            policy: SchedulingPolicy::Fcfs,
            max_loras: 0,
        }
    }
}

impl SchedulerConfig {
    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Cross-field checks, run once at start-up. `Scheduler::new` itself only insists on
    /// non-zero sizes; this also refuses a pool too small for one `max_model_len` sequence,
    /// as vLLM does at start ("max seq len is larger than the KV cache can hold").
    pub fn validate(&self) -> Result<(), SchedulerError> {
        self.check_nonzero()?;
        let pool_tokens = self.num_blocks.saturating_mul(self.block_size);
        if pool_tokens < self.max_model_len {
            return Err(SchedulerError::InvalidConfig {
                field: "max_model_len",
                reason: format!(
                    "max-model-len is {} tokens but the KV cache holds only {} ({} blocks of {} tokens)",
                    self.max_model_len, pool_tokens, self.num_blocks, self.block_size
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn check_nonzero(&self) -> Result<(), SchedulerError> {
        let fields = [
            ("block_size", self.block_size),
            ("num_blocks", self.num_blocks),
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
        ];
        for (field, value) in fields {
            if value == 0 {
                return Err(SchedulerError::InvalidConfig {
                    field,
                    reason: format!("{field} must be at least 1"),
                });
            }
        }
        if self.num_blocks > u32::MAX as usize {
            return Err(SchedulerError::InvalidConfig {
                field: "num_blocks",
                reason: format!("{} blocks do not fit 32-bit block ids", self.num_blocks),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        SchedulerConfig::default().validate().unwrap();
    }

    #[test]
    fn pool_smaller_than_max_model_len_is_refused_with_numbers() {
        let config = SchedulerConfig {
            num_blocks: 4,
            block_size: 16,
            max_model_len: 100,
            ..SchedulerConfig::default()
        };
        let err = config.validate().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("100") && text.contains("64"), "{text}");
    }

    #[test]
    fn zero_sizes_are_refused() {
        let config = SchedulerConfig {
            max_num_seqs: 0,
            ..SchedulerConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(SchedulerError::InvalidConfig {
                field: "max_num_seqs",
                ..
            })
        ));
    }
}
