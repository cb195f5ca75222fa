//! The linear layers' products, `y = x W^T`, routed per weight shape and row count to the kernel
//! measured fastest on this GPU: cuBLAS, or for steps of 1 to 8 rows (decoding) our GEMV kernel
//! with 1, 2 or 4 output columns per warp (and, for 1 or 2 rows, deeper variants with more
//! loads in flight per lane, for the smaller matrices), or our tensor-core GEMV (whose cost
//! barely grows with the rows; below). `tune` times every candidate once at start on the
//! model's own weights (rotating over layers, so the weights do not sit in L2); until then, and
//! for shapes it did not see, cuBLAS runs. `TPSERVE_CUDA_LINEAR=cublas|gemv|gemv-deep|mma` pins
//! one family (comparisons and numerical checks; `gemv-deep` takes the 8-chunk variant for 1 or 2
//! rows, `mma` the tensor-core GEMV where it applies, measured choices elsewhere); the GEMV pins
//! still take cuBLAS beyond 8 rows. `TPSERVE_CUDA_LINEAR=measured-wide` measures as by default
//! and times the tensor-core GEMV's 16-row instance against cuBLAS for 9 to 16 rows of a weight in
//! the dtype too (with `mma` those run it): not by default, because in the decode graphs it was
//! 1-2% slower than cuBLAS at 16 rows on an H100 while the warm-up's eager timing favoured it
//! (docs/PERFORMANCE.md, issue 12, session 32). `TPSERVE_CUDA_LINEAR_CHOICES` replaces measured
//! choices shape by shape (a list of `N_OUTxK@ROWS=KERNEL`, [`parse_choices`]), for comparing
//! whole decode steps through the graphs with one product on another kernel, which the warm-up's
//! timing of products alone does not predict (docs/PERFORMANCE.md, issue 12, runs 35-36). In
//! batch-invariant mode every product, whatever its rows, runs the one batch-invariant kernel
//! (gemm_bi.cu), and nothing is tuned. Products with FP8 weights (`--quantization fp8`) choose
//! among the FP8 GEMV variants (and, from 2 rows, the tensor-core FP8 GEMV) up to 8 rows (always
//! weight-only FP8, whatever the timing; the tensor cores sum in another order), and run
//! cuBLASLt's FP8 GEMM above, on activations quantized per row (`fp8.rs`: by the kernel that made
//! them, or here; with a checkpoint's static scale, per tensor), the vectors applied by
//! cuBLASLt's outer-vector scaling or after the GEMM where this cuBLASLt has none. Products with
//! 4-bit weights (AWQ, GPTQ) always run int4.cu's GEMV up to 8 rows and its GEMM from 9 to 64 (the
//! same bits for a row at any of those counts), and are dequantized for cuBLAS above (`int4.rs`).
//! A 4-bit gate and up product on the GEMV writes the SiLU-mul's output itself
//! ([`Linear::run_gated`]: the same bits, one launch fewer a layer, -0.08 ms an 8B one-row step
//! on an H100: docs/PERFORMANCE.md, issue 12, run 58); `TPSERVE_CUDA_GATED_W4=0` runs the two
//! kernels instead (comparisons and numerical checks).
//!
//! Costs: `tune` launches each candidate ~13 times per shape and row bucket (a few hundred
//! milliseconds for an 8B model); `run` is one map lookup and one launch.

use std::collections::HashMap;

use cudarc::driver::sys::CUevent_flags;

use super::blas::Blas;
use super::blas_lt::{BlasLt, Fp8Gemm, Scale};
use super::device::{device_err, Gpu};
use super::fp8::Fp8Operands;
use super::gemv::{mma_k_multiple, MMA_WIDE_ROWS};
use super::int4::{
    gated_gemv_fits, Int4Operands, GATHERED_ROWS, GEMM_ROWS as INT4_GEMM_ROWS, TILE as INT4_TILE,
};
use super::kernels::{Kernels, Product, ELEM};
use crate::error::{Result, WorkerError};

/// FP8 products of at least this many rows quantize their dynamic activations with one scale
/// per row (per token: a row's rounding does not depend on the rest of its step) and give
/// cuBLASLt both operands' scales as outer vectors; products of fewer (9 to 511 rows: decoding
/// batches) one scale for the product. cuBLASLt 13.1 has one outer-vector algorithm (one tile,
/// no split-K): on an H200 Llama-3-8B's down product of 16 to 256 rows takes 37-38 us with it
/// against 21-29 us with per-tensor scales, the same from 512 rows on (docs/PERFORMANCE.md,
/// issue 12, session 23).
pub const FP8_ROW_SCALES_MIN_ROWS: usize = 512;

/// The scales an FP8 product of `rows` rows runs with: a checkpoint's static activation scale
/// per tensor, beside the weight's own (per tensor or per row); dynamic activations per row
/// with the weight's scale once per row from [`FP8_ROW_SCALES_MIN_ROWS`] rows, else per tensor.
fn fp8_scales(fp8: &Fp8Operands, rows: usize) -> (Scale, Scale) {
    let weight = || {
        if fp8.w_scale_per_row {
            Scale::Rows(fp8.w_scale)
        } else {
            Scale::Tensor(fp8.w_scale)
        }
    };
    match fp8.x_static {
        None if rows >= FP8_ROW_SCALES_MIN_ROWS => {
            (Scale::Rows(fp8.x_stats), Scale::Rows(fp8.w_rows))
        }
        _ => (Scale::Tensor(fp8.x_scale()), weight()),
    }
}

