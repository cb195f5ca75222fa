//! LoRA adapters read into the workers' host caches before their requests run, so that no step
//! waits on a disk read (issue 10 item 4): a request whose adapter is not yet in every rank's
//! host cache is parked here (checked, accepted, but not in the scheduler), a preload task reads
//! the adapter on every rank (`PreloadLora`, beside the steps), and when it is there the parked
//! requests join the scheduler's queue. Other requests keep running meanwhile; the step that
//! first uses the adapter only copies it into a slot. Preloads in flight plus preloaded adapters
//! waiting in the queue stay within a budget (`--max-cpu-loras` less `--max-loras`), so the
//! workers' host caches never drop an adapter whose requests are about to run; parked adapters
//! beyond it wait their turn in arrival order.
//!
//! Workers drop adapters from their host caches (least recently used, past `--max-cpu-loras`)
//! and say so in their step results; the next request of a dropped adapter is parked again. A
//! request already queued when its adapter is dropped is read on the worker's step thread when
//! it runs (correct, counted by `tpserve:lora_disk_loads_total`).

use std::collections::{HashMap, HashSet, VecDeque};

use tokio::sync::mpsc;
use tpserve_proto as pb;

use crate::adapters::AdapterInfo;
use crate::scheduler::SequenceSpec;
use crate::workers::group::LoraPreloader;

/// A preload task's outcome, for the group of `generation`.
#[derive(Debug)]
pub struct Preloaded {
    generation: u64,
    adapter: u32,
    /// The slowest rank's seconds, or what went wrong.
    pub outcome: Result<f64, String>,
}

/// Parked requests and the adapters every rank holds.
#[derive(Debug)]
pub struct LoraPreloads {
    /// Adapters in every rank's host cache, as far as the results tell.
    ready: HashSet<u32>,
    /// Requests waiting for their adapter's preload, by adapter, in arrival order.
    parked: HashMap<u32, Vec<SequenceSpec>>,
    /// The adapter each parked adapter id stands for.
    infos: HashMap<u32, AdapterInfo>,
    /// Parked adapters whose preload has not started, in arrival order.
    pending: VecDeque<u32>,
    /// Parked adapters whose preload is under way.
    loading: HashSet<u32>,
    /// Most preloads in flight plus preloaded adapters waiting in the scheduler's queue.
    budget: usize,
    /// Bumped when the group changes: outcomes of older preloads are ignored.
    generation: u64,
    done_tx: mpsc::UnboundedSender<Preloaded>,
    done_rx: mpsc::UnboundedReceiver<Preloaded>,
}

