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

/// Quantizes `n` rows of `cols` values (`cols` a multiple of [`QK`]) into `out`, which is
/// resized to `n * cols / QK` blocks, row-major.
pub fn quantize_rows(x: &[f32], cols: usize, out: &mut Vec<ActBlock>) {
    debug_assert!(cols.is_multiple_of(QK) && x.len().is_multiple_of(cols));
    out.clear();
    out.resize(x.len() / QK, ActBlock::ZERO);
    for (block, dst) in x.chunks_exact(QK).zip(out.iter_mut()) {
        quantize_block(block, dst);
    }
}

/// Reorders each block's values into pairs for [`super::packed`]: value `p` then value `p + 16`,
/// for `p` in 0..16, so that the i32 at pair `p` holds the two values multiplied by one lane's
/// weight pair. `d` and `s` are unchanged.
pub fn pair_halves(blocks: &mut [ActBlock]) {
    for b in blocks {
        let q = b.qs;
        for p in 0..QK / 2 {
            b.qs[2 * p] = q[p];
            b.qs[2 * p + 1] = q[p + QK / 2];
        }
    }
}

#[inline]
fn quantize_block(x: &[f32], dst: &mut ActBlock) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / Q_MAX;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in dst.qs.iter_mut().zip(x) {
        // |v * id| <= 32767 up to rounding; the cast saturates, so no value wraps.
        let r = (v * id).round() as i16;
        *q = r;
        sum += r as i32;
    }
    dst.d = d;
    dst.s = d * sum as f32;
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
        quantize_rows(&x, 64, &mut q);
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
        quantize_rows(&[0.0; 32], 32, &mut q);
        assert_eq!((q[0].d, q[0].s, q[0].qs), (0.0, 0.0, [0; 32]));
    }
}
