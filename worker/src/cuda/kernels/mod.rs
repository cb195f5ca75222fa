//! The CUDA C kernels of `tpserve-kernels`, compiled for this GPU (through the on-disk PTX
//! cache), loaded for one activation dtype, with one typed launch method per kernel. Each
//! method's arguments follow the kernel's comment block in `kernels/cuda/*.cu`; pointers are raw
//! device addresses. This file loads them and launches the small ones (embedding, norms, RoPE,
//! SiLU-mul, element-wise); the attention, sampling, all-reduce and LoRA kernels' launches and
//! geometry have a file each, and the optional second stream (`side_stream.rs`) another.

mod all_reduce;
mod attention;
mod dtype;
mod lora;
mod sampling;
mod side_stream;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};
use tpserve_kernels::{entry_point, CompileConfig, Compiler, PtxCache, SOURCES};
use tpserve_term::progress::{Task, Unit};

pub use self::all_reduce::*;
pub use self::attention::*;
use self::attention::{take_decode_mma, take_mma, DecodeMmaKernel, MmaKernel};
pub use self::dtype::Dtype;
pub use self::lora::*;
use self::sampling::SampleScratch;
pub use self::sampling::*;
pub use self::side_stream::Lane;
use self::side_stream::SideStream;
use super::device::{device_err, Gpu};
use super::fp8::Fp8Operands;
use super::gemv::GemvFamily;
use super::int4::Int4Operands;
use super::launch::{programmatic_launches, KernelLaunch};
use crate::error::{Result, WorkerError};
use crate::kv_cache_dtype::KvCacheDtype;

/// A residual add and RMSNorm of `n` rows: `x += sub; out = rmsnorm(x) * weight`.
#[derive(Debug, Clone, Copy)]
pub struct ResidualNorm {
    pub out: u64,
    pub x: u64,
    pub sub: u64,
    pub weight: u64,
    pub n: usize,
    pub hidden: usize,
    pub eps: f32,
}

/// Bytes per element of the activation dtypes.
pub const ELEM: usize = 2;