impl LoraPreloads {
    /// No adapter ready yet; at most `budget` preloads in flight and preloaded adapters
    /// waiting.
    pub fn new(budget: usize) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Self {
            ready: HashSet::new(),
            parked: HashMap::new(),
            infos: HashMap::new(),
            pending: VecDeque::new(),
            loading: HashSet::new(),
            budget,
            generation: 0,
            done_tx,
            done_rx,
        }
    }

    /// Whether `adapter`'s requests may go to the scheduler now (0, the base model, always).
    pub fn is_ready(&self, adapter: u32) -> bool {
        adapter == 0 || self.ready.contains(&adapter)
    }

    /// Requests parked.
    pub fn num_parked(&self) -> usize {
        self.parked.values().map(Vec::len).sum()
    }

    /// Parks `spec` until `adapter` is in every rank's host cache; its preload starts with
    /// [`LoraPreloads::start_pending`] unless one is under way or due.
    pub fn park(&mut self, spec: SequenceSpec, adapter: &AdapterInfo) {
        let waiting = self.parked.entry(adapter.id).or_default();
        let first = waiting.is_empty();
        waiting.push(spec);
        if first && !self.loading.contains(&adapter.id) {
            self.infos.insert(adapter.id, adapter.clone());
            self.pending.push_back(adapter.id);
        }
    }

    /// Whether some parked adapter's preload has not started.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Starts preloads on `group` while the budget allows, counting `queued` preloaded adapters
    /// whose requests wait in the scheduler's queue.
    pub fn start_pending(&mut self, group: &LoraPreloader, queued: usize) {
        while self.loading.len() + queued < self.budget {
            let Some(id) = self.pending.pop_front() else {
                return;
            };
            let Some(info) = self.infos.get(&id) else {
                continue; // its requests were all aborted
            };
            if self.parked.get(&id).is_none_or(Vec::is_empty) {
                continue;
            }
            self.start(info, group.clone());
            self.loading.insert(id);
        }
    }

    fn start(&self, adapter: &AdapterInfo, group: LoraPreloader) {
        let request = pb::LoraAdapter {
            adapter_id: adapter.id,
            path: adapter.path.display().to_string(),
            name: adapter.name.clone(),
        };
        let (generation, id, done) = (self.generation, adapter.id, self.done_tx.clone());
        tokio::spawn(async move {
            let outcome = group.preload(request).await.map_err(|e| e.to_string());
            let _ = done.send(Preloaded {
                generation,
                adapter: id,
                outcome,
            });
        });
    }

    /// A parked request was aborted: forgets it. False if it is not parked.
    pub fn abort(&mut self, id: u64) -> bool {
        for waiting in self.parked.values_mut() {
            if let Some(i) = waiting.iter().position(|s| s.id == id) {
                waiting.remove(i);
                return true;
            }
        }
        false
    }

    /// The group is gone or new: nothing is in its ranks' host caches, and its preloads no
    /// longer count; the adapters of parked requests are preloaded again.
    pub fn forget_group(&mut self) {
        self.generation += 1;
        self.ready.clear();
        self.pending.extend(self.loading.drain());
    }

    /// Every parked request, taken (they end with the group's loss).
    pub fn take_all(&mut self) -> Vec<SequenceSpec> {
        self.infos.clear();
        self.pending.clear();
        self.loading.clear();
        self.parked.drain().flat_map(|(_, v)| v).collect()
    }

    /// Adapters some rank dropped from its host cache.
    pub fn dropped(&mut self, ids: &[u32]) {
        for id in ids {
            self.ready.remove(id);
        }
    }

    /// A finished preload, once one is there (never when none can come).
    pub async fn next(&mut self) -> Preloaded {
        // `done_tx` lives in `self`, so the channel never closes.
        self.done_rx.recv().await.expect("the sender is held")
    }

    /// A finished preload, if one is there now.
    pub fn try_next(&mut self) -> Option<Preloaded> {
        self.done_rx.try_recv().ok()
    }

    /// Applies a finished preload: the adapter and its parked requests (to schedule when the
    /// preload succeeded, to fail otherwise), or `None` for a preload of an earlier group.
    pub fn finish(&mut self, done: &Preloaded) -> Option<(AdapterInfo, Vec<SequenceSpec>)> {
        if done.generation != self.generation {
            return None;
        }
        self.loading.remove(&done.adapter);
        if done.outcome.is_ok() {
            self.ready.insert(done.adapter);
        }
        let info = self.infos.remove(&done.adapter)?;
        let parked = self.parked.remove(&done.adapter).unwrap_or_default();
        Some((info, parked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Sampling, Share};
    use std::path::PathBuf;

    fn info(id: u32) -> AdapterInfo {
        AdapterInfo {
            id,
            name: format!("a{id}"),
            path: PathBuf::from(format!("/adapters/a{id}")),
            rank: 8,
            created: 0,
        }
    }

    fn spec(id: u64, adapter: u32) -> SequenceSpec {
        SequenceSpec {
            id,
            token_ids: vec![1, 2, 3],
            max_tokens: 4,
            sampling: Sampling::default(),
            extras: Default::default(),
            priority: 0,
            cache_salt: 0,
            share: Share::default(),
            adapter,
            guided: false,
        }
    }

    fn done(generation: u64, adapter: u32, outcome: Result<f64, String>) -> Preloaded {
        Preloaded {
            generation,
            adapter,
            outcome,
        }
    }

    #[test]
    fn parked_requests_are_released_when_their_adapter_is_there() {
        let mut p = LoraPreloads::new(4);
        assert!(p.is_ready(0) && !p.is_ready(1));
        p.park(spec(10, 1), &info(1));
        p.park(spec(11, 1), &info(1));
        p.park(spec(12, 2), &info(2));
        assert_eq!(p.pending, [1, 2]);
        assert_eq!(p.num_parked(), 3);
        assert!(p.abort(11) && !p.abort(11));
        let (a, released) = p.finish(&done(0, 1, Ok(0.5))).unwrap();
        assert_eq!(a.id, 1);
        assert_eq!(released.iter().map(|s| s.id).collect::<Vec<_>>(), vec![10]);
        assert!(p.is_ready(1) && !p.is_ready(2));
        // A failed preload gives back its requests, and the adapter stays not ready.
        let (_, failed) = p.finish(&done(0, 2, Err("gone".into()))).unwrap();
        assert_eq!(failed.len(), 1);
        assert!(!p.is_ready(2));
        assert_eq!(p.num_parked(), 0);
        p.dropped(&[1]);
        assert!(!p.is_ready(1));
    }

    #[test]
    fn preloads_of_an_earlier_group_do_not_count() {
        let mut p = LoraPreloads::new(4);
        p.park(spec(10, 1), &info(1));
        p.pending.clear();
        p.loading.insert(1);
        p.forget_group();
        assert_eq!(p.pending, [1], "to be preloaded again on the new group");
        assert!(p.finish(&done(0, 1, Ok(0.1))).is_none());
        assert!(!p.is_ready(1));
        assert_eq!(p.num_parked(), 1);
        assert!(p.finish(&done(1, 1, Ok(0.1))).is_some());
        assert!(p.is_ready(1));
    }

    #[tokio::test]
    async fn preloads_start_within_the_budget_in_arrival_order() {
        let mut p = LoraPreloads::new(3);
        for a in 1..=5 {
            p.park(spec(u64::from(a) * 10, a), &info(a));
        }
        let group = LoraPreloader::without_ranks();
        // One preloaded adapter already waits in the queue: two more may load.
        p.start_pending(&group, 1);
        assert_eq!(p.loading, HashSet::from([1, 2]));
        assert_eq!(p.pending, [3, 4, 5]);
        let first = p.next().await;
        assert!(first.outcome.is_ok());
        p.finish(&first).unwrap();
        p.start_pending(&group, 1);
        assert_eq!(p.loading.len(), 2);
        assert_eq!(p.pending, [4, 5]);
        // An adapter whose parked requests were all aborted is skipped.
        assert!(p.abort(40));
        p.start_pending(&group, 0);
        assert!(!p.loading.contains(&4) && p.pending.is_empty());
    }
}
