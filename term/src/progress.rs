//! Progress of the operations that take a while (loading weights, compiling CUDA kernels,
//! capturing CUDA graphs, benchmark runs), shown the way the output is read. The mode is chosen
//! once per process ([`init`]):
//! - `bars`: indicatif bars on standard error, drawn only once an operation has run for
//!   [`SHOW_AFTER`], so quick ones leave no trace; log lines written meanwhile go above the bars
//!   ([`write_stderr`]) and a bar is cleared when its operation ends (the operation's own log
//!   line says how it went).
//! - `lines`: a plain log line every [`LINE_PERIOD`] while an operation runs, and one when it
//!   ends if any was written (logs, CI, `kubectl logs`).
//! - `events`: one `TPSERVE_PROGRESS {json}` line on standard output per change, at most every
//!   [`EVENT_PERIOD`], for the coordinator that spawned this worker; it draws them with
//!   [`Remote`] in its own mode, under the worker's rank.
//! - `off`.
//!
//! `auto` is `bars` on a terminal and `lines` elsewhere. A [`Task`] costs a lock and a clock read
//! per update; nothing here runs in a step loop.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::{color, human};

/// How long an operation runs before its bar is drawn.
pub const SHOW_AFTER: Duration = Duration::from_millis(500);
/// How often a running operation writes a line in `lines` mode.
pub const LINE_PERIOD: Duration = Duration::from_secs(5);
/// How often a running operation writes an event in `events` mode.
pub const EVENT_PERIOD: Duration = Duration::from_millis(200);
/// What starts an event line on standard output.
pub const EVENT_PREFIX: &str = "TPSERVE_PROGRESS ";

/// How progress is shown (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Bars,
    Lines,
    Events,
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "bars" => Ok(Mode::Bars),
            "lines" => Ok(Mode::Lines),
            "events" => Ok(Mode::Events),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "unknown progress mode {other:?} (auto, bars, lines, events, off)"
            )),
        }
    }
}

/// What a task counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// Bytes: shown in binary units with a rate.
    Bytes,
    /// Things, named by their plural ("tensors", "requests").
    Items(String),
}

impl Unit {
    /// Things named `plural`.
    pub fn items(plural: &str) -> Self {
        Unit::Items(plural.to_string())
    }

    fn name(&self) -> &str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Items(plural) => plural,
        }
    }

    fn from_name(name: &str) -> Self {
        match name {
            "bytes" => Unit::Bytes,
            plural => Unit::items(plural),
        }
    }
}

struct Global {
    mode: Mode,
    /// The bars being drawn (`bars` mode only).
    multi: Option<MultiProgress>,
    next_id: AtomicU64,
}

static GLOBAL: OnceLock<Global> = OnceLock::new();

impl Global {
    fn new(mode: Mode) -> Self {
        let mode = match mode {
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Bars,
            Mode::Auto => Mode::Lines,
            m => m,
        };
        Self {
            mode,
            multi: (mode == Mode::Bars)
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            next_id: AtomicU64::new(1),
        }
    }
}

fn global() -> &'static Global {
    GLOBAL.get_or_init(|| Global::new(Mode::Auto))
}

/// Sets this process's mode (once; later calls change nothing) and returns it, `auto` resolved.
pub fn init(mode: Mode) -> Mode {
    GLOBAL.get_or_init(|| Global::new(mode)).mode
}

/// This process's mode, `auto` resolved.
pub fn mode() -> Mode {
    global().mode
}

/// Writes whole lines to standard error, above the bars when some are drawn.
pub fn write_stderr(bytes: &[u8]) {
    let write = || {
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(bytes);
        let _ = err.flush();
    };
    match GLOBAL.get().and_then(|g| g.multi.as_ref()) {
        Some(multi) => multi.suspend(write),
        None => write(),
    }
}

/// One operation's progress. Clones share it; it ends at [`Task::finish`] or when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Task {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    label: String,
    unit: Unit,
    total: u64,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    pos: u64,
    message: String,
    bar: Option<ProgressBar>,
    /// When the last line or event was written.
    last_report: Option<Instant>,
    /// Whether a periodic line was written (`lines` mode).
    reported: bool,
    done: bool,
}

/// The wire form of an update (`events` mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Event {
    id: u64,
    label: String,
    unit: String,
    pos: u64,
    total: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    message: String,
    #[serde(default)]
    done: bool,
}

