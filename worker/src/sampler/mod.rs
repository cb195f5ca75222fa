//! Picks the next token from a row of logits: greedy (temperature 0, lowest id on ties), or
//! temperature sampling filtered by top-k, min-p and top-p (in that order, as vLLM). Randomness:
//! each sequence has its own stream ([`SequenceRng`], seeded by the sequence's seed when it has
//! one), which yields one 64-bit seed per sampled token; the draw itself is a pure function of
//! that seed and the logits ([`sample_row`] on the CPU, the `sample` kernel on a GPU), so a seeded
//! sequence repeats exactly on a given backend. Cost on the CPU: O(vocab) per sampled token
//! (`row_math`'s vectorised passes: the argmax, the draw over the whole row, top-p's total),
//! plus a sort of the top k, or of the tokens that can be in top-p's nucleus
//! (docs/PERFORMANCE.md, "Sampling on the CPU" and "Sampling on the CPU, again").
//!
//! Sequences may also ask for logit processing before the draw ([`processors`]: penalties,
//! `logit_bias`, `min_tokens`, `bad_words`, and structured outputs' allowed-token masks) and for
//! log probabilities ([`logprobs`]); a step
//! passes them per row as [`RowExtras`], and passes none at all when no row of the step uses
//! them, so plain steps do no extra work.

pub mod logprobs;
pub mod processors;
mod row_math;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tpserve_proto::SamplingParams;

use self::logprobs::TokenLogprobs;
use self::processors::LogitEdit;
pub use self::row_math::argmax;
use self::row_math::{draw_whole_row, relative_mass, row_max};
use crate::step_trace::{phase, Phase};

/// What one sample row needs beyond its [`SampleSpec`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowExtras {
    /// Edits of the row's logits before the draw, sorted by token.
    pub edits: Vec<LogitEdit>,
    /// Top tokens to return with the row's log probabilities (at most
    /// [`logprobs::MAX_TOP_LOGPROBS`]); `None`: no log probabilities.
    pub logprobs: Option<usize>,
    /// The token whose log probability is wanted, when it is not the sampled one (a row that
    /// scores the prompt's next token).
    pub target: Option<u32>,
    /// Structured outputs: the tokens the row may sample, as `TokenMask.allowed`'s bitmask
    /// (bit `t % 32` of word `t / 32`); every other logit becomes -inf after the edits and
    /// before the draw. `None`: unconstrained.
    pub allowed: Option<Vec<u32>>,
}

/// What a step's sampling produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampled {
    /// One token per sample row, the same on every rank.
    pub tokens: Vec<u32>,
    /// On rank 0, when the step had extras: one entry per sample row (`None` for rows that asked
    /// for none); empty otherwise.
    pub logprobs: Vec<Option<TokenLogprobs>>,
}

/// Rank 0's host sampling of a step's gathered logits (`[rows, vocab]`, `None` on the other
/// ranks, which get placeholder tokens until the backend broadcasts rank 0's), timed as the
/// sampling phase. Both backends' host path.
pub fn sample_gathered(
    logits: Option<Vec<f32>>,
    sampling: &[SampleSpec],
    extras: &[RowExtras],
) -> Sampled {
    match logits {
        // A step with no sample rows (a prefill chunk mid-prompt) draws nothing.
        Some(mut all) if !sampling.is_empty() => {
            let vocab = all.len() / sampling.len();
            phase(Phase::Sampling, || {
                sample_host_rows(&mut all, vocab, sampling, extras)
            })
        }
        _ => Sampled {
            tokens: vec![0u32; sampling.len()],
            logprobs: Vec::new(),
        },
    }
}

/// Samples every row of `logits` (`[rows, vocab]`, row i for `sampling[i]`) on the host: a row
/// with extras gets its edits applied before the draw and, when asked, the log probabilities of
/// its raw logits (before the edits); a row without extras is only drawn. Both backends' host
/// path (the CPU backend's every step, the CUDA backend's steps with extras).
pub fn sample_host_rows(
    logits: &mut [f32],
    vocab: usize,
    sampling: &[SampleSpec],
    extras: &[RowExtras],
) -> Sampled {
    let mut tokens = vec![0u32; sampling.len()];
    let mut logprobs = Vec::new();
    for (i, ((spec, token), row)) in sampling
        .iter()
        .zip(tokens.iter_mut())
        .zip(logits.chunks_exact_mut(vocab))
        .enumerate()
    {
        let Some(extra) = extras.get(i) else {
            *token = sample_row(spec, row);
            continue;
        };
        // Log probabilities are of the raw logits: keep them when the edits or the mask change
        // them.
        let edited = !extra.edits.is_empty() || extra.allowed.is_some();
        let raw = (extra.logprobs.is_some() && edited).then(|| row.to_vec());
        processors::apply_edits(&extra.edits, row);
        if let Some(allowed) = &extra.allowed {
            processors::apply_mask(allowed, row);
        }
        *token = sample_row(spec, row);
        logprobs.push(extra.logprobs.map(|k| {
            let target = extra.target.unwrap_or(*token);
            logprobs::row_logprobs(raw.as_deref().unwrap_or(row), target, k)
        }));
    }
    Sampled { tokens, logprobs }
}

