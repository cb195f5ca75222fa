//! The OpenAI-compatible HTTP API: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`
//! (on a server run with `--task embed`; the others there answer vLLM's 400), `/v1/models`,
//! vLLM's `/tokenize`, `/detokenize` and `/health` (readiness), `/live` (liveness), and the
//! tenant gateway's middleware and `/v1/usage` (`gateway`).
//!
//! Handlers are thin: parse (`protocol`), check and build engine requests (`validate`), submit
//! through the [`EngineHandle`] (`sequences`), answer whole or as SSE (`sse`). All error
//! statuses and bodies come from `error`. Nothing here holds engine state: a request's
//! `GenerationStream`s live in its handler future or its SSE body, so a client that goes away
//! aborts its sequences.
//!
//! Costs per request: one tokenization on the blocking pool, one engine round trip per
//! sequence to admit it, and one JSON chunk per text delta when streaming.

mod auth;
mod chat;
mod completions;
mod connection;
mod embeddings;
mod error;
mod gateway;
mod health;
mod limits;
pub mod listener;
mod live;
mod logprobs;
mod lora;
mod metrics;
mod models;
mod protocol;
mod request_id;
mod sequences;
mod sse;
mod structured;
mod tokenize;
mod validate;

#[doc(hidden)]
pub mod fuzz;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tool_templates_tests;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::watch;

pub use auth::require_api_key;
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use gateway::{with_gateway, FEATURE_HEADER, ROUTE_HEADER, TARGET_HEADER, VARIANT_HEADER};
pub use health::Health;
pub use limits::{ApiLimits, LimitArgs, LimitsError};
pub use metrics::metrics_router;
pub use request_id::{request_ids, RequestId, RequestSpan, REQUEST_ID_HEADER};
// The request checks and chat rendering the Python bindings (`python/`) reuse, so their
// `ValueError`s carry the HTTP 400s' messages.
pub use chat::render as render_chat;
pub use embeddings::finish_vector;
pub use logprobs::TokenTexts;
pub use protocol::{ChatMessageIn, SamplingFields};
pub use structured::{compile_constraint_blocking, requested_constraint};
pub use validate::{
    check_extras, check_params, check_token_ids, top_count, CheckedParams, MaxTokens, PromptKind,
};

use crate::engine::EngineHandle;
use crate::gateway::Gateway;
use crate::served_model::ServedModel;

/// What the handlers share. Cheap to clone; built once at start.
#[derive(Clone)]
pub struct ApiState {
    /// The engine actor that runs the sequences.
    pub engine: EngineHandle,
    /// The served model: name, context length, tokenizer, chat template.
    pub model: ServedModel,
    /// Readiness for `/health`. The owner of the matching `watch::Sender<Health>` (startup,
    /// worker membership) flips it with `send_replace(Health::Ready)` or
    /// `send_replace(Health::NotReady { reason })`.
    pub health: watch::Receiver<Health>,
    /// The tenant gateway, when a policy is configured (`/v1/usage` needs it).
    pub gateway: Option<Arc<Gateway>>,
    /// Bounds on requests (`--max-request-body-bytes`, `--max-n`, ...).
    pub limits: ApiLimits,
    /// Log each request's prompt text (`--log-prompts`); off, no prompt or output text is
    /// logged at any level.
    pub log_prompts: bool,
}

/// The API's routes over `state`. Unknown routes answer 404 and wrong methods 405, both in
/// OpenAI's error shape. Other routers (say `/metrics`) can be merged in as long as they set no
/// fallback of their own.
pub fn router(state: ApiState) -> Router {
    let body_timeout = error::BodyTimeout(state.limits.body_timeout);
    let max_body_bytes = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(models::list_models))
        .route("/v1/usage", get(gateway::usage))
        .route("/v1/load_lora_adapter", post(lora::load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(lora::unload_lora_adapter))
        // Model names often hold slashes (`meta-llama/Llama-3.1-8B`).
        .route("/v1/models/{*model}", get(models::retrieve_model))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/health", get(health::health))
        .route("/live", get(live::live))
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::Extension(body_timeout))
        .with_state(Arc::new(state))
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// Gives every request an id and a span and every response its `X-Request-Id` (see
/// `request_id`). Put it around the whole app, gateway and key checks included, so that their
/// refusals carry the id too.
pub fn with_request_ids(app: Router) -> Router {
    app.layer(axum::middleware::from_fn(request_ids))
}

/// `<prefix>-<request id>`, OpenAI's id format (vLLM's use of `X-Request-Id`); a fresh uuid
/// when the request has no id (the router used without `with_request_ids`).
fn new_id(prefix: &str, request: Option<&RequestId>) -> String {
    match request {
        Some(RequestId(id)) => format!("{prefix}-{id}"),
        None => format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
    }
}

/// Seconds since the Unix epoch (OpenAI's `created`).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
