//! The worker's engine room: owns the model shard, the KV cache, the communicator and the state
//! of every request it has been sent, and turns step plans into sampled tokens. Lives on one
//! dedicated thread (the communicator and the model are not shared), fed by the gRPC service.
//!
//! A plan is validated completely before the first collective, and validation depends only on
//! the plan and on state that every rank shares, so either all ranks fail a bad plan or none
//! does, and a failure never leaves a peer waiting inside an all-reduce.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use tpserve_modelfile::{Format, LlamaConfig, ModelSource};
use tpserve_proto as pb;

use crate::batch::{Batch, SeqSlice};
use crate::comm::tcp::Rendezvous;
use crate::comm::{Communicator, SingleRank, TcpCommunicator};
use crate::cpu::{CpuModel, KvCache, WeightSource};
use crate::error::{Result, WorkerError};
use crate::sampler::Sampler;
use crate::shard::ShardPlan;

/// What the worker keeps about one request between steps.
#[derive(Debug)]
struct RequestState {
    /// Every known token: prompt, then sampled ones.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    num_computed: usize,
    block_ids: Vec<u32>,
    sampler: Sampler,
}

/// A validated slice of a plan: which request, and how many tokens.
struct Scheduled {
    id: u64,
    count: usize,
}

/// The worker's state machine: communicator -> model -> cache -> steps.
pub struct Runner {
    comm: Box<dyn Communicator>,
    rendezvous: Option<Rendezvous>,
    model: Option<CpuModel>,
    cache: Option<KvCache>,
    requests: HashMap<u64, RequestState>,
    /// Vocabulary rows of every rank, to reassemble gathered logits.
    vocab_per_rank: Vec<usize>,
    /// Host name other ranks reach this worker's rendezvous socket at.
    host: String,
}

impl Runner {
    /// A runner whose rendezvous socket (if it becomes rank 0) binds to `host`.
    pub fn new(host: String) -> Self {
        Self {
            comm: Box::new(SingleRank),
            rendezvous: None,
            model: None,
            cache: None,
            requests: HashMap::new(),
            vocab_per_rank: Vec::new(),
            host,
        }
    }

    /// Rank 0: opens the rendezvous socket and returns its id.
    pub fn communicator_id(&mut self) -> Result<Vec<u8>> {
        let rv = Rendezvous::open(&self.host)?;
        let id = rv.id()?;
        self.rendezvous = Some(rv);
        Ok(id)
    }

    /// Joins the group. Rank 0 must have created the id first.
    pub fn init_communicator(&mut self, id: &[u8], rank: usize, world_size: usize) -> Result<()> {
        self.comm = if world_size == 1 {
            Box::new(SingleRank)
        } else if rank == 0 {
            let rv = self.rendezvous.take().ok_or(WorkerError::Lifecycle {
                operation: "InitCommunicator on rank 0",
                needs: "CommunicatorId",
            })?;
            Box::new(TcpCommunicator::accept(rv, world_size)?)
        } else {
            Box::new(TcpCommunicator::connect(id, rank, world_size)?)
        };
        Ok(())
    }

    /// Loads this rank's shard.
    pub fn load_model(&mut self, req: &pb::LoadModelRequest) -> Result<pb::LoadModelResponse> {
        let started = Instant::now();
        if !matches!(req.dtype.as_str(), "" | "auto" | "float32" | "float") {
            return Err(WorkerError::Device {
                detail: format!(
                    "the CPU backend computes in float32; dtype {:?} is not available on it",
                    req.dtype
                ),
            });
        }
        let format = match pb::LoadFormat::try_from(req.load_format)
            .unwrap_or(pb::LoadFormat::Unspecified)
        {
            pb::LoadFormat::Safetensors => Some(Format::Safetensors),
            pb::LoadFormat::Gguf => Some(Format::Gguf),
            _ => None,
        };
        let dummy = req.load_format == pb::LoadFormat::Dummy as i32;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let path = Path::new(&req.model_path);
        let model = if dummy {
            let config = dummy_config(path)?;
            let shard = ShardPlan::new(&config, rank, world)?;
            CpuModel::load(
                &config,
                shard,
                &WeightSource::Dummy(req.dummy_seed),
                config.max_position_embeddings,
            )?
        } else {
            let source = ModelSource::open(path, format)?;
            let config = source.config().clone();
            let shard = ShardPlan::new(&config, rank, world)?;
            let weights = source.weights()?;
            CpuModel::load(
                &config,
                shard,
                &WeightSource::Reader(weights.as_ref()),
                config.max_position_embeddings,
            )?
        };
        let config = model.config().clone();
        self.vocab_per_rank = (0..world)
            .map(|r| ShardPlan::new(&config, r, world).map(|p| p.vocab.len()))
            .collect::<Result<_>>()?;
        let response = pb::LoadModelResponse {
            weight_bytes: model.weight_bytes() as u64,
            num_layers: config.num_hidden_layers as u32,
            num_kv_heads_per_rank: model.shard().kv_heads.len() as u32,
            head_dim: config.head_dim as u32,
            vocab_size: config.vocab_size as u32,
            load_seconds: started.elapsed().as_secs_f64(),
        };
        self.model = Some(model);
        self.cache = None;
        self.requests.clear();
        Ok(response)
    }

