//! The GEMV kernels of gemv.cu as families: every (rows, columns per warp, chunks in flight)
//! variant of one weight type, the activation dtype's or FP8 E4M3's (`--quantization fp8`), and
//! the launch of the variant a product asks for, and the tensor-core GEMV for either weight type.
//! `linear.rs` chooses the variant per shape.

use cudarc::driver::CudaFunction;

use super::kernels::{Kernels, Product};
use crate::error::{Result, WorkerError};

/// One weight type's GEMV variants.
pub struct GemvFamily {
    /// `[M 1, 2, 4, 8][R 1, 2, 4]`, two chunks in flight.
    one: [[CudaFunction; 3]; 4],
    /// `[M 1, 2][R 1, 2][U 4, 8]`: the deeper variants.
    deep: [[[CudaFunction; 2]; 2]; 2],
    /// The entry points' prefix, for errors.
    name: &'static str,
}

impl GemvFamily {
    /// Takes the family whose entry points start with `prefix` (`gemv` or `gemv_fp8`).
    pub fn load(
        take: &mut impl FnMut(&str) -> Result<CudaFunction>,
        prefix: &'static str,
    ) -> Result<Self> {
        let mut one = |m: usize, r: usize| take(&format!("{prefix}_m{m}_r{r}"));
        let one = [
            [one(1, 1)?, one(1, 2)?, one(1, 4)?],
            [one(2, 1)?, one(2, 2)?, one(2, 4)?],
            [one(4, 1)?, one(4, 2)?, one(4, 4)?],
            [one(8, 1)?, one(8, 2)?, one(8, 4)?],
        ];
        let mut deep = |m: usize, r: usize, u: usize| take(&format!("{prefix}_m{m}_r{r}_u{u}"));
        let deep = [
            [
                [deep(1, 1, 4)?, deep(1, 1, 8)?],
                [deep(1, 2, 4)?, deep(1, 2, 8)?],
            ],
            [
                [deep(2, 1, 4)?, deep(2, 1, 8)?],
                [deep(2, 2, 4)?, deep(2, 2, 8)?],
            ],
        ];
        Ok(Self {
            one,
            deep,
            name: prefix,
        })
    }

    /// The variant for `rows` rows (1 to 8), `r` output columns per warp (1, 2 or 4) and `u`
    /// chunks in flight per lane (2; or 4 or 8 for up to 2 rows and 1 or 2 columns).
    fn pick(&self, rows: usize, r: usize, u: usize) -> Result<&CudaFunction> {
        let m = match rows {
            1 => 0,
            2 => 1,
            3..=4 => 2,
            5..=8 => 3,
            _ => {
                return Err(WorkerError::Unsupported {
                    detail: format!("{rows} rows on the GEMV kernel (1 to 8)"),
                })
            }
        };
        match (r, u) {
            (1, 2) => Ok(&self.one[m][0]),
            (2, 2) => Ok(&self.one[m][1]),
            (4, 2) => Ok(&self.one[m][2]),
            (1 | 2, 4 | 8) if m < 2 => Ok(&self.deep[m][r / 2][u / 8]),
            _ => Err(WorkerError::Unsupported {
                detail: format!(
                    "the GEMV kernel with {r} columns per warp and {u} chunks in flight for \
                     {rows} rows"
                ),
            }),
        }
    }
}

impl Kernels {
    /// `p.y = p.x p.w^T` for 1 to 8 rows by the GEMV kernel with `r` output columns per warp and
    /// `u` chunks in flight per lane ([`GemvFamily::pick`]): gemv.cu. With `p.fp8`, `p.w` is FP8
    /// E4M3 and the product is scaled by the weight's scale (or its rows'). `p.k` must be a
    /// multiple of 8 (16 with FP8 weights).
    pub fn gemv(&self, p: &Product, r: usize, u: usize) -> Result<()> {
        let family = match p.fp8 {
            None => &self.gemv,
            Some(_) => &self.gemv_fp8,
        };
        let function = family.pick(p.rows, r, u)?;
        debug_assert!(p.k.is_multiple_of(if p.fp8.is_some() { 16 } else { 8 }));
        self.launch_gemv(function, p, p.n_out.div_ceil(4 * r), family.name)
    }

