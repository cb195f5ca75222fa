//! Our kernels for llama.cpp's 32-value block types Q4_0, Q4_1 and Q8_0, against activations
//! quantized per block to 16 bits ([`super::act`]). candle-core's Q4_1 dot product is scalar (no
//! SIMD), the type of SmolLM2's GGUF; these use AVX2 (weights widened to i16, `madd_epi16` with
//! the activations into i32 per pair) and decode each weight block once for up to four
//! activation rows. Where the CPU has AVX-512 VNNI (with VL), the same loop adds a block's second
//! half with one 256-bit `vpdpwssd` instead of a `madd_epi16` and an add: the integer sums are
//! exact either way, so the results are the same bits, and an 8-row decode product took 20% less
//! time on a Zen 4 (docs/PERFORMANCE.md, issue 12, session 25). On 64-bit Arm a NEON loop does
//! the same with `smull`/`smlal` (i16 times i16 into i32, four lanes an instruction). Elsewhere a
//! portable loop computes the same sums.
//!
//! Block layouts (GGUF, little-endian, f16 scales):
//! - Q4_0, 18 bytes: `d`, 16 bytes of nibbles; value `i` is `d * (q_i - 8)`;
//! - Q4_1, 20 bytes: `d`, `m`, 16 bytes of nibbles; value `i` is `d * q_i + m`;
//! - Q8_0, 34 bytes: `d`, 32 i8; value `i` is `d * q_i`.
//!
//! Nibble order: values 0..16 are the low nibbles of bytes 0..16, values 16..32 the high ones.
//! Per block with activations `x_i = d_x * y_i`: Q4_1 gives `d d_x sum(q y) + m s_x` and Q4_0
//! `d d_x sum(q y) - 8 d s_x`, with `s_x = d_x sum(y)` stored in the activation block. The
//! integer sums are exact; the only error beyond f32 rounding is the activations' quantization.

use candle_core::quantized::GgmlDType;

use super::act::{ActBlock, QK};

/// A block type these kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnType {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl OwnType {
    /// The type of a GGUF block type, when we have kernels for it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// Bytes of one block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Which implementation runs, decided once per product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// [`Simd::Avx2`] with AVX-512 VNNI's 256-bit multiply-accumulate (the same bits).
    #[cfg(target_arch = "x86_64")]
    Avx2Vnni,
    /// Arm's Advanced SIMD (NEON), part of every AArch64 target.
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    Neon,
}

impl Simd {
    /// The best this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                return Self::Avx2Vnni;
            }
            return Self::Avx2;
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        {
            Self::Neon
        }
        #[cfg(not(all(target_arch = "aarch64", target_feature = "neon")))]
        {
            Self::Portable
        }
    }
}

/// Dot products of `R` weight rows (`ws[i]`: that row's blocks' bytes) with `NR` activation
/// rows (each as many blocks): `out[i][j] = ws[i] · acts[j]`. Several weight rows a pass give
/// the AVX2 loop independent accumulators (the FMA latency, not the multiplies, bounds a single
/// row); several activation rows decode each weight block once for all of them.
#[inline]
pub fn dot_tile<const R: usize, const NR: usize>(
    simd: Simd,
    ty: OwnType,
    ws: [&[u8]; R],
    acts: [&[ActBlock]; NR],
) -> [[f32; NR]; R] {
    assert!(ws
        .iter()
        .all(|w| acts.iter().all(|a| a.len() * ty.block_bytes() == w.len())));
    match simd {
        Simd::Portable => ws.map(|w| portable::dot_rows(ty, w, acts)),
        // SAFETY: `Simd::Avx2` is only made by `detect` after checking AVX2, FMA and F16C, and
        // every activation row has as many blocks as each weight row (asserted above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { avx2::dot_tile(ty, ws, acts) },
        // SAFETY: as above; `Simd::Avx2Vnni` also means AVX-512 VNNI and VL.
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2Vnni => unsafe { avx2::dot_tile_vnni(ty, ws, acts) },
        // SAFETY: block counts as above (the target has NEON, or `Simd::Neon` would not exist).
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        Simd::Neon => unsafe { neon::dot_tile(ty, ws, acts) },
    }
}

