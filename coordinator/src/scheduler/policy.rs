//! The waiting queue under each `SchedulingPolicy`. FCFS is a deque (new arrivals at the back,
//! preempted sequences at the front); priority is an ordered set keyed by
//! (priority, arrival), so a preempted sequence simply regains its place; fair is a deque per
//! tenant plus each tenant's virtual token counter.
//!
//! Fair share (the Virtual Token Counter of "Fairness in Serving Large Language Models", Sheng
//! et al., OSDI 2024, as S-LoRA uses it): every token the scheduler schedules for a tenant (a
//! prefill chunk's tokens, a decode's one) adds `1 / weight` to the tenant's counter, and the
//! next sequence to start is the front of the backlogged tenant with the smallest counter. A
//! tenant that floods the queue raises only its own counter, so the others keep starting. A
//! tenant whose queue was empty is lifted, when a request of its arrives, to the smallest
//! counter among the backlogged tenants, or, when no tenant is backlogged, to the counter of the
//! tenant whose queue emptied last (the paper's rule): idle time banks no credit, so a tenant
//! returning from idleness, or arriving for the first time, cannot then starve the others.
//! Preempted sequences go back to the front of their tenant's queue without a lift. Unlike the
//! paper, prompt and output tokens cost the same (one unit of engine work each on our step
//! budget).
//!
//! Counters order only *starts*: when every slot is held (a small `max_num_seqs`, long
//! requests), a tenant next in line would wait for a slot to free whatever its counter. So the
//! fair policy also preempts (`preemption_victim`): a tenant that is next to start and holds
//! fewer slots than its weighted share of `max_num_seqs` takes one from the tenant furthest
//! ahead in counter that holds more than its share. Whole slots give the hysteresis: neither
//! side crosses its share, so the swap never invites the swap back, and no tenant is preempted
//! below its share. The victim recomputes (its full blocks are prefix-cache hits) and pays again
//! for what it recomputes.
//!
//! Costs: FCFS push/peek/pop O(1), `remove` (abort of a waiting sequence) O(n); priority
//! O(log n) for everything; fair O(tenants) per peek/pop and per `preemption_victim` (asked
//! only when a waiting sequence finds the batch or pool full) and O(1) per charge; a tenant's entry
//! (a few words) stays after its queue empties, so its counter survives until the process ends.

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::config::SchedulingPolicy;
use super::hash::U64HashState;
use super::sequence::Share;

/// What orders a waiting sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct WaitKey {
    pub priority: i32,
    pub arrival: u64,
    pub id: u64,
    pub share: ShareKey,
}

/// `Share` with an order, so `WaitKey` can live in the priority set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ShareKey {
    pub tenant: u64,
    pub weight: u32,
}

impl From<Share> for ShareKey {
    fn from(s: Share) -> Self {
        Self {
            tenant: s.tenant,
            weight: s.weight.max(1),
        }
    }
}

/// One tenant under the fair policy.
#[derive(Debug, Clone)]
pub(crate) struct TenantQueue {
    ids: VecDeque<u64>,
    /// Tokens scheduled for it, each divided by its weight.
    counter: f64,
    weight: u32,
    /// Its sequences in the running list.
    running: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct FairQueue {
    tenants: HashMap<u64, TenantQueue, U64HashState>,
    len: usize,
    /// The counter of the tenant whose queue emptied last, when it emptied.
    last_left: f64,
}

impl FairQueue {
    /// The backlogged tenant with the smallest counter (ties: the smaller tenant id, so the
    /// choice is deterministic).
    fn next_tenant(&self) -> Option<u64> {
        self.tenants
            .iter()
            .filter(|(_, q)| !q.ids.is_empty())
            .min_by(|a, b| a.1.counter.total_cmp(&b.1.counter).then(a.0.cmp(b.0)))
            .map(|(t, _)| *t)
    }