/// Row counts with a measured choice; a step's rows round up to the next (padded GEMV rows are
/// not computed, so 3 rows run the 4-row kernel on 3 rows).
pub const ROW_BUCKETS: [usize; 4] = [1, 2, 4, 8];

/// The GEMV variants (output columns per warp, chunks in flight per lane) measured for a row
/// bucket: 1, 2 or 4 columns with 2 chunks for every bucket, and the deeper variants (4 or 8
/// chunks, 1 or 2 columns) for buckets of 1 and 2 rows, which the kernel is built for; and from
/// 2 rows the tensor-core GEMV (4 or 8 tiles ahead) where it takes the weight's K, which alone
/// covers the bucket of 9 to 16 rows ([`MMA_WIDE_ROWS`], weights in the dtype).
fn gemv_variants(rows: usize, shape: Shape) -> Vec<LinearKernel> {
    if rows > ROW_BUCKETS[ROW_BUCKETS.len() - 1] {
        // Past the FMA GEMV's rows: the 16-row tensor-core GEMV (weights in the dtype) alone.
        return if shape.takes_wide_mma() {
            vec![MMA]
        } else {
            Vec::new()
        };
    }
    if shape.int4 {
        // int4.cu has one GEMV (its shape set by K, not by a choice).
        return vec![PLAIN_GEMV];
    }
    let mut out: Vec<LinearKernel> = [1, 2, 4]
        .map(|columns| LinearKernel::Gemv { columns, unroll: 2 })
        .to_vec();
    if rows <= 2 {
        for unroll in [4, 8] {
            for columns in [1, 2] {
                out.push(LinearKernel::Gemv { columns, unroll });
            }
        }
    }
    // Not at one row: there the FMA variants stream at 0.87-1.0 of the copy rate, and where the
    // warm-up's timing picked the tensor-core GEMV (bf16 qkv, 8 ahead) the batch-1 step through
    // the graphs was ~1% slower on an H100 (session 32).
    if rows > 1 && shape.takes_mma() {
        out.extend([MMA, LinearKernel::Mma { ahead: 8 }]);
    }
    out
}

/// The tensor-core GEMV with 4 tiles in flight: what `TPSERVE_CUDA_LINEAR=mma` pins, and the one
/// instance of 9 to 16 rows.
const MMA: LinearKernel = LinearKernel::Mma { ahead: 4 };

/// The GEMV variant used where no timing chose one: 2 columns a warp, 2 chunks in flight.
const PLAIN_GEMV: LinearKernel = LinearKernel::Gemv {
    columns: 2,
    unroll: 2,
};

/// How one product runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKernel {
    /// cuBLAS, or for FP8 weights cuBLASLt's FP8 GEMM.
    Cublas,
    /// GEMV with `columns` output columns per warp and `unroll` 256-element chunks of K in
    /// flight per lane.
    Gemv { columns: usize, unroll: usize },
    /// The batch-invariant kernel.
    BatchInvariant,
    /// int4.cu's 4-bit GEMM (9 to 64 rows of a 4-bit weight).
    Int4Gemm,
    /// gemv.cu's tensor-core GEMV with `ahead` (4 or 8) tiles in flight per lane (1 to 8 rows
    /// of a weight in the dtype or in FP8; 9 to 16 of one in the dtype, 4 ahead).
    Mma { ahead: usize },
}

impl std::fmt::Display for LinearKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cublas => write!(f, "cuBLAS"),
            Self::Gemv { columns, unroll: 2 } => write!(f, "GEMV r{columns}"),
            Self::Gemv { columns, unroll } => write!(f, "GEMV r{columns} u{unroll}"),
            Self::BatchInvariant => write!(f, "batch-invariant GEMM"),
            Self::Int4Gemm => write!(f, "4-bit GEMM"),
            Self::Mma { ahead: 4 } => write!(f, "tensor-core GEMV"),
            Self::Mma { ahead } => write!(f, "tensor-core GEMV a{ahead}"),
        }
    }
}

/// Which family `TPSERVE_CUDA_LINEAR` pins, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pin {
    Measured,
    Cublas,
    Gemv,
    /// The deepest GEMV variant (1 column, 8 chunks in flight) where it exists.
    GemvDeep,
    /// The tensor-core GEMV where it applies, measured choices elsewhere.
    Mma,
    /// Measured choices, with the tensor-core GEMV's 16-row bucket timed against cuBLAS too.
    MeasuredWide,
    BatchInvariant,
}

/// A weight shape: `n_out` rows of `k`, in the dtype, in FP8 or in 4-bit words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    pub n_out: usize,
    pub k: usize,
    pub fp8: bool,
    pub int4: bool,
}

impl Shape {
    /// The shape of `p`'s weight.
    pub fn of(p: &Product) -> Self {
        Self {
            n_out: p.n_out,
            k: p.k,
            fp8: p.fp8.is_some(),
            int4: p.int4.is_some(),
        }
    }

    /// The multiple of K the GEMV kernel needs: one 16-byte weight load per lane (for 4-bit
    /// weights, one tile of inputs).
    fn gemv_k_multiple(&self) -> usize {
        match (self.fp8, self.int4) {
            (_, true) => INT4_TILE.1,
            (true, _) => 16,
            _ => 8,
        }
    }

