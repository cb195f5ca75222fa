//! The paged attention kernels (prefill on CUDA or tensor cores, decode with key splits and
//! their merge): launch shapes, shared memory and launches.

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig};

use super::{kv_entry, launch_err, Kernels, Lane, ELEM};
use crate::cuda::device::device_err;
use crate::error::{Result, WorkerError};
use crate::kv_cache_dtype::KvCacheDtype;

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
/// Keys per shared-memory tile of the Hopper kernel and the stages of its ring of K and V tiles,
/// for a cache in the dtype and in FP8 (attention_wgmma.cu's kWgmmaKeys, kWgmmaStages,
/// kWgmmaFp8Stages).
const ATTENTION_WGMMA_KEYS: usize = 64;
const ATTENTION_WGMMA_STAGES: usize = 4;
const ATTENTION_WGMMA_FP8_STAGES: usize = 3;

/// Launch shape of a tensor-core attention entry point: its warps per block, whether it is
/// attention_wgmma.cu's Hopper kernel (warpgroup products, sm_90a) or attention_mma.cu's, and
/// for the Hopper kernel whether it is the instance for an FP8 cache (its shared memory differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmaShape {
    pub warps: usize,
    pub wgmma: bool,
    pub fp8_cache: bool,
}

impl MmaShape {
    /// 4 warps: every head size, every GPU.
    pub const NARROW: Self = Self {
        warps: 4,
        wgmma: false,
        fp8_cache: false,
    };
    /// 8 warps (`paged_attention_mma_wide_hd128`): head size 128 where a block may take its
    /// shared memory.
    pub const WIDE: Self = Self {
        warps: 8,
        wgmma: false,
        fp8_cache: false,
    };
    /// 4 warpgroups (`paged_attention_wgmma_hd128`): head size 128 on sm_90a, a cache in the
    /// compute dtype.
    pub const HOPPER: Self = Self {
        warps: 16,
        wgmma: true,
        fp8_cache: false,
    };
    /// The same for an FP8 cache (`paged_attention_wgmma_hd128_fp8kv`: its tiles converted in
    /// shared memory).
    pub const HOPPER_FP8: Self = Self {
        warps: 16,
        wgmma: true,
        fp8_cache: true,
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
    /// of two key tiles; attention_wgmma.cu's paged_attention_wgmma_smem_bytes: Q and a K and a V
    /// tile a stage, unpadded, 1 KiB to align them, and each stage's two 8-byte barriers; for an
    /// FP8 cache, two tiles of each thread's 8-byte E4M3 pieces (2 keys of K and V a thread).
    pub fn smem_bytes(self, head_dim: usize) -> usize {
        if self.wgmma {
            let stages = if self.fp8_cache {
                ATTENTION_WGMMA_FP8_STAGES
            } else {
                ATTENTION_WGMMA_STAGES
            };
            let threads = 32 * self.warps;
            let pieces = ATTENTION_WGMMA_KEYS.div_ceil(threads / (head_dim / 8));
            let staging = if self.fp8_cache {
                2 * threads * pieces * 2 * 8
            } else {
                0
            };
            (self.items() + 2 * stages * ATTENTION_WGMMA_KEYS) * head_dim * ELEM
                + 1024
                + 16 * stages
                + staging
        } else {
            (self.items() + 2 * ATTENTION_MMA_KEYS) * (head_dim + 8) * ELEM
                + 2 * ATTENTION_MMA_KEYS * 8
        }
    }

    /// The entry point's base name at `head_dim` (attention_mma.cu's WIDTH: `_` or `_wide_`)
    /// for a cache whose entry points carry `kv` (`kv_entry`).
    pub(super) fn entry(self, head_dim: usize, kv: &str) -> String {
        if self.wgmma {
            return format!("paged_attention_wgmma_hd{head_dim}{kv}");
        }
        let width = if self == Self::WIDE { "_wide_" } else { "_" };
        format!("paged_attention_mma{width}hd{head_dim}{kv}")
    }

    /// The shape for head size 128 on a GPU of NVRTC architecture `arch` that gives a block at
    /// most `smem_optin` bytes of shared memory, for a cache of `kv`: the Hopper kernel on
    /// sm_90a where `hopper` allows it; else the wide one where it fits (sm_80, sm_90), the
    /// narrow one elsewhere (sm_86, sm_89 and sm_120).
    pub fn for_hd128(
        arch: &str,
        smem_optin: usize,
        kv: KvCacheDtype,
        hopper: HopperPrompts,
    ) -> Self {
        if arch == "sm_90a" && hopper == HopperPrompts::Allowed {
            match kv {
                KvCacheDtype::Compute => Self::HOPPER,
                KvCacheDtype::Fp8E4M3 => Self::HOPPER_FP8,
            }
        } else if Self::WIDE.smem_bytes(128) <= smem_optin {
            Self::WIDE
        } else {
            Self::NARROW
        }
    }
}

/// Whether sm_90a's prompts may take the Hopper kernel ([`MmaShape::for_hd128`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopperPrompts {
    /// The default.
    Allowed,
    /// attention_mma.cu instead, for comparisons (`TPSERVE_CUDA_ATTENTION=mma`).
    Off,
}

