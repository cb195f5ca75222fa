//! The gateway on the HTTP side: a middleware on `/v1/*` that turns the bearer key into a tenant
//! (401 without one), admits the request under the tenant's limits (429 with `Retry-After`),
//! and records the request's usage when its response ends; [`place`], which the completion
//! handlers call to route the request and apply the tenant's caps; the route headers; and
//! `GET /v1/usage`.
//!
//! A request's usage is filled in by its handler (or its SSE body) through the request's
//! [`Ticket`]; the middleware's recorder writes it to the ledger when the response body is
//! dropped, so an abandoned stream is counted (status 499) as surely as a finished one. The
//! concurrency slot is held by the same recorder, so it frees exactly when the response ends.
//!
//! Keys: the header's key is hashed at once and only the hash is looked up; nothing here logs
//! it. Admin keys (`admin_key_hashes`) may read `/v1/usage` and nothing else.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::ApiState;
use crate::adapters::AdapterInfo;
use crate::engine::Share;
use crate::gateway::keys::hash_key;
use crate::gateway::policy::{KeyOwner, Policy};
use crate::gateway::quota::{Limit, Slot};
use crate::gateway::routing::{self, Route, RouteError, RouteRequest};
use crate::gateway::usage::{Record, UsageKey, UsageRow};
use crate::gateway::{tenant_id, Gateway};
use crate::served_model::ServedModel;

/// Names the rule that routed the request (`feature:summarize`, `experiment:e`, `tenant`, ...).
pub const ROUTE_HEADER: &str = "x-tpserve-route";
/// Names the served model or adapter the request ran on.
pub const TARGET_HEADER: &str = "x-tpserve-target";
/// Names the A/B variant, when an experiment routed the request.
pub const VARIANT_HEADER: &str = "x-tpserve-variant";
/// Names the target the rule chose, when it was unavailable and the fallback ran instead.
pub const FALLBACK_HEADER: &str = "x-tpserve-fallback-from";
/// The request header that selects a feature route.
pub const FEATURE_HEADER: &str = "x-feature";

/// Who is calling, as the middleware found it; in the request's extensions.
#[derive(Clone)]
pub struct Caller {
    policy: Arc<Policy>,
    tenant: String,
    ticket: Arc<Ticket>,
}

impl Caller {
    /// The tenant the key belongs to.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }
}

/// The tokens a request's client was told of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
}

/// A request's usage as its handler fills it in.
#[derive(Debug, Default)]
pub struct Ticket {
    state: Mutex<TicketState>,
}

#[derive(Debug, Default)]
struct TicketState {
    route: Option<Route>,
    tokens: Option<Tokens>,
    failed: Option<u16>,
}

impl Ticket {
    fn lock(&self) -> std::sync::MutexGuard<'_, TicketState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The client has received its usage: the request succeeded with these tokens.
    pub fn complete(&self, tokens: Tokens) {
        self.lock().tokens = Some(tokens);
    }

    /// The request failed after its status line went out (an error event mid-stream).
    pub fn fail(&self, status: u16) {
        self.lock().failed = Some(status);
    }
}