    /// Weight-only quantized: products of up to 8 rows always run a GEMV of the weight's type
    /// (whatever the timing), on the weight's values and the unquantized activations.
    fn gemv_only(&self) -> bool {
        self.fp8 || self.int4
    }

    /// A weight in the dtype or in FP8 whose K the tensor-core GEMV takes.
    fn takes_mma(&self) -> bool {
        !self.int4 && self.k.is_multiple_of(mma_k_multiple(self.fp8))
    }

    /// A weight in the dtype whose products of 9 to [`MMA_WIDE_ROWS`] rows the 16-row
    /// tensor-core GEMV takes (FP8 products of more than 8 rows stay on cuBLASLt's W8A8 GEMM,
    /// whose numerics the FP8 checks expect; 4-bit ones on int4.cu's GEMM).
    fn takes_wide_mma(&self) -> bool {
        !self.fp8 && self.takes_mma()
    }
}

/// A weight `tune` times a shape on: its address and, for FP8 or 4-bit weights, the product's
/// operands.
pub type TuneWeight = (u64, Option<Fp8Operands>, Option<Int4Operands>);

/// A weight shape and a row bucket: what a kernel is chosen for.
type Bucket = (Shape, usize);

/// One shape's measurement: microseconds per product for each candidate and row bucket.
#[derive(Debug, Clone)]
pub struct Timing {
    pub shape: Shape,
    pub rows: usize,
    pub candidates: Vec<(LinearKernel, f64)>,
    pub chosen: LinearKernel,
    /// Whether `chosen` is `TPSERVE_CUDA_LINEAR_CHOICES`'s, not the fastest candidate.
    pub overridden: bool,
}

/// One entry of `TPSERVE_CUDA_LINEAR_CHOICES`: products of a weight of `n_out` rows of `k`
/// inputs (in whatever type the model holds it) in row bucket `rows` run `kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub n_out: usize,
    pub k: usize,
    pub rows: usize,
    pub kernel: LinearKernel,
}

impl Choice {
    /// The `TPSERVE_CUDA_LINEAR_CHOICES` entry [`parse_choices`] reads back as this choice
    /// (`None` for a kernel the list cannot name).
    pub fn spec(&self) -> Option<String> {
        let kernel = match self.kernel {
            LinearKernel::Cublas => "cublas".to_string(),
            LinearKernel::Gemv { columns, unroll: 2 } => format!("gemv-r{columns}"),
            LinearKernel::Gemv { columns, unroll } => format!("gemv-r{columns}-u{unroll}"),
            LinearKernel::Mma { ahead: 4 } => "mma".to_string(),
            LinearKernel::Mma { ahead: 8 } => "mma-a8".to_string(),
            _ => return None,
        };
        Some(format!("{}x{}@{}={kernel}", self.n_out, self.k, self.rows))
    }
}

/// Parses `TPSERVE_CUDA_LINEAR_CHOICES`: comma-separated `N_OUTxK@ROWS=KERNEL`, ROWS a row
/// bucket (1, 2, 4 or 8) and KERNEL one of `cublas`, `gemv-rC` (C output columns a warp: 1, 2
/// or 4), `gemv-rC-uU` (U chunks in flight: 4 or 8; C 1 or 2), `mma`, `mma-a8` (the tensor-core
/// GEMV, 4 or 8 tiles ahead); e.g. `28672x4096@1=mma,4096x4096@8=gemv-r2`. Whether the kernel
/// runs the shape is checked once the shapes are known ([`Linear::tune`], [`can_run`]).
pub fn parse_choices(spec: &str) -> std::result::Result<Vec<Choice>, String> {
    let entry = |item: &str| -> Option<Choice> {
        let (shape, rest) = item.split_once('@')?;
        let (rows, kernel) = rest.split_once('=')?;
        let (n_out, k) = shape.split_once('x')?;
        let kernel = match kernel.split('-').collect::<Vec<_>>().as_slice() {
            ["cublas"] => LinearKernel::Cublas,
            ["mma"] => MMA,
            ["mma", "a8"] => LinearKernel::Mma { ahead: 8 },
            ["gemv", c] => LinearKernel::Gemv {
                columns: c.strip_prefix('r')?.parse().ok()?,
                unroll: 2,
            },
            ["gemv", c, u] => LinearKernel::Gemv {
                columns: c.strip_prefix('r')?.parse().ok()?,
                unroll: u.strip_prefix('u')?.parse().ok()?,
            },
            _ => return None,
        };
        Some(Choice {
            n_out: n_out.trim().parse().ok()?,
            k: k.parse().ok()?,
            rows: rows.parse().ok().filter(|r| ROW_BUCKETS.contains(r))?,
            kernel,
        })
    };
    spec.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            entry(item.trim()).ok_or_else(|| {
                format!(
                    "TPSERVE_CUDA_LINEAR_CHOICES: cannot read {item:?} (N_OUTxK@ROWS=KERNEL, ROWS \
                     1, 2, 4 or 8, KERNEL cublas, gemv-rC, gemv-rC-uU, mma or mma-a8)"
                )
            })
        })
        .collect()
}