/// Every kernel, loaded for one dtype.
pub struct Kernels {
    stream: std::sync::Arc<CudaStream>,
    /// A second stream for a prompt step's decode rows' attention, when asked for.
    side: Option<SideStream>,
    /// Launches carry the programmatic-dependent-launch attribute (`launch.rs`).
    programmatic: bool,
    embedding: CudaFunction,
    /// rms_norm.cu's kernels of one 16-byte piece a thread ([`Kernels::narrow_norm`]) and their
    /// wide twins.
    rms_norm: CudaFunction,
    rms_norm_residual: CudaFunction,
    rms_norm_wide: CudaFunction,
    rms_norm_residual_wide: CudaFunction,
    /// The narrow norms that also quantize their rows to FP8 (issue 12's per-token activations).
    rms_norm_fp8_rows: CudaFunction,
    rms_norm_residual_fp8_rows: CudaFunction,
    rope_kv_write: CudaFunction,
    silu_mul: CudaFunction,
    silu_mul_fp8_rows: CudaFunction,
    attention_hd64: CudaFunction,
    attention_hd128: CudaFunction,
    attention_hd256: CudaFunction,
    attention_mma_hd64: MmaKernel,
    attention_mma_hd128: MmaKernel,
    attention_combine: CudaFunction,
    /// `[head size 64, 128, 256][group <= 4, <= 8]`.
    attention_decode: [[CudaFunction; 2]; 3],
    /// `[head size 64, 128]`.
    attention_decode_mma: [DecodeMmaKernel; 2],
    sample: CudaFunction,
    /// sample_*'s scratch for rows that several blocks share ([`sample_splits`]).
    sample_scratch: SampleScratch,
    process_logits: CudaFunction,
    sample_processed: CudaFunction,
    token_logprobs: CudaFunction,
    add_bias: CudaFunction,
    gather_rows: CudaFunction,
    fill_uniform: CudaFunction,
    set_entries: CudaFunction,
    /// The GEMV variants for weights in the dtype and in FP8 E4M3 (`gemv.rs`).
    pub(super) gemv: GemvFamily,
    pub(super) gemv_fp8: GemvFamily,
    /// The tensor-core GEMVs for 1 to 8 rows, weights in the dtype and in FP8, with 4 and 8
    /// tiles in flight, and for 9 to 16 rows of weights in the dtype (`gemv.rs`).
    pub(super) gemv_mma: [CudaFunction; 2],
    pub(super) gemv_fp8_mma: [CudaFunction; 2],
    pub(super) gemv_mma_m16: CudaFunction,
    /// 4-bit weights (`int4.rs`; `TPSERVE_CUDA_W4_PAIRS=1` loads the forms that compute a
    /// warp's tiles two at a time, int4.cu's gemv_w4_pairs: the same bits).
    pub(super) gemv_w4: CudaFunction,
    /// Its gated form: the gate and up product with the SiLU-mul on the way out.
    pub(super) gemv_w4_gated: CudaFunction,
    /// The 4-bit GEMM of up to 16, 32 and 64 rows a chunk.
    pub(super) gemm_w4: [CudaFunction; 3],
    pub(super) dequantize_w4: CudaFunction,
    pub(super) gather_inputs: CudaFunction,
    /// FP8 quantization (`fp8.rs`).
    pub(super) fp8_amax_partial: CudaFunction,
    pub(super) fp8_quantize: CudaFunction,
    pub(super) fp8_quantize_rows: CudaFunction,
    pub(super) fp8_scale_outer: CudaFunction,
    gemm_bi: CudaFunction,
    all_reduce_one_shot: CudaFunction,
    all_reduce_residual_norm: CudaFunction,
    lora_shrink: CudaFunction,
    lora_expand: CudaFunction,
}

/// The longest row (bytes of the dtype) silu_mul_fp8_rows holds in shared memory: Llama-3-70B's
/// 28,672 intermediate elements on one rank fit.
const SILU_FP8_MAX_ROW_BYTES: usize = 64 << 10;

/// One block of `threads` threads per row, `n` rows.
pub(super) fn grid_rows(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The infix of the entry points that read or write a cache of `kv` (common.cuh's
/// TPSERVE_FOR_EACH_KV_CACHE): none for the compute dtype, `_fp8kv` for FP8.
fn kv_entry(kv: KvCacheDtype) -> &'static str {
    match kv {
        KvCacheDtype::Compute => "",
        KvCacheDtype::Fp8E4M3 => "_fp8kv",
    }
}

fn launch_err(name: &str) -> impl Fn(cudarc::driver::DriverError) -> WorkerError + '_ {
    move |e| device_err(&format!("launching {name}"), e)
}

