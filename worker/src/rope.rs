//! Rotary position embeddings' tables, shared by both backends: the cos and sin of every
//! position, formed as Hugging Face forms them (llama3 frequency scaling included). The CPU
//! rotates with them (`cpu::ops`); the CUDA backend copies them to the device once.

use tpserve_modelfile::{LlamaConfig, RopeScaling};

/// Precomputed cos/sin of every position, `[max_pos, head_dim / 2]` each.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Half the head dimension: the entries of one position's row.
    pub(crate) half: usize,
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
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