/// Whether `kernel` runs products of `rows` rows of `shape`: the warm-up's candidates, plus the
/// tensor-core GEMV at one row (where it takes K) and cuBLAS for weights in the dtype.
fn can_run(shape: Shape, rows: usize, kernel: LinearKernel) -> bool {
    match kernel {
        LinearKernel::Cublas => !shape.gemv_only(),
        LinearKernel::Mma { ahead } => shape.takes_mma() && matches!(ahead, 4 | 8),
        _ => gemv_variants(rows, shape).contains(&kernel),
    }
}

/// Puts `choices` in place of the measured ones in `timings` (and returns the updated choice
/// map entries): each must name a shape and bucket that was timed, and a kernel that runs it
/// ([`can_run`]).
fn apply_choices(
    timings: &mut [Timing],
    choices: &[Choice],
) -> std::result::Result<Vec<(Bucket, LinearKernel)>, String> {
    let mut applied = Vec::new();
    for c in choices {
        let Some(t) = timings
            .iter_mut()
            .find(|t| (t.shape.n_out, t.shape.k, t.rows) == (c.n_out, c.k, c.rows))
        else {
            let timed: Vec<String> = timings
                .iter()
                .filter(|t| t.rows == c.rows)
                .map(|t| format!("{}x{}", t.shape.n_out, t.shape.k))
                .collect();
            return Err(format!(
                "TPSERVE_CUDA_LINEAR_CHOICES: no product of {}x{} was timed at {} rows (this \
                 model's: {})",
                c.n_out,
                c.k,
                c.rows,
                timed.join(", ")
            ));
        };
        if !can_run(t.shape, c.rows, c.kernel) {
            let names: Vec<String> = t.candidates.iter().map(|(k, _)| k.to_string()).collect();
            return Err(format!(
                "TPSERVE_CUDA_LINEAR_CHOICES: {} cannot run {}x{} at {} rows (the warm-up's \
                 candidates there: {})",
                c.kernel,
                c.n_out,
                c.k,
                c.rows,
                names.join(", ")
            ));
        }
        t.chosen = c.kernel;
        t.overridden = true;
        applied.push(((t.shape, t.rows), c.kernel));
    }
    Ok(applied)
}

/// The products of one worker, on its stream.
pub struct Linear {
    blas: Blas,
    /// cuBLASLt for FP8 products, when the weights are FP8.
    blas_lt: Option<BlasLt>,
    choices: HashMap<Bucket, LinearKernel>,
    pin: Pin,
    /// `TPSERVE_CUDA_LINEAR_CHOICES`, applied after the warm-up's timing.
    overrides: Vec<Choice>,
    /// Whether [`Self::run_gated`] may run the 4-bit GEMV's gated form (unless
    /// `TPSERVE_CUDA_GATED_W4=0`).
    gated_w4: bool,
}

/// The bucket of `rows`, if the GEMV kernel can take it.
fn bucket(rows: usize) -> Option<usize> {
    ROW_BUCKETS.iter().copied().find(|&b| rows <= b)
}

impl Linear {
    /// Products on `blas`'s stream (and `blas_lt`'s, for FP8 weights); `batch_invariant` pins
    /// every one to the batch-invariant kernel. Fails on a `TPSERVE_CUDA_LINEAR_CHOICES` it
    /// cannot read, or one beside a pinned family.
    pub fn new(blas: Blas, blas_lt: Option<BlasLt>, batch_invariant: bool) -> Result<Self> {
        let pin = match std::env::var("TPSERVE_CUDA_LINEAR").as_deref() {
            _ if batch_invariant => Pin::BatchInvariant,
            Ok("cublas") => Pin::Cublas,
            Ok("gemv") => Pin::Gemv,
            Ok("gemv-deep") => Pin::GemvDeep,
            Ok("mma") => Pin::Mma,
            Ok("measured-wide") => Pin::MeasuredWide,
            _ => Pin::Measured,
        };
        let overrides = match std::env::var("TPSERVE_CUDA_LINEAR_CHOICES") {
            Ok(spec) => {
                parse_choices(&spec).map_err(|detail| WorkerError::Unsupported { detail })?
            }
            Err(_) => Vec::new(),
        };
        if !overrides.is_empty() && !matches!(pin, Pin::Measured | Pin::MeasuredWide) {
            return Err(WorkerError::Unsupported {
                detail: "TPSERVE_CUDA_LINEAR_CHOICES replaces measured choices; it cannot go \
                         with batch-invariant mode or a TPSERVE_CUDA_LINEAR family pin"
                    .into(),
            });
        }
        Ok(Self {
            blas,
            blas_lt,
            choices: HashMap::new(),
            pin,
            overrides,
            gated_w4: std::env::var("TPSERVE_CUDA_GATED_W4").as_deref() != Ok("0"),
        })
    }