    fn entry(&mut self, share: ShareKey) -> &mut TenantQueue {
        let q = self.tenants.entry(share.tenant).or_insert(TenantQueue {
            ids: VecDeque::new(),
            counter: 0.0,
            weight: share.weight,
            running: 0,
        });
        q.weight = share.weight;
        q
    }
}

#[derive(Debug, Clone)]
pub(crate) enum WaitingQueue {
    Fcfs(VecDeque<u64>),
    Priority(BTreeSet<WaitKey>),
    Fair(FairQueue),
}

impl WaitingQueue {
    pub fn new(policy: SchedulingPolicy) -> Self {
        match policy {
            SchedulingPolicy::Fcfs => Self::Fcfs(VecDeque::new()),
            SchedulingPolicy::Priority => Self::Priority(BTreeSet::new()),
            SchedulingPolicy::Fair => Self::Fair(FairQueue {
                tenants: HashMap::with_hasher(U64HashState),
                len: 0,
                last_left: 0.0,
            }),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Fcfs(q) => q.len(),
            Self::Priority(s) => s.len(),
            Self::Fair(f) => f.len,
        }
    }

    /// A newly added sequence.
    pub fn push_arrival(&mut self, key: WaitKey) {
        match self {
            Self::Fcfs(q) => q.push_back(key.id),
            Self::Priority(s) => {
                s.insert(key);
            }
            Self::Fair(f) => {
                let floor = f
                    .tenants
                    .iter()
                    .filter(|(t, q)| **t != key.share.tenant && !q.ids.is_empty())
                    .map(|(_, q)| q.counter)
                    .min_by(f64::total_cmp)
                    .unwrap_or(f.last_left);
                let q = f.entry(key.share);
                if q.ids.is_empty() {
                    q.counter = q.counter.max(floor);
                }
                q.ids.push_back(key.id);
                f.len += 1;
            }
        }
    }

    /// A preempted sequence: first in line again under FCFS (and within its tenant under fair),
    /// back at its key under priority.
    pub fn push_preempted(&mut self, key: WaitKey) {
        match self {
            Self::Fcfs(q) => q.push_front(key.id),
            Self::Priority(s) => {
                s.insert(key);
            }
            Self::Fair(f) => {
                f.entry(key.share).ids.push_front(key.id);
                f.len += 1;
            }
        }
    }

    /// The id that starts next.
    pub fn peek(&self) -> Option<u64> {
        match self {
            Self::Fcfs(q) => q.front().copied(),
            Self::Priority(s) => s.first().map(|k| k.id),
            Self::Fair(f) => f
                .next_tenant()
                .and_then(|t| f.tenants[&t].ids.front().copied()),
        }
    }

    pub fn pop(&mut self) -> Option<u64> {
        match self {
            Self::Fcfs(q) => q.pop_front(),
            Self::Priority(s) => s.pop_first().map(|k| k.id),
            Self::Fair(f) => {
                let t = f.next_tenant()?;
                let q = f.tenants.get_mut(&t)?;
                let id = q.ids.pop_front();
                if q.ids.is_empty() {
                    f.last_left = q.counter;
                }
                f.len -= usize::from(id.is_some());
                id
            }
        }
    }

    /// Takes a sequence out (abort or finish while waiting).
    pub fn remove(&mut self, key: WaitKey) -> bool {
        let take = |q: &mut VecDeque<u64>| match q.iter().position(|&id| id == key.id) {
            Some(pos) => {
                q.remove(pos);
                true
            }
            None => false,
        };
        match self {
            Self::Fcfs(q) => take(q),
            Self::Priority(s) => s.remove(&key),
            Self::Fair(f) => {
                let removed = f
                    .tenants
                    .get_mut(&key.share.tenant)
                    .is_some_and(|q| take(&mut q.ids));
                f.len -= usize::from(removed);
                removed
            }
        }
    }

    /// Ids in the order they would start (under fair: tenant by tenant, as an approximation).
    pub fn ids(&self) -> Vec<u64> {
        match self {
            Self::Fcfs(q) => q.iter().copied().collect(),
            Self::Priority(s) => s.iter().map(|k| k.id).collect(),
            Self::Fair(f) => f
                .tenants
                .values()
                .flat_map(|q| q.ids.iter().copied())
                .collect(),
        }
    }

    /// `tokens` were scheduled for `share`'s tenant (fair policy; a no-op otherwise).
    pub fn charge(&mut self, share: Share, tokens: usize) {
        if let Self::Fair(f) = self {
            let q = f.entry(share.into());
            q.counter += tokens as f64 / f64::from(q.weight);
        }
    }

    /// A sequence of `share`'s tenant entered the running list (fair policy; a no-op otherwise).
    pub fn started(&mut self, share: Share) {
        if let Self::Fair(f) = self {
            f.entry(share.into()).running += 1;
        }
    }

