//! The sampling kernels' launches (sampling.cu: sampling, logit processing, log probabilities)
//! and the scratch that rows shared by several blocks use.

use cudarc::driver::{CudaFunction, LaunchConfig};

use super::{grid_rows, launch_err, Kernels};
use crate::cuda::device::{DeviceBuffer, Gpu};
use crate::error::Result;
use crate::sampler::logprobs::MAX_TOP_LOGPROBS;

impl Kernels {
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        out: u64,
        logits: u64,
        num_rows: usize,
        vocab_per_rank: usize,
        vocab: usize,
        params: &SamplingPointers,
    ) -> Result<()> {
        let f = (&self.sample, "sample");
        self.launch_sample(f, out, logits, num_rows, vocab_per_rank, vocab, params)
    }

    /// The edited f32 logits of a step with logit processing (sampling.cu's process_logits).
    pub fn process_logits(&self, a: &ProcessLogits) -> Result<()> {
        let ([stride, vpr, v], words) = (a.logits.shape(), a.words as i32);
        let mut b = self.launch(&self.process_logits);
        b.arg(&a.edited).arg(&a.logits.ptr);
        b.arg(&stride).arg(&vpr).arg(&v);
        b.arg(&a.edit_offsets)
            .arg(&a.edits)
            .arg(&a.mask_index)
            .arg(&a.masks)
            .arg(&words);
        // SAFETY: as sampling.cu documents.
        unsafe { b.launch(grid_rows(a.rows, 1024)) }
            .map(drop)
            .map_err(launch_err("process_logits"))
    }

    /// `sample` over process_logits' f32 rows `[num_rows, vocab]`.
    pub fn sample_processed(
        &self,
        out: u64,
        edited: u64,
        num_rows: usize,
        vocab: usize,
        params: &SamplingPointers,
    ) -> Result<()> {
        let f = (&self.sample_processed, "sample_processed");
        self.launch_sample(f, out, edited, num_rows, vocab, vocab, params)
    }

    /// `sample` or `sample_processed` (the same arguments; sampling.cu).
    #[allow(clippy::too_many_arguments)]
    fn launch_sample(
        &self,
        (function, name): (&CudaFunction, &str),
        out: u64,
        logits: u64,
        num_rows: usize,
        vocab_per_rank: usize,
        vocab: usize,
        params: &SamplingPointers,
    ) -> Result<()> {
        let (nr, vpr, v) = (num_rows as i32, vocab_per_rank as i32, vocab as i32);
        let teams = self.sample_scratch.buffer.ptr;
        let mut b = self.launch(function);
        b.arg(&out)
            .arg(&logits)
            .arg(&nr)
            .arg(&vpr)
            .arg(&v)
            .arg(&params.temperature)
            .arg(&params.top_k)
            .arg(&params.top_p)
            .arg(&params.min_p)
            .arg(&params.seeds)
            .arg(&teams);
        // SAFETY: as sampling.cu documents; the team rows as `SampleScratch::launch_config` says.
        unsafe { b.launch(self.sample_scratch.launch_config(num_rows)) }
            .map(drop)
            .map_err(launch_err(name))
    }

    /// Each row's [`LOGPROB_RECORD`] words: its sampled token and the asked-for log
    /// probabilities of its raw logits (sampling.cu's token_logprobs).
    pub fn token_logprobs(&self, a: &TokenLogprobs) -> Result<()> {
        let [stride, vpr, v] = a.logits.shape();
        let teams = self.sample_scratch.buffer.ptr;
        let mut b = self.launch(&self.token_logprobs);
        b.arg(&a.records).arg(&a.logits.ptr);
        b.arg(&stride).arg(&vpr).arg(&v);
        b.arg(&a.targets).arg(&a.sampled).arg(&a.top_n).arg(&teams);
        // SAFETY: as sampling.cu documents; the team rows as `SampleScratch::launch_config` says.
        unsafe { b.launch(self.sample_scratch.launch_config(a.rows)) }
            .map(drop)
            .map_err(launch_err("token_logprobs"))
    }
}

/// u32 words of one row's record from `token_logprobs` (sampling.cu's kLogprobRecord): sampled
/// token, scored token, its log probability and rank, then [`MAX_TOP_LOGPROBS`] top tokens and
/// their log probabilities.
pub const LOGPROB_RECORD: usize = 4 + 2 * MAX_TOP_LOGPROBS;

