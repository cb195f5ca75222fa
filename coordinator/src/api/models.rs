//! GET `/v1/models` and `/v1/models/{model}`: the served model's card (vLLM's fields). Adapters
//! will be listed here too once they exist, with `parent` naming the base model.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;

use super::error::ApiError;
use super::protocol::{ModelCard, ModelList};
use super::ApiState;
use crate::served_model::ServedModel;

fn card(model: &ServedModel) -> ModelCard {
    ModelCard {
        id: model.name.clone(),
        object: "model",
        created: model.created,
        owned_by: "tpserve",
        root: model.name.clone(),
        parent: None,
        max_model_len: model.max_model_len,
    }
}

pub async fn list_models(State(state): State<Arc<ApiState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&state.model)],
    })
}

pub async fn retrieve_model(
    State(state): State<Arc<ApiState>>,
    Path(model): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    if model != state.model.name {
        return Err(ApiError::ModelNotFound { model });
    }
    Ok(Json(card(&state.model)))
}
