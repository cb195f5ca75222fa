//! Log probabilities of one row of logits: `log_softmax` of the raw logits (the model's output
//! before any processor, penalty or temperature: vLLM's default `raw_logprobs`), for one chosen
//! token (sampled, or the prompt's next token) with its rank, and the `k` most likely tokens.
//! Only these `k + 1` values leave the worker, never the row. The GPU computes the same in the
//! `token_logprobs` kernel (in f32, this in f64). Cost: two passes over the vocabulary plus a
//! partial selection of `k`.

use tpserve_proto as pb;

/// Most top tokens a sequence may ask for (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log probabilities of one position: a chosen token's, with its rank, and the most likely
/// tokens' (most likely first). The runner sends it as `pb::TokenLogprobs`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    /// 1 + the number of tokens with a higher logit.
    pub rank: u32,
    pub top_token_ids: Vec<u32>,
    /// Parallel to `top_token_ids`.
    pub top_logprobs: Vec<f32>,
}

impl From<TokenLogprobs> for pb::TokenLogprobs {
    fn from(t: TokenLogprobs) -> Self {
        Self {
            token_id: t.token_id,
            logprob: t.logprob,
            rank: t.rank,
            top_token_ids: t.top_token_ids,
            top_logprobs: t.top_logprobs,
        }
    }
}

/// The log probabilities of `token` and of the `k` most likely tokens of `row` (most likely
/// first, lowest id first on ties), computed in f64 from f32 logits.
pub fn row_logprobs(row: &[f32], token: u32, k: usize) -> TokenLogprobs {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let logprob = |x: f32| (f64::from(x) - lse) as f32;
    let x = row
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    let rank = 1 + row.iter().filter(|&&y| y > x).count() as u32;
    let k = k.min(row.len());
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, by_logit);
    }
    order.truncate(k);
    order.sort_unstable_by(by_logit);
    TokenLogprobs {
        token_id: token,
        logprob: logprob(x),
        rank,
        top_logprobs: order.iter().map(|&t| logprob(row[t as usize])).collect(),
        top_token_ids: order,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax_with_sorted_top_tokens_and_ranks() {
        let row = [1.0f32, 3.0, 3.0, -2.0, 0.5];
        let lp = row_logprobs(&row, 4, 3);
        let lse = row.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        assert!((f64::from(lp.logprob) - (0.5 - lse)).abs() < 1e-6);
        assert_eq!(lp.rank, 4);
        assert_eq!(lp.top_token_ids, vec![1, 2, 0]);
        assert!((f64::from(lp.top_logprobs[0]) - (3.0 - lse)).abs() < 1e-6);
        assert_eq!(row_logprobs(&row, 1, 0).rank, 1);
        assert!(row_logprobs(&row, 1, 0).top_token_ids.is_empty());
    }
}
