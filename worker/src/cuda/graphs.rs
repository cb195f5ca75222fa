//! CUDA graphs for decode steps. At warm-up one graph is captured per batch size (the
//! coordinator sends vLLM's sizes: 1, 2, 4, 8, then multiples of 8 up to a cap) from the same
//! forward code an eager step runs, reading its inputs at the fixed offsets of one persistent
//! buffer. A decode-only step of n rows pads to the smallest captured size >= n, copies its
//! inputs there (one transfer), applies its block-table updates, and replays the graph: one
//! launch instead of ~350, and no launch gaps between the kernels. In batch-invariant mode the
//! graphs run the same attention kernel (unsplit) and products as every eager step. With LoRA
//! on, each size has a second graph with the LoRA kernels (launched for the most LoRA tiles a
//! step of that size can have; empty tiles do nothing), replayed when a row of the step has an
//! adapter, so steps of the base model
//! alone pay nothing for LoRA.
//!
//! Invariants: a graph bakes in the addresses of the weights, the KV cache, the block tables,
//! the workspace and the input buffer, so the graphs are dropped whenever any of them is
//! replaced (`CudaBackend` drops them with the cache and the model; `CudaModel::reserve` reports
//! a replaced workspace). Every rank captures the same sizes in the same order, so replays match
//! collective for collective.
//!
//! Costs: capture and instantiation take a few milliseconds per size; each graph holds only its
//! nodes (the buffers are shared).

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use tpserve_term::progress::{Task, Unit};

use super::device::{device_err, DeviceBuffer, Gpu};
use super::forward::{forward, AttentionKind, AttentionPlan, Device, StepView};
use super::kernels::ATTENTION_MAX_SPLITS;
use super::model::{CudaModel, GpuKvCache};
use super::step_inputs::{pack, Packed, PackedStep, TableShape};
use super::workspace::Workspace;
use crate::batch::Batch;
use crate::error::{Result, WorkerError};

/// One captured batch size.
struct Captured {
    size: usize,
    graph: CudaGraph,
    /// The same step with the LoRA kernels, when LoRA is on.
    lora_graph: Option<CudaGraph>,
}

/// The decode graphs of one worker.
pub struct DecodeGraphs {
    /// Ascending by size.
    captured: Vec<Captured>,
    /// The inputs every graph reads (the fixed part of a step padded to the graph's size, at
    /// offset 0) and room for the block-table updates behind it.
    inputs: DeviceBuffer,
}

/// Key splits of a decode graph of `rows` rows: enough blocks to fill the GPU twice over, at
/// most [`ATTENTION_MAX_SPLITS`] and at most what the split buffers hold (contexts are unknown at
/// capture; splits past a row's context cost a block that leaves at once).
pub fn decode_splits(rows: usize, kv_heads: usize, sm_count: usize, room: usize) -> usize {
    (2 * sm_count)
        .div_ceil((rows * kv_heads).max(1))
        .clamp(1, ATTENTION_MAX_SPLITS)
        .min(room.max(1))
}

/// Packs an empty batch padded to `rows`: the layout every step of that size uses, all of it
/// padding (no cache write, no attention, greedy).
fn padding_step(rows: usize, tables: TableShape) -> Result<PackedStep> {
    pack(&Batch::default(), &[], 1, false, Some(rows), tables, &[])
        .map_err(|detail| WorkerError::Plan { detail })
}

impl DecodeGraphs {
    /// Captures a graph for each of `sizes` (ascending, each at most the workspace's rows and
    /// sampled rows and the block tables' rows), and a LoRA one for each when the model has
    /// adapter slots, each after one eager pass of the same step and replayed once, all on
    /// padding; returns them. Nothing else may use the stream meanwhile.
    pub fn capture(
        dev: &Device,
        model: &CudaModel,
        cache: &GpuKvCache,
        ws: &Workspace,
        sizes: &[usize],
        batch_invariant: bool,
    ) -> Result<Self> {
        let gpu = dev.gpu;
        let tables = table_shape(cache);
        let largest = sizes.iter().copied().max().unwrap_or(1);
        let inputs = gpu.alloc(Packed::capacity(largest, largest), "graph inputs")?;
        let mut captured = Vec::with_capacity(sizes.len());
        let d = *model.dims();
        let lora = model.lora();
        let progress = Task::new(
            "capturing CUDA graphs",
            (sizes.len() * if lora.is_some() { 2 } else { 1 }) as u64,
            Unit::items("graphs"),
        );
        for &size in sizes {
            let layout = padding_step(size, tables)?;
            let attention = if batch_invariant {
                // The kernel every step of the mode uses, one row per tile, keys unsplit.
                AttentionPlan::Simt {
                    items: d.q_heads / d.kv_heads.max(1),
                    splits: 1,
                    split_len: 0,
                }
            } else {
                let room = ws.split_room(&d, size);
                let splits = decode_splits(size, d.kv_heads, gpu.sm_count, room);
                let group = d.q_heads / d.kv_heads.max(1);
                match AttentionKind::for_decode(size, d.head_dim, group, cache.block_size) {
                    Some(AttentionKind::DecodeMma) => AttentionPlan::DecodeMma { splits },
                    _ => AttentionPlan::Decode { splits },
                }
            };
            let view = StepView {
                rows: size,
                samples: size,
                inputs: layout.offsets.at(inputs.ptr),
                num_tiles: size,
                attention,
                lora_tiles: 0,
            };
            let one = |view: &StepView| -> Result<CudaGraph> {
                // One eager pass first, on padding: every kernel, cuBLAS path and NCCL
                // connection the step uses is initialised before the capture records it.
                gpu.upload(&inputs, &layout.packed.bytes)?;
                forward(dev, model, cache, ws, view, false)?;
                let graph = capture_one(gpu, || {
                    forward(dev, model, cache, ws, view, false).map(drop)
                })?;
                // A first replay on padding: proves the graph runs, and uploads it.
                graph
                    .launch()
                    .map_err(|e| device_err("replaying a decode graph", e))?;
                progress.inc(1);
                Ok(graph)
            };
            let graph = one(&view)?;
            let lora_graph = lora
                .map(|slots| {
                    one(&StepView {
                        lora_tiles: slots.max_tiles(size),
                        ..view
                    })
                })
                .transpose()?;
            captured.push(Captured {
                size,
                graph,
                lora_graph,
            });
        }
        progress.finish();
        gpu.sync()?;
        Ok(Self { captured, inputs })
    }

