//! `GET /metrics`: the Prometheus text exposition of [`Metrics`], and of the tenant gateway's
//! series when it runs. Kept as its own router so the API's state stays free of the registry;
//! `serve` merges it in.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// A router with `/metrics` only.
pub fn metrics_router(metrics: Arc<Metrics>, gateway: Option<Arc<Gateway>>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .with_state((metrics, gateway))
}

async fn render(
    State((metrics, gateway)): State<(Arc<Metrics>, Option<Arc<Gateway>>)>,
) -> impl IntoResponse {
    let mut text = metrics.render();
    if let Some(gateway) = gateway {
        gateway.render_metrics(&mut text);
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
}
