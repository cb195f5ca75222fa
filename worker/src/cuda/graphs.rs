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
//! Sizes whose attention runs on the CUDA-core decode kernel (below 8 rows) get a graph per count
//! of key splits (three: short, middle and long contexts), and a step replays the one for its
//! longest context: a graph's split count is fixed at capture, and no one count suits every
//! context (too many leave empty blocks at short ones, too few leave SMs idle at long ones).
//!
//! Costs: capture and instantiation take a few milliseconds per graph; each graph holds only its
//! nodes (the buffers are shared).

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;
use tpserve_term::progress::{Task, Unit};

use std::cell::RefCell;

use super::device::{device_err, DeviceBuffer, Gpu, PinnedHost};
use super::forward::{forward, AttentionKind, AttentionPlan, Device, StepView};
use super::kernels::ATTENTION_MAX_SPLITS;
use super::model::{CudaModel, Dims, GpuKvCache};
use super::step_inputs::{pack, Packed, PackedStep, TableShape};
use super::token_slots::SLOTS;
use super::workspace::Workspace;
use crate::batch::Batch;
use crate::error::{Result, WorkerError};

/// One captured batch size.
struct Captured {
    size: usize,
    /// Ascending by `from_context`, the first from 0.
    variants: Vec<Variant>,
}

