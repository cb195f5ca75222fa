//! Q4_0 / Q4_1 / Q8_0 weights regrouped at load so that a block's values for 16 consecutive
//! rows fill one 512-bit register, one row a 32-bit lane, and multiplied with AVX-512 VNNI
//! (`vpdpwssd`) against activations quantized per block to 16 bits ([`super::act`], the same
//! values the block dots of [`super::own`] use). With the rows in the lanes, every instruction
//! does useful work for any count of activation rows: a decode step's 1-15 and a prompt chunk's
//! hundreds alike, where the block dots of [`super::own`] spend most of their instructions
//! widening weights and reducing lanes per (weight row, activation row) pair. Chosen where the
//! CPU has AVX-512 F, BW and VNNI ([`supported`]); elsewhere a portable loop computes the same
//! bits (the unit tests compare them).
//!
//! **Layout**: the same bytes as GGUF's, reordered (no memory is added but the padding of the
//! last group to 16 rows). Group `g` (rows `16 g ..16 g + 16`), block `b` is one record of
//! `16 * block_bytes`:
//! - Q4_0: the 16 rows' `d` (f16), then for `p` in 0..16 the 16 rows' nibble byte `p`;
//! - Q4_1: the 16 `d`, the 16 `m`, then the nibble bytes as Q4_0;
//! - Q8_0: the 16 `d`, then for `p` in 0..16 each row's values `p` and `p + 16` (i8 pairs).
//!
//! A pair `p` is a block's values `p` and `p + 16` (for the 4-bit types the low and high nibble
//! of one byte); the activations are reordered into the same pairs ([`super::act::Order::Paired`]),
//! so one `vpdpwssd` adds pair `p`'s two products for all 16 rows.
//!
//! **Arithmetic** (every path, so the results are the same bits whatever the batch and the CPU):
//! per output, starting from 0.0, for each block in order: the exact integer sum `q · y` of the
//! 32 products, `acc = fma(f32(q · y), d * d_y, acc)`, then for the 4-bit types
//! `acc = fma(m, s_y, acc)` (Q4_0's `m` is `-8 d`). Each output row is computed alone (the rows
//! of a batch share only the weights' loads), so this kernel is batch-invariant.

use std::ops::Range;

use half::f16;
use rayon::prelude::*;

use super::act::{quantize_rows, ActBlock, Order, QK};
use super::own::OwnType;
use super::{Kernel, OutRows};

/// Weight rows a group holds: one per 32-bit lane of a 512-bit register.
pub const GROUP: usize = 16;

/// Pairs of values a block holds.
const PAIRS: usize = QK / 2;

/// Activation rows multiplied together against a group's unpacked blocks (accumulators in
/// registers: two 512-bit registers a row).
const ACT_ROWS: usize = 8;

/// Activation rows a task multiplies against its groups at a time: 128 rows of 1,536 columns
/// are 442 KB of quantized blocks, within a core's L2.
const ROW_BLOCK: usize = 128;

/// Whether this CPU runs the AVX-512 loop.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which loop [`PackedBlocks`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Loop {
    /// The fastest this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if supported() {
            return Self::Avx512;
        }
        Self::Portable
    }
}

/// A matrix in the grouped layout (see the module's documentation).
#[derive(Debug)]
pub struct PackedBlocks {
    ty: OwnType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    run: Loop,
}

/// One group's block, unpacked for the multiply loop: pair `p`'s 16 rows as i16 pairs in i32
/// lanes, and the 16 rows' `d` and `m` as f32.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Unpacked {
    w: [[i32; GROUP]; PAIRS],
    d: [f32; GROUP],
    m: [f32; GROUP],
}

impl Unpacked {
    const ZERO: Self = Self {
        w: [[0; GROUP]; PAIRS],
        d: [0.0; GROUP],
        m: [0.0; GROUP],
    };
}

