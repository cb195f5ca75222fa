//! Usage and cost attribution: per tenant x target x feature x variant, requests, prompt tokens,
//! cached prompt tokens, completion tokens and errors by HTTP status. Kept three ways: totals
//! since start (Prometheus), per-minute buckets of the last 24 h (`GET /v1/usage`), and
//! optionally one JSON line per request appended to a file (`--gateway-usage-log`) for billing.
//!
//! Tokens are counted when a request's usage reaches its client (the whole answer, or the end of
//! a stream), so the totals equal the sums of the `usage` the clients received. A request the
//! client abandons counts as a request with status 499 (nginx's "client closed request") and
//! no tokens.
//!
//! Labels are bounded by the policy: tenants and features come from it (an unmapped feature is
//! `other`), targets from the served names and the tenants' routes, statuses from the API's
//! fixed set. Costs: one mutex section and a few map updates per request; the log is one
//! buffered write and flush per request, made on the request's task.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

/// How long per-minute buckets are kept for `/v1/usage`.
pub const RETENTION_MINUTES: u64 = 24 * 60;

/// What a row of usage is attributed to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct UsageKey {
    pub tenant: String,
    /// The target the request ran on (`-` when it was refused before routing).
    pub model: String,
    pub feature: String,
    /// The A/B variant, `-` outside an experiment.
    pub variant: String,
}

/// Counters of one row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Requests that ended in an error, by HTTP status.
    pub errors: BTreeMap<u16, u64>,
}

impl Counts {
    fn add(&mut self, r: &Record) {
        self.requests += 1;
        self.prompt_tokens += r.prompt_tokens;
        self.cached_prompt_tokens += r.cached_prompt_tokens;
        self.completion_tokens += r.completion_tokens;
        if r.status >= 400 {
            *self.errors.entry(r.status).or_default() += 1;
        }
    }

    fn merge(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.prompt_tokens += other.prompt_tokens;
        self.cached_prompt_tokens += other.cached_prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        for (status, n) in &other.errors {
            *self.errors.entry(*status).or_default() += n;
        }
    }
}

/// One finished request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// Unix seconds when it ended.
    pub time: f64,
    #[serde(flatten)]
    pub key: UsageKey,
    /// The rule that routed it (`explicit`, `feature:x`, ...; `-` when refused before routing).
    pub route: String,
    pub status: u16,
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Default)]
struct Inner {
    totals: BTreeMap<UsageKey, Counts>,
    /// Unix minute -> rows.
    minutes: BTreeMap<u64, BTreeMap<UsageKey, Counts>>,
}

/// The usage of every tenant on this replica.
#[derive(Debug)]
pub struct UsageLedger {
    inner: Mutex<Inner>,
    log: Option<Mutex<BufWriter<File>>>,
}

/// A row of a `/v1/usage` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    #[serde(flatten)]
    pub key: UsageKey,
    #[serde(flatten)]
    pub counts: Counts,
}

