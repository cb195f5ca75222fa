//! vLLM's runtime adapter endpoints, with `--enable-runtime-lora-updates`:
//! `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` reads and checks the adapter in full
//! (path, config, every tensor's name, shape and data against the base) before it answers 200,
//! unlike vLLM, which answers 200 for a missing path; `POST /v1/unload_lora_adapter
//! {"lora_name"}` stops new requests for it at once (404 from then on) while requests already
//! accepted finish with it. Answers are vLLM's plain-text success lines; failures are OpenAI
//! error JSON naming `lora_name` or `lora_path`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use serde::Deserialize;

use super::error::{from_json, ApiError, ApiJson, RequestBody};
use super::ApiState;
use crate::adapters::{AdapterRegistry, LoraError};

/// vLLM's body; its other fields (`load_inplace`) are accepted and have no effect: a load
/// always reads the files.
#[derive(Debug, Deserialize)]
pub struct LoadLoraRequest {
    lora_name: String,
    lora_path: PathBuf,
}

/// vLLM's body; `lora_int_id` is accepted and ignored: the name decides.
#[derive(Debug, Deserialize)]
pub struct UnloadLoraRequest {
    lora_name: String,
}

impl RequestBody for LoadLoraRequest {
    fn from_json(value: &serde_json::Value) -> Result<Self, ApiError> {
        from_json(value)
    }
}

impl RequestBody for UnloadLoraRequest {
    fn from_json(value: &serde_json::Value) -> Result<Self, ApiError> {
        from_json(value)
    }
}

fn registry(state: &ApiState) -> Result<Arc<AdapterRegistry>, ApiError> {
    match &state.model.adapters {
        Some(r) if r.runtime_updates => Ok(r.clone()),
        _ => Err(LoraError::RuntimeUpdatesOff.into()),
    }
}

pub async fn load_lora_adapter(
    State(state): State<Arc<ApiState>>,
    ApiJson(request): ApiJson<LoadLoraRequest>,
) -> Result<String, ApiError> {
    let registry = registry(&state)?;
    let name = request.lora_name.clone();
    // Reading and checking the tensors is file I/O: off the async workers.
    let loaded =
        tokio::task::spawn_blocking(move || registry.load(&request.lora_name, &request.lora_path))
            .await
            .map_err(|e| ApiError::Internal {
                message: format!("loading the adapter failed: {e}"),
            })??;
    tracing::info!(name = %loaded.name, path = %loaded.path.display(), rank = loaded.rank, "LoRA adapter loaded");
    Ok(format!(
        "Success: LoRA adapter '{name}' added successfully."
    ))
}

pub async fn unload_lora_adapter(
    State(state): State<Arc<ApiState>>,
    ApiJson(request): ApiJson<UnloadLoraRequest>,
) -> Result<String, ApiError> {
    let registry = registry(&state)?;
    let removed = registry.unload(&request.lora_name)?;
    tracing::info!(name = %removed.name, "LoRA adapter unloaded");
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        request.lora_name
    ))
}