/// Row `w` (its blocks' bytes) as f32 into `dst` (`QK` values a block).
pub fn dequantize_row(ty: OwnType, w: &[u8], dst: &mut [f32]) {
    for (b, out) in w
        .chunks_exact(ty.block_bytes())
        .zip(dst.chunks_exact_mut(QK))
    {
        let d = f16_at(b, 0);
        match ty {
            OwnType::Q4_0 | OwnType::Q4_1 => {
                let (m, qs) = if ty == OwnType::Q4_1 {
                    (f16_at(b, 2), &b[4..20])
                } else {
                    (-8.0 * d, &b[2..18])
                };
                for i in 0..QK / 2 {
                    out[i] = d * (qs[i] & 0x0f) as f32 + m;
                    out[i + QK / 2] = d * (qs[i] >> 4) as f32 + m;
                }
            }
            OwnType::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&b[2..34]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
    }
}

/// The little-endian f16 at `b[at..at + 2]` as f32 (a block's scales, in every kernel here).
#[inline(always)]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    {
        // The FPU's `fcvt`: every ARMv8-A FPU converts half to single precision, where the
        // `half` crate asks the CPU for FEAT_FP16 at every call first.
        let out: f32;
        // SAFETY: two register moves and a conversion; no memory is touched.
        unsafe {
            std::arch::asm!(
                "fmov {t:s}, {bits:w}",
                "fcvt {out:s}, {t:h}",
                bits = in(reg) u32::from(bits),
                t = out(vreg) _,
                out = lateout(vreg) out,
                options(pure, nomem, nostack, preserves_flags),
            );
        }
        out
    }
    #[cfg(not(all(target_arch = "aarch64", target_feature = "neon")))]
    {
        half::f16::from_bits(bits).to_f32()
    }
}

mod portable {
    use super::*;

    pub fn dot_rows<const NR: usize>(ty: OwnType, w: &[u8], acts: [&[ActBlock]; NR]) -> [f32; NR] {
        let mut out = [0.0f32; NR];
        for (bi, b) in w.chunks_exact(ty.block_bytes()).enumerate() {
            let d = f16_at(b, 0);
            let mut q = [0i32; QK];
            let m = match ty {
                OwnType::Q4_0 | OwnType::Q4_1 => {
                    let (m, qs) = if ty == OwnType::Q4_1 {
                        (f16_at(b, 2), &b[4..20])
                    } else {
                        (-8.0 * d, &b[2..18])
                    };
                    for i in 0..QK / 2 {
                        q[i] = (qs[i] & 0x0f) as i32;
                        q[i + QK / 2] = (qs[i] >> 4) as i32;
                    }
                    m
                }
                OwnType::Q8_0 => {
                    for (qi, &v) in q.iter_mut().zip(&b[2..34]) {
                        *qi = v as i8 as i32;
                    }
                    0.0
                }
            };
            for (o, a) in out.iter_mut().zip(acts) {
                let a = &a[bi];
                let isum: i32 = q.iter().zip(&a.qs).map(|(&x, &y)| x * y as i32).sum();
                *o += d * a.d * isum as f32 + m * a.s;
            }
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; every `acts[j]` has `ws[i].len() / ty.block_bytes()`
    /// blocks for every `i`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_tile<const R: usize, const NR: usize>(
        ty: OwnType,
        ws: [&[u8]; R],
        acts: [&[ActBlock]; NR],
    ) -> [[f32; NR]; R] {
        match ty {
            OwnType::Q4_0 => dot::<R, NR, 0>(ws, acts),
            OwnType::Q4_1 => dot::<R, NR, 1>(ws, acts),
            OwnType::Q8_0 => dot::<R, NR, 2>(ws, acts),
        }
    }

    /// [`dot_tile`] with each block's second half multiplied and added by `vpdpwssd`.
    ///
    /// # Safety
    /// As [`dot_tile`], and the CPU has AVX-512 VNNI and VL.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot_tile_vnni<const R: usize, const NR: usize>(
        ty: OwnType,
        ws: [&[u8]; R],
        acts: [&[ActBlock]; NR],
    ) -> [[f32; NR]; R] {
        match ty {
            OwnType::Q4_0 => dot_vnni::<R, NR, 0>(ws, acts),
            OwnType::Q4_1 => dot_vnni::<R, NR, 1>(ws, acts),
            OwnType::Q8_0 => dot_vnni::<R, NR, 2>(ws, acts),
        }
    }

