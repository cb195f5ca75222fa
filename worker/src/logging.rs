//! Log set-up shared by the worker binary and the worker's tools: lines on stderr, filtered by
//! `RUST_LOG` (else `default_filter`).

/// Installs the global subscriber.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
}
