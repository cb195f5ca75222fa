//! The types that cross the boundary between the HTTP API (or the offline runner) and the engine
//! actor: what a caller submits and the events it gets back. No I/O here.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::adapters::AdapterInfo;
use crate::structured::Grammar;

pub use crate::sampling::{Sampling, SamplingExtras};
pub use crate::scheduler::Share;

/// The log probabilities of one position (raw logits: before penalties and temperature).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// The token at this position (sampled, or the prompt's).
    pub token_id: u32,
    pub logprob: f32,
    /// 1 + the number of tokens more likely than it.
    pub rank: u32,
    /// The most likely tokens and their log probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Everything the engine needs to run one sequence. The API layer has validated it already
/// (lengths against max-model-len, sampling ranges); the engine re-checks only what it must.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt, tokenized (chat template already applied).
    pub prompt_token_ids: Vec<u32>,
    /// Most tokens to generate; the prompt plus this never exceeds max-model-len.
    pub max_tokens: u32,
    /// Sampling parameters.
    pub sampling: Sampling,
    /// Stop strings: generation ends when the text contains one; it is not included in the output.
    pub stop: Vec<String>,
    /// Token ids that end generation besides the model's end-of-sequence tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// Leave special tokens out of the text.
    pub skip_special_tokens: bool,
    /// Scheduling priority under `--scheduling-policy priority`; lower runs first (vLLM's rule).
    pub priority: i32,
    /// The tenant it runs for (fair scheduling) and its weight; default: no tenant.
    pub share: Share,
    /// Mixed into its prefix-cache hashes, so tenants never share cached blocks (the tenant's
    /// id under the gateway; 0 without one).
    pub cache_salt: u64,
    /// Penalties, biases and log probabilities.
    pub extras: Arc<SamplingExtras>,
    /// The LoRA adapter it runs with; `None`: the base model.
    pub adapter: Option<Arc<AdapterInfo>>,
    /// Structured outputs: the compiled grammar its output must follow; `None`: free text.
    pub grammar: Option<Arc<Grammar>>,
}

impl GenerateRequest {
    /// A greedy request that generates exactly `max_tokens` tokens (end-of-sequence ignored):
    /// the fixed workload of the benchmarks.
    pub fn fixed_length_greedy(prompt_token_ids: Vec<u32>, max_tokens: u32) -> Self {
        Self {
            prompt_token_ids,
            max_tokens,
            sampling: Sampling {
                temperature: 0.0,
                ..Sampling::default()
            },
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            skip_special_tokens: true,
            priority: 0,
            share: Share::default(),
            cache_salt: 0,
            extras: Arc::default(),
            adapter: None,
            grammar: None,
        }
    }
}

/// Why a sequence ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Aborted by the engine (shutdown) rather than by the client.
    Abort,
}

/// What a caller receives for one sequence, in order: zero or more `Delta`s, then exactly one
/// `Finished` or one `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// New output: the text that became final since the last delta (may be empty while a
    /// multi-byte character or a possible stop string is held back) and the new token ids.
    Delta {
        text: String,
        token_ids: Vec<u32>,
        /// The token's log probabilities, when the request asked for them.
        logprobs: Option<TokenLogprobs>,
        /// On the first delta of a request that asked for prompt log probabilities: one entry
        /// per prompt token (`None` for the first, which has no context).
        prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    },
    /// The sequence ended normally.
    Finished {
        reason: FinishReason,
        /// Tokens in the prompt.
        prompt_tokens: u32,
        /// Tokens generated (including a stop token that ended it).
        completion_tokens: u32,
        /// Prompt tokens whose KV came from the prefix cache when it first started.
        cached_tokens: u32,
        /// An embedding request's pooled vector (`hidden_size` values, not normalized);
        /// `None` for a generate request.
        embedding: Option<Vec<f32>>,
    },
    /// The sequence failed (a worker failed, the engine is shutting down).
    Error(crate::error::EngineError),
}