/// The graphs of one batch size for one count of attention key splits.
struct Variant {
    /// Replayed for steps whose longest context exceeds this many keys (and no later variant's).
    from_context: usize,
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
    /// Page-locked staging of `inputs`, one per token slot (`token_slots`): a replay's upload
    /// never waits for the stream, so a step is launched while the one before it runs.
    staging: RefCell<[PinnedHost; SLOTS]>,
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

/// Keys per split the decode attention rounds its even split of a row's keys up to (common.cuh's
/// split_keys): a graph of S splits gives a row of up to S times this many keys as many splits
/// with keys as a graph of more splits does, and fewer empty blocks.
pub const SPLIT_KEY_QUANTUM: usize = 32;

/// The key-split counts of the decode graphs of `rows` rows that the CUDA-core decode attention
/// runs, ascending: half of [`decode_splits`]'s (short contexts: fewer empty blocks), its own,
/// and as many as the GPU holds blocks at once (4 an SM, one wave; long contexts, where the
/// first counts leave SMs idle), each at most [`ATTENTION_MAX_SPLITS`] and the split buffers'
/// room, and at least 2 unless it is the only one. Measured at batch 1 on an H200 (8B;
/// docs/PERFORMANCE.md, issue 9, run 28): 16 splits instead of 33 at 500 keys -0.017 ms a step,
/// 64 instead of 33 at 1,500 keys -0.028 ms and at 3,000 -0.043 ms (one step in a graph), at
/// 8,000 -0.33 ms (the worker's decode).
pub fn decode_split_counts(
    rows: usize,
    kv_heads: usize,
    sm_count: usize,
    room: usize,
) -> Vec<usize> {
    let fill = decode_splits(rows, kv_heads, sm_count, room);
    let wave = ((4 * sm_count) / (rows * kv_heads).max(1))
        .clamp(1, ATTENTION_MAX_SPLITS)
        .min(room.max(1));
    let mut counts = vec![fill / 2, fill, wave];
    counts.retain(|&s| s >= 2 || s == fill);
    counts.sort_unstable();
    counts.dedup();
    counts
}

/// The graphs of a decode step of `size` rows, as `(from_context, attention)`, ascending: one,
/// or for the CUDA-core decode attention one per count of [`decode_split_counts`], each replayed
/// for steps whose longest context is above [`SPLIT_KEY_QUANTUM`] keys a split of the one
/// before.
pub(super) fn graph_plans(
    d: &Dims,
    size: usize,
    sm_count: usize,
    room: usize,
    block_size: usize,
    batch_invariant: bool,
) -> Vec<(usize, AttentionPlan)> {
    if batch_invariant {
        // The kernel every step of the mode uses, one row per tile, keys unsplit.
        let attention = AttentionPlan::Simt {
            items: d.q_heads / d.kv_heads.max(1),
            splits: 1,
            split_len: 0,
        };
        return vec![(0, attention)];
    }
    let group = d.q_heads / d.kv_heads.max(1);
    if let Some(AttentionKind::DecodeMma) =
        AttentionKind::for_decode(size, d.head_dim, group, block_size)
    {
        let splits = decode_splits(size, d.kv_heads, sm_count, room);
        return vec![(0, AttentionPlan::DecodeMma { splits })];
    }
    let counts = decode_split_counts(size, d.kv_heads, sm_count, room);
    let mut from_context = 0;
    counts
        .iter()
        .map(|&splits| {
            let plan = (from_context, AttentionPlan::Decode { splits });
            from_context = SPLIT_KEY_QUANTUM * splits;
            plan
        })
        .collect()
}

/// The attention of an eager decode step of `rows` one-row sequences whose longest context is
/// `max_context` (`--enforce-eager`, a size above the largest graph, or a step outside graphs):
/// the plan the graphs of that size replay for that context ([`graph_plans`]), so an eager step
/// splits the keys as a replayed one does. Before, eager steps took `key_splits`: no split up to
/// 256 keys, and 33 at batch 1 where the graphs' 64 splits were 0.3 ms a step faster at 8,000 keys
/// (docs/PERFORMANCE.md, issue 9, run 29).
pub fn eager_decode_attention(
    d: &Dims,
    rows: usize,
    sm_count: usize,
    room: usize,
    block_size: usize,
    max_context: usize,
) -> AttentionPlan {
    let plans = graph_plans(d, rows, sm_count, room, block_size, false);
    plans
        .iter()
        .rfind(|(from_context, _)| max_context > *from_context)
        .unwrap_or(&plans[0])
        .1
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
        let plans: Vec<Vec<(usize, AttentionPlan)>> = sizes
            .iter()
            .map(|&size| {
                let room = ws.split_room(&d, size);
                graph_plans(
                    &d,
                    size,
                    gpu.sm_count,
                    room,
                    cache.block_size,
                    batch_invariant,
                )
            })
            .collect();
        let progress = Task::new(
            "capturing CUDA graphs",
            (plans.iter().map(Vec::len).sum::<usize>() * if lora.is_some() { 2 } else { 1 }) as u64,
            Unit::items("graphs"),
        );
        for (&size, plans) in sizes.iter().zip(plans) {
            let layout = padding_step(size, tables)?;
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
            let mut variants = Vec::with_capacity(plans.len());
            for (from_context, attention) in plans {
                let view = StepView {
                    rows: size,
                    samples: size,
                    inputs: layout.offsets.at(inputs.ptr),
                    num_tiles: size,
                    attention,
                    lora_tiles: 0,
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
                variants.push(Variant {
                    from_context,
                    graph,
                    lora_graph,
                });
            }
            captured.push(Captured { size, variants });
        }
        progress.finish();
        gpu.sync()?;
        let staging = RefCell::new([
            PinnedHost::new(inputs.bytes)?,
            PinnedHost::new(inputs.bytes)?,
        ]);
        Ok(Self {
            captured,
            inputs,
            staging,
        })
    }

    /// The smallest captured size that holds `rows` rows.
    pub fn size_for(&self, rows: usize) -> Option<usize> {
        self.captured
            .iter()
            .map(|c| c.size)
            .find(|&size| size >= rows)
    }

    /// How many batch sizes have graphs.
    pub fn len(&self) -> usize {
        self.captured.len()
    }

    /// Runs a step packed for `size` (a captured size): copies its inputs (through token slot
    /// `slot`'s staging), applies its block-table updates and replays the graph (the LoRA one
    /// when a row has an adapter); returns without waiting for the stream. The outputs land
    /// where the graph's view points: the workspace's logits and sampled buffers.
    pub fn replay(
        &self,
        dev: &Device,
        cache: &GpuKvCache,
        size: usize,
        step: &PackedStep,
        slot: usize,
    ) -> Result<()> {
        let gpu = dev.gpu;
        let captured = self
            .captured
            .iter()
            .find(|c| c.size == size)
            .ok_or_else(|| WorkerError::Device {
                detail: format!("no decode graph of size {size}"),
            })?;
        let variant = captured
            .variants
            .iter()
            .rfind(|v| step.max_context > v.from_context)
            .unwrap_or(&captured.variants[0]);
        let graph = if step.num_lora_tiles > 0 {
            variant
                .lora_graph
                .as_ref()
                .ok_or_else(|| WorkerError::Device {
                    detail: "a step with LoRA rows, but no LoRA graph (LoRA is off)".into(),
                })?
        } else {
            &variant.graph
        };
        let bytes = &step.packed.bytes;
        // The updates ride behind the fixed part; a step with more than the buffer holds
        // sends them separately.
        let _spill = if bytes.len() <= self.inputs.bytes {
            let mut staging = self.staging.borrow_mut();
            let staged = staging.get_mut(slot).ok_or_else(|| WorkerError::Device {
                detail: format!("no input staging slot {slot}"),
            })?;
            staged.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
            gpu.upload_pinned(&self.inputs, staged, bytes.len())?;
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
pub(super) fn capture_one(gpu: &Gpu, issue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
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

    #[test]
    fn split_counts_run_from_half_the_fill_to_one_wave() {
        assert_eq!(decode_split_counts(1, 8, 132, 256), [16, 33, 64]);
        assert_eq!(decode_split_counts(2, 8, 132, 256), [8, 17, 33]);
        assert_eq!(decode_split_counts(4, 8, 132, 256), [4, 9, 16]);
        assert_eq!(decode_split_counts(32, 8, 132, 256), [2]);
        assert_eq!(decode_split_counts(64, 8, 132, 256), [1]);
        // The split buffers' room caps every count.
        assert_eq!(decode_split_counts(1, 8, 132, 40), [16, 33, 40]);
        assert_eq!(decode_split_counts(1, 8, 132, 3), [3]);
    }

    /// Llama-3-8B's shape on one GPU.
    fn dims() -> Dims {
        Dims {
            hidden: 4096,
            head_dim: 128,
            q_heads: 32,
            kv_heads: 8,
            inter: 14336,
            qkv: 6144,
            vocab_per_rank: 128256,
            vocab_start: 0,
            vocab_local: 128256,
            vocab: 128256,
            world_size: 1,
        }
    }

    #[test]
    fn small_batches_on_the_cuda_core_kernel_get_a_graph_per_split_count() {
        let d = dims();
        let plans = graph_plans(&d, 1, 132, 256, 16, false);
        assert!(matches!(
            plans[..],
            [
                (0, AttentionPlan::Decode { splits: 16 }),
                (512, AttentionPlan::Decode { splits: 33 }),
                (1056, AttentionPlan::Decode { splits: 64 })
            ]
        ));
        // The tensor-core decode kernel's sizes, and batch-invariant mode, keep one graph.
        let plans = graph_plans(&d, 8, 132, 256, 16, false);
        assert!(matches!(
            plans[..],
            [(0, AttentionPlan::DecodeMma { splits: 5 })]
        ));
        // An eager step picks the plan the graph of its size replays for its context.
        for (context, splits) in [
            (1, 16),
            (512, 16),
            (513, 33),
            (1056, 33),
            (1057, 64),
            (8000, 64),
        ] {
            assert_eq!(
                eager_decode_attention(&d, 1, 132, 256, 16, context),
                AttentionPlan::Decode { splits },
                "{context} keys"
            );
        }
        assert_eq!(
            eager_decode_attention(&d, 8, 132, 256, 16, 8000),
            AttentionPlan::DecodeMma { splits: 5 }
        );
        let plans = graph_plans(&d, 1, 132, 256, 16, true);
        assert!(matches!(
            plans[..],
            [(0, AttentionPlan::Simt { splits: 1, .. })]
        ));
    }
}
