//! The CUDA C kernels of `tpserve-kernels`, compiled for this GPU (through the on-disk PTX
//! cache), loaded for one activation dtype, with one typed launch method per kernel. Each
//! method's arguments follow the kernel's comment block in `kernels/cuda/*.cu`; pointers are raw
//! device addresses.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};
use tpserve_kernels::{entry_point, CompileConfig, Compiler, KernelDtype, PtxCache, SOURCES};
use tpserve_term::progress::{Task, Unit};

use super::device::{device_err, DeviceBuffer, Gpu};
use super::fp8::Fp8Operands;
use super::gemv::GemvFamily;
use super::int4::Int4Operands;
use super::launch::{programmatic_launches, KernelLaunch};
use crate::error::{Result, WorkerError};
use crate::kv_cache_dtype::KvCacheDtype;
use crate::sampler::logprobs::MAX_TOP_LOGPROBS;

/// The activation dtype on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F16,
}

impl Dtype {
    /// Parses a `--dtype` value; `auto` is bfloat16.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "" | "auto" | "bfloat16" | "bf16" => Ok(Self::Bf16),
            "float16" | "half" | "fp16" => Ok(Self::F16),
            other => Err(WorkerError::Device {
                detail: format!("the CUDA backend computes in bfloat16 or float16, not {other:?}"),
            }),
        }
    }

    /// The dtype's name as `--dtype` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// The checkpoint dtype whose bytes are this dtype's.
    pub fn stored(self) -> tpserve_modelfile::StoredDtype {
        match self {
            Self::Bf16 => tpserve_modelfile::StoredDtype::Bf16,
            Self::F16 => tpserve_modelfile::StoredDtype::F16,
        }
    }

    /// Rounds an f32 to this dtype's bits.
    pub fn from_f32(self, x: f32) -> u16 {
        match self {
            Self::Bf16 => half::bf16::from_f32(x).to_bits(),
            Self::F16 => half::f16::from_f32(x).to_bits(),
        }
    }

    /// The f32 value of this dtype's bits.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            Self::Bf16 => half::bf16::from_bits(bits).to_f32(),
            Self::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }

    fn kernel_dtype(self) -> KernelDtype {
        match self {
            Self::Bf16 => KernelDtype::Bf16,
            Self::F16 => KernelDtype::F16,
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        ELEM
    }

    /// cuBLAS's name for it.
    pub fn cublas(self) -> cudarc::cublas::sys::cudaDataType_t {
        match self {
            Self::Bf16 => cudarc::cublas::sys::cudaDataType_t::CUDA_R_16BF,
            Self::F16 => cudarc::cublas::sys::cudaDataType_t::CUDA_R_16F,
        }
    }

    /// NCCL's name for it.
    pub fn nccl(self) -> cudarc::nccl::sys::ncclDataType_t {
        match self {
            Self::Bf16 => cudarc::nccl::sys::ncclDataType_t::ncclBfloat16,
            Self::F16 => cudarc::nccl::sys::ncclDataType_t::ncclFloat16,
        }
    }
}

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

/// Input elements per split of lora.cu's shrink (`TPSERVE_LORA_SPLIT_LEN`: 256 per warp of its
/// block): a product with `k` inputs runs `ceil(k / LORA_SPLIT_LEN)` splits side by side.
pub const LORA_SPLIT_LEN: usize = 2048;

/// Rows of one LoRA tile (lora.cu's `TPSERVE_LORA_TILE_ROWS`).
pub const LORA_TILE_ROWS: usize = 8;

/// Where a LoRA tile holds its adapter's rank (lora.cu's `TPSERVE_LORA_TILE_RANK`).
pub const LORA_TILE_RANK: usize = 10;

/// The largest LoRA rank the CUDA kernels take: the expand keeps a tile's shrunk rows of the
/// widest product (3 x rank f32 each) in the default 48 KiB of shared memory.
pub const LORA_MAX_RANK: usize = 256;

/// One fused product's LoRA delta (lora.cu): `y[rows, n_out] += (x[rows, k] A^T) B^T`, A and B
/// of each row's slot, over the LoRA tiles at `tiles`.
#[derive(Debug, Clone, Copy)]
pub struct LoraProduct {
    pub y: u64,
    pub x: u64,
    /// Rows of `y` and `x` (the step's, padded for a graph).
    pub rows: usize,
    /// f32 scratch `[splits, rows, groups * stride]`.
    pub t: u64,
    /// `[slots, groups * stride, k]` and `[slots, n_out, stride]`.
    pub a: u64,
    pub b: u64,
    pub tiles: u64,
    pub num_tiles: usize,
    pub k: usize,
    pub n_out: usize,
    /// Projections stacked in the product (3 for q|k|v, 2 for gate|up, else 1).
    pub groups: usize,
    /// The rank stride (a multiple of 8).
    pub stride: usize,
    /// Output columns where the second and third projections start (`n_out` when absent).
    pub bounds: (usize, usize),
}

/// all_reduce.cu's limits: threads per block, blocks, ranks, and the bytes of its signal area.
pub const ALL_REDUCE_THREADS: u32 = 512;
pub const ALL_REDUCE_MAX_BLOCKS: usize = 64;
pub const ALL_REDUCE_MAX_RANKS: usize = 8;
pub const ALL_REDUCE_SIGNAL_BYTES: usize = 8192;

/// Bytes per element of the activation dtypes.
pub const ELEM: usize = 2;

/// Threads of the attention kernel's blocks (4 warps), and the (row, head) pairs one block holds.
pub const ATTENTION_THREADS: u32 = 128;
/// Key splits `attention_combine` merges at most (attention.cu's kMaxSplits).
pub const ATTENTION_MAX_SPLITS: usize = 64;
const ATTENTION_MAX_ITEMS: usize = 32;

