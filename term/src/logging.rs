//! The log subscriber both binaries install: lines on standard error, filtered by `RUST_LOG`
//! (else the binary's default), as text (coloured only when [`crate::color::enabled`] says so)
//! or as one JSON object per line (`--log-format json`), and written whole above any progress
//! bars being drawn, so a log line never tears a bar.
//!
//! Other layers (the OpenTelemetry exporter) join the same subscriber with their own filters, so
//! `RUST_LOG` decides what is logged and not what is traced.

use std::io::Write;
use std::str::FromStr;
use std::sync::OnceLock;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::color;
use crate::progress::write_stderr;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `2026-12-01T10:00:00Z  INFO request{request_id=..}: tpserve: message key=value`.
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON: `timestamp`, `level`, `fields`,
    /// `target`, and the current `span` and `spans` with their fields, e.g. `request_id`).
    Json,
}

impl LogFormat {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format `{other}`: use text or json")),
        }
    }
}

/// A layer another module adds to the subscriber (with its own filter).
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format [`init_with`] installed (text before it ran).
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// The variable a spawned worker gets so that it logs in the same format as this process.
pub fn child_env() -> (&'static str, &'static str) {
    ("TPSERVE_LOG_FORMAT", format().as_str())
}

/// Installs the global subscriber with text lines and no other layer. Call
/// [`crate::progress::init`] first so log lines know about the bars.
pub fn init(default_filter: &str) {
    init_with(default_filter, LogFormat::Text, Vec::new());
}

/// Installs the global subscriber: log lines in `format`, filtered by `RUST_LOG` or
/// `default_filter`, plus `layers` (each filtered by itself). Does nothing when a subscriber is
/// installed already (a second engine in one Python process).
pub fn init_with(default_filter: &str, format: LogFormat, mut layers: Vec<BoxedLayer>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let lines: BoxedLayer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(color::enabled())
            .with_writer(StderrLines)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(StderrLines)
            .with_filter(filter)
            .boxed(),
    };
    layers.insert(0, lines);
    if tracing_subscriber::registry()
        .with(layers)
        .try_init()
        .is_ok()
    {
        let _ = FORMAT.set(format);
    }
}

/// Hands the subscriber one buffer per event, written to standard error in one piece when the
/// event is formatted.
pub struct StderrLines;

impl<'a> MakeWriter<'a> for StderrLines {
    type Writer = EventBuffer;

    fn make_writer(&'a self) -> EventBuffer {
        EventBuffer(Vec::with_capacity(256))
    }
}

/// One formatted event; written on drop.
pub struct EventBuffer(Vec<u8>);

impl Write for EventBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            write_stderr(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_formats_parse_by_their_flag_names_only() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("JSON ".parse::<LogFormat>().is_err());
        assert_eq!(LogFormat::Json.as_str(), "json");
    }
}
