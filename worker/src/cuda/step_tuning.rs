//! The one-row products' kernels chosen by timing whole decode steps through a CUDA graph
//! (issue 9). `Linear::tune` times each candidate alone, launched back to back on its own
//! weights. Inside a decode graph a product runs after other kernels: programmatic launches
//! overlap its start with their tail, and its weights' warm-up into L2 with their work (the
//! attention's, before the o projection). The ranking differs there. On an H100, FP8's o
//! projection made the batch-1 step 0.9% faster on the variant the lone timing ranked last
//! (docs/PERFORMANCE.md, issue 9, run 48).
//!
//! So, after the lone timing, each one-row product of the layers is tried on every candidate
//! within [`SLACK`] of its lone best. The step is one decode row at [`CONTEXT`] keys in a graph of
//! batch size 1, one product at a time (the others as chosen so far), and the fastest step's
//! kernel is kept. Every candidate gives the same bits (gemv.cu: the sum's order depends on K
//! alone), so only speed moves.
//!
//! Costs: per candidate a capture and 1 + [`ROUNDS`] x [`REPLAYS`] replays; on an H100, 0.58 s
//! of warm-up for an 8B model in FP8 and 1.21 s in bf16 (run 49). Off with
//! `TPSERVE_CUDA_STEP_TUNING=0`, at tensor-parallel sizes above 1 (each rank would time alone
//! while its collectives wait on the others), in batch-invariant mode (one kernel, nothing
//! tuned) and under a `TPSERVE_CUDA_LINEAR` family pin; products named in
//! `TPSERVE_CUDA_LINEAR_CHOICES` keep their kernel.
//!
//! The choices are kept between starts in `<cache root>/step-tuning/<key>.txt` (the kernel
//! cache's root: `$TPSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/tpserve`, else
//! `~/.cache/tpserve`), as a `TPSERVE_CUDA_LINEAR_CHOICES` list. The key hashes what the
//! choice is about: this build, the GPU's name, architecture and SM count, the dtype, the
//! products' shapes and their candidates. A later start with the same key takes the file's
//! choices instead of timing again (a start on another GPU of the same name reuses them: they
//! are the same kernels with the same bits, at worst a little slower); delete the directory to
//! time again.
//!
//! Only speed rides on it: the warm-up logs a failure here and goes on with the choices made so
//! far (each a kernel that runs its product right).
//!
//! The probe step writes its own key into the cache (a block that holds nothing yet at warm-up)
//! and fills row 0 of the block tables, which a sequence's first step rewrites.

use std::path::{Path, PathBuf};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaGraph};
use tpserve_kernels::{write_atomically, CacheKey};

use super::device::{device_err, DeviceBuffer, Gpu};
use super::forward::{forward, Device, StepView};
use super::graphs::{capture_one, graph_plans, table_shape};
use super::linear::{parse_choices, Choice, LinearKernel, Timing};
use super::model::{CudaModel, GpuKvCache};
use super::step_inputs::{pack, Packed};
use super::workspace::Workspace;
use super::Loaded;
use crate::batch::{Batch, SeqSlice};
use crate::error::{Result, WorkerError};
use crate::sampler::SampleSpec;

/// Keys the probe row sees: a short chat's context, where the batch-1 graph runs its fewest key
/// splits.
pub const CONTEXT: usize = 384;
/// Candidates slower than this times the lone best are not tried in the step.
pub const SLACK: f64 = 1.25;
/// Timing rounds over all candidates of a product (the best round counts).
pub const ROUNDS: usize = 2;
/// Replays back to back a round.
pub const REPLAYS: usize = 3;

/// One decode row at [`CONTEXT`] keys (fewer where the cache or the tables hold fewer), packed
/// for a graph of size 1, its inputs on the device.
struct Probe {
    _inputs: DeviceBuffer,
    view: StepView,
}

