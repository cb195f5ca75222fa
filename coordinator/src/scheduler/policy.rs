//! The waiting queue under each `SchedulingPolicy`. FCFS is a deque (new arrivals at the back,
//! preempted sequences at the front); priority is an ordered set keyed by
//! (priority, arrival), so a preempted sequence simply regains its place.
//!
//! Costs: FCFS push/peek/pop O(1), `remove` (abort of a waiting sequence) O(n); priority
//! O(log n) for everything.

use std::collections::{BTreeSet, VecDeque};

use super::config::SchedulingPolicy;

/// What orders a waiting sequence: (priority, arrival, id).
pub(crate) type WaitKey = (i32, u64, u64);

#[derive(Debug, Clone)]
pub(crate) enum WaitingQueue {
    Fcfs(VecDeque<u64>),
    Priority(BTreeSet<WaitKey>),
}

impl WaitingQueue {
    pub fn new(policy: SchedulingPolicy) -> Self {
        match policy {
            SchedulingPolicy::Fcfs => Self::Fcfs(VecDeque::new()),
            SchedulingPolicy::Priority => Self::Priority(BTreeSet::new()),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Fcfs(q) => q.len(),
            Self::Priority(s) => s.len(),
        }
    }

    /// A newly added sequence.
    pub fn push_arrival(&mut self, key: WaitKey) {
        match self {
            Self::Fcfs(q) => q.push_back(key.2),
            Self::Priority(s) => {
                s.insert(key);
            }
        }
    }

    /// A preempted sequence: first in line again under FCFS, back at its key under priority.
    pub fn push_preempted(&mut self, key: WaitKey) {
        match self {
            Self::Fcfs(q) => q.push_front(key.2),
            Self::Priority(s) => {
                s.insert(key);
            }
        }
    }

    /// The id that starts next.
    pub fn peek(&self) -> Option<u64> {
        match self {
            Self::Fcfs(q) => q.front().copied(),
            Self::Priority(s) => s.first().map(|k| k.2),
        }
    }

    pub fn pop(&mut self) -> Option<u64> {
        match self {
            Self::Fcfs(q) => q.pop_front(),
            Self::Priority(s) => s.pop_first().map(|k| k.2),
        }
    }

    /// Takes a sequence out (abort or finish while waiting).
    pub fn remove(&mut self, key: WaitKey) -> bool {
        match self {
            Self::Fcfs(q) => match q.iter().position(|&id| id == key.2) {
                Some(pos) => {
                    q.remove(pos);
                    true
                }
                None => false,
            },
            Self::Priority(s) => s.remove(&key),
        }
    }

    /// Ids in the order they would start.
    pub fn ids(&self) -> Vec<u64> {
        match self {
            Self::Fcfs(q) => q.iter().copied().collect(),
            Self::Priority(s) => s.iter().map(|k| k.2).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fcfs_puts_preempted_sequences_in_front_of_arrivals() {
        let mut q = WaitingQueue::new(SchedulingPolicy::Fcfs);
        q.push_arrival((0, 0, 10));
        q.push_arrival((0, 1, 11));
        q.push_preempted((0, 5, 12));
        assert_eq!(q.ids(), vec![12, 10, 11]);
        assert!(q.remove((0, 0, 10)));
        assert!(!q.remove((0, 0, 10)));
        assert_eq!(q.pop(), Some(12));
        assert_eq!(q.peek(), Some(11));
    }

    #[test]
    fn priority_orders_by_value_then_arrival() {
        let mut q = WaitingQueue::new(SchedulingPolicy::Priority);
        q.push_arrival((5, 0, 1));
        q.push_arrival((-1, 1, 2));
        q.push_arrival((5, 2, 3));
        q.push_preempted((0, 3, 4));
        assert_eq!(q.ids(), vec![2, 4, 1, 3]);
        assert_eq!(q.len(), 4);
    }
}
