//! Element-wise operations of the Llama block on the CPU, written to match Hugging Face's float32
//! arithmetic: RMSNorm, rotary embeddings (rotate-half, with llama3 frequency scaling), and
//! SiLU-and-multiply. All work in place or into caller-owned buffers; no allocation per token.

use rayon::prelude::*;
use tpserve_modelfile::{LlamaConfig, RopeScaling};

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

/// Precomputed cos/sin of every position, `[max_pos, head_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for positions `0..max_pos`, with the config's theta and scaling. Frequencies and
    /// angles are formed in f32 as HF does; cos and sin are taken in f64 of that f32 angle.
    pub fn new(config: &LlamaConfig, max_pos: usize) -> Self {
        let dim = config.head_dim;
        let half = dim / 2;
        let base = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        if let Some(scaling) = &config.rope_scaling {
            apply_llama3_scaling(&mut inv_freq, scaling);
        }
        let mut cos = vec![0.0; max_pos * half];
        let mut sin = vec![0.0; max_pos * half];
        for p in 0..max_pos {
            for (i, f) in inv_freq.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                cos[p * half + i] = angle.cos() as f32;
                sin[p * half + i] = angle.sin() as f32;
            }
        }
        Self { half, cos, sin }
    }

    /// The cos and sin tables, `[max_pos, head_dim / 2]` each.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    /// Positions the tables cover.
    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

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

/// Llama 3's frequency-dependent rescaling of the rotary frequencies (HF `_compute_llama3_parameters`).
fn apply_llama3_scaling(inv_freq: &mut [f32], s: &RopeScaling) {
    let old_len = s.original_max_position_embeddings as f32;
    let low_freq_wavelen = old_len / s.low_freq_factor as f32;
    let high_freq_wavelen = old_len / s.high_freq_factor as f32;
    let factor = s.factor as f32;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        let scaled = if wavelen > low_freq_wavelen {
            *f / factor
        } else {
            *f
        };
        let smooth = (old_len / wavelen - s.low_freq_factor as f32)
            / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
        let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
        *f = if is_medium { smoothed } else { scaled };
    }
}