    /// The smallest captured size that holds `rows` rows.
    pub fn size_for(&self, rows: usize) -> Option<usize> {
        self.captured
            .iter()
            .map(|c| c.size)
            .find(|&size| size >= rows)
    }

    /// How many graphs there are.
    pub fn len(&self) -> usize {
        self.captured.len()
    }

    /// Runs a step packed for `size` (a captured size): copies its inputs, applies its
    /// block-table updates and replays the graph (the LoRA one when a row has an adapter). The
    /// outputs land where the graph's view points: the workspace's logits and sampled buffers.
    pub fn replay(
        &self,
        dev: &Device,
        cache: &GpuKvCache,
        size: usize,
        step: &PackedStep,
    ) -> Result<()> {
        let gpu = dev.gpu;
        let captured = self
            .captured
            .iter()
            .find(|c| c.size == size)
            .ok_or_else(|| WorkerError::Device {
                detail: format!("no decode graph of size {size}"),
            })?;
        let graph = if step.num_lora_tiles > 0 {
            captured
                .lora_graph
                .as_ref()
                .ok_or_else(|| WorkerError::Device {
                    detail: "a step with LoRA rows, but no LoRA graph (LoRA is off)".into(),
                })?
        } else {
            &captured.graph
        };
        let bytes = &step.packed.bytes;
        // The updates ride behind the fixed part; a step with more than the buffer holds
        // sends them separately.
        let _spill = if bytes.len() <= self.inputs.bytes {
            gpu.upload(&self.inputs, bytes)?;
            dev.kernels.set_entries(
                cache.tables.ptr,
                self.inputs.at(step.offsets.updates),
                step.num_updates,
            )?;
            None
        } else {
            gpu.upload(&self.inputs, &bytes[..step.offsets.updates])?;
            let spill = gpu.alloc(bytes.len() - step.offsets.updates, "block-table updates")?;
            gpu.upload(&spill, &bytes[step.offsets.updates..])?;
            dev.kernels
                .set_entries(cache.tables.ptr, spill.ptr, step.num_updates)?;
            Some(spill)
        };
        graph
            .launch()
            .map_err(|e| device_err("replaying a decode graph", e))
    }
}

/// The block tables' shape, for packing.
pub fn table_shape(cache: &GpuKvCache) -> TableShape {
    TableShape {
        rows: cache.table_rows,
        width: cache.table_width,
    }
}

/// Records what `issue` puts on the stream into a graph. The capture is ended (and the partial
/// graph dropped) when `issue` fails, so the stream is usable again.
fn capture_one(gpu: &Gpu, issue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    gpu.stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| device_err("starting a graph capture", e))?;
    let issued = issue();
    let ended = gpu.stream.end_capture(CUgraphInstantiate_flags(0));
    issued?;
    ended
        .map_err(|e| device_err("instantiating a decode graph", e))?
        .ok_or_else(|| WorkerError::Device {
            detail: "capturing a decode graph recorded nothing".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_for_small_batches_only_and_respect_the_buffer() {
        assert_eq!(decode_splits(1, 8, 132, 256), 33);
        assert_eq!(decode_splits(4, 8, 132, 256), 9);
        assert_eq!(decode_splits(64, 8, 132, 256), 1);
        assert_eq!(decode_splits(1, 1, 132, 256), 64);
        assert_eq!(decode_splits(1, 8, 132, 5), 5);
        assert_eq!(decode_splits(1, 8, 132, 0), 1);
    }
}