impl Probe {
    fn new(dev: &Device, model: &CudaModel, cache: &GpuKvCache, ws: &Workspace) -> Result<Self> {
        let gpu = dev.gpu;
        let d = *model.dims();
        let tables = table_shape(cache);
        let bs = cache.block_size.max(1);
        let context = CONTEXT
            .min(cache.num_blocks * bs)
            .min(tables.width * bs)
            .min(model.max_positions())
            .max(1);
        let block_ids: Vec<u32> = (0..context.div_ceil(bs) as u32).collect();
        let last = context - 1;
        let batch = Batch {
            token_ids: vec![0],
            positions: vec![last],
            slots: vec![block_ids[last / bs] as usize * bs + last % bs],
            seqs: vec![SeqSlice {
                rows: 0..1,
                start_pos: last,
                block_ids,
                slot: 0,
                new_blocks_from: 0,
                lora_slot: None,
            }],
            sample_rows: vec![0],
            fed: Vec::new(),
        };
        let step = pack(
            &batch,
            &[SampleSpec::greedy()],
            1,
            false,
            Some(1),
            tables,
            &[],
        )
        .map_err(|detail| WorkerError::Plan { detail })?;
        let inputs = gpu.alloc(
            Packed::capacity(1, 1).max(step.packed.bytes.len()),
            "probe inputs",
        )?;
        gpu.upload(&inputs, &step.packed.bytes)?;
        dev.kernels.set_entries(
            cache.tables.ptr,
            inputs.at(step.offsets.updates),
            step.num_updates,
        )?;
        let plans = graph_plans(&d, 1, gpu.sm_count, ws.split_room(&d, 1), bs, false);
        let attention = plans
            .iter()
            .rfind(|(from_context, _)| context > *from_context)
            .unwrap_or(&plans[0])
            .1;
        let view = StepView {
            rows: 1,
            samples: 1,
            inputs: step.offsets.at(inputs.ptr),
            num_tiles: step.num_tiles,
            attention,
            lora_tiles: 0,
        };
        // One eager pass: whatever the step initialises on first use is ready before a capture
        // (every candidate product already ran in the lone timing).
        forward(dev, model, cache, ws, &view, false)?;
        Ok(Self {
            view,
            _inputs: inputs,
        })
    }

    /// The step's graph with `dev`'s kernel choices (replayed once, which uploads it).
    fn capture(
        &self,
        dev: &Device,
        model: &CudaModel,
        cache: &GpuKvCache,
        ws: &Workspace,
    ) -> Result<CudaGraph> {
        let graph = capture_one(dev.gpu, || {
            forward(dev, model, cache, ws, &self.view, false).map(drop)
        })?;
        graph
            .launch()
            .map_err(|e| device_err("replaying a probe graph", e))?;
        Ok(graph)
    }
}

/// A product's timing candidates worth a step (at least two), beside its lone timing.
type Tuned<'a> = (&'a Timing, Vec<LinearKernel>);

/// The two events that time the probe's replays.
struct StepEvents {
    start: CudaEvent,
    end: CudaEvent,
}

impl StepEvents {
    fn new(gpu: &Gpu) -> Result<Self> {
        let event = || {
            gpu.ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| device_err("creating an event", e))
        };
        Ok(Self {
            start: event()?,
            end: event()?,
        })
    }

    /// Milliseconds a replay of `graph`, [`REPLAYS`] of them back to back.
    fn time_replays(&self, gpu: &Gpu, graph: &CudaGraph) -> Result<f64> {
        self.start
            .record(&gpu.stream)
            .map_err(|e| device_err("recording an event", e))?;
        for _ in 0..REPLAYS {
            graph
                .launch()
                .map_err(|e| device_err("replaying a probe graph", e))?;
        }
        self.end
            .record(&gpu.stream)
            .map_err(|e| device_err("recording an event", e))?;
        let ms = self
            .start
            .elapsed_ms(&self.end)
            .map_err(|e| device_err("timing a probe graph", e))?;
        Ok(ms as f64 / REPLAYS as f64)
    }
}

/// The candidates (kernel, microseconds alone) within [`SLACK`] of the fastest alone, in their
/// order.
fn worth_trying(candidates: &[(LinearKernel, f64)]) -> Vec<LinearKernel> {
    let best = candidates.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
    candidates
        .iter()
        .filter(|c| c.1 <= best * SLACK)
        .map(|c| c.0)
        .collect()
}

