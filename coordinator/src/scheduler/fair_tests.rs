//! Fair-share scenarios: tenants as closed-loop clients driven step by step (synchronous
//! protocol), and the preemption that lets a tenant below its share into a full batch.

use super::tests::{config, prompt, spec, step};
use super::*;

const A: Share = Share {
    tenant: 1,
    weight: 1,
};

fn fair_config(max_num_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_model_len: 1024,
        policy: SchedulingPolicy::Fair,
        ..config(16, 4096)
    }
}

fn add(s: &mut Scheduler, id: u64, share: Share, max_tokens: usize) {
    let mut sp = spec(id, prompt(id as u32 * 100, 30), max_tokens);
    sp.share = share;
    s.add(sp).unwrap();
}

/// Tenants as closed loops: each of a tenant's streams sends its next request the step after
/// its previous one ended, so every tenant stays backlogged.
struct ClosedLoops {
    s: Scheduler,
    /// Live id -> index of its tenant in `shares`.
    owner: HashMap<u64, usize>,
    shares: Vec<Share>,
    next_id: u64,
    max_tokens: usize,
    /// Output tokens each tenant received while counting.
    tokens: Vec<u64>,
}

impl ClosedLoops {
    fn new(cfg: SchedulerConfig, tenants: &[(Share, usize)], max_tokens: usize) -> Self {
        let mut c = ClosedLoops {
            s: Scheduler::new(cfg),
            owner: HashMap::new(),
            shares: tenants.iter().map(|t| t.0).collect(),
            next_id: 0,
            max_tokens,
            tokens: vec![0; tenants.len()],
        };
        for (t, &(_, streams)) in tenants.iter().enumerate() {
            for _ in 0..streams {
                c.send(t);
            }
        }
        c
    }

    fn send(&mut self, tenant: usize) {
        add(
            &mut self.s,
            self.next_id,
            self.shares[tenant],
            self.max_tokens,
        );
        self.owner.insert(self.next_id, tenant);
        self.next_id += 1;
    }

    fn run(&mut self, steps: usize, count: bool) {
        for _ in 0..steps {
            let plan = step(&mut self.s);
            for id in plan.sampled {
                let tenant = self.owner[&id];
                self.tokens[tenant] += u64::from(count);
                if self.s.output_token_ids(id).unwrap().len() == self.max_tokens {
                    self.s.finish(id);
                    self.owner.remove(&id);
                    self.send(tenant);
                }
            }
        }
    }
}

#[test]
fn backlogged_tenants_get_tokens_in_proportion_to_their_weights() {
    // The benchmark's shape: 8 slots, A with ten times B's streams, 30-token prompts, 32
    // output tokens. Tolerance: within 10% of weight_B / weight_A (the bar).
    for weight_b in [1, 3] {
        let b = Share {
            tenant: 2,
            weight: weight_b,
        };
        let mut c = ClosedLoops::new(fair_config(8), &[(A, 80), (b, 8)], 32);
        c.run(200, false);
        c.run(2000, true);
        let ratio = c.tokens[1] as f64 / c.tokens[0] as f64;
        let want = f64::from(weight_b);
        assert!(
            (ratio - want).abs() / want < 0.1,
            "weights 1:{weight_b}: B/A {ratio:.3} ({:?} tokens)",
            c.tokens
        );
    }
}

#[test]
fn fcfs_gives_a_flooding_tenant_the_batch() {
    // The same load without fair share: B gets about its tenth of the streams.
    let mut cfg = fair_config(8);
    cfg.policy = SchedulingPolicy::Fcfs;
    let b = Share {
        tenant: 2,
        weight: 3,
    };
    let mut c = ClosedLoops::new(cfg, &[(A, 80), (b, 8)], 32);
    c.run(200, false);
    c.run(2000, true);
    let ratio = c.tokens[1] as f64 / c.tokens[0] as f64;
    assert!(ratio < 0.2, "B/A {ratio:.3}");
    assert_eq!(c.s.stats().num_preemptions, 0);
}

/// (running, waiting) sequences of `tenant`.
fn held(s: &Scheduler, tenant: u64) -> (usize, usize) {
    let of = |id: &u64| s.seqs[id].share.tenant == tenant;
    let running = s.running.iter().filter(|id| of(id)).count();
    (running, s.waiting.ids().iter().filter(|id| of(id)).count())
}

