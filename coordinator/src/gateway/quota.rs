//! Per-tenant admission limits: requests per second (a token bucket holding one second's worth),
//! tokens per minute (prompt plus completion tokens of the last 60 s, in one-second buckets:
//! a request is admitted while the window is under the limit, and its tokens count once it
//! finishes), and concurrent requests (a slot held until the response body is done).
//!
//! State is per coordinator replica: in a cluster of R replicas behind a load balancer a tenant
//! gets up to R times each limit. Sharing counters through etcd would put a write on every
//! request's path; the load balancer spreads a tenant's traffic, so per-replica limits divided
//! by R are the documented way to set a cluster-wide budget.
//!
//! Time is passed in, so the arithmetic is tested without sleeping. One short mutex section per
//! request (a map lookup and a few adds); tenants that left the policy keep at most a few bytes
//! until the process restarts, and only tenants a key resolved to ever get an entry.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::policy::Limits;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    RequestsPerSecond,
    TokensPerMinute,
    ConcurrentRequests,
}

impl Limit {
    /// The name used in messages and metric labels (the policy's field name).
    pub fn name(self) -> &'static str {
        match self {
            Limit::RequestsPerSecond => "requests_per_second",
            Limit::TokensPerMinute => "tokens_per_minute",
            Limit::ConcurrentRequests => "max_concurrent_requests",
        }
    }
}

/// A refusal: the limit, its value, and when to retry.
#[derive(Debug, Clone, PartialEq)]
pub struct QuotaExceeded {
    pub limit: Limit,
    pub value: f64,
    pub retry_after_s: u32,
}

#[derive(Debug, Default)]
struct TenantState {
    /// Requests the bucket holds now, and when it was last topped up.
    bucket: Option<(f64, Instant)>,
    /// (second since `origin`, tokens) for the last 60 s, oldest first.
    window: VecDeque<(u64, u64)>,
    in_flight: u32,
}

const WINDOW_S: u64 = 60;

impl TenantState {
    fn prune(&mut self, now_s: u64) {
        while self
            .window
            .front()
            .is_some_and(|&(s, _)| s + WINDOW_S <= now_s)
        {
            self.window.pop_front();
        }
    }

    fn window_tokens(&self) -> u64 {
        self.window.iter().map(|&(_, n)| n).sum()
    }
}

/// The limits' state of every tenant on this replica.
#[derive(Debug)]
pub struct Quotas {
    origin: Instant,
    tenants: Mutex<HashMap<String, TenantState>>,
}

/// A concurrency slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    quotas: Arc<Quotas>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut tenants = self.quotas.lock();
        if let Some(state) = tenants.get_mut(&self.tenant) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

impl Quotas {
    pub fn new(origin: Instant) -> Arc<Self> {
        Arc::new(Self {
            origin,
            tenants: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TenantState>> {
        // A panic while holding this lock cannot leave the counters inconsistent.
        self.tenants.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// Admits one request of `tenant` under `limits` at `now`, or says which limit refuses it.
    pub fn admit(
        self: &Arc<Self>,
        tenant: &str,
        limits: &Limits,
        now: Instant,
    ) -> Result<Slot, QuotaExceeded> {
        let now_s = self.second(now);
        let mut tenants = self.lock();
        let state = tenants.entry(tenant.to_string()).or_default();
        if let Some(max) = limits.max_concurrent_requests {
            if state.in_flight >= max {
                return Err(QuotaExceeded {
                    limit: Limit::ConcurrentRequests,
                    value: f64::from(max),
                    retry_after_s: 1,
                });
            }
        }
        if let Some(max) = limits.tokens_per_minute {
            state.prune(now_s);
            let mut used = state.window_tokens();
            if used >= max {
                // Wait until enough of the oldest seconds leave the window.
                let mut retry = WINDOW_S;
                for &(s, n) in &state.window {
                    used -= n;
                    if used < max {
                        retry = (s + WINDOW_S).saturating_sub(now_s);
                        break;
                    }
                }
                return Err(QuotaExceeded {
                    limit: Limit::TokensPerMinute,
                    value: max as f64,
                    retry_after_s: retry.max(1) as u32,
                });
            }
        }
        if let Some(rps) = limits.requests_per_second {
            // The bucket holds one second's worth (at least one request).
            let capacity = rps.max(1.0);
            let (tokens, last) = state.bucket.unwrap_or((capacity, now));
            let tokens =
                (tokens + now.saturating_duration_since(last).as_secs_f64() * rps).min(capacity);
            if tokens < 1.0 {
                state.bucket = Some((tokens, now));
                return Err(QuotaExceeded {
                    limit: Limit::RequestsPerSecond,
                    value: rps,
                    retry_after_s: ((1.0 - tokens) / rps).ceil().max(1.0) as u32,
                });
            }
            state.bucket = Some((tokens - 1.0, now));
        }
        state.in_flight += 1;
        Ok(Slot {
            quotas: self.clone(),
            tenant: tenant.to_string(),
        })
    }

    /// Counts `tokens` (prompt plus completion of a finished request) against the tenant's
    /// tokens-per-minute window.
    pub fn record_tokens(&self, tenant: &str, tokens: u64, now: Instant) {
        let now_s = self.second(now);
        let mut tenants = self.lock();
        let state = tenants.entry(tenant.to_string()).or_default();
        state.prune(now_s);
        match state.window.back_mut() {
            Some((s, n)) if *s == now_s => *n += tokens,
            _ => state.window.push_back((now_s, tokens)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
        let mut l = Limits::default();
        f(&mut l);
        l
    }

    #[test]
    fn requests_per_second_refill_over_time() {
        let t0 = Instant::now();
        let q = Quotas::new(t0);
        let l = limits(|l| l.requests_per_second = Some(2.0));
        let _a = q.admit("t", &l, t0).unwrap();
        let _b = q.admit("t", &l, t0).unwrap();
        let err = q.admit("t", &l, t0).unwrap_err();
        assert_eq!(
            (err.limit, err.retry_after_s),
            (Limit::RequestsPerSecond, 1)
        );
        assert!(
            q.admit("other", &l, t0).is_ok(),
            "other tenants are untouched"
        );
        assert!(q.admit("t", &l, t0 + Duration::from_millis(600)).is_ok());
    }

    #[test]
    fn concurrency_slots_free_on_drop() {
        let t0 = Instant::now();
        let q = Quotas::new(t0);
        let l = limits(|l| l.max_concurrent_requests = Some(1));
        let slot = q.admit("t", &l, t0).unwrap();
        assert_eq!(
            q.admit("t", &l, t0).unwrap_err().limit,
            Limit::ConcurrentRequests
        );
        drop(slot);
        assert!(q.admit("t", &l, t0).is_ok());
    }

    #[test]
    fn tokens_per_minute_refuse_until_the_window_moves() {
        let t0 = Instant::now();
        let q = Quotas::new(t0);
        let l = limits(|l| l.tokens_per_minute = Some(100));
        drop(q.admit("t", &l, t0).unwrap());
        q.record_tokens("t", 60, t0);
        q.record_tokens("t", 50, t0 + Duration::from_secs(10));
        let err = q.admit("t", &l, t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!((err.limit, err.retry_after_s), (Limit::TokensPerMinute, 40));
        assert!(q.admit("t", &l, t0 + Duration::from_secs(60)).is_ok());
    }
}
