//! How a sequence's next token is chosen: the sampling parameters and the logit processing and
//! log probabilities beyond them, as the API validated them. A leaf of the crate: the
//! scheduler's plans and sequences carry these, and the engine and the API build them, so they
//! live below all three.

use serde::{Deserialize, Serialize};

use crate::task::PoolingType;

/// How the next token is picked. Greedy when `temperature` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling; 1.0 keeps everything.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 or negative keeps all.
    pub top_k: i32,
    /// Drop tokens below `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Seed of the request's random stream; `None` picks one at random.
    pub seed: Option<u64>,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
        }
    }
}

/// Logit processing and log probabilities beyond [`Sampling`], with vLLM's semantics (the
/// worker applies them: `sampler::processors` and `sampler::logprobs` there). Shared by the
/// sequences of a request; `SamplingExtras::default()` asks for nothing and costs nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingExtras {
    /// Subtracted once from the logit of every token generated so far.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// vLLM's: logits of prompt and output tokens are divided by it when positive, multiplied
    /// when negative; 1 is off.
    pub repetition_penalty: f32,
    /// `(token, bias)`: added to the token's logit.
    pub logit_bias: Vec<(u32, f32)>,
    /// End-of-sequence and stop tokens are banned until this many tokens are generated.
    pub min_tokens: u32,
    /// The tokens `min_tokens` bans: filled by the engine from its end-of-sequence tokens
    /// (unless `ignore_eos`) and the request's `stop_token_ids`.
    pub min_tokens_stop_ids: Vec<u32>,
    /// Token sequences never generated (each bad word, tokenized with and without a leading
    /// space).
    pub bad_words: Vec<Vec<u32>>,
    /// Log probability of each sampled token with this many top tokens (0-20); `None`: none.
    pub logprobs: Option<u32>,
    /// The same for every prompt token after the first; `None`: none.
    pub prompt_logprobs: Option<u32>,
    /// Set for an embedding request (`--task embed`): nothing is sampled; the sequence ends
    /// when its prompt is computed, with its pooled vector in `GenerateEvent::Finished`.
    pub pooling: Option<PoolingType>,
}

impl Default for SamplingExtras {
    fn default() -> Self {
        Self {
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            min_tokens: 0,
            min_tokens_stop_ids: Vec::new(),
            bad_words: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            pooling: None,
        }
    }
}