thread_local! {
    /// A thread's unpacked group (up to 55 KB for SmolLM2's 1,536 columns), kept between
    /// products.
    static SCRATCH: std::cell::RefCell<Vec<Unpacked>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Offset of the values in a record: after the `d` (and Q4_1's `m`) of 16 rows.
fn values_at(ty: OwnType) -> usize {
    match ty {
        OwnType::Q4_1 => 4 * GROUP,
        OwnType::Q4_0 | OwnType::Q8_0 => 2 * GROUP,
    }
}

impl PackedBlocks {
    /// Regroups `data`, `rows` rows of `cols / 32` GGUF blocks of `ty`, to run with `run`.
    pub fn new(ty: OwnType, data: &[u8], rows: usize, cols: usize, run: Loop) -> Self {
        let (nb, bb) = (cols / QK, ty.block_bytes());
        assert_eq!(data.len(), rows * nb * bb);
        let rec = GROUP * bb;
        let mut out = vec![0u8; rows.div_ceil(GROUP) * nb * rec];
        let vals = values_at(ty);
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let src = &data[(r * nb + b) * bb..][..bb];
                let dst = &mut out[(g * nb + b) * rec..][..rec];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&src[..2]);
                match ty {
                    OwnType::Q4_0 | OwnType::Q4_1 => {
                        let qs = if ty == OwnType::Q4_1 {
                            dst[2 * GROUP + 2 * lane..2 * GROUP + 2 * lane + 2]
                                .copy_from_slice(&src[2..4]);
                            &src[4..20]
                        } else {
                            &src[2..18]
                        };
                        for (p, &q) in qs.iter().enumerate() {
                            dst[vals + p * GROUP + lane] = q;
                        }
                    }
                    OwnType::Q8_0 => {
                        for p in 0..PAIRS {
                            let at = vals + p * 2 * GROUP + 2 * lane;
                            dst[at] = src[2 + p];
                            dst[at + 1] = src[2 + p + PAIRS];
                        }
                    }
                }
            }
        }
        Self {
            ty,
            rows,
            cols,
            data: out,
            run,
        }
    }

    fn blocks(&self) -> usize {
        self.cols / QK
    }

    /// Group `g`'s records, block after block.
    fn group(&self, g: usize) -> &[u8] {
        let len = self.blocks() * GROUP * self.ty.block_bytes();
        &self.data[g * len..(g + 1) * len]
    }

    /// Unpacks group `g` into `dst` (one entry a block; every field is written, so a buffer
    /// kept from an earlier product is not cleared first).
    fn unpack(&self, g: usize, dst: &mut Vec<Unpacked>) {
        dst.resize(self.blocks(), Unpacked::ZERO);
        let src = self.group(g);
        match self.run {
            Loop::Portable => unpack_portable(self.ty, src, dst),
            // SAFETY: `Loop::Avx512` is only made where `supported()` says the CPU has AVX-512
            // F, BW and VNNI; `src` holds `dst.len()` records of the type.
            #[cfg(target_arch = "x86_64")]
            Loop::Avx512 => unsafe { avx512::unpack(self.ty, src, dst) },
        }
    }

    /// Group `g` against activation rows `rows` (their blocks in `act`, `nb` a row), into `out`.
    fn multiply(
        &self,
        w: &[Unpacked],
        act: &[ActBlock],
        rows: Range<usize>,
        g: usize,
        out: &OutRows,
    ) {
        let nb = self.blocks();
        let lanes = GROUP.min(self.rows - g * GROUP);
        let has_m = self.ty != OwnType::Q8_0;
        let mut j = rows.start;
        while j < rows.end {
            let take = tile_rows(rows.end - j);
            let a = &act[j * nb..(j + take) * nb];
            let dst = out.column(g * GROUP);
            // SAFETY: `dst` is column 16 g of row 0 of `out`, whose rows are `out.ld` apart;
            // this call writes columns 16 g..16 g + lanes of rows j..j + take, all inside `out`
            // (16 g + lanes <= rows of the segment, j + take <= n), and no other task writes
            // them (tasks own disjoint groups).
            unsafe {
                let dst = dst.add(j * out.ld);
                match self.run {
                    Loop::Portable => multiply_portable(w, a, take, has_m, dst, out.ld, lanes),
                    #[cfg(target_arch = "x86_64")]
                    Loop::Avx512 => match (take, has_m) {
                        (8, true) => avx512::multiply::<8, true>(w, a, dst, out.ld, lanes),
                        (8, false) => avx512::multiply::<8, false>(w, a, dst, out.ld, lanes),
                        (4, true) => avx512::multiply::<4, true>(w, a, dst, out.ld, lanes),
                        (4, false) => avx512::multiply::<4, false>(w, a, dst, out.ld, lanes),
                        (2, true) => avx512::multiply::<2, true>(w, a, dst, out.ld, lanes),
                        (2, false) => avx512::multiply::<2, false>(w, a, dst, out.ld, lanes),
                        (_, true) => avx512::multiply::<1, true>(w, a, dst, out.ld, lanes),
                        (_, false) => avx512::multiply::<1, false>(w, a, dst, out.ld, lanes),
                    },
                }
            }
            j += take;
        }
    }
}

