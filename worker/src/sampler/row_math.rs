//! The passes over a whole row of logits that every sampled token pays on the CPU: its largest
//! value, greedy's argmax, exp of each entry relative to the top one, and the draw over every
//! token (temperature alone). Written as plain f32 arithmetic on independent lanes, which the
//! compiler vectorises, instead of one dependent chain through the row (`fold(f32::max)`,
//! libm's `expf` per entry, one running f64 sum): SmolLM2's 49,152 entries took ~260 us a
//! temperature-only draw that way (docs/PERFORMANCE.md, "Sampling on the CPU, again").
//! Plain IEEE operations without fused multiply-adds, so every machine computes the same bits.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Independent lanes of the reductions (one AVX2 register of f32).
const LANES: usize = 8;

/// The largest entry of `xs`, ignoring NaN; -inf for an empty row or one of NaN and -inf.
pub fn row_max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, x) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(*x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    lanes.iter().fold(tail, |m, x| m.max(*x))
}

/// Index of the largest logit; the lowest index wins ties; NaN never wins (0 when nothing but
/// NaN and -inf is left to win).
pub fn argmax(logits: &[f32]) -> u32 {
    // Each lane keeps its first largest entry (strictly larger replaces it).
    let mut values = [f32::NEG_INFINITY; LANES];
    let mut indices = [0u32; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for (c, chunk) in (&mut chunks).enumerate() {
        for (lane, x) in chunk.iter().enumerate() {
            if *x > values[lane] {
                values[lane] = *x;
                indices[lane] = (c * LANES + lane) as u32;
            }
        }
    }
    let from = logits.len() - chunks.remainder().len();
    let mut best = (f32::NEG_INFINITY, 0u32);
    let candidates = values.iter().zip(indices).map(|(v, i)| (*v, i));
    let tail = (from..)
        .zip(chunks.remainder())
        .map(|(i, x)| (*x, i as u32));
    for (value, index) in candidates.chain(tail) {
        if value > best.0 || (value == best.0 && index < best.1) {
            best = (value, index);
        }
    }
    best.1
}

/// exp(x) for x <= 0 (a weight relative to the row's top entry, exp(0) = 1): Cephes' expf
/// (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-7 polynomial in r, times 2^n), within 2 ulp of
/// the true value (the tests check it), and 0 below -87.3 (weights under 2^-126 of the top one,
/// which change no total of the row in f64) and for NaN.
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in a few bits, so n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 * 2^23 rounds to the nearest integer (|x log2 e| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    const LOWEST: f32 = -87.336_55;
    let keep = x >= LOWEST;
    let x = if keep { x } else { 0.0 };
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    // 2^n for n in [-126, 0]: a normal number's exponent field. `shifted`'s low bits hold n
    // (it is 1.5 * 2^23 + n), read as an integer without a float conversion.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if keep {
        y * scale
    } else {
        0.0
    }
}

/// A draw from softmax(logits / temperature) over the whole row, every token kept or (min_p > 0)
/// those weighing at least min_p of the top one, by inverse CDF over the weights exp(x - max)
/// with the uniform of `seed`. The weights are summed in blocks of [`LANES`] (each block in
/// order, the blocks in order), and the walk subtracts whole blocks until the one that holds the
/// target, then its tokens: the same cumulative sums the total is made of, so the target always
/// falls on a kept token.
pub fn draw_whole_row(logits: &[f32], temperature: f32, min_p: f32, seed: u64) -> u32 {
    let inv_t = 1.0 / temperature;
    // Scaling by a positive constant keeps the order, so this is the largest l * inv_t.
    let max = row_max(logits) * inv_t;
    if max == f32::NEG_INFINITY {
        return 0; // nothing to draw from (every entry masked or NaN)
    }
    let mut weights = relative_weights(logits, inv_t, max);
    if min_p > 0.0 {
        for w in weights.iter_mut() {
            *w = if *w >= min_p { *w } else { 0.0 };
        }
    }
    let blocks = block_sums(&weights);
    let total: f64 = blocks.iter().sum();
    let mut target = StdRng::seed_from_u64(seed).gen::<f64>() * total;
    // The last token of positive weight in block k (one exists where its sum is positive).
    let last_in = |k: usize| {
        let from = k * LANES;
        let block = &weights[from..(from + LANES).min(weights.len())];
        from + block.iter().rposition(|w| *w > 0.0).unwrap_or(0)
    };
    let mut last_block = 0;
    for (k, block) in blocks.iter().enumerate() {
        if *block == 0.0 {
            continue;
        }
        last_block = k;
        if target - block > 0.0 {
            target -= block;
            continue;
        }
        let from = k * LANES;
        for (j, w) in weights[from..].iter().take(LANES).enumerate() {
            if *w > 0.0 {
                target -= *w as f64;
                if target <= 0.0 {
                    return (from + j) as u32;
                }
            }
        }
        // The block's sum reached the target where its tokens one by one fell short by a
        // rounding.
        return last_in(k) as u32;
    }
    // The blocks fell short of the total by a rounding.
    last_in(last_block) as u32
}

