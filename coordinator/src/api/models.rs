//! GET `/v1/models` and `/v1/models/{model}`: a card (vLLM's fields) per name the model is
//! served under, `root` naming the primary one, then one per LoRA adapter, with `root` its
//! path and `parent` the base model's name (as vLLM lists them).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;

use super::error::ApiError;
use super::protocol::{ModelCard, ModelList};
use super::ApiState;
use crate::adapters::AdapterInfo;
use crate::served_model::ServedModel;

fn card(model: &ServedModel, name: &str) -> ModelCard {
    ModelCard {
        id: name.to_string(),
        object: "model",
        created: model.created,
        owned_by: "tpserve",
        root: model.name.clone(),
        parent: None,
        max_model_len: model.max_model_len,
        quantization: model.quantization.clone(),
    }
}

fn adapter_card(model: &ServedModel, adapter: &AdapterInfo) -> ModelCard {
    ModelCard {
        id: adapter.name.clone(),
        object: "model",
        created: adapter.created,
        owned_by: "tpserve",
        root: adapter.path.display().to_string(),
        parent: Some(model.name.clone()),
        max_model_len: model.max_model_len,
        quantization: model.quantization.clone(),
    }
}

pub async fn list_models(State(state): State<Arc<ApiState>>) -> Json<ModelList> {
    let model = &state.model;
    let adapters = model
        .adapters
        .as_ref()
        .map(|a| a.list())
        .unwrap_or_default();
    Json(ModelList {
        object: "list",
        data: model
            .names()
            .map(|name| card(model, name))
            .chain(adapters.iter().map(|a| adapter_card(model, a)))
            .collect(),
    })
}

pub async fn retrieve_model(
    State(state): State<Arc<ApiState>>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    if let Some(adapter) = state.model.adapter(&model) {
        return Ok(Json(adapter_card(&state.model, &adapter)));
    }
    if !state.model.serves(&model) {
        return Err(ApiError::ModelNotFound { model });
    }
    Ok(Json(card(&state.model, &model)))
}