impl Kernels {
    /// Compiles (or takes from the cache) every source for `gpu` and loads `dtype`'s entry points,
    /// those that touch the KV cache for a cache of `kv`.
    pub fn load(gpu: &Gpu, dtype: Dtype, kv: KvCacheDtype) -> Result<Self> {
        let cache = match PtxCache::from_env() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("no PTX cache directory ({e}); compiling every start");
                None
            }
        };
        let compiler = Compiler::new(
            CompileConfig::from_env(gpu.arch.clone()),
            cache,
            tpserve_kernels::Prebuilt::embedded(),
        );
        let started = std::time::Instant::now();
        let mut functions = std::collections::HashMap::new();
        // Sources served from the embedded bundle, the PTX cache and NVRTC.
        let (mut embedded, mut cached, mut compiled) = (0, 0, 0);
        // Shown only when it takes a while: NVRTC compiling what the embedded bundle lacks.
        let progress = Task::new(
            "loading CUDA kernels",
            SOURCES.len() as u64,
            Unit::items("sources"),
        );
        for source in SOURCES {
            let kernel = compiler.compile(source).map_err(|e| WorkerError::Device {
                detail: format!("compiling {}: {e}", source.name),
            })?;
            if let Some(e) = &kernel.cache_error {
                tracing::warn!("PTX cache: {e}");
            }
            match kernel.code {
                tpserve_kernels::KernelCode::EmbeddedCubin(_) => embedded += 1,
                tpserve_kernels::KernelCode::CachedPtx(_) => cached += 1,
                tpserve_kernels::KernelCode::CompiledPtx(_) => compiled += 1,
            }
            let module = gpu
                .ctx
                .load_module(kernel.to_ptx())
                .map_err(|e| device_err(&format!("loading {}", source.name), e))?;
            let entries = tpserve_kernels::KERNELS
                .iter()
                .find(|(file, _)| *file == source.name)
                .map(|(_, e)| *e)
                .unwrap_or(&[]);
            let suffix = format!("_{}", dtype.kernel_dtype().suffix());
            for entry in entries.iter().filter(|e| e.ends_with(&suffix)) {
                let f = module
                    .load_function(entry)
                    .map_err(|e| device_err(&format!("loading kernel {entry}"), e))?;
                functions.insert(entry.to_string(), f);
            }
            progress.inc(1);
        }
        progress.finish();
        tracing::info!(
            embedded,
            cached,
            compiled,
            seconds = started.elapsed().as_secs_f64(),
            arch = %gpu.arch,
            "CUDA kernels ready"
        );
        let mut take = |base: &str| -> Result<CudaFunction> {
            let name = entry_point(base, dtype.kernel_dtype());
            functions.remove(&name).ok_or_else(|| WorkerError::Device {
                detail: format!("kernel {name} is missing from the compiled modules"),
            })
        };
        let kv_dtype = kv;
        let kv = kv_entry(kv);
        let mma_hd128 = MmaShape::for_hd128(
            &gpu.arch,
            gpu.smem_per_block_optin,
            kv_dtype,
            HopperPrompts::from_env(),
        );
        let [gemv_w4, gemv_w4_gated] = super::int4::gemv_w4_entry_points();
        let mut take_kv = |base: &str| take(&format!("{base}{kv}"));
        let rope_kv_write = take_kv("rope_kv_write")?;
        let attention_hd64 = take_kv("paged_attention_hd64")?;
        let attention_hd128 = take_kv("paged_attention_hd128")?;
        let attention_hd256 = take_kv("paged_attention_hd256")?;
        let attention_decode = [
            [
                take_kv("paged_attention_decode_hd64_g4")?,
                take_kv("paged_attention_decode_hd64_g8")?,
            ],
            [
                take_kv("paged_attention_decode_hd128_g4")?,
                take_kv("paged_attention_decode_hd128_g8")?,
            ],
            [
                take_kv("paged_attention_decode_hd256_g4")?,
                take_kv("paged_attention_decode_hd256_g8")?,
            ],
        ];
        let attention_decode_mma = [
            take_decode_mma(&mut take, 64, kv_dtype)?,
            take_decode_mma(&mut take, 128, kv_dtype)?,
        ];
        Ok(Self {
            stream: gpu.stream.clone(),
            side: SideStream::from_env(&gpu.stream)?,
            programmatic: programmatic_launches(gpu.compute_capability.0),
            embedding: take("embedding")?,
            rms_norm: take("rms_norm")?,
            rms_norm_residual: take("rms_norm_residual")?,
            rms_norm_wide: take("rms_norm_wide")?,
            rms_norm_residual_wide: take("rms_norm_residual_wide")?,
            rms_norm_fp8_rows: take("rms_norm_fp8_rows")?,
            rms_norm_residual_fp8_rows: take("rms_norm_residual_fp8_rows")?,
            rope_kv_write,
            silu_mul: take("silu_mul")?,
            silu_mul_fp8_rows: {
                let f = take("silu_mul_fp8_rows")?;
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    SILU_FP8_MAX_ROW_BYTES as i32,
                )
                .map_err(|e| device_err("raising silu_mul_fp8_rows's shared memory limit", e))?;
                f
            },
            attention_hd64,
            attention_hd128,
            attention_hd256,
            attention_mma_hd64: take_mma(&mut take, 64, MmaShape::NARROW, kv)?,
            attention_mma_hd128: take_mma(&mut take, 128, mma_hd128, kv)?,
            attention_combine: take("attention_combine")?,
            attention_decode,
            attention_decode_mma,
            sample: take("sample")?,
            sample_scratch: SampleScratch::new(gpu)?,
            process_logits: take("process_logits")?,
            sample_processed: take("sample_processed")?,
            token_logprobs: take("token_logprobs")?,
            add_bias: take("add_bias")?,
            gather_rows: take("gather_rows")?,
            fill_uniform: take("fill_uniform")?,
            set_entries: take("set_entries")?,
            gemv: GemvFamily::load(&mut take, "gemv")?,
            gemv_fp8: GemvFamily::load(&mut take, "gemv_fp8")?,
            gemv_mma: [take("gemv_mma")?, take("gemv_mma_a8")?],
            gemv_fp8_mma: [take("gemv_fp8_mma")?, take("gemv_fp8_mma_a8")?],
            gemv_mma_m16: take("gemv_mma_m16")?,
            gemv_w4: take(gemv_w4)?,
            gemv_w4_gated: take(gemv_w4_gated)?,
            gemm_w4: [
                take("gemm_w4_n16")?,
                take("gemm_w4_n32")?,
                take("gemm_w4_n64")?,
            ],
            dequantize_w4: take("dequantize_w4")?,
            gather_inputs: take("gather_inputs")?,
            fp8_amax_partial: take("fp8_amax_partial")?,
            fp8_quantize: take("fp8_quantize")?,
            fp8_quantize_rows: take("fp8_quantize_rows")?,
            fp8_scale_outer: take("fp8_scale_outer")?,
            gemm_bi: take("gemm_bi")?,
            all_reduce_one_shot: take("all_reduce_one_shot")?,
            all_reduce_residual_norm: take("all_reduce_residual_norm")?,
            lora_shrink: take("lora_shrink")?,
            lora_expand: take("lora_expand")?,
        })
    }

    /// A launch of `function` on the worker's stream.
    pub(super) fn launch<'a>(&'a self, function: &'a CudaFunction) -> KernelLaunch<'a> {
        self.launch_on(Lane::Main, function)
    }

    /// A launch of `function` on `lane`'s stream (the worker's when there is no side stream).
    pub(super) fn launch_on<'a>(
        &'a self,
        lane: Lane,
        function: &'a CudaFunction,
    ) -> KernelLaunch<'a> {
        let stream = match (lane, &self.side) {
            (Lane::Side, Some(side)) => side.stream(),
            _ => &self.stream,
        };
        KernelLaunch::new(stream, function, self.programmatic)
    }

    /// Whether a prompt step's decode rows' attention runs on a side stream
    /// (`TPSERVE_CUDA_OVERLAP_ATTENTION=1`): between `fork_side` and `join_side`.
    pub fn has_side_stream(&self) -> bool {
        self.side.is_some()
    }

    /// The side stream waits for everything issued so far (nothing without one).
    pub fn fork_side(&self) -> Result<()> {
        self.side.as_ref().map_or(Ok(()), |s| s.fork(&self.stream))
    }

    /// The worker's stream waits for everything issued on the side stream (nothing without one).
    pub fn join_side(&self) -> Result<()> {
        self.side.as_ref().map_or(Ok(()), |s| s.join(&self.stream))
    }

    /// Head sizes the attention kernel is built for.
    pub fn supports_head_dim(head_dim: usize) -> bool {
        matches!(head_dim, 64 | 128 | 256)
    }

    /// Token embeddings of `n` rows into `out` (`[n, hidden]`); each row's token is `ids`'
    /// ([`Fed`]).
    #[allow(clippy::too_many_arguments)]
    pub fn embedding(
        &self,
        out: u64,
        table: u64,
        ids: Fed,
        n: usize,
        hidden: usize,
        vocab_start: usize,
        vocab_len: usize,
    ) -> Result<()> {
        let (h, vs, vl) = (hidden as i32, vocab_start as i32, vocab_len as i32);
        let mut b = self.launch(&self.embedding);
        b.arg(&out)
            .arg(&table)
            .arg(&ids.ids)
            .arg(&ids.feed)
            .arg(&ids.fed);
        b.arg(&h).arg(&vs).arg(&vl);
        // SAFETY: arguments match embedding.cu's signature; the caller sizes the buffers.
        unsafe { b.launch(grid_rows(n, 256)) }
            .map(drop)
            .map_err(launch_err("embedding"))
    }

    fn norm_threads(hidden: usize) -> u32 {
        ((hidden / 8).div_ceil(32) * 32).clamp(32, 1024) as u32
    }

    /// Whether rows of `hidden` elements take rms_norm.cu's narrow kernels: at most one 16-byte
    /// piece a thread of [`Self::norm_threads`]. Chosen by the row's length alone, so a row's
    /// sums never depend on the batch.
    fn narrow_norm(hidden: usize) -> bool {
        hidden.is_multiple_of(8) && hidden / 8 <= Self::norm_threads(hidden) as usize
    }

    /// The narrow kernel or its wide twin for rows of `hidden` elements ([`Self::narrow_norm`]).
    fn norm_kernel<'a>(
        narrow: &'a CudaFunction,
        wide: &'a CudaFunction,
        hidden: usize,
    ) -> &'a CudaFunction {
        if Self::narrow_norm(hidden) {
            narrow
        } else {
            wide
        }
    }

    pub fn rms_norm(
        &self,
        out: u64,
        x: u64,
        weight: u64,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        let h = hidden as i32;
        let mut b = self.launch(Self::norm_kernel(
            &self.rms_norm,
            &self.rms_norm_wide,
            hidden,
        ));
        b.arg(&out).arg(&x).arg(&weight).arg(&h).arg(&eps);
        // SAFETY: as rms_norm.cu documents.
        unsafe { b.launch(grid_rows(n, Self::norm_threads(hidden))) }
            .map(drop)
            .map_err(launch_err("rms_norm"))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_residual(
        &self,
        out: u64,
        x: u64,
        residual: u64,
        weight: u64,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        let h = hidden as i32;
        let mut b = self.launch(Self::norm_kernel(
            &self.rms_norm_residual,
            &self.rms_norm_residual_wide,
            hidden,
        ));
        b.arg(&out)
            .arg(&x)
            .arg(&residual)
            .arg(&weight)
            .arg(&h)
            .arg(&eps);
        // SAFETY: as rms_norm.cu documents.
        unsafe { b.launch(grid_rows(n, Self::norm_threads(hidden))) }
            .map(drop)
            .map_err(launch_err("rms_norm_residual"))
    }

    /// Whether [`Self::rms_norm_fp8_rows`] takes rows of `hidden` elements (the narrow norm's).
    pub fn fuses_norm_fp8(hidden: usize) -> bool {
        Self::narrow_norm(hidden)
    }

    /// [`Self::rms_norm`] (`residual` `None`) or [`Self::rms_norm_residual`] whose output rows
    /// are also quantized to FP8 E4M3 bytes at `q`, one f32 scale a row at `q_scales`, as
    /// [`Self::fp8_quantize_rows`] would quantize them; the dtype output `out` is written only
    /// when given. Rows of `hidden` elements with [`Self::fuses_norm_fp8`].
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm_fp8_rows(
        &self,
        out: Option<u64>,
        (q, q_scales): (u64, u64),
        x: u64,
        residual: Option<u64>,
        weight: u64,
        n: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        debug_assert!(Self::fuses_norm_fp8(hidden));
        let h = hidden as i32;
        let out = out.unwrap_or(0);
        let mut b = match residual {
            None => self.launch(&self.rms_norm_fp8_rows),
            Some(_) => self.launch(&self.rms_norm_residual_fp8_rows),
        };
        b.arg(&out).arg(&x);
        if let Some(r) = &residual {
            b.arg(r);
        }
        b.arg(&weight).arg(&h).arg(&eps).arg(&q).arg(&q_scales);
        // SAFETY: as rms_norm.cu documents: out (or null) and x hold n rows of hidden elements,
        // q n x hidden bytes, q_scales n f32; hidden a multiple of 8 of at most one piece a
        // thread of norm_threads.
        unsafe { b.launch(grid_rows(n, Self::norm_threads(hidden))) }
            .map(drop)
            .map_err(launch_err("rms_norm_fp8_rows"))
    }

    /// Whether [`Self::silu_mul_fp8_rows`] takes rows of `d` elements: a multiple of 8 whose
    /// row fits the shared memory the kernel is given ([`SILU_FP8_MAX_ROW_BYTES`]).
    pub fn fuses_silu_fp8(d: usize) -> bool {
        d.is_multiple_of(8) && d * ELEM <= SILU_FP8_MAX_ROW_BYTES
    }

    /// [`Self::silu_mul`] with each output row quantized to FP8 E4M3 bytes at `q`, one f32
    /// scale a row at `q_scales` (as [`Self::fp8_quantize_rows`] would); the dtype output `out`
    /// written only when given. Rows of `d` elements with [`Self::fuses_silu_fp8`].
    pub fn silu_mul_fp8_rows(
        &self,
        out: Option<u64>,
        (q, q_scales): (u64, u64),
        gate_up: u64,
        n: usize,
        d: usize,
    ) -> Result<()> {
        debug_assert!(Self::fuses_silu_fp8(d));
        let cfg = LaunchConfig {
            shared_mem_bytes: (d * ELEM) as u32,
            ..grid_rows(n, 256)
        };
        let out = out.unwrap_or(0);
        let dw = d as i32;
        let mut b = self.launch(&self.silu_mul_fp8_rows);
        b.arg(&out).arg(&q).arg(&q_scales).arg(&gate_up).arg(&dw);
        // SAFETY: as silu_mul.cu documents: gate_up holds n rows of 2 d elements, out (or null)
        // n x d elements, q n x d bytes, q_scales n f32; d a multiple of 8 whose row of the
        // dtype fits the shared memory given (at most the limit set at load).
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("silu_mul_fp8_rows"))
    }

    /// Rotates the queries in place and writes the rotated keys and the values to the cache at
    /// the slots (rope_kv_write.cu). `qkv` is `[n, stride]`: queries, keys, values per token.
    pub fn rope_kv_write(&self, a: &RopeKvWrite) -> Result<()> {
        // Work items of a token: 8 rotation pairs or 8 values each where the head size is a
        // multiple of 16, else one.
        let per_item = if a.head_dim.is_multiple_of(16) { 8 } else { 1 };
        let items =
            ((a.q_heads + a.kv_heads) * a.head_dim / 2 + a.kv_heads * a.head_dim) / per_item;
        let cfg = LaunchConfig {
            grid_dim: (a.n as u32, items.div_ceil(256 * 4).max(1) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (qh, kh, hd, st) = (
            a.q_heads as i32,
            a.kv_heads as i32,
            a.head_dim as i32,
            a.stride as i32,
        );
        let mut b = self.launch(&self.rope_kv_write);
        b.arg(&a.qkv)
            .arg(&a.cache.key)
            .arg(&a.cache.value)
            .arg(&a.slots)
            .arg(&a.positions)
            .arg(&a.cos)
            .arg(&a.sin)
            .arg(&qh)
            .arg(&kh)
            .arg(&hd)
            .arg(&st)
            .arg(&a.cache.k_scale)
            .arg(&a.cache.v_scale);
        // SAFETY: as rope_kv_write.cu documents; the caller sizes the buffers.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("rope_kv_write"))
    }

    pub fn silu_mul(&self, out: u64, gate_up: u64, n: usize, d: usize) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (n as u32, d.div_ceil(256 * 8).max(1) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let d = d as i32;
        let mut b = self.launch(&self.silu_mul);
        b.arg(&out).arg(&gate_up).arg(&d);
        // SAFETY: as silu_mul.cu documents.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("silu_mul"))
    }

    /// `table[index] = value` for each `(index, value)` pair of `updates` (`count` pairs of
    /// i32, elementwise.cu's set_entries).
    pub fn set_entries(&self, table: u64, updates: u64, count: usize) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        let n = count as i32;
        let mut b = self.launch(&self.set_entries);
        b.arg(&table).arg(&updates).arg(&n);
        // SAFETY: as elementwise.cu documents; every index is inside the table (the caller's
        // contract) and the updates hold `count` pairs.
        unsafe { b.launch(grid_rows(count.div_ceil(256), 256)) }
            .map(drop)
            .map_err(launch_err("set_entries"))
    }

    /// `p.y = p.x p.w^T` by the batch-invariant tensor-core kernel (gemm_bi.cu): the same
    /// tiling and summation order for every row count. `p.k` must be a multiple of 8.
    pub fn gemm_bi(&self, p: &Product) -> Result<()> {
        let Product {
            y,
            x,
            w,
            rows,
            n_out,
            k,
            ..
        } = *p;
        if rows == 0 {
            return Ok(());
        }
        debug_assert!(k.is_multiple_of(8));
        let cfg = LaunchConfig {
            grid_dim: (n_out.div_ceil(64) as u32, rows.div_ceil(64) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rw, nw, kw) = (rows as i32, n_out as i32, k as i32);
        let mut b = self.launch(&self.gemm_bi);
        b.arg(&y).arg(&x).arg(&w).arg(&rw).arg(&nw).arg(&kw);
        // SAFETY: as gemm_bi.cu documents: y holds rows x n_out, x rows x k and w n_out x k
        // elements (the caller's buffers), 16-byte aligned with k a multiple of 8.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("gemm_bi"))
    }

    pub fn add_bias(&self, x: u64, bias: u64, n: usize, d: usize) -> Result<()> {
        let d = d as i32;
        let mut b = self.launch(&self.add_bias);
        b.arg(&x).arg(&bias).arg(&d);
        // SAFETY: as elementwise.cu documents.
        unsafe { b.launch(grid_rows(n, 256)) }
            .map(drop)
            .map_err(launch_err("add_bias"))
    }

    pub fn gather_rows(&self, out: u64, x: u64, row_ids: u64, n: usize, d: usize) -> Result<()> {
        let d = d as i32;
        let mut b = self.launch(&self.gather_rows);
        b.arg(&out).arg(&x).arg(&row_ids).arg(&d);
        // SAFETY: as elementwise.cu documents.
        unsafe { b.launch(grid_rows(n, 256)) }
            .map(drop)
            .map_err(launch_err("gather_rows"))
    }

    pub fn fill_uniform(&self, out: u64, n: usize, seed: u64, low: f32, high: f32) -> Result<()> {
        let count = n as i64;
        let blocks = n.div_ceil(256).clamp(1, 65_536);
        let mut b = self.launch(&self.fill_uniform);
        b.arg(&out).arg(&count).arg(&seed).arg(&low).arg(&high);
        // SAFETY: as elementwise.cu documents.
        unsafe { b.launch(grid_rows(blocks, 256)) }
            .map(drop)
            .map_err(launch_err("fill_uniform"))
    }
}

/// One linear layer's product `y[rows, n_out] = x[rows, k] w[n_out, k]^T`, in the activation
/// dtype, row-major, `w` in PyTorch's Linear layout (device addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    pub y: u64,
    pub x: u64,
    pub w: u64,
    pub rows: usize,
    pub n_out: usize,
    pub k: usize,
    /// `w` is FP8 E4M3 (`--quantization fp8`): its scale and the activations' scratch.
    pub fp8: Option<Fp8Operands>,
    /// `w` is 4-bit words (an AWQ/GPTQ checkpoint, `int4.rs`): its groups and scratch.
    pub int4: Option<Int4Operands>,
}