impl UsageLedger {
    /// A ledger; with `log`, every record is also appended to that file as a JSON line.
    pub fn new(log: Option<&Path>) -> std::io::Result<Self> {
        let log = match log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?;
                Some(Mutex::new(BufWriter::new(file)))
            }
            None => None,
        };
        Ok(Self {
            inner: Mutex::new(Inner::default()),
            log,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one finished request.
    pub fn record(&self, record: Record) {
        let minute = record.time as u64 / 60;
        {
            let mut inner = self.lock();
            inner
                .totals
                .entry(record.key.clone())
                .or_default()
                .add(&record);
            inner
                .minutes
                .entry(minute)
                .or_default()
                .entry(record.key.clone())
                .or_default()
                .add(&record);
            let oldest = minute.saturating_sub(RETENTION_MINUTES);
            while inner
                .minutes
                .first_key_value()
                .is_some_and(|(m, _)| *m < oldest)
            {
                inner.minutes.pop_first();
            }
        }
        if let Some(log) = &self.log {
            let line = serde_json::to_string(&record).expect("a record serializes");
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = writeln!(log, "{line}").and_then(|()| log.flush()) {
                tracing::warn!("writing the usage log: {e}");
            }
        }
    }

    /// Rows of the minutes in `[start, end)` (Unix seconds, rounded down to the minute), for one
    /// tenant or all.
    pub fn query(&self, start: u64, end: u64, tenant: Option<&str>) -> Vec<UsageRow> {
        let inner = self.lock();
        let mut rows: BTreeMap<UsageKey, Counts> = BTreeMap::new();
        for (_, minute) in inner.minutes.range(start / 60..end.div_ceil(60)) {
            for (key, counts) in minute {
                if tenant.is_none_or(|t| t == key.tenant) {
                    rows.entry(key.clone()).or_default().merge(counts);
                }
            }
        }
        rows.into_iter()
            .map(|(key, counts)| UsageRow { key, counts })
            .collect()
    }

    /// The totals as Prometheus text.
    pub fn render(&self, out: &mut String) {
        let inner = self.lock();
        let families: [Family; 4] = [
            (
                "tpserve:tenant_requests_total",
                "Requests by tenant, target, feature and variant.",
                |c| c.requests,
            ),
            (
                "tpserve:tenant_prompt_tokens_total",
                "Prompt tokens the clients were told of.",
                |c| c.prompt_tokens,
            ),
            (
                "tpserve:tenant_cached_prompt_tokens_total",
                "Of those, tokens served from the prefix cache.",
                |c| c.cached_prompt_tokens,
            ),
            (
                "tpserve:tenant_completion_tokens_total",
                "Completion tokens the clients were told of.",
                |c| c.completion_tokens,
            ),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (key, counts) in &inner.totals {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(key), get(counts));
            }
        }
        let name = "tpserve:tenant_request_errors_total";
        let _ = writeln!(out, "# HELP {name} Requests that ended in an error, by HTTP status (499: the client went away).\n# TYPE {name} counter");
        for (key, counts) in &inner.totals {
            for (status, n) in &counts.errors {
                let _ = writeln!(out, "{name}{{{},status=\"{status}\"}} {n}", labels(key));
            }
        }
    }
}

/// A counter family: its name, its help, and how to read it from a row.
type Family = (&'static str, &'static str, fn(&Counts) -> u64);

fn labels(key: &UsageKey) -> String {
    format!(
        "tenant=\"{}\",model=\"{}\",feature=\"{}\",variant=\"{}\"",
        escape(&key.tenant),
        escape(&key.model),
        escape(&key.feature),
        escape(&key.variant)
    )
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: &str, time: f64, status: u16, prompt: u64) -> Record {
        Record {
            time,
            key: UsageKey {
                tenant: tenant.into(),
                model: "m".into(),
                feature: "none".into(),
                variant: "-".into(),
            },
            route: "base".into(),
            status,
            prompt_tokens: prompt,
            cached_prompt_tokens: 0,
            completion_tokens: 1,
        }
    }

    #[test]
    fn a_window_sums_its_minutes_and_the_log_has_one_line_per_request() {
        let dir = std::env::temp_dir().join(format!("tpserve-usage-{}", std::process::id()));
        let ledger = UsageLedger::new(Some(&dir)).unwrap();
        ledger.record(record("a", 6000.0, 200, 5));
        ledger.record(record("a", 6061.0, 200, 7));
        ledger.record(record("b", 6062.0, 429, 0));
        let all = ledger.query(6000, 6120, None);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].counts.prompt_tokens, 12);
        assert_eq!(all[1].counts.errors.get(&429), Some(&1));
        let late = ledger.query(6060, 6120, Some("a"));
        assert_eq!(late[0].counts.prompt_tokens, 7);
        let mut text = String::new();
        ledger.render(&mut text);
        assert!(text.contains("tpserve:tenant_prompt_tokens_total{tenant=\"a\",model=\"m\",feature=\"none\",variant=\"-\"} 12"), "{text}");
        assert!(text.contains("status=\"429\"} 1"), "{text}");
        let log = std::fs::read_to_string(&dir).unwrap();
        assert_eq!(log.lines().count(), 3);
        let _ = std::fs::remove_file(&dir);
    }
}