    fn model(&self, operation: &'static str) -> Result<&CpuModel> {
        self.model.as_ref().ok_or(WorkerError::Lifecycle {
            operation,
            needs: "LoadModel",
        })
    }

    /// How many blocks fit in the given budget.
    pub fn profile_memory(
        &self,
        req: &pb::ProfileMemoryRequest,
    ) -> Result<pb::ProfileMemoryResponse> {
        let model = self.model("ProfileMemory")?;
        if req.block_size == 0 {
            return Err(WorkerError::Cache {
                detail: "block size must be positive".into(),
            });
        }
        let per_block = model.cache_bytes_per_block(req.block_size as usize) as u64;
        if req.kv_cache_bytes == 0 {
            return Err(WorkerError::Cache {
                detail: "the CPU backend needs an explicit KV cache size (--kv-cache-space)".into(),
            });
        }
        Ok(pb::ProfileMemoryResponse {
            num_blocks: req.kv_cache_bytes / per_block,
            bytes_per_block: per_block,
        })
    }

    /// Allocates the cache.
    pub fn init_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<u64> {
        let model = self.model("InitCache")?;
        if num_blocks == 0 || block_size == 0 {
            return Err(WorkerError::Cache {
                detail: format!(
                    "cannot make a cache of {num_blocks} blocks of {block_size} tokens"
                ),
            });
        }
        let cache = model.new_cache(num_blocks, block_size);
        let bytes = cache.bytes() as u64;
        self.cache = Some(cache);
        self.requests.clear();
        Ok(bytes)
    }

    /// True once steps can run.
    pub fn ready(&self) -> bool {
        self.cache.is_some()
    }

    /// Runs the largest step the limits allow on scratch blocks; the cache holds no request yet.
    pub fn warmup(&mut self, max_tokens: usize, max_seqs: usize) -> Result<f64> {
        let started = Instant::now();
        let cache = self.cache.as_ref().ok_or(WorkerError::Lifecycle {
            operation: "Warmup",
            needs: "InitCache",
        })?;
        let (block_size, num_blocks) = (cache.block_size, cache.num_blocks);
        let max_pos = self.model("Warmup")?.max_positions();
        let seqs = max_seqs.clamp(1, max_tokens.max(1));
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
            });
        }
        let model = self.model.as_ref().expect("checked above");
        let cache = self.cache.as_mut().expect("checked above");
        let logits = model.forward(&batch, cache, self.comm.as_mut())?;
        self.comm.gather_to_root(&logits)?;
        Ok(started.elapsed().as_secs_f64())
    }

    /// Executes one plan; rank 0 returns the sampled tokens, other ranks an empty list.
    pub fn step(&mut self, plan: &pb::StepPlan) -> Result<Vec<pb::SampledToken>> {
        let scheduled = self.admit(plan)?;
        let model = self.model.as_ref().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "LoadModel",
        })?;
        let cache = self.cache.as_mut().ok_or(WorkerError::Lifecycle {
            operation: "Step",
            needs: "InitCache",
        })?;
        let (batch, sample_ids) = build_batch(
            &self.requests,
            &scheduled,
            cache.block_size,
            cache.num_blocks,
        )?;
        if batch.num_tokens() == 0 {
            return Ok(Vec::new());
        }
        let logits = model.forward(&batch, cache, self.comm.as_mut())?;
        let gathered = gather_logits(self.comm.as_mut(), &logits, &self.vocab_per_rank)?;
        let mut tokens = vec![0u32; sample_ids.len()];
        if let Some(all) = gathered {
            let vocab: usize = self.vocab_per_rank.iter().sum();
            for ((id, token), row) in sample_ids
                .iter()
                .zip(tokens.iter_mut())
                .zip(all.chunks_exact(vocab))
            {
                *token = self
                    .requests
                    .get_mut(id)
                    .expect("validated")
                    .sampler
                    .sample(row);
            }
        }
        self.comm.broadcast_from_root(&mut tokens)?;
        for s in &scheduled {
            let state = self.requests.get_mut(&s.id).expect("validated");
            state.num_computed += s.count;
        }
        let mut out = Vec::with_capacity(tokens.len());
        for (id, token) in sample_ids.into_iter().zip(tokens) {
            self.requests
                .get_mut(&id)
                .expect("validated")
                .tokens
                .push(token);
            out.push(pb::SampledToken {
                request_id: id,
                token_id: token,
            });
        }
        if self.comm.rank() != 0 {
            out.clear();
        }
        Ok(out)
    }

    /// Applies the plan's frees and additions and checks every scheduled request, changing no
    /// state when the plan is invalid.
    fn admit(&mut self, plan: &pb::StepPlan) -> Result<Vec<Scheduled>> {
        let bad = |detail: String| Err(WorkerError::Plan { detail });
        for new in &plan.new_requests {
            if self.requests.contains_key(&new.request_id)
                && !plan.freed_request_ids.contains(&new.request_id)
            {
                return bad(format!("request {} is already running", new.request_id));
            }
            if new.num_computed_tokens as usize + new.num_scheduled_tokens as usize
                > new.token_ids.len()
            {
                return bad(format!(
                    "request {} schedules past its known tokens",
                    new.request_id
                ));
            }
        }
        for run in &plan.running {
            let known = self.requests.contains_key(&run.request_id)
                && !plan.freed_request_ids.contains(&run.request_id);
            if !known {
                return bad(format!(
                    "request {} is not running on this worker",
                    run.request_id
                ));
            }
        }
        for id in &plan.freed_request_ids {
            self.requests.remove(id);
        }
        let mut scheduled = Vec::with_capacity(plan.new_requests.len() + plan.running.len());
        for new in &plan.new_requests {
            let sampling = new.sampling.unwrap_or_default();
            self.requests.insert(
                new.request_id,
                RequestState {
                    tokens: new.token_ids.clone(),
                    num_computed: new.num_computed_tokens as usize,
                    block_ids: new.block_ids.clone(),
                    sampler: Sampler::new(sampling),
                },
            );
            scheduled.push(Scheduled {
                id: new.request_id,
                count: new.num_scheduled_tokens as usize,
            });
        }
        for run in &plan.running {
            let state = self
                .requests
                .get_mut(&run.request_id)
                .expect("checked above");
            state.block_ids.extend_from_slice(&run.new_block_ids);
            scheduled.push(Scheduled {
                id: run.request_id,
                count: run.num_scheduled_tokens as usize,
            });
        }
        Ok(scheduled)
    }
}