    /// One weight block as two halves of 16 i16 values (0..16 and 16..32), its scale `d` and
    /// the factor of the activations' `s` (Q4_1: `m`; Q4_0: `-8 d`; Q8_0: 0).
    /// `KIND`: 0 Q4_0, 1 Q4_1, 2 Q8_0.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn block<const KIND: u8>(p: *const u8) -> (__m256i, __m256i, f32, f32) {
        if KIND == 2 {
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(
                p as *const u16,
            ) as i32)));
            let q = p.add(2) as *const __m128i;
            let lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(q));
            let hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(q.add(1)));
            return (lo, hi, d, 0.0);
        }
        // d (and m for Q4_1) from the block's first four bytes; for Q4_0 the second lane is two
        // nibble bytes and is not used.
        let scales = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(p as *const i32)));
        let d = _mm_cvtss_f32(scales);
        let (m, off) = if KIND == 1 {
            (_mm_cvtss_f32(_mm_movehdup_ps(scales)), 4)
        } else {
            (-8.0 * d, 2)
        };
        let low = _mm_set1_epi8(0x0f);
        let raw = _mm_loadu_si128(p.add(off) as *const __m128i);
        let lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
        let hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
        (lo, hi, d, m)
    }

    /// How far ahead of the block being multiplied its row's bytes are prefetched. The loop
    /// issues many instructions per weight byte, so the out-of-order window alone keeps few
    /// cache misses in flight: without the prefetch, a Q8_0 product that does not fit the cache
    /// (SmolLM2's 49,152 x 576 lm_head, 30 MB) ran at 3 GB/s on one thread, 2-3x slower than with
    /// it (docs/PERFORMANCE.md, issue 12).
    const PREFETCH: usize = 1024;

    /// The loop of [`dot`] and [`dot_vnni`]: `$prod(lo, hi, y)` is a block's 8 i32 sums of pairs
    /// (`y`: the activation block's 32 i16 values as two 256-bit halves).
    macro_rules! dot_loop {
        ($ws:expr, $acts:expr, $prod:expr) => {{
            let (ws, acts) = ($ws, $acts);
            let bb = [18, 20, 34][KIND as usize];
            let nb = ws[0].len() / bb;
            let mut acc = [[_mm256_setzero_ps(); NR]; R];
            let mut acc_m = [[0.0f32; NR]; R];
            for b in 0..nb {
                for i in 0..R {
                    let p = ws[i].as_ptr().add(b * bb);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH) as *const i8);
                    let (lo, hi, d, m) = block::<KIND>(p);
                    for j in 0..NR {
                        let a = acts[j].get_unchecked(b);
                        let y = a.qs.as_ptr() as *const __m256i;
                        let prod = $prod(lo, hi, y);
                        acc[i][j] = _mm256_fmadd_ps(
                            _mm256_set1_ps(d * a.d),
                            _mm256_cvtepi32_ps(prod),
                            acc[i][j],
                        );
                        if KIND != 2 {
                            acc_m[i][j] += m * a.s;
                        }
                    }
                }
            }
            let mut out = [[0.0f32; NR]; R];
            for i in 0..R {
                for j in 0..NR {
                    out[i][j] = hsum(acc[i][j]) + acc_m[i][j];
                }
            }
            out
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot<const R: usize, const NR: usize, const KIND: u8>(
        ws: [&[u8]; R],
        acts: [&[ActBlock]; NR],
    ) -> [[f32; NR]; R] {
        // |q| <= 128 and |y| <= 32767: 32 products sum to under 2^28, no overflow.
        dot_loop!(ws, acts, |lo, hi, y: *const __m256i| _mm256_add_epi32(
            _mm256_madd_epi16(lo, _mm256_loadu_si256(y)),
            _mm256_madd_epi16(hi, _mm256_loadu_si256(y.add(1))),
        ))
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn dot_vnni<const R: usize, const NR: usize, const KIND: u8>(
        ws: [&[u8]; R],
        acts: [&[ActBlock]; NR],
    ) -> [[f32; NR]; R] {
        // The same exact sums: the second half's pairs added to the first's by one instruction.
        dot_loop!(ws, acts, |lo, hi, y: *const __m256i| _mm256_dpwssd_epi32(
            _mm256_madd_epi16(lo, _mm256_loadu_si256(y)),
            hi,
            _mm256_loadu_si256(y.add(1)),
        ))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// The NEON loop. NEON is part of every AArch64 target Rust builds for (`target_feature =
/// "neon"` is on by default), so its functions need no feature attribute and inline into each
/// other.
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon {
    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::*;

    /// # Safety
    /// Every `acts[j]` has `ws[i].len() / ty.block_bytes()` blocks for every `i`.
    pub unsafe fn dot_tile<const R: usize, const NR: usize>(
        ty: OwnType,
        ws: [&[u8]; R],
        acts: [&[ActBlock]; NR],
    ) -> [[f32; NR]; R] {
        match ty {
            OwnType::Q4_0 => dot::<R, NR, 0>(ws, acts),
            OwnType::Q4_1 => dot::<R, NR, 1>(ws, acts),
            OwnType::Q8_0 => dot::<R, NR, 2>(ws, acts),
        }
    }

    /// One weight block as four runs of 8 i16 values (0..8, 8..16, 16..24, 24..32), its scale
    /// `d` and the factor of the activations' `s` (Q4_1: `m`; Q4_0: `-8 d`; Q8_0: 0).
    /// `KIND`: 0 Q4_0, 1 Q4_1, 2 Q8_0.
    #[inline(always)]
    unsafe fn block<const KIND: u8>(p: *const u8) -> ([int16x8_t; 4], f32, f32) {
        // Every block type starts with at least four bytes (its scales, or a scale and values).
        let head = std::slice::from_raw_parts(p, 4);
        let d = f16_at(head, 0);
        if KIND == 2 {
            let q0 = vld1q_s8(p.add(2) as *const i8);
            let q1 = vld1q_s8(p.add(18) as *const i8);
            let q = [
                vmovl_s8(vget_low_s8(q0)),
                vmovl_high_s8(q0),
                vmovl_s8(vget_low_s8(q1)),
                vmovl_high_s8(q1),
            ];
            return (q, d, 0.0);
        }
        let (m, off) = if KIND == 1 {
            (f16_at(head, 2), 4)
        } else {
            (-8.0 * d, 2)
        };
        let raw = vld1q_u8(p.add(off));
        let lo = vandq_u8(raw, vdupq_n_u8(0x0f));
        let hi = vshrq_n_u8::<4>(raw);
        let q = [
            vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(lo))),
            vreinterpretq_s16_u16(vmovl_high_u8(lo)),
            vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(hi))),
            vreinterpretq_s16_u16(vmovl_high_u8(hi)),
        ];
        (q, d, m)
    }

    /// As the AVX2 loop's: how far ahead of the block being multiplied its row is prefetched.
    const PREFETCH: usize = 1024;

    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: a prefetch reads nothing architecturally and never faults, whatever the
        // address.
        unsafe {
            asm!("prfm pldl1keep, [{0}]", in(reg) p, options(nostack, readonly, preserves_flags));
        }
    }

    #[inline(always)]
    unsafe fn dot<const R: usize, const NR: usize, const KIND: u8>(
        ws: [&[u8]; R],
        acts: [&[ActBlock]; NR],
    ) -> [[f32; NR]; R] {
        let bb = [18, 20, 34][KIND as usize];
        let nb = ws[0].len() / bb;
        let mut acc = [[vdupq_n_f32(0.0); NR]; R];
        let mut acc_m = [[0.0f32; NR]; R];
        for b in 0..nb {
            for i in 0..R {
                let p = ws[i].as_ptr().add(b * bb);
                prefetch(p.wrapping_add(PREFETCH));
                let (q, d, m) = block::<KIND>(p);
                for j in 0..NR {
                    let a = acts[j].get_unchecked(b);
                    let y = a.qs.as_ptr();
                    let y = [
                        vld1q_s16(y),
                        vld1q_s16(y.add(8)),
                        vld1q_s16(y.add(16)),
                        vld1q_s16(y.add(24)),
                    ];
                    // |q| <= 128 and |y| <= 32767: 32 products sum to under 2^28, no overflow.
                    // Two chains of four multiply-adds, each half the block.
                    let mut s0 = vmull_s16(vget_low_s16(q[0]), vget_low_s16(y[0]));
                    let mut s1 = vmull_s16(vget_low_s16(q[2]), vget_low_s16(y[2]));
                    s0 = vmlal_high_s16(s0, q[0], y[0]);
                    s1 = vmlal_high_s16(s1, q[2], y[2]);
                    s0 = vmlal_s16(s0, vget_low_s16(q[1]), vget_low_s16(y[1]));
                    s1 = vmlal_s16(s1, vget_low_s16(q[3]), vget_low_s16(y[3]));
                    s0 = vmlal_high_s16(s0, q[1], y[1]);
                    s1 = vmlal_high_s16(s1, q[3], y[3]);
                    let sums = vcvtq_f32_s32(vaddq_s32(s0, s1));
                    acc[i][j] = vfmaq_n_f32(acc[i][j], sums, d * a.d);
                    if KIND != 2 {
                        acc_m[i][j] += m * a.s;
                    }
                }
            }
        }
        let mut out = [[0.0f32; NR]; R];
        for i in 0..R {
            for j in 0..NR {
                out[i][j] = vaddvq_f32(acc[i][j]) + acc_m[i][j];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::super::act::{quantize_rows, Order};
    use super::*;

    /// Blocks of `ty` from a deterministic byte pattern with small, finite scales.
    fn weights(ty: OwnType, blocks: usize, seed: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (s >> 16) as u8
        };
        for _ in 0..blocks {
            let mut b = vec![0u8; ty.block_bytes()];
            for v in b.iter_mut() {
                *v = next();
            }
            let d = f16::from_f32(0.01 + (next() as f32) / 5000.0)
                .to_bits()
                .to_le_bytes();
            b[..2].copy_from_slice(&d);
            if ty == OwnType::Q4_1 {
                let m = f16::from_f32(-(next() as f32) / 3000.0)
                    .to_bits()
                    .to_le_bytes();
                b[2..4].copy_from_slice(&m);
            }
            out.extend(b);
        }
        out
    }

    /// The VNNI loop against the AVX2 one, bit for bit, where the CPU has both (elsewhere there
    /// is nothing to compare, and the test says so).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vnni_loop_gives_the_avx2_loops_bits() {
        if Simd::detect() != Simd::Avx2Vnni {
            eprintln!("this CPU has no AVX-512 VNNI: nothing to compare");
            return;
        }
        let cols = 12 * QK;
        let x: Vec<f32> = (0..4 * cols)
            .map(|i| ((i * 7919 % 509) as f32 - 254.0) / 17.0)
            .collect();
        let mut acts = Vec::new();
        quantize_rows(&x, cols, Order::Natural, &mut acts);
        let r: Vec<&[ActBlock]> = acts.chunks_exact(cols / QK).collect();
        for ty in [OwnType::Q4_0, OwnType::Q4_1, OwnType::Q8_0] {
            let (w0, w1) = (weights(ty, cols / QK, 3), weights(ty, cols / QK, 11));
            let bits = |v: [[f32; 4]; 2]| v.map(|row| row.map(f32::to_bits));
            let four = [r[0], r[1], r[2], r[3]];
            assert_eq!(
                bits(dot_tile(Simd::Avx2, ty, [&w0, &w1], four)),
                bits(dot_tile(Simd::Avx2Vnni, ty, [&w0, &w1], four)),
                "{ty:?}"
            );
            let one = |simd| dot_tile(simd, ty, [&w1], [r[2]])[0][0].to_bits();
            assert_eq!(one(Simd::Avx2), one(Simd::Avx2Vnni), "{ty:?}");
        }
    }

    /// Every 64-bit Arm CPU has NEON, so there the test below checks the NEON loop, not the
    /// portable one twice.
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    #[test]
    fn arm_runs_the_neon_loop() {
        assert_eq!(Simd::detect(), Simd::Neon);
    }

    #[test]
    fn simd_and_portable_dots_agree_with_the_dequantized_product() {
        let cols = 8 * QK;
        let x: Vec<f32> = (0..4 * cols)
            .map(|i| ((i * 7919 % 257) as f32 - 128.0) / 40.0)
            .collect();
        let mut acts = Vec::new();
        quantize_rows(&x, cols, Order::Natural, &mut acts);
        let rows: Vec<&[ActBlock]> = acts.chunks_exact(cols / QK).collect();
        for ty in [OwnType::Q4_0, OwnType::Q4_1, OwnType::Q8_0] {
            let w = weights(ty, cols / QK, 7);
            let mut wf = vec![0.0f32; cols];
            dequantize_row(ty, &w, &mut wf);
            // Exact reference: dequantized weights times dequantized activations, in f64.
            let want: Vec<f64> = (0..4)
                .map(|j| {
                    (0..cols)
                        .map(|i| {
                            let a = &acts[j * cols / QK + i / QK];
                            wf[i] as f64 * (a.d * a.qs[i % QK] as f32) as f64
                        })
                        .sum()
                })
                .collect();
            let scale: f64 = wf.iter().map(|v| v.abs() as f64).sum::<f64>() * 3.2;
            for simd in [Simd::Portable, Simd::detect()] {
                let all = [rows[0], rows[1], rows[2], rows[3]];
                let four = dot_tile(simd, ty, [&w], all)[0];
                let two_rows = dot_tile(simd, ty, [&w, &w], all);
                for j in 0..4 {
                    let one = dot_tile(simd, ty, [&w], [rows[j]])[0][0];
                    for got in [four[j], one, two_rows[0][j], two_rows[1][j]] {
                        assert!(
                            (got as f64 - want[j]).abs() <= 1e-5 * scale,
                            "{ty:?} {simd:?} row {j}: {got} vs {}",
                            want[j]
                        );
                    }
                }
            }
        }
    }
}
