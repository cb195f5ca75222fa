//! vLLM's logit processors beyond temperature and the filters: `bad_words`, `min_tokens`,
//! `logit_bias`, and the repetition, frequency and presence penalties, with vLLM's formulas and
//! order (its v1 sampler: bad words, then min_tokens and logit_bias, then the penalties):
//!
//! - banned (a bad word's last token where the output ends with the rest of it; an end token
//!   while fewer than `min_tokens` are generated): the logit becomes -inf;
//! - `logit_bias`: `x += bias`;
//! - `repetition_penalty` r, for tokens of the prompt or the output: `x > 0 ? x / r : x * r`;
//! - `frequency_penalty` f and `presence_penalty` p, for output tokens generated `c` times:
//!   `x -= f * c + p`.
//!
//! Each touches single vocabulary entries, so a sequence's processing is a sparse list of
//! per-token edits ([`LogitEdit`]) built from its persistent history ([`History`]: output
//! token counts and the prompt's distinct tokens, kept in the worker across steps and updated
//! as tokens are sampled), applied by the CPU here and by the `process_logits` kernel on a
//! GPU (`worker/src/cuda/logit_extras.rs`). Cost per sampled row: O(distinct prompt and output tokens) to build, the same to apply;
//! nothing for sequences without controls.
//!
//! Structured outputs add a dense edit: the coordinator's allowed-token bitmask for the row
//! ([`apply_mask`], O(vocab)), applied after the sparse edits.

use std::collections::{BTreeMap, HashMap, HashSet};

use tpserve_proto as pb;

/// What happens to one vocabulary entry's logit, in vLLM's order: ban, bias, repetition
/// penalty, then subtract `sub` (frequency times count plus presence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitEdit {
    /// The vocabulary entry.
    pub token: u32,
    /// Set the logit to -inf.
    pub ban: bool,
    /// Added first.
    pub bias: f32,
    /// The repetition penalty (1: none).
    pub repetition: f32,
    /// Subtracted last.
    pub sub: f32,
}

impl LogitEdit {
    fn new(token: u32) -> Self {
        Self {
            token,
            ban: false,
            bias: 0.0,
            repetition: 1.0,
            sub: 0.0,
        }
    }

    /// The edited logit.
    pub fn apply(&self, x: f32) -> f32 {
        if self.ban {
            return f32::NEG_INFINITY;
        }
        let x = x + self.bias;
        let x = if self.repetition == 1.0 {
            x
        } else if x > 0.0 {
            x / self.repetition
        } else {
            x * self.repetition
        };
        x - self.sub
    }
}

/// A sequence's controls and the history they depend on, kept by the worker for the sequence's
/// lifetime.
#[derive(Debug, Clone)]
pub struct History {
    controls: pb::LogitsControls,
    /// Times each token was generated.
    output_counts: HashMap<u32, u32>,
    /// Tokens generated so far.
    num_output: usize,
    /// Distinct prompt tokens, kept only with a repetition penalty.
    prompt_tokens: HashSet<u32>,
}

impl History {
    /// The history of a sequence whose known tokens are `tokens`, the first `num_prompt` of them
    /// its prompt (a preempted sequence resumes with its generated tokens after them). `None`
    /// when the controls change nothing, so plain sequences cost nothing.
    pub fn new(controls: pb::LogitsControls, tokens: &[u32], num_prompt: usize) -> Option<Self> {
        let repetition = repetition(&controls);
        let active = controls.presence_penalty != 0.0
            || controls.frequency_penalty != 0.0
            || repetition != 1.0
            || !controls.logit_bias.is_empty()
            || (controls.min_tokens > 0 && !controls.min_tokens_stop_ids.is_empty())
            || !controls.bad_words.is_empty();
        if !active {
            return None;
        }
        let num_prompt = num_prompt.min(tokens.len());
        let prompt_tokens = if repetition != 1.0 {
            tokens[..num_prompt].iter().copied().collect()
        } else {
            HashSet::new()
        };
        let mut history = Self {
            controls,
            output_counts: HashMap::new(),
            num_output: 0,
            prompt_tokens,
        };
        for &t in &tokens[num_prompt..] {
            history.push(t);
        }
        Some(history)
    }

    /// Records a generated token.
    pub fn push(&mut self, token: u32) {
        *self.output_counts.entry(token).or_default() += 1;
        self.num_output += 1;
    }

    /// The edits for the next token, given the output so far (`output`, for bad words), sorted
    /// by token.
    pub fn edits(&self, output: &[u32]) -> Vec<LogitEdit> {
        let c = &self.controls;
        let mut edits: BTreeMap<u32, LogitEdit> = BTreeMap::new();
        for word in &c.bad_words {
            let Some((&last, prefix)) = word.token_ids.split_last() else {
                continue;
            };
            if output.ends_with(prefix) {
                at(&mut edits, last).ban = true;
            }
        }
        if self.num_output < c.min_tokens as usize {
            for &t in &c.min_tokens_stop_ids {
                at(&mut edits, t).ban = true;
            }
        }
        for b in &c.logit_bias {
            at(&mut edits, b.token_id).bias += b.bias;
        }
        let repetition = repetition(c);
        if repetition != 1.0 {
            for &t in self.prompt_tokens.iter().chain(self.output_counts.keys()) {
                at(&mut edits, t).repetition = repetition;
            }
        }
        if c.frequency_penalty != 0.0 || c.presence_penalty != 0.0 {
            for (&t, &count) in &self.output_counts {
                at(&mut edits, t).sub = c.frequency_penalty * count as f32 + c.presence_penalty;
            }
        }
        edits.into_values().collect()
    }
}