/// exp(l * inv_t - max) for every logit l of the row (`max` the largest l * inv_t).
fn relative_weights(logits: &[f32], inv_t: f32, max: f32) -> Vec<f32> {
    logits
        .iter()
        .map(|l| exp_nonpositive(l * inv_t - max))
        .collect()
}

/// The f64 sums of `weights`' blocks of [`LANES`], each block in order.
fn block_sums(weights: &[f32]) -> Vec<f64> {
    weights
        .chunks(LANES)
        .map(|b| b.iter().fold(0.0f64, |s, w| s + *w as f64))
        .collect()
}

/// The whole row's mass relative to its top entry, Σ exp(l * inv_t - max) (`max` the largest
/// l * inv_t), summed as [`draw_whole_row`] sums it: what top-p's share is taken of.
pub fn relative_mass(logits: &[f32], inv_t: f32, max: f32) -> f64 {
    block_sums(&relative_weights(logits, inv_t, max))
        .iter()
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_max_and_argmax_ignore_nan_and_take_the_lowest_index_on_ties() {
        let mut row: Vec<f32> = (0..37).map(|i| ((i * 7) % 11) as f32).collect();
        row[3] = f32::NAN;
        assert_eq!(row_max(&row), 10.0);
        assert_eq!(
            argmax(&row),
            row.iter().position(|x| *x == 10.0).unwrap() as u32
        );
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0, 2.0]), 2);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 5]), 0);
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn argmax_is_the_first_largest_entry_at_every_length() {
        // Values from a small set (many ties), some NaN and -inf, lengths around the lanes.
        let mut x = 77u64;
        for len in (1..40).chain([1000, 49_152]) {
            let row: Vec<f32> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    match (x >> 33) % 13 {
                        0 => f32::NAN,
                        1 => f32::NEG_INFINITY,
                        v => v as f32,
                    }
                })
                .collect();
            let mut first = 0;
            for (i, v) in row.iter().enumerate() {
                if *v > row[first] || row[first].is_nan() && !v.is_nan() {
                    first = i;
                }
            }
            let nothing_finite = row.iter().all(|v| v.is_nan() || *v == f32::NEG_INFINITY);
            let want = if nothing_finite { 0 } else { first as u32 };
            assert_eq!(argmax(&row), want, "length {len}");
        }
    }

    #[test]
    fn exp_nonpositive_is_within_two_ulp_of_exp() {
        let mut x = 0.0f32;
        while x > -87.3 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            let ulp = (want as f32).to_bits().abs_diff((got as f32).to_bits());
            assert!(ulp <= 2, "exp({x}) = {got}, want {want}");
            x -= 0.000_713;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
    }

    #[test]
    fn the_whole_row_draw_follows_the_softmax_and_never_takes_a_masked_token() {
        // 10 tokens, two masked; 40,000 draws: each frequency within 4 standard deviations.
        let logits = [
            1.0,
            0.5,
            f32::NEG_INFINITY,
            2.0,
            -1.0,
            0.0,
            1.5,
            f32::NEG_INFINITY,
            -0.5,
            0.25,
        ];
        let t = 0.8;
        let weights: Vec<f64> = logits
            .iter()
            .map(|l| ((l - 2.0) / t) as f64)
            .map(f64::exp)
            .collect();
        let total: f64 = weights.iter().sum();
        let n = 40_000;
        let mut counts = [0usize; 10];
        for seed in 0..n {
            counts[draw_whole_row(&logits, t, 0.0, seed) as usize] += 1;
        }
        for (i, (count, w)) in counts.iter().zip(&weights).enumerate() {
            let p = w / total;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (*count as f64 - n as f64 * p).abs() <= 4.0 * sd + 1.0,
                "token {i}: {count} draws, expected {:.0}",
                n as f64 * p
            );
        }
        assert_eq!(counts[2] + counts[7], 0);
        // With min-p 0.3 only the tokens weighing at least 0.3 of the top one (3 and 6).
        let kept: Vec<usize> = (0..n)
            .map(|seed| draw_whole_row(&logits, t, 0.3, seed) as usize)
            .collect();
        assert!(kept.iter().all(|i| weights[*i] >= 0.3), "{:?}", &kept[..20]);
        assert!(kept.contains(&3) && kept.contains(&6));
    }

    #[test]
    fn a_row_with_nothing_to_draw_gives_token_zero() {
        assert_eq!(draw_whole_row(&[f32::NEG_INFINITY; 3], 1.0, 0.0, 5), 0);
    }
}
