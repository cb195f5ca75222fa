//! OpenTelemetry traces end to end: the real server at tensor-parallel size 3 (three CPU worker
//! processes) exports over OTLP/gRPC to a real OTLP receiver (a tonic server built on
//! `opentelemetry-proto`), and one trace, continued from the client's `traceparent`, holds the
//! request's spans from the coordinator and from every worker rank with the right parents and
//! attributes; the HTTP/protobuf transport is checked the same way against an HTTP receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use serde_json::json;
use tpserve_e2e::Server;

/// A span as received, with the `service.name` of the process that sent it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    span: Span,
}

impl Received {
    fn attr(&self, key: &str) -> Option<String> {
        let kv = self.span.attributes.iter().find(|kv| kv.key == key)?;
        Some(match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => s.clone(),
            AnyValue::IntValue(i) => i.to_string(),
            AnyValue::BoolValue(b) => b.to_string(),
            AnyValue::DoubleValue(d) => d.to_string(),
            other => format!("{other:?}"),
        })
    }
}

/// Every span any exporter sent.
#[derive(Debug, Clone, Default)]
struct Collected(Arc<Mutex<Vec<Received>>>);

impl Collected {
    fn add(&self, request: ExportTraceServiceRequest) {
        let mut all = self.0.lock().unwrap();
        for resource in request.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource.scope_spans {
                for span in scope.spans {
                    all.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
    }

    fn spans(&self) -> Vec<Received> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (bounded, as a guard against a hang; no timing is asserted) until `done` holds.
    async fn wait_for(&self, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        for _ in 0..300 {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.spans()
    }
}

#[tonic::async_trait]
impl TraceService for Collected {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// An OTLP/gRPC receiver on a free port; returns its endpoint.
async fn grpc_receiver(collected: Collected) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collected))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// An OTLP/HTTP (protobuf) receiver on a free port; returns its base URL.
async fn http_receiver(collected: Collected) -> String {
    use prost::Message;
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let collected = collected.clone();
            async move {
                collected.add(ExportTraceServiceRequest::decode(body).expect("OTLP protobuf"));
                ExportTraceServiceResponse {
                    partial_success: None,
                }
                .encode_to_vec()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traced_server(endpoint: &str, extra: &[&str]) -> Server {
    // The exporters' batches go out every 100 ms rather than every 5 s (workers inherit it).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    let mut args = vec![
        "--max-model-len",
        "512",
        "--max-num-batched-tokens",
        "32",
        "--otlp-traces-endpoint",
        endpoint,
    ];
    args.extend_from_slice(extra);
    Server::smollm2(&args).await
}

/// A chat request of about 60 prompt tokens (two prefill chunks of at most 32), continuing the
/// client's trace.
async fn traced_request(s: &Server) {
    let text = "Tell me, in one short sentence, why the sky over the sea looks blue on a clear \
                summer afternoon, and why sunsets over the same sea look red and orange instead.";
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .header("X-Request-Id", "traced-1")
        .json(
            &json!({"model": "smollm2", "messages": [{"role": "user", "content": text}],
                      "max_tokens": 4, "ignore_eos": true, "temperature": 0}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn one_trace_holds_the_request_across_the_coordinator_and_every_worker_rank() {
    let collected = Collected::default();
    let endpoint = grpc_receiver(collected.clone()).await;
    let s = traced_server(
        &endpoint,
        &[
            "--tensor-parallel-size",
            "3",
            "--collect-detailed-traces",
            "all",
        ],
    )
    .await;
    traced_request(&s).await;
    let in_trace = |spans: &[Received]| -> Vec<Received> {
        spans
            .iter()
            .filter(|r| hex(&r.span.trace_id) == TRACE_ID)
            .cloned()
            .collect()
    };
    let spans = collected
        .wait_for(|all| {
            let t = in_trace(all);
            let ranks = t
                .iter()
                .filter(|r| r.span.name == "worker_step")
                .filter_map(|r| r.attr("tpserve.rank"))
                .collect::<std::collections::HashSet<_>>();
            ranks.len() == 3 && t.iter().any(|r| r.span.name == "request")
        })
        .await;
    s.stop().await;
    let trace = in_trace(&spans);
    let names: Vec<&str> = trace.iter().map(|r| r.span.name.as_str()).collect();
    let by_id: HashMap<String, &Received> =
        trace.iter().map(|r| (hex(&r.span.span_id), r)).collect();
    let one = |name: &str| -> &Received {
        let found: Vec<_> = trace.iter().filter(|r| r.span.name == name).collect();
        assert_eq!(found.len(), 1, "one `{name}` span in {names:?}");
        found[0]
    };
    let parent_name = |r: &Received| -> String {
        by_id
            .get(&hex(&r.span.parent_span_id))
            .map_or_else(|| "<outside>".to_string(), |p| p.span.name.clone())
    };

    // The request span: a child of the client's span, from the coordinator, with its figures.
    let request = one("request");
    assert_eq!(hex(&request.span.parent_span_id), CLIENT_SPAN);
    assert_eq!(request.service, "tpserve");
    assert_eq!(
        request.attr("gen_ai.request.model").as_deref(),
        Some("smollm2")
    );
    assert_eq!(
        request.attr("gen_ai.request.id").as_deref(),
        Some("traced-1")
    );
    assert_eq!(
        request.attr("gen_ai.usage.completion_tokens").as_deref(),
        Some("4")
    );
    assert_eq!(
        request.attr("gen_ai.response.finish_reasons").as_deref(),
        Some("length")
    );
    let prompt_tokens: usize = request
        .attr("gen_ai.usage.prompt_tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        prompt_tokens > 32,
        "two prefill chunks: {prompt_tokens} tokens"
    );

    // Its children in the coordinator.
    for name in ["queue", "decode"] {
        assert_eq!(parent_name(one(name)), "request");
    }
    let chunks: Vec<_> = trace
        .iter()
        .filter(|r| r.span.name == "prefill_chunk")
        .collect();
    assert_eq!(chunks.len(), prompt_tokens.div_ceil(32), "{names:?}");
    let chunk_tokens: usize = chunks
        .iter()
        .map(|c| c.attr("tokens").unwrap().parse::<usize>().unwrap())
        .sum();
    assert_eq!(chunk_tokens, prompt_tokens);
    assert!(chunks.iter().all(|c| parent_name(c) == "request"));
    let detokenize = trace.iter().filter(|r| r.span.name == "detokenize").count();
    assert_eq!(detokenize, 4, "one per token: {names:?}");

    // Every rank's step spans, under the prefill chunk or decode span of that step.
    for rank in 0..3 {
        let steps: Vec<_> = trace
            .iter()
            .filter(|r| r.span.name == "worker_step")
            .filter(|r| r.attr("tpserve.rank") == Some(rank.to_string()))
            .collect();
        // Each chunk, then the decode steps (the last prefill chunk samples the first token).
        assert!(
            steps.len() >= chunks.len() + 3,
            "rank {rank}: {} steps",
            steps.len()
        );
        for step in &steps {
            assert_eq!(step.service, "tpserve-worker");
            assert!(
                ["prefill_chunk", "decode"].contains(&parent_name(step).as_str()),
                "rank {rank}'s step under {}",
                parent_name(step)
            );
        }
        let children = |name: &str| {
            trace
                .iter()
                .filter(|r| r.span.name == name && r.attr("tpserve.rank") == Some(rank.to_string()))
                .map(parent_name)
                .collect::<Vec<_>>()
        };
        let model_steps = children("model_step");
        assert_eq!(model_steps.len(), steps.len());
        assert!(model_steps.iter().all(|p| p == "worker_step"));
        let all_reduces = children("all_reduce");
        assert!(
            all_reduces.len() >= 2 * steps.len(),
            "two per layer per step"
        );
        assert!(all_reduces.iter().all(|p| p == "worker_step"));
        assert!(children("sampling").iter().all(|p| p == "worker_step"));
    }
    // Rank 0 samples every step's tokens.
    assert!(trace
        .iter()
        .any(|r| r.span.name == "sampling" && r.attr("tpserve.rank").as_deref() == Some("0")));

    // The engine's step spans are their own traces, linked to the request.
    let request_id = hex(&request.span.span_id);
    let linked = spans
        .iter()
        .filter(|r| r.span.name == "engine_step")
        .filter(|r| r.span.links.iter().any(|l| hex(&l.span_id) == request_id))
        .count();
    assert!(
        linked >= chunks.len() + 3,
        "{linked} engine steps link to the request"
    );

    // Nothing from tonic, h2 or hyper.
    let ours = [
        "request",
        "queue",
        "prefill_chunk",
        "decode",
        "detokenize",
        "stream",
        "engine_step",
        "worker_step",
        "model_step",
        "sampling",
        "all_reduce",
    ];
    for r in &spans {
        assert!(
            ours.contains(&r.span.name.as_str()),
            "a foreign span: {}",
            r.span.name
        );
    }
}

#[tokio::test]
async fn traces_also_go_out_over_http_protobuf() {
    let collected = Collected::default();
    let endpoint = http_receiver(collected.clone()).await;
    let s = traced_server(&endpoint, &["--otlp-traces-protocol", "http/protobuf"]).await;
    traced_request(&s).await;
    let spans = collected
        .wait_for(|all| all.iter().any(|r| r.span.name == "request"))
        .await;
    s.stop().await;
    let request = spans
        .iter()
        .find(|r| r.span.name == "request")
        .expect("the request span came over HTTP");
    assert_eq!(hex(&request.span.trace_id), TRACE_ID);
    // Without detailed traces, no step spans.
    assert!(spans
        .iter()
        .all(|r| r.span.name != "worker_step" && r.span.name != "engine_step"));
    assert!(spans.iter().any(|r| r.span.name == "prefill_chunk"));
}
