//! Log set-up shared by the worker binary and the worker's tools: `tpserve_term`'s subscriber
//! (lines on stderr as text or JSON, filtered by `RUST_LOG`, else `default_filter`; colour only
//! on a terminal).

use tpserve_term::logging::LogFormat;

/// Installs the global subscriber.
pub fn init_logging(default_filter: &str, format: LogFormat) {
    tpserve_term::logging::init_with(default_filter, format, Vec::new());
}
