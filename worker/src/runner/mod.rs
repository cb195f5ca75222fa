//! The worker's engine room: owns the backend (the model shard, the KV cache and the
//! communicator on one device) and the state of every sequence it has been sent, and turns step
//! plans into sampled tokens. Lives on one dedicated thread (the communicator and the model are
//! not shared, and a CUDA context is bound to it), fed by the gRPC service.
//!
//! A plan is validated completely before the first collective, and validation depends only on
//! the plan and on state that every rank shares, so either all ranks fail a bad plan or none
//! does, and a failure never leaves a peer waiting inside an all-reduce.
//!
//! Steps can be sent ahead (`Runner::submit`): step N+1 is launched before step N is answered.
//! A sequence's token sampled by a step not answered yet is pending; a row of the next step that
//! decodes it is fed on the device (`Batch::fed`) when the backend can and the step needs no
//! extras, else step N is answered first. Tokens go back to the sequence that asked only (a later
//! plan may free the id or reuse it: each admitted sequence has its own generation).
//!
//! Each sequence holds a row (`slot`) of the backend's persistent per-sequence state from its
//! first step until it is freed; rows are handed out lowest first from a pool as large as the
//! most sequences a step may carry (`ProfileMemory`'s `max_num_seqs`), so the CUDA backend keeps
//! block tables on the device and sends only the blocks each step appends.
//!
//! `admit.rs` applies a plan's diff to the sequences (`sequence.rs`); `rows.rs` lays a step's
//! rows out as the backend's batch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tpserve_modelfile::LlamaConfig;
use tpserve_proto as pb;

use crate::backend::{Backend, CacheShape, DecodePrep, DeviceInfo, Launched};
use crate::batch::{Batch, SeqSlice};
use crate::error::{Result, WorkerError};
use crate::load::{LoadSpec, MemoryBudget};
use crate::lora::{Adapters, HostCache, LoraLimits, PlaceCounts};
use crate::sampler::{RowExtras, SampleSpec};
use crate::step_trace::StepTrace;

mod admit;
mod rows;
mod sequence;

use self::rows::{build_batch, row_extras};
use self::sequence::{RowRole, Scheduled, SequenceState, SlotPool};

/// What one step produced on this worker (rank 0; other ranks return it empty).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutcome {
    /// One token per sequence whose computed tokens reached its known tokens.
    pub tokens: Vec<pb::SampledToken>,
    /// Prompt log probabilities of the sequences that asked for them.
    pub prompt_logprobs: Vec<pb::PromptLogprobs>,
    /// What placing the step's LoRA adapters did.
    pub lora: PlaceCounts,
    /// The pooled vectors of the embedding sequences whose prompt this step finished.
    pub pooled: Vec<pb::PooledOutput>,
}

/// Where a submitted step's outcome goes; it runs on the runner thread.
pub type StepReply = Box<dyn FnOnce(&mut Runner, Result<StepOutcome>) + Send>;

/// One plan's answer from [`Runner::submit_all`].
#[derive(Debug)]
pub struct Answered {
    pub step_id: u64,
    pub outcome: Result<StepOutcome>,
    /// When its reply ran.
    pub at: Instant,
}

/// A begun step: its outcome, or what completing it needs.
enum Begun {
    /// Nothing sampled (an empty or embedding step): the outcome is known.
    Ready(StepOutcome),
    /// Launched; its tokens are collected when it is answered.
    Sampling(Launch),
}

/// A launched step's sample rows and tokens.
struct Launch {
    /// Each sample row's role and the generation of the sequence it belongs to.
    rows: Vec<(RowRole, u64)>,
    lora: PlaceCounts,
    tokens: Launched,
    /// Whether the backend launched it (no extras), so the next step's rows can take its
    /// tokens on the device.
    feeds: bool,
}

/// A submitted step not answered yet.
struct InFlight {
    step: Begun,
    reply: StepReply,
}

impl InFlight {
    fn feeds(&self) -> bool {
        matches!(&self.step, Begun::Sampling(l) if l.feeds)
    }
}

/// Sequences a runner holds before `ProfileMemory` names the step limit.
const DEFAULT_MAX_REQUESTS: usize = 256;

/// What `Runner::warmup` did.
#[derive(Debug, Clone, Copy, Default)]
pub struct WarmupReport {
    /// Seconds of the whole warm-up, graph capture included.
    pub seconds: f64,
    /// What preparing the decode steps did (tuning, CUDA graphs).
    pub decode: DecodePrep,
}

