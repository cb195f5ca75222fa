//! One GPU: the libraries checked before first use (cudarc panics on a missing library, so every
//! entry point here checks first and names what is missing), its context and the one stream all
//! of this worker's work goes on, and plain device buffers addressed by raw pointer.
//!
//! All device work of a worker is issued from the runner thread on one stream, so stream order is
//! the only synchronisation: cudarc's per-buffer event tracking is turned off, and buffers are
//! passed to kernels, cuBLAS and NCCL as raw device pointers (`u64`) with byte offsets.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};

use crate::error::{Result, WorkerError};

pub(crate) fn device_err(what: &str, e: impl std::fmt::Debug) -> WorkerError {
    WorkerError::Device {
        detail: format!("{what}: {e:?}"),
    }
}

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: loads libcuda and runs its initialisers, which have no preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// GPUs this process sees; an error names what is missing.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(WorkerError::Device {
            detail: "no CUDA driver found (libcuda.so.1 could not be loaded); use --device cpu"
                .into(),
        });
    }
    let n = CudaContext::device_count().unwrap_or(0);
    if n <= 0 {
        return Err(WorkerError::Device {
            detail: "the CUDA driver sees no GPU (check CUDA_VISIBLE_DEVICES); use --device cpu"
                .into(),
        });
    }
    Ok(n as usize)
}

/// True when a CUDA driver and at least one GPU are present (`--device auto`).
pub fn gpu_present() -> bool {
    driver_present() && CudaContext::device_count().is_ok_and(|n| n > 0)
}

/// Checks the libraries the CUDA backend loads at run time on a GPU of architecture `arch`
/// (e.g. `sm_90`), other than the driver and NCCL. NVRTC is needed only when the kernels
/// embedded in this build do not cover `arch` (see `tpserve_kernels::prebuilt`); checking that
/// hashes the kernel sources, well under a millisecond.
pub fn check_libraries(arch: &str) -> Result<()> {
    let missing = |name: &str, lib: &str| WorkerError::Device {
        detail: format!(
            "{name} not found (lib{lib}.so.13 could not be loaded); put the CUDA 13 libraries \
             on LD_LIBRARY_PATH (deploy/gpu-env.sh does) or use --device cpu"
        ),
    };
    // SAFETY (all three): loading a library runs its initialisers, which have no preconditions.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(missing("cuBLAS", "cublas"));
    }
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(missing("cuBLASLt", "cublasLt"));
    }
    if !tpserve_kernels::nvrtc_available()
        && !tpserve_kernels::Prebuilt::embedded().covers(
            tpserve_kernels::SOURCES,
            &tpserve_kernels::CompileConfig::from_env(arch),
        )
    {
        return Err(missing("NVRTC", "nvrtc"));
    }
    Ok(())
}

/// Checks that NCCL can be loaded (tensor parallelism over GPUs).
pub fn check_nccl() -> Result<()> {
    // SAFETY: as above.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(WorkerError::Device {
            detail: "NCCL not found (libnccl.so could not be loaded); tensor parallelism on GPUs \
                     needs it (deploy/gpu-env.sh links the pip package's libnccl.so.2 as \
                     libnccl.so)"
                .into(),
        })
    }
}

/// A GPU with its context and stream.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    pub total_memory: usize,
    pub sm_count: usize,
    /// Shared memory one block may opt in to (bytes).
    pub smem_per_block_optin: usize,
    /// NVRTC architecture, e.g. `sm_90`.
    pub arch: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
}