/// Dynamic shared memory a block gets without opting in.
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// (row, head) items one CUDA-core attention block may hold for a head size: the kernel's limit
/// of 32, fewer where their queries would not fit the default shared memory (15 at head size
/// 256).
pub fn attention_max_items(head_dim: usize) -> usize {
    (1..=ATTENTION_MAX_ITEMS)
        .rev()
        .find(|&items| attention_smem_bytes(head_dim, items) <= DEFAULT_SMEM_LIMIT)
        .unwrap_or(1)
}
/// m-tiles of 16 (row, head) items per warp and keys per shared-memory tile of the tensor-core
/// attention kernel (attention_mma.cu's kMmaMTiles, kMmaKeys).
const ATTENTION_MMA_M_TILES: usize = 2;
const ATTENTION_MMA_KEYS: usize = 64;
/// Keys per shared-memory tile of the Hopper kernel (attention_wgmma.cu's kWgmmaKeys).
const ATTENTION_WGMMA_KEYS: usize = 64;

/// Launch shape of a tensor-core attention entry point: its warps per block, and whether it is
/// attention_wgmma.cu's Hopper kernel (warpgroup products, sm_90a) or attention_mma.cu's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaShape {
    pub warps: usize,
    pub wgmma: bool,
}

impl MmaShape {
    /// 4 warps: every head size, every GPU.
    pub const NARROW: Self = Self {
        warps: 4,
        wgmma: false,
    };
    /// 8 warps (`paged_attention_mma_wide_hd128`): head size 128 where a block may take its
    /// shared memory.
    pub const WIDE: Self = Self {
        warps: 8,
        wgmma: false,
    };
    /// 4 warpgroups (`paged_attention_wgmma_hd128`): head size 128 on sm_90a, a cache in the
    /// compute dtype.
    pub const HOPPER: Self = Self {
        warps: 16,
        wgmma: true,
    };

    /// (row, head) items of one block: 16 per m-tile, or 64 per warpgroup.
    pub fn items(self) -> usize {
        if self.wgmma {
            16 * self.warps
        } else {
            16 * ATTENTION_MMA_M_TILES * self.warps
        }
    }

    /// Dynamic shared memory of one block. attention_mma.cu's paged_attention_mma_smem_bytes:
    /// Q of its items and one K and one V tile, rows padded by 8 elements, and the cache slots
    /// of two key tiles; attention_wgmma.cu's paged_attention_wgmma_smem_bytes: Q and two K and
    /// two V tiles, unpadded, and 1 KiB to align them.
    pub fn smem_bytes(self, head_dim: usize) -> usize {
        if self.wgmma {
            (self.items() + 4 * ATTENTION_WGMMA_KEYS) * head_dim * ELEM + 1024
        } else {
            (self.items() + 2 * ATTENTION_MMA_KEYS) * (head_dim + 8) * ELEM
                + 2 * ATTENTION_MMA_KEYS * 8
        }
    }

    /// The entry point's base name at `head_dim` (attention_mma.cu's WIDTH: `_` or `_wide_`)
    /// for a cache whose entry points carry `kv` (`kv_entry`).
    fn entry(self, head_dim: usize, kv: &str) -> String {
        if self.wgmma {
            return format!("paged_attention_wgmma_hd{head_dim}{kv}");
        }
        let width = if self == Self::WIDE { "_wide_" } else { "_" };
        format!("paged_attention_mma{width}hd{head_dim}{kv}")
    }

    /// The shape for head size 128 on a GPU of NVRTC architecture `arch` that gives a block at
    /// most `smem_optin` bytes of shared memory, for a cache of `kv`: the Hopper kernel on
    /// sm_90a with a cache in the compute dtype; else the wide one where it fits (sm_80, sm_90),
    /// the narrow one elsewhere (sm_86, sm_89 and sm_120).
    pub fn for_hd128(arch: &str, smem_optin: usize, kv: KvCacheDtype) -> Self {
        if arch == "sm_90a" && kv == KvCacheDtype::Compute {
            Self::HOPPER
        } else if Self::WIDE.smem_bytes(128) <= smem_optin {
            Self::WIDE
        } else {
            Self::NARROW
        }
    }
}

/// The tensor-core decode attention (attention_decode_mma.cu): warps per block, keys per chunk,
/// chunks in flight per warp (kDecodeMmaStages) and (row, head) items per block (the products'
/// M: a tile's rows times the query heads per KV head).
const DECODE_MMA_WARPS: usize = 4;
const DECODE_MMA_KEYS: usize = 16;
const DECODE_MMA_STAGES: usize = 2;
const DECODE_MMA_ITEMS: usize = 16;

/// Dynamic shared memory of one tensor-core decode attention block for a cache of `kv`
/// (attention_decode_mma.cu's DecodeMmaSmem): Q of 16 items, then per warp its stages of K and
/// V chunks (rows padded by 8 elements, or unpadded E4M3 bytes plus one converted chunk of each),
/// or after the loop the warps' f32 partial outputs, whichever is larger.
pub fn decode_mma_smem_bytes(head_dim: usize, kv: KvCacheDtype) -> usize {
    let t_chunk = DECODE_MMA_KEYS * (head_dim + 8) * ELEM;
    let (raw_chunk, converted) = match kv {
        KvCacheDtype::Compute => (t_chunk, 0),
        KvCacheDtype::Fp8E4M3 => (DECODE_MMA_KEYS * head_dim, 2 * t_chunk),
    };
    let per_warp = DECODE_MMA_STAGES * 2 * raw_chunk + converted;
    let q = DECODE_MMA_ITEMS * (head_dim + 8) * ELEM;
    let merge = DECODE_MMA_WARPS * DECODE_MMA_ITEMS * (head_dim + 2) * 4;
    (q + DECODE_MMA_WARPS * per_warp).max(merge)
}