impl HopperPrompts {
    /// `Off` with `TPSERVE_CUDA_ATTENTION=mma`, else `Allowed`.
    pub fn from_env() -> Self {
        if std::env::var("TPSERVE_CUDA_ATTENTION").as_deref() == Ok("mma") {
            Self::Off
        } else {
            Self::Allowed
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
pub(super) struct DecodeMmaKernel {
    f: CudaFunction,
    smem: usize,
}

/// Takes the tensor-core decode attention entry point at `head_dim` for a cache of `kv` and
/// raises its dynamic shared memory limit to what one block uses.
pub(super) fn take_decode_mma(
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
pub(super) struct MmaKernel {
    f: CudaFunction,
    shape: MmaShape,
}

/// Shared memory of one attention block for `items` (row, head) pairs.
pub fn attention_smem_bytes(head_dim: usize, items: usize) -> usize {
    items * head_dim * 4 + 32 * (head_dim + 2) * ELEM + 32 * head_dim * ELEM
}

/// Takes the tensor-core attention entry point of `shape` at `head_dim` and raises its dynamic
/// shared memory limit to what one block uses (above the 48 KiB a kernel gets without opting in).
pub(super) fn take_mma(
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

impl Kernels {
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
            Lane::Main,
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
        lane: Lane,
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
        let mut b = self.launch_on(lane, f);
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
            Lane::Main,
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
        lane: Lane,
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
            lane,
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

#[cfg(test)]
mod tests {
    use super::*;

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
        // attention_wgmma.cu's: 4 warpgroups, 4 stages of a K and a V tile of 64 keys.
        assert_eq!(MmaShape::HOPPER.items(), 256);
        assert_eq!(MmaShape::HOPPER.smem_bytes(128), 197_696);
        assert_eq!(MmaShape::HOPPER_FP8.items(), 256);
        assert_eq!(MmaShape::HOPPER_FP8.smem_bytes(128), 197_680);
        assert!(MmaShape::HOPPER_FP8.smem_bytes(128) <= 232_448);
        // Opt-in shared memory per block: sm_90 227 KiB, sm_80 163 KiB, sm_86/sm_89 99 KiB.
        let (bf16, fp8) = (KvCacheDtype::Compute, KvCacheDtype::Fp8E4M3);
        let (allowed, off) = (HopperPrompts::Allowed, HopperPrompts::Off);
        for (arch, optin, kv, hopper, shape) in [
            ("sm_90a", 232_448, bf16, allowed, MmaShape::HOPPER),
            ("sm_90a", 232_448, fp8, allowed, MmaShape::HOPPER_FP8),
            ("sm_90a", 232_448, bf16, off, MmaShape::WIDE),
            ("sm_90a", 232_448, fp8, off, MmaShape::WIDE),
            ("sm_80", 166_912, fp8, allowed, MmaShape::WIDE),
            ("sm_80", 166_912, bf16, allowed, MmaShape::WIDE),
            ("sm_89", 101_376, bf16, allowed, MmaShape::NARROW),
        ] {
            assert_eq!(
                MmaShape::for_hd128(arch, optin, kv, hopper),
                shape,
                "{arch} {kv:?} {hopper:?}"
            );
        }
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
        assert_eq!(
            MmaShape::HOPPER_FP8.entry(128, kv_entry(fp8)),
            "paged_attention_wgmma_hd128_fp8kv"
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
}
