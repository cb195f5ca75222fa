//! What tpserve's binaries show a person, in one place so that both binaries look alike:
//! progress (bars on a terminal, plain periodic lines in a log, events for the coordinator that
//! spawned a worker), whether to colour, the log subscriber (whose lines never tear a bar), and
//! numbers, durations, plurals and error chains written for reading.

pub mod color;
pub mod errors;
pub mod human;
pub mod logging;
pub mod progress;
pub mod telemetry;
