//! `ApiError`: every way an API request can fail, and the one place where failures become HTTP
//! statuses and OpenAI's error JSON (`{"error": {"message", "type", "param", "code"}}`).
//!
//! Handlers return `Result<_, ApiError>`; engine errors convert with `?`. Request bodies are read
//! through [`ApiJson`], so that axum's own JSON rejections (bad syntax, wrong content type) and
//! wrong field types come out in the same shape instead of axum's plain-text bodies.
//!
//! Statuses: 400 bad input, 401 no or unknown key, 403 a model or route the key may not use,
//! 404 unknown model or route, 405 wrong method, 413 body too large, 429 queue full or a tenant's
//! limit and 503 engine or routed target unavailable (all with `Retry-After`), 503 engine stalled
//! (`/live`), 500 worker failure.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::adapters::LoraError;
use crate::error::EngineError;

/// Seconds a client should wait before retrying after a 429 (the queue drains within steps).
const RETRY_AFTER_QUEUE_FULL_S: u32 = 1;
/// Seconds a client should wait before retrying after a 503 (workers restart in seconds).
const RETRY_AFTER_UNAVAILABLE_S: u32 = 5;

/// Why an API request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something invalid (400). `param` names the request
    /// field at fault, when there is one.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The prompt plus the completion do not fit the model's context (400, OpenAI's code
    /// `context_length_exceeded`, which clients look for to trim their input).
    #[error("{message}")]
    ContextLengthExceeded { message: String, param: String },
    /// The request asks for a feature this server does not have yet (400, not silently ignored).
    #[error("{message}")]
    Unsupported { message: String, param: String },
    /// No API key, or the wrong one, on a route that needs one (401).
    #[error("Invalid or missing API key: send `Authorization: Bearer <key>`.")]
    Unauthorized,
    /// The key is valid but may not use this model or adapter (403).
    #[error("Your API key may not use the model `{model}`.")]
    ModelNotAllowed { model: String },
    /// The key is valid but this route needs an admin key (403).
    #[error("{path} needs an admin key.")]
    AdminRequired { path: String },
    /// A tenant's limit refused the request (429, OpenAI's `rate_limit_exceeded`). `kind` is
    /// OpenAI's error type for it: `requests` or `tokens`.
    #[error("Rate limit reached for your API key on {limit} (limit {value}). Please try again in {retry_after_s}s.")]
    RateLimited {
        limit: &'static str,
        kind: &'static str,
        value: f64,
        retry_after_s: u32,
    },
    /// The gateway routed the request to a target that is not available, and the tenant's policy
    /// has no available fallback (503).
    #[error("The model `{target}` that your request was routed to is unavailable{}.", fallback.as_ref().map(|f| format!(" and so is its fallback `{f}`")).unwrap_or_else(|| " and the policy names no fallback".into()))]
    RouteUnavailable {
        target: String,
        fallback: Option<String>,
    },
    /// The request names a model this server does not serve (404).
    #[error("The model `{model}` does not exist.")]
    ModelNotFound { model: String },
    /// No route matches the request's path (404).
    #[error("Invalid URL ({method} {path})")]
    RouteNotFound { method: String, path: String },
    /// The route exists but not for this method (405).
    #[error("Method {method} is not allowed for {path}")]
    MethodNotAllowed { method: String, path: String },
    /// The body is larger than the server accepts (413).
    #[error("{message}")]
    PayloadTooLarge { message: String },
    /// The client did not send the whole body within `--http-body-timeout` (408).
    #[error("The request body did not arrive within {seconds} s (--http-body-timeout)")]
    RequestTimeout { seconds: f64 },
    /// A connection began a request but did not finish its headers within
    /// `--http-header-timeout` (408; the listener writes it, as no request was read to route).
    #[error("The request headers did not arrive within {seconds} s (--http-header-timeout)")]
    HeaderTimeout { seconds: f64 },
    /// The server is not ready to serve (503): `/health` while workers are down or starting.
    #[error("{detail}")]
    NotReady { detail: String },
    /// The engine loop has stalled (503 from `/live`): on a step the workers do not answer
    /// (`on_workers`), or in the engine itself.
    #[error("{detail}")]
    Stalled { detail: String, on_workers: bool },
    /// The engine refused or failed the request.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Loading or unloading a LoRA adapter failed: 400 for an adapter that cannot be served or
    /// a name in use, 404 for an unknown adapter or with runtime updates off.
    #[error(transparent)]
    Lora(#[from] LoraError),
    /// A bug or an unexpected failure inside the API layer (500).
    #[error("{message}")]
    Internal { message: String },
}