/// The arguments of [`Kernels::rope_kv_write`]: device addresses and sizes.
#[derive(Debug, Clone, Copy)]
pub struct RopeKvWrite {
    /// `[n, stride]`: queries, then keys, then values of each token.
    pub qkv: u64,
    /// This layer's cache, written at the slots.
    pub cache: CacheLayer,
    /// i64 `[n]`, negative to skip.
    pub slots: u64,
    /// i32 `[n]`.
    pub positions: u64,
    /// f32 `[max_pos, head_dim / 2]` each.
    pub cos: u64,
    pub sin: u64,
    pub n: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub stride: usize,
}

/// Where an embedding's token ids come from: `ids` (u32 a row), except rows whose `feed` entry
/// (i32 a row; 0: no feed array) names a row of `fed`, the previous step's sampled tokens
/// still on the device.
#[derive(Debug, Clone, Copy)]
pub struct Fed {
    pub ids: u64,
    pub feed: u64,
    pub fed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_fp8_norm_and_silu_take_the_rows_their_kernels_hold() {
        assert!(Kernels::fuses_norm_fp8(4096) && Kernels::fuses_norm_fp8(8192));
        assert!(!Kernels::fuses_norm_fp8(8200) && !Kernels::fuses_norm_fp8(4100));
        assert!(Kernels::fuses_silu_fp8(14336) && Kernels::fuses_silu_fp8(32768));
        assert!(!Kernels::fuses_silu_fp8(32776) && !Kernels::fuses_silu_fp8(14340));
    }