/// The worker's state machine: communicator -> model -> cache -> steps, on one backend.
pub struct Runner {
    backend: Box<dyn Backend>,
    sequences: HashMap<u64, SequenceState>,
    slots: SlotPool,
    /// Vocabulary of the loaded model (0 before LoadModel).
    vocab_size: usize,
    /// The loaded model's config (LoRA adapters are checked against it).
    config: Option<LlamaConfig>,
    /// LoRA adapters: host cache and slots.
    adapters: Adapters,
    /// The step submitted last, until answered.
    in_flight: Option<InFlight>,
    /// The generation the next admitted sequence gets.
    next_generation: u64,
}

impl Runner {
    /// A runner on `backend`.
    pub fn new(backend: Box<dyn Backend>) -> Self {
        Self {
            backend,
            sequences: HashMap::new(),
            slots: SlotPool::new(DEFAULT_MAX_REQUESTS),
            vocab_size: 0,
            config: None,
            adapters: Adapters::default(),
            in_flight: None,
            next_generation: 0,
        }
    }

    /// The device, for `Info`.
    pub fn info(&self) -> DeviceInfo {
        self.backend.info()
    }

    /// Rank 0: creates the id every rank joins with.
    pub fn communicator_id(&mut self, world_size: usize) -> Result<Vec<u8>> {
        self.backend.communicator_id(world_size)
    }

    /// Joins the group. Rank 0 must have created the id first.
    pub fn init_communicator(&mut self, id: &[u8], rank: usize, world_size: usize) -> Result<()> {
        self.clear_sequences();
        self.backend.init_communicator(id, rank, world_size)
    }

    /// Loads this rank's shard.
    pub fn load_model(&mut self, req: &pb::LoadModelRequest) -> Result<pb::LoadModelResponse> {
        self.clear_sequences();
        self.vocab_size = 0;
        self.config = None;
        let spec = LoadSpec::from(req);
        let limits = LoraLimits {
            max_loras: spec.max_loras,
            max_rank: spec.max_lora_rank,
            max_cpu_loras: spec.max_cpu_loras.max(spec.max_loras),
        };
        self.adapters.reset(LoraLimits::default(), None);
        let loaded = self.backend.load_model(&spec)?;
        self.vocab_size = loaded.vocab_size;
        self.config = self.backend.model_config().cloned();
        self.adapters.reset(limits, self.config.as_ref());
        Ok(loaded.into())
    }

    /// Checks what the plan checks cannot: every position has rotary tables and every token id
    /// is in the vocabulary. Runs on every rank before any collective.
    fn check_batch(&self, batch: &Batch) -> Result<()> {
        let max_pos = self.backend.max_positions()?;
        if let Some(p) = batch.positions.iter().find(|p| **p >= max_pos) {
            return Err(WorkerError::Plan {
                detail: format!("position {p} is beyond the model's {max_pos} positions"),
            });
        }
        if let Some(t) = batch
            .token_ids
            .iter()
            .find(|t| **t as usize >= self.vocab_size)
        {
            return Err(WorkerError::Plan {
                detail: format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            });
        }
        Ok(())
    }

    /// Forgets every sequence and frees every row of the persistent state.
    fn clear_sequences(&mut self) {
        self.finish_in_flight();
        self.sequences.clear();
        self.slots = SlotPool::new(self.slots.capacity);
    }

    /// How many blocks fit. The step limits it is given also size the per-sequence state.
    pub fn profile_memory(
        &mut self,
        req: &pb::ProfileMemoryRequest,
    ) -> Result<pb::ProfileMemoryResponse> {
        self.clear_sequences();
        self.slots = SlotPool::new(req.max_num_seqs.max(1) as usize);
        Ok(self
            .backend
            .profile_memory(&MemoryBudget::from(req))?
            .into())
    }

    /// Allocates the cache.
    pub fn init_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<u64> {
        if num_blocks == 0 || block_size == 0 {
            return Err(WorkerError::Cache {
                detail: format!(
                    "cannot make a cache of {num_blocks} blocks of {block_size} tokens"
                ),
            });
        }
        self.clear_sequences();
        self.backend.init_cache(CacheShape {
            num_blocks,
            block_size,
            max_sequences: self.slots.capacity,
        })
    }

    /// True once steps can run.
    pub fn ready(&self) -> bool {
        self.backend.cache_shape().is_some()
    }