impl PackedBlocks {
    /// Group `g` against all `n <= ACT_ROWS` activation rows, read from its records.
    #[cfg(target_arch = "x86_64")]
    fn multiply_records(&self, act: &[ActBlock], n: usize, g: usize, out: &OutRows) {
        assert_eq!(self.run, Loop::Avx512, "the portable loop unpacks first");
        let lanes = GROUP.min(self.rows - g * GROUP);
        let src = self.group(g);
        let dst = out.column(g * GROUP);
        let (ty, ld) = (self.ty, out.ld);
        let mut j = 0;
        while j < n {
            let take = tile_rows(n - j);
            let a = &act[j * self.blocks()..(j + take) * self.blocks()];
            // SAFETY: as in `multiply`; `Loop::Avx512` (asserted) is only made where the CPU has
            // the features, and `src` is the group's `nb` records.
            unsafe {
                let dst = dst.add(j * ld);
                match take {
                    8 => avx512::multiply_records::<8>(ty, src, a, dst, ld, lanes),
                    4 => avx512::multiply_records::<4>(ty, src, a, dst, ld, lanes),
                    2 => avx512::multiply_records::<2>(ty, src, a, dst, ld, lanes),
                    _ => avx512::multiply_records::<1>(ty, src, a, dst, ld, lanes),
                }
            }
            j += take;
        }
    }
}

/// How many of `left` activation rows the next register tile takes.
fn tile_rows(left: usize) -> usize {
    match left {
        left if left >= ACT_ROWS => ACT_ROWS,
        left if left >= 4 => 4,
        left if left >= 2 => 2,
        _ => 1,
    }
}

impl Kernel for PackedBlocks {
    fn dtype(&self) -> candle_core::quantized::GgmlDType {
        self.ty.ggml()
    }

    fn bytes(&self) -> usize {
        self.data.len()
    }

    fn matmul(&self, x: &[f32], n: usize, out: &OutRows) {
        let mut act = Vec::new();
        quantize_rows(x, self.cols, Order::Paired, &mut act);
        let groups = self.rows.div_ceil(GROUP);
        let threads = rayon::current_num_threads();
        let per_task = groups.div_ceil(threads * 4).max(1);
        let run = |first: usize| {
            let last = groups.min(first + per_task);
            #[cfg(target_arch = "x86_64")]
            if n <= ACT_ROWS && self.run == Loop::Avx512 {
                // One tile of activation rows: straight from the records.
                (first..last).for_each(|g| self.multiply_records(&act, n, g, out));
                return;
            }
            // Activation rows a block at a time, so that they stay in the core's cache while
            // the task's groups pass (each group unpacked again per block: a few percent).
            SCRATCH.with_borrow_mut(|w| {
                for rows in (0..n).step_by(ROW_BLOCK) {
                    for g in first..last {
                        self.unpack(g, w);
                        self.multiply(w, &act, rows..n.min(rows + ROW_BLOCK), g, out);
                    }
                }
            })
        };
        if threads <= 1 || groups <= per_task {
            (0..groups).step_by(per_task).for_each(run);
        } else {
            (0..groups).into_par_iter().step_by(per_task).for_each(run);
        }
    }