/// The edit of `token` in `edits`, made on first use.
fn at(edits: &mut BTreeMap<u32, LogitEdit>, token: u32) -> &mut LogitEdit {
    edits.entry(token).or_insert_with(|| LogitEdit::new(token))
}

/// The repetition penalty, with proto3's unset 0 read as "off".
fn repetition(c: &pb::LogitsControls) -> f32 {
    if c.repetition_penalty > 0.0 {
        c.repetition_penalty
    } else {
        1.0
    }
}

/// Structured outputs: sets the logit of every token `allowed` does not allow to -inf. `allowed`
/// is a bitmask (bit `t % 32` of word `t / 32`); tokens past its last word are not allowed.
/// Cost: O(vocab), one bit test per entry.
pub fn apply_mask(allowed: &[u32], row: &mut [f32]) {
    for (i, chunk) in row.chunks_mut(32).enumerate() {
        let word = allowed.get(i).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (bit, x) in chunk.iter_mut().enumerate() {
            if word & (1 << bit) == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Applies `edits` to one row of logits over the whole vocabulary (entries past it are
/// ignored).
pub fn apply_edits(edits: &[LogitEdit], row: &mut [f32]) {
    for e in edits {
        if let Some(x) = row.get_mut(e.token as usize) {
            *x = e.apply(*x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls() -> pb::LogitsControls {
        pb::LogitsControls::default()
    }

    #[test]
    fn a_mask_keeps_only_the_allowed_tokens_and_nothing_past_its_words() {
        // 70 entries: words 0 and 1 cover tokens 0..64; 64..70 have no word.
        let mut row: Vec<f32> = (0..70).map(|i| i as f32).collect();
        let allowed = [1u32 << 3 | 1 << 31, 1 << 1];
        apply_mask(&allowed, &mut row);
        let kept: Vec<usize> = (0..70).filter(|&i| row[i].is_finite()).collect();
        assert_eq!(kept, vec![3, 31, 33]);
        assert_eq!(row[33], 33.0);
    }

    #[test]
    fn requests_without_controls_have_no_history() {
        assert!(History::new(controls(), &[1, 2, 3], 3).is_none());
        let neutral = pb::LogitsControls {
            repetition_penalty: 1.0,
            min_tokens: 4,
            ..controls()
        };
        assert!(History::new(neutral, &[1], 1).is_none());
    }

    #[test]
    fn penalties_follow_vllms_formulas() {
        let c = pb::LogitsControls {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            repetition_penalty: 2.0,
            ..controls()
        };
        // Prompt [1, 2]; output so far [3, 3, 2].
        let mut h = History::new(c, &[1, 2, 3], 2).unwrap();
        h.push(3);
        h.push(2);
        let mut row = vec![1.0f32, 4.0, -4.0, 6.0, 8.0];
        apply_edits(&h.edits(&[3, 3, 2]), &mut row);
        // 0: untouched; 1: prompt only, 4 / 2; 2: prompt and once in output, -4 * 2 - 0.25 -
        // 0.5; 3: twice in output, 6 / 2 - 0.5 - 0.5; 4: untouched.
        assert_eq!(row, vec![1.0, 2.0, -8.75, 2.0, 8.0]);
    }

    #[test]
    fn bias_min_tokens_and_bad_words_edit_the_right_entries() {
        let c = pb::LogitsControls {
            logit_bias: vec![pb::TokenBias {
                token_id: 1,
                bias: 3.0,
            }],
            min_tokens: 2,
            min_tokens_stop_ids: vec![0],
            bad_words: vec![
                pb::TokenSequence { token_ids: vec![4] },
                pb::TokenSequence {
                    token_ids: vec![2, 3],
                },
            ],
            ..controls()
        };
        let mut h = History::new(c, &[9], 1).unwrap();
        let mut row = vec![0.0f32; 5];
        apply_edits(&h.edits(&[]), &mut row);
        assert_eq!(
            row,
            vec![f32::NEG_INFINITY, 3.0, 0.0, 0.0, f32::NEG_INFINITY]
        );
        h.push(2);
        let mut row = vec![0.0f32; 5];
        apply_edits(&h.edits(&[2]), &mut row);
        // Still one token short of min_tokens; `2` makes `[2, 3]` bannable.
        assert_eq!(
            row,
            vec![
                f32::NEG_INFINITY,
                3.0,
                0.0,
                f32::NEG_INFINITY,
                f32::NEG_INFINITY
            ]
        );
        h.push(1);
        let mut row = vec![0.0f32; 5];
        apply_edits(&h.edits(&[2, 1]), &mut row);
        assert_eq!(row, vec![0.0, 3.0, 0.0, 0.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn a_resumed_request_counts_its_earlier_output() {
        let c = pb::LogitsControls {
            frequency_penalty: 1.0,
            ..controls()
        };
        let h = History::new(c, &[5, 6, 7, 7], 2).unwrap();
        let edits = h.edits(&[7, 7]);
        assert_eq!(edits.len(), 1);
        assert_eq!((edits[0].token, edits[0].sub), (7, 2.0));
    }
}
