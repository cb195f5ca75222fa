//! POST `/v1/embeddings` on a server that embeds (`--task embed`): each input (a string, a list
//! of strings, token ids or lists of token ids) runs as one prefill-only sequence through the
//! same scheduler as generation (continuous batching, chunked prefill, prefix caching for
//! last-token pooling); the workers return its pooled hidden state, and the answer is
//! normalized here (unless the pooler says not to) after any Matryoshka truncation.
//!
//! Every input is checked before any is submitted, so a bad one refuses the request without
//! starting the rest; a client that goes away drops the streams, which aborts the sequences.
//! Costs per request: one tokenization per text input and one engine round trip per input; the
//! vectors are `hidden_size` floats each.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use futures::StreamExt;

use super::completions::{parse_prompts, PromptInput};
use super::error::{ApiError, ApiJson};
use super::gateway::{place_request, Ask, Caller, Tokens};
use super::protocol::{
    EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage, EmbeddingVector,
};
use super::sequences::{submit_all, ChoiceStream};
use super::tokenize::encode;
use super::validate::check_token_ids;
use super::{new_id, unix_now, ApiState, RequestId};
use crate::engine::{GenerateEvent, GenerateRequest, Sampling};
use crate::task::{Matryoshka, PoolerConfig};

/// vLLM's words for a route the served task does not offer.
pub fn not_supported(api: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("The model does not support {api} API"),
        param: None,
    }
}

pub async fn embeddings(
    State(state): State<Arc<ApiState>>,
    caller: Option<Extension<Caller>>,
    request_id: Option<Extension<RequestId>>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<EmbeddingRequest>,
) -> Result<Response, ApiError> {
    let model = &state.model;
    let Some(pooler) = model.task.pooler() else {
        return Err(not_supported("Embeddings"));
    };
    let ask = Ask {
        model: request.model.as_deref(),
        user: request.user.as_deref(),
        headers: &headers,
    };
    let placement = place_request(model, caller.as_deref(), ask)?;
    let dimensions = check_dimensions(
        request.dimensions,
        pooler,
        model.hidden_size,
        &placement.model,
    )?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, not {other:?}"),
            ))
        }
    };
    let limit = placement.max_model_len as usize;
    let keep = match request.truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(limit),
        Some(k) if k >= 1 && k as usize <= limit => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid(
                "truncate_prompt_tokens",
                format!(
                    "`truncate_prompt_tokens` must be -1 (max-model-len) or between 1 and the \
                     maximum context length {limit}, not {k}"
                ),
            ))
        }
    };
    if matches!(&request.input, Some(serde_json::Value::Array(items)) if items.is_empty()) {
        return Err(ApiError::invalid(
            "input",
            "`input` must not be an empty list",
        ));
    }
    let inputs = parse_prompts(request.input.as_ref(), "input")?;
    let add_special = request.add_special_tokens.unwrap_or(true);
    let mut requests = Vec::with_capacity(inputs.len());
    let mut prompt_tokens = 0u64;
    for (index, input) in inputs.into_iter().enumerate() {
        let mut ids = match input {
            PromptInput::Text(text) if text.is_empty() => {
                return Err(ApiError::invalid(
                    "input",
                    format!("`input[{index}]` is an empty string: every input needs text"),
                ))
            }
            PromptInput::Text(text) => {
                state.limits.check_prompt_bytes(&text, "input")?;
                if state.log_prompts {
                    tracing::info!(input = %text, index, "embedding input (--log-prompts)");
                }
                encode(model, text, add_special).await?
            }
            PromptInput::Tokens(ids) => {
                check_token_ids(&ids, &model.tokenizer, "input")?;
                ids
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid(
                "input",
                format!("`input[{index}]` has no tokens"),
            ));
        }
        if let Some(k) = keep {
            let drop = ids.len().saturating_sub(k);
            ids.drain(..drop);
        }
        if ids.len() > limit {
            return Err(ApiError::ContextLengthExceeded {
                message: format!(
                    "This model's maximum context length is {limit} tokens. However, input \
                     {index} has {} tokens. Please reduce the length of the input (or set \
                     `truncate_prompt_tokens`).",
                    ids.len()
                ),
                param: "input".into(),
            });
        }
        prompt_tokens += ids.len() as u64;
        requests.push((index as u32, embed_request(ids, pooler, &placement)));
    }
    let sequences = submit_all(&state.engine, requests).await?;
    let collected = futures::future::try_join_all(sequences.into_iter().map(collect_one)).await?;
    let cached: u64 = collected.iter().map(|c| c.cached_tokens).sum();
    if let Some(ticket) = &placement.ticket {
        ticket.complete(Tokens {
            prompt: prompt_tokens,
            cached,
            completion: 0,
        });
    }
    let mut data: Vec<EmbeddingData> = collected
        .into_iter()
        .map(|c| {
            let vector = finish_vector(c.values, dimensions, pooler.normalize);
            EmbeddingData {
                index: c.index,
                object: "embedding".into(),
                embedding: if base64 {
                    EmbeddingVector::Base64(encode_base64(&vector))
                } else {
                    EmbeddingVector::Float(vector)
                },
            }
        })
        .collect();
    data.sort_by_key(|d| d.index);
    Ok(axum::Json(EmbeddingResponse {
        id: new_id("embd", request_id.as_deref()),
        object: "list".into(),
        created: unix_now(),
        model: placement.model,
        data,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    })
    .into_response())
}

