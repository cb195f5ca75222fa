//! `X-Request-Id`: the id a client (or the load balancer before us) gave a request, or one we
//! make, carried through the request's life: it is the `request_id` field of the `request`
//! span that every log line and trace span of the request sits under, the base of the
//! response's `id` (`chatcmpl-<id>`, as vLLM does), and it comes back in the `X-Request-Id`
//! header of every response, errors and streams included.
//!
//! The span is also the request's trace span when traces are exported: a W3C `traceparent`
//! (and `tracestate`) header from the client makes it a child of the client's span, so the
//! client's trace continues through us; handlers add the model, adapter and tenant, and the
//! engine the usage and finish reason (`engine::trace`).
//!
//! A client's id is taken as it is when it is 1 to 128 visible ASCII characters; anything else
//! is refused with 400 rather than silently replaced, so a client never correlates by an id
//! that the server does not use.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::ApiError;

/// The header.
pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest id a client may send.
const MAX_LEN: usize = 128;

/// A request's id, in its extensions for handlers that name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The client's id, when it sent a usable one; `Err` when it sent one that is not.
fn from_client(value: Option<&HeaderValue>) -> Result<Option<String>, ApiError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_LEN || !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "The X-Request-Id header must be 1 to {MAX_LEN} visible ASCII characters (no spaces)"
            ),
            param: None,
        });
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// Middleware: gives the request its id and span, and the response its header.
pub async fn request_ids(mut req: Request, next: Next) -> Response {
    let (id, refused) = match from_client(req.headers().get(&REQUEST_ID_HEADER)) {
        Ok(Some(id)) => (id, None),
        Ok(None) => (uuid::Uuid::new_v4().simple().to_string(), None),
        Err(e) => (uuid::Uuid::new_v4().simple().to_string(), Some(e)),
    };
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    );
    if tpserve_term::telemetry::enabled() {
        continue_client_trace(&span, req.headers(), &id);
    }
    let mut response = match refused {
        Some(e) => span.in_scope(|| e.into_response()),
        None => {
            req.extensions_mut().insert(RequestId(id.clone()));
            req.extensions_mut().insert(RequestSpan(span.clone()));
            next.run(req).instrument(span.clone()).await
        }
    };
    span.in_scope(|| tracing::debug!(status = response.status().as_u16(), "answered"));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(REQUEST_ID_HEADER.clone(), value);
    }
    response
}

/// Makes `span` a child of the client's span named by its `traceparent` header (when valid) and
/// gives it the request id as an attribute.
fn continue_client_trace(span: &tracing::Span, headers: &axum::http::HeaderMap, id: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(parent) = header("traceparent") {
        let cx = tpserve_term::telemetry::context_from(parent, header("tracestate"));
        // An invalid header gives an empty context: the span stays a root.
        let _ = span.set_parent(cx);
    }
    span.set_attribute("gen_ai.request.id", id.to_string());
}

/// What a request's span records once the handler knows it: the model it ran on, the adapter
/// and the gateway's tenant.
pub fn annotate(model: &str, adapter: Option<&str>, tenant: Option<&str>) {
    if !tpserve_term::telemetry::enabled() {
        return;
    }
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::Span::current();
    span.set_attribute("gen_ai.request.model", model.to_string());
    if let Some(adapter) = adapter {
        span.set_attribute("tpserve.adapter", adapter.to_string());
    }
    if let Some(tenant) = tenant {
        span.set_attribute("tpserve.tenant", tenant.to_string());
    }
}

/// The request's span, for work that outlives the handler (a stream's body) to run under.
#[derive(Debug, Clone)]
pub struct RequestSpan(pub tracing::Span);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_kept_when_visible_ascii_and_refused_otherwise() {
        let ok = HeaderValue::from_static("abc-123_X.y");
        assert_eq!(
            from_client(Some(&ok)).unwrap().as_deref(),
            Some("abc-123_X.y")
        );
        assert_eq!(from_client(None).unwrap(), None);
        for bad in ["", "has space", &"x".repeat(MAX_LEN + 1)] {
            let value = HeaderValue::from_str(bad).unwrap();
            assert!(from_client(Some(&value)).is_err(), "{bad:?}");
        }
        let high = HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap();
        assert!(from_client(Some(&high)).is_err());
    }
}
