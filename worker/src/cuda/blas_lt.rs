//! FP8 matrix products through cuBLASLt (`--quantization fp8`, products above the GEMV's 8
//! rows): `y[n, m] = (sx x_q[n, k]) (sw W_q[m, k])^T` with E4M3 operands, scales read from
//! device memory at run time, one per tensor or one per row of each operand ([`Scale`]: the
//! per-row ones through cuBLASLt's outer-vector scaling, CUDA 12.9+ on Hopper: on an H200 with
//! cuBLASLt 13.1 as fast as per-tensor scales, docs/PERFORMANCE.md issue 12), f32
//! accumulation, `y` in the activation dtype. Where cuBLASLt has no outer-vector algorithm
//! (it answers the heuristic with an invalid value, then is not asked again) the product runs
//! with scales of 1 in place of the vectors and the caller applies them ([`Unapplied`]).
//!
//! cuBLASLt is column-major and its FP8 kernels take only the "TN" layout, which is ours: the
//! row-major weight `[m, k]` is the column-major `k x m` matrix A, used transposed; the row-major
//! activations `[n, k]` are the column-major `k x n` matrix B; `y` is the column-major `m x n`
//! D. Fast accumulation is on. The descriptors, layouts and the heuristic's algorithm are made once per `(n, m, k)` and
//! kept (the heuristic costs tens of microseconds of host time, a prefill step has four products
//! a layer); the scale pointers are set on the descriptor before each call, so a CUDA graph
//! captures each call's own. The handle has a workspace of its own, allocated once: nothing is
//! allocated during a capture.

use std::collections::HashMap;
use std::sync::Mutex;

use cudarc::cublas::sys::cublasOperation_t as Op;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use super::device::{device_err, DeviceBuffer, Gpu};
use super::kernels::Dtype;
use crate::error::{Result, WorkerError};

/// cuBLASLt's workspace: what NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// An FP8 operand's scales (device addresses of f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    /// One for the tensor.
    Tensor(u64),
    /// One per row (of `x`: `n`; of `w`: `m`, the output's columns).
    Rows(u64),
}

impl Scale {
    fn rows(self) -> Option<u64> {
        match self {
            Self::Rows(p) => Some(p),
            Self::Tensor(_) => None,
        }
    }
}

/// One FP8 product's operands (device addresses): `y`, the dtype, `[n, m]`; `x` E4M3 `[n, k]`;
/// `w` E4M3 `[m, k]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Gemm {
    pub y: u64,
    pub x: u64,
    pub x_scale: Scale,
    pub w: u64,
    pub w_scale: Scale,
    /// `y +=` the product (cuBLASLt's beta = 1, one rounding of the sum); needs scales that the
    /// GEMM applies itself (not vector scales left [`Unapplied`]).
    pub accumulate: bool,
}

/// Vector scales a product could not apply: `y[i, j]` must still be multiplied by `x_rows[i]`
/// and `w_rows[j]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unapplied {
    pub x_rows: Option<u64>,
    pub w_rows: Option<u64>,
}