/// A sequence's random stream: one seed per sampled token.
#[derive(Debug, Clone)]
pub struct SequenceRng(StdRng);

impl SequenceRng {
    /// The stream of a sequence; an absent seed draws one from the OS.
    pub fn new(seed: Option<u64>) -> Self {
        Self(match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        })
    }

    /// The seed of the next token's draw.
    pub fn next_seed(&mut self) -> u64 {
        self.0.gen()
    }
}

/// How to pick one token: the sequence's parameters and this draw's seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    /// The sequence's sampling parameters.
    pub params: SamplingParams,
    /// Seed of this draw.
    pub seed: u64,
}

impl SampleSpec {
    /// Greedy decoding (warm-up, scoring).
    pub fn greedy() -> Self {
        Self {
            params: SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                min_p: 0.0,
                seed: None,
            },
            seed: 0,
        }
    }
}

/// Picks a token from `logits` (one row over the whole vocabulary).
pub fn sample_row(spec: &SampleSpec, logits: &[f32]) -> u32 {
    let p = &spec.params;
    if p.temperature <= 0.0 || p.top_k == 1 {
        return argmax(logits);
    }
    let k = p.top_k.max(0) as usize;
    if (k == 0 || k >= logits.len()) && p.top_p >= 1.0 {
        // Temperature alone, or with min-p: a draw in vocabulary order, nothing sorted.
        return draw_whole_row(logits, p.temperature, p.min_p, spec.seed);
    }
    let inv_t = 1.0 / p.temperature;
    let mut cands = scaled(logits, inv_t);
    // The largest x: scaling by a positive constant keeps the order.
    let max = row_max(logits) * inv_t;
    // Top-p's share is of the mass min-p keeps, else of every token's.
    let mut total_before_sort = None;
    // Largest x first, the lowest id on ties.
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k > 0 && k < cands.len() {
        // The k first in that order (linear on average), then only they are sorted.
        cands.select_nth_unstable_by(k - 1, order);
        cands.truncate(k);
    } else if k == 0 {
        // Top-p alone sorts only the tokens that can be in its nucleus: those weighing at least
        // eps = (1 - top_p) / (2 vocab) of the top one. The others weigh less than
        // (1 - top_p) / 2 together, the top token 1, so the tokens kept reach top_p of the whole
        // before them (all tokens of a flat row are kept). Min-p's floor, when lower, keeps what
        // min-p keeps.
        let eps = (1.0 - p.top_p as f64) / (2.0 * cands.len() as f64);
        let mut floor = max + eps.ln() as f32;
        if p.min_p > 0.0 {
            floor = floor.min(max + p.min_p.ln());
        } else {
            total_before_sort = Some(relative_mass(logits, inv_t, max));
        }
        cands.retain(|c| c.1 >= floor);
    }
    cands.sort_unstable_by(order);
    let mut total = 0.0f64;
    for c in cands.iter_mut() {
        c.1 = (c.1 - max).exp();
        total += c.1 as f64;
    }
    if let Some(all) = total_before_sort {
        total = all;
    }
    if p.min_p > 0.0 {
        // The most likely token has weight exp(0) = 1 after the shift above.
        let floor = p.min_p;
        cands.retain(|c| c.1 >= floor);
        total = cands.iter().map(|c| c.1 as f64).sum();
    }
    if p.top_p < 1.0 {
        total = top_p_cut(&mut cands, total, p.top_p);
    }
    draw(&cands, total, spec.seed)
}

/// Every entry of the row as (token, logit * inv_t), inv_t = 1 / temperature.
fn scaled(logits: &[f32], inv_t: f32) -> Vec<(u32, f32)> {
    logits
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, l * inv_t))
        .collect()
}

/// Keeps the shortest head of `cands` (sorted, weighted) that holds `top_p` of `total`, at least
/// one; returns the head's mass.
fn top_p_cut(cands: &mut Vec<(u32, f32)>, total: f64, top_p: f32) -> f64 {
    let mut acc = 0.0f64;
    let keep = cands
        .iter()
        .position(|c| {
            acc += c.1 as f64 / total;
            acc >= top_p as f64
        })
        .map_or(cands.len(), |i| i + 1);
    cands.truncate(keep.max(1));
    cands.iter().map(|c| c.1 as f64).sum()
}

