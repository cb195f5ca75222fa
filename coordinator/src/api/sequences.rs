//! Runs a request's sequences on the engine: submits them all (a refusal of any one refuses the
//! request), then either collects each to its end or merges their events as they arrive.
//!
//! Invariant: a `GenerationStream` lives exactly as long as someone may still want its events.
//! Every early exit here (a refusal, a failed sibling, a dropped handler future or SSE body)
//! drops the remaining streams, which aborts their sequences and frees their KV blocks.

use futures::stream::{self, Stream, StreamExt};

use super::error::ApiError;
use super::gateway::{Ticket, Tokens};
use crate::engine::{
    EngineHandle, FinishReason, GenerateEvent, GenerateRequest, GenerationStream, TokenLogprobs,
};

/// One submitted sequence and the choice index it answers.
#[derive(Debug)]
pub struct ChoiceStream {
    pub index: u32,
    pub stream: GenerationStream,
}

/// Submits `(choice index, request)` pairs in order. On a refusal, the sequences accepted so far
/// are dropped (aborted) and the refusal is the request's error.
pub async fn submit_all(
    engine: &EngineHandle,
    requests: Vec<(u32, GenerateRequest)>,
) -> Result<Vec<ChoiceStream>, ApiError> {
    let mut sequences = Vec::with_capacity(requests.len());
    for (index, request) in requests {
        let stream = engine.generate(request).await?;
        sequences.push(ChoiceStream { index, stream });
    }
    Ok(sequences)
}

/// A sequence's whole output.
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub index: u32,
    pub text: String,
    pub finish_reason: FinishReason,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
    /// Each generated token's log probabilities, when the request asked for them.
    pub logprobs: Vec<TokenLogprobs>,
    /// The prompt's, when asked for (one per prompt token, `None` for the first).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

/// A whole (not streamed) answer's tokens: every choice's completion tokens, and the prompt
/// tokens the prefix cache held as each prompt's first choice reports them (choices `p n ..
/// (p + 1) n` answer prompt `p`). Reported to the gateway's ticket when the request has one.
pub fn answer_tokens(
    collected: &[Collected],
    n: u32,
    prompt_tokens: u64,
    ticket: Option<&Ticket>,
) -> Tokens {
    let tokens = Tokens {
        prompt: prompt_tokens,
        cached: collected
            .iter()
            .filter(|c| c.index % n.max(1) == 0)
            .map(|c| u64::from(c.cached_tokens))
            .sum(),
        completion: collected
            .iter()
            .map(|c| u64::from(c.completion_tokens))
            .sum(),
    };
    if let Some(ticket) = ticket {
        ticket.complete(tokens);
    }
    tokens
}

/// Runs every sequence to its end, concurrently; sorted by choice index. The first error wins
/// and drops (aborts) the others.
pub async fn collect_all(sequences: Vec<ChoiceStream>) -> Result<Vec<Collected>, ApiError> {
    let mut collected =
        futures::future::try_join_all(sequences.into_iter().map(collect_one)).await?;
    collected.sort_by_key(|c| c.index);
    Ok(collected)
}

async fn collect_one(sequence: ChoiceStream) -> Result<Collected, ApiError> {
    let ChoiceStream { index, mut stream } = sequence;
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut prompt_logprobs = None;
    while let Some(event) = stream.next().await {
        match event {
            GenerateEvent::Delta {
                text: delta,
                logprobs: lp,
                prompt_logprobs: prompt,
                ..
            } => {
                text.push_str(&delta);
                logprobs.extend(lp);
                if prompt.is_some() {
                    prompt_logprobs = prompt;
                }
            }
            GenerateEvent::Finished {
                reason,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                return Ok(Collected {
                    index,
                    text,
                    finish_reason: reason,
                    completion_tokens,
                    cached_tokens,
                    logprobs,
                    prompt_logprobs,
                })
            }
            GenerateEvent::Error(e) => return Err(e.into()),
        }
    }
    // `GenerationStream` reports a vanished engine as an `Error` event, so this is a bug.
    Err(ApiError::Internal {
        message: "a sequence ended without a result".into(),
    })
}

/// The events of all sequences, each tagged with its choice index, interleaved as they arrive.
/// Ends when every sequence has sent its last event.
pub fn merged(
    sequences: Vec<ChoiceStream>,
) -> impl Stream<Item = (u32, GenerateEvent)> + Send + Unpin {
    stream::select_all(
        sequences
            .into_iter()
            .map(|ChoiceStream { index, stream }| stream.map(move |event| (index, event))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choice(index: u32, completion_tokens: u32, cached_tokens: u32) -> Collected {
        Collected {
            index,
            text: String::new(),
            finish_reason: FinishReason::Length,
            completion_tokens,
            cached_tokens,
            logprobs: Vec::new(),
            prompt_logprobs: None,
        }
    }

    #[test]
    fn answer_tokens_sum_every_choice_and_each_prompts_cached_tokens_once() {
        // Two prompts, two choices each: choices 0 and 1 answer prompt 0 (16 tokens cached),
        // choices 2 and 3 prompt 1 (32 cached).
        let collected = [
            choice(0, 3, 16),
            choice(1, 5, 16),
            choice(2, 7, 32),
            choice(3, 9, 32),
        ];
        let tokens = answer_tokens(&collected, 2, 100, None);
        assert_eq!(
            tokens,
            Tokens {
                prompt: 100,
                cached: 48,
                completion: 24
            }
        );
        // One prompt (a chat) with three choices: its cached tokens count once.
        let chat = [choice(0, 1, 8), choice(1, 2, 8), choice(2, 3, 8)];
        assert_eq!(answer_tokens(&chat, 3, 10, None).cached, 8);
    }
}
