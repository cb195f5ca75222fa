//! Shared helpers of the worker's numerical tests: run a model's prefill at any tensor-parallel
//! size (each rank on its own thread with its own runner, joined by real loopback TCP
//! communicators) and return the logits of every position, reassembled on rank 0 exactly as a
//! serving step does.

// Each test crate uses only some of these helpers.
#![allow(dead_code, unused_imports)]

pub mod checkpoint;

use std::path::Path;

use tpserve_proto as pb;
use tpserve_worker::backend::DeviceChoice;
use tpserve_worker::thread_group::ThreadGroup;

pub use tpserve_e2e::{default_model, repo_root};

/// Logits `[ids.len(), vocab]` of a prefill of `ids` at tensor-parallel size `tp` on the CPU in
/// f32 (`--dtype float32`: a GGUF is dequantized at load, the reference path), computed in chunks
/// of `chunk` tokens (so chunked prefill through the paged cache is exercised too; the blocks are
/// taken from the end of the cache in reverse order).
pub fn prefill_logits(model: &Path, tp: usize, ids: &[u32], chunk: usize) -> Vec<f32> {
    prefill_logits_as(model, tp, ids, chunk, "float32")
}

/// As [`prefill_logits`], with the load's `dtype` (`"auto"`: a GGUF stays quantized).
pub fn prefill_logits_as(
    model: &Path,
    tp: usize,
    ids: &[u32],
    chunk: usize,
    dtype: &str,
) -> Vec<f32> {
    let group = ThreadGroup::start(DeviceChoice::Cpu, tp, 1).unwrap();
    let load = pb::LoadModelRequest {
        model_path: model.display().to_string(),
        load_format: pb::LoadFormat::Auto as i32,
        dtype: dtype.into(),
        dummy_seed: 0,
        batch_invariant: false,
        ..Default::default()
    };
    group.on_all(move |_, r| r.load_model(&load)).unwrap();
    let block_size = 16;
    let num_blocks = ids.len().div_ceil(block_size) + 2;
    group
        .on_all(move |_, r| r.init_cache(num_blocks, block_size))
        .unwrap();
    let ids = ids.to_vec();
    group
        .on_all(move |_, r| r.prompt_logits(&ids, chunk))
        .unwrap()
        .swap_remove(0)
        .expect("rank 0 returns the logits")
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

/// The tiny Llama fixture loaded on `tp` CPU ranks with a cache of 64 blocks of 16 tokens.
pub fn tiny_llama_group(tp: usize) -> ThreadGroup {
    cpu_group(
        &repo_root().join("tests/fixtures/tiny-llama"),
        tp,
        "auto",
        64,
        16,
    )
}

/// The model at `model` loaded in `dtype` on `tp` CPU ranks, with a cache of `blocks` blocks of
/// `block_size` tokens.
pub fn cpu_group(
    model: &Path,
    tp: usize,
    dtype: &str,
    blocks: usize,
    block_size: usize,
) -> ThreadGroup {
    let group = ThreadGroup::start(DeviceChoice::Cpu, tp, 1).unwrap();
    let load = pb::LoadModelRequest {
        model_path: model.display().to_string(),
        load_format: pb::LoadFormat::Auto as i32,
        dtype: dtype.into(),
        ..Default::default()
    };
    group.on_all(move |_, r| r.load_model(&load)).unwrap();
    group
        .on_all(move |_, r| r.init_cache(blocks, block_size))
        .unwrap();
    group
}