impl Gpu {
    /// Opens GPU `ordinal` and binds its context to the calling thread.
    pub fn open(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(WorkerError::Device {
                detail: format!("cuda:{ordinal} does not exist: this process sees {count} GPU(s)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| device_err("creating the context", e))?;
        ctx.bind_to_thread()
            .map_err(|e| device_err("binding the context", e))?;
        // SAFETY: every buffer is used on the one stream below, in issue order.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| device_err("creating a stream", e))?;
        let name = ctx.name().map_err(|e| device_err("device name", e))?;
        let total_memory = ctx
            .total_mem()
            .map_err(|e| device_err("device memory", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| device_err("compute capability", e))?;
        let arch = tpserve_kernels::arch_for_compute_capability(major, minor);
        check_libraries(&arch)?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| device_err("SM count", e))? as usize;
        let smem_per_block_optin = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| device_err("shared memory per block", e))? as usize;
        Ok(Self {
            ctx,
            stream,
            ordinal,
            name,
            total_memory,
            sm_count,
            smem_per_block_optin,
            arch,
            compute_capability: (major, minor),
        })
    }

    /// `(free, total)` device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| device_err("querying device memory", e))
    }

    /// Waits for all issued work.
    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| device_err("synchronising the stream", e))
    }

    /// A zeroed buffer of `bytes` bytes.
    pub fn alloc(&self, bytes: usize, what: &str) -> Result<DeviceBuffer> {
        let slice =
            self.stream
                .alloc_zeros::<u8>(bytes.max(1))
                .map_err(|e| WorkerError::Device {
                    detail: format!(
                        "allocating {what} ({:.2} GiB): {e:?}",
                        bytes as f64 / (1u64 << 30) as f64
                    ),
                })?;
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(&self.stream);
            ptr
        };
        Ok(DeviceBuffer {
            ptr,
            bytes,
            _slice: slice,
        })
    }

    /// Copies `data` into `dst` at byte offset 0 (async on the stream; `data` is pageable host
    /// memory, which the driver stages before returning).
    pub fn upload<T: Copy>(&self, dst: &DeviceBuffer, data: &[T]) -> Result<()> {
        self.upload_at(dst, 0, data)
    }

    /// Copies `data` into `dst` from byte `offset` on, as `upload`.
    pub fn upload_at<T: Copy>(&self, dst: &DeviceBuffer, offset: usize, data: &[T]) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if offset + bytes > dst.bytes {
            return Err(WorkerError::Device {
                detail: format!(
                    "upload of {bytes} bytes at {offset} into a buffer of {}",
                    dst.bytes
                ),
            });
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: dst holds at least `offset + bytes` bytes; data is valid for reads of `bytes`
        // bytes; the context is current on this thread.
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dst.at(offset),
                std::slice::from_raw_parts(data.as_ptr() as *const u8, bytes),
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| device_err("copying to the device", e))
    }

    /// Copies `out.len()` elements from device pointer `src` to the host and waits for it.
    pub fn download<T: Copy>(&self, src: u64, out: &mut [T]) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: src points at `bytes` readable device bytes (the caller's contract); out is
        // valid for writes of `bytes` bytes and lives until the synchronisation below.
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, bytes),
                src,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| device_err("copying from the device", e))?;
        self.sync()
    }
}

/// Page-locked host memory, which copies on the stream read or write without the host waiting
/// for them; freed on drop. Whoever fills or reads it must know the copies that use it are
/// done (an event, a synchronisation).
pub struct PinnedHost {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: the memory is owned by this value alone; the runner thread that allocates it is the
// only one that uses it (the CUDA backend never leaves that thread).
unsafe impl Send for PinnedHost {}

impl PinnedHost {
    /// `bytes` of page-locked memory (the context must be current on this thread).
    pub fn new(bytes: usize) -> Result<Self> {
        // SAFETY: the context is current on the runner thread; flags 0: portable to nothing,
        // cached (the host reads tokens back from it).
        let ptr = unsafe { cudarc::driver::result::malloc_host(bytes.max(1), 0) }
            .map_err(|e| device_err("allocating page-locked host memory", e))?;
        Ok(Self {
            ptr: ptr as *mut u8,
            bytes,
        })
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Its bytes (no copy may be writing them).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr holds `bytes` bytes for self's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    /// Its bytes, to fill (no copy may be reading them).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds `bytes` bytes for self's lifetime, borrowed mutably once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host; nothing uses it after drop. A failure (a broken
        // context) leaks it, which is all that can be done here.
        let _ = unsafe { cudarc::driver::result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

impl Gpu {
    /// Queues a copy of `bytes` bytes from device pointer `src` into `dst` on the stream and
    /// returns at once; `dst` holds them once the stream has passed this point.
    pub fn download_to_pinned(&self, src: u64, dst: &mut PinnedHost, bytes: usize) -> Result<()> {
        if bytes > dst.bytes() {
            return Err(WorkerError::Device {
                detail: format!("download of {bytes} bytes into {} pinned", dst.bytes()),
            });
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: src points at `bytes` readable device bytes (the caller's contract); dst is
        // page-locked and outlives the copy (its owner waits for the stream before reuse).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut dst.as_mut_slice()[..bytes],
                src,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| device_err("copying from the device", e))
    }

    /// Queues a copy of the first `bytes` bytes of `src` into `dst` on the stream and returns at
    /// once (the driver never stages page-locked memory, so it never waits for the stream).
    pub fn upload_pinned(&self, dst: &DeviceBuffer, src: &PinnedHost, bytes: usize) -> Result<()> {
        if bytes > dst.bytes || bytes > src.bytes() {
            return Err(WorkerError::Device {
                detail: format!(
                    "upload of {bytes} bytes from {} pinned into a buffer of {}",
                    src.bytes(),
                    dst.bytes
                ),
            });
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: dst holds at least `bytes` bytes; src is page-locked and is not rewritten
        // before the copy has run (its owner's contract).
        unsafe {
            cudarc::driver::result::memcpy_htod_async(
                dst.ptr,
                &src.as_slice()[..bytes],
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| device_err("copying to the device", e))
    }
}

/// Device memory addressed by raw pointer; freed (stream-ordered) on drop.
pub struct DeviceBuffer {
    /// Device address of the first byte.
    pub ptr: u64,
    /// Size in bytes.
    pub bytes: usize,
    _slice: CudaSlice<u8>,
}

impl DeviceBuffer {
    /// The address `offset` bytes in.
    pub fn at(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.bytes);
        self.ptr + offset as u64
    }
}