impl ApiError {
    /// A 400 about the request field `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    /// A 400 about the request as a whole.
    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: None,
        }
    }

    /// A 400 for a request field whose feature is not implemented.
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self::Unsupported {
            message: format!("{what} is not supported yet"),
            param: param.to_string(),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. }
            | Self::ContextLengthExceeded { .. }
            | Self::Unsupported { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound { .. } | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed { .. } | Self::AdminRequired { .. } => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RouteUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout { .. } | Self::HeaderTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::NotReady { .. } | Self::Stalled { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Engine(e) => match e {
                EngineError::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
                EngineError::InvalidRequest { .. } | EngineError::ContextLengthExceeded { .. } => {
                    StatusCode::BAD_REQUEST
                }
                EngineError::WorkerFailed { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                EngineError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::Lora(e) => match e {
                LoraError::NameTaken { .. } | LoraError::Invalid { .. } => StatusCode::BAD_REQUEST,
                LoraError::NotFound { .. } | LoraError::RuntimeUpdatesOff => StatusCode::NOT_FOUND,
            },
        }
    }

    /// Seconds for the `Retry-After` header, for errors that go away by themselves.
    fn retry_after_s(&self) -> Option<u32> {
        match self {
            Self::Engine(EngineError::QueueFull { .. }) => Some(RETRY_AFTER_QUEUE_FULL_S),
            Self::Engine(EngineError::Unavailable { .. })
            | Self::NotReady { .. }
            | Self::RouteUnavailable { .. } => Some(RETRY_AFTER_UNAVAILABLE_S),
            Self::RateLimited { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        }
    }

    /// OpenAI's error object for this error; also what a stream sends when it fails midway.
    pub fn body(&self) -> ErrorBody {
        let (kind, code) = match self {
            Self::InvalidRequest { .. } => ("invalid_request_error", None),
            Self::ContextLengthExceeded { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            Self::Unsupported { .. } => ("invalid_request_error", Some("unsupported_parameter")),
            Self::ModelNotFound { .. } => ("invalid_request_error", Some("model_not_found")),
            Self::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            Self::ModelNotAllowed { .. } => ("permission_error", Some("model_not_allowed")),
            Self::AdminRequired { .. } => ("permission_error", Some("admin_key_required")),
            Self::RateLimited { kind, .. } => (*kind, Some("rate_limit_exceeded")),
            Self::RouteUnavailable { .. } => {
                ("service_unavailable_error", Some("model_unavailable"))
            }
            Self::RouteNotFound { .. } => ("invalid_request_error", Some("not_found")),
            Self::MethodNotAllowed { .. } => ("invalid_request_error", Some("method_not_allowed")),
            Self::PayloadTooLarge { .. } => ("invalid_request_error", Some("payload_too_large")),
            Self::RequestTimeout { .. } | Self::HeaderTimeout { .. } => {
                ("invalid_request_error", Some("request_timeout"))
            }
            Self::NotReady { .. } => ("service_unavailable_error", Some("service_unavailable")),
            Self::Stalled { on_workers, .. } => (
                "service_unavailable_error",
                Some(if *on_workers {
                    "workers_stalled"
                } else {
                    "engine_stalled"
                }),
            ),
            Self::Internal { .. } => ("server_error", Some("internal_error")),
            Self::Engine(e) => match e {
                EngineError::QueueFull { .. } => ("rate_limit_error", Some("queue_full")),
                EngineError::InvalidRequest { .. } => ("invalid_request_error", None),
                EngineError::ContextLengthExceeded { .. } => {
                    ("invalid_request_error", Some("context_length_exceeded"))
                }
                EngineError::WorkerFailed { .. } => ("server_error", Some("worker_failed")),
                EngineError::Unavailable { .. } => {
                    ("service_unavailable_error", Some("service_unavailable"))
                }
            },
            Self::Lora(e) => match e {
                LoraError::NameTaken { .. } => ("invalid_request_error", Some("name_in_use")),
                LoraError::Invalid { .. } => {
                    ("invalid_request_error", Some("invalid_lora_adapter"))
                }
                LoraError::NotFound { .. } => ("invalid_request_error", Some("model_not_found")),
                LoraError::RuntimeUpdatesOff => ("invalid_request_error", Some("not_found")),
            },
        };
        let param = match self {
            Self::InvalidRequest { param, .. } => param.clone(),
            Self::Unsupported { param, .. } | Self::ContextLengthExceeded { param, .. } => {
                Some(param.clone())
            }
            Self::ModelNotFound { .. }
            | Self::ModelNotAllowed { .. }
            | Self::RouteUnavailable { .. } => Some("model".to_string()),
            Self::Engine(EngineError::InvalidRequest { param, .. }) => param.clone(),
            Self::Lora(LoraError::NameTaken { .. } | LoraError::NotFound { .. }) => {
                Some("lora_name".to_string())
            }
            Self::Lora(LoraError::Invalid { .. }) => Some("lora_path".to_string()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: kind.to_string(),
                param,
                code: code.map(str::to_string),
            },
        }
    }
}

/// OpenAI's error envelope.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// OpenAI's error object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            // Not the message: serde's quote the offending value, which may be prompt text.
            let body = self.body();
            tracing::debug!(
                status = status.as_u16(),
                code = body.error.code.as_deref().unwrap_or(""),
                param = body.error.param.as_deref().unwrap_or(""),
                "request refused"
            );
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after_s() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::PayloadTooLarge {
                message: rejection.body_text(),
            };
        }
        let message = match &rejection {
            // axum's text already says what is wrong ("Failed to deserialize ...: temperature:
            // invalid type: ..."), with the field path where serde knows it.
            JsonRejection::JsonDataError(_) | JsonRejection::JsonSyntaxError(_) => {
                rejection.body_text()
            }
            JsonRejection::MissingJsonContentType(_) => {
                "Expected a JSON body with `Content-Type: application/json`".to_string()
            }
            _ => format!("Could not read the request body: {}", rejection.body_text()),
        };
        Self::invalid_body(message)
    }
}