/// A tensor-core decode attention entry point and its dynamic shared memory.
struct DecodeMmaKernel {
    f: CudaFunction,
    smem: usize,
}

/// Takes the tensor-core decode attention entry point at `head_dim` for a cache of `kv` and
/// raises its dynamic shared memory limit to what one block uses.
fn take_decode_mma(
    take: &mut impl FnMut(&str) -> Result<CudaFunction>,
    head_dim: usize,
    kv: KvCacheDtype,
) -> Result<DecodeMmaKernel> {
    let base = format!("paged_attention_decode_mma_hd{head_dim}{}", kv_entry(kv));
    let f = take(&base)?;
    let smem = decode_mma_smem_bytes(head_dim, kv);
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .map_err(|e| device_err(&format!("raising {base}'s shared memory limit"), e))?;
    Ok(DecodeMmaKernel { f, smem })
}

/// A tensor-core attention entry point and its launch shape.
#[derive(Debug)]
struct MmaKernel {
    f: CudaFunction,
    shape: MmaShape,
}

/// Shared memory of one attention block for `items` (row, head) pairs.
pub fn attention_smem_bytes(head_dim: usize, items: usize) -> usize {
    items * head_dim * 4 + 32 * (head_dim + 2) * ELEM + 32 * head_dim * ELEM
}

/// Every kernel, loaded for one dtype.
pub struct Kernels {
    stream: std::sync::Arc<CudaStream>,
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
    /// 4-bit weights (`int4.rs`).
    pub(super) gemv_w4: CudaFunction,
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

/// Takes the tensor-core attention entry point of `shape` at `head_dim` and raises its dynamic
/// shared memory limit to what one block uses (above the 48 KiB a kernel gets without opting in).
fn take_mma(
    take: &mut impl FnMut(&str) -> Result<CudaFunction>,
    head_dim: usize,
    shape: MmaShape,
    kv: &str,
) -> Result<MmaKernel> {
    let base = shape.entry(head_dim, kv);
    let f = take(&base)?;
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shape.smem_bytes(head_dim) as i32,
    )
    .map_err(|e| device_err(&format!("raising {base}'s shared memory limit"), e))?;
    Ok(MmaKernel { f, shape })
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
            attention_mma_hd128: take_mma(
                &mut take,
                128,
                MmaShape::for_hd128(&gpu.arch, gpu.smem_per_block_optin, kv_dtype),
                kv,
            )?,
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
            gemv_w4: take("gemv_w4")?,
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
        KernelLaunch::new(&self.stream, function, self.programmatic)
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

    /// The one-shot all-reduce over peer memory (all_reduce.cu): `buf`'s `bytes` bytes summed over
    /// the `world` ranks whose exchange buffers `peers` (a device array of `world` addresses)
    /// holds, in place, in `blocks` blocks (the same on every rank).
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_one_shot(
        &self,
        buf: u64,
        bytes: usize,
        peers: u64,
        slot_bytes: usize,
        rank: usize,
        world: usize,
        blocks: usize,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (ALL_REDUCE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_vec, cap) = ((bytes / 16) as i32, slot_bytes as i64);
        let (rank, world) = (rank as i32, world as i32);
        let mut b = self.launch(&self.all_reduce_one_shot);
        b.arg(&buf)
            .arg(&peers)
            .arg(&n_vec)
            .arg(&cap)
            .arg(&rank)
            .arg(&world);
        // SAFETY: as all_reduce.cu documents; the caller checked size, alignment and capacity.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("all_reduce_one_shot"))
    }

    /// The one-shot all-reduce of `sub` fused with `rms_norm_residual` (all_reduce.cu):
    /// `x += sum over ranks of sub; out = rmsnorm(x) * weight` for `n` rows, bit-identical to
    /// the two in sequence.
    #[allow(clippy::too_many_arguments)]
    pub fn all_reduce_residual_norm(
        &self,
        norm: &ResidualNorm,
        peers: u64,
        slot_bytes: usize,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (norm.n.min(ALL_REDUCE_MAX_BLOCKS) as u32, 1, 1),
            block_dim: (Self::norm_threads(norm.hidden), 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, rows, cap) = (norm.hidden as i32, norm.n as i32, slot_bytes as i64);
        let (rank, world) = (rank as i32, world as i32);
        let mut b = self.launch(&self.all_reduce_residual_norm);
        b.arg(&norm.out)
            .arg(&norm.x)
            .arg(&norm.sub)
            .arg(&norm.weight)
            .arg(&h)
            .arg(&norm.eps)
            .arg(&rows)
            .arg(&peers)
            .arg(&cap)
            .arg(&rank)
            .arg(&world);
        // SAFETY: as all_reduce.cu documents; the caller checked size, alignment and capacity.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("all_reduce_residual_norm"))
    }