/// One shape's descriptors and algorithm.
struct Plan {
    /// Both operands' scales are outer vectors (one per row of `W` and of `x`).
    outer_vec: bool,
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each object was created by cuBLASLt for this plan and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A cuBLASLt handle on the worker's stream, for FP8 products.
pub struct BlasLt {
    handle: sys::cublasLtHandle_t,
    stream: sys::cudaStream_t,
    out_type: sys::cudaDataType,
    /// Per `(n, m, k, vector scales)`.
    plans: Mutex<HashMap<(usize, usize, usize, bool), Plan>>,
    workspace: DeviceBuffer,
    /// An f32 1, the scale of operands whose vector scales cuBLASLt cannot apply.
    one: DeviceBuffer,
    /// Whether cuBLASLt still may have outer-vector algorithms (false after its first refusal).
    outer_vec: std::sync::atomic::AtomicBool,
}

// SAFETY: the handle, the stream and the plans' descriptors are used only from the worker's
// runner thread, one call at a time (the plans behind a mutex); cuBLASLt handles may move
// between threads.
unsafe impl Send for BlasLt {}

impl Drop for BlasLt {
    fn drop(&mut self) {
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).clear();
        // SAFETY: the handle was created in `new` and is destroyed once, after its plans.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

fn lt_err(what: &'static str) -> impl Fn(lt::CublasError) -> WorkerError {
    move |e| device_err(what, e)
}

impl BlasLt {
    /// A handle on the GPU's stream writing `dtype` outputs.
    pub fn new(gpu: &Gpu, dtype: Dtype) -> Result<Self> {
        let handle = lt::create_handle().map_err(lt_err("creating the cuBLASLt handle"))?;
        let workspace = gpu.alloc(WORKSPACE_BYTES, "the cuBLASLt workspace")?;
        let one = gpu.alloc(4, "cuBLASLt's unit scale")?;
        gpu.upload(&one, &[1.0f32])?;
        gpu.sync()?;
        let out_type = match dtype {
            Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            Dtype::F16 => sys::cudaDataType::CUDA_R_16F,
        };
        Ok(Self {
            handle,
            stream: gpu.stream.cu_stream() as sys::cudaStream_t,
            out_type,
            plans: Mutex::new(HashMap::new()),
            workspace,
            one,
            outer_vec: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The plan of a shape, with both operands' scales per row (`outer_vec`) or per tensor.
    fn plan(&self, n: usize, m: usize, k: usize, outer_vec: bool) -> Result<Plan> {
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(lt_err("creating a cuBLASLt matmul descriptor"))?;
        let set = |attr: Attr, value: &Op| {
            // SAFETY: the descriptor is live; the value is the attribute's type.
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc,
                    attr,
                    value as *const _ as *const _,
                    std::mem::size_of::<Op>(),
                )
            }
            .map_err(lt_err("setting a cuBLASLt matmul attribute"))
        };
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSA, &Op::CUBLAS_OP_T)?;
        set(Attr::CUBLASLT_MATMUL_DESC_TRANSB, &Op::CUBLAS_OP_N)?;
        // Hopper's fast FP8 accumulation (no periodic promotion of the tensor cores' partial
        // sums to f32), as vLLM's and TensorRT-LLM's FP8 GEMMs run: 2,048-token prefill 36.0 ->
        // 34.0 ms on an H200, logits within the same tolerance (docs/PERFORMANCE.md, issue 12).
        let fast_accum: i8 = 1;
        // SAFETY: the descriptor is live; the attribute is an int8.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                Attr::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                &fast_accum as *const i8 as *const _,
                1,
            )
        }
        .map_err(lt_err("setting cuBLASLt's FP8 accumulation"))?;
        if outer_vec {
            let mode = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
            for attr in [
                Attr::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                Attr::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
            ] {
                // SAFETY: the descriptor is live; the attribute is the 32-bit scale-mode enum.
                unsafe {
                    lt::set_matmul_desc_attribute(
                        desc,
                        attr,
                        &mode as *const _ as *const _,
                        std::mem::size_of_val(&mode),
                    )
                }
                .map_err(lt_err("setting cuBLASLt's per-row scales"))?;
            }
            // The heuristic sees scale pointers, as in the configuration checked on an H200
            // (each call sets its own): cuBLASLt's unit scale.
            for attr in [
                Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            ] {
                // SAFETY: the descriptor is live; the attribute's value is a device pointer.
                unsafe {
                    lt::set_matmul_desc_attribute(
                        desc,
                        attr,
                        &self.one.ptr as *const u64 as *const _,
                        std::mem::size_of::<u64>(),
                    )
                }
                .map_err(lt_err("setting a cuBLASLt scale pointer"))?;
            }
        }
        let layout = |t: sys::cudaDataType, rows: usize, cols: usize| {
            lt::create_matrix_layout(t, rows as u64, cols as u64, rows as i64)
                .map_err(lt_err("creating a cuBLASLt matrix layout"))
        };
        let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
        let mut plan = Plan {
            outer_vec,
            desc,
            a: layout(e4m3, k, m)?,
            b: layout(e4m3, k, n)?,
            d: layout(self.out_type, m, n)?,
            // SAFETY: plain data; overwritten by the heuristic's choice below.
            algo: unsafe { std::mem::zeroed() },
        };
        let pref = lt::create_matmul_pref().map_err(lt_err("creating a cuBLASLt preference"))?;
        let bytes = WORKSPACE_BYTES as u64;
        // SAFETY: the preference and every descriptor are live; the attribute is a u64.
        let heuristic = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &bytes as *const u64 as *const _,
                std::mem::size_of::<u64>(),
            )
            .and_then(|()| {
                lt::get_matmul_algo_heuristic(
                    self.handle,
                    plan.desc,
                    plan.a,
                    plan.b,
                    plan.d,
                    plan.d,
                    pref,
                )
            })
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        plan.algo = heuristic
            .map_err(|e| {
                device_err(
                    &format!("finding a cuBLASLt FP8 algorithm for {n} x {m} x {k}"),
                    e,
                )
            })?
            .algo;
        Ok(plan)
    }

    /// Whether a product of `n x k` activations and an `m x k` weight, both scaled per row, has
    /// its vectors applied by cuBLASLt itself (an outer-vector algorithm; so it may accumulate).
    pub fn applies_row_scales(&self, n: usize, m: usize, k: usize) -> Result<bool> {
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self.plan_in(&mut plans, n, m, k, true)?.outer_vec)
    }

    /// The kept plan of a shape, made on first use: with outer-vector scales where `vectors`
    /// asks for them and cuBLASLt has them (after its first refusal it is not asked again).
    fn plan_in<'p>(
        &self,
        plans: &'p mut HashMap<(usize, usize, usize, bool), Plan>,
        n: usize,
        m: usize,
        k: usize,
        vectors: bool,
    ) -> Result<&'p Plan> {
        use std::sync::atomic::Ordering;
        Ok(match plans.entry((n, m, k, vectors)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let try_vectors = vectors && self.outer_vec.load(Ordering::Relaxed);
                let plan = match self.plan(n, m, k, try_vectors) {
                    Ok(plan) => plan,
                    Err(err) if try_vectors => {
                        self.outer_vec.store(false, Ordering::Relaxed);
                        tracing::warn!(
                            n, m, k, %err,
                            "cuBLASLt has no FP8 algorithm with per-row scales here: products \
                             with them run with scales of 1 and are scaled after (one more \
                             kernel)"
                        );
                        self.plan(n, m, k, false)?
                    }
                    Err(err) => return Err(err),
                };
                e.insert(plan)
            }
        })
    }

    /// `y[n, m] (+)= (x_scale x[n, k]) (w_scale w[m, k])^T` ([`Fp8Gemm`]): `x` and `w` E4M3, `y`
    /// the dtype, the scales f32 in device memory ([`Scale`]). `k` and `m` must be multiples of
    /// 16 (cuBLASLt's FP8 alignment). cuBLASLt applies vector scales when both operands have
    /// them (and it has an outer-vector algorithm); a vector beside a per-tensor scale is left
    /// to the caller. Says which vector scales still need applying (an error with
    /// `accumulate`, which must not leave any).
    pub fn fp8_linear(
        &self,
        g: &Fp8Gemm,
        n: usize,
        m: usize,
        k: usize,
    ) -> Result<Option<Unapplied>> {
        use sys::cublasLtMatmulDescAttributes_t as Attr;
        let Fp8Gemm {
            y,
            x,
            x_scale,
            w,
            w_scale,
            accumulate,
        } = *g;
        if n == 0 {
            return Ok(None);
        }
        let vectors = x_scale.rows().is_some() && w_scale.rows().is_some();
        let mut plans = self.plans.lock().unwrap_or_else(|e| e.into_inner());
        let plan = self.plan_in(&mut plans, n, m, k, vectors)?;
        let scalar = |s: Scale| match s {
            Scale::Tensor(p) => p,
            Scale::Rows(p) if plan.outer_vec => p,
            Scale::Rows(_) => self.one.ptr,
        };
        let (w_ptr, x_ptr) = (scalar(w_scale), scalar(x_scale));
        let unapplied = (!plan.outer_vec && (x_scale.rows().is_some() || w_scale.rows().is_some()))
            .then_some(Unapplied {
                x_rows: x_scale.rows(),
                w_rows: w_scale.rows(),
            });
        if accumulate && unapplied.is_some() {
            return Err(WorkerError::Device {
                detail: "an accumulating FP8 product with scales applied after it".into(),
            });
        }
        for (attr, ptr) in [
            (Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_ptr),
            (Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_ptr),
        ] {
            // SAFETY: the descriptor is live; the attribute's value is a device pointer.
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc,
                    attr,
                    &ptr as *const u64 as *const _,
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(lt_err("setting a cuBLASLt scale pointer"))?;
        }
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // SAFETY: w holds m x k and x n x k E4M3 bytes, y n x m elements of the dtype (the
        // caller's buffers; C is y, read with beta = 1, in D's layout, as cuBLASLt allows in
        // place); the scales are f32 in device memory; alpha and beta are f32 as the
        // descriptor's scale type says; the workspace is the handle's own, of WORKSPACE_BYTES.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const _,
                &beta as *const f32 as *const _,
                w as *const _,
                plan.a,
                x as *const _,
                plan.b,
                y as *const _,
                plan.d,
                y as *mut _,
                plan.d,
                &plan.algo,
                self.workspace.ptr as *mut _,
                WORKSPACE_BYTES,
                self.stream,
            )
        }
        .map_err(lt_err("cuBLASLt FP8 GEMM"))
        .map(|()| unapplied)
    }
}
