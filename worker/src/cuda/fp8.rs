//! FP8 E4M3 linear weights (issue 12's `--quantization fp8`, vLLM's online FP8 quantization):
//! each linear layer's weight (this rank's shard of qkv, o, gate_up and down) is quantized once
//! at load with one f32 scale per tensor; the embedding, the norms and the lm_head stay in the
//! activation dtype. Products of up to 8 rows (decoding) run the FP8 GEMV (gemv.cu: the weights
//! converted in registers, the activations left in the dtype: weight-only FP8); larger ones
//! quantize their activations with dynamic scales and run cuBLASLt's FP8 GEMM (`blas_lt.rs`),
//! which accumulates in f32 and writes the dtype: from `linear.rs`'s `FP8_ROW_SCALES_MIN_ROWS`
//! rows (prompts) one scale per row (per token), applied by cuBLASLt as an outer vector beside
//! the weight's scale repeated once per output row ([`ROWS_OFFSET`]); below (decoding batches)
//! one scale for the product. Needs compute capability 8.9 or newer (the E4M3 conversion
//! instructions and cuBLASLt's FP8 kernels).
//!
//! Where one kernel makes the input of a product quantized per row, it quantizes it on the way
//! out, so the activations take no pass of their own: the RMSNorm before qkv and gate_up and the SiLU-mul
//! before down (`rms_norm_fp8_rows`, `silu_mul_fp8_rows`: the same bytes and scales as the norm or
//! SiLU-mul followed by `fp8_quantize_rows`, tests/gpu/fp8_rows_bench.cu); the attention's output
//! (o's input) is quantized by `fp8_quantize_rows` (one launch, one block a row).
//!
//! Quantizing a weight at load is two launches (fp8.cu): partial maxima over `AMAX_BLOCKS`
//! blocks, then the conversion, whose every block reduces the partials itself (no atomics, no
//! zeroed accumulator: graph-safe and deterministic).
//!
//! Pre-quantized FP8 checkpoints (`quant_method` fp8 or compressed-tensors, with per-tensor or
//! per-channel weight scales) are stored as they come, their scales one per tensor or one per
//! output row ([`Fp8Weight`]; fused q/k/v or gate/up parts of different per-tensor scales
//! become per-row, exactly). A checkpoint's static activation scale replaces the dynamic ones:
//! the activations are quantized by the conversion launch alone, given one "partial maximum" of
//! 448 times that scale. Dynamic activations are quantized as above (per token from
//! `FP8_ROW_SCALES_MIN_ROWS` rows, llm-compressor's FP8_DYNAMIC) whatever the weights' scales.
//! Vector scales cuBLASLt does not apply (a per-row weight beside a per-tensor activation scale,
//! or no outer-vector algorithm for a shape) are applied by a kernel after a product with
//! scales of 1.
//! Block-scaled checkpoints are dequantized to the dtype at load.

use super::device::device_err;
use super::kernels::Kernels;
use crate::error::Result;

/// Blocks of the partial-maximum launch (two per SM of an H100/H200), so the f32 statistics of a
/// quantized tensor are `AMAX_BLOCKS` partial maxima followed by its scale.
pub const AMAX_BLOCKS: usize = 264;

/// Where a tensor's f32 scale lies in its statistics: after the partial maxima.
pub const SCALE_OFFSET: usize = AMAX_BLOCKS * 4;

/// Bytes of one tensor's quantization statistics: the partial maxima, then the f32 scale.
pub const STATS_BYTES: usize = SCALE_OFFSET + 4;

/// Where a weight quantized at load keeps its scale once per output row (for cuBLASLt's
/// outer-vector scaling): after its statistics, 16-byte aligned.
pub const ROWS_OFFSET: usize = STATS_BYTES.next_multiple_of(16);

/// The lowest compute capability that runs FP8.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 9);

/// E4M3's largest finite value.
pub const E4M3_MAX: f32 = 448.0;

/// How an FP8 weight's scales are held, beside its E4M3 bytes.
pub struct Fp8Weight {
    /// Quantized at load: the statistics ([`STATS_BYTES`], the scale at [`SCALE_OFFSET`]). From a
    /// checkpoint: the f32 scales (one, or one per output row), then with a static activation
    /// scale `E4M3_MAX` times it.
    pub scales: super::device::DeviceBuffer,
    /// Byte offset of the weight's scale (or first row's) in `scales`.
    pub scale_offset: usize,
    /// One scale per output row rather than one for the tensor.
    pub per_row: bool,
    /// Byte offset of `E4M3_MAX` times the static activation scale, when the checkpoint has one.
    pub static_input: Option<usize>,
    /// Byte offset of the weight's scale once per output row (its own rows' scales when
    /// `per_row`; else the one scale repeated): what cuBLASLt's outer-vector scaling reads.
    pub rows_offset: usize,
}

/// What a product with FP8 weights needs beyond [`super::kernels::Product`] (device addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Operands {
    /// The weight's f32 scale, or its rows' scales with `w_scale_per_row`.
    pub w_scale: u64,
    pub w_scale_per_row: bool,
    /// The weight's scale once per output row, either way (f32 `[n_out]`).
    pub w_rows: u64,
    /// `E4M3_MAX` times the activations' static scale: quantized with it rather than their
    /// maximum.
    pub x_static: Option<u64>,
    /// Room for the activations quantized, `rows x k` bytes (products above 8 rows).
    pub x_q: u64,
    /// Room for the activations' statistics, [`STATS_BYTES`], or their per-row scales (f32 per
    /// row).
    pub x_stats: u64,
    /// `x_q` and `x_stats` already hold the activations quantized per row: the kernel that
    /// made them (a norm, the SiLU-mul) did it on the way out.
    pub x_ready: bool,
}