/// Wraps `router` so that `/v1/*` follows `gateway`'s policy.
pub fn with_gateway(router: Router, gateway: Arc<Gateway>) -> Router {
    router.layer(middleware::from_fn_with_state(gateway, check))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn check(State(gateway): State<Arc<Gateway>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if !path.starts_with("/v1/") {
        return next.run(request).await;
    }
    let policy = gateway.policy();
    let hash = bearer(request.headers()).map(hash_key);
    let owner = hash.as_deref().and_then(|h| policy.owner(h));
    if path == "/v1/usage" {
        return match owner {
            Some(KeyOwner::Admin) => next.run(request).await,
            Some(KeyOwner::Tenant(_)) => ApiError::AdminRequired {
                path: "/v1/usage".into(),
            }
            .into_response(),
            None => ApiError::Unauthorized.into_response(),
        };
    }
    // Admin keys read usage; they are not tenants and run nothing.
    let Some(KeyOwner::Tenant(tenant)) = owner else {
        return ApiError::Unauthorized.into_response();
    };
    let tenant_name = tenant.name.clone();
    let slot = match gateway
        .quotas
        .admit(&tenant.name, &tenant.limits, Instant::now())
    {
        Ok(slot) => slot,
        Err(refusal) => {
            let error = ApiError::RateLimited {
                limit: refusal.limit.name(),
                kind: match refusal.limit {
                    Limit::TokensPerMinute => "tokens",
                    Limit::RequestsPerSecond | Limit::ConcurrentRequests => "requests",
                },
                value: refusal.value,
                retry_after_s: refusal.retry_after_s,
            };
            let recorder = Recorder {
                gateway,
                tenant: tenant_name,
                ticket: Arc::default(),
                status: Some(429),
                _slot: None,
            };
            drop(recorder);
            return error.into_response();
        }
    };
    let ticket = Arc::new(Ticket::default());
    request.extensions_mut().insert(Caller {
        policy: policy.clone(),
        tenant: tenant_name.clone(),
        ticket: ticket.clone(),
    });
    let mut recorder = Recorder {
        gateway,
        tenant: tenant_name,
        ticket,
        status: None,
        _slot: Some(slot),
    };
    let mut response = next.run(request).await;
    if let Some(route) = recorder.ticket.lock().route.clone() {
        set_route_headers(response.headers_mut(), &route);
    }
    let status = response.status().as_u16();
    if status >= 400 {
        recorder.status = Some(status);
        return response;
    }
    // The recorder lives as long as the body: it records when the last byte is sent, or when
    // the client goes away first.
    let (parts, body) = response.into_parts();
    let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
        let _ = &recorder;
        chunk
    }));
    Response::from_parts(parts, body)
}

fn set_route_headers(headers: &mut HeaderMap, route: &Route) {
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set(ROUTE_HEADER, &route.rule.to_string());
    set(TARGET_HEADER, &route.target);
    if let Some(variant) = &route.variant {
        set(VARIANT_HEADER, variant);
    }
    if let Some(from) = &route.fallback_from {
        set(FALLBACK_HEADER, from);
    }
}

/// Writes a request's usage to the ledger when dropped.
struct Recorder {
    gateway: Arc<Gateway>,
    tenant: String,
    ticket: Arc<Ticket>,
    /// The response's status when it was an error.
    status: Option<u16>,
    _slot: Option<Slot>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let state = self.ticket.lock();
        let (status, tokens) = match (self.status, state.failed, state.tokens) {
            (Some(status), _, _) | (None, Some(status), _) => (status, Tokens::default()),
            (None, None, Some(tokens)) => (200, tokens),
            // Answered without generating (`/v1/models`): nothing to attribute.
            (None, None, None) if state.route.is_none() => return,
            // Routed, but the client left before its usage reached it.
            (None, None, None) => (499, Tokens::default()),
        };
        let route = state.route.as_ref();
        let dash = || "-".to_string();
        let record = Record {
            time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            key: UsageKey {
                tenant: self.tenant.clone(),
                model: route.map_or_else(dash, |r| r.target.clone()),
                feature: route.map_or_else(dash, |r| r.feature_label.clone()),
                variant: route.and_then(|r| r.variant.clone()).unwrap_or_else(dash),
            },
            route: route.map_or_else(dash, |r| r.rule.to_string()),
            status,
            prompt_tokens: tokens.prompt,
            cached_prompt_tokens: tokens.cached,
            completion_tokens: tokens.completion,
        };
        drop(state);
        if status == 200 {
            self.gateway.quotas.record_tokens(
                &self.tenant,
                tokens.prompt + tokens.completion,
                Instant::now(),
            );
        }
        self.gateway.usage.record(record);
    }
}

/// What a request asks for, as far as placing it goes.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The request's `model`.
    pub model: Option<&'a str>,
    /// The request's `user` (OpenAI's end-user id).
    pub user: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// Where and how a request runs.
#[derive(Debug, Clone)]
pub struct Placement {
    /// The name the answer reports in `model`: the target it ran on.
    pub model: String,
    pub share: Share,
    pub cache_salt: u64,
    /// The tenant's `max_tokens` cap.
    pub max_tokens: Option<u32>,
    /// The longest context the tenant may use (the tenant's cap, at most max-model-len).
    pub max_model_len: u32,
    /// Where the handler reports the usage (gateway requests only).
    pub ticket: Option<Arc<Ticket>>,
    /// The LoRA adapter the target names; `None`: the base model.
    pub adapter: Option<Arc<AdapterInfo>>,
}

