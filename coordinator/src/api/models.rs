//! GET `/v1/models` and `/v1/models/{model}`: a card (vLLM's fields) per name the model is
//! served under, `root` naming the primary one. Adapters will be listed here too once they
//! exist, with `parent` naming the base model.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;

use super::error::ApiError;
use super::protocol::{ModelCard, ModelList};
use super::ApiState;
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

pub async fn list_models(State(state): State<Arc<ApiState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .model
            .names()
            .map(|name| card(&state.model, name))
            .collect(),
    })
}

pub async fn retrieve_model(
    State(state): State<Arc<ApiState>>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    if !state.model.serves(&model) {
        return Err(ApiError::ModelNotFound { model });
    }
    Ok(Json(card(&state.model, &model)))
}
