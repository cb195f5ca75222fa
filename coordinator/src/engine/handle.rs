//! The caller's side of the engine actor: submit a request, receive its events as a stream.
//! Dropping a `GenerationStream` before its last event aborts the sequence, so a client that
//! disconnects frees its KV blocks within one step.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{mpsc, oneshot};

use super::liveness::Liveness;
use super::types::{GenerateEvent, GenerateRequest};
use crate::error::{EngineError, EngineResult};

/// A message to the engine actor.
#[derive(Debug)]
pub enum EngineCommand {
    /// Start a sequence. `accepted` answers once the engine admits or refuses it.
    Submit {
        id: u64,
        /// Boxed: the other commands are a few words.
        request: Box<GenerateRequest>,
        events: mpsc::UnboundedSender<GenerateEvent>,
        accepted: oneshot::Sender<EngineResult<()>>,
        /// The caller's span (the API's request span): the sequence's spans go under it.
        span: tracing::Span,
    },
    /// Stop a sequence and free its blocks (client gone).
    Abort { id: u64 },
    /// Refuse new sequences from now on (graceful shutdown); running ones continue.
    Drain,
    /// End every sequence now with an `Unavailable` error saying `detail`.
    AbortAll { detail: String },
}

/// A cheap, cloneable handle to the engine actor.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    commands: mpsc::UnboundedSender<EngineCommand>,
    next_id: Arc<AtomicU64>,
    liveness: Liveness,
}

impl EngineHandle {
    /// Wraps the command channel and the heartbeat of a running engine actor.
    pub fn new(commands: mpsc::UnboundedSender<EngineCommand>, liveness: Liveness) -> Self {
        Self {
            commands,
            next_id: Arc::new(AtomicU64::new(1)),
            liveness,
        }
    }

    /// The engine loop's heartbeat (`/live`).
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Submits one sequence. Errors when the engine refuses it (queue full, unavailable, a
    /// request that can never fit); otherwise every event of the sequence comes on the stream.
    pub async fn generate(&self, request: GenerateRequest) -> EngineResult<GenerationStream> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (accepted_tx, accepted_rx) = oneshot::channel();
        let gone = || EngineError::Unavailable {
            detail: "the engine has stopped".into(),
        };
        self.commands
            .send(EngineCommand::Submit {
                id,
                request: Box::new(request),
                events: events_tx,
                accepted: accepted_tx,
                span: tracing::Span::current(),
            })
            .map_err(|_| gone())?;
        accepted_rx.await.map_err(|_| gone())??;
        Ok(GenerationStream {
            id,
            events: events_rx,
            commands: self.commands.clone(),
            ended: false,
        })
    }
}

impl EngineHandle {
    /// Stops admitting sequences; those already admitted run to their end.
    pub fn drain(&self) {
        let _ = self.commands.send(EngineCommand::Drain);
    }

    /// Ends every sequence at once with an error that says `detail`.
    pub fn abort_all(&self, detail: impl Into<String>) {
        let _ = self.commands.send(EngineCommand::AbortAll {
            detail: detail.into(),
        });
    }
}

/// The events of one sequence; ends after `Finished` or `Error`.
#[derive(Debug)]
pub struct GenerationStream {
    id: u64,
    events: mpsc::UnboundedReceiver<GenerateEvent>,
    commands: mpsc::UnboundedSender<EngineCommand>,
    ended: bool,
}

impl GenerationStream {
    /// The engine-wide id of this sequence.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Stream for GenerationStream {
    type Item = GenerateEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let polled = self.events.poll_recv(cx);
        match &polled {
            Poll::Ready(Some(GenerateEvent::Finished { .. } | GenerateEvent::Error(_)))
            | Poll::Ready(None) => {
                self.ended = true;
            }
            _ => {}
        }
        if let Poll::Ready(None) = polled {
            // The engine dropped the sender without a last event: report it rather than end quietly.
            return Poll::Ready(Some(GenerateEvent::Error(EngineError::Unavailable {
                detail: "the engine stopped before the request finished".into(),
            })));
        }
        polled
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        if !self.ended {
            // The actor may be gone already; then there is nothing left to free.
            let _ = self.commands.send(EngineCommand::Abort { id: self.id });
        }
    }
}