/// Where a step's raw logits lie: `[world][row_stride][vocab_per_rank]`, as `sample` reads them.
#[derive(Debug, Clone, Copy)]
pub struct SpreadLogits {
    pub ptr: u64,
    /// Rows of each rank's slice (a graph's padded batch).
    pub row_stride: usize,
    pub vocab_per_rank: usize,
    pub vocab: usize,
}

impl SpreadLogits {
    /// `row_stride`, `vocab_per_rank` and `vocab` as the kernels take them.
    fn shape(&self) -> [i32; 3] {
        [
            self.row_stride as i32,
            self.vocab_per_rank as i32,
            self.vocab as i32,
        ]
    }
}

/// process_logits' arguments (sampling.cu): `rows` rows of `logits` into `edited`.
#[derive(Debug, Clone, Copy)]
pub struct ProcessLogits {
    pub edited: u64,
    pub logits: SpreadLogits,
    pub rows: usize,
    pub edit_offsets: u64,
    pub edits: u64,
    pub mask_index: u64,
    pub masks: u64,
    pub words: usize,
}

/// token_logprobs' arguments (sampling.cu).
#[derive(Debug, Clone, Copy)]
pub struct TokenLogprobs {
    pub records: u64,
    pub logits: SpreadLogits,
    pub rows: usize,
    pub targets: u64,
    pub sampled: u64,
    pub top_n: u64,
}

/// Blocks that may share one row (sampling.cu's kMaxSampleSplits).
const MAX_SAMPLE_SPLITS: usize = 32;

/// Bytes of one shared row's scratch (sampling.cu's kTeamRowBytes, which it checks against its
/// `TeamRow`): a header of 16, three histograms of 2,048 words, 6 exchanges of 32 slots of 32
/// bytes, and 4,096 candidates of 8 bytes.
const TEAM_ROW_BYTES: usize = 16 + 3 * 2048 * 4 + 6 * MAX_SAMPLE_SPLITS * 32 + 4096 * 8;

/// Blocks sharing each row of a `rows`-row sample launch: the SMs a row would otherwise leave
/// idle (one block of 1,024 threads an SM), at most [`MAX_SAMPLE_SPLITS`]. Where it is above 1,
/// `rows * splits <= sm_count`: the blocks of a shared row wait for each other (sampling.cu's
/// Team), so they must all be resident at once.
pub(super) fn sample_splits(rows: usize, sm_count: usize) -> usize {
    (sm_count / rows.max(1)).clamp(1, MAX_SAMPLE_SPLITS)
}

/// sample_*'s team rows ([`TEAM_ROW_BYTES`] each, for the `sm_count / 2` rows at most that
/// [`sample_splits`] shares), allocated zeroed once and left zero by every launch. One stream
/// runs every launch, so launches never share them at once.
pub(super) struct SampleScratch {
    buffer: DeviceBuffer,
    sm_count: usize,
}

impl SampleScratch {
    pub(super) fn new(gpu: &Gpu) -> Result<Self> {
        let sm_count = gpu.sm_count.max(1);
        let rows = (sm_count / 2).max(1);
        Ok(Self {
            buffer: gpu.alloc(rows * TEAM_ROW_BYTES, "sampling scratch")?,
            sm_count,
        })
    }

    /// The launch of a `rows`-row sample_* or token_logprobs_*: [`sample_splits`] blocks of
    /// 1,024 threads a row. Where that is above 1, `rows * splits` blocks fit the SMs at once
    /// and the buffer holds `rows` team rows.
    fn launch_config(&self, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, sample_splits(rows, self.sm_count) as u32, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Device addresses of the per-row sampling parameters.
#[derive(Debug, Clone, Copy)]
pub struct SamplingPointers {
    pub temperature: u64,
    pub top_k: u64,
    pub top_p: u64,
    pub min_p: u64,
    pub seeds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_shared_by_several_sample_blocks_fit_the_scratch() {
        for sm_count in [1, 2, 46, 78, 108, 132, 144] {
            for rows in 0..=300 {
                let splits = sample_splits(rows, sm_count);
                assert!((1..=MAX_SAMPLE_SPLITS).contains(&splits));
                assert!(
                    splits == 1 || (rows * splits <= sm_count && rows <= (sm_count / 2).max(1)),
                    "{rows} rows, {sm_count} SMs"
                );
            }
        }
        assert_eq!(sample_splits(1, 132), 32);
        assert_eq!(sample_splits(8, 132), 16);
        assert_eq!(sample_splits(64, 132), 2);
        assert_eq!(sample_splits(256, 132), 1);
    }
}
