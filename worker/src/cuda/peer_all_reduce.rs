//! The one-shot all-reduce over peer memory (`kernels/cuda/all_reduce.cu`) for the small
//! messages of tensor-parallel decode, where NCCL's ~10-20 us a call would dominate: each rank
//! pushes its share into every rank's exchange buffer over NVLink and sums what it received.
//!
//! Set up once per group at warm-up, before the CUDA graphs are captured: every rank allocates
//! its exchange buffer with a plain `cuMemAlloc` (CUDA IPC cannot export the stream-ordered pool's
//! allocations), the ranks swap IPC handles through NCCL, and each maps the others' buffers. The
//! ranks agree on the outcome (one NCCL all-gather of each rank's status), so either every rank
//! uses it or none does: a rank that could not map its peers (no peer access, ranks that are
//! threads of one process) leaves the whole group on NCCL. Messages above
//! `TPSERVE_PEER_ALL_REDUCE_MAX_BYTES` (default 2 MiB, a decode step of 256 sequences at hidden
//! size 4,096) and ones not 16-byte aligned go through NCCL as before.

use cudarc::driver::sys;
use cudarc::nccl::sys::ncclDataType_t;

use super::device::{DeviceBuffer, Gpu};
use super::kernels::{
    Kernels, ResidualNorm, ALL_REDUCE_MAX_BLOCKS, ALL_REDUCE_MAX_RANKS, ALL_REDUCE_SIGNAL_BYTES,
    ALL_REDUCE_THREADS, ELEM,
};
use super::nccl::Nccl;
use crate::error::Result;

/// Default largest message (bytes) that takes the one-shot path.
const DEFAULT_MAX_BYTES: usize = 2 << 20;

/// Bytes of an IPC memory handle.
const HANDLE_BYTES: usize = std::mem::size_of::<sys::CUipcMemHandle>();

/// This rank's exchange buffer, the peers' buffers mapped here, and the device array of all of
/// them that the kernel reads.
pub struct PeerAllReduce {
    rank: usize,
    world: usize,
    /// Bytes of one rank's slot: the largest message.
    slot_bytes: usize,
    /// This rank's exchange buffer (plain `cuMemAlloc`).
    local: sys::CUdeviceptr,
    /// The other ranks' buffers, mapped by IPC (closed on drop).
    mapped: Vec<sys::CUdeviceptr>,
    /// u64 `[world]`: every rank's buffer in this address space, this rank's own included.
    peers: DeviceBuffer,
}

