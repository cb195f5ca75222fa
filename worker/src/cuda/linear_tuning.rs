//! The linear layers' kernels chosen at warm-up by timing each candidate alone on the model's
//! weights (`Linear::tune`), and the choices logged; `step_tuning` then re-ranks the one-row
//! products inside whole decode steps.

use super::device::Gpu;
use super::gemv::MMA_WIDE_ROWS;
use super::kernels;
use super::linear::{LinearKernel, Shape, Timing, TuneWeight};
use super::model::{Layer, LinearWeight};
use super::Loaded;
use crate::error::Result;

/// Chooses each linear layer's kernel by timing the candidates on the model's weights (one row
/// bucket at a time, up to 8 rows, or 16 where the workspace holds them and the tensor-core
/// GEMV's wide bucket is asked for); skipped when the workspace holds fewer than 8 rows. Returns
/// the timings.
pub(super) fn tune_linears(gpu: &Gpu, loaded: &mut Loaded) -> Result<Vec<Timing>> {
    let model = &loaded.model;
    let d = *model.dims();
    let Some(ws) = model.workspace() else {
        return Ok(Vec::new());
    };
    let q_w = d.q_heads * d.head_dim;
    let max_k = d.hidden.max(d.inter).max(q_w);
    let max_n = d.qkv.max(2 * d.inter).max(d.vocab_per_rank).max(d.hidden);
    let holds = |rows: usize| {
        ws.act.bytes >= rows * max_k * kernels::ELEM
            && ws.gate_up.bytes >= rows * max_n * kernels::ELEM
    };
    let Some(rows) = [MMA_WIDE_ROWS, 8].into_iter().find(|&r| holds(r)) else {
        tracing::debug!(
            "workspace under 8 rows: linear kernels not tuned (cuBLAS; \
             TPSERVE_CUDA_LINEAR_CHOICES unused)"
        );
        return Ok(Vec::new());
    };
    // Random inputs (never time on zeros), from a fixed seed.
    loaded
        .kernels
        .fill_uniform(ws.act.ptr, rows * max_k, 0x5eed, -1.0, 1.0)?;
    let layers = || model.layers.iter().take(4);
    // Each linear layer's shape, in FP8 or not as the first layer holds it (a checkpoint may
    // leave some layers unquantized: theirs keep the defaults).
    let entry = |n_out, k, w: &dyn Fn(&Layer) -> &LinearWeight| {
        let first = model.layers.first().map(w);
        let fp8 = first.is_some_and(|w| w.fp8.is_some());
        let int4 = first.is_some_and(|w| w.int4.is_some());
        let weights: Vec<TuneWeight> = layers()
            .filter(|l| w(l).fp8.is_some() == fp8 && w(l).int4.is_some() == int4)
            .map(|l| (w(l).data.ptr, w(l).fp8(ws), w(l).int4(model)))
            .collect();
        (
            Shape {
                n_out,
                k,
                fp8,
                int4,
            },
            weights,
        )
    };
    let head = model.lm_head.as_ref().unwrap_or(&model.embed).ptr;
    let shapes = vec![
        entry(d.qkv, d.hidden, &|l| &l.qkv),
        entry(d.hidden, q_w, &|l| &l.o),
        entry(2 * d.inter, d.hidden, &|l| &l.gate_up),
        entry(d.hidden, d.inter, &|l| &l.down),
        (
            Shape {
                n_out: d.vocab_per_rank,
                k: d.hidden,
                fp8: false,
                int4: false,
            },
            vec![(head, None, None)],
        ),
    ];
    let timings = loaded.linear.tune(
        gpu,
        &loaded.kernels,
        &shapes,
        (ws.act.ptr, ws.gate_up.ptr),
        rows,
    )?;
    for t in &timings {
        // The 4-bit products have one GEMV, whatever the variant's label says.
        let label = |k: &LinearKernel| match (t.shape.int4, k) {
            (true, LinearKernel::Gemv { .. }) => "4-bit GEMV".to_string(),
            _ => k.to_string(),
        };
        let list: Vec<String> = t
            .candidates
            .iter()
            .map(|(k, us)| format!("{} {us:.1}", label(k)))
            .collect();
        tracing::info!(
            n_out = t.shape.n_out,
            k = t.shape.k,
            rows = t.rows,
            chosen = %label(&t.chosen),
            overridden = t.overridden,
            "linear kernel (us: {})",
            list.join(", ")
        );
    }
    Ok(timings)
}
