//! The coordinator's view of one tensor-parallel group: which ranks have registered, at which
//! address, and whether all `world_size` of them are there.
//!
//! A background task lists the group's prefix, then watches from the listed revision + 1, so no
//! change between the two is missed. When the watch breaks (etcd restarted, connection lost, the
//! revision was compacted) it re-lists and watches again, retrying with backoff while etcd is
//! unreachable; during an outage the last known membership stays published. A watch that has been
//! silent for [`IDLE_RESYNC`] is also re-established, because a half-open TCP connection (a network
//! partition) gives no error: this bounds how stale the view can get.
//!
//! Published values change only when the membership does. Consumers see the latest value, not
//! every intermediate one: a worker that vanished and re-registered between two reads shows up as
//! a changed entry in [`Membership::revisions`] (and usually a changed address).
//! Costs: one long-lived HTTP request, plus a range request per resync.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client::{EtcdClient, WatchEvent};
use crate::error::{Error, Result};

/// A silent watch is re-established after this long (see the module docs).
pub const IDLE_RESYNC: Duration = Duration::from_secs(10);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The registered workers of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Membership {
    /// rank -> the worker's gRPC address (the registered value).
    pub members: BTreeMap<usize, String>,
    /// rank -> etcd revision of the worker's registration. A re-registration changes it even if
    /// the address is the same, so a group formed from one `Membership` is intact exactly while
    /// later ones have the same revisions for all its ranks (see [`Membership::same_workers`]).
    pub revisions: BTreeMap<usize, i64>,
    /// All ranks `0..world_size` are present.
    pub complete: bool,
}

impl Membership {
    /// Whether both hold the same registrations (same ranks, addresses and revisions).
    pub fn same_workers(&self, other: &Membership) -> bool {
        self.members == other.members && self.revisions == other.revisions
    }
}

/// Watches `/tpserve/<cluster>/<group>/workers/` and publishes the group's [`Membership`].
/// Dropping it stops the background task.
#[derive(Debug)]
pub struct GroupWatcher {
    rx: watch::Receiver<Membership>,
    task: JoinHandle<()>,
}

impl GroupWatcher {
    /// Starts watching (needs a tokio runtime). Does not wait for etcd: the first value is empty
    /// and incomplete, and the task retries until etcd answers. `world_size` must be at least 1;
    /// registrations of ranks `>= world_size` are ignored with a warning.
    pub fn new(client: EtcdClient, cluster: &str, group: &str, world_size: usize) -> Self {
        debug_assert!(world_size >= 1, "a group has at least one rank");
        let (tx, rx) = watch::channel(Membership::default());
        let task = tokio::spawn(watch_loop(Watch {
            client,
            prefix: Self::prefix(cluster, group),
            world_size,
            tx,
            warned: HashSet::new(),
        }));
        Self { rx, task }
    }

    /// The key worker `rank` registers under: `/tpserve/<cluster>/<group>/workers/<rank>`.
    pub fn key(cluster: &str, group: &str, rank: usize) -> String {
        format!("{}{rank}", Self::prefix(cluster, group))
    }

    /// The prefix of the group's worker keys, with a trailing slash.
    pub fn prefix(cluster: &str, group: &str) -> String {
        format!("/tpserve/{cluster}/{group}/workers/")
    }

    /// The latest membership.
    pub fn current(&self) -> Membership {
        self.rx.borrow().clone()
    }

    /// Waits until the membership differs from the last one this handle returned, and returns it.
    pub async fn next_change(&mut self) -> Result<Membership> {
        self.rx.changed().await.map_err(|_| Error::WatcherStopped)?;
        Ok(self.rx.borrow_and_update().clone())
    }

    /// Waits until the membership satisfies `pred` (checked on the current value first).
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&Membership) -> bool,
    ) -> Result<Membership> {
        let m = self
            .rx
            .wait_for(|m| pred(m))
            .await
            .map_err(|_| Error::WatcherStopped)?;
        Ok(m.clone())
    }

    /// Another receiver of the same membership (e.g. for a `/health` handler).
    pub fn subscribe(&self) -> watch::Receiver<Membership> {
        self.rx.clone()
    }
}

impl Drop for GroupWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Watch {
    client: EtcdClient,
    prefix: String,
    world_size: usize,
    tx: watch::Sender<Membership>,
    /// Keys already warned about, so resyncs do not repeat the warning.
    warned: HashSet<String>,
}

/// rank -> (address, revision)
type Members = BTreeMap<usize, (String, i64)>;

impl Watch {
    /// The rank of a key under the prefix, if it is one this group uses.
    fn rank_of(&mut self, key: &str) -> Option<usize> {
        let suffix = key.strip_prefix(&self.prefix)?;
        // Only the canonical spelling ("1", not "01" or "+1"), so one rank has one key.
        let rank = suffix
            .parse::<usize>()
            .ok()
            .filter(|rank| rank.to_string() == suffix);
        match rank {
            Some(rank) if rank < self.world_size => Some(rank),
            _ => {
                if self.warned.insert(key.to_string()) {
                    tracing::warn!(
                        %key,
                        world_size = self.world_size,
                        "ignoring a worker registration: not a rank of this group"
                    );
                }
                None
            }
        }
    }

