//! The way back of launched steps' sampled tokens: two slots, each page-locked host memory and
//! an event, used in turn. A launch queues its tokens' copy into its slot and records the event;
//! the host collects them later, after launching the next step, so the device never waits for
//! the host between two steps (`Backend::launch`).
//!
//! Invariant: a slot is used again two launches later, and the runner answers a step before it
//! begins the step after the next, so a slot's copies are done when it is used again. The decode
//! graphs' input staging (`graphs`) is indexed by the same slot for the same reason.

use cudarc::driver::CudaEvent;

use super::device::{device_err, Gpu, PinnedHost};
use crate::error::{Result, WorkerError};

/// One slot: the tokens' host memory and the event recorded after their copy.
struct Slot {
    tokens: PinnedHost,
    copied: CudaEvent,
}

/// The two slots and which one the next launch takes.
#[derive(Default)]
pub struct TokenSlots {
    slots: [Option<Slot>; SLOTS],
    next: usize,
}

/// How many slots launches go round.
pub const SLOTS: usize = 2;

impl TokenSlots {
    /// The slot of the next launch (advances).
    pub fn take(&mut self) -> usize {
        let slot = self.next;
        self.next = (self.next + 1) % SLOTS;
        slot
    }

    /// Queues the copy of `count` tokens (u32) at device pointer `src` into `slot` and records
    /// its event; returns at once.
    pub fn send_back(&mut self, gpu: &Gpu, slot: usize, src: u64, count: usize) -> Result<()> {
        let bytes = count * 4;
        let entry = &mut self.slots[slot];
        if entry.as_ref().is_none_or(|s| s.tokens.bytes() < bytes) {
            // This slot's last copy is done (the invariant above): replacing it is safe.
            let copied = gpu
                .ctx
                .new_event(None)
                .map_err(|e| device_err("creating an event", e))?;
            *entry = Some(Slot {
                tokens: PinnedHost::new(bytes.max(1024))?,
                copied,
            });
        }
        let s = entry.as_mut().expect("set above");
        gpu.download_to_pinned(src, &mut s.tokens, bytes)?;
        s.copied
            .record(&gpu.stream)
            .map_err(|e| device_err("recording an event", e))
    }

    /// Whether `slot`'s tokens are back (never waits; an error counts as back, for `collect`).
    pub fn ready(&self, slot: usize) -> bool {
        self.slots
            .get(slot)
            .and_then(Option::as_ref)
            .is_none_or(|s| s.copied.try_is_complete().unwrap_or(true))
    }

    /// Waits for `slot`'s `count` tokens and returns them.
    pub fn collect(&self, slot: usize, count: usize) -> Result<Vec<u32>> {
        let s = self
            .slots
            .get(slot)
            .and_then(Option::as_ref)
            .filter(|s| s.tokens.bytes() >= count * 4)
            .ok_or_else(|| WorkerError::Device {
                detail: format!("no {count} tokens in flight in slot {slot}"),
            })?;
        s.copied
            .synchronize()
            .map_err(|e| device_err("waiting for a step's tokens", e))?;
        Ok(s.tokens.as_slice()[..count * 4]
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
