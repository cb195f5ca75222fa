//! Q4_0 / Q4_1 / Q8_0 / Q4_K weights regrouped at load so that a block's values for 16 consecutive
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
//! `16 * block_bytes` (Q4_K: see below):
//! - Q4_0: the 16 rows' `d` (f16), then for `p` in 0..16 the 16 rows' nibble byte `p`;
//! - Q4_1: the 16 `d`, the 16 `m`, then the nibble bytes as Q4_0;
//! - Q8_0: the 16 `d`, then for `p` in 0..16 each row's values `p` and `p + 16` (i8 pairs);
//! - Q4_K (a record is a 256-value super-block, eight 32-value sub-blocks, 64 bytes more than
//!   GGUF's): the 16 `d`, the 16 `dmin`, for each sub-block the 16 rows' 6-bit scales, then
//!   their mins (a byte each), then for each sub-block its nibble bytes as Q4_0's, re-paired so
//!   that byte `p` holds the sub-block's values `p` and `p + 16`. Its `d` and `m` per sub-block
//!   are `d * scale` and `-(dmin * min)`, exact in f32.
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

use rayon::prelude::*;

use candle_core::quantized::GgmlDType;

use super::act::{quantize_rows, ActBlock, Order, QK};
use super::own::f16_at;
use super::{Kernel, OutRows};

/// A block type this kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Q4_0,
    Q4_1,
    Q8_0,
    /// 256-value super-blocks of eight 32-value sub-blocks, each with a 6-bit scale and min.
    Q4K,
}

impl Packing {
    /// The type of a GGUF block type, when this kernel runs it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q4K => Some(Self::Q4K),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// Bytes of one GGUF block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
        }
    }

    /// 32-value blocks one GGUF block (and one record) holds.
    fn subs(self) -> usize {
        match self {
            Self::Q4K => 8,
            _ => 1,
        }
    }

    /// Bytes of one record: 16 rows' block, Q4_K's 6-bit scales and mins a byte each.
    fn record_bytes(self) -> usize {
        match self {
            Self::Q4K => GROUP * (self.block_bytes() + 4),
            _ => GROUP * self.block_bytes(),
        }
    }

    /// Whether the values have an offset (`m`).
    fn has_m(self) -> bool {
        self != Self::Q8_0
    }
}

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
    ty: Packing,
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

/// Offset of sub-block `sub`'s values in a record: after the `d` (and `m`, or Q4_K's `dmin`,
/// scales and mins) of 16 rows.
fn values_at(ty: Packing, sub: usize) -> usize {
    match ty {
        Packing::Q4_1 => 4 * GROUP,
        Packing::Q4_0 | Packing::Q8_0 => 2 * GROUP,
        Packing::Q4K => 20 * GROUP + sub * PAIRS * GROUP,
    }
}

/// Q4_K's 6-bit scale and min of sub-block `j` from its 12 packed bytes (llama.cpp's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The record holding 32-value block `b` of a group's records `src`, and the block's sub-block
/// in it.
fn record_of(ty: Packing, src: &[u8], b: usize) -> (&[u8], usize) {
    let rec = ty.record_bytes();
    (&src[b / ty.subs() * rec..][..rec], b % ty.subs())
}

/// Lane `lane`'s `d` and `m` for sub-block `sub` of a record (Q4_K: `d * scale` and
/// `-(dmin * min)`, both exact in f32).
fn scale_of(ty: Packing, rec: &[u8], sub: usize, lane: usize) -> (f32, f32) {
    let d = f16_at(rec, 2 * lane);
    match ty {
        Packing::Q4_0 => (d, -8.0 * d),
        Packing::Q4_1 => (d, f16_at(rec, 2 * GROUP + 2 * lane)),
        Packing::Q8_0 => (d, 0.0),
        Packing::Q4K => {
            let dmin = f16_at(rec, 2 * GROUP + 2 * lane);
            let sc = rec[4 * GROUP + sub * GROUP + lane] as f32;
            let min = rec[12 * GROUP + sub * GROUP + lane] as f32;
            (d * sc, -(dmin * min))
        }
    }
}