    /// The batched LoRA delta of one fused product (lora.cu): `lora_shrink` into `t`, then
    /// `lora_expand` into `y`, over `num_tiles` LoRA tiles.
    pub fn lora_delta(&self, p: &LoraProduct) -> Result<()> {
        // lora.cu's TPSERVE_LORA_SHRINK_OUTS and _WARPS, and threads and columns per thread of
        // the expand (TPSERVE_LORA_EXPAND_COLS).
        const SHRINK_OUTS: usize = 8;
        const SHRINK_THREADS: u32 = 32 * 8;
        const EXPAND_THREADS: u32 = 256;
        const EXPAND_COLS: usize = 2;
        if p.num_tiles == 0 {
            return Ok(());
        }
        let tiles = p.num_tiles as u32;
        let width = p.groups * p.stride;
        let splits = p.k.div_ceil(LORA_SPLIT_LEN);
        let (k, r, g) = (p.k as i32, p.stride as i32, p.groups as i32);
        let tokens = p.rows as i32;
        let cfg = LaunchConfig {
            grid_dim: (tiles, width.div_ceil(SHRINK_OUTS) as u32, splits as u32),
            block_dim: (SHRINK_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.launch(&self.lora_shrink);
        b.arg(&p.t)
            .arg(&p.x)
            .arg(&p.a)
            .arg(&p.tiles)
            .arg(&k)
            .arg(&r)
            .arg(&g)
            .arg(&tokens);
        // SAFETY: as lora.cu documents: `t` holds `splits` x `rows` rows of `groups * stride`
        // f32, `x` `rows` rows of `k` elements, `a` every slot.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("lora_shrink"))?;
        let cfg = LaunchConfig {
            grid_dim: (
                tiles,
                p.n_out.div_ceil(EXPAND_THREADS as usize * EXPAND_COLS) as u32,
                1,
            ),
            block_dim: (EXPAND_THREADS, 1, 1),
            shared_mem_bytes: (LORA_TILE_ROWS * width * 4) as u32,
        };
        let (out, b1, b2) = (p.n_out as i32, p.bounds.0 as i32, p.bounds.1 as i32);
        let splits = splits as i32;
        let mut b = self.launch(&self.lora_expand);
        b.arg(&p.y)
            .arg(&p.t)
            .arg(&p.b)
            .arg(&p.tiles)
            .arg(&out)
            .arg(&r)
            .arg(&g)
            .arg(&b1)
            .arg(&b2)
            .arg(&splits)
            .arg(&tokens);
        // SAFETY: as lora.cu documents: `y` holds `rows` rows of `n_out` elements, `b` every
        // slot's `[n_out, stride]`.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("lora_expand"))
    }

    /// Whether the tensor-core attention kernel exists for this head size.
    pub fn has_mma_attention(head_dim: usize) -> bool {
        matches!(head_dim, 64 | 128)
    }

    /// The tensor-core attention entry point for a head size.
    fn mma_attention(&self, head_dim: usize) -> Result<&MmaKernel> {
        match head_dim {
            64 => Ok(&self.attention_mma_hd64),
            128 => Ok(&self.attention_mma_hd128),
            hd => Err(WorkerError::Unsupported {
                detail: format!("head size {hd} on tensor-core attention (64 and 128)"),
            }),
        }
    }

    /// (row, head) items of one tensor-core attention block at this head size (0 where the
    /// kernel does not exist).
    pub fn attention_mma_items(&self, head_dim: usize) -> usize {
        self.mma_attention(head_dim).map_or(0, |k| k.shape.items())
    }

    /// Tensor-core paged attention (prefill): tiles of at most `attention_mma_items` (row, head)
    /// items, no key splits; the entry point's shared memory per block, dynamic.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_mma(
        &self,
        out: u64,
        q: u64,
        cache: &CacheLayer,
        block_tables: u64,
        tiles: u64,
        num_tiles: usize,
        shape: &AttentionShape,
    ) -> Result<()> {
        let k = self.mma_attention(shape.head_dim)?;
        let cfg = LaunchConfig {
            // Heads fastest: blocks start in the tiles' order (most keys first).
            grid_dim: (shape.kv_heads as u32, num_tiles as u32, 1),
            block_dim: (32 * k.shape.warps as u32, 1, 1),
            shared_mem_bytes: k.shape.smem_bytes(shape.head_dim) as u32,
        };
        // The split buffers are not read with one split.
        let unused = 0u64;
        self.launch_attention(
            &k.f,
            cfg,
            [out, unused, unused, q],
            cache,
            [block_tables, tiles],
            shape,
            (1, 0),
        )
        .map_err(launch_err("paged_attention_mma"))
    }

    /// Launches either attention kernel: their arguments are the same.
    #[allow(clippy::too_many_arguments)]
    fn launch_attention(
        &self,
        f: &CudaFunction,
        cfg: LaunchConfig,
        outputs_and_q: [u64; 4],
        cache: &CacheLayer,
        tables_and_tiles: [u64; 2],
        shape: &AttentionShape,
        (num_splits, split_len): (usize, usize),
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        let (nq, nkv, bs, mbps, qs, ns, sl) = (
            shape.q_heads as i32,
            shape.kv_heads as i32,
            shape.block_size as i32,
            shape.max_blocks_per_seq as i32,
            shape.q_stride as i32,
            num_splits as i32,
            split_len as i32,
        );
        let scale = shape.scale;
        let mut b = self.launch(f);
        for p in &outputs_and_q {
            b.arg(p);
        }
        b.arg(&cache.key).arg(&cache.value);
        for p in &tables_and_tiles {
            b.arg(p);
        }
        b.arg(&nq)
            .arg(&nkv)
            .arg(&bs)
            .arg(&mbps)
            .arg(&qs)
            .arg(&ns)
            .arg(&sl)
            .arg(&scale)
            .arg(&cache.k_scale)
            .arg(&cache.v_scale);
        // SAFETY: the attention kernels launched here (paged_attention, paged_attention_mma,
        // paged_attention_wgmma, paged_attention_decode_mma) take (out, partial_out,
        // partial_ml, q, key_cache, value_cache, block_tables, tiles, num_q_heads,
        // num_kv_heads, block_size, max_blocks_per_seq, q_stride, num_splits, split_len, scale,
        // k_scale, v_scale) as attention.cu documents, the caches of the element the entry
        // points were loaded for; the callers size the buffers, keep the tiles within the
        // kernel's item limit and the shared memory under the limit the entry point was given.
        unsafe { b.launch(cfg) }.map(drop)
    }

    /// Paged attention over `num_tiles` tiles; `items` is the largest rows x group of a tile.
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention(
        &self,
        out: u64,
        partial_out: u64,
        partial_ml: u64,
        q: u64,
        cache: &CacheLayer,
        block_tables: u64,
        tiles: u64,
        num_tiles: usize,
        items: usize,
        shape: &AttentionShape,
        num_splits: usize,
        split_len: usize,
    ) -> Result<()> {
        let f = match shape.head_dim {
            64 => &self.attention_hd64,
            128 => &self.attention_hd128,
            256 => &self.attention_hd256,
            hd => {
                return Err(WorkerError::Unsupported {
                    detail: format!("head size {hd} (the CUDA backend has 64, 128 and 256)"),
                })
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (num_tiles as u32, shape.kv_heads as u32, num_splits as u32),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: attention_smem_bytes(shape.head_dim, items) as u32,
        };
        self.launch_attention(
            f,
            cfg,
            [out, partial_out, partial_ml, q],
            cache,
            [block_tables, tiles],
            shape,
            (num_splits, split_len),
        )
        .map_err(launch_err("paged_attention"))
    }

    /// Whether the decode attention kernel exists for this head size and query heads per KV
    /// head.
    pub fn has_decode_attention(head_dim: usize, group: usize) -> bool {
        matches!(head_dim, 64 | 128 | 256) && (1..=8).contains(&group)
    }

    /// Decode attention (attention.cu's paged_attention_decode): tiles of one row each (zero
    /// rows: padding), `num_splits` key splits sized per row on the device (merged afterwards
    /// by `attention_combine`), with RoPE and the new keys' and values' cache write folded in
    /// (no `rope_kv_write` before it).
    pub fn paged_attention_decode(
        &self,
        a: &DecodeAttention,
        shape: &AttentionShape,
    ) -> Result<()> {
        let group = shape.q_heads / shape.kv_heads.max(1);
        let hd = match shape.head_dim {
            64 => 0,
            128 => 1,
            256 => 2,
            hd => {
                return Err(WorkerError::Unsupported {
                    detail: format!("head size {hd} on the decode attention kernel"),
                })
            }
        };
        let g = match group {
            1..=4 => 0,
            5..=8 => 1,
            _ => {
                return Err(WorkerError::Unsupported {
                    detail: format!("{group} query heads per KV head on the decode attention"),
                })
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (
                a.num_tiles as u32,
                shape.kv_heads as u32,
                a.num_splits as u32,
            ),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (nq, nkv, bs, mbps, qs, ns) = (
            shape.q_heads as i32,
            shape.kv_heads as i32,
            shape.block_size as i32,
            shape.max_blocks_per_seq as i32,
            shape.q_stride as i32,
            a.num_splits as i32,
        );
        // Split lengths come from each row's context, on the device.
        let split_len = 0i32;
        let mut b = self.launch(&self.attention_decode[hd][g]);
        b.arg(&a.out)
            .arg(&a.partial_out)
            .arg(&a.partial_ml)
            .arg(&a.qkv)
            .arg(&a.cache.key)
            .arg(&a.cache.value)
            .arg(&a.block_tables)
            .arg(&a.tiles)
            .arg(&a.slots)
            .arg(&a.cos)
            .arg(&a.sin)
            .arg(&nq)
            .arg(&nkv)
            .arg(&bs)
            .arg(&mbps)
            .arg(&qs)
            .arg(&ns)
            .arg(&split_len)
            .arg(&shape.scale)
            .arg(&a.cache.k_scale)
            .arg(&a.cache.v_scale);
        // SAFETY: as attention.cu documents for paged_attention_decode; the caller sizes the
        // buffers (partials for num_tiles x q_heads x splits, at most ATTENTION_MAX_SPLITS).
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("paged_attention_decode"))
    }

    /// Whether the tensor-core decode attention runs this model: head size 64 or 128, at most
    /// 16 query heads per KV head, and cache blocks of a multiple of 16 slots (a chunk of 16
    /// keys lies in one block).
    pub fn has_decode_mma_attention(head_dim: usize, group: usize, block_size: usize) -> bool {
        matches!(head_dim, 64 | 128)
            && (1..=DECODE_MMA_ITEMS).contains(&group)
            && block_size.is_multiple_of(DECODE_MMA_KEYS)
    }

    /// Tensor-core decode attention (attention_decode_mma.cu): tiles of one row each (zero
    /// rows: padding) whose queries `rope_kv_write` has rotated and whose keys and values it has
    /// written, `num_splits` key splits sized per row on the device (merged afterwards by
    /// `attention_combine`).
    #[allow(clippy::too_many_arguments)]
    pub fn paged_attention_decode_mma(
        &self,
        out: u64,
        partial_out: u64,
        partial_ml: u64,
        q: u64,
        cache: &CacheLayer,
        block_tables: u64,
        tiles: u64,
        num_tiles: usize,
        shape: &AttentionShape,
        num_splits: usize,
    ) -> Result<()> {
        let k = match shape.head_dim {
            64 => &self.attention_decode_mma[0],
            128 => &self.attention_decode_mma[1],
            hd => {
                return Err(WorkerError::Unsupported {
                    detail: format!("head size {hd} on the tensor-core decode attention"),
                })
            }
        };
        let cfg = LaunchConfig {
            grid_dim: (num_tiles as u32, shape.kv_heads as u32, num_splits as u32),
            block_dim: ((32 * DECODE_MMA_WARPS) as u32, 1, 1),
            shared_mem_bytes: k.smem as u32,
        };
        // Split lengths come from each row's context, on the device.
        self.launch_attention(
            &k.f,
            cfg,
            [out, partial_out, partial_ml, q],
            cache,
            [block_tables, tiles],
            shape,
            (num_splits, 0),
        )
        .map_err(launch_err("paged_attention_decode_mma"))
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

    pub fn attention_combine(
        &self,
        out: u64,
        partial_out: u64,
        partial_ml: u64,
        n: usize,
        shape: &AttentionShape,
        num_splits: usize,
    ) -> Result<()> {
        if num_splits > ATTENTION_MAX_SPLITS {
            return Err(WorkerError::Unsupported {
                detail: format!(
                    "{num_splits} key splits (attention_combine merges at most \
                     {ATTENTION_MAX_SPLITS})"
                ),
            });
        }
        let (nq, hd, ns) = (
            shape.q_heads as i32,
            shape.head_dim as i32,
            num_splits as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (n as u32, shape.q_heads as u32, 1),
            block_dim: (shape.head_dim as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.launch(&self.attention_combine);
        b.arg(&out)
            .arg(&partial_out)
            .arg(&partial_ml)
            .arg(&nq)
            .arg(&hd)
            .arg(&ns);
        // SAFETY: as attention.cu documents.
        unsafe { b.launch(cfg) }
            .map(drop)
            .map_err(launch_err("attention_combine"))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        out: u64,
        logits: u64,
        num_rows: usize,
        vocab_per_rank: usize,
        vocab: usize,
        params: &SamplingPointers,
    ) -> Result<()> {
        let f = (&self.sample, "sample");
        self.launch_sample(f, out, logits, num_rows, vocab_per_rank, vocab, params)
    }

    /// The edited f32 logits of a step with logit processing (sampling.cu's process_logits).
    pub fn process_logits(&self, a: &ProcessLogits) -> Result<()> {
        let ([stride, vpr, v], words) = (a.logits.shape(), a.words as i32);
        let mut b = self.launch(&self.process_logits);
        b.arg(&a.edited).arg(&a.logits.ptr);
        b.arg(&stride).arg(&vpr).arg(&v);
        b.arg(&a.edit_offsets)
            .arg(&a.edits)
            .arg(&a.mask_index)
            .arg(&a.masks)
            .arg(&words);
        // SAFETY: as sampling.cu documents.
        unsafe { b.launch(grid_rows(a.rows, 1024)) }
            .map(drop)
            .map_err(launch_err("process_logits"))
    }

    /// `sample` over process_logits' f32 rows `[num_rows, vocab]`.
    pub fn sample_processed(
        &self,
        out: u64,
        edited: u64,
        num_rows: usize,
        vocab: usize,
        params: &SamplingPointers,
    ) -> Result<()> {
        let f = (&self.sample_processed, "sample_processed");
        self.launch_sample(f, out, edited, num_rows, vocab, vocab, params)
    }

    /// `sample` or `sample_processed` (the same arguments; sampling.cu).
    #[allow(clippy::too_many_arguments)]
    fn launch_sample(
        &self,
        (function, name): (&CudaFunction, &str),
        out: u64,
        logits: u64,
        num_rows: usize,
        vocab_per_rank: usize,
        vocab: usize,
        params: &SamplingPointers,
    ) -> Result<()> {
        let (nr, vpr, v) = (num_rows as i32, vocab_per_rank as i32, vocab as i32);
        let teams = self.sample_scratch.buffer.ptr;
        let mut b = self.launch(function);
        b.arg(&out)
            .arg(&logits)
            .arg(&nr)
            .arg(&vpr)
            .arg(&v)
            .arg(&params.temperature)
            .arg(&params.top_k)
            .arg(&params.top_p)
            .arg(&params.min_p)
            .arg(&params.seeds)
            .arg(&teams);
        // SAFETY: as sampling.cu documents; the team rows as `SampleScratch::launch_config` says.
        unsafe { b.launch(self.sample_scratch.launch_config(num_rows)) }
            .map(drop)
            .map_err(launch_err(name))
    }

    /// Each row's [`LOGPROB_RECORD`] words: its sampled token and the asked-for log
    /// probabilities of its raw logits (sampling.cu's token_logprobs).
    pub fn token_logprobs(&self, a: &TokenLogprobs) -> Result<()> {
        let [stride, vpr, v] = a.logits.shape();
        let teams = self.sample_scratch.buffer.ptr;
        let mut b = self.launch(&self.token_logprobs);
        b.arg(&a.records).arg(&a.logits.ptr);
        b.arg(&stride).arg(&vpr).arg(&v);
        b.arg(&a.targets).arg(&a.sampled).arg(&a.top_n).arg(&teams);
        // SAFETY: as sampling.cu documents; the team rows as `SampleScratch::launch_config` says.
        unsafe { b.launch(self.sample_scratch.launch_config(a.rows)) }
            .map(drop)
            .map_err(launch_err("token_logprobs"))
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

/// The attention geometry of this rank.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub max_blocks_per_seq: usize,
    pub q_stride: usize,
    pub scale: f32,
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

/// One layer's KV cache as the kernels that read or write it take it: keys and values (device
/// addresses of `[num_blocks, block_size, kv_heads, head_dim]` elements of the cache's dtype,
/// the one the kernels were loaded for) and the scales an FP8 cache divides them by (1 for a
/// cache in the compute dtype).
#[derive(Debug, Clone, Copy)]
pub struct CacheLayer {
    pub key: u64,
    pub value: u64,
    pub k_scale: f32,
    pub v_scale: f32,
}

/// The arguments of [`Kernels::paged_attention_decode`]: device addresses and sizes.
#[derive(Debug, Clone, Copy)]
pub struct DecodeAttention {
    /// `[rows, q_heads * head_dim]`.
    pub out: u64,
    /// f32 partial outputs and (max, sum) pairs of the splits, merged by `attention_combine`.
    pub partial_out: u64,
    pub partial_ml: u64,
    /// `[rows, stride]`: the qkv projection's output before RoPE (the kernel rotates).
    pub qkv: u64,
    /// This layer's cache, written at the rows' slots (the rotated new keys and the values).
    pub cache: CacheLayer,
    pub block_tables: u64,
    pub tiles: u64,
    /// i64 `[rows]`: the rows' cache slots, negative for padding rows.
    pub slots: u64,
    /// f32 `[max_pos, head_dim / 2]` RoPE tables, as [`RopeKvWrite`]'s.
    pub cos: u64,
    pub sin: u64,
    pub num_tiles: usize,
    pub num_splits: usize,
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

/// u32 words of one row's record from `token_logprobs` (sampling.cu's kLogprobRecord): sampled
/// token, scored token, its log probability and rank, then [`MAX_TOP_LOGPROBS`] top tokens and
/// their log probabilities.
pub const LOGPROB_RECORD: usize = 4 + 2 * MAX_TOP_LOGPROBS;

/// Where a step's raw logits lie: `[world][row_stride][vocab_per_rank]`, as `sample` reads them.
#[derive(Debug, Clone, Copy)]
pub struct SpreadLogits {
    pub ptr: u64,
    /// Rows of each rank's slice (a graph's padded batch).
    pub row_stride: usize,
    pub vocab_per_rank: usize,
    pub vocab: usize,
}

impl SpreadLogits {
    /// `row_stride`, `vocab_per_rank` and `vocab` as the kernels take them.
    fn shape(&self) -> [i32; 3] {
        [
            self.row_stride as i32,
            self.vocab_per_rank as i32,
            self.vocab as i32,
        ]
    }
}

/// process_logits' arguments (sampling.cu): `rows` rows of `logits` into `edited`.
#[derive(Debug, Clone, Copy)]
pub struct ProcessLogits {
    pub edited: u64,
    pub logits: SpreadLogits,
    pub rows: usize,
    pub edit_offsets: u64,
    pub edits: u64,
    pub mask_index: u64,
    pub masks: u64,
    pub words: usize,
}

/// token_logprobs' arguments (sampling.cu).
#[derive(Debug, Clone, Copy)]
pub struct TokenLogprobs {
    pub records: u64,
    pub logits: SpreadLogits,
    pub rows: usize,
    pub targets: u64,
    pub sampled: u64,
    pub top_n: u64,
}

/// Blocks that may share one row (sampling.cu's kMaxSampleSplits).
const MAX_SAMPLE_SPLITS: usize = 32;

/// Bytes of one shared row's scratch (sampling.cu's kTeamRowBytes, which it checks against its
/// `TeamRow`): a header of 16, three histograms of 2,048 words, 6 exchanges of 32 slots of 32
/// bytes, and 4,096 candidates of 8 bytes.
const TEAM_ROW_BYTES: usize = 16 + 3 * 2048 * 4 + 6 * MAX_SAMPLE_SPLITS * 32 + 4096 * 8;

/// Blocks sharing each row of a `rows`-row sample launch: the SMs a row would otherwise leave
/// idle (one block of 1,024 threads an SM), at most [`MAX_SAMPLE_SPLITS`]. Where it is above 1,
/// `rows * splits <= sm_count`: the blocks of a shared row wait for each other (sampling.cu's
/// Team), so they must all be resident at once.
pub(super) fn sample_splits(rows: usize, sm_count: usize) -> usize {
    (sm_count / rows.max(1)).clamp(1, MAX_SAMPLE_SPLITS)
}

/// sample_*'s team rows ([`TEAM_ROW_BYTES`] each, for the `sm_count / 2` rows at most that
/// [`sample_splits`] shares), allocated zeroed once and left zero by every launch. One stream
/// runs every launch, so launches never share them at once.
struct SampleScratch {
    buffer: DeviceBuffer,
    sm_count: usize,
}

impl SampleScratch {
    fn new(gpu: &Gpu) -> Result<Self> {
        let sm_count = gpu.sm_count.max(1);
        let rows = (sm_count / 2).max(1);
        Ok(Self {
            buffer: gpu.alloc(rows * TEAM_ROW_BYTES, "sampling scratch")?,
            sm_count,
        })
    }

    /// The launch of a `rows`-row sample_* or token_logprobs_*: [`sample_splits`] blocks of
    /// 1,024 threads a row. Where that is above 1, `rows * splits` blocks fit the SMs at once
    /// and the buffer holds `rows` team rows.
    fn launch_config(&self, rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, sample_splits(rows, self.sm_count) as u32, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        }
    }
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

/// Device addresses of the per-row sampling parameters.
#[derive(Debug, Clone, Copy)]
pub struct SamplingPointers {
    pub temperature: u64,
    pub top_k: u64,
    pub top_p: u64,
    pub min_p: u64,
    pub seeds: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_shared_by_several_sample_blocks_fit_the_scratch() {
        for sm_count in [1, 2, 46, 78, 108, 132, 144] {
            for rows in 0..=300 {
                let splits = sample_splits(rows, sm_count);
                assert!((1..=MAX_SAMPLE_SPLITS).contains(&splits));
                assert!(
                    splits == 1 || (rows * splits <= sm_count && rows <= (sm_count / 2).max(1)),
                    "{rows} rows, {sm_count} SMs"
                );
            }
        }
        assert_eq!(sample_splits(1, 132), 32);
        assert_eq!(sample_splits(8, 132), 16);
        assert_eq!(sample_splits(64, 132), 2);
        assert_eq!(sample_splits(256, 132), 1);
    }

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
    fn attention_tiles_fit_the_default_shared_memory() {
        assert!(attention_smem_bytes(64, ATTENTION_MAX_ITEMS) <= DEFAULT_SMEM_LIMIT);
        assert!(attention_smem_bytes(128, ATTENTION_MAX_ITEMS) <= DEFAULT_SMEM_LIMIT);
        assert!(attention_smem_bytes(256, 15) <= DEFAULT_SMEM_LIMIT);
        // The limits the model tiles by: the kernel's 32 up to head size 128, 15 at 256.
        assert_eq!(attention_max_items(64), 32);
        assert_eq!(attention_max_items(128), 32);
        assert_eq!(attention_max_items(256), 15);
    }

    #[test]
    fn tensor_core_attention_shapes_match_the_kernel_and_fit_the_gpu_they_are_chosen_for() {
        // attention_mma.cu's figures for its entry points.
        assert_eq!(MmaShape::NARROW.items(), 128);
        assert_eq!(MmaShape::WIDE.items(), 256);
        assert_eq!(MmaShape::NARROW.smem_bytes(64), 37_888);
        assert_eq!(MmaShape::NARROW.smem_bytes(128), 70_656);
        assert_eq!(MmaShape::WIDE.smem_bytes(128), 105_472);
        // attention_wgmma.cu's: 4 warpgroups, two K and two V tiles of 64 keys.
        assert_eq!(MmaShape::HOPPER.items(), 256);
        assert_eq!(MmaShape::HOPPER.smem_bytes(128), 132_096);
        // Opt-in shared memory per block: sm_90 227 KiB, sm_80 163 KiB, sm_86/sm_89 99 KiB.
        let (bf16, fp8) = (KvCacheDtype::Compute, KvCacheDtype::Fp8E4M3);
        assert_eq!(
            MmaShape::for_hd128("sm_90a", 232_448, bf16),
            MmaShape::HOPPER
        );
        assert_eq!(MmaShape::for_hd128("sm_90a", 232_448, fp8), MmaShape::WIDE);
        assert_eq!(MmaShape::for_hd128("sm_80", 166_912, bf16), MmaShape::WIDE);
        assert_eq!(
            MmaShape::for_hd128("sm_89", 101_376, bf16),
            MmaShape::NARROW
        );
        assert!(MmaShape::NARROW.smem_bytes(128) <= 101_376);
        assert!(MmaShape::HOPPER.smem_bytes(128) <= 232_448);
        // The names kernels/src/sources.rs lists for attention_mma.cu.
        let kv = kv_entry(KvCacheDtype::Compute);
        assert_eq!(MmaShape::NARROW.entry(64, kv), "paged_attention_mma_hd64");
        assert_eq!(MmaShape::NARROW.entry(128, kv), "paged_attention_mma_hd128");
        assert_eq!(
            MmaShape::WIDE.entry(128, kv),
            "paged_attention_mma_wide_hd128"
        );
        assert_eq!(
            MmaShape::HOPPER.entry(128, kv),
            "paged_attention_wgmma_hd128"
        );
    }

    #[test]
    fn decode_mma_shared_memory_matches_the_kernel_files_figures() {
        // attention_decode_mma.cu's comment on paged_attention_decode_mma_smem_bytes.
        assert_eq!(decode_mma_smem_bytes(128, KvCacheDtype::Compute), 73_984);
        assert_eq!(decode_mma_smem_bytes(64, KvCacheDtype::Compute), 39_168);
        assert_eq!(decode_mma_smem_bytes(128, KvCacheDtype::Fp8E4M3), 71_936);
        assert_eq!(decode_mma_smem_bytes(64, KvCacheDtype::Fp8E4M3), 37_120);
        assert!(Kernels::has_decode_mma_attention(128, 4, 16));
        assert!(
            !Kernels::has_decode_mma_attention(128, 4, 8),
            "a chunk spans blocks"
        );
        assert!(!Kernels::has_decode_mma_attention(256, 4, 16));
        assert!(!Kernels::has_decode_mma_attention(128, 32, 16));
    }

    #[test]
    fn every_kernel_of_an_fp8_kv_cache_is_listed_for_both_dtypes() {
        let fp8 = kv_entry(KvCacheDtype::Fp8E4M3);
        let mut bases = vec![
            MmaShape::NARROW.entry(64, fp8),
            MmaShape::NARROW.entry(128, fp8),
            MmaShape::WIDE.entry(128, fp8),
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

    #[test]
    fn dtypes_round_trip_and_parse() {
        assert_eq!(Dtype::parse("auto").unwrap(), Dtype::Bf16);
        assert_eq!(Dtype::parse("float16").unwrap(), Dtype::F16);
        assert!(Dtype::parse("float32").is_err());
        for d in [Dtype::Bf16, Dtype::F16] {
            assert_eq!(d.to_f32(d.from_f32(1.5)), 1.5);
        }
    }
}