    /// `p.y = p.x p.w^T` on tensor cores with `ahead` (4 or 8) tiles in flight per lane
    /// (gemv.cu's gemv_mma for 1 to 8 rows and gemv_mma_m16 for 9 to [`MMA_WIDE_ROWS`] of a
    /// weight in the dtype, 4 ahead, gemv_fp8_mma for 1 to 8 of an FP8 one: other sums than
    /// [`Self::gemv`]'s). `p.k` must be a multiple of [`mma_k_multiple`].
    pub fn gemv_mma(&self, p: &Product, ahead: usize) -> Result<()> {
        let multiple = mma_k_multiple(p.fp8.is_some());
        let deep = usize::from(ahead == 8);
        let entry = match (p.fp8.is_some(), p.rows, ahead) {
            _ if !p.k.is_multiple_of(multiple) || p.int4.is_some() => None,
            (false, 1..=8, 4 | 8) => Some((&self.gemv_mma[deep], "gemv_mma")),
            (false, 9..=MMA_WIDE_ROWS, 4) => Some((&self.gemv_mma_m16, "gemv_mma_m16")),
            (true, 1..=8, 4 | 8) => Some((&self.gemv_fp8_mma[deep], "gemv_fp8_mma")),
            _ => None,
        };
        let Some((function, name)) = entry else {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "{} rows of {} inputs on the tensor-core GEMV with {ahead} tiles ahead (1 to \
                     8 rows, 4 or 8 ahead; 9 to {MMA_WIDE_ROWS} rows of a weight in the dtype, 4 \
                     ahead; a multiple of {multiple} inputs)",
                    p.rows, p.k
                ),
            });
        };
        self.launch_gemv(function, p, p.n_out.div_ceil(8), name)
    }

    /// Launches a gemv.cu entry point on `p` with its arguments (y, x, w, for FP8 weights their
    /// scale and whether it is per row, then rows, n_out, k): `blocks` blocks of 128 threads.
    /// The caller has checked `p` against the entry point's K multiple and row count.
    fn launch_gemv(
        &self,
        function: &CudaFunction,
        p: &Product,
        blocks: usize,
        name: &str,
    ) -> Result<()> {
        let (rw, nw, kw) = (p.rows as i32, p.n_out as i32, p.k as i32);
        let mut b = self.launch(function);
        b.arg(&p.y).arg(&p.x).arg(&p.w);
        let per_row = p.fp8.map_or(0i32, |f| i32::from(f.w_scale_per_row));
        if let Some(fp8) = &p.fp8 {
            b.arg(&fp8.w_scale).arg(&per_row);
        }
        b.arg(&rw).arg(&nw).arg(&kw);
        // SAFETY: as gemv.cu documents: y holds rows x n_out and x rows x k elements of the
        // dtype, w n_out x k of the dtype (or bytes, with its f32 scale, or n_out of them with
        // w_scale_per_row, at fp8.w_scale), all the caller's buffers, 16-byte aligned; k is the
        // multiple and rows the count the entry point takes (checked by the caller), and
        // `blocks` covers n_out as its launch line says.
        unsafe { b.launch(super::kernels::grid_rows(blocks, 128)) }
            .map(drop)
            .map_err(|e| super::device::device_err(&format!("launching {name}"), e))
    }
}

/// The most rows the tensor-core GEMV takes (of a weight in the dtype; 8 of an FP8 one).
pub const MMA_WIDE_ROWS: usize = 16;

/// The multiple of K the tensor-core GEMV needs: a block's 4 warps of 4 lanes, each lane 16 bytes
/// a tile (8 inputs of the dtype, 16 of FP8).
pub const fn mma_k_multiple(fp8: bool) -> usize {
    if fp8 {
        256
    } else {
        128
    }
}
