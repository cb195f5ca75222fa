//! Activations quantized per block of 32, laid out as llama.cpp's Q8_1 (`quantize_row_q8_1`) but
//! with 16-bit values: each block keeps `d = max|x| / 32767`, its 32 values `round(x / d)` as
//! i16, and `s = d * sum(q)` so that kernels for weights with an offset (Q4_0's -8, Q4_1's `m`)
//! need no second pass. `d` and `s` are f32: the only rounding is of the values, at most
//! `d / 2 = max|x| / 65534` each.
//!
//! Why 16 bits and not llama.cpp's 8: with 8-bit activations (error up to `max|x| / 254`)
//! SmolLM2's Q4_1 logits moved by up to 5.9% of their scale over its 30 layers and its answer to
//! "What is the capital of France?" changed from f32's "The capital of France is Paris." to
//! "L'Étoile, ...": the first token's top-two margin in f32 is 0.08. With 16 bits the AVX2
//! kernels do the same number of multiply instructions per block (`madd_epi16` on two halves
//! instead of `maddubs` + `madd`), so the precision costs little. Costs: one pass over the
//! activations, 72 bytes per 32 values.

use rayon::prelude::*;

/// Values a block holds.
pub const QK: usize = 32;

/// The largest quantized magnitude.
const Q_MAX: f32 = 32767.0;

/// One block of quantized activations.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub struct ActBlock {
    /// The scale: value `i` is `d * qs[i]`.
    pub d: f32,
    /// `d * sum(qs)`.
    pub s: f32,
    pub qs: [i16; QK],
}

impl ActBlock {
    const ZERO: Self = Self {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
}

/// The order of a block's values in [`ActBlock::qs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Value `i` at `qs[i]` (the block dots of [`super::own`]).
    Natural,
    /// Value `p` at `qs[2 p]` and value `p + 16` at `qs[2 p + 1]`, so that the i32 at pair `p`
    /// holds the two values one lane's weight pair multiplies ([`super::packed`]).
    Paired,
}

/// Values from which [`quantize_rows`] splits the rows over the thread pool (a prompt chunk's
/// activations; a decode step's few rows are quantized on the caller).
const PARALLEL_FROM: usize = 1 << 15;

/// Quantizes `n` rows of `cols` values (`cols` a multiple of [`QK`]) into `out`, which is
/// resized to `n * cols / QK` blocks, row-major, each block's values in `order`.
pub fn quantize_rows(x: &[f32], cols: usize, order: Order, out: &mut Vec<ActBlock>) {
    debug_assert!(cols.is_multiple_of(QK) && x.len().is_multiple_of(cols));
    out.clear();
    out.resize(x.len() / QK, ActBlock::ZERO);
    #[cfg(target_arch = "x86_64")]
    let simd = is_x86_feature_detected!("avx2");
    let quantize = |x: &[f32], out: &mut [ActBlock]| {
        for (block, dst) in x.chunks_exact(QK).zip(out) {
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: the CPU has AVX2 (checked above); `block` holds QK values.
                unsafe { avx2::quantize_block(block, dst, order) };
                continue;
            }
            quantize_block(block, dst, order);
        }
    };
    if x.len() < PARALLEL_FROM || rayon::current_num_threads() <= 1 {
        quantize(x, out);
        return;
    }
    let rows = (PARALLEL_FROM / cols).max(1);
    x.par_chunks(rows * cols)
        .zip(out.par_chunks_mut(rows * cols / QK))
        .for_each(|(x, out)| quantize(x, out));
}

/// Where value `i` of a block goes in `order`.
#[inline]
fn slot(i: usize, order: Order) -> usize {
    match order {
        Order::Natural => i,
        Order::Paired if i < QK / 2 => 2 * i,
        Order::Paired => 2 * (i - QK / 2) + 1,
    }
}

