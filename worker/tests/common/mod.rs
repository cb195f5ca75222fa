//! Shared helpers of the worker's numerical tests: run a model's prefill at any tensor-parallel
//! size (each rank on its own thread, joined by real loopback TCP communicators) and return the
//! logits of every position, reassembled on rank 0 exactly as a serving step does.

use std::path::Path;

use tpserve_modelfile::ModelSource;
use tpserve_worker::batch::{Batch, SeqSlice};
use tpserve_worker::comm::{Communicator, SingleRank, TcpCommunicator};
use tpserve_worker::cpu::gather_logits;
use tpserve_worker::cpu::{CpuModel, WeightSource};
use tpserve_worker::shard::ShardPlan;

pub use tpserve_e2e::{default_model, repo_root};

/// Logits `[ids.len(), vocab]` of a prefill of `ids` at tensor-parallel size `tp`, computed in
/// chunks of `chunk` tokens (so chunked prefill through the paged cache is exercised too).
pub fn prefill_logits(model: &Path, tp: usize, ids: &[u32], chunk: usize) -> Vec<f32> {
    let comms: Vec<Box<dyn Communicator>> = if tp == 1 {
        vec![Box::new(SingleRank)]
    } else {
        TcpCommunicator::local_group(tp)
            .unwrap()
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator>)
            .collect()
    };
    let ids = ids.to_vec();
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, mut comm)| {
            let (model, ids) = (model.to_path_buf(), ids.clone());
            std::thread::spawn(move || {
                let source = ModelSource::open(&model, None).unwrap();
                let config = source.config().clone();
                let weights = source.weights().unwrap();
                let shard = ShardPlan::new(&config, rank, tp).unwrap();
                let cpu = CpuModel::load(
                    &config,
                    shard,
                    &WeightSource::Reader(weights.as_ref()),
                    1024,
                )
                .unwrap();
                let vocab: Vec<usize> = (0..tp)
                    .map(|r| ShardPlan::new(&config, r, tp).unwrap().vocab.len())
                    .collect();
                let block_size = 16;
                let blocks: Vec<u32> = (0..ids.len().div_ceil(block_size) as u32).rev().collect();
                let mut cache = cpu.new_cache(blocks.len(), block_size);
                let mut out = Vec::new();
                for start in (0..ids.len()).step_by(chunk) {
                    let end = (start + chunk).min(ids.len());
                    let batch = Batch {
                        token_ids: ids[start..end].to_vec(),
                        positions: (start..end).collect(),
                        slots: (start..end)
                            .map(|p| blocks[p / block_size] as usize * block_size + p % block_size)
                            .collect(),
                        seqs: vec![SeqSlice {
                            rows: 0..end - start,
                            start_pos: start,
                            block_ids: blocks.clone(),
                        }],
                        sample_rows: (0..end - start).collect(),
                    };
                    let local = cpu.forward(&batch, &mut cache, comm.as_mut()).unwrap();
                    if let Some(rows) = gather_logits(comm.as_mut(), &local, &vocab).unwrap() {
                        out.extend(rows);
                    }
                }
                out
            })
        })
        .collect();
    let mut results: Vec<Vec<f32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.swap_remove(0)
}

/// Largest `|got - want| / max(1, |want|)`.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// Index of the largest value of each row of `width`.
pub fn argmax_rows(logits: &[f32], width: usize) -> Vec<u32> {
    logits
        .chunks_exact(width)
        .map(tpserve_worker::sampler::argmax)
        .collect()
}
