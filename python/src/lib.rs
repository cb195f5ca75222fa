//! `tpserve._tpserve`: the native half of the Python package. It drives the coordinator's engine
//! in-process (the same `launch` as `tpserve generate`; the workers stay separate processes) and
//! leaves the vLLM-shaped API (`LLM`, `SamplingParams`, `RequestOutput`, `AsyncLLM`) to the
//! Python modules in `python/tpserve/`. Request checks and messages are the HTTP API's own.

mod batch;
mod blocking;
mod engine;
mod errors;
mod requests;

use pyo3::prelude::*;

/// The module `tpserve._tpserve`.
#[pymodule]
fn _tpserve(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    m.add_class::<batch::Batch>()?;
    m.add_function(wrap_pyfunction!(requests::check_sampling, m)?)?;
    m.add_function(wrap_pyfunction!(engine::engine_flags, m)?)?;
    Ok(())
}