    /// A sequence of `share`'s tenant left the running list (preempted, finished or aborted).
    pub fn stopped(&mut self, share: Share) {
        if let Self::Fair(f) = self {
            let q = f.entry(share.into());
            q.running = q.running.saturating_sub(1);
        }
    }

    /// Fair policy: whose running sequence to preempt so that `tenant`, next to start and held
    /// back by a full batch (or pool), gets its share of the `slots`. A tenant's share is
    /// `slots * weight / total weight` of the tenants with work (running or waiting). It is
    /// `Some` only when `tenant` stays within its share after starting one more and the victim
    /// tenant stays at or above its own after giving one back, and the victim's counter is not
    /// below `tenant`'s: so a swap never invites the swap back (no thrashing), and a tenant is
    /// never preempted below its share (no starvation). The victim is the tenant furthest ahead
    /// (largest counter; ties: the larger id). `None` under FCFS and priority.
    pub fn preemption_victim(&self, tenant: u64, slots: usize) -> Option<u64> {
        let Self::Fair(f) = self else {
            return None;
        };
        let t = f.tenants.get(&tenant)?;
        let total: u64 = f
            .tenants
            .values()
            .filter(|q| q.running > 0 || !q.ids.is_empty())
            .map(|q| u64::from(q.weight))
            .sum();
        // Shares compared as running * total against slots * weight: whole numbers, no rounding.
        let slots = slots as u64;
        if (t.running as u64 + 1) * total > slots * u64::from(t.weight) {
            return None;
        }
        f.tenants
            .iter()
            .filter(|(id, q)| {
                **id != tenant
                    && q.running > 0
                    && (q.running as u64 - 1) * total >= slots * u64::from(q.weight)
                    && q.counter >= t.counter
            })
            .max_by(|a, b| a.1.counter.total_cmp(&b.1.counter).then(a.0.cmp(b.0)))
            .map(|(id, _)| *id)
    }