    /// The kernel a product of `rows` rows of `shape` runs on.
    pub fn kernel_for(&self, shape: Shape, rows: usize) -> LinearKernel {
        if self.pin == Pin::BatchInvariant {
            return LinearKernel::BatchInvariant;
        }
        let gemv_fits = shape.k.is_multiple_of(shape.gemv_k_multiple()) && rows > 0;
        // 4-bit products of 9 to 64 rows are always the 4-bit GEMM's, which gives each row the
        // GEMV's bits.
        if shape.int4 && gemv_fits && (9..=INT4_GEMM_ROWS).contains(&rows) {
            return LinearKernel::Int4Gemm;
        }
        // 9 to 16 rows of a weight in the dtype: the 16-row tensor-core GEMV when asked for
        // (pinned, or measured against cuBLAS), else cuBLAS.
        if (9..=MMA_WIDE_ROWS).contains(&rows) && shape.takes_wide_mma() {
            match self.pin {
                Pin::Mma => return MMA,
                Pin::MeasuredWide => {
                    return self
                        .choices
                        .get(&(shape, MMA_WIDE_ROWS))
                        .copied()
                        .unwrap_or(LinearKernel::Cublas)
                }
                _ => {}
            }
        }
        let Some(b) = bucket(rows).filter(|_| gemv_fits) else {
            return LinearKernel::Cublas;
        };
        match self.pin {
            Pin::BatchInvariant => LinearKernel::BatchInvariant,
            // FP8 and 4-bit products of up to 8 rows are always the GEMV's (weight-only), so
            // their numerics do not depend on what the timing chose.
            Pin::Cublas if !shape.gemv_only() => LinearKernel::Cublas,
            Pin::Cublas | Pin::Gemv => PLAIN_GEMV,
            Pin::GemvDeep if b <= 2 && !shape.int4 => LinearKernel::Gemv {
                columns: 1,
                unroll: 8,
            },
            Pin::GemvDeep => PLAIN_GEMV,
            Pin::Mma if shape.takes_mma() => MMA,
            Pin::Measured | Pin::Mma | Pin::MeasuredWide => self
                .choices
                .get(&(shape, b))
                .copied()
                .unwrap_or(if shape.gemv_only() {
                    PLAIN_GEMV
                } else {
                    LinearKernel::Cublas
                }),
        }
    }

    /// Puts `kernel` in place of the choice for products of `shape` in row bucket `rows` (the
    /// step tuning's, `step_tuning.rs`).
    pub fn set_choice(&mut self, shape: Shape, rows: usize, kernel: LinearKernel) {
        self.choices.insert((shape, rows), kernel);
    }

    /// Puts `choices` (an earlier start's, for the shapes `timings` timed) in place of the
    /// measured ones, or none of them: an error names the first that does not fit.
    pub fn adopt(
        &mut self,
        timings: &[Timing],
        choices: &[Choice],
    ) -> std::result::Result<(), String> {
        let applied = apply_choices(&mut timings.to_vec(), choices)?;
        self.choices.extend(applied);
        Ok(())
    }

    /// The product `p`, on the kernel chosen for its shape and rows.
    pub fn run(&self, kernels: &Kernels, p: &Product) -> Result<()> {
        self.launch(kernels, self.kernel_for(Shape::of(p), p.rows), p)
    }

    /// `p.y += p.x W^T` with one rounding, where `p` runs on cuBLAS (with a weight in the dtype,
    /// or a 4-bit one dequantized for it) or on cuBLASLt's FP8 GEMM with every scale applied by
    /// cuBLASLt (whose epilogue adds `p.y`): true. Elsewhere (the GEMVs, the 4-bit GEMM, FP8
    /// vector scales applied after the GEMM, the batch-invariant kernel) nothing runs: false.
    pub fn try_accumulate(&self, kernels: &Kernels, p: &Product) -> Result<bool> {
        if self.kernel_for(Shape::of(p), p.rows) != LinearKernel::Cublas {
            return Ok(false);
        }
        if let Some(q) = p.int4 {
            self.int4_on_cublas(kernels, p, &q, true)?;
            return Ok(true);
        }
        match &p.fp8 {
            None => self
                .blas
                .linear_accumulate(p.y, p.x, p.w, p.rows, p.n_out, p.k)?,
            Some(fp8) => {
                // Vector scales that cuBLASLt does not apply are applied after the GEMM
                // (fp8_scale_outer), which would scale the sum too.
                let applied = match fp8_scales(fp8, p.rows) {
                    (Scale::Tensor(_), Scale::Tensor(_)) => true,
                    (Scale::Rows(_), Scale::Rows(_)) => {
                        self.lt()?.applies_row_scales(p.rows, p.n_out, p.k)?
                    }
                    _ => false,
                };
                if !applied {
                    return Ok(false);
                }
                self.fp8_product(kernels, p, fp8, true)?;
            }
        }
        Ok(true)
    }

    /// Whether `p` runs cuBLASLt's FP8 GEMM on activations quantized per row (dynamic scales,
    /// [`FP8_ROW_SCALES_MIN_ROWS`] rows or more): then the kernel that makes its input may
    /// quantize it on the way out ([`Fp8Operands::x_ready`]).
    pub fn quantizes_rows(&self, p: &Product) -> bool {
        p.fp8
            .is_some_and(|f| matches!(fp8_scales(&f, p.rows).0, Scale::Rows(_)))
            && self.kernel_for(Shape::of(p), p.rows) == LinearKernel::Cublas
    }

    fn lt(&self) -> Result<&BlasLt> {
        self.blas_lt.as_ref().ok_or_else(|| WorkerError::Device {
            detail: "an FP8 product without a cuBLASLt handle".into(),
        })
    }

