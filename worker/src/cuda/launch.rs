//! Kernel launches through `cuLaunchKernelEx`, so each can carry the programmatic-stream-
//! serialization attribute (programmatic dependent launch, Hopper and later): the next kernel
//! on the stream is launched while this one runs and waits inside itself (common.cuh's
//! `wait_for_inputs`) instead of paying a launch after it. This removes most of the gap
//! between the ~300 small kernels of a decode step; under CUDA-graph capture the attribute
//! becomes a programmatic edge of the graph.
//!
//! Arguments are copied by value (each at most 8 bytes) into the builder, which the driver
//! reads during the call. `TPSERVE_CUDA_PDL=0` launches plainly (for comparisons).

use std::ffi::c_void;

use cudarc::driver::sys::{
    CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
};
use cudarc::driver::{CudaFunction, CudaStream, DriverError, LaunchConfig};

/// Most arguments any of our kernels takes.
const MAX_ARGS: usize = 24;

/// One launch being built.
pub struct KernelLaunch<'a> {
    stream: &'a CudaStream,
    function: &'a CudaFunction,
    programmatic: bool,
    values: [u64; MAX_ARGS],
    count: usize,
}

impl<'a> KernelLaunch<'a> {
    /// A launch of `function` on `stream`; `programmatic` adds the PDL attribute.
    pub fn new(stream: &'a CudaStream, function: &'a CudaFunction, programmatic: bool) -> Self {
        Self {
            stream,
            function,
            programmatic,
            values: [0; MAX_ARGS],
            count: 0,
        }
    }

    /// Appends an argument: a device pointer (`u64`) or a scalar of at most 8 bytes.
    pub fn arg<T: Copy>(&mut self, value: &T) -> &mut Self {
        let size = std::mem::size_of::<T>();
        assert!(
            size <= 8 && self.count < MAX_ARGS,
            "kernel argument out of range"
        );
        // SAFETY: `value` is valid for `size` bytes and the slot holds 8; both are plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                value as *const T as *const u8,
                &mut self.values[self.count] as *mut u64 as *mut u8,
                size,
            );
        }
        self.count += 1;
        self
    }

    /// Launches the kernel.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and every
    /// pointer must be valid for what the kernel does with it.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        let mut params: [*mut c_void; MAX_ARGS] = [std::ptr::null_mut(); MAX_ARGS];
        for (param, value) in params.iter_mut().zip(self.values.iter_mut()) {
            *param = value as *mut u64 as *mut c_void;
        }
        // SAFETY (zeroed): the attribute value is a plain C union; all-zero is a valid value.
        let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: if self.programmatic {
                &mut attribute
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(self.programmatic),
        };
        // SAFETY: the caller vouches for the arguments; `params` points at `count` live values
        // (and unused slots), `config` and `attribute` outlive the call.
        unsafe {
            cudarc::driver::sys::cuLaunchKernelEx(
                &config,
                self.function.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
    }
}

/// Whether launches on a GPU of compute capability `major` carry the PDL attribute.
pub fn programmatic_launches(major: i32) -> bool {
    major >= 9 && std::env::var("TPSERVE_CUDA_PDL").map_or(true, |v| v != "0")
}
