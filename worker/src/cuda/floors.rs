//! The machine's floors for benchmark ratios, measured on the GPU in the same run: device memory
//! copy bandwidth (what a memory-bound decode step is judged against) and the cuBLAS GEMM rate
//! (what a compute-bound prefill is judged against).

use std::time::Instant;

use super::blas::Blas;
use super::device::{device_err, Gpu};
use super::kernels::{Dtype, ELEM};
use crate::error::Result;

/// Measured floors of one GPU.
#[derive(Debug, Clone)]
pub struct Floors {
    /// Device-to-device copy, bytes read plus bytes written per second (GB/s, 1e9).
    pub copy_gb_per_s: f64,
    /// cuBLAS GEMM of `gemm_size`^3 in the dtype, TFLOP/s.
    pub gemm_tflops: f64,
    pub gemm_size: usize,
    /// The GPU's name, as the driver reports it.
    pub gpu_name: String,
}

/// Measures the floors on GPU `ordinal` (needs ~4.5 GiB free; frees it again).
pub fn measure_floors(ordinal: usize, dtype: Dtype) -> Result<Floors> {
    let gpu = Gpu::open(ordinal)?;
    let bytes = 2usize << 30;
    let src = gpu.alloc(bytes, "the copy benchmark")?;
    let dst = gpu.alloc(bytes, "the copy benchmark")?;
    let copy = |reps: usize| -> Result<f64> {
        gpu.sync()?;
        let t = Instant::now();
        for _ in 0..reps {
            // SAFETY: both buffers hold `bytes` bytes on this GPU; the context is current.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(
                    dst.ptr,
                    src.ptr,
                    bytes,
                    gpu.stream.cu_stream(),
                )
            }
            .map_err(|e| device_err("copy benchmark", e))?;
        }
        gpu.sync()?;
        Ok(t.elapsed().as_secs_f64())
    };
    copy(2)?;
    let reps = 10;
    let copy_gb_per_s = (2 * bytes * reps) as f64 / copy(reps)? / 1e9;
    drop((src, dst));
    let n = 8192usize;
    let blas = Blas::new(&gpu, dtype)?;
    let a = gpu.alloc(n * n * ELEM, "the GEMM benchmark")?;
    let b = gpu.alloc(n * n * ELEM, "the GEMM benchmark")?;
    // Random operands in [-1, 1): a GEMM on zeros runs faster than on real data.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u16> = (0..n * n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            dtype.from_f32(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect();
    gpu.upload(&a, &random)?;
    gpu.upload(&b, &random)?;
    gpu.sync()?;
    let c = gpu.alloc(n * n * ELEM, "the GEMM benchmark")?;
    let gemm = |reps: usize| -> Result<f64> {
        gpu.sync()?;
        let t = Instant::now();
        for _ in 0..reps {
            blas.linear(c.ptr, a.ptr, b.ptr, n, n, n)?;
        }
        gpu.sync()?;
        Ok(t.elapsed().as_secs_f64())
    };
    gemm(3)?;
    let reps = 20;
    let gemm_tflops = 2.0 * (n as f64).powi(3) * reps as f64 / gemm(reps)? / 1e12;
    Ok(Floors {
        copy_gb_per_s,
        gemm_tflops,
        gemm_size: n,
        gpu_name: gpu.name.clone(),
    })
}
