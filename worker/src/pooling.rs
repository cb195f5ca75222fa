//! Embedding sequences (`--task embed`): which rows of a step an embedding sequence's vector is
//! pooled from, and the running state of a sequence whose prompt is computed over several steps
//! (chunked prefill).
//!
//! The backend returns, per span of rows, the sum of the hidden states after the final RMSNorm
//! (replicated on every rank after the last all-reduce; rank 0 reports). Last-token pooling
//! takes the span of the prompt's last row in the step that computes it; mean pooling adds one
//! span per step (the chunk's rows) and divides by the prompt's length at the end; CLS pooling
//! takes position 0's row. Mean and CLS pooling need every position computed by this worker, so
//! the runner refuses such a sequence with a prefix-cache hit (the coordinator never gives one).
//!
//! Costs: one `hidden_size` vector per embedding sequence; nothing for generate sequences.

use std::ops::Range;

use tpserve_proto as pb;

use crate::error::{Result, WorkerError};

/// How an embedding sequence's vector is pooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Last,
    Mean,
    Cls,
}

impl PoolKind {
    /// The kind a plan names (`POOLING_TYPE_UNSPECIFIED` is last-token pooling, vLLM's default
    /// for decoder models).
    pub fn from_proto(p: &pb::Pooling) -> Self {
        match pb::PoolingType::try_from(p.r#type).unwrap_or(pb::PoolingType::Unspecified) {
            pb::PoolingType::Mean => Self::Mean,
            pb::PoolingType::Cls => Self::Cls,
            pb::PoolingType::Last | pb::PoolingType::Unspecified => Self::Last,
        }
    }

    /// Whether the vector needs positions before the last computed by this worker (a
    /// prefix-cache hit would skip them).
    pub fn needs_every_position(self) -> bool {
        matches!(self, Self::Mean | Self::Cls)
    }
}

/// An embedding sequence's pooling state between steps.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolState {
    pub kind: PoolKind,
    /// Sum of the hidden states pooled so far (empty before the first; rank 0 only).
    sum: Vec<f32>,
}

impl PoolState {
    pub fn new(kind: PoolKind) -> Self {
        Self {
            kind,
            sum: Vec::new(),
        }
    }

    /// The rows of a step that computes positions `start..end` of a `len`-token prompt, laid
    /// at batch rows `rows`, that this sequence pools from (`None`: none in this step).
    pub fn span(
        &self,
        start: usize,
        end: usize,
        len: usize,
        rows: &Range<usize>,
    ) -> Option<Range<usize>> {
        match self.kind {
            PoolKind::Last => (end == len).then(|| rows.end - 1..rows.end),
            PoolKind::Mean => Some(rows.clone()),
            PoolKind::Cls => (start == 0).then(|| rows.start..rows.start + 1),
        }
    }

    /// Adds one span's summed hidden states.
    pub fn add(&mut self, values: &[f32]) {
        if self.sum.is_empty() {
            self.sum = values.to_vec();
        } else {
            for (s, v) in self.sum.iter_mut().zip(values) {
                *s += *v;
            }
        }
    }

    /// The pooled vector of a `len`-token prompt once every span is in.
    pub fn finish(&mut self, len: usize) -> Vec<f32> {
        let mut out = std::mem::take(&mut self.sum);
        if self.kind == PoolKind::Mean && len > 0 {
            let inv = 1.0 / len as f32;
            out.iter_mut().for_each(|x| *x *= inv);
        }
        out
    }
}

/// Refuses an embedding sequence that starts with `num_computed` tokens already cached when its
/// pooling needs every position.
pub fn check_start(sequence_id: u64, kind: PoolKind, num_computed: usize) -> Result<()> {
    if kind.needs_every_position() && num_computed > 0 {
        return Err(WorkerError::Plan {
            detail: format!(
                "sequence {sequence_id} pools {kind:?} but starts at token {num_computed}: mean and \
                 CLS pooling need every position computed (no prefix-cache hit)"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pooling_over_chunks_divides_the_sum_by_the_prompt_length() {
        let mut s = PoolState::new(PoolKind::Mean);
        assert_eq!(s.span(0, 3, 5, &(4..7)), Some(4..7));
        s.add(&[3.0, 6.0]);
        assert_eq!(s.span(3, 5, 5, &(0..2)), Some(0..2));
        s.add(&[2.0, 4.0]);
        assert_eq!(s.finish(5), vec![1.0, 2.0]);
    }

    #[test]
    fn last_and_cls_pooling_take_one_row_in_the_right_step() {
        let last = PoolState::new(PoolKind::Last);
        assert_eq!(last.span(0, 3, 5, &(4..7)), None);
        assert_eq!(last.span(3, 5, 5, &(0..2)), Some(1..2));
        let cls = PoolState::new(PoolKind::Cls);
        assert_eq!(cls.span(0, 3, 5, &(4..7)), Some(4..5));
        assert_eq!(cls.span(3, 5, 5, &(0..2)), None);
    }

    #[test]
    fn mean_pooling_refuses_a_prefix_cache_hit_and_last_pooling_takes_it() {
        assert!(check_start(7, PoolKind::Mean, 16).is_err());
        assert!(check_start(7, PoolKind::Cls, 16).is_err());
        assert!(check_start(7, PoolKind::Last, 16).is_ok());
        assert!(check_start(7, PoolKind::Mean, 0).is_ok());
    }
}