/// A JSON request body read the way the API wants it: axum's rejections (bad syntax, wrong
/// content type, too large) and type errors all become [`ApiError`]s in OpenAI's shape, and a
/// field with the wrong type is named in `param`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: RequestBody,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let req = match req.extensions().get::<BodyTimeout>().copied() {
            Some(timeout) => read_body_within(req, timeout).await?,
            None => req,
        };
        let axum::Json(value) = axum::Json::<Value>::from_request(req, state).await?;
        if !value.is_object() {
            return Err(ApiError::invalid_body(
                "The request body must be a JSON object",
            ));
        }
        T::from_json(&value).map(Self)
    }
}

/// How long a request's body may take to arrive; the router puts it in every request's
/// extensions (`--http-body-timeout`).
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// `req` with its body read into memory within `timeout` (408 after it), under the body limit
/// the router set (413 above it).
async fn read_body_within(req: Request, timeout: BodyTimeout) -> Result<Request, ApiError> {
    let (parts, body) = req.into_parts();
    let limited = Request::from_parts(parts.clone(), body);
    let bytes = tokio::time::timeout(timeout.0, axum::body::Bytes::from_request(limited, &()))
        .await
        .map_err(|_| ApiError::RequestTimeout {
            seconds: timeout.0.as_secs_f64(),
        })?
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    message: rejection.body_text(),
                }
            } else {
                ApiError::invalid_body(format!(
                    "Could not read the request body: {}",
                    rejection.body_text()
                ))
            }
        })?;
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// A request body type; built from the parsed JSON so that it can be read in several typed
/// parts (serde's `flatten` would lose the path of a bad field).
pub trait RequestBody: Sized {
    fn from_json(value: &Value) -> Result<Self, ApiError>;
}

/// `value` as a `T`; a type error names the field's path (`temperature`, `messages[0].role`).
pub fn from_json<T: DeserializeOwned>(value: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            ApiError::invalid_body(format!("Invalid request body: {inner}"))
        } else {
            ApiError::invalid(&path, format!("Invalid `{path}`: {inner}"))
        }
    })
}