    fn cache_shape(&self, operation: &'static str) -> Result<(usize, usize)> {
        self.backend.cache_shape().ok_or(WorkerError::Lifecycle {
            operation,
            needs: "InitCache",
        })
    }

    /// Runs the largest step the limits allow on scratch blocks (forgetting every sequence),
    /// then prepares decode steps: kernel choices measured per shape and, on a GPU, CUDA
    /// graphs captured for the batch sizes in `graph_sizes` (none: every step runs eagerly).
    pub fn warmup(
        &mut self,
        max_tokens: usize,
        max_seqs: usize,
        graph_sizes: &[usize],
        custom_all_reduce: bool,
    ) -> Result<WarmupReport> {
        let started = Instant::now();
        let (num_blocks, block_size) = self.cache_shape("Warmup")?;
        // It overwrites cache blocks and per-sequence rows: no sequence survives it.
        self.clear_sequences();
        let max_pos = self.backend.max_positions()?;
        let seqs = max_seqs
            .clamp(1, max_tokens.max(1))
            .min(self.slots.capacity);
        let per_seq = (max_tokens / seqs).clamp(1, max_pos);
        let mut batch = Batch::default();
        let mut next_block = 0usize;
        for _ in 0..seqs {
            let blocks = per_seq.div_ceil(block_size);
            if next_block + blocks > num_blocks {
                break;
            }
            let block_ids: Vec<u32> = (next_block..next_block + blocks)
                .map(|b| b as u32)
                .collect();
            next_block += blocks;
            let first = batch.token_ids.len();
            for p in 0..per_seq {
                batch.token_ids.push(0);
                batch.positions.push(p);
                batch
                    .slots
                    .push(block_ids[p / block_size] as usize * block_size + p % block_size);
            }
            batch.sample_rows.push(first + per_seq - 1);
            batch.seqs.push(SeqSlice {
                rows: first..first + per_seq,
                start_pos: 0,
                block_ids,
                slot: batch.seqs.len(),
                new_blocks_from: 0,
                lora_slot: None,
            });
        }
        let sampling = vec![SampleSpec::greedy(); batch.sample_rows.len()];
        self.backend.step(&batch, &sampling, &[])?;
        let decode = self
            .backend
            .prepare_decode(graph_sizes, custom_all_reduce)?;
        Ok(WarmupReport {
            seconds: started.elapsed().as_secs_f64(),
            decode,
        })
    }

    /// Logits of every position of `tokens`, `[tokens.len(), vocab]` on rank 0 (`None` on
    /// the others), prefilled in chunks of `chunk` tokens through the paged cache (blocks from
    /// the end of the cache, in reverse order, so paging is exercised). For numerical checks;
    /// the cache must hold no running sequence (it uses the first row of the per-sequence state).
    pub fn prompt_logits(&mut self, tokens: &[u32], chunk: usize) -> Result<Option<Vec<f32>>> {
        self.prompt_logits_with_adapter(tokens, chunk, None)
    }

    /// As [`Runner::prompt_logits`], with the PEFT adapter in the directory `adapter` (LoRA must
    /// be on: `LoadModel`'s `max_loras`), under the adapter id `u32::MAX`.
    pub fn prompt_logits_with_adapter(
        &mut self,
        tokens: &[u32],
        chunk: usize,
        adapter: Option<&str>,
    ) -> Result<Option<Vec<f32>>> {
        self.finish_in_flight();
        let (num_blocks, block_size) = self.cache_shape("prompt_logits")?;
        let lora_slot = match adapter {
            Some(path) => {
                let config = self.config.as_ref().ok_or(WorkerError::Lifecycle {
                    operation: "prompt_logits",
                    needs: "LoadModel",
                })?;
                self.adapters.register(u32::MAX, path);
                let (slots, _) = self
                    .adapters
                    .place(&[u32::MAX], config, self.backend.as_mut())?;
                Some(slots[0])
            }
            None => None,
        };
        let needed = tokens.len().div_ceil(block_size);
        if needed > num_blocks || chunk == 0 {
            return Err(WorkerError::Cache {
                detail: format!("{} tokens do not fit the cache", tokens.len()),
            });
        }
        let blocks: Vec<u32> = (num_blocks - needed..num_blocks)
            .rev()
            .map(|b| b as u32)
            .collect();
        let mut out: Option<Vec<f32>> = None;
        for start in (0..tokens.len()).step_by(chunk) {
            let end = (start + chunk).min(tokens.len());
            let batch = Batch {
                token_ids: tokens[start..end].to_vec(),
                positions: (start..end).collect(),
                slots: (start..end)
                    .map(|p| blocks[p / block_size] as usize * block_size + p % block_size)
                    .collect(),
                seqs: vec![SeqSlice {
                    rows: 0..end - start,
                    start_pos: start,
                    block_ids: blocks.clone(),
                    slot: 0,
                    new_blocks_from: 0,
                    lora_slot,
                }],
                sample_rows: (0..end - start).collect(),
                fed: Vec::new(),
            };
            self.check_batch(&batch)?;
            if let Some(rows) = self.backend.logits(&batch)? {
                out.get_or_insert_with(Vec::new).extend(rows);
            }
        }
        Ok(out)
    }

