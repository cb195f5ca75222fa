//! The one place where the coordinator's error types become Python exceptions. Messages are the
//! CLI's (`tpserve generate` prints `error: ` and the same text) and the HTTP API's (a 400's
//! `message` is a `ValueError`'s text).

use std::error::Error;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;
use tpserve_coordinator::api::ApiError;
use tpserve_coordinator::error::StartError;

/// The error chain on one line, as the CLI prints it after `error: `.
fn one_line(e: &(dyn Error + 'static)) -> String {
    let mut chain = vec![e.to_string()];
    let mut source = e.source();
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    tpserve_term::errors::one_line(chain)
}

/// Start-up failures: what the caller asked for is wrong (`ValueError`: flags, the model) or the
/// machinery failed (`RuntimeError`: a worker that did not start or failed a phase).
pub fn start(e: StartError) -> PyErr {
    let message = one_line(&e);
    match e {
        StartError::Config { .. } | StartError::Model(_) => PyValueError::new_err(message),
        StartError::Spawn { .. } | StartError::Connect { .. } | StartError::Worker { .. } => {
            PyRuntimeError::new_err(message)
        }
    }
}

/// A request the API would answer with a 4xx.
pub fn request(e: ApiError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// The engine was shut down (`shutdown()`, a context manager's exit) and then used again.
pub fn shut_down() -> PyErr {
    PyRuntimeError::new_err("the engine has been shut down")
}
