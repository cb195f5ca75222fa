//! Weights kept in their GGUF blocks on the CPU (`--quantization gguf`, the default for a GGUF on
//! the CPU) and multiplied without dequantizing them: activations are quantized per block, as
//! llama.cpp does, and each output is an integer dot product per block scaled by the two blocks'
//! scales. For Q4_0/Q4_1/Q8_0 (and Q4_K on [`packed`]) the activation blocks are 32 values of 16
//! bits ([`act`]: Q8_1's layout with i16 values; 8 bits changed SmolLM2's answers, see there);
//! for the other types they are candle's Q8_K (256 values of 8 bits), as llama.cpp's K-quant
//! kernels.
//!
//! Kernels: [`packed`] for Q4_0, Q4_1, Q8_0 and Q4_K where the CPU has AVX-512 VNNI (the blocks
//! regrouped at load, 16 rows a group, one row a 32-bit lane: every count of rows on integer
//! multiply-accumulates: on two threads 1.9-2.9x the block dots and 1.6-2.1x the
//! dequantized-tile GEMM, see docs/PERFORMANCE.md); [`own`] for Q4_0, Q4_1 and Q8_0 elsewhere
//! (AVX2 block dots; SmolLM2's GGUF is Q4_1 with a Q8_0 embedding); [`candle_blocks`]
//! (candle-core's dot products) for every other type. `examples/bench_qmatmul` measures them on
//! the same weights.
//!
//! Except through [`packed`], products of 16 rows or more (prefill chunks) dequantize 128-row
//! weight tiles and use the f32 GEMM ([`QuantLinear::matmul`]): the weights are then read once
//! for many rows.
//!
//! Invariants: a [`QuantLinear`] is one or more row segments (the fused q|k|v or gate|up parts,
//! merged when they share a block type), each `[rows_i, cols]`; through
//! [`QuantLinear::matmul_rows`] each output row is computed by the same sequence of block dot
//! products whatever the batch (batch invariance). Costs: the weights' file size in memory; per
//! product, one quantized copy of the activations, or one f32 weight tile per task.

mod act;
pub mod candle_blocks;
pub mod own;
pub mod packed;

use std::ops::Range;

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;
use tpserve_modelfile::QuantizedTensor;

use act::{quantize_rows, ActBlock, Order, QK};
use own::{OwnType, Simd};

/// Where a product's results go: element `(j, r)` (input row `j`, output feature `r` of the
/// segment) at `ptr[j * ld + r]`.
pub struct OutRows {
    ptr: *mut f32,
    ld: usize,
    rows: usize,
    n: usize,
}

// SAFETY: `OutRows` is only built over a live `&mut [f32]` for the duration of one product, and
// the row-parallel loops write each `(j, r)` from exactly one task, so sharing it between the
// pool's threads never makes two writes to one element.
unsafe impl Send for OutRows {}
unsafe impl Sync for OutRows {}

impl OutRows {
    /// Results of `n` input rows of a segment of `rows` features, written at column `first` of
    /// `out` (`n` rows of `ld`).
    fn new(out: &mut [f32], ld: usize, first: usize, rows: usize, n: usize) -> Self {
        assert!(first + rows <= ld && out.len() >= n * ld);
        Self {
            // SAFETY: `first < ld` or the segment is empty, and `out` holds n * ld elements.
            ptr: unsafe { out.as_mut_ptr().add(first) },
            ld,
            rows,
            n,
        }
    }

    /// Where column `r` of row 0 is (row `j` is `ld * j` further).
    fn column(&self, r: usize) -> *mut f32 {
        assert!(r < self.rows);
        // SAFETY: in bounds by the assertion and `new`'s.
        unsafe { self.ptr.add(r) }
    }

    #[inline]
    fn set(&self, j: usize, r: usize, v: f32) {
        assert!(j < self.n && r < self.rows);
        // SAFETY: in bounds by the assertion and `new`'s; one task per (j, r), see above.
        unsafe { *self.ptr.add(j * self.ld + r) = v }
    }
}

/// A segment's products.
pub trait Kernel: Send + Sync + std::fmt::Debug {
    /// The block type.
    fn dtype(&self) -> GgmlDType;
    /// Bytes of weights held.
    fn bytes(&self) -> usize;
    /// `out(j, r) = x_j · w_r` for the `n` rows of `x` (`[n, cols]`).
    fn matmul(&self, x: &[f32], n: usize, out: &OutRows);
    /// Row `r` as f32 (`cols` values).
    fn dequantize_row(&self, r: usize, dst: &mut [f32]);
    /// From how many input rows [`QuantLinear::matmul`] dequantizes weight tiles for the f32
    /// GEMM instead of calling [`Kernel::matmul`]; `None`: never.
    fn dense_from(&self) -> Option<usize> {
        Some(DENSE_MIN_ROWS)
    }
}