/// The device objects of a pass on one rank (no collectives).
fn one_rank<'a>(gpu: &'a Gpu, loaded: &'a Loaded) -> Device<'a> {
    Device {
        gpu,
        kernels: &loaded.kernels,
        linear: &loaded.linear,
        nccl: None,
        peer: None,
        rank: 0,
    }
}

/// Whether the step tuning runs (`TPSERVE_CUDA_STEP_TUNING=0` turns it off).
pub fn enabled() -> bool {
    std::env::var("TPSERVE_CUDA_STEP_TUNING").as_deref() != Ok("0")
}

/// Re-chooses, by whole decode steps, the kernel of each one-row product among `timings` (the
/// lone timing's, of one rank) that is a layer's (not the lm_head, whose product is the same
/// whatever runs before it) and not pinned by `TPSERVE_CUDA_LINEAR_CHOICES`; or takes an
/// earlier start's choices for the same key from the cache directory. Nothing else may use the
/// stream meanwhile.
pub fn tune(gpu: &Gpu, loaded: &mut Loaded, timings: &[Timing]) -> Result<Outcome> {
    let vocab = loaded.model.dims().vocab_per_rank;
    // The 4-bit products have one GEMV whatever the variant (nothing to choose).
    let tuned: Vec<Tuned> = timings
        .iter()
        .filter(|t| t.rows == 1 && !t.overridden && !t.shape.int4 && t.shape.n_out != vocab)
        .map(|t| (t, worth_trying(&t.candidates)))
        .filter(|(_, tried)| tried.len() >= 2)
        .collect();
    if tuned.is_empty() {
        return Ok(Outcome::NothingToChoose);
    }
    let file = cache_file(gpu, loaded, &tuned);
    if let Some(file) = &file {
        match read_choices(file).map(|choices| loaded.linear.adopt(timings, &choices)) {
            Some(Ok(())) => return Ok(Outcome::Kept(file.clone())),
            Some(Err(problem)) => {
                tracing::warn!(
                    file = %file.display(),
                    %problem,
                    "step tuning's kept choices not used"
                )
            }
            None => {}
        }
    }
    let (Some(cache), Some(ws)) = (loaded.cache.as_ref(), loaded.model.workspace()) else {
        return Ok(Outcome::NothingToChoose);
    };
    let probe = Probe::new(&one_rank(gpu, loaded), &loaded.model, cache, ws)?;
    let events = StepEvents::new(gpu)?;
    let mut chosen = Vec::with_capacity(tuned.len());
    for (t, tried) in tuned {
        let mut graphs = Vec::with_capacity(tried.len());
        for &kernel in &tried {
            loaded.linear.set_choice(t.shape, 1, kernel);
            graphs.push(probe.capture(&one_rank(gpu, loaded), &loaded.model, cache, ws)?);
        }
        let mut step_ms = vec![f64::INFINITY; tried.len()];
        for _ in 0..ROUNDS {
            for (ms, graph) in step_ms.iter_mut().zip(&graphs) {
                *ms = ms.min(events.time_replays(gpu, graph)?);
            }
        }
        let Some(best) = (0..tried.len()).min_by(|&a, &b| step_ms[a].total_cmp(&step_ms[b])) else {
            continue;
        };
        loaded.linear.set_choice(t.shape, 1, tried[best]);
        chosen.push(Choice {
            n_out: t.shape.n_out,
            k: t.shape.k,
            rows: 1,
            kernel: tried[best],
        });
        let list: Vec<String> = tried
            .iter()
            .zip(&step_ms)
            .map(|(k, ms)| format!("{k} {ms:.4}"))
            .collect();
        tracing::info!(
            n_out = t.shape.n_out,
            k = t.shape.k,
            alone = %t.chosen,
            chosen = %tried[best],
            "one-row product chosen by whole decode steps (ms a step: {})",
            list.join(", ")
        );
    }
    gpu.sync()?;
    if let Some(file) = &file {
        if let Err(e) = write_choices(file, &chosen) {
            tracing::warn!(file = %file.display(), error = %e, "step tuning's choices not kept");
        }
    }
    Ok(Outcome::Timed)
}

