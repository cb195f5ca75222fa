//! Log set-up shared by the worker binary and the worker's tools: `tpserve_term`'s subscriber
//! (lines on stderr, filtered by `RUST_LOG`, else `default_filter`; colour only on a terminal).

/// Installs the global subscriber.
pub fn init_logging(default_filter: &str) {
    tpserve_term::logging::init(default_filter);
}
