//! NCCL between the GPUs of one tensor-parallel group, one process (or thread) per GPU: rank 0
//! makes the unique id, the coordinator hands it to every rank, each joins with its rank. All
//! collectives run on the worker's stream, in issue order.

use cudarc::driver::CudaStream;
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};

use crate::error::{Result, WorkerError};

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> WorkerError {
    WorkerError::Communicator {
        detail: format!("NCCL {what}: {e:?}"),
    }
}

/// A new NCCL unique id, as the 128 bytes every rank passes to [`Nccl::join`].
pub fn unique_id() -> Result<Vec<u8>> {
    super::device::check_nccl()?;
    let id = nccl::get_uniqueid().map_err(|e| nccl_err("unique id", e))?;
    // `c_char` is i8 on x86_64 and u8 on AArch64: the same bytes either way.
    Ok(id.internal.iter().map(|c| c.to_ne_bytes()[0]).collect())
}

/// This rank's communicator.
pub struct Nccl {
    comm: ncclComm_t,
    world_size: usize,
}

impl Nccl {
    /// Joins the group of `world_size` under `id`; blocks until every rank has joined. The GPU's
    /// context must be current on this thread.
    pub fn join(id: &[u8], rank: usize, world_size: usize) -> Result<Self> {
        super::device::check_nccl()?;
        if id.len() != 128 {
            return Err(WorkerError::Communicator {
                detail: format!("an NCCL id has 128 bytes, not {}", id.len()),
            });
        }
        let mut unique = ncclUniqueId { internal: [0; 128] };
        for (dst, src) in unique.internal.iter_mut().zip(id) {
            *dst = *src as _;
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: comm is valid for one write; the id came from ncclGetUniqueId on rank 0.
        unsafe { nccl::comm_init_rank(comm.as_mut_ptr(), world_size as i32, unique, rank as i32) }
            .map_err(|e| nccl_err("joining the group", e))?;
        // SAFETY: initialised by the successful call above.
        let comm = unsafe { comm.assume_init() };
        Ok(Self { comm, world_size })
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// In-place sum over ranks of `count` elements at `buf`.
    pub fn all_reduce_sum(
        &self,
        buf: u64,
        count: usize,
        dtype: ncclDataType_t,
        stream: &CudaStream,
    ) -> Result<()> {
        // SAFETY: buf holds `count` elements of `dtype` on this GPU; the stream is this GPU's.
        unsafe {
            nccl::all_reduce(
                buf as *const _,
                buf as *mut _,
                count,
                dtype,
                ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as _,
            )
        }
        .map(drop)
        .map_err(|e| nccl_err("all-reduce", e))
    }

    /// Every rank's `count` elements at `send`, concatenated in rank order into `recv`.
    pub fn all_gather(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: ncclDataType_t,
        stream: &CudaStream,
    ) -> Result<()> {
        // SAFETY: send holds `count` and recv `count * world_size` elements of `dtype`.
        unsafe {
            nccl::all_gather(
                send as *const _,
                recv as *mut _,
                count,
                dtype,
                self.comm,
                stream.cu_stream() as _,
            )
        }
        .map(drop)
        .map_err(|e| nccl_err("all-gather", e))
    }

    /// Rank 0's `count` elements at `buf` copied to every rank, in place.
    pub fn broadcast_from_root(
        &self,
        buf: u64,
        count: usize,
        dtype: ncclDataType_t,
        stream: &CudaStream,
    ) -> Result<()> {
        // SAFETY: buf holds `count` elements of `dtype` on every rank.
        unsafe {
            nccl::broadcast(
                buf as *const _,
                buf as *mut _,
                count,
                dtype,
                0,
                self.comm,
                stream.cu_stream() as _,
            )
        }
        .map(drop)
        .map_err(|e| nccl_err("broadcast", e))
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: the communicator came from comm_init_rank and is dropped once. Abort rather
        // than destroy: a peer may be gone, and destroy would wait for it.
        let _ = unsafe { nccl::comm_abort(self.comm) };
    }
}