/// Runs `steps` steps; the ids they start and the ids they free.
fn steps(s: &mut Scheduler, steps: usize) -> (Vec<u64>, Vec<u64>) {
    let (mut started, mut freed) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let plan = step(s);
        started.extend(plan.new.iter().map(|n| n.id));
        freed.extend(plan.freed);
    }
    (started, freed)
}

#[test]
fn a_tenant_below_its_share_preempts_the_newest_sequence_of_the_one_above() {
    let b = Share {
        tenant: 2,
        weight: 1,
    };
    let mut s = Scheduler::new(fair_config(4));
    for id in 0..6 {
        add(&mut s, id, A, 32);
    }
    step(&mut s); // A's 0..4 fill the batch; 4 and 5 wait
    add(&mut s, 10, b, 32);
    let plan = step(&mut s);
    // A's decodes put it ahead of B (lifted level with A on arrival), and B's share is 2 of the
    // 4 slots: B starts at once, in place of A's newest (3).
    assert_eq!(plan.new.iter().map(|n| n.id).collect::<Vec<_>>(), vec![10]);
    assert_eq!(plan.freed, vec![3]);
    assert_eq!(
        plan.running.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    // Two more B requests: once A's counter passes B's again, one takes A's 2; the other would
    // put B above its share and A below, so it waits for a slot to free (none does: A's
    // requests run 32 steps).
    add(&mut s, 11, b, 32);
    add(&mut s, 12, b, 32);
    let (started, freed) = steps(&mut s, 20);
    assert_eq!((started, freed), (vec![11], vec![2]));
    assert_eq!(s.stats().num_preemptions, 2);
    assert_eq!(held(&s, 1), (2, 4), "A: 0 and 1 run; 3, 2, 4, 5 wait");
    assert_eq!(held(&s, 2), (2, 1));
}

#[test]
fn weights_set_the_share_a_preempting_tenant_may_reach() {
    // 4 slots, B of weight 3: B may take 3 of them from A, not 4.
    let b = Share {
        tenant: 2,
        weight: 3,
    };
    let mut s = Scheduler::new(fair_config(4));
    for id in 0..5 {
        add(&mut s, id, A, 32);
    }
    step(&mut s);
    for id in 10..14 {
        add(&mut s, id, b, 32);
    }
    let (started, freed) = steps(&mut s, 25);
    assert_eq!(started, vec![10, 11, 12]);
    assert_eq!(freed, vec![3, 2, 1]);
    assert_eq!(held(&s, 1), (1, 4));
    assert_eq!(held(&s, 2), (3, 1));
}

#[test]
fn a_tenant_ahead_in_counter_does_not_preempt_one_behind() {
    // B has been served far more than A (its counter is ahead), so although B holds no slot it
    // takes none from A: it starts when a slot frees and its counter is the smallest.
    let b = Share {
        tenant: 2,
        weight: 1,
    };
    let mut s = Scheduler::new(fair_config(2));
    add(&mut s, 10, b, 1);
    step(&mut s);
    s.finish(10);
    s.waiting.charge(b, 10_000);
    for id in 0..2 {
        add(&mut s, id, A, 32);
    }
    step(&mut s);
    // B is the only tenant waiting and holds none of the 2 slots (its share is 1), but A, with
    // both, has been served less.
    add(&mut s, 11, b, 32);
    let plan = step(&mut s);
    assert!(plan.new.is_empty() && plan.freed.is_empty());
    assert_eq!(s.stats().num_preemptions, 0);
}

#[test]
fn fcfs_and_priority_never_preempt_for_a_share() {
    for policy in [SchedulingPolicy::Fcfs, SchedulingPolicy::Priority] {
        let b = Share {
            tenant: 2,
            weight: 1,
        };
        let mut cfg = fair_config(2);
        cfg.policy = policy;
        let mut s = Scheduler::new(cfg);
        add(&mut s, 0, A, 32);
        add(&mut s, 1, A, 32);
        step(&mut s);
        add(&mut s, 10, b, 32);
        let plan = step(&mut s);
        assert!(plan.new.is_empty(), "{policy:?}");
        assert_eq!(s.stats().num_preemptions, 0, "{policy:?}");
    }
}