/// The engine request of one input: prefill only, pooled as the server's pooler says.
fn embed_request(
    ids: Vec<u32>,
    pooler: &PoolerConfig,
    placement: &super::gateway::Placement,
) -> GenerateRequest {
    let mut request = GenerateRequest::fixed_length_greedy(ids, 1);
    request.sampling = Sampling {
        temperature: 0.0,
        ..Sampling::default()
    };
    request.extras = Arc::new(crate::engine::SamplingExtras {
        pooling: Some(pooler.pooling_type),
        ..Default::default()
    });
    request.share = placement.share;
    request.cache_salt = placement.cache_salt;
    request.adapter = placement.adapter.clone();
    request
}

/// `dimensions` as vLLM checks it: only for a model that declares Matryoshka truncation, and
/// only to a size it declares (any from 1 to the hidden size with `is_matryoshka`).
fn check_dimensions(
    dimensions: Option<i64>,
    pooler: &PoolerConfig,
    hidden: usize,
    model: &str,
) -> Result<Option<usize>, ApiError> {
    let Some(d) = dimensions else {
        return Ok(None);
    };
    let bad = |message: String| Err(ApiError::invalid("dimensions", message));
    if d < 1 {
        return bad(format!("`dimensions` must be greater than 0, not {d}"));
    }
    let d = d as usize;
    match &pooler.matryoshka {
        Matryoshka::No => bad(format!(
            "Model \"{model}\" does not support matryoshka representation, changing output \
             dimensions will lead to poor results."
        )),
        Matryoshka::Only(sizes) if !sizes.contains(&d) => bad(format!(
            "Model \"{model}\" only supports {sizes:?} matryoshka dimensions, using other output \
             dimensions will lead to poor results."
        )),
        _ if d > hidden => bad(format!(
            "`dimensions` {d} is more than the model's {hidden} dimensions"
        )),
        _ => Ok(Some(d)),
    }
}

/// Truncates to `dimensions` (Matryoshka), then L2-normalizes when asked (a zero vector stays
/// zero).
pub fn finish_vector(mut v: Vec<f32>, dimensions: Option<usize>, normalize: bool) -> Vec<f32> {
    if let Some(d) = dimensions {
        v.truncate(d);
    }
    if normalize {
        let norm = v
            .iter()
            .map(|x| f64::from(*x) * f64::from(*x))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            let inv = (1.0 / norm) as f32;
            v.iter_mut().for_each(|x| *x *= inv);
        }
    }
    v
}

/// Base64 of the vector's little-endian f32 bytes (OpenAI's `encoding_format: base64`).
fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// One input's pooled vector.
struct Pooled {
    index: u32,
    values: Vec<f32>,
    cached_tokens: u64,
}

async fn collect_one(sequence: ChoiceStream) -> Result<Pooled, ApiError> {
    let ChoiceStream { index, mut stream } = sequence;
    while let Some(event) = stream.next().await {
        match event {
            GenerateEvent::Finished {
                embedding: Some(values),
                cached_tokens,
                ..
            } => {
                return Ok(Pooled {
                    index,
                    values,
                    cached_tokens: u64::from(cached_tokens),
                })
            }
            GenerateEvent::Error(e) => return Err(e.into()),
            GenerateEvent::Delta { .. } | GenerateEvent::Finished { .. } => {}
        }
    }
    Err(ApiError::Internal {
        message: "an embedding sequence ended without its vector".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_comes_before_normalization() {
        let v = finish_vector(vec![3.0, 4.0, 12.0], Some(2), true);
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(finish_vector(vec![3.0, 4.0], None, false), vec![3.0, 4.0]);
        assert_eq!(finish_vector(vec![0.0, 0.0], None, true), vec![0.0, 0.0]);
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(encode_base64(&[1.0]), "AACAPw==");
    }

    #[test]
    fn dimensions_need_a_matryoshka_model() {
        let mut pooler = PoolerConfig {
            pooling_type: crate::task::PoolingType::Last,
            normalize: true,
            matryoshka: Matryoshka::No,
        };
        assert_eq!(check_dimensions(None, &pooler, 8, "m").unwrap(), None);
        let e = check_dimensions(Some(4), &pooler, 8, "m").unwrap_err();
        assert!(e.to_string().contains("does not support matryoshka"), "{e}");
        pooler.matryoshka = Matryoshka::Any;
        assert_eq!(check_dimensions(Some(4), &pooler, 8, "m").unwrap(), Some(4));
        assert!(check_dimensions(Some(9), &pooler, 8, "m").is_err());
        assert!(check_dimensions(Some(0), &pooler, 8, "m").is_err());
        pooler.matryoshka = Matryoshka::Only(vec![2, 4]);
        assert!(check_dimensions(Some(3), &pooler, 8, "m").is_err());
        assert_eq!(check_dimensions(Some(2), &pooler, 8, "m").unwrap(), Some(2));
    }
}