    fn publish(&self, members: &Members) {
        let next = Membership {
            members: members
                .iter()
                .map(|(rank, (addr, _))| (*rank, addr.clone()))
                .collect(),
            revisions: members
                .iter()
                .map(|(rank, (_, rev))| (*rank, *rev))
                .collect(),
            complete: (0..self.world_size).all(|rank| members.contains_key(&rank)),
        };
        self.tx.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            tracing::info!(
                prefix = %self.prefix,
                members = ?next.members,
                complete = next.complete,
                "group membership changed"
            );
            *current = next;
            true
        });
    }

    fn apply(&mut self, members: &mut Members, event: WatchEvent) {
        let Some(rank) = self.rank_of(event.key()) else {
            return;
        };
        match event {
            WatchEvent::Put {
                value, revision, ..
            } => {
                members.insert(rank, (value, revision));
            }
            WatchEvent::Delete { .. } => {
                members.remove(&rank);
            }
        }
    }
}

async fn watch_loop(mut w: Watch) {
    let mut backoff = RETRY_MIN;
    let mut failing = false;
    loop {
        let (kvs, revision) = match w.client.get_prefix_kvs(&w.prefix).await {
            Ok(listed) => listed,
            Err(e) => {
                retry_later(&w.prefix, &e, &mut failing, &mut backoff).await;
                continue;
            }
        };
        let mut members = Members::new();
        for kv in kvs {
            if let Some(rank) = w.rank_of(&kv.key) {
                members.insert(rank, (kv.value, kv.mod_revision));
            }
        }
        w.publish(&members);
        let mut events = match w.client.watch_prefix(&w.prefix, revision + 1).await {
            Ok(events) => events,
            Err(e) => {
                retry_later(&w.prefix, &e, &mut failing, &mut backoff).await;
                continue;
            }
        };
        if failing {
            tracing::info!(prefix = %w.prefix, "etcd watch re-established");
            failing = false;
        }
        backoff = RETRY_MIN;
        loop {
            match tokio::time::timeout(IDLE_RESYNC, events.next()).await {
                Ok(Some(Ok(event))) => {
                    w.apply(&mut members, event);
                    w.publish(&members);
                }
                Ok(Some(Err(e))) => {
                    tracing::warn!(prefix = %w.prefix, error = %e, "etcd watch ended; resyncing");
                    break;
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!(prefix = %w.prefix, "etcd watch idle; resyncing");
                    break;
                }
            }
        }
    }
}

async fn retry_later(prefix: &str, e: &Error, failing: &mut bool, backoff: &mut Duration) {
    if *failing {
        tracing::debug!(%prefix, error = %e, "etcd still unavailable");
    } else {
        tracing::warn!(%prefix, error = %e, "etcd unavailable; keeping the last known membership and retrying");
        *failing = true;
    }
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(RETRY_MAX);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(world_size: usize) -> (Watch, watch::Receiver<Membership>) {
        let (tx, rx) = watch::channel(Membership::default());
        let w = Watch {
            client: EtcdClient::new(&["127.0.0.1:1".into()]).unwrap(),
            prefix: GroupWatcher::prefix("c", "g"),
            world_size,
            tx,
            warned: HashSet::new(),
        };
        (w, rx)
    }

    fn put(rank: &str, addr: &str, revision: i64) -> WatchEvent {
        WatchEvent::Put {
            key: format!("/tpserve/c/g/workers/{rank}"),
            value: addr.into(),
            revision,
        }
    }

    #[test]
    fn key_follows_the_documented_layout() {
        assert_eq!(
            GroupWatcher::key("prod", "g0", 3),
            "/tpserve/prod/g0/workers/3"
        );
    }

    #[test]
    fn group_is_complete_only_with_every_rank_below_world_size() {
        let (mut w, rx) = watch(2);
        let mut members = Members::new();
        w.apply(&mut members, put("0", "a:1", 5));
        w.apply(&mut members, put("2", "c:1", 6)); // beyond world_size: ignored
        w.apply(&mut members, put("x", "d:1", 7)); // not a rank: ignored
        w.apply(&mut members, put("01", "e:1", 8)); // not the canonical spelling: ignored
        w.publish(&members);
        assert!(!rx.borrow().complete);
        w.apply(&mut members, put("1", "e:1", 8));
        w.publish(&members);
        assert!(rx.borrow().complete);
        w.apply(
            &mut members,
            WatchEvent::Delete {
                key: "/tpserve/c/g/workers/0".into(),
                revision: 9,
            },
        );
        w.publish(&members);
        let m = rx.borrow().clone();
        assert!(!m.complete);
        assert_eq!(m.members, BTreeMap::from([(1, "e:1".to_string())]));
    }

    #[test]
    fn re_registration_at_the_same_address_is_a_change() {
        let (mut w, mut rx) = watch(1);
        let mut members = Members::new();
        w.apply(&mut members, put("0", "a:1", 5));
        w.publish(&members);
        let first = rx.borrow_and_update().clone();
        w.apply(&mut members, put("0", "a:1", 9));
        w.publish(&members);
        assert!(rx.has_changed().unwrap());
        assert!(!first.same_workers(&rx.borrow()));
        // Publishing the same state again is not a change.
        rx.borrow_and_update();
        w.publish(&members);
        assert!(!rx.has_changed().unwrap());
    }
}