    #[test]
    fn rows_up_to_8192_elements_take_the_narrow_norm() {
        for hidden in [576, 2048, 4096, 5120, 8192] {
            assert!(Kernels::narrow_norm(hidden), "{hidden}");
        }
        // Longer rows, and rows the 16-byte path cannot take, run the wide kernels.
        for hidden in [8200, 16384, 1001] {
            assert!(!Kernels::narrow_norm(hidden), "{hidden}");
        }
    }

    #[test]
    fn every_kernel_of_an_fp8_kv_cache_is_listed_for_both_dtypes() {
        let fp8 = kv_entry(KvCacheDtype::Fp8E4M3);
        let mut bases = vec![
            MmaShape::NARROW.entry(64, fp8),
            MmaShape::NARROW.entry(128, fp8),
            MmaShape::WIDE.entry(128, fp8),
            MmaShape::HOPPER_FP8.entry(128, fp8),
        ];
        for base in [
            "rope_kv_write",
            "paged_attention_hd64",
            "paged_attention_hd128",
            "paged_attention_decode_mma_hd64",
            "paged_attention_decode_mma_hd128",
        ] {
            bases.push(format!("{base}{fp8}"));
        }
        for hd in [64, 128, 256] {
            bases.push(format!("paged_attention_hd{hd}{fp8}"));
            for g in [4, 8] {
                bases.push(format!("paged_attention_decode_hd{hd}_g{g}{fp8}"));
            }
        }
        for base in bases {
            for dtype in [Dtype::Bf16, Dtype::F16] {
                let name = entry_point(&base, dtype.kernel_dtype());
                assert!(
                    tpserve_kernels::KERNELS
                        .iter()
                        .any(|(_, entries)| entries.contains(&name.as_str())),
                    "{name} is not listed"
                );
            }
        }
    }
}