/// The largest one-shot message from the environment, rounded down to 16 bytes.
fn max_bytes_from_env() -> usize {
    std::env::var("TPSERVE_PEER_ALL_REDUCE_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_MAX_BYTES)
        / 16
        * 16
}

impl PeerAllReduce {
    /// Sets the path up on every rank of `nccl`'s group, or on none: `Ok(None)` when any rank
    /// could not (the reason is logged). Every rank must call it at the same point, as any NCCL
    /// collective.
    pub fn new(gpu: &Gpu, nccl: &Nccl, rank: usize) -> Result<Option<Self>> {
        let world = nccl.world_size();
        let slot_bytes = max_bytes_from_env();
        if !(2..=ALL_REDUCE_MAX_RANKS).contains(&world) || slot_bytes == 0 {
            return Ok(None);
        }
        // 1. Allocate, zero and export this rank's buffer; swap what the peers need to map it.
        let bytes = ALL_REDUCE_SIGNAL_BYTES + world * slot_bytes;
        let mut local: sys::CUdeviceptr = 0;
        // SAFETY: plain driver calls on this thread's current context; `local` is valid for a
        // write.
        let allocated = unsafe {
            sys::cuMemAlloc_v2(&mut local, bytes)
                .result()
                .and_then(|()| sys::cuMemsetD8_v2(local, 0, bytes).result())
                .and_then(|()| sys::cuCtxSynchronize().result())
        };
        let mut this = Self {
            rank,
            world,
            slot_bytes,
            local,
            mapped: Vec::new(),
            peers: gpu.alloc(world * 8, "the peer all-reduce's buffer table")?,
        };
        let mine = match allocated {
            Ok(()) => Exported::new(this.local, gpu.ordinal),
            Err(e) => {
                tracing::warn!(rank, "peer all-reduce: allocating the buffer: {e:?}");
                None
            }
        };
        let records = all_gather_bytes(gpu, nccl, &Exported::encode(mine.as_ref()))?;
        let records: Vec<Option<Exported>> = records
            .chunks_exact(Exported::BYTES)
            .map(Exported::decode)
            .collect();
        // 2. Map the peers' buffers; agree on the outcome.
        let mut addresses = vec![0u64; world];
        let mut mapped_all = records.iter().all(Option::is_some);
        for (peer, record) in records.iter().enumerate() {
            let Some(record) = record.as_ref().filter(|_| mapped_all) else {
                break;
            };
            if peer == rank {
                addresses[peer] = this.local;
                continue;
            }
            match record.map(gpu) {
                Ok(Mapping::Ipc(ptr)) => {
                    this.mapped.push(ptr);
                    addresses[peer] = ptr;
                }
                Ok(Mapping::SameProcess(ptr)) => addresses[peer] = ptr,
                Err(e) => {
                    tracing::info!(rank, peer, "peer all-reduce: mapping a peer: {e:?}");
                    mapped_all = false;
                }
            }
        }
        let statuses = all_gather_bytes(gpu, nccl, &[u8::from(mapped_all)])?;
        if statuses.iter().any(|s| *s != 1) {
            tracing::info!(
                rank,
                "peer all-reduce unavailable on some rank of the group: all-reduces use NCCL"
            );
            return Ok(None);
        }
        gpu.upload(&this.peers, &addresses)?;
        gpu.sync()?;
        tracing::info!(
            rank,
            world,
            max_bytes = slot_bytes,
            "peer all-reduce ready: small all-reduces go over peer memory"
        );
        Ok(Some(this))
    }

    /// Whether a message of `bytes` at `buf` takes this path.
    pub fn handles(&self, buf: u64, bytes: usize) -> bool {
        bytes > 0 && bytes <= self.slot_bytes && bytes.is_multiple_of(16) && buf.is_multiple_of(16)
    }

    /// Sums `norm.sub` over the group and applies the residual add and RMSNorm in the same
    /// kernel, when the message fits this path (`Ok(false)`: it does not; nothing was launched).
    pub fn residual_norm(&self, kernels: &Kernels, norm: &ResidualNorm) -> Result<bool> {
        let bytes = norm.n * norm.hidden * ELEM;
        let fits = self.handles(norm.sub, bytes)
            && norm.hidden.is_multiple_of(8)
            && [norm.x, norm.out, norm.weight]
                .iter()
                .all(|p| p.is_multiple_of(16));
        if !fits {
            return Ok(false);
        }
        kernels.all_reduce_residual_norm(
            norm,
            self.peers.ptr,
            self.slot_bytes,
            self.rank,
            self.world,
        )?;
        Ok(true)
    }

    /// Sums `bytes` at `buf` over the group, in place (a message [`Self::handles`] takes).
    pub fn all_reduce(&self, kernels: &Kernels, buf: u64, bytes: usize) -> Result<()> {
        let vectors = bytes / 16;
        let blocks = vectors
            .div_ceil(ALL_REDUCE_THREADS as usize)
            .clamp(1, ALL_REDUCE_MAX_BLOCKS);
        kernels.all_reduce_one_shot(
            buf,
            bytes,
            self.peers.ptr,
            self.slot_bytes,
            self.rank,
            self.world,
            blocks,
        )
    }
}

impl Drop for PeerAllReduce {
    fn drop(&mut self) {
        // SAFETY: each address came from cuIpcOpenMemHandle or cuMemAlloc above and is released
        // once; nothing runs on them after the owner is dropped (the stream is synchronised by
        // then or the context is going away).
        unsafe {
            for ptr in self.mapped.drain(..) {
                let _ = sys::cuIpcCloseMemHandle(ptr);
            }
            if self.local != 0 {
                let _ = sys::cuMemFree_v2(self.local);
            }
        }
    }
}

/// Every rank's `data` (the same length on every rank), concatenated in rank order.
fn all_gather_bytes(gpu: &Gpu, nccl: &Nccl, data: &[u8]) -> Result<Vec<u8>> {
    let world = nccl.world_size();
    let send = gpu.alloc(data.len(), "an all-gather's input")?;
    let recv = gpu.alloc(data.len() * world, "an all-gather's output")?;
    gpu.upload(&send, data)?;
    nccl.all_gather(
        send.ptr,
        recv.ptr,
        data.len(),
        ncclDataType_t::ncclUint8,
        &gpu.stream,
    )?;
    let mut out = vec![0u8; data.len() * world];
    gpu.download(recv.ptr, &mut out)?;
    Ok(out)
}

/// What a rank publishes about its exchange buffer: the IPC handle (for ranks in other
/// processes), the process id, device ordinal and address (for ranks that are threads of the
/// same process, which map it by peer access instead, since IPC refuses a handle of its own
/// process).
struct Exported {
    handle: sys::CUipcMemHandle,
    pid: u32,
    ordinal: u32,
    address: u64,
}

/// How a peer's buffer became addressable here.
enum Mapping {
    /// Mapped by IPC: close on drop.
    Ipc(sys::CUdeviceptr),
    /// The owner's own address, usable here once peer access is on.
    SameProcess(sys::CUdeviceptr),
}

impl Exported {
    /// Encoded size: the handle, pid, ordinal, address and a present flag.
    const BYTES: usize = HANDLE_BYTES + 4 + 4 + 8 + 1;

    fn new(local: sys::CUdeviceptr, ordinal: usize) -> Option<Self> {
        let mut handle: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
        // SAFETY: `local` came from cuMemAlloc; `handle` is valid for a write.
        match unsafe { sys::cuIpcGetMemHandle(&mut handle, local) }.result() {
            Ok(()) => Some(Self {
                handle,
                pid: std::process::id(),
                ordinal: ordinal as u32,
                address: local,
            }),
            Err(e) => {
                tracing::warn!("peer all-reduce: exporting the buffer: {e:?}");
                None
            }
        }
    }

    fn encode(this: Option<&Self>) -> Vec<u8> {
        let mut out = vec![0u8; Self::BYTES];
        if let Some(e) = this {
            // SAFETY: the handle is plain bytes.
            let raw: [u8; HANDLE_BYTES] = unsafe { std::mem::transmute(e.handle) };
            out[..HANDLE_BYTES].copy_from_slice(&raw);
            let mut at = HANDLE_BYTES;
            for field in [
                &e.pid.to_le_bytes()[..],
                &e.ordinal.to_le_bytes(),
                &e.address.to_le_bytes(),
            ] {
                out[at..at + field.len()].copy_from_slice(field);
                at += field.len();
            }
            out[at] = 1;
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes[Self::BYTES - 1] != 1 {
            return None;
        }
        let mut raw = [0u8; HANDLE_BYTES];
        raw.copy_from_slice(&bytes[..HANDLE_BYTES]);
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        Some(Self {
            // SAFETY: the bytes are a handle another rank's cuIpcGetMemHandle produced.
            handle: unsafe { std::mem::transmute::<[u8; HANDLE_BYTES], sys::CUipcMemHandle>(raw) },
            pid: word(HANDLE_BYTES),
            ordinal: word(HANDLE_BYTES + 4),
            address: u64::from_le_bytes(
                bytes[HANDLE_BYTES + 8..HANDLE_BYTES + 16]
                    .try_into()
                    .unwrap_or([0; 8]),
            ),
        })
    }

    /// Makes the buffer addressable from `gpu`'s context (current on this thread).
    fn map(&self, gpu: &Gpu) -> std::result::Result<Mapping, cudarc::driver::DriverError> {
        if self.pid == std::process::id() {
            // A thread of this process: enable peer access to its device's primary context
            // (what its `CudaContext` is) and use its address as is.
            if self.ordinal as usize != gpu.ordinal {
                let mut device: sys::CUdevice = 0;
                let mut context: sys::CUcontext = std::ptr::null_mut();
                // SAFETY: plain driver calls; the out-pointers are valid for writes. The
                // primary context is released again at once: its owner thread keeps it alive.
                unsafe {
                    sys::cuDeviceGet(&mut device, self.ordinal as i32).result()?;
                    sys::cuDevicePrimaryCtxRetain(&mut context, device).result()?;
                    let enabled = sys::cuCtxEnablePeerAccess(context, 0);
                    sys::cuDevicePrimaryCtxRelease_v2(device).result()?;
                    if enabled != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
                        enabled.result()?;
                    }
                }
            }
            return Ok(Mapping::SameProcess(self.address));
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: a plain driver call; `ptr` is valid for a write.
        unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                self.handle,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        }
        .result()?;
        Ok(Mapping::Ipc(ptr))
    }
}