/// Runs `f` over chunks of `0..rows` on the rayon pool (inline with one thread). A few chunks a
/// thread so uneven cores still finish together; at least 16 rows a chunk so each task streams
/// whole cache lines of weights.
fn for_row_chunks(rows: usize, f: impl Fn(Range<usize>) + Sync + Send) {
    let threads = rayon::current_num_threads();
    if threads <= 1 || rows <= 16 {
        f(0..rows);
        return;
    }
    let chunk = rows.div_ceil(threads * 4).max(16);
    (0..rows.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| f(c * chunk..rows.min((c + 1) * chunk)));
}

/// Q4_0 / Q4_1 / Q8_0 rows run by [`own`].
#[derive(Debug)]
struct OwnBlocks {
    ty: OwnType,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

/// Activation rows processed together per weight row pass, so a weight tile stays in cache.
const ACT_TILE: usize = 32;

impl Kernel for OwnBlocks {
    fn dtype(&self) -> GgmlDType {
        self.ty.ggml()
    }

    fn bytes(&self) -> usize {
        self.data.len()
    }

    fn matmul(&self, x: &[f32], n: usize, out: &OutRows) {
        let nb = self.cols / QK;
        let rb = nb * self.ty.block_bytes();
        let mut act: Vec<ActBlock> = Vec::new();
        quantize_rows(x, self.cols, Order::Natural, &mut act);
        let simd = Simd::detect();
        let (ty, data) = (self.ty, &self.data);
        let w = |r: usize| &data[r * rb..(r + 1) * rb];
        let a = |j: usize| &act[j * nb..(j + 1) * nb];
        for_row_chunks(self.rows, |range| {
            for tile in (0..n).step_by(ACT_TILE) {
                let tile_end = n.min(tile + ACT_TILE);
                // Two weight rows a pass (independent accumulators), up to four activation rows.
                let mut r = range.start;
                while r < range.end {
                    let pair = r + 1 < range.end;
                    let mut j = tile;
                    while j < tile_end {
                        let left = tile_end - j;
                        let take = if left >= 4 {
                            4
                        } else if left >= 2 {
                            2
                        } else {
                            1
                        };
                        let put = |i: usize, vals: &[f32]| {
                            for (k, v) in vals.iter().enumerate() {
                                out.set(j + k, r + i, *v);
                            }
                        };
                        match (pair, take) {
                            (true, 4) => {
                                let v = own::dot_tile(
                                    simd,
                                    ty,
                                    [w(r), w(r + 1)],
                                    [a(j), a(j + 1), a(j + 2), a(j + 3)],
                                );
                                put(0, &v[0]);
                                put(1, &v[1]);
                            }
                            (true, 2) => {
                                let v = own::dot_tile(simd, ty, [w(r), w(r + 1)], [a(j), a(j + 1)]);
                                put(0, &v[0]);
                                put(1, &v[1]);
                            }
                            (true, _) => {
                                let v = own::dot_tile(simd, ty, [w(r), w(r + 1)], [a(j)]);
                                put(0, &v[0]);
                                put(1, &v[1]);
                            }
                            (false, 4) => put(
                                0,
                                &own::dot_tile(
                                    simd,
                                    ty,
                                    [w(r)],
                                    [a(j), a(j + 1), a(j + 2), a(j + 3)],
                                )[0],
                            ),
                            (false, 2) => {
                                put(0, &own::dot_tile(simd, ty, [w(r)], [a(j), a(j + 1)])[0])
                            }
                            (false, _) => put(0, &own::dot_tile(simd, ty, [w(r)], [a(j)])[0]),
                        }
                        j += take;
                    }
                    r += if pair { 2 } else { 1 };
                }
            }
        });
    }

    fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let rb = self.cols / QK * self.ty.block_bytes();
        own::dequantize_row(self.ty, &self.data[r * rb..(r + 1) * rb], dst);
    }
}

/// Rows from which a product dequantizes weight tiles for the f32 GEMM instead of quantizing the
/// activations (prefill chunks; decode batches of up to 15 sequences stay on the block dots).
pub const DENSE_MIN_ROWS: usize = 16;

/// Weight rows dequantized at a time by one task: 128 rows of SmolLM2's 576 or 1536 columns are
/// 0.3-0.8 MB of f32, within a core's L2.
const DENSE_TILE_ROWS: usize = 128;

/// Which kernels to use for the types both implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// Ours for Q4_0/Q4_1/Q8_0 (the grouped layout of [`packed`] where the CPU has AVX-512
    /// VNNI, the block dots of [`own`] elsewhere) and for Q4_K where [`packed`] runs, candle's
    /// for the rest.
    Fastest,
    /// The block dots of [`own`] in GGUF's layout even where [`packed`] runs (for comparisons).
    OwnRows,
    /// candle's for every type (for comparisons).
    Candle,
}

