//! The engine's messages as the worker protocol carries them: a step plan and its sequences'
//! sampling, extras and pooling going out, a token's log probabilities coming back. (The actor
//! itself builds a plan's structured-output masks and takes prompt log probabilities as they
//! come.)

use std::collections::HashMap;

use tpserve_proto as pb;

use super::types::{Sampling, SamplingExtras, TokenLogprobs};
use crate::adapters::AdapterInfo;
use crate::scheduler::StepPlan;
use crate::task::PoolingType;

/// A sequence's sampling parameters.
pub(super) fn sampling_to_proto(s: &Sampling) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        min_p: s.min_p,
        seed: s.seed,
    }
}

/// The worker's view of a request's extras; `None` for each part it does not use, so plain
/// requests add nothing to the plan.
fn extras_to_proto(
    e: &SamplingExtras,
) -> (Option<pb::LogitsControls>, Option<pb::LogprobsRequest>) {
    let controls = pb::LogitsControls {
        presence_penalty: e.presence_penalty,
        frequency_penalty: e.frequency_penalty,
        repetition_penalty: e.repetition_penalty,
        logit_bias: e
            .logit_bias
            .iter()
            .map(|&(token_id, bias)| pb::TokenBias { token_id, bias })
            .collect(),
        min_tokens: e.min_tokens,
        min_tokens_stop_ids: e.min_tokens_stop_ids.clone(),
        bad_words: e
            .bad_words
            .iter()
            .map(|w| pb::TokenSequence {
                token_ids: w.clone(),
            })
            .collect(),
    };
    let plain = SamplingExtras {
        logprobs: e.logprobs,
        prompt_logprobs: e.prompt_logprobs,
        pooling: e.pooling,
        ..SamplingExtras::default()
    };
    let controls = (*e != plain).then_some(controls);
    let logprobs =
        (e.logprobs.is_some() || e.prompt_logprobs.is_some()).then_some(pb::LogprobsRequest {
            sample: e.logprobs,
            prompt: e.prompt_logprobs,
        });
    (controls, logprobs)
}

/// How an embedding sequence pools.
fn pooling_to_proto(p: PoolingType) -> pb::Pooling {
    let kind = match p {
        PoolingType::Last => pb::PoolingType::Last,
        PoolingType::Mean => pb::PoolingType::Mean,
        PoolingType::Cls => pb::PoolingType::Cls,
    };
    pb::Pooling {
        r#type: kind as i32,
    }
}

/// A sampled or prompt token's log probabilities from a worker.
pub(super) fn logprobs_from_proto(p: pb::TokenLogprobs) -> TokenLogprobs {
    TokenLogprobs {
        token_id: p.token_id,
        logprob: p.logprob,
        rank: p.rank,
        top: p.top_token_ids.into_iter().zip(p.top_logprobs).collect(),
    }
}

/// The plan as the workers take it; `adapter_of` gives the adapter of a new sequence that has
/// one, listed once in the plan's `adapters`.
pub(super) fn plan_to_proto<'a>(
    plan: &StepPlan,
    sampling: impl Fn(&Sampling) -> pb::SamplingParams,
    adapter_of: impl Fn(u64) -> Option<&'a AdapterInfo>,
) -> pb::StepPlan {
    let mut adapters: Vec<pb::LoraAdapter> = Vec::new();
    for n in plan.new.iter().filter(|n| n.adapter != 0) {
        if adapters.iter().any(|a| a.adapter_id == n.adapter) {
            continue;
        }
        if let Some(a) = adapter_of(n.id) {
            adapters.push(pb::LoraAdapter {
                adapter_id: a.id,
                path: a.path.display().to_string(),
                name: a.name.clone(),
            });
        }
    }
    pb::StepPlan {
        adapters,
        step_id: plan.step_id,
        new_sequences: plan
            .new
            .iter()
            .map(|n| {
                let (controls, logprobs) = extras_to_proto(&n.extras);
                pb::NewSequence {
                    sequence_id: n.id,
                    token_ids: n.token_ids.clone(),
                    sampling: Some(sampling(&n.sampling)),
                    block_ids: n.block_ids.clone(),
                    num_computed_tokens: n.num_computed_tokens as u32,
                    num_scheduled_tokens: n.num_scheduled_tokens as u32,
                    num_prompt_tokens: n.num_prompt_tokens as u32,
                    controls,
                    logprobs,
                    adapter_id: n.adapter,
                    pooling: n.extras.pooling.map(pooling_to_proto),
                }
            })
            .collect(),
        running: plan
            .running
            .iter()
            .map(|r| pb::RunningSequence {
                sequence_id: r.id,
                num_scheduled_tokens: r.num_scheduled_tokens as u32,
                new_block_ids: r.new_block_ids.clone(),
            })
            .collect(),
        freed_sequence_ids: plan.freed.clone(),
        traceparents: HashMap::new(),
        token_masks: Vec::new(),
    }
}