/// The inverse-CDF draw over the weighted candidates in their order (`total` their mass) with
/// the uniform number of `seed`.
fn draw(cands: &[(u32, f32)], total: f64, seed: u64) -> u32 {
    let mut target = StdRng::seed_from_u64(seed).gen::<f64>() * total;
    for c in cands {
        target -= c.1 as f64;
        if target <= 0.0 {
            return c.0;
        }
    }
    cands.last().map_or(0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: Some(7),
        }
    }

    /// Draws `n` tokens as a sequence would: one seed per draw from its stream.
    fn draws(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut rng = SequenceRng::new(params.seed);
        (0..n)
            .map(|_| {
                let spec = SampleSpec {
                    params,
                    seed: rng.next_seed(),
                };
                sample_row(&spec, logits)
            })
            .collect()
    }

    #[test]
    fn greedy_picks_the_largest_and_the_lowest_id_on_ties() {
        assert_eq!(draws(params(0.0), &[0.1, 3.0, 3.0, -1.0], 1), [1]);
    }

    #[test]
    fn a_seeded_request_repeats_its_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let first = draws(params(1.0), &logits, 20);
        assert_eq!(first, draws(params(1.0), &logits, 20));
        assert!(first.iter().any(|t| *t != first[0]), "{first:?}");
    }

    #[test]
    fn top_k_and_top_p_keep_only_the_head_of_the_distribution() {
        let logits = [5.0, 4.9, 0.0, -3.0, -4.0];
        let k = SamplingParams {
            top_k: 2,
            ..params(1.0)
        };
        let p = SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        };
        let m = SamplingParams {
            min_p: 0.5,
            ..params(1.0)
        };
        assert!(draws(k, &logits, 200).iter().all(|t| *t < 2));
        assert!(draws(p, &logits, 200).iter().all(|t| *t == 0));
        assert!(draws(m, &logits, 200).iter().all(|t| *t < 2));
    }

    /// The draw as sample_row made it before it sorted only the top k or top-p's possible
    /// nucleus: every token sorted, then the same filters, top_p_cut and draw.
    fn draw_sorting_everything(spec: &SampleSpec, logits: &[f32]) -> u32 {
        let p = &spec.params;
        let inv_t = 1.0 / p.temperature;
        let mut cands = scaled(logits, inv_t);
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cands.truncate(p.top_k as usize);
        }
        let max = cands[0].1;
        let mut total = 0.0f64;
        for c in cands.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1 as f64;
        }
        if p.min_p > 0.0 {
            cands.retain(|c| c.1 >= p.min_p);
            total = cands.iter().map(|c| c.1 as f64).sum();
        } else if p.top_k == 0 && p.top_p < 1.0 {
            // Top-p's share of every token's mass, summed as sample_row sums it.
            total = relative_mass(logits, inv_t, max);
        }
        if p.top_p < 1.0 {
            total = top_p_cut(&mut cands, total, p.top_p);
        }
        draw(&cands, total, spec.seed)
    }

    #[test]
    fn sorting_only_the_head_draws_what_sorting_the_whole_row_draws() {
        // Rows of 5,000 logits: peaked (a few lifted above a normal-ish body), flat, and with
        // ties and masked entries; each filter alone and mixed, 200 seeds each.
        let mut rng = StdRng::seed_from_u64(11);
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|shape| {
                (0..5000)
                    .map(|i| {
                        let body: f32 = (0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0;
                        match shape {
                            0 => body * 3.0 + if i % 613 == 0 { 9.0 } else { 0.0 },
                            1 => body * 0.2,
                            2 => (body * 4.0).round() / 4.0,
                            _ => {
                                if i % 3 == 0 {
                                    f32::NEG_INFINITY
                                } else {
                                    body * 2.0
                                }
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        let sets = [
            (0.7, 0, 0.9, 0.0),
            (1.0, 0, 0.95, 0.0),
            (1.5, 0, 0.5, 0.0),
            (1.0, 50, 1.0, 0.0),
            (0.7, 20, 0.9, 0.0),
            (1.0, 4999, 0.8, 0.0),
            (1.0, 0, 0.9, 0.05),
            (0.8, 40, 0.8, 0.1),
        ];
        for (r, row) in rows.iter().enumerate() {
            for (temperature, top_k, top_p, min_p) in sets {
                let params = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: None,
                };
                for seed in 0..200u64 {
                    let spec = SampleSpec { params, seed };
                    assert_eq!(
                        sample_row(&spec, row),
                        draw_sorting_everything(&spec, row),
                        "row {r}, {params:?}, seed {seed}"
                    );
                }
            }
        }
    }
}
