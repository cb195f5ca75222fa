//! A second stream for work that may run beside the worker's own within one step: a prompt
//! step's decode rows' attention (bound by reading their KV cache) beside its prompt rows'
//! attention (bound by the tensor cores), so that neither waits for the other's kind of
//! resource. On only with `TPSERVE_CUDA_OVERLAP_ATTENTION=1`: measured in run 61
//! (docs/PERFORMANCE.md), it takes ~0.65 ms off a serving-shaped prompt step's attention and the
//! step stays within its noise, so it is off by default; it is the first piece of running the
//! decode rows' attention beside the prompt rows' products.
//!
//! `fork` makes the side stream wait for everything issued so far on the worker's stream, `join`
//! makes the worker's stream wait for everything issued on the side stream since; the kernels in
//! between read what precedes the fork and write rows no other kernel between fork and join
//! touches. The side stream has the greatest priority, so its blocks take SMs as the prompt
//! kernel's blocks retire instead of after its last one. Prompt steps run eagerly, so no fork is
//! ever captured into a CUDA graph. Costs: two event records and two waits a layer (host
//! microseconds; events without timing).

use std::sync::Arc;

use cudarc::driver::{result, CudaEvent, CudaStream};

use super::super::device::device_err;
use crate::error::Result;

/// Which stream a launch goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// The worker's stream.
    Main,
    /// The side stream (the worker's stream when there is none).
    Side,
}

/// The side stream and the two events that order it against the worker's stream.
pub struct SideStream {
    stream: Arc<CudaStream>,
    forked: CudaEvent,
    joined: CudaEvent,
}

impl SideStream {
    /// A side stream beside `main`, or None unless `TPSERVE_CUDA_OVERLAP_ATTENTION=1`.
    pub fn from_env(main: &Arc<CudaStream>) -> Result<Option<Self>> {
        if std::env::var("TPSERVE_CUDA_OVERLAP_ATTENTION").as_deref() != Ok("1") {
            return Ok(None);
        }
        let ctx = main.context();
        ctx.bind_to_thread()
            .map_err(|e| device_err("binding the context", e))?;
        // Lower values are greater priorities: the range's second bound is the greatest.
        let (_, greatest) = result::stream::get_priority_range()
            .map_err(|e| device_err("reading the stream priorities", e))?;
        let stream = ctx
            .new_stream_with_priority(greatest)
            .map_err(|e| device_err("creating the side stream", e))?;
        let event = || {
            ctx.new_event(None)
                .map_err(|e| device_err("creating an event", e))
        };
        Ok(Some(Self {
            stream,
            forked: event()?,
            joined: event()?,
        }))
    }

    /// The side stream.
    pub fn stream(&self) -> &CudaStream {
        &self.stream
    }

    /// The side stream waits for everything issued on `main` so far.
    pub fn fork(&self, main: &CudaStream) -> Result<()> {
        self.forked
            .record(main)
            .and_then(|()| self.stream.wait(&self.forked))
            .map_err(|e| device_err("forking the side stream", e))
    }

    /// `main` waits for everything issued on the side stream so far.
    pub fn join(&self, main: &CudaStream) -> Result<()> {
        self.joined
            .record(&self.stream)
            .and_then(|()| main.wait(&self.joined))
            .map_err(|e| device_err("joining the side stream", e))
    }
}