/// What [`tune`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No one-row product had two candidates worth a step.
    NothingToChoose,
    /// Timed the steps (and kept the choices, where a cache directory exists).
    Timed,
    /// Took an earlier start's choices from this file.
    Kept(PathBuf),
}

/// The file of the choices for `tuned` on this GPU in this build (`None` without a cache
/// directory).
fn cache_file(gpu: &Gpu, loaded: &Loaded, tuned: &[Tuned]) -> Option<PathBuf> {
    let about = format!(
        "{}|{}|{}|{}|{:?}|{CONTEXT}|{SLACK}",
        env!("CARGO_PKG_VERSION"),
        gpu.name,
        gpu.arch,
        gpu.sm_count,
        loaded.model.dtype(),
    );
    let products: Vec<String> = tuned
        .iter()
        .map(|(t, _)| {
            let names: Vec<String> = t.candidates.iter().map(|(k, _)| k.to_string()).collect();
            format!("{:?} {}", t.shape, names.join(","))
        })
        .collect();
    let mut fields = vec![about.as_bytes()];
    fields.extend(products.iter().map(|p| p.as_bytes()));
    let key = CacheKey::of("tpserve-step-tuning-v1", &fields);
    Some(
        tpserve_kernels::cache_root()?
            .join("step-tuning")
            .join(format!("{}.txt", key.as_str())),
    )
}

/// The choices kept in `file` (`None` when it is missing or unreadable).
fn read_choices(file: &Path) -> Option<Vec<Choice>> {
    let text = std::fs::read_to_string(file).ok()?;
    match parse_choices(text.trim()) {
        Ok(choices) => Some(choices),
        Err(problem) => {
            tracing::warn!(
                file = %file.display(),
                %problem,
                "step tuning's kept choices unreadable"
            );
            None
        }
    }
}

/// Keeps `choices` in `file` (atomically: a reader sees the old file or the new one).
fn write_choices(file: &Path, choices: &[Choice]) -> std::io::Result<()> {
    let specs: Vec<String> = choices.iter().filter_map(Choice::spec).collect();
    write_atomically(file, format!("{}\n", specs.join(",")).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_within_the_slack_of_the_fastest_alone_are_tried_in_order() {
        let gemv = |columns, unroll| LinearKernel::Gemv { columns, unroll };
        // FP8's o projection on an H100 (run 48): the step's winner, r2, was 20% slower alone.
        let alone = [
            (gemv(1, 2), 8.1),
            (gemv(2, 2), 7.9),
            (gemv(4, 2), 8.2),
            (gemv(1, 4), 6.6),
            (gemv(2, 8), 7.4),
            (LinearKernel::Cublas, 16.6),
        ];
        assert_eq!(
            worth_trying(&alone),
            [gemv(1, 2), gemv(2, 2), gemv(4, 2), gemv(1, 4), gemv(2, 8)]
        );
        assert_eq!(worth_trying(&alone[5..]), [LinearKernel::Cublas]);
        assert!(worth_trying(&[]).is_empty());
    }

    #[test]
    fn kept_choices_read_back_and_a_broken_file_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("step-tuning").join("k.txt");
        let choices = [
            Choice {
                n_out: 6144,
                k: 4096,
                rows: 1,
                kernel: LinearKernel::Gemv {
                    columns: 2,
                    unroll: 2,
                },
            },
            Choice {
                n_out: 4096,
                k: 14336,
                rows: 1,
                kernel: LinearKernel::Gemv {
                    columns: 1,
                    unroll: 4,
                },
            },
        ];
        assert_eq!(read_choices(&file), None);
        write_choices(&file, &choices).unwrap();
        assert_eq!(read_choices(&file).unwrap(), choices);
        std::fs::write(&file, "6144x4096@1=warp-drive").unwrap();
        assert_eq!(read_choices(&file), None);
    }
}