    /// The tenant's virtual token counter (0 outside the fair policy).
    pub fn counter(&self, tenant: u64) -> f64 {
        match self {
            Self::Fair(f) => f.tenants.get(&tenant).map_or(0.0, |q| q.counter),
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(priority: i32, arrival: u64, id: u64) -> WaitKey {
        tenant_key(priority, arrival, id, 0, 1)
    }

    fn tenant_key(priority: i32, arrival: u64, id: u64, tenant: u64, weight: u32) -> WaitKey {
        WaitKey {
            priority,
            arrival,
            id,
            share: ShareKey { tenant, weight },
        }
    }

    #[test]
    fn fcfs_puts_preempted_sequences_in_front_of_arrivals() {
        let mut q = WaitingQueue::new(SchedulingPolicy::Fcfs);
        q.push_arrival(key(0, 0, 10));
        q.push_arrival(key(0, 1, 11));
        q.push_preempted(key(0, 5, 12));
        assert_eq!(q.ids(), vec![12, 10, 11]);
        assert!(q.remove(key(0, 0, 10)));
        assert!(!q.remove(key(0, 0, 10)));
        assert_eq!(q.pop(), Some(12));
        assert_eq!(q.peek(), Some(11));
    }

    #[test]
    fn priority_orders_by_value_then_arrival() {
        let mut q = WaitingQueue::new(SchedulingPolicy::Priority);
        q.push_arrival(key(5, 0, 1));
        q.push_arrival(key(-1, 1, 2));
        q.push_arrival(key(5, 2, 3));
        q.push_preempted(key(0, 3, 4));
        assert_eq!(q.ids(), vec![2, 4, 1, 3]);
        assert_eq!(q.len(), 4);
    }

    #[test]
    fn fair_starts_the_tenant_with_the_smallest_counter_by_weight() {
        let mut q = WaitingQueue::new(SchedulingPolicy::Fair);
        let a = Share {
            tenant: 1,
            weight: 1,
        };
        let b = Share {
            tenant: 2,
            weight: 3,
        };
        for i in 0..10 {
            q.push_arrival(tenant_key(0, i, 100 + i, 1, 1));
        }
        q.push_arrival(tenant_key(0, 10, 200, 2, 3));
        q.push_arrival(tenant_key(0, 11, 201, 2, 3));
        // A has been served 30 tokens, B 60: B's counter (60 / 3 = 20) is smaller.
        q.charge(a, 30);
        q.charge(b, 60);
        assert_eq!(q.pop(), Some(200));
        q.charge(b, 60);
        // B at 40 now, A at 30: A's turn, oldest first.
        assert_eq!(q.pop(), Some(100));
        assert_eq!(q.len(), 10);
        assert!(q.remove(tenant_key(0, 11, 201, 2, 3)));
        assert_eq!(q.len(), 9);
    }

    #[test]
    fn fair_lifts_a_returning_idle_tenant_to_the_backlogged_minimum() {
        let mut q = WaitingQueue::new(SchedulingPolicy::Fair);
        q.push_arrival(tenant_key(0, 0, 1, 1, 1));
        q.charge(
            Share {
                tenant: 1,
                weight: 1,
            },
            1000,
        );
        // Tenant 2 was idle all along: it starts level with tenant 1, not 1000 tokens ahead.
        q.push_arrival(tenant_key(0, 1, 2, 2, 1));
        assert_eq!(q.counter(2), 1000.0);
        // Ties go to the smaller tenant id.
        assert_eq!(q.peek(), Some(1));
    }

    #[test]
    fn fair_lifts_a_tenant_arriving_to_an_empty_queue_to_the_last_one_to_leave() {
        let mut q = WaitingQueue::new(SchedulingPolicy::Fair);
        let one = Share {
            tenant: 1,
            weight: 1,
        };
        q.push_arrival(tenant_key(0, 0, 1, 1, 1));
        q.charge(one, 500);
        assert_eq!(q.pop(), Some(1));
        // Tenant 1's request keeps running (decodes charged after its queue emptied).
        q.charge(one, 100);
        // Tenant 2, new, arrives while no one waits: level with tenant 1 when it left, not 500
        // tokens ahead.
        q.push_arrival(tenant_key(0, 1, 2, 2, 1));
        assert_eq!(q.counter(2), 500.0);
        // Tenant 1 comes back behind it by what it used since.
        q.push_arrival(tenant_key(0, 2, 3, 1, 1));
        assert_eq!(q.pop(), Some(2));
    }

    #[test]
    fn a_preemption_victim_keeps_both_tenants_within_their_shares_of_the_slots() {
        // 8 slots; A (tenant 1) runs `ra`, B (tenant 2) runs `rb` and has one waiting; A has
        // been charged `ca` tokens, B 100.
        struct Case {
            weights: (u32, u32),
            ra: usize,
            rb: usize,
            ca: usize,
            victim: Option<u64>,
        }
        let cases = [
            Case {
                weights: (1, 1),
                ra: 8,
                rb: 0,
                ca: 200,
                victim: Some(1),
            },
            Case {
                weights: (1, 1),
                ra: 5,
                rb: 3,
                ca: 200,
                victim: Some(1),
            },
            Case {
                weights: (1, 1),
                ra: 4,
                rb: 4,
                ca: 200,
                victim: None,
            },
            Case {
                weights: (1, 3),
                ra: 3,
                rb: 5,
                ca: 200,
                victim: Some(1),
            },
            Case {
                weights: (1, 3),
                ra: 2,
                rb: 6,
                ca: 200,
                victim: None,
            },
            // A behind in counter: it keeps its slots although B is below its share.
            Case {
                weights: (1, 1),
                ra: 8,
                rb: 0,
                ca: 50,
                victim: None,
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let a = Share {
                tenant: 1,
                weight: c.weights.0,
            };
            let b = Share {
                tenant: 2,
                weight: c.weights.1,
            };
            let mut q = WaitingQueue::new(SchedulingPolicy::Fair);
            for _ in 0..c.ra {
                q.started(a);
            }
            for _ in 0..c.rb {
                q.started(b);
            }
            q.charge(a, c.ca * c.weights.0 as usize);
            q.charge(b, 100 * c.weights.1 as usize);
            q.push_arrival(tenant_key(0, 0, 7, 2, c.weights.1));
            assert_eq!(q.preemption_victim(2, 8), c.victim, "case {i}");
            assert_eq!(
                WaitingQueue::new(SchedulingPolicy::Fcfs).preemption_victim(2, 8),
                None
            );
        }
    }
}
