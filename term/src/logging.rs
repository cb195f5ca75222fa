//! The log subscriber both binaries install: lines on standard error, filtered by `RUST_LOG`
//! (else the binary's default), coloured only when [`crate::color::enabled`] says so, and written
//! whole above any progress bars being drawn, so a log line never tears a bar.

use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;

use crate::color;
use crate::progress::write_stderr;

/// Installs the global subscriber. Call [`crate::progress::init`] first so log lines know about
/// the bars.
pub fn init(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_ansi(color::enabled())
        .with_writer(StderrLines)
        .init();
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
