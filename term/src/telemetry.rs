//! OpenTelemetry traces over OTLP, for both binaries: `--otlp-traces-endpoint` (vLLM's flag)
//! turns them on, over gRPC or HTTP/protobuf (`--otlp-traces-protocol`, or
//! `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`), with W3C trace context as the propagator. The
//! standard `OTEL_*` variables tune the SDK (`OTEL_SERVICE_NAME`, the sampler, the batch
//! processor's delay).
//!
//! Only spans, and only those of tpserve's own crates, go to the exporter: tonic, h2, hyper and
//! tower spans, and every log event, are filtered out. `--collect-detailed-traces` (vLLM's flag)
//! adds per-step spans: `worker` for the coordinator's engine steps and every worker rank's
//! steps (model step, sampling) inside each traced request's trace, `model` or `all` also for
//! each all-reduce inside a model step.
//!
//! Off (no endpoint), nothing is installed: no layer, no exporter, no context in step plans; the
//! checks callers make ([`enabled`], [`detail`]) read a `OnceLock`.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::Layer;

use crate::logging::BoxedLayer;

/// How traces travel to the collector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TraceProtocol {
    /// OTLP over gRPC (port 4317 by convention).
    #[default]
    Grpc,
    /// OTLP as protobuf over HTTP (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

impl TraceProtocol {
    /// The spelling of the flag and of `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

impl FromStr for TraceProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" | "http" => Ok(Self::HttpProtobuf),
            other => Err(format!(
                "unknown OTLP protocol `{other}`: use grpc or http/protobuf"
            )),
        }
    }
}

/// Which spans beyond each request's own are collected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum TraceDetail {
    /// The request span and its children in the coordinator (queue, prefill chunks, decode,
    /// detokenize, stream).
    #[default]
    Requests,
    /// Also the coordinator's engine steps (linked to the requests they carry) and every worker
    /// rank's step spans, in each traced request's trace.
    Worker,
    /// Also each all-reduce inside a worker's model step.
    All,
}

impl TraceDetail {
    /// The spelling of `--collect-detailed-traces` (`requests` is the flag's absence).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Worker => "worker",
            Self::All => "all",
        }
    }
}

impl FromStr for TraceDetail {
    type Err = String;

    /// vLLM's values, comma-separated: `model`, `worker`, `all`; `requests` for none.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut detail = Self::Requests;
        for part in s.split(',').map(str::trim) {
            let this = match part {
                "requests" | "" => Self::Requests,
                "worker" => Self::Worker,
                "model" | "all" => Self::All,
                other => {
                    return Err(format!(
                        "unknown trace detail `{other}`: use worker, model or all"
                    ))
                }
            };
            detail = detail.max(this);
        }
        Ok(detail)
    }
}

/// What to export where.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The collector's OTLP endpoint; `None`: tracing off.
    pub endpoint: Option<String>,
    pub protocol: TraceProtocol,
    pub detail: TraceDetail,
    /// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: &'static str,
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
#[error("--otlp-traces-endpoint {endpoint}: {detail}")]
pub struct TelemetryError {
    pub endpoint: String,
    pub detail: String,
}

struct Installed {
    provider: SdkTracerProvider,
    config: TraceConfig,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Whether traces are being exported.
pub fn enabled() -> bool {
    INSTALLED.get().is_some()
}

/// The detail level, when traces are exported.
pub fn detail() -> Option<TraceDetail> {
    INSTALLED.get().map(|i| i.config.detail)
}

/// Starts the exporter and returns the layer that feeds it, or `None` when `config` has no
/// endpoint. Call inside the tokio runtime (the gRPC exporter's channel needs it).
pub fn layer(config: &TraceConfig) -> Result<Option<BoxedLayer>, TelemetryError> {
    let Some(endpoint) = config.endpoint.clone() else {
        return Ok(None);
    };
    let fail = |detail: String| TelemetryError {
        endpoint: endpoint.clone(),
        detail,
    };
    let exporter = match config.protocol {
        TraceProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_protocol(Protocol::Grpc)
            .build(),
        TraceProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(http_traces_url(&endpoint))
            .with_protocol(Protocol::HttpBinary)
            .build(),
    }
    .map_err(|e| fail(e.to_string()))?;
    let service_name =
        std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| config.service_name.to_string());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let tracer = provider.tracer("tpserve");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(filter_fn(|meta| {
            meta.is_span() && meta.target().starts_with("tpserve")
        }))
        .boxed();
    let _ = INSTALLED.set(Installed {
        provider,
        config: config.clone(),
    });
    Ok(Some(layer))
}

/// An HTTP endpoint without a path gets OTLP's `/v1/traces`.
fn http_traces_url(endpoint: &str) -> String {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    match rest.find('/') {
        Some(i) if rest.len() > i + 1 => endpoint.to_string(),
        _ => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
    }
}

/// Exports what is buffered and stops the exporter (before the process exits).
pub fn shutdown() {
    if let Some(installed) = INSTALLED.get() {
        let _ = installed.provider.force_flush();
        let _ = installed.provider.shutdown();
    }
}

/// The variables a spawned worker gets so that it exports to the same place with the same
/// detail; empty when tracing is off.
pub fn child_env() -> Vec<(&'static str, String)> {
    match INSTALLED.get() {
        Some(i) => vec![
            (
                "TPSERVE_OTLP_TRACES_ENDPOINT",
                i.config.endpoint.clone().unwrap_or_default(),
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                i.config.protocol.as_str().into(),
            ),
            (
                "TPSERVE_COLLECT_DETAILED_TRACES",
                i.config.detail.as_str().into(),
            ),
        ],
        None => Vec::new(),
    }
}

/// `cx` as a W3C `traceparent` value; `None` when it holds no sampled span.
pub fn traceparent(cx: &Context) -> Option<String> {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The context a W3C `traceparent` (and `tracestate`) names; the empty context when invalid.
pub fn context_from(traceparent: &str, tracestate: Option<&str>) -> Context {
    let mut carrier = HashMap::new();
    carrier.insert("traceparent".to_string(), traceparent.to_string());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_string(), state.to_string());
    }
    TraceContextPropagator::new().extract(&carrier)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn detail_levels_parse_as_vllms_comma_separated_values() {
        assert_eq!("worker".parse(), Ok(TraceDetail::Worker));
        assert_eq!("model".parse(), Ok(TraceDetail::All));
        assert_eq!("worker,all".parse(), Ok(TraceDetail::All));
        assert!("everything".parse::<TraceDetail>().is_err());
        assert_eq!("http/protobuf".parse(), Ok(TraceProtocol::HttpProtobuf));
    }

    #[test]
    fn a_traceparent_survives_the_round_trip_and_garbage_gives_no_context() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = context_from(tp, None);
        assert!(cx.span().span_context().is_valid());
        assert_eq!(traceparent(&cx).as_deref(), Some(tp));
        assert!(!context_from("nonsense", None)
            .span()
            .span_context()
            .is_valid());
    }

    #[test]
    fn http_endpoints_without_a_path_get_the_traces_path() {
        assert_eq!(http_traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(
            http_traces_url("http://c:4318/custom"),
            "http://c:4318/custom"
        );
    }
}