    /// The LoRA host cache, which the service's `PreloadLora` fills beside the steps.
    pub fn lora_host_cache(&self) -> Arc<Mutex<HostCache>> {
        self.adapters.host_cache()
    }

    /// Adapters dropped from the host cache since the last call (every rank reports them).
    pub fn take_lora_dropped(&mut self) -> Vec<u32> {
        self.adapters.take_dropped()
    }

    /// Executes one plan and waits for it; rank 0 returns the sampled tokens (and the log
    /// probabilities asked for), other ranks an empty outcome. A step submitted before is
    /// answered first.
    pub fn step(&mut self, plan: &pb::StepPlan) -> Result<StepOutcome> {
        self.finish_in_flight();
        let begun = self.begin(plan, &mut None)?;
        self.complete(begun)
    }

    /// Launches `plan` and leaves it in flight; `reply` gets its outcome once its tokens are
    /// back ([`Runner::finish_in_flight`], or the next `submit`). A step already in flight is
    /// answered after `plan` is launched, so a decode step whose tokens the device feeds into
    /// `plan` starts with no wait for the host: the GPU runs step N+1 while the host answers
    /// step N.
    pub fn submit(&mut self, plan: &pb::StepPlan, reply: StepReply) {
        let mut previous = self.in_flight.take();
        let begun = self.begin(plan, &mut previous);
        if let Some(previous) = previous {
            self.answer(previous);
        }
        match begun {
            Ok(step) => self.in_flight = Some(InFlight { step, reply }),
            Err(e) => reply(self, Err(e)),
        }
    }

    /// Submits `plans` back to back, as the server's worker runs plans sent ahead, then answers
    /// the last; returns every answer in the order the replies ran (plan order).
    pub fn submit_all(&mut self, plans: &[pb::StepPlan]) -> Vec<Answered> {
        let (tx, rx) = std::sync::mpsc::channel();
        for plan in plans {
            let (tx, step_id) = (tx.clone(), plan.step_id);
            self.submit(
                plan,
                Box::new(move |_, outcome| {
                    let at = Instant::now();
                    let _ = tx.send(Answered {
                        step_id,
                        outcome,
                        at,
                    });
                }),
            );
        }
        self.finish_in_flight();
        drop(tx);
        rx.into_iter().collect()
    }

    /// Whether a submitted step has not been answered.
    pub fn has_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether the step in flight (if any) can be answered without waiting.
    pub fn in_flight_ready(&self) -> bool {
        match &self.in_flight {
            Some(InFlight {
                step: Begun::Sampling(launch),
                ..
            }) => self.backend.tokens_ready(&launch.tokens),
            _ => true,
        }
    }

    /// Waits for the step in flight, if any, and answers it.
    pub fn finish_in_flight(&mut self) {
        if let Some(previous) = self.in_flight.take() {
            self.answer(previous);
        }
    }

    /// Completes `in_flight` and hands its outcome to its reply.
    fn answer(&mut self, in_flight: InFlight) {
        let outcome = self.complete(in_flight.step);
        (in_flight.reply)(self, outcome);
    }