/// Gathers every rank's vocabulary slice of the logits (`[rows, vocab_of_rank]` each) to rank 0
/// and reassembles whole rows, `[rows, vocab]`; other ranks get `None`.
pub fn gather_logits(
    comm: &mut dyn Communicator,
    local: &[f32],
    vocab_per_rank: &[usize],
) -> Result<Option<Vec<f32>>> {
    let Some(all) = comm.gather_to_root(local)? else {
        return Ok(None);
    };
    let vocab: usize = vocab_per_rank.iter().sum();
    let rows = all.len().checked_div(vocab).unwrap_or(0);
    let mut out = vec![0.0f32; rows * vocab];
    let (mut offset, mut column) = (0usize, 0usize);
    for &v in vocab_per_rank {
        for r in 0..rows {
            out[r * vocab + column..r * vocab + column + v]
                .copy_from_slice(&all[offset + r * v..offset + (r + 1) * v]);
        }
        offset += rows * v;
        column += v;
    }
    Ok(Some(out))
}

/// Lays the scheduled requests end to end. Fails on a request that schedules past its tokens or
/// its blocks.
fn build_batch(
    requests: &HashMap<u64, RequestState>,
    scheduled: &[Scheduled],
    block_size: usize,
    num_blocks: usize,
) -> Result<(Batch, Vec<u64>)> {
    let mut batch = Batch::default();
    let mut sample_ids = Vec::new();
    for s in scheduled {
        if s.count == 0 {
            continue;
        }
        let state = &requests[&s.id];
        let start = state.num_computed;
        let end = start + s.count;
        if end > state.tokens.len() {
            return Err(WorkerError::Plan {
                detail: format!(
                    "request {} schedules {} tokens but knows only {}",
                    s.id,
                    end,
                    state.tokens.len()
                ),
            });
        }
        if end > state.block_ids.len() * block_size {
            return Err(WorkerError::Plan {
                detail: format!(
                    "request {} needs {} tokens of KV but has {} blocks",
                    s.id,
                    end,
                    state.block_ids.len()
                ),
            });
        }
        if let Some(b) = state.block_ids.iter().find(|b| **b as usize >= num_blocks) {
            return Err(WorkerError::Plan {
                detail: format!("block {b} is outside the cache of {num_blocks}"),
            });
        }
        let first = batch.token_ids.len();
        for p in start..end {
            batch.token_ids.push(state.tokens[p]);
            batch.positions.push(p);
            batch
                .slots
                .push(state.block_ids[p / block_size] as usize * block_size + p % block_size);
        }
        batch.seqs.push(SeqSlice {
            rows: first..first + s.count,
            start_pos: start,
            block_ids: state.block_ids.clone(),
        });
        if end == state.tokens.len() {
            batch.sample_rows.push(first + s.count - 1);
            sample_ids.push(s.id);
        }
    }
    Ok((batch, sample_ids))
}

/// The config of a `dummy` model: `path` is a config.json or a directory holding one.
fn dummy_config(path: &Path) -> Result<LlamaConfig> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| WorkerError::Unsupported {
        detail: format!("dummy weights need a config.json: {}: {e}", file.display()),
    })?;
    Ok(LlamaConfig::from_hf_json(&text)?)
}