    /// `p`'s 4-bit weight dequantized into its scratch, then cuBLAS (`p.y += ...` with
    /// `accumulate`).
    fn int4_on_cublas(
        &self,
        kernels: &Kernels,
        p: &Product,
        q: &Int4Operands,
        accumulate: bool,
    ) -> Result<()> {
        let gemm = |y, x, rows| {
            if accumulate {
                self.blas
                    .linear_accumulate(y, x, q.scratch, rows, p.n_out, p.k)
            } else {
                self.blas.linear(y, x, q.scratch, rows, p.n_out, p.k)
            }
        };
        kernels.dequantize_w4(p)?;
        if q.perm == 0 {
            return gemm(p.y, p.x, p.rows);
        }
        // Act-order: the dequantized weight keeps its inputs sorted by group, so the inputs are
        // gathered into that order, a chunk of rows at a time.
        for first in (0..p.rows).step_by(GATHERED_ROWS) {
            let rows = GATHERED_ROWS.min(p.rows - first);
            let x = (p.x as usize + first * p.k * ELEM) as u64;
            let y = (p.y as usize + first * p.n_out * ELEM) as u64;
            gemm(y, kernels.gather_inputs(q, x, rows, p.k)?, rows)?;
        }
        Ok(())
    }

    /// `p` through cuBLASLt's FP8 GEMM after quantizing its activations where the kernel that
    /// made them has not (`p.y += ...` with `accumulate`, which needs every scale applied by
    /// cuBLASLt itself).
    fn fp8_product(
        &self,
        kernels: &Kernels,
        p: &Product,
        fp8: &Fp8Operands,
        accumulate: bool,
    ) -> Result<()> {
        let lt = self.lt()?;
        let (x_scale, w_scale) = fp8_scales(fp8, p.rows);
        match (fp8.x_static, x_scale) {
            (Some(s), _) => {
                kernels.fp8_quantize_static(fp8.x_q, fp8.x_stats, s, p.x, p.rows * p.k)?
            }
            (None, Scale::Rows(_)) if fp8.x_ready => {}
            (None, Scale::Rows(_)) => {
                kernels.fp8_quantize_rows(fp8.x_q, fp8.x_stats, p.x, p.rows, p.k)?
            }
            (None, Scale::Tensor(_)) => {
                kernels.fp8_quantize(fp8.x_q, fp8.x_stats, p.x, p.rows * p.k)?
            }
        }
        let gemm = Fp8Gemm {
            y: p.y,
            x: fp8.x_q,
            x_scale,
            w: p.w,
            w_scale,
            accumulate,
        };
        match lt.fp8_linear(&gemm, p.rows, p.n_out, p.k)? {
            Some(u) => kernels.fp8_scale_outer(p.y, u.x_rows, u.w_rows, p.rows, p.n_out),
            None => Ok(()),
        }
    }

    /// For a fused gate and up product `p` (`p.w`'s first half of rows the gate, the second the
    /// up projection): where its weight is 4-bit and it runs on the GEMV, `p.y` = silu(gate) *
    /// up (half `p.n_out` wide) by the GEMV's gated form, as the product followed by
    /// `Kernels::silu_mul` would give it, and true; elsewhere nothing runs: false (the caller
    /// runs the product and the SiLU-mul).
    pub fn run_gated(&self, kernels: &Kernels, p: &Product) -> Result<bool> {
        // The cheap tests first: most products are not 4-bit, and the choice is a map lookup.
        if !self.gated_w4 || p.int4.is_none() || !gated_gemv_fits(p) {
            return Ok(false);
        }
        if !matches!(
            self.kernel_for(Shape::of(p), p.rows),
            LinearKernel::Gemv { .. }
        ) {
            return Ok(false);
        }
        kernels.gemv_w4_gated(p)?;
        Ok(true)
    }

    /// The product `p` on `kernel`.
    fn launch(&self, kernels: &Kernels, kernel: LinearKernel, p: &Product) -> Result<()> {
        if let Some(q) = p.int4 {
            return match kernel {
                LinearKernel::Gemv { .. } => kernels.gemv_w4(p),
                LinearKernel::Int4Gemm => kernels.gemm_w4(p),
                _ => self.int4_on_cublas(kernels, p, &q, false),
            };
        }
        match (kernel, &p.fp8) {
            (LinearKernel::Cublas, None) => self.blas.linear(p.y, p.x, p.w, p.rows, p.n_out, p.k),
            (LinearKernel::Cublas, Some(fp8)) => self.fp8_product(kernels, p, fp8, false),
            (LinearKernel::Gemv { columns, unroll }, _) => kernels.gemv(p, columns, unroll),
            (LinearKernel::BatchInvariant, _) => kernels.gemm_bi(p),
            (LinearKernel::Mma { ahead }, _) => kernels.gemv_mma(p, ahead),
            (LinearKernel::Int4Gemm, _) => Err(WorkerError::Device {
                detail: "the 4-bit GEMM on a weight that is not 4-bit".into(),
            }),
        }
    }

    /// Whether every product runs the batch-invariant kernel.
    pub fn batch_invariant(&self) -> bool {
        self.pin == Pin::BatchInvariant
    }

    /// Whether the one-row products run what the timing chose (no `TPSERVE_CUDA_LINEAR` family
    /// pin, no batch-invariant mode).
    pub fn measured(&self) -> bool {
        matches!(self.pin, Pin::Measured | Pin::MeasuredWide)
    }