    /// Admits `plan` and launches it. Rows whose token is the sample of the step in flight
    /// (`previous`) take it on the device when the backend can feed this batch and the step has
    /// no extras; otherwise `previous` is answered first and the rows read its tokens.
    fn begin(&mut self, plan: &pb::StepPlan, previous: &mut Option<InFlight>) -> Result<Begun> {
        let trace = StepTrace::begin(plan);
        let scheduled = self.admit(plan)?;
        let lora = self.place_adapters(&scheduled)?;
        let (num_blocks, block_size) = self.cache_shape("Step")?;
        let (mut batch, mut roles) =
            build_batch(&self.sequences, &scheduled, block_size, num_blocks)?;
        if batch.num_tokens() == 0 {
            return Ok(Begun::Ready(StepOutcome::default()));
        }
        self.check_batch(&batch)?;
        if self.pools(&scheduled) {
            let pooled = self.pool_step(&batch, &scheduled)?;
            if let Some(trace) = trace {
                trace.end(self.backend.rank(), batch.num_tokens());
            }
            return Ok(Begun::Ready(StepOutcome {
                lora,
                pooled,
                ..StepOutcome::default()
            }));
        }
        // Every rank takes the same decision from the same plan (the CUDA backend's host path
        // has collectives); only rank 0's sampling reads the masks.
        let masks: HashMap<u64, &[u32]> = plan
            .token_masks
            .iter()
            .map(|m| (m.sequence_id, m.allowed.as_slice()))
            .collect();
        let needs_extras = |r: &RowRole| {
            self.sequences[&r.id].needs_extras()
                || (r.prompt_position.is_none() && masks.contains_key(&r.id))
        };
        let with_extras = roles.iter().any(needs_extras);
        if !batch.fed.is_empty() {
            let feeds = !with_extras
                && self.backend.feeds(&batch)
                && previous.as_ref().is_some_and(InFlight::feeds);
            if !feeds {
                // The rows need the tokens on the host first.
                if let Some(previous) = previous.take() {
                    self.answer(previous);
                }
                (batch, roles) = build_batch(&self.sequences, &scheduled, block_size, num_blocks)?;
                if !batch.fed.is_empty() {
                    return Err(WorkerError::Plan {
                        detail: "a step schedules a token that no step has sampled".into(),
                    });
                }
            }
        }
        let sampling: Vec<SampleSpec> = roles
            .iter()
            .map(|role| {
                let state = self.sequences.get_mut(&role.id).expect("validated");
                match role.prompt_position {
                    // Scoring rows draw nothing: the sequence's random stream is untouched.
                    Some(_) => SampleSpec::greedy(),
                    None => SampleSpec {
                        params: state.sampling,
                        seed: state.rng.next_seed(),
                    },
                }
            })
            .collect();
        let tokens = if with_extras {
            let extras: Vec<RowExtras> = roles
                .iter()
                .map(|r| {
                    let mut extras = row_extras(&self.sequences[&r.id], r);
                    if r.prompt_position.is_none() {
                        extras.allowed = masks.get(&r.id).map(|m| m.to_vec());
                    }
                    extras
                })
                .collect();
            Launched::Done(self.backend.step(&batch, &sampling, &extras)?)
        } else {
            self.backend.launch(&batch, &sampling)?
        };
        if let Some(trace) = trace {
            trace.end(self.backend.rank(), batch.num_tokens());
        }
        for s in &scheduled {
            let state = self.sequences.get_mut(&s.id).expect("validated");
            state.num_computed += s.count;
            if s.count > 0 {
                state.blocks_seen = state.block_ids.len();
            }
        }
        let mut rows = Vec::with_capacity(roles.len());
        for (sample, role) in roles.into_iter().enumerate() {
            let state = self.sequences.get_mut(&role.id).expect("validated");
            if role.prompt_position.is_none() {
                state.pending.push_back(sample);
            }
            rows.push((role, state.generation));
        }
        Ok(Begun::Sampling(Launch {
            rows,
            lora,
            tokens,
            feeds: !with_extras,
        }))
    }