impl Fp8Operands {
    /// Where the quantized activations' scale lands in `x_stats`.
    pub fn x_scale(&self) -> u64 {
        self.x_stats + SCALE_OFFSET as u64
    }
}

impl Kernels {
    /// Quantizes `n` elements of `x` (the dtype, 16-byte aligned, `n` a multiple of 8) to E4M3
    /// bytes at `out` with one scale (amax / 448), using `stats` ([`STATS_BYTES`]): the partial
    /// maxima, then the scale at `stats + SCALE_OFFSET`.
    pub fn fp8_quantize(&self, out: u64, stats: u64, x: u64, n: usize) -> Result<()> {
        debug_assert!(n.is_multiple_of(8));
        let n64 = n as i64;
        // Blocks with work (each thread takes 8 elements a round), at most AMAX_BLOCKS.
        let blocks = n.div_ceil(256 * 8).clamp(1, AMAX_BLOCKS);
        let mut b = self.launch(&self.fp8_amax_partial);
        b.arg(&stats).arg(&x).arg(&n64);
        // SAFETY: as fp8.cu documents: stats holds `blocks` f32 partials (AMAX_BLOCKS + 1 in
        // all), x holds n elements, 16-byte aligned, n a multiple of 8.
        unsafe { b.launch(super::kernels::grid_rows(blocks, 256)) }
            .map_err(|e| device_err("launching fp8_amax_partial", e))?;
        self.fp8_convert(out, stats + SCALE_OFFSET as u64, stats, blocks, x, n)
    }

    /// Quantizes `n` elements of `x` like [`Self::fp8_quantize`] with the static scale whose
    /// `E4M3_MAX` multiple lies at `x_static`, writing the scale used to `stats + SCALE_OFFSET`.
    pub fn fp8_quantize_static(
        &self,
        out: u64,
        stats: u64,
        x_static: u64,
        x: u64,
        n: usize,
    ) -> Result<()> {
        self.fp8_convert(out, stats + SCALE_OFFSET as u64, x_static, 1, x, n)
    }

    /// The conversion launch: the scale from the maximum of `partials` partial maxima.
    fn fp8_convert(
        &self,
        out: u64,
        scale: u64,
        partial: u64,
        partials: usize,
        x: u64,
        n: usize,
    ) -> Result<()> {
        debug_assert!(n.is_multiple_of(8));
        let blocks = n.div_ceil(256 * 8).clamp(1, AMAX_BLOCKS);
        let p = partials as i32;
        let n64 = n as i64;
        let mut b = self.launch(&self.fp8_quantize);
        b.arg(&out)
            .arg(&scale)
            .arg(&partial)
            .arg(&p)
            .arg(&x)
            .arg(&n64);
        // SAFETY: as fp8.cu documents: out holds n bytes (8-byte aligned), partial `p` f32
        // partial maxima, scale one f32 slot, x n elements of the dtype.
        unsafe { b.launch(super::kernels::grid_rows(blocks, 256)) }
            .map(drop)
            .map_err(|e| device_err("launching fp8_quantize", e))
    }

    /// Quantizes `rows x k` elements of `x` (the dtype, 16-byte aligned, `k` a multiple of 8)
    /// to E4M3 bytes at `out` with one scale per row (its amax / 448), written to `scales`
    /// (`rows` f32).
    pub fn fp8_quantize_rows(
        &self,
        out: u64,
        scales: u64,
        x: u64,
        rows: usize,
        k: usize,
    ) -> Result<()> {
        debug_assert!(k.is_multiple_of(8));
        let kw = k as i32;
        let mut b = self.launch(&self.fp8_quantize_rows);
        b.arg(&out).arg(&scales).arg(&x).arg(&kw);
        // SAFETY: as fp8.cu documents: out holds rows x k bytes, scales rows f32, x rows x k
        // elements of the dtype, 16-byte aligned, k a multiple of 8; one block per row.
        unsafe { b.launch(super::kernels::grid_rows(rows, 256)) }
            .map(drop)
            .map_err(|e| device_err("launching fp8_quantize_rows", e))
    }

    /// `y[i, j] *= row_scales[i] * col_scales[j]` for `rows x cols` elements of the dtype
    /// (`cols` a multiple of 8; a `None` scales by 1): vector scales applied after a cuBLASLt
    /// product that could not take them.
    pub fn fp8_scale_outer(
        &self,
        y: u64,
        row_scales: Option<u64>,
        col_scales: Option<u64>,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        debug_assert!(cols.is_multiple_of(8));
        let (r, c) = (row_scales.unwrap_or(0), col_scales.unwrap_or(0));
        let n = (rows * cols) as i64;
        let cw = cols as i32;
        let blocks = (rows * cols).div_ceil(256 * 8).clamp(1, AMAX_BLOCKS);
        let mut b = self.launch(&self.fp8_scale_outer);
        b.arg(&y).arg(&r).arg(&c).arg(&n).arg(&cw);
        // SAFETY: as fp8.cu documents: y holds rows x cols elements of the dtype, 16-byte
        // aligned, the scales rows and cols f32 (or null), cols a multiple of 8.
        unsafe { b.launch(super::kernels::grid_rows(blocks, 256)) }
            .map(drop)
            .map_err(|e| device_err("launching fp8_scale_outer", e))
    }
}