/// [`place`], then records the placement on the request's span (model, adapter, tenant): what
/// every handler does first.
pub fn place_request(
    served: &ServedModel,
    caller: Option<&Caller>,
    ask: Ask<'_>,
) -> Result<Placement, ApiError> {
    let placement = place(served, caller, ask)?;
    super::request_id::annotate(
        &placement.model,
        placement.adapter.as_deref().map(|a| a.name.as_str()),
        caller.map(Caller::tenant),
    );
    Ok(placement)
}

/// Routes a request: without a gateway, checks that `model` is served; with one, applies the
/// tenant's routing rules and caps (see `gateway::routing`).
fn place(
    served: &ServedModel,
    caller: Option<&Caller>,
    ask: Ask<'_>,
) -> Result<Placement, ApiError> {
    let Some(caller) = caller else {
        let adapter = ask.model.and_then(|m| served.adapter(m));
        return Ok(Placement {
            model: match &adapter {
                Some(a) => a.name.clone(),
                None => super::validate::check_model(ask.model, served)?,
            },
            share: Share::default(),
            cache_salt: 0,
            max_tokens: None,
            max_model_len: served.max_model_len,
            ticket: None,
            adapter,
        });
    };
    let tenant = caller
        .policy
        .tenant(&caller.tenant)
        .ok_or(ApiError::Unauthorized)?;
    let header = |name: &str| ask.headers.get(name).and_then(|v| v.to_str().ok());
    let request = RouteRequest {
        model: ask.model,
        feature: header(FEATURE_HEADER),
        user: ask.user,
        user_header: tenant
            .experiment
            .as_ref()
            .and_then(|e| header(&e.user_header)),
    };
    let route = routing::route(tenant, &request, &served.name, |t| {
        served.serves_model_or_adapter(t)
    })
    .map_err(|e| match e {
        RouteError::NotAllowed { target } => ApiError::ModelNotAllowed { model: target },
        RouteError::NotFound { target } => ApiError::ModelNotFound { model: target },
        RouteError::Unavailable { target, fallback } => {
            ApiError::RouteUnavailable { target, fallback }
        }
    })?;
    let id = tenant_id(&tenant.name);
    let placement = Placement {
        model: route.target.clone(),
        share: Share {
            tenant: id,
            weight: tenant.weight,
        },
        cache_salt: id,
        max_tokens: tenant.limits.max_tokens,
        max_model_len: tenant
            .limits
            .max_context_tokens
            .map_or(served.max_model_len, |cap| cap.min(served.max_model_len)),
        ticket: Some(caller.ticket.clone()),
        adapter: served.adapter(&route.target),
    };
    caller.ticket.lock().route = Some(route);
    Ok(placement)
}

/// `GET /v1/usage` query: a window in Unix seconds (default: the last 24 hours, the retention)
/// and optionally one tenant.
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    start: Option<u64>,
    end: Option<u64>,
    tenant: Option<String>,
}

/// `GET /v1/usage`'s answer.
#[derive(Debug, Serialize)]
pub struct UsageAnswer {
    object: &'static str,
    start: u64,
    end: u64,
    data: Vec<UsageRow>,
}

pub async fn usage(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<UsageAnswer>, ApiError> {
    let Some(gateway) = &state.gateway else {
        return Err(ApiError::RouteNotFound {
            method: "GET".into(),
            path: "/v1/usage (no gateway policy is configured)".into(),
        });
    };
    let Query(query) = query.map_err(|e| ApiError::invalid_body(e.body_text()))?;
    let now = super::unix_now();
    let end = query.end.unwrap_or(now + 60);
    let start = query
        .start
        .unwrap_or_else(|| now.saturating_sub(crate::gateway::usage::RETENTION_MINUTES * 60));
    if start >= end {
        return Err(ApiError::invalid(
            "start",
            format!("`start` ({start}) must be before `end` ({end})"),
        ));
    }
    Ok(Json(UsageAnswer {
        object: "usage",
        start,
        end,
        data: gateway.usage.query(start, end, query.tenant.as_deref()),
    }))
}
