//! Element-wise operations of the Llama block on the CPU, written to match Hugging Face's float32
//! arithmetic: RMSNorm, rotary embeddings (rotate-half, by `crate::rope`'s tables), and
//! SiLU-and-multiply. All work in place or into caller-owned buffers; no allocation per token.

use rayon::prelude::*;

use crate::rope::Rope;

/// `out[i] = x[i] / rms(x) * weight` per row of `hidden` elements (HF `LlamaRMSNorm`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64, out: &mut [f32]) {
    let hidden = weight.len();
    for (row, dst) in x.chunks_exact(hidden).zip(out.chunks_exact_mut(hidden)) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
        let scale = 1.0 / (mean_sq + eps as f32).sqrt();
        for ((d, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *d = w * (v * scale);
        }
    }
}

/// `out[i] = silu(gate[i]) * up[i]` where each row of `gate_up` is `[gate | up]`.
pub fn silu_mul(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    for (row, dst) in gate_up
        .chunks_exact(2 * inter)
        .zip(out.chunks_exact_mut(inter))
    {
        let (gate, up) = row.split_at(inter);
        for ((d, g), u) in dst.iter_mut().zip(gate).zip(up) {
            *d = g / (1.0 + (-g).exp()) * u;
        }
    }
}

impl Rope {
    /// Rotates every head of every row in place: `x` is `[rows, heads * head_dim]` (the row's
    /// heads side by side), `positions[row]` its position.
    pub fn apply(&self, x: &mut [f32], row_len: usize, positions: &[usize]) {
        let half = self.half;
        x.par_chunks_exact_mut(row_len)
            .zip(positions.par_iter())
            .for_each(|(row, &p)| {
                let cos = &self.cos[p * half..(p + 1) * half];
                let sin = &self.sin[p * half..(p + 1) * half];
                for head in row.chunks_exact_mut(2 * half) {
                    let (a, b) = head.split_at_mut(half);
                    for i in 0..half {
                        let (x1, x2) = (a[i], b[i]);
                        a[i] = x1 * cos[i] - x2 * sin[i];
                        b[i] = x2 * cos[i] + x1 * sin[i];
                    }
                }
            });
    }
}