    /// Measures every candidate for each shape (given with the weights of several layers, at
    /// least one, and for FP8 weights their operands) and row bucket, and keeps the fastest.
    /// `x` and `y` must hold `max_rows` rows (8, or [`MMA_WIDE_ROWS`] for the tensor-core GEMV's
    /// wide bucket) of the largest `k` and `n_out`. Returns the measurements, with
    /// `TPSERVE_CUDA_LINEAR_CHOICES` in place of the fastest where it names one (an error where it
    /// names a shape, bucket or kernel that was not timed).
    pub fn tune(
        &mut self,
        gpu: &Gpu,
        kernels: &Kernels,
        shapes: &[(Shape, Vec<TuneWeight>)],
        (x, y): (u64, u64),
        max_rows: usize,
    ) -> Result<Vec<Timing>> {
        if self.batch_invariant() {
            return Ok(Vec::new());
        }
        let start = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| device_err("creating an event", e))?;
        let end = gpu
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| device_err("creating an event", e))?;
        let mut timings = Vec::new();
        for (shape, weights) in shapes {
            if !shape.k.is_multiple_of(shape.gemv_k_multiple()) || weights.is_empty() {
                continue;
            }
            let wide = self.pin == Pin::MeasuredWide
                && shape.takes_wide_mma()
                && max_rows >= MMA_WIDE_ROWS;
            let buckets = ROW_BUCKETS
                .iter()
                .copied()
                .chain(wide.then_some(MMA_WIDE_ROWS));
            for rows in buckets {
                let mut candidates = if shape.gemv_only() {
                    Vec::new()
                } else {
                    vec![(LinearKernel::Cublas, 0.0)]
                };
                candidates.extend(gemv_variants(rows, *shape).into_iter().map(|k| (k, 0.0)));
                for (kernel, micros) in &mut candidates {
                    let launch = |i: usize| -> Result<()> {
                        let (w, fp8, int4) = weights[i % weights.len()];
                        let p = Product {
                            y,
                            x,
                            w,
                            rows,
                            n_out: shape.n_out,
                            k: shape.k,
                            fp8,
                            int4,
                        };
                        self.launch(kernels, *kernel, &p)
                    };
                    for i in 0..3 {
                        launch(i)?;
                    }
                    const REPS: usize = 10;
                    start
                        .record(&gpu.stream)
                        .map_err(|e| device_err("recording an event", e))?;
                    for i in 0..REPS {
                        launch(i)?;
                    }
                    end.record(&gpu.stream)
                        .map_err(|e| device_err("recording an event", e))?;
                    let ms = start
                        .elapsed_ms(&end)
                        .map_err(|e| device_err("timing a product", e))?;
                    *micros = ms as f64 * 1e3 / REPS as f64;
                }
                let chosen = candidates
                    .iter()
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|c| c.0)
                    .expect("candidates");
                self.choices.insert((*shape, rows), chosen);
                timings.push(Timing {
                    shape: *shape,
                    rows,
                    candidates,
                    chosen,
                    overridden: false,
                });
            }
        }
        let applied = apply_choices(&mut timings, &self.overrides)
            .map_err(|detail| WorkerError::Unsupported { detail })?;
        self.choices.extend(applied);
        Ok(timings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_choice_written_as_a_spec_reads_back_as_itself() {
        let kernels = [
            LinearKernel::Cublas,
            LinearKernel::Gemv {
                columns: 2,
                unroll: 2,
            },
            LinearKernel::Gemv {
                columns: 1,
                unroll: 8,
            },
            MMA,
            LinearKernel::Mma { ahead: 8 },
        ];
        let choices: Vec<Choice> = kernels
            .iter()
            .map(|&kernel| Choice {
                n_out: 6144,
                k: 4096,
                rows: 1,
                kernel,
            })
            .collect();
        let spec: Vec<String> = choices.iter().filter_map(Choice::spec).collect();
        assert_eq!(spec[1], "6144x4096@1=gemv-r2");
        assert_eq!(parse_choices(&spec.join(",")).unwrap(), choices);
        let bi = Choice {
            kernel: LinearKernel::BatchInvariant,
            ..choices[0]
        };
        assert_eq!(bi.spec(), None);
    }

    #[test]
    fn rows_round_up_to_the_measured_buckets_and_large_steps_have_none() {
        assert_eq!(bucket(1), Some(1));
        assert_eq!(bucket(3), Some(4));
        assert_eq!(bucket(5), Some(8));
        assert_eq!(bucket(8), Some(8));
        assert_eq!(bucket(9), None);
        let gemv = |columns, unroll| LinearKernel::Gemv { columns, unroll };
        assert_eq!(gemv(4, 2).to_string(), "GEMV r4");
        assert_eq!(gemv(1, 8).to_string(), "GEMV r1 u8");
        let shape = |fp8, int4| Shape {
            n_out: 64,
            k: 64,
            fp8,
            int4,
        };
        assert_eq!(gemv_variants(2, shape(false, false)).len(), 7);
        assert_eq!(
            gemv_variants(4, shape(true, false)),
            vec![gemv(1, 2), gemv(2, 2), gemv(4, 2)]
        );
        assert_eq!(gemv_variants(1, shape(false, true)), vec![PLAIN_GEMV]);
        // The tensor-core GEMV joins at every bucket from 2 rows where it takes K: a multiple of
        // 256 for FP8 weights, of 128 for the dtype's, never for 4-bit ones.
        let with_k = |k, fp8, int4| Shape {
            k,
            ..shape(fp8, int4)
        };
        assert_eq!(
            gemv_variants(8, with_k(4096, true, false)),
            vec![
                gemv(1, 2),
                gemv(2, 2),
                gemv(4, 2),
                MMA,
                LinearKernel::Mma { ahead: 8 }
            ]
        );
        assert_eq!(
            gemv_variants(2, with_k(128, false, false)).last(),
            Some(&LinearKernel::Mma { ahead: 8 })
        );
        // Not at one row.
        assert!(!gemv_variants(1, with_k(4096, true, false)).contains(&MMA));
        assert!(!gemv_variants(2, with_k(128, true, false)).contains(&MMA));
        assert!(!gemv_variants(2, with_k(4096, false, true)).contains(&MMA));
        // 9 to 16 rows: the tensor-core GEMV alone, for weights in the dtype only.
        assert_eq!(gemv_variants(16, with_k(4096, false, false)), vec![MMA]);
        assert!(gemv_variants(16, with_k(4096, true, false)).is_empty());
        assert_eq!(MMA.to_string(), "tensor-core GEMV");
        assert_eq!(
            LinearKernel::Mma { ahead: 8 }.to_string(),
            "tensor-core GEMV a8"
        );
    }

    #[test]
    fn linear_choices_parse_and_replace_measured_ones_where_the_kernel_runs() {
        let gemv = |columns, unroll| LinearKernel::Gemv { columns, unroll };
        let choices =
            parse_choices(" 28672x4096@1=mma, 4096x4096@8=gemv-r2,4096x14336@2=gemv-r1-u8,")
                .unwrap();
        assert_eq!(
            choices,
            vec![
                Choice {
                    n_out: 28672,
                    k: 4096,
                    rows: 1,
                    kernel: MMA
                },
                Choice {
                    n_out: 4096,
                    k: 4096,
                    rows: 8,
                    kernel: gemv(2, 2)
                },
                Choice {
                    n_out: 4096,
                    k: 14336,
                    rows: 2,
                    kernel: gemv(1, 8)
                },
            ]
        );
        assert_eq!(parse_choices("").unwrap(), vec![]);
        assert_eq!(
            parse_choices("8x8@4=cublas,8x8@4=mma-a8").unwrap()[1].kernel,
            LinearKernel::Mma { ahead: 8 }
        );
        for bad in [
            "28672x4096@3=mma",
            "28672x4096=mma",
            "28672@1=mma",
            "8x8@1=gemv",
            "8x8@1=tc",
        ] {
            let err = parse_choices(bad).unwrap_err();
            assert!(
                err.contains(bad) && err.contains("N_OUTxK@ROWS=KERNEL"),
                "{err}"
            );
        }

        // FP8 gate_up timed at 1 row: the tensor-core GEMV is no candidate there, but runs it.
        let fp8 = Shape {
            n_out: 28672,
            k: 4096,
            fp8: true,
            int4: false,
        };
        let timed = |shape, rows| Timing {
            shape,
            rows,
            candidates: gemv_variants(rows, shape)
                .into_iter()
                .map(|k| (k, 1.0))
                .collect(),
            chosen: gemv(1, 2),
            overridden: false,
        };
        let mut timings = vec![timed(fp8, 1), timed(fp8, 8)];
        let applied = apply_choices(&mut timings, &choices[..1]).unwrap();
        assert_eq!(applied, vec![((fp8, 1), MMA)]);
        assert!(timings[0].overridden && timings[0].chosen == MMA);
        assert!(!timings[1].overridden);
        // A shape or bucket that was not timed, and a kernel that cannot run the shape (cuBLAS
        // on FP8 weights at 8 rows, a deep GEMV at 8 rows), are errors naming them.
        let err = apply_choices(&mut timings, &choices[1..2]).unwrap_err();
        assert!(
            err.contains("4096x4096") && err.contains("28672x4096"),
            "{err}"
        );
        for kernel in [LinearKernel::Cublas, gemv(1, 8)] {
            let c = Choice {
                n_out: 28672,
                k: 4096,
                rows: 8,
                kernel,
            };
            let err = apply_choices(&mut timings, &[c]).unwrap_err();
            assert!(err.contains("cannot run 28672x4096 at 8 rows"), "{err}");
        }
    }

    #[test]
    fn fp8_activations_are_scaled_per_row_from_512_rows_unless_static() {
        let fp8 = |per_row, x_static| Fp8Operands {
            w_scale: 0x100,
            w_scale_per_row: per_row,
            w_rows: 0x200,
            x_static,
            x_q: 0x300,
            x_stats: 0x400,
            x_ready: false,
        };
        let f = fp8(false, None);
        let tensor = (Scale::Tensor(f.x_scale()), Scale::Tensor(0x100));
        assert_eq!(fp8_scales(&f, 9), tensor);
        assert_eq!(fp8_scales(&f, 511), tensor);
        let rows = (Scale::Rows(0x400), Scale::Rows(0x200));
        assert_eq!(fp8_scales(&f, 512), rows);
        assert_eq!(fp8_scales(&fp8(true, None), 8192), rows);
        // A per-row weight below 512 rows: its vector beside the activations' one scale.
        let f = fp8(true, None);
        assert_eq!(
            fp8_scales(&f, 64),
            (Scale::Tensor(f.x_scale()), Scale::Rows(0x100))
        );
        // Static activation scales stay per tensor at any size.
        let f = fp8(false, Some(0x500));
        assert_eq!(
            fp8_scales(&f, 8192),
            (Scale::Tensor(f.x_scale()), Scale::Tensor(0x100))
        );
    }
}
