//! API keys, as vLLM's `--api-key`: when a key is set, every `/v1/*` route needs
//! `Authorization: Bearer <key>` and answers 401 without it. `/health`, `/metrics`, `/tokenize`
//! and `/detokenize` stay open, so probes and scrapers need no secret. The comparison takes the
//! same time whatever the key, so timing does not leak it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;

use super::error::ApiError;

/// Wraps `router` so that its `/v1/` routes require `key`.
pub fn require_api_key(router: Router, key: String) -> Router {
    router.layer(middleware::from_fn_with_state(Arc::new(key), check))
}

async fn check(State(key): State<Arc<String>>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        diff |= (a.get(i).copied().unwrap_or(0) ^ x) as usize;
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;

    fn app() -> Router {
        let inner = Router::new()
            .route("/v1/models", get(|| async { "models" }))
            .route("/health", get(|| async { "" }));
        require_api_key(inner, "s3cret".into())
    }

    async fn status(path: &str, auth: Option<&str>) -> StatusCode {
        let mut r = Request::builder().uri(path);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        app()
            .oneshot(r.body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    }

    #[tokio::test]
    async fn v1_routes_need_the_key_and_health_does_not() {
        assert_eq!(status("/v1/models", None).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            status("/v1/models", Some("Bearer wrong")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status("/v1/models", Some("Bearer s3cret")).await,
            StatusCode::OK
        );
        assert_eq!(status("/health", None).await, StatusCode::OK);
    }
}