    /// Never: on two threads the grouped loop multiplied 128 rows 1.9-2.1x and 1,024 rows
    /// 1.6-1.7x faster than dequantized tiles and the f32 GEMM (`examples/bench_qmatmul`,
    /// docs/PERFORMANCE.md).
    fn dense_from(&self) -> Option<usize> {
        None
    }

    fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let (g, lane) = (r / GROUP, r % GROUP);
        let rec = GROUP * self.ty.block_bytes();
        let vals = values_at(self.ty);
        for (rec, out) in self
            .group(g)
            .chunks_exact(rec)
            .zip(dst.chunks_exact_mut(QK))
        {
            let d = f16_at(rec, 2 * lane);
            let m = match self.ty {
                OwnType::Q4_0 => -8.0 * d,
                OwnType::Q4_1 => f16_at(rec, 2 * GROUP + 2 * lane),
                OwnType::Q8_0 => 0.0,
            };
            for p in 0..PAIRS {
                let (lo, hi) = pair(self.ty, rec, vals, p, lane);
                out[p] = d * lo as f32 + m;
                out[p + PAIRS] = d * hi as f32 + m;
            }
        }
    }
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Pair `p` of lane `lane` in a record: the weight values `p` and `p + 16` (4-bit ones without
/// their offset).
#[inline]
fn pair(ty: OwnType, rec: &[u8], vals: usize, p: usize, lane: usize) -> (i32, i32) {
    match ty {
        OwnType::Q4_0 | OwnType::Q4_1 => {
            let q = rec[vals + p * GROUP + lane];
            ((q & 0x0f) as i32, (q >> 4) as i32)
        }
        OwnType::Q8_0 => {
            let at = vals + p * 2 * GROUP + 2 * lane;
            (rec[at] as i8 as i32, rec[at + 1] as i8 as i32)
        }
    }
}

fn unpack_portable(ty: OwnType, src: &[u8], dst: &mut [Unpacked]) {
    let rec = GROUP * ty.block_bytes();
    let vals = values_at(ty);
    for (rec, u) in src.chunks_exact(rec).zip(dst) {
        for lane in 0..GROUP {
            let d = f16_at(rec, 2 * lane);
            u.d[lane] = d;
            u.m[lane] = match ty {
                OwnType::Q4_0 => -8.0 * d,
                OwnType::Q4_1 => f16_at(rec, 2 * GROUP + 2 * lane),
                OwnType::Q8_0 => 0.0,
            };
            for p in 0..PAIRS {
                let (lo, hi) = pair(ty, rec, vals, p, lane);
                u.w[p][lane] = (lo as u16 as u32 | ((hi as u16 as u32) << 16)) as i32;
            }
        }
    }
}

/// The portable loop: see the module's documentation for the arithmetic.
///
/// # Safety
/// `dst` is valid for writes of `lanes` values at `dst + j * ld` for `j` in `0..rows`, and `act`
/// holds `rows * w.len()` blocks.
unsafe fn multiply_portable(
    w: &[Unpacked],
    act: &[ActBlock],
    rows: usize,
    has_m: bool,
    dst: *mut f32,
    ld: usize,
    lanes: usize,
) {
    let nb = w.len();
    for j in 0..rows {
        let a = &act[j * nb..(j + 1) * nb];
        for lane in 0..lanes {
            let mut acc = 0.0f32;
            for (u, y) in w.iter().zip(a) {
                let mut isum = 0i32;
                for p in 0..PAIRS {
                    let v = u.w[p][lane];
                    let (lo, hi) = (v as i16 as i32, (v >> 16) as i16 as i32);
                    isum += lo * y.qs[2 * p] as i32 + hi * y.qs[2 * p + 1] as i32;
                }
                acc = (isum as f32).mul_add(u.d[lane] * y.d, acc);
                if has_m {
                    acc = u.m[lane].mul_add(y.s, acc);
                }
            }
            *dst.add(j * ld + lane) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::*;

    /// How far ahead of the record being read the loops prefetch: the loads of a record are
    /// few for its bytes, so without it the out-of-order window keeps too few cache misses in
    /// flight for a matrix read from memory (as in [`super::super::own`]).
    const PREFETCH: usize = 2048;

    /// `KIND`: 0 Q4_0, 1 Q4_1, 2 Q8_0.
    fn kind(ty: OwnType) -> u8 {
        match ty {
            OwnType::Q4_0 => 0,
            OwnType::Q4_1 => 1,
            OwnType::Q8_0 => 2,
        }
    }

    /// A record's 16 `d` and 16 `m` (Q4_0: `-8 d`; Q8_0: unused, zero).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn scales<const KIND: u8>(p: *const u8) -> (__m512, __m512) {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let m = match KIND {
            0 => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
            1 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * GROUP) as *const _)),
            _ => _mm512_setzero_ps(),
        };
        (d, m)
    }

    /// Pair `q` of a record's 16 rows, each lane two i16 (values `q` and `q + 16`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn pair<const KIND: u8>(p: *const u8, q: usize) -> __m512i {
        if KIND == 2 {
            let v = p.add(2 * GROUP + q * 2 * GROUP);
            return _mm512_cvtepi8_epi16(_mm256_loadu_si256(v as *const _));
        }
        let v = p.add(if KIND == 1 { 4 * GROUP } else { 2 * GROUP } + q * GROUP);
        let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(v as *const _));
        // (x | x << 12) & 0x000f000f: the byte's low nibble in bits 0..4, its high one in
        // 16..20 (ternary logic 0xa8: (A | B) & C).
        _mm512_ternarylogic_epi32::<0xa8>(
            x,
            _mm512_slli_epi32::<12>(x),
            _mm512_set1_epi32(0x000f_000f),
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn prefetch(p: *const u8, rec: usize) {
        for line in (0..rec).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + line) as *const i8);
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `src` holds `dst.len()` records of `ty`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn unpack(ty: OwnType, src: &[u8], dst: &mut [Unpacked]) {
        match kind(ty) {
            0 => unpack_kind::<0>(ty, src, dst),
            1 => unpack_kind::<1>(ty, src, dst),
            _ => unpack_kind::<2>(ty, src, dst),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn unpack_kind<const KIND: u8>(ty: OwnType, src: &[u8], dst: &mut [Unpacked]) {
        let rec = GROUP * ty.block_bytes();
        assert!(src.len() >= dst.len() * rec);
        for (b, u) in dst.iter_mut().enumerate() {
            let p = src.as_ptr().add(b * rec);
            prefetch(p, rec);
            let (d, m) = scales::<KIND>(p);
            _mm512_store_ps(u.d.as_mut_ptr(), d);
            _mm512_store_ps(u.m.as_mut_ptr(), m);
            for (q, w) in u.w.iter_mut().enumerate() {
                _mm512_store_si512(w.as_mut_ptr() as *mut _, pair::<KIND>(p, q));
            }
        }
    }

    /// `acc + w · a` per i32 lane (pairs of i16 products), `a` one i32 broadcast from memory,
    /// as one `vpdpwssd`. Written out because LLVM splits the intrinsic into `vpmaddwd` and
    /// `vpaddd` in this loop (two vector operations instead of one).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and VNNI; `a` is valid for a 4-byte read.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn dpwssd(acc: __m512i, w: __m512i, a: *const i32) -> __m512i {
        let mut acc = acc;
        std::arch::asm!(
            "vpdpwssd {acc}, {w}, dword ptr [{a}]{{1to16}}",
            acc = inout(zmm_reg) acc,
            w = in(zmm_reg) w,
            a = in(reg) a,
            options(pure, readonly, nostack, preserves_flags),
        );
        acc
    }

    /// The multiply loop over `nb` blocks for `R` activation rows: `$scales(b)` gives block
    /// `b`'s `(d, m)`, `$pair(b, q)` its pair `q`, `$prefetch(b)` is called first.
    macro_rules! multiply_loop {
        ($nb:expr, $act:expr, $dst:expr, $ld:expr, $lanes:expr, $prefetch:expr, $scales:expr, $pair:expr) => {{
            let (nb, act, dst, ld, lanes) = ($nb, $act, $dst, $ld, $lanes);
            assert!(act.len() >= R * nb && lanes <= GROUP);
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                $prefetch(b);
                let y: [&ActBlock; R] = std::array::from_fn(|j| act.get_unchecked(j * nb + b));
                // Pair p of row j's block is its two i16 values at qs[2p], read as one i32
                // (ActBlock is 4-aligned and its values start at byte 8).
                let w0 = $pair(b, 0);
                let mut sums: [__m512i; R] = std::array::from_fn(|j| {
                    _mm512_madd_epi16(w0, _mm512_set1_epi32(*(y[j].qs.as_ptr() as *const i32)))
                });
                for p in 1..PAIRS {
                    let wp = $pair(b, p);
                    for j in 0..R {
                        sums[j] = dpwssd(sums[j], wp, (y[j].qs.as_ptr() as *const i32).add(p));
                    }
                }
                let (d, m) = $scales(b);
                for j in 0..R {
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(y[j].d));
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[j]), scale, acc[j]);
                    if HAS_M {
                        acc[j] = _mm512_fmadd_ps(m, _mm512_set1_ps(y[j].s), acc[j]);
                    }
                }
            }
            let mask: __mmask16 = if lanes == GROUP {
                0xffff
            } else {
                (1u16 << lanes) - 1
            };
            for (j, v) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(dst.add(j * ld), mask, *v);
            }
        }};
    }

    /// `R` activation rows (`act`: their blocks, row after row) against a group's unpacked
    /// blocks `w`, into `lanes` columns of `R` rows at `dst` (rows `ld` apart).
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `act` holds `R * w.len()` blocks; `dst` is valid for
    /// writes of `lanes <= 16` values at `dst + j * ld` for `j` in `0..R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn multiply<const R: usize, const HAS_M: bool>(
        w: &[Unpacked],
        act: &[ActBlock],
        dst: *mut f32,
        ld: usize,
        lanes: usize,
    ) {
        multiply_loop!(
            w.len(),
            act,
            dst,
            ld,
            lanes,
            |_| (),
            |b: usize| {
                let u = w.get_unchecked(b);
                (_mm512_load_ps(u.d.as_ptr()), _mm512_load_ps(u.m.as_ptr()))
            },
            |b: usize, p: usize| _mm512_load_si512(w.get_unchecked(b).w[p].as_ptr() as *const _)
        )
    }

    /// As [`multiply`], reading the group's records (`src`, of `ty`) directly: for a single
    /// tile of activation rows, where unpacking first would only add a store and a load.
    ///
    /// # Safety
    /// As [`multiply`], with `src` holding `act.len() / R` records of `ty`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn multiply_records<const R: usize>(
        ty: OwnType,
        src: &[u8],
        act: &[ActBlock],
        dst: *mut f32,
        ld: usize,
        lanes: usize,
    ) {
        match kind(ty) {
            0 => records_kind::<R, true, 0>(ty, src, act, dst, ld, lanes),
            1 => records_kind::<R, true, 1>(ty, src, act, dst, ld, lanes),
            _ => records_kind::<R, false, 2>(ty, src, act, dst, ld, lanes),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn records_kind<const R: usize, const HAS_M: bool, const KIND: u8>(
        ty: OwnType,
        src: &[u8],
        act: &[ActBlock],
        dst: *mut f32,
        ld: usize,
        lanes: usize,
    ) {
        let rec = GROUP * ty.block_bytes();
        let nb = act.len() / R;
        assert!(src.len() >= nb * rec);
        let at = |b: usize| src.as_ptr().add(b * rec);
        multiply_loop!(
            nb,
            act,
            dst,
            ld,
            lanes,
            |b: usize| prefetch(at(b), rec),
            |b: usize| scales::<KIND>(at(b)),
            |b: usize, p: usize| pair::<KIND>(at(b), p)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::own::{self, Simd};
    use super::*;

    /// Blocks of `ty` from a deterministic byte pattern with small, finite scales.
    fn weights(ty: OwnType, rows: usize, blocks: usize, seed: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (s >> 16) as u8
        };
        for _ in 0..rows * blocks {
            let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| next()).collect();
            let d = f16::from_f32(0.01 + (next() as f32) / 5000.0);
            b[..2].copy_from_slice(&d.to_bits().to_le_bytes());
            if ty == OwnType::Q4_1 {
                let m = f16::from_f32(-(next() as f32) / 3000.0);
                b[2..4].copy_from_slice(&m.to_bits().to_le_bytes());
            }
            out.extend(b);
        }
        out
    }

    /// The product on a pool of `threads` threads (one runs every group on the caller).
    fn product_on(k: &PackedBlocks, x: &[f32], n: usize, threads: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n * k.rows];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| k.matmul(x, n, &OutRows::new(&mut out, k.rows, 0, k.rows, n)));
        out
    }

    fn product(k: &PackedBlocks, x: &[f32], n: usize) -> Vec<f32> {
        product_on(k, x, n, 2)
    }

    /// 37 rows: two full groups and a part one.
    const ROWS: usize = 37;

    fn input(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i * 7919 % 509) as f32 - 254.0) / 17.0)
            .collect()
    }

    #[test]
    fn rows_come_back_as_the_gguf_layouts_rows() {
        let cols = 3 * QK;
        for ty in [OwnType::Q4_0, OwnType::Q4_1, OwnType::Q8_0] {
            let data = weights(ty, ROWS, cols / QK, 5);
            let k = PackedBlocks::new(ty, &data, ROWS, cols, Loop::Portable);
            let rb = cols / QK * ty.block_bytes();
            for r in 0..ROWS {
                let (mut got, mut want) = (vec![0.0; cols], vec![0.0; cols]);
                k.dequantize_row(r, &mut got);
                own::dequantize_row(ty, &data[r * rb..(r + 1) * rb], &mut want);
                assert_eq!(got, want, "{ty:?} row {r}");
            }
        }
    }

    /// Against the block dots of `own` (same quantized activations, another order of float
    /// operations): within f32 rounding of the sums.
    #[test]
    fn products_agree_with_the_block_dots() {
        let cols = 8 * QK;
        let n = 3;
        let x = input(n, cols);
        let mut act = Vec::new();
        quantize_rows(&x, cols, Order::Natural, &mut act);
        for ty in [OwnType::Q4_0, OwnType::Q4_1, OwnType::Q8_0] {
            let data = weights(ty, ROWS, cols / QK, 9);
            let got = product(
                &PackedBlocks::new(ty, &data, ROWS, cols, Loop::Portable),
                &x,
                n,
            );
            let rb = cols / QK * ty.block_bytes();
            for r in 0..ROWS {
                let w = &data[r * rb..(r + 1) * rb];
                for j in 0..n {
                    let a = &act[j * cols / QK..(j + 1) * cols / QK];
                    let want = own::dot_tile(Simd::Portable, ty, [w], [a])[0][0];
                    let g = got[j * ROWS + r];
                    assert!(
                        (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{ty:?} ({j}, {r}): {g} vs {want}"
                    );
                }
            }
        }
    }

    /// The AVX-512 loop gives the portable loop's bits, and each row's results do not depend on
    /// the batch (1, 3, 8 and 13 rows: every register tiling) nor on the threads (one thread
    /// runs every group's task itself).
    #[test]
    fn every_loop_and_batch_gives_the_same_bits() {
        let cols = 5 * QK;
        let x = input(13, cols);
        for ty in [OwnType::Q4_0, OwnType::Q4_1, OwnType::Q8_0] {
            let data = weights(ty, ROWS, cols / QK, 21);
            let portable = PackedBlocks::new(ty, &data, ROWS, cols, Loop::Portable);
            let want = product(&portable, &x, 13);
            let mut loops = vec![portable];
            if Loop::detect() != Loop::Portable {
                loops.push(PackedBlocks::new(ty, &data, ROWS, cols, Loop::detect()));
            } else {
                eprintln!("this CPU has no AVX-512 VNNI: the portable loop only");
            }
            for k in &loops {
                for (n, threads) in [(1, 2), (3, 2), (8, 2), (13, 2), (1, 1), (13, 1), (13, 3)] {
                    let got = product_on(k, &x[..n * cols], n, threads);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want[..n * ROWS]),
                        "{ty:?} {:?} n={n}",
                        k.run
                    );
                }
            }
        }
    }
}
