//! How a Llama model splits over `world_size` tensor-parallel ranks (Megatron style): query heads,
//! the MLP's intermediate dimension and the vocabulary are divided; KV heads are divided when
//! there are at least as many as ranks, and replicated (each rank keeps the one its query heads
//! use) when there are fewer. Every rank computes the same plan from the config.

use std::ops::Range;

use tpserve_modelfile::LlamaConfig;

use crate::error::{Result, WorkerError};

/// This rank's share of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// Query heads of this rank (global indices).
    pub q_heads: Range<usize>,
    /// KV heads this rank stores (global indices).
    pub kv_heads: Range<usize>,
    /// Rows of the MLP's intermediate dimension of this rank.
    pub intermediate: Range<usize>,
    /// Vocabulary rows of this rank (embedding and lm_head); the last rank's may be shorter.
    pub vocab: Range<usize>,
    /// Query heads that share one KV head (the GQA group size).
    pub group_size: usize,
}

impl ShardPlan {
    /// Plans rank `rank` of `world_size`, or explains why the model does not split that way.
    pub fn new(config: &LlamaConfig, rank: usize, world_size: usize) -> Result<Self> {
        let heads = config.num_attention_heads;
        let kv = config.num_key_value_heads;
        let refuse = |detail: String| Err(WorkerError::Sharding { detail });
        if world_size == 0 || rank >= world_size {
            return refuse(format!("rank {rank} is outside a group of {world_size}"));
        }
        if kv == 0 || !heads.is_multiple_of(kv) {
            return refuse(format!(
                "{heads} attention heads do not group over {kv} KV heads"
            ));
        }
        if !heads.is_multiple_of(world_size) {
            return refuse(format!(
                "the model has {heads} attention heads, which tensor-parallel size {world_size} does not divide"
            ));
        }
        if !kv.is_multiple_of(world_size) && !world_size.is_multiple_of(kv) {
            return refuse(format!(
                "the model has {kv} KV heads: tensor-parallel size {world_size} must divide it or be a multiple of it"
            ));
        }
        if !config.intermediate_size.is_multiple_of(world_size) {
            return refuse(format!(
                "the MLP's intermediate size {} is not divisible by tensor-parallel size {world_size}",
                config.intermediate_size
            ));
        }
        let heads_per_rank = heads / world_size;
        let group_size = heads / kv;
        let q_heads = rank * heads_per_rank..(rank + 1) * heads_per_rank;
        let kv_heads = if kv >= world_size {
            let per = kv / world_size;
            rank * per..(rank + 1) * per
        } else {
            let first = q_heads.start / group_size;
            first..first + 1
        };
        let inter = config.intermediate_size / world_size;
        let per_vocab = config.vocab_size.div_ceil(world_size);
        let vocab_start = (rank * per_vocab).min(config.vocab_size);
        let vocab = vocab_start..((rank + 1) * per_vocab).min(config.vocab_size);
        Ok(Self {
            rank,
            world_size,
            q_heads,
            kv_heads,
            intermediate: rank * inter..(rank + 1) * inter,
            vocab,
            group_size,
        })
    }

    /// The local KV head that local query head `local_q` attends with.
    pub fn kv_head_of(&self, local_q: usize) -> usize {
        (self.q_heads.start + local_q) / self.group_size - self.kv_heads.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(heads: usize, kv: usize) -> LlamaConfig {
        LlamaConfig {
            architecture: "LlamaForCausalLM".into(),
            hidden_size: 64 * heads,
            intermediate_size: 1536,
            num_hidden_layers: 1,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: 64,
            vocab_size: 49152,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            attention_bias: false,
            bos_token_id: None,
            eos_token_ids: vec![2],
        }
    }

    #[test]
    fn smollm2_splits_over_three_ranks_but_not_two() {
        let c = config(9, 3);
        let p = ShardPlan::new(&c, 2, 3).unwrap();
        assert_eq!(p.q_heads, 6..9);
        assert_eq!(p.kv_heads, 2..3);
        assert_eq!(p.intermediate, 1024..1536);
        assert_eq!(p.vocab, 32768..49152);
        let err = ShardPlan::new(&c, 0, 2).unwrap_err().to_string();
        assert!(err.contains("9 attention heads"), "{err}");
    }

    #[test]
    fn kv_heads_are_replicated_when_ranks_outnumber_them() {
        let c = config(8, 2);
        let plans: Vec<_> = (0..4).map(|r| ShardPlan::new(&c, r, 4).unwrap()).collect();
        let kv: Vec<_> = plans.iter().map(|p| p.kv_heads.clone()).collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
        assert_eq!(plans[3].kv_head_of(1), 0);
        assert!(ShardPlan::new(&config(12, 4), 0, 2).is_ok());
        assert!(ShardPlan::new(&config(12, 4), 0, 3).is_err());
    }
}
