//! GET `/health`: 200 with an empty body while the server can serve, 503 (OpenAI error JSON with
//! the reason, `Retry-After`) while it cannot: starting, or a worker is down.
//!
//! The state comes from a `tokio::sync::watch` channel: whoever knows (the startup code, the
//! cluster membership task) holds the `Sender<Health>` and flips it with `send_replace`; the API
//! only reads the latest value, so a probe costs one uncontended read lock.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use super::ApiState;

/// Whether the server can serve requests now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Not serving; `reason` goes into the 503's message ("worker 1 is down", "loading").
    NotReady {
        reason: String,
    },
}

pub async fn health(State(state): State<Arc<ApiState>>) -> Result<StatusCode, ApiError> {
    match &*state.health.borrow() {
        Health::Ready => Ok(StatusCode::OK),
        Health::NotReady { reason } => Err(ApiError::NotReady {
            detail: format!("The server is not ready: {reason}"),
        }),
    }
}