impl PackedBlocks {
    /// Regroups `data`, `rows` rows of GGUF blocks of `ty` (`cols` values a row), to run with
    /// `run`.
    pub fn new(ty: Packing, data: &[u8], rows: usize, cols: usize, run: Loop) -> Self {
        let (nb, bb) = (cols / (QK * ty.subs()), ty.block_bytes());
        assert_eq!(data.len(), rows * nb * bb);
        let rec = ty.record_bytes();
        let mut out = vec![0u8; rows.div_ceil(GROUP) * nb * rec];
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            for b in 0..nb {
                let src = &data[(r * nb + b) * bb..][..bb];
                let dst = &mut out[(g * nb + b) * rec..][..rec];
                dst[2 * lane..2 * lane + 2].copy_from_slice(&src[..2]);
                if matches!(ty, Packing::Q4_1 | Packing::Q4K) {
                    // Q4_1's m, Q4_K's dmin.
                    dst[2 * GROUP + 2 * lane..2 * GROUP + 2 * lane + 2].copy_from_slice(&src[2..4]);
                }
                match ty {
                    Packing::Q4_0 | Packing::Q4_1 => {
                        let vals = values_at(ty, 0);
                        let qs = if ty == Packing::Q4_1 {
                            &src[4..20]
                        } else {
                            &src[2..18]
                        };
                        for (p, &q) in qs.iter().enumerate() {
                            dst[vals + p * GROUP + lane] = q;
                        }
                    }
                    Packing::Q8_0 => {
                        let vals = values_at(ty, 0);
                        for p in 0..PAIRS {
                            let at = vals + p * 2 * GROUP + 2 * lane;
                            dst[at] = src[2 + p];
                            dst[at + 1] = src[2 + p + PAIRS];
                        }
                    }
                    Packing::Q4K => {
                        for sub in 0..ty.subs() {
                            let (sc, min) = scale_min_k4(sub, &src[4..16]);
                            dst[4 * GROUP + sub * GROUP + lane] = sc;
                            dst[12 * GROUP + sub * GROUP + lane] = min;
                            // Sub-blocks 2c and 2c + 1: the low and high nibbles of bytes
                            // 32c..32c + 32; pair p takes values p and p + 16 of one.
                            let (chunk, shift) = (&src[16 + 32 * (sub / 2)..][..32], 4 * (sub % 2));
                            let vals = values_at(ty, sub);
                            for p in 0..PAIRS {
                                let lo = (chunk[p] >> shift) & 0x0f;
                                let hi = (chunk[p + PAIRS] >> shift) & 0x0f;
                                dst[vals + p * GROUP + lane] = lo | (hi << 4);
                            }
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
        let len = self.blocks() / self.ty.subs() * self.ty.record_bytes();
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
        let has_m = self.ty.has_m();
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
        let group = self.group(g);
        for (b, out) in dst.chunks_exact_mut(QK).enumerate() {
            let (rec, sub) = record_of(self.ty, group, b);
            let (d, m) = scale_of(self.ty, rec, sub, lane);
            for p in 0..PAIRS {
                let (lo, hi) = pair(self.ty, rec, sub, p, lane);
                out[p] = d * lo as f32 + m;
                out[p + PAIRS] = d * hi as f32 + m;
            }
        }
    }
}

/// Pair `p` of lane `lane` in sub-block `sub` of a record: the weight values `p` and `p + 16`
/// (4-bit ones without their offset).
#[inline]
fn pair(ty: Packing, rec: &[u8], sub: usize, p: usize, lane: usize) -> (i32, i32) {
    let vals = values_at(ty, sub);
    match ty {
        Packing::Q4_0 | Packing::Q4_1 | Packing::Q4K => {
            let q = rec[vals + p * GROUP + lane];
            ((q & 0x0f) as i32, (q >> 4) as i32)
        }
        Packing::Q8_0 => {
            let at = vals + p * 2 * GROUP + 2 * lane;
            (rec[at] as i8 as i32, rec[at + 1] as i8 as i32)
        }
    }
}

fn unpack_portable(ty: Packing, src: &[u8], dst: &mut [Unpacked]) {
    for (b, u) in dst.iter_mut().enumerate() {
        let (rec, sub) = record_of(ty, src, b);
        for lane in 0..GROUP {
            (u.d[lane], u.m[lane]) = scale_of(ty, rec, sub, lane);
            for p in 0..PAIRS {
                let (lo, hi) = pair(ty, rec, sub, p, lane);
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

    /// `KIND`: 0 Q4_0, 1 Q4_1, 2 Q8_0, 3 Q4_K.
    fn kind(ty: Packing) -> u8 {
        match ty {
            Packing::Q4_0 => 0,
            Packing::Q4_1 => 1,
            Packing::Q8_0 => 2,
            Packing::Q4K => 3,
        }
    }

    /// 32-value blocks a record of `KIND` holds.
    const fn subs(kind: u8) -> usize {
        if kind == 3 {
            8
        } else {
            1
        }
    }

    /// Sub-block `sub` of a record: its 16 `d` and 16 `m` (Q4_0: `-8 d`; Q8_0: unused, zero;
    /// Q4_K: `d * scale` and `-(dmin * min)`, as [`super::scale_of`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn scales<const KIND: u8>(p: *const u8, sub: usize) -> (__m512, __m512) {
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
        let bytes = |at: usize| {
            _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(at) as *const _)))
        };
        match KIND {
            0 => (d, _mm512_mul_ps(d, _mm512_set1_ps(-8.0))),
            1 => (
                d,
                _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * GROUP) as *const _)),
            ),
            3 => {
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * GROUP) as *const _));
                let sc = bytes(4 * GROUP + sub * GROUP);
                let min = bytes(12 * GROUP + sub * GROUP);
                // -(dmin * min) by its sign bit, as the scalar negation (so -0.0 for 0).
                let neg = _mm512_xor_si512(
                    _mm512_castps_si512(_mm512_mul_ps(dmin, min)),
                    _mm512_set1_epi32(i32::MIN),
                );
                (_mm512_mul_ps(d, sc), _mm512_castsi512_ps(neg))
            }
            _ => (d, _mm512_setzero_ps()),
        }
    }

    /// Pair `q` of sub-block `sub` of a record's 16 rows, each lane two i16 (values `q` and
    /// `q + 16`).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn pair<const KIND: u8>(p: *const u8, sub: usize, q: usize) -> __m512i {
        if KIND == 2 {
            let v = p.add(2 * GROUP + q * 2 * GROUP);
            return _mm512_cvtepi8_epi16(_mm256_loadu_si256(v as *const _));
        }
        let vals = match KIND {
            0 => 2 * GROUP,
            1 => 4 * GROUP,
            _ => 20 * GROUP + sub * PAIRS * GROUP,
        };
        let x = _mm512_cvtepu8_epi32(_mm_loadu_si128(p.add(vals + q * GROUP) as *const _));
        // (x | x << 12) & 0x000f000f: the byte's low nibble in bits 0..4, its high one in
        // 16..20 (ternary logic 0xa8: (A | B) & C).
        _mm512_ternarylogic_epi32::<0xa8>(
            x,
            _mm512_slli_epi32::<12>(x),
            _mm512_set1_epi32(0x000f_000f),
        )
    }

    /// Prefetches `len` bytes [`PREFETCH`] ahead of `p`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn prefetch(p: *const u8, len: usize) {
        for line in (0..len).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + line) as *const i8);
        }
    }

    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI; `src` holds the records of `dst.len()` blocks of
    /// `ty`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn unpack(ty: Packing, src: &[u8], dst: &mut [Unpacked]) {
        match kind(ty) {
            0 => unpack_kind::<0>(ty, src, dst),
            1 => unpack_kind::<1>(ty, src, dst),
            2 => unpack_kind::<2>(ty, src, dst),
            _ => unpack_kind::<3>(ty, src, dst),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn unpack_kind<const KIND: u8>(ty: Packing, src: &[u8], dst: &mut [Unpacked]) {
        let rec = ty.record_bytes();
        let subs = subs(KIND);
        assert!(src.len() * subs >= dst.len() * rec);
        for (b, u) in dst.iter_mut().enumerate() {
            let (p, sub) = (src.as_ptr().add(b / subs * rec), b % subs);
            prefetch(src.as_ptr().add(b * (rec / subs)), rec / subs);
            let (d, m) = scales::<KIND>(p, sub);
            _mm512_store_ps(u.d.as_mut_ptr(), d);
            _mm512_store_ps(u.m.as_mut_ptr(), m);
            for (q, w) in u.w.iter_mut().enumerate() {
                _mm512_store_si512(w.as_mut_ptr() as *mut _, pair::<KIND>(p, sub, q));
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
        ty: Packing,
        src: &[u8],
        act: &[ActBlock],
        dst: *mut f32,
        ld: usize,
        lanes: usize,
    ) {
        match kind(ty) {
            0 => records_kind::<R, true, 0>(ty, src, act, dst, ld, lanes),
            1 => records_kind::<R, true, 1>(ty, src, act, dst, ld, lanes),
            2 => records_kind::<R, false, 2>(ty, src, act, dst, ld, lanes),
            _ => records_kind::<R, true, 3>(ty, src, act, dst, ld, lanes),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn records_kind<const R: usize, const HAS_M: bool, const KIND: u8>(
        ty: Packing,
        src: &[u8],
        act: &[ActBlock],
        dst: *mut f32,
        ld: usize,
        lanes: usize,
    ) {
        let (rec, subs) = (ty.record_bytes(), subs(KIND));
        let nb = act.len() / R;
        assert!(src.len() * subs >= nb * rec);
        let at = |b: usize| src.as_ptr().add(b / subs * rec);
        multiply_loop!(
            nb,
            act,
            dst,
            ld,
            lanes,
            |b: usize| prefetch(src.as_ptr().add(b * (rec / subs)), rec / subs),
            |b: usize| scales::<KIND>(at(b), b % subs),
            |b: usize, p: usize| pair::<KIND>(at(b), b % subs, p)
        )
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::super::own::{self, OwnType};
    use super::*;

    const TYPES: [Packing; 4] = [Packing::Q4_0, Packing::Q4_1, Packing::Q8_0, Packing::Q4K];

    /// `rows x cols` weights quantized to `ty` by candle: the GGUF blocks' bytes, and candle's
    /// own dequantization of them.
    fn weights(ty: Packing, rows: usize, cols: usize, seed: usize) -> (Vec<u8>, Vec<f32>) {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (((i + seed) * 7919 % 1009) as f32 - 504.0) / 5000.0)
            .collect();
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, ty.ggml()).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        (
            q.data().unwrap().to_vec(),
            deq.flatten_all().unwrap().to_vec1().unwrap(),
        )
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

    /// 37 rows: two full groups and a part one.
    const ROWS: usize = 37;

    /// Columns: two Q4_K super-blocks, sixteen 32-value blocks.
    const COLS: usize = 512;

    fn input(n: usize, cols: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((i * 7919 % 509) as f32 - 254.0) / 17.0)
            .collect()
    }

    /// Each row read back from the regrouped layout: for the 32-value types as the block dots'
    /// dequantization (the same formula), for Q4_K as candle's, bit for bit.
    #[test]
    fn rows_come_back_as_the_gguf_layouts_rows() {
        for ty in TYPES {
            let (data, candle) = weights(ty, ROWS, COLS, 5);
            let k = PackedBlocks::new(ty, &data, ROWS, COLS, Loop::Portable);
            let rb = data.len() / ROWS;
            for r in 0..ROWS {
                let (mut got, mut want) = (vec![0.0; COLS], vec![0.0; COLS]);
                k.dequantize_row(r, &mut got);
                match OwnType::from_ggml(ty.ggml()) {
                    Some(own) => own::dequantize_row(own, &data[r * rb..(r + 1) * rb], &mut want),
                    None => want.copy_from_slice(&candle[r * COLS..(r + 1) * COLS]),
                }
                assert_eq!(got, want, "{ty:?} row {r}");
            }
        }
    }

    /// Against the dequantized weights times the dequantized 16-bit activations in f64:
    /// within f32 rounding of the sums.
    #[test]
    fn products_agree_with_the_dequantized_product() {
        let n = 3;
        let x = input(n, COLS);
        let mut act = Vec::new();
        quantize_rows(&x, COLS, Order::Natural, &mut act);
        let nb = COLS / QK;
        for ty in TYPES {
            let (data, _) = weights(ty, ROWS, COLS, 9);
            let k = PackedBlocks::new(ty, &data, ROWS, COLS, Loop::Portable);
            let got = product_on(&k, &x, n, 2);
            let mut w = vec![0.0f32; COLS];
            for r in 0..ROWS {
                k.dequantize_row(r, &mut w);
                let scale: f64 = w.iter().map(|v| v.abs() as f64).sum::<f64>() * 15.0;
                for j in 0..n {
                    let want: f64 = (0..COLS)
                        .map(|i| {
                            let a = &act[j * nb + i / QK];
                            w[i] as f64 * (a.d * a.qs[i % QK] as f32) as f64
                        })
                        .sum();
                    let g = got[j * ROWS + r] as f64;
                    assert!(
                        (g - want).abs() <= 1e-6 * scale,
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
        let x = input(13, COLS);
        for ty in TYPES {
            let (data, _) = weights(ty, ROWS, COLS, 21);
            let portable = PackedBlocks::new(ty, &data, ROWS, COLS, Loop::Portable);
            let want = product_on(&portable, &x, 13, 2);
            let mut loops = vec![portable];
            if Loop::detect() != Loop::Portable {
                loops.push(PackedBlocks::new(ty, &data, ROWS, COLS, Loop::detect()));
            } else {
                eprintln!("this CPU has no AVX-512 VNNI: the portable loop only");
            }
            for k in &loops {
                for (n, threads) in [(1, 2), (3, 2), (8, 2), (13, 2), (1, 1), (13, 1), (13, 3)] {
                    let got = product_on(k, &x[..n * COLS], n, threads);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want[..n * ROWS]),
                        "{ty:?} {:?} n={n} on {threads} threads",
                        k.run
                    );
                }
            }
        }
    }
}