    /// Waits for a begun step's tokens and gives them to their sequences (those still held by
    /// the sequence that asked: a later plan may have freed the id or reused it).
    fn complete(&mut self, begun: Begun) -> Result<StepOutcome> {
        let launch = match begun {
            Begun::Ready(outcome) => return Ok(outcome),
            Begun::Sampling(launch) => launch,
        };
        let sampled = self.backend.collect(launch.tokens).and_then(|s| {
            if s.tokens.len() == launch.rows.len() {
                Ok(s)
            } else {
                Err(WorkerError::Device {
                    detail: format!(
                        "a step of {} sampled rows returned {} tokens",
                        launch.rows.len(),
                        s.tokens.len()
                    ),
                })
            }
        });
        let sampled = match sampled {
            Ok(sampled) => sampled,
            Err(e) => {
                // The sequences no longer wait for these tokens (the step failed).
                for (role, generation) in &launch.rows {
                    if let Some(state) = self.sequences.get_mut(&role.id) {
                        if state.generation == *generation && role.prompt_position.is_none() {
                            state.pending.pop_front();
                        }
                    }
                }
                return Err(e);
            }
        };
        let mut out = StepOutcome {
            lora: launch.lora,
            ..StepOutcome::default()
        };
        let mut logprobs = sampled.logprobs.into_iter();
        for ((role, generation), token) in launch.rows.into_iter().zip(sampled.tokens) {
            let lp = logprobs.next().flatten().map(pb::TokenLogprobs::from);
            if let Some(position) = role.prompt_position {
                let entry = lp.unwrap_or_default();
                match out.prompt_logprobs.last_mut() {
                    Some(p) if p.sequence_id == role.id => p.entries.push(entry),
                    _ => out.prompt_logprobs.push(pb::PromptLogprobs {
                        sequence_id: role.id,
                        first_position: position as u32,
                        entries: vec![entry],
                    }),
                }
                continue;
            }
            if let Some(state) = self
                .sequences
                .get_mut(&role.id)
                .filter(|s| s.generation == generation)
            {
                state.pending.pop_front();
                state.tokens.push(token);
                if let Some(history) = state.history.as_mut() {
                    history.push(token);
                }
            }
            out.tokens.push(pb::SampledToken {
                sequence_id: role.id,
                token_id: token,
                logprobs: lp,
            });
        }
        if self.backend.rank() != 0 {
            out = StepOutcome::default();
        }
        Ok(out)
    }

    /// Whether the step's sequences are embedding sequences (`admit` checked that they all are
    /// or none is).
    fn pools(&self, scheduled: &[Scheduled]) -> bool {
        scheduled
            .iter()
            .any(|s| s.count > 0 && self.sequences[&s.id].pooling.is_some())
    }

    /// Runs a step of embedding sequences: the backend sums the final hidden states of each
    /// sequence's pooled rows, and the sequences whose prompt is complete get their vector
    /// (rank 0; the others return none).
    fn pool_step(
        &mut self,
        batch: &Batch,
        scheduled: &[Scheduled],
    ) -> Result<Vec<pb::PooledOutput>> {
        let computed: Vec<&Scheduled> = scheduled.iter().filter(|s| s.count > 0).collect();
        let mut spans = Vec::new();
        let mut owners = Vec::new();
        for (s, seq) in computed.iter().zip(&batch.seqs) {
            let state = &self.sequences[&s.id];
            let pool = state.pooling.as_ref().expect("admit keeps steps uniform");
            let start = state.num_computed;
            if let Some(span) = pool.span(start, start + s.count, state.tokens.len(), &seq.rows) {
                spans.push(span);
                owners.push(s.id);
            }
        }
        let sums = self.backend.pool(batch, &spans)?;
        let hidden = sums
            .as_ref()
            .map_or(0, |v| v.len().checked_div(spans.len()).unwrap_or(0));
        if let Some(sums) = &sums {
            for (id, values) in owners.iter().zip(sums.chunks_exact(hidden.max(1))) {
                let state = self.sequences.get_mut(id).expect("validated");
                state.pooling.as_mut().expect("checked").add(values);
            }
        }
        let mut pooled = Vec::new();
        for s in computed {
            let state = self.sequences.get_mut(&s.id).expect("validated");
            state.num_computed += s.count;
            state.blocks_seen = state.block_ids.len();
            if state.num_computed == state.tokens.len() && sums.is_some() {
                let len = state.tokens.len();
                let values = state.pooling.as_mut().expect("checked").finish(len);
                pooled.push(pb::PooledOutput {
                    sequence_id: s.id,
                    values,
                });
            }
        }
        Ok(pooled)
    }

    /// Gives the adapters of the scheduled sequences a LoRA slot each (they are at most
    /// `max_loras`: the coordinator's scheduler keeps to it, and `admit` checked it) and records
    /// each sequence's slot for the batch.
    fn place_adapters(&mut self, scheduled: &[Scheduled]) -> Result<PlaceCounts> {
        let mut ids: Vec<u32> = Vec::new();
        for s in scheduled.iter().filter(|s| s.count > 0) {
            let id = self.sequences[&s.id].adapter;
            if id != 0 && !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Ok(PlaceCounts::default());
        }
        let config = self.config.as_ref().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "LoadModel",
        })?;
        let (slots, counts) = self.adapters.place(&ids, config, self.backend.as_mut())?;
        for s in scheduled {
            let state = self.sequences.get_mut(&s.id).expect("validated");
            state.lora_slot = ids
                .iter()
                .position(|&id| id == state.adapter)
                .map(|i| slots[i]);
        }
        Ok(counts)
    }
}
