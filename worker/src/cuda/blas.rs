//! Dense matrix products through cuBLAS: `y = x W^T` for row-major activations `x` `[n, k]` and
//! a row-major weight `W` `[m, k]` (PyTorch's Linear layout), accumulating in f32.
//!
//! The handle gets a workspace of its own, allocated once: cuBLAS then never allocates while a
//! CUDA graph is being captured (which would fail the capture).

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
use cudarc::cublas::CudaBlas;

use super::device::{device_err, DeviceBuffer, Gpu};
use super::kernels::Dtype;
use crate::error::Result;

/// cuBLAS's workspace: what NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// A cuBLAS handle bound to the worker's stream.
pub struct Blas {
    blas: CudaBlas,
    dtype: Dtype,
    _workspace: DeviceBuffer,
}

impl Blas {
    /// A handle on the GPU's stream for `dtype` operands.
    pub fn new(gpu: &Gpu, dtype: Dtype) -> Result<Self> {
        let blas = CudaBlas::new(gpu.stream.clone())
            .map_err(|e| device_err("creating the cuBLAS handle", e))?;
        let workspace = gpu.alloc(WORKSPACE_BYTES, "the cuBLAS workspace")?;
        // SAFETY: the handle is live; the workspace holds WORKSPACE_BYTES bytes and lives as long
        // as the handle (both in this struct; the workspace field is dropped after `blas`).
        unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr as *mut _,
                WORKSPACE_BYTES,
            )
        }
        .result()
        .map_err(|e| device_err("setting the cuBLAS workspace", e))?;
        Ok(Self {
            blas,
            dtype,
            _workspace: workspace,
        })
    }

    /// `y[n, m] = x[n, k] W[m, k]^T`, all three in the activation dtype.
    ///
    /// cuBLAS is column-major: a row-major `[r, c]` matrix is a column-major `[c, r]` one, so
    /// this is `y^T (m x n) = W (m x k, stored transposed) x^T (k x n)`.
    pub fn linear(&self, y: u64, x: u64, w: u64, n: usize, m: usize, k: usize) -> Result<()> {
        self.gemm(y, x, w, n, m, k, 0.0)
    }

    /// `y[n, m] += x[n, k] W[m, k]^T`: the product added to `y` before its one rounding (the
    /// residual add folded into the o and down projections, `forward.rs`).
    pub fn linear_accumulate(
        &self,
        y: u64,
        x: u64,
        w: u64,
        n: usize,
        m: usize,
        k: usize,
    ) -> Result<()> {
        self.gemm(y, x, w, n, m, k, 1.0)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, y: u64, x: u64, w: u64, n: usize, m: usize, k: usize, beta: f32) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        let t = self.dtype.cublas();
        // SAFETY: w holds m*k, x n*k and y n*m elements of the dtype (the caller's buffers);
        // alpha and beta are f32 as CUBLAS_COMPUTE_32F requires; the handle's stream is the
        // worker's only stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                (&alpha) as *const f32 as *const _,
                w as *const _,
                t,
                k as i32,
                x as *const _,
                t,
                k as i32,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                t,
                m as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| device_err("cuBLAS GEMM", e))
    }
}