impl Task {
    /// Starts an operation of `total` `unit`s.
    pub fn new(label: impl Into<String>, total: u64, unit: Unit) -> Self {
        let task = Task {
            inner: Arc::new(Inner {
                id: global().next_id.fetch_add(1, Ordering::Relaxed),
                label: label.into(),
                unit,
                total,
                started: Instant::now(),
                state: Mutex::new(State::default()),
            }),
        };
        task.update(|_| {});
        task
    }

    /// Counts `n` more done.
    pub fn inc(&self, n: u64) {
        self.update(|s| s.pos = s.pos.saturating_add(n));
    }

    /// Says how many are done.
    pub fn set_position(&self, pos: u64) {
        self.update(|s| s.pos = pos);
    }

    /// A short note shown after the count ("12 failed").
    pub fn set_message(&self, message: impl Into<String>) {
        let message = message.into();
        self.update(|s| s.message = message);
    }

    /// How many are done.
    pub fn position(&self) -> u64 {
        self.inner.lock().pos
    }

    /// Ends the operation: its bar is cleared, its last line or event written.
    pub fn finish(&self) {
        self.inner.finish();
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        let inner = &self.inner;
        let mut s = inner.lock();
        if s.done {
            return;
        }
        change(&mut s);
        let now = Instant::now();
        let g = global();
        match g.mode {
            Mode::Bars => {
                if s.bar.is_none() && now.duration_since(inner.started) >= SHOW_AFTER {
                    if let Some(multi) = &g.multi {
                        let bar = ProgressBar::with_draw_target(
                            Some(inner.total),
                            ProgressDrawTarget::hidden(),
                        )
                        .with_style(bar_style(&inner.unit))
                        .with_prefix(inner.label.clone())
                        .with_elapsed(now.duration_since(inner.started));
                        let bar = multi.add(bar);
                        bar.enable_steady_tick(Duration::from_millis(250));
                        s.bar = Some(bar);
                    }
                }
                if let Some(bar) = &s.bar {
                    bar.set_position(s.pos);
                    bar.set_message(s.message.clone());
                }
            }
            Mode::Lines => {
                if now.duration_since(s.last_report.unwrap_or(inner.started)) >= LINE_PERIOD {
                    let text = inner.line(&s, now);
                    tracing::info!(target: "tpserve::progress", "{text}");
                    s.last_report = Some(now);
                    s.reported = true;
                }
            }
            Mode::Events => {
                if s.last_report
                    .is_none_or(|t| now.duration_since(t) >= EVENT_PERIOD)
                {
                    inner.emit(&s);
                    s.last_report = Some(now);
                }
            }
            Mode::Off | Mode::Auto => {}
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self) {
        let mut s = self.lock();
        if s.done {
            return;
        }
        s.done = true;
        let g = global();
        match g.mode {
            Mode::Bars => {
                if let Some(bar) = s.bar.take() {
                    bar.finish_and_clear();
                    if let Some(multi) = &g.multi {
                        multi.remove(&bar);
                    }
                }
            }
            Mode::Lines if s.reported => {
                let text = self.line(&s, Instant::now());
                tracing::info!(target: "tpserve::progress", "{text}, ended");
            }
            Mode::Events => self.emit(&s),
            _ => {}
        }
    }

    /// "loading weights: 120/272 tensors (44%), 3.1 s" or, for bytes, with the rate.
    fn line(&self, s: &State, now: Instant) -> String {
        line_text(
            &self.label,
            &self.unit,
            (s.pos, self.total),
            &s.message,
            now.duration_since(self.started),
        )
    }

    fn emit(&self, s: &State) {
        let event = Event {
            id: self.id,
            label: self.label.clone(),
            unit: self.unit.name().to_string(),
            pos: s.pos,
            total: self.total,
            message: s.message.clone(),
            done: s.done,
        };
        if let Ok(json) = serde_json::to_string(&event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{EVENT_PREFIX}{json}");
            let _ = out.flush();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.finish();
    }
}

fn line_text(
    label: &str,
    unit: &Unit,
    (pos, total): (u64, u64),
    message: &str,
    elapsed: Duration,
) -> String {
    let percent = (pos.min(total) * 100)
        .checked_div(total)
        .map_or_else(String::new, |p| format!(" ({p}%)"));
    let counted = match unit {
        Unit::Bytes => {
            let rate = pos as f64 / elapsed.as_secs_f64().max(1e-3);
            format!(
                "{} of {}{percent}, {}/s",
                human::bytes(pos),
                human::bytes(total),
                human::bytes(rate as u64)
            )
        }
        Unit::Items(plural) => format!("{pos}/{total} {plural}{percent}"),
    };
    let message = if message.is_empty() {
        String::new()
    } else {
        format!(", {message}")
    };
    format!("{label}: {counted}{message}, {}", human::duration(elapsed))
}

fn bar_style(unit: &Unit) -> ProgressStyle {
    let bar = if color::enabled() {
        "{bar:30.cyan/blue}"
    } else {
        "{bar:30}"
    };
    let template = match unit {
        Unit::Bytes => {
            format!("{{prefix}} {bar} {{bytes}}/{{total_bytes}} {{bytes_per_sec}}, {{eta}} left {{msg}}")
        }
        Unit::Items(plural) => {
            format!("{{prefix}} {bar} {{pos}}/{{len}} {plural} [{{elapsed}}] {{msg}}")
        }
    };
    ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Draws the progress events a child process writes on its standard output, each task under
/// `prefix` ("rank 0: "), in this process's mode.
pub struct Remote {
    prefix: String,
    tasks: HashMap<u64, Task>,
}

impl Remote {
    /// Events of one child, shown under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            tasks: HashMap::new(),
        }
    }

    /// Takes one line of the child's standard output: an event is drawn and `true` returned;
    /// any other line is the caller's (`false`).
    pub fn take_line(&mut self, line: &str) -> bool {
        let Some(json) = line.strip_prefix(EVENT_PREFIX) else {
            return false;
        };
        // A line that does not parse is the child's bug; it is dropped rather than shown.
        let Ok(event) = serde_json::from_str::<Event>(json.trim()) else {
            return true;
        };
        let prefix = &self.prefix;
        let task = self.tasks.entry(event.id).or_insert_with(|| {
            Task::new(
                format!("{prefix}{}", event.label),
                event.total,
                Unit::from_name(&event.unit),
            )
        });
        task.update(|s| {
            s.pos = event.pos;
            s.message = event.message;
        });
        if event.done {
            if let Some(task) = self.tasks.remove(&event.id) {
                task.finish();
            }
        }
        true
    }

    /// The tasks still running, as (label, position).
    pub fn running(&self) -> Vec<(String, u64)> {
        let mut v: Vec<_> = self
            .tasks
            .values()
            .map(|t| (t.inner.label.clone(), t.position()))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_from_their_names_and_refuse_others() {
        assert_eq!("events".parse(), Ok(Mode::Events));
        assert_eq!("auto".parse(), Ok(Mode::Auto));
        assert!("fancy".parse::<Mode>().unwrap_err().contains("auto, bars"));
    }

    #[test]
    fn a_plain_line_says_the_count_the_share_and_the_time() {
        assert_eq!(
            line_text(
                "rank 0: loading weights",
                &Unit::items("tensors"),
                (120, 272),
                "",
                Duration::from_millis(3100)
            ),
            "rank 0: loading weights: 120/272 tensors (44%), 3.1 s"
        );
        assert_eq!(
            line_text(
                "bench serve",
                &Unit::items("requests"),
                (10, 200),
                "1 failed",
                Duration::from_secs(42)
            ),
            "bench serve: 10/200 requests (5%), 1 failed, 42 s"
        );
        assert_eq!(
            line_text(
                "download",
                &Unit::Bytes,
                (50 << 20, 100 << 20),
                "",
                Duration::from_secs(5)
            ),
            "download: 50.0 MiB of 100.0 MiB (50%), 10.0 MiB/s, 5.0 s"
        );
    }

    #[test]
    fn events_from_a_child_become_tasks_under_its_prefix_until_done() {
        let mut remote = Remote::new("rank 1: ");
        let event = |pos: u64, done: bool| {
            let e = Event {
                id: 7,
                label: "loading weights".into(),
                unit: "tensors".into(),
                pos,
                total: 272,
                message: String::new(),
                done,
            };
            format!("{EVENT_PREFIX}{}", serde_json::to_string(&e).unwrap())
        };
        assert!(remote.take_line(&event(0, false)));
        assert!(remote.take_line(&event(120, false)));
        assert_eq!(
            remote.running(),
            vec![("rank 1: loading weights".to_string(), 120)]
        );
        assert!(remote.take_line(&event(272, true)));
        assert!(remote.running().is_empty());
        assert!(!remote.take_line("worker log line"));
        assert!(
            remote.take_line(&format!("{EVENT_PREFIX}{{not json")),
            "a malformed event is swallowed, not shown"
        );
    }
}