/// The kernel for one quantized matrix, or `None` for a block type neither implements.
pub fn kernel(t: QuantizedTensor, choice: KernelChoice) -> Option<Box<dyn Kernel>> {
    if choice == KernelChoice::Fastest && packed::supported() {
        if let Some(ty) = packed::Packing::from_ggml(t.dtype) {
            let run = packed::Loop::detect();
            return Some(Box::new(packed::PackedBlocks::new(
                ty, &t.data, t.rows, t.cols, run,
            )));
        }
    }
    match OwnType::from_ggml(t.dtype) {
        Some(ty) if choice != KernelChoice::Candle => Some(Box::new(OwnBlocks {
            ty,
            data: t.data,
            rows: t.rows,
            cols: t.cols,
        })),
        _ => candle_blocks::kernel(t.dtype, &t.data, t.rows, t.cols),
    }
}

/// A quantized weight `[rows, cols]`: row segments, each with its own kernel.
#[derive(Debug)]
pub struct QuantLinear {
    /// (first output row, rows, kernel).
    segments: Vec<(usize, usize, Box<dyn Kernel>)>,
    rows: usize,
    cols: usize,
}

impl QuantLinear {
    /// Stacks `parts` (each `[rows_i, cols]`) by rows, merging neighbours of one block type.
    /// `None` when a part's block type has no kernel or the parts' columns differ.
    pub fn new(parts: Vec<QuantizedTensor>, choice: KernelChoice) -> Option<Self> {
        let cols = parts.first()?.cols;
        let mut merged: Vec<QuantizedTensor> = Vec::new();
        for p in parts {
            if p.cols != cols {
                return None;
            }
            match merged.last_mut() {
                Some(last) if last.dtype == p.dtype => {
                    last.rows += p.rows;
                    last.data.extend_from_slice(&p.data);
                }
                _ => merged.push(p),
            }
        }
        let mut segments = Vec::with_capacity(merged.len());
        let mut first = 0;
        for p in merged {
            let rows = p.rows;
            segments.push((first, rows, kernel(p, choice)?));
            first += rows;
        }
        Some(Self {
            segments,
            rows: first,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes of weights held.
    pub fn bytes(&self) -> usize {
        self.segments.iter().map(|(_, _, k)| k.bytes()).sum()
    }

    /// The block types, in row order (one per segment).
    pub fn dtypes(&self) -> Vec<GgmlDType> {
        self.segments.iter().map(|(_, _, k)| k.dtype()).collect()
    }

    /// `out [n, rows] = x [n, cols] · Wᵀ`: each segment's kernel for few rows (decode), and
    /// from the kernel's [`Kernel::dense_from`] rows on (prefill) tiles of the weights
    /// dequantized to f32 and multiplied by the f32 GEMM, as llama.cpp hands large batches to
    /// its dequantize-and-GEMM path: the weights are read once for many rows, so the block dot
    /// products' saving on bytes no longer pays for their per-block overhead. The grouped
    /// kernel of [`packed`] has no such overhead and never hands over.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols);
        assert_eq!(out.len(), n * self.rows);
        for (first, rows, k) in &self.segments {
            let dst = OutRows::new(out, self.rows, *first, *rows, n);
            if k.dense_from().is_some_and(|from| n >= from) {
                self.matmul_dense_tiles(x, k.as_ref(), *rows, &dst);
            } else {
                k.matmul(x, n, &dst);
            }
        }
    }

    /// As [`Self::matmul`], always by the kernels' block products: each output row is computed
    /// the same way whatever `n` (batch invariance).
    pub fn matmul_rows(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols);
        assert_eq!(out.len(), n * self.rows);
        for (first, rows, k) in &self.segments {
            k.matmul(x, n, &OutRows::new(out, self.rows, *first, *rows, n));
        }
    }

    /// One segment (`rows` rows of `k`, written through `dst`) by dequantized tiles and the f32
    /// GEMM.
    fn matmul_dense_tiles(&self, x: &[f32], k: &dyn Kernel, rows: usize, dst: &OutRows) {
        let (cols, n) = (self.cols, dst.n);
        let tiles = rows.div_ceil(DENSE_TILE_ROWS);
        (0..tiles).into_par_iter().for_each_init(Vec::new, |w, t| {
            let first = t * DENSE_TILE_ROWS;
            let tile = DENSE_TILE_ROWS.min(rows - first);
            w.resize(tile * cols, 0.0);
            for (r, dst_row) in w.chunks_exact_mut(cols).enumerate() {
                k.dequantize_row(first + r, dst_row);
            }
            // SAFETY: `dst` spans n rows of `dst.ld` columns from the segment's first column;
            // this task writes columns first..first+tile of the segment in every row, which no
            // other task writes. `x` is [n, cols] and `w` is [tile, cols], row-major, both live
            // for the call; the strides below describe exactly those layouts (rhs element
            // (k, j) = w[j * cols + k]).
            unsafe {
                gemm::gemm(
                    n,
                    tile,
                    cols,
                    dst.column(first),
                    1,
                    dst.ld as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    }

    /// Row `r` as f32 into `dst` (`cols` values): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let (first, _, k) = self
            .segments
            .iter()
            .rfind(|(first, _, _)| *first <= r)
            .expect("row 0 is in the first segment");
        k.dequantize_row(r - first, dst);
    }
}
