//! Steps whose rows ask for more than a draw (issue 13), on the device: the penalties,
//! `logit_bias`, `min_tokens` and `bad_words` (each row's sparse edits, built on the host from
//! the sequence's history the worker keeps), structured outputs' allowed-token masks, and log
//! probabilities of the raw logits with their top tokens. After the forward pass (a graph
//! replay for decode steps, as without extras), rank 0 uploads the rows' edits, masks and
//! sampling parameters in one copy, runs `process_logits` (f32 logits with the edits and masks
//! applied) and `sample_processed` (the draw, `sample`'s algorithm) when a row has edits or a
//! mask (else the forward pass's own draw stands), then `token_logprobs`, and downloads one small
//! record per row: the vocabulary never crosses PCIe. NCCL then broadcasts processed tokens, as
//! after a plain step.

use super::forward::{Device, ForwardOutput};
use super::kernels::{ProcessLogits, SpreadLogits, TokenLogprobs, LOGPROB_RECORD};
use super::model::Dims;
use super::step_inputs::{Packed, SamplingOffsets};
use crate::error::Result;
use crate::sampler::logprobs::{self, MAX_TOP_LOGPROBS};
use crate::sampler::{RowExtras, SampleSpec, Sampled};

/// A step's extras packed for the device: byte offsets of each array in `packed`.
struct PackedExtras {
    packed: Packed,
    sampling: SamplingOffsets,
    edit_offsets: usize,
    edits: usize,
    mask_index: usize,
    masks: usize,
    targets: usize,
    top_n: usize,
}

/// Packs one entry per row of `sampling` and `extras` (same length) for a vocabulary of
/// `vocab`: masks are cut or padded (with disallowed words) to `ceil(vocab / 32)` words.
fn pack_extras(sampling: &[SampleSpec], extras: &[RowExtras], vocab: usize) -> PackedExtras {
    let words = vocab.div_ceil(32);
    let rows = sampling.len();
    let num_edits: usize = extras.iter().map(|e| e.edits.len()).sum();
    let num_masks = extras.iter().filter(|e| e.allowed.is_some()).count();
    let mut p = Packed::with_capacity(rows * 64 + num_edits * 20 + num_masks * words * 4 + 256);
    let sampling = p.push_sampling(sampling, rows);
    let mut offsets = Vec::with_capacity(rows + 1);
    let mut edits: Vec<[u32; 5]> = Vec::with_capacity(num_edits);
    offsets.push(0i32);
    for e in extras {
        edits.extend(e.edits.iter().map(|e| {
            [
                e.token,
                u32::from(e.ban),
                e.bias.to_bits(),
                e.repetition.to_bits(),
                e.sub.to_bits(),
            ]
        }));
        offsets.push(edits.len() as i32);
    }
    let edit_offsets = p.push(&offsets);
    let edits = p.push(&edits);
    let mut mask_index = Vec::with_capacity(rows);
    let mut masks: Vec<u32> = Vec::with_capacity(num_masks * words);
    for e in extras {
        match &e.allowed {
            Some(allowed) => {
                mask_index.push((masks.len() / words.max(1)) as i32);
                masks.extend((0..words).map(|w| allowed.get(w).copied().unwrap_or(0)));
            }
            None => mask_index.push(-1),
        }
    }
    let mask_index = p.push(&mask_index);
    let masks = p.push(&masks);
    let targets: Vec<i32> = extras
        .iter()
        .map(|e| e.target.map_or(-1, |t| t as i32))
        .collect();
    let targets = p.push(&targets);
    let top_n: Vec<i32> = extras
        .iter()
        .map(|e| e.logprobs.map_or(-1, |k| k.min(MAX_TOP_LOGPROBS) as i32))
        .collect();
    let top_n = p.push(&top_n);
    PackedExtras {
        packed: p,
        sampling,
        edit_offsets,
        edits,
        mask_index,
        masks,
        targets,
        top_n,
    }
}

