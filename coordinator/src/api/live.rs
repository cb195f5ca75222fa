//! GET `/live`: the liveness probe. 200 with an empty body while the engine loop turns; 503
//! (OpenAI error JSON) once it has not turned for `--engine-stall-timeout`, with the code
//! `workers_stalled` when it is stuck waiting for a step from the workers (a hung collective, a
//! stopped worker: restarting the workers is what helps) or `engine_stalled` otherwise.
//!
//! `/health` (readiness) follows the workers; `/live` does not, so a worker that takes minutes to
//! reload turns the pod unready without getting a healthy coordinator restarted. A probe costs two
//! atomic loads.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::StatusCode;

use super::error::ApiError;
use super::ApiState;
use crate::engine::LiveStatus;

pub async fn live(State(state): State<Arc<ApiState>>) -> Result<StatusCode, ApiError> {
    let liveness = state.engine.liveness();
    let timeout = liveness.stall_timeout().as_secs_f64();
    match liveness.status(Instant::now()) {
        LiveStatus::Alive { .. } => Ok(StatusCode::OK),
        LiveStatus::WorkersStalled { since_beat, step } => Err(ApiError::Stalled {
            on_workers: true,
            detail: format!(
                "The engine loop has waited {:.0} s for step {step} from the workers \
                 (--engine-stall-timeout {timeout} s): a hung collective or a stopped worker",
                since_beat.as_secs_f64()
            ),
        }),
        LiveStatus::EngineStalled { since_beat } => Err(ApiError::Stalled {
            on_workers: false,
            detail: format!(
                "The engine loop has not turned for {:.0} s (--engine-stall-timeout {timeout} s)",
                since_beat.as_secs_f64()
            ),
        }),
    }
}