/// One block: `d = max|x| / 32767`, each value `round(x / d)` (to nearest, ties to even, as
/// the vector loop's conversion rounds) as i16, `s = d * sum`.
#[inline]
fn quantize_block(x: &[f32], dst: &mut ActBlock, order: Order) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / Q_MAX;
    // A block too small for a normal scale (all below ~4e-34) is zero.
    let id = if d.is_normal() { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (i, &v) in x.iter().enumerate() {
        // |v * id| <= 32767 up to rounding; the cast saturates, so no value wraps.
        let r = (v * id).round_ties_even() as i16;
        dst.qs[slot(i, order)] = r;
        sum += r as i32;
    }
    dst.d = d;
    dst.s = d * sum as f32;
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// [`super::quantize_block`] on 8 lanes: the same operations on each value, so the same
    /// bits for finite values (a unit test compares them).
    ///
    /// # Safety
    /// The CPU has AVX2; `x` holds at least [`QK`] values.
    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_block(x: &[f32], dst: &mut ActBlock, order: Order) {
        assert!(x.len() >= QK);
        let p = x.as_ptr();
        let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(p.add(8 * k)));
        let sign = _mm256_set1_ps(-0.0);
        let abs = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / Q_MAX;
        let id = _mm256_set1_ps(if d.is_normal() { 1.0 / d } else { 0.0 });
        // The conversion rounds to nearest, ties to even (the default MXCSR mode).
        let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, id)));
        let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let t = _mm_add_epi32(
            _mm256_castsi256_si128(total),
            _mm256_extracti128_si256(total, 1),
        );
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)));
        let out = dst.qs.as_mut_ptr() as *mut __m256i;
        match order {
            Order::Natural => {
                // packs interleaves 128-bit halves ([a0..4 b0..4 a4..8 b4..8]); a permute of
                // 64-bit quarters restores the order. Saturating, as the scalar cast.
                let fix = |a, b| _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0b11_01_10_00);
                _mm256_storeu_si256(out, fix(q[0], q[1]));
                _mm256_storeu_si256(out.add(1), fix(q[2], q[3]));
            }
            Order::Paired => {
                // Each i32 lane: value p in the low half, value p + 16 in the high one
                // (|q| <= 32767: nothing to saturate).
                let low = _mm256_set1_epi32(0xffff);
                let pair =
                    |lo, hi| _mm256_or_si256(_mm256_and_si256(lo, low), _mm256_slli_epi32(hi, 16));
                _mm256_storeu_si256(out, pair(q[0], q[2]));
                _mm256_storeu_si256(out.add(1), pair(q[1], q[3]));
            }
        }
        dst.d = d;
        dst.s = d * sum as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_comes_back_within_half_a_step() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0)
            .collect();
        let mut q = Vec::new();
        quantize_rows(&x, 64, Order::Natural, &mut q);
        assert_eq!(q.len(), 2);
        for (b, block) in q.iter().enumerate() {
            let sum: i32 = block.qs.iter().map(|&v| v as i32).sum();
            assert!((block.s - block.d * sum as f32).abs() < 1e-6);
            for (i, &v) in block.qs.iter().enumerate() {
                let want = x[b * QK + i];
                assert!((block.d * v as f32 - want).abs() <= block.d / 2.0 + 1e-6);
            }
        }
    }

    #[test]
    fn an_all_zero_block_has_zero_scale() {
        let mut q = Vec::new();
        quantize_rows(&[0.0; 32], 32, Order::Natural, &mut q);
        assert_eq!((q[0].d, q[0].s, q[0].qs), (0.0, 0.0, [0; 32]));
    }

    /// The vector loop against the scalar one, bit for bit, in both orders, over values with
    /// ties (x.5 after scaling), zeros, tiny and large blocks; and the paired order is the
    /// natural one with each block's halves interleaved.
    #[test]
    fn the_vector_loop_gives_the_scalar_loops_bits_in_both_orders() {
        let mut x: Vec<f32> = (0..32 * 40)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 7.0)
            .collect();
        x[..32].iter_mut().for_each(|v| *v = 0.0);
        x[32..64].iter_mut().for_each(|v| *v *= 1e-36);
        x[64..96].iter_mut().for_each(|v| *v *= 1e30);
        // A block whose values land on ties once scaled: max 32767, others k + 0.5.
        x[96] = 32767.0;
        for (k, v) in x[97..128].iter_mut().enumerate() {
            *v = k as f32 + 0.5;
        }
        let bits = |b: &ActBlock| (b.d.to_bits(), b.s.to_bits(), b.qs);
        for order in [Order::Natural, Order::Paired] {
            let mut fast = Vec::new();
            quantize_rows(&x, 32 * 8, order, &mut fast);
            for (block, got) in x.chunks_exact(QK).zip(&fast) {
                let mut want = ActBlock::ZERO;
                quantize_block(block, &mut want, order);
                assert_eq!(bits(got), bits(&want), "{order:?}");
            }
        }
        let (mut natural, mut paired) = (Vec::new(), Vec::new());
        quantize_rows(&x, 32 * 8, Order::Natural, &mut natural);
        quantize_rows(&x, 32 * 8, Order::Paired, &mut paired);
        for (n, p) in natural.iter().zip(&paired) {
            for i in 0..QK {
                assert_eq!(p.qs[slot(i, Order::Paired)], n.qs[i]);
            }
        }
    }
}