/// Reads one row's record (`token_logprobs`): its token and, when asked, its log probabilities.
fn read_record(rec: &[u32], extras: &RowExtras) -> (u32, Option<logprobs::TokenLogprobs>) {
    let token = rec[0];
    let logprobs = extras.logprobs.map(|k| {
        let n = k.min(MAX_TOP_LOGPROBS);
        let top = 4 + MAX_TOP_LOGPROBS;
        logprobs::TokenLogprobs {
            token_id: rec[1],
            logprob: f32::from_bits(rec[2]),
            rank: rec[3],
            top_token_ids: rec[4..4 + n].to_vec(),
            top_logprobs: rec[top..top + n]
                .iter()
                .map(|&b| f32::from_bits(b))
                .collect(),
        }
    });
    (token, logprobs)
}

/// Samples the step whose forward pass left its logits at `out`, with `extras` (one per row of
/// `sampling`): rank 0 processes, draws and reads the log probabilities; every rank returns the
/// tokens (broadcast over `nccl`), rank 0 also the log probabilities.
pub(super) fn sample_with_extras(
    dev: &Device,
    dims: &Dims,
    out: &ForwardOutput,
    sampling: &[SampleSpec],
    extras: &[RowExtras],
) -> Result<Sampled> {
    let (gpu, kernels) = (dev.gpu, dev.kernels);
    let rows = sampling.len();
    let mut tokens = vec![0u32; rows];
    let mut logprobs = Vec::new();
    if rows == 0 {
        return Ok(Sampled { tokens, logprobs });
    }
    // Rows that only ask for log probabilities change nothing before the draw: the forward
    // pass's own sampling (with these specs) stands, and no f32 copy of the logits is made (a
    // prompt's log probabilities can be thousands of rows).
    let processed = extras
        .iter()
        .any(|e| !e.edits.is_empty() || e.allowed.is_some());
    if dev.rank == 0 {
        let vocab = dims.vocab;
        let step = pack_extras(sampling, extras, vocab);
        let inputs = gpu.alloc(step.packed.bytes.len(), "logit processing inputs")?;
        gpu.upload(&inputs, &step.packed.bytes)?;
        let at = |offset: usize| inputs.at(offset);
        let logits = SpreadLogits {
            ptr: out.logits,
            row_stride: out.samples,
            vocab_per_rank: dims.vocab_per_rank,
            vocab,
        };
        // Freed (stream-ordered) after the download below waits for the kernels.
        let _edited = if processed {
            let edited = gpu.alloc(rows * vocab * 4, "processed logits")?;
            kernels.process_logits(&ProcessLogits {
                edited: edited.ptr,
                logits,
                rows,
                edit_offsets: at(step.edit_offsets),
                edits: at(step.edits),
                mask_index: at(step.mask_index),
                masks: at(step.masks),
                words: vocab.div_ceil(32),
            })?;
            let params = step.sampling.at(inputs.ptr);
            kernels.sample_processed(out.sampled, edited.ptr, rows, vocab, &params)?;
            Some(edited)
        } else {
            None
        };
        let records = gpu.alloc(rows * LOGPROB_RECORD * 4, "log probability records")?;
        kernels.token_logprobs(&TokenLogprobs {
            records: records.ptr,
            logits,
            rows,
            targets: at(step.targets),
            sampled: out.sampled,
            top_n: at(step.top_n),
        })?;
        let mut words = vec![0u32; rows * LOGPROB_RECORD];
        gpu.download(records.ptr, &mut words)?;
        for ((rec, e), token) in words
            .chunks_exact(LOGPROB_RECORD)
            .zip(extras)
            .zip(tokens.iter_mut())
        {
            let (t, lp) = read_record(rec, e);
            *token = t;
            logprobs.push(lp);
        }
    }
    // The forward pass broadcast its own tokens; processed ones go out again.
    if let Some(comm) = dev.nccl.filter(|c| c.world_size() > 1 && processed) {
        comm.broadcast_from_root(
            out.sampled,
            rows,
            cudarc::nccl::sys::ncclDataType_t::ncclUint32,
            &gpu.stream,
        )?;
    }
    if dev.rank != 0 {
        gpu.download(out.sampled, &mut tokens)?;
    }
    Ok(Sampled { tokens, logprobs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::processors::LogitEdit;

    fn spec(temperature: f32, seed: u64) -> SampleSpec {
        let mut s = SampleSpec::greedy();
        s.params.temperature = temperature;
        s.seed = seed;
        s
    }

    fn read<T: Copy>(p: &Packed, offset: usize, n: usize) -> Vec<T> {
        let size = std::mem::size_of::<T>();
        (0..n)
            .map(|i| {
                let at = offset + i * size;
                // SAFETY: the bytes at `at` were pushed as `n` values of T.
                unsafe { std::ptr::read_unaligned(p.bytes[at..at + size].as_ptr() as *const T) }
            })
            .collect()
    }

    #[test]
    fn extras_pack_per_row_with_masks_padded_and_edits_flattened() {
        let edit = |token, bias| LogitEdit {
            token,
            ban: token == 7,
            bias,
            repetition: 1.5,
            sub: 0.25,
        };
        let extras = vec![
            RowExtras {
                edits: vec![edit(3, 1.0), edit(7, 0.0)],
                logprobs: Some(5),
                ..RowExtras::default()
            },
            RowExtras {
                allowed: Some(vec![0b1010]),
                target: Some(9),
                logprobs: Some(50),
                ..RowExtras::default()
            },
            RowExtras::default(),
        ];
        let sampling = [spec(0.0, 1), spec(0.7, 2), spec(1.0, 3)];
        // 70 tokens: 3 mask words, the row's one word padded with two disallowed ones.
        let p = pack_extras(&sampling, &extras, 70);
        assert_eq!(read::<u64>(&p.packed, p.sampling.seeds, 3), vec![1, 2, 3]);
        assert_eq!(
            read::<f32>(&p.packed, p.sampling.temperature, 3),
            vec![0.0, 0.7, 1.0]
        );
        assert_eq!(read::<i32>(&p.packed, p.edit_offsets, 4), vec![0, 2, 2, 2]);
        let edits = read::<[u32; 5]>(&p.packed, p.edits, 2);
        assert_eq!(
            edits[0],
            [3, 0, 1.0f32.to_bits(), 1.5f32.to_bits(), 0.25f32.to_bits()]
        );
        assert_eq!(edits[1][..2], [7, 1]);
        assert_eq!(read::<i32>(&p.packed, p.mask_index, 3), vec![-1, 0, -1]);
        assert_eq!(read::<u32>(&p.packed, p.masks, 3), vec![0b1010, 0, 0]);
        assert_eq!(read::<i32>(&p.packed, p.targets, 3), vec![-1, 9, -1]);
        // At most 20 top tokens; -1: none asked.
        assert_eq!(read::<i32>(&p.packed, p.top_n, 3), vec![5, 20, -1]);
    }

    #[test]
    fn records_read_as_token_logprobs() {
        let mut rec = vec![0u32; LOGPROB_RECORD];
        rec[..4].copy_from_slice(&[11, 12, (-0.5f32).to_bits(), 3]);
        rec[4..6].copy_from_slice(&[5, 6]);
        rec[4 + MAX_TOP_LOGPROBS] = (-0.1f32).to_bits();
        rec[5 + MAX_TOP_LOGPROBS] = (-0.2f32).to_bits();
        let asked = RowExtras {
            logprobs: Some(2),
            ..RowExtras::default()
        };
        let (token, lp) = read_record(&rec, &asked);
        assert_eq!(token, 11);
        let lp = lp.unwrap();
        assert_eq!((lp.token_id, lp.logprob, lp.rank), (12, -0.5, 3));
        assert_eq!(lp.top_token_ids, vec![5, 6]);
        assert_eq!(lp.top_logprobs, vec![-0.1, -0.2]);
        assert_eq!(read_record(&rec, &RowExtras::default()), (11, None));
    }
}
