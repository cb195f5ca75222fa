//! Server-sent events for streaming completions, shared by chat and text completions: each
//! chunk is `data: {json}\n\n`, the stream ends with `data: [DONE]\n\n`.
//!
//! Order: opening chunks of every choice (chat: the role; completions: the echoed prompt), then
//! text and finish chunks as the sequences produce them (choices interleave), then the usage
//! chunk when asked for, then `[DONE]`. An engine error midway sends `data: {"error": ...}` and
//! `[DONE]` and ends the stream: the status line went out long ago.
//!
//! The body owns the generation streams, so a client that disconnects drops the body and with it
//! the streams, which aborts the sequences.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;

use std::sync::Arc;

use super::error::ApiError;
use super::gateway::{Ticket, Tokens};
use super::protocol::Usage;
use super::sequences::{merged, ChoiceStream};
use crate::engine::{FinishReason, GenerateEvent, TokenLogprobs};

/// Comment lines sent while nothing else is, so proxies keep idle streams (long prefills) open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How one endpoint shapes its chunks.
pub trait ChunkWriter: Send + 'static {
    /// The chunk that opens choice `index` before any output, if the endpoint sends one.
    fn opening(&mut self, index: u32) -> Option<Event>;
    /// New output of choice `index`: its text (may be empty while held back), the new token's
    /// log probabilities and, on the first delta, the prompt's, when the request asked for
    /// them. Nothing when there is nothing to send.
    fn delta(&mut self, index: u32, delta: Delta) -> Vec<Event>;
    /// The end of choice `index`: what the writer still held, then the finishing chunk.
    fn finish(&mut self, index: u32, reason: FinishReason) -> Vec<Event>;
    /// The last chunk, with the usage of the whole request (only with `include_usage`).
    fn usage(&self, usage: Usage) -> Event;
}

/// What a stream counts and where it reports it.
pub struct StreamUsage {
    /// The request's prompt tokens (each prompt once).
    pub prompt_tokens: u64,
    /// Choices per prompt: the cache hits of each prompt's first choice are its cached tokens.
    pub n: u32,
    /// Send the last chunk with the usage.
    pub include_usage: bool,
    /// The gateway's ticket: told the usage at the end, or the status of a failure midway.
    pub ticket: Option<Arc<Ticket>>,
}

/// What a delta event brings to a chunk writer.
#[derive(Debug)]
pub struct Delta {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Option<TokenLogprobs>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
}

/// Streams `sequences` as SSE.
pub fn stream_response<W: ChunkWriter>(
    mut writer: W,
    sequences: Vec<ChoiceStream>,
    usage: StreamUsage,
) -> Response {
    let StreamUsage {
        prompt_tokens,
        n,
        include_usage,
        ticket,
    } = usage;
    let mut indexes: Vec<u32> = sequences.iter().map(|s| s.index).collect();
    indexes.sort_unstable();
    // The body outlives the handler: its span (a child of the request's) times the stream and
    // keeps its log lines under the request id.
    let span = tracing::info_span!("stream");
    let events = async_stream::stream! {
        let span = span;
        for &index in &indexes {
            if let Some(event) = writer.opening(index) {
                yield Ok::<_, Infallible>(event);
            }
        }
        let mut events = merged(sequences);
        let mut completion_tokens = 0u64;
        let mut cached_tokens = 0u64;
        while let Some((index, event)) = events.next().await {
            match event {
                GenerateEvent::Delta { text, token_ids, logprobs, prompt_logprobs } => {
                    let delta = Delta { text, token_ids, logprobs, prompt_logprobs };
                    for event in writer.delta(index, delta) {
                        yield Ok(event);
                    }
                }
                GenerateEvent::Finished { reason, completion_tokens: generated, cached_tokens: cached, .. } => {
                    completion_tokens += u64::from(generated);
                    if index % n == 0 {
                        cached_tokens += u64::from(cached);
                    }
                    for event in writer.finish(index, reason) {
                        yield Ok(event);
                    }
                }
                GenerateEvent::Error(e) => {
                    let error = ApiError::from(e);
                    span.in_scope(|| tracing::warn!(error = %error, "stream failed midway"));
                    if let Some(ticket) = &ticket {
                        ticket.fail(error.status().as_u16());
                    }
                    yield Ok(json_event(&error.body()));
                    yield Ok(done());
                    // Dropping `events` here aborts the sibling sequences.
                    return;
                }
            }
        }
        if include_usage {
            yield Ok(writer.usage(Usage::new(prompt_tokens, completion_tokens, cached_tokens)));
        }
        if let Some(ticket) = &ticket {
            ticket.complete(Tokens { prompt: prompt_tokens, cached: cached_tokens, completion: completion_tokens });
        }
        yield Ok(done());
    };
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// `data: {json}`.
pub fn json_event<T: Serialize>(value: &T) -> Event {
    // Our chunk types are plain structs with string keys: serializing them cannot fail.
    let json = serde_json::to_string(value).expect("chunks serialize to JSON");
    Event::default().data(json)
}

fn done() -> Event {
    Event::default().data("[DONE]")
}
