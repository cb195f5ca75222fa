//! The activation buffers of a forward pass, sized for the largest step (`tokens` rows, `samples`
//! sampled rows) before the memory profile, so the KV cache gets what is left. CUDA graphs bake
//! these addresses in: the workspace is only ever replaced by a larger one, and replacing it
//! drops the graphs (`CudaModel::reserve` says so).

use super::device::{DeviceBuffer, Gpu};
use super::fp8::STATS_BYTES;
use super::kernels::ELEM;
use super::model::Dims;
use super::step_inputs::Packed;
use crate::error::Result;

/// Activation buffers for up to `tokens` rows and `samples` sampled rows.
pub struct Workspace {
    pub tokens: usize,
    pub samples: usize,
    /// f32 columns of `lora_scratch` per row (0 without LoRA).
    pub lora_width: usize,
    /// Room for FP8 products' quantized activations.
    pub fp8: bool,
    /// The residual stream `[tokens, hidden]`.
    pub x: DeviceBuffer,
    /// Normalised activations `[tokens, hidden]`.
    pub normed: DeviceBuffer,
    /// Fused projection output `[tokens, qkv]`.
    pub qkv: DeviceBuffer,
    /// Attention output `[tokens, q_heads * head_dim]`.
    pub attn: DeviceBuffer,
    /// A sublayer's output before the residual add `[tokens, hidden]`.
    pub sub: DeviceBuffer,
    /// Fused gate and up projections `[tokens, 2 * inter]`.
    pub gate_up: DeviceBuffer,
    /// The MLP activation `[tokens, inter]`.
    pub act: DeviceBuffer,
    /// Split-attention partial outputs and (max, sum) pairs, f32.
    pub partial_out: DeviceBuffer,
    pub partial_ml: DeviceBuffer,
    /// Gathered sample rows `[samples, hidden]`.
    pub last: DeviceBuffer,
    /// This rank's logits `[samples, vocab_per_rank]` and all ranks' `[world, samples,
    /// vocab_per_rank]`.
    pub logits: DeviceBuffer,
    pub gathered: DeviceBuffer,
    /// Sampled token ids, u32 `[samples]`.
    pub sampled: DeviceBuffer,
    /// An eager step's packed inputs (a larger step gets a buffer of its own).
    pub inputs: DeviceBuffer,
    /// The LoRA shrink's output, f32 `[tokens, lora_width]`.
    pub lora_scratch: DeviceBuffer,
    /// With FP8 weights: a product's activations quantized, E4M3 `[tokens, widest k]`, and
    /// their statistics or per-row scales (`fp8.rs`); a byte each otherwise.
    pub fp8_x: DeviceBuffer,
    pub fp8_stats: DeviceBuffer,
}

impl Workspace {
    /// Bytes of each buffer, in field order.
    pub fn bytes_for(
        d: &Dims,
        tokens: usize,
        samples: usize,
        lora_width: usize,
        fp8: bool,
    ) -> [usize; 17] {
        let partial = Self::partial_capacity(d, tokens);
        let widest_k = d.hidden.max(d.inter).max(d.q_heads * d.head_dim);
        [
            tokens * d.hidden * ELEM,
            tokens * d.hidden * ELEM,
            tokens * d.qkv * ELEM,
            tokens * d.q_heads * d.head_dim * ELEM,
            tokens * d.hidden * ELEM,
            tokens * 2 * d.inter * ELEM,
            tokens * d.inter * ELEM,
            partial * 4,
            partial / d.head_dim.max(1) * 2 * 4,
            samples * d.hidden * ELEM,
            samples * d.vocab_per_rank * ELEM,
            samples * d.vocab_per_rank * d.world_size * ELEM,
            samples * 4,
            Packed::capacity(tokens, samples),
            tokens * lora_width * 4,
            if fp8 { tokens * widest_k } else { 0 },
            // One tensor's statistics, or one scale per row (activations quantized per row).
            if fp8 { STATS_BYTES.max(tokens * 4) } else { 0 },
        ]
    }

    /// f32 elements of the split-attention buffer: room for 4 splits of every row, and at
    /// least 256 (row, split) pairs (e.g. 64 splits of 4 decode rows).
    pub fn partial_capacity(d: &Dims, tokens: usize) -> usize {
        tokens.max(64) * 4 * d.q_heads * d.head_dim
    }

    /// Key splits the partial buffers hold for `rows` rows.
    pub fn split_room(&self, d: &Dims, rows: usize) -> usize {
        Self::partial_capacity(d, self.tokens) / (rows * d.q_heads * d.head_dim).max(1)
    }

    pub fn new(
        gpu: &Gpu,
        d: &Dims,
        tokens: usize,
        samples: usize,
        lora_width: usize,
        fp8: bool,
    ) -> Result<Self> {
        let b = Self::bytes_for(d, tokens, samples, lora_width, fp8);
        let a = |i: usize, what: &str| gpu.alloc(b[i], what);
        Ok(Self {
            tokens,
            samples,
            lora_width,
            x: a(0, "activations")?,
            normed: a(1, "activations")?,
            qkv: a(2, "activations")?,
            attn: a(3, "activations")?,
            sub: a(4, "activations")?,
            gate_up: a(5, "activations")?,
            act: a(6, "activations")?,
            partial_out: a(7, "attention splits")?,
            partial_ml: a(8, "attention splits")?,
            last: a(9, "activations")?,
            logits: a(10, "logits")?,
            gathered: a(11, "logits")?,
            sampled: a(12, "sampled tokens")?,
            inputs: a(13, "step inputs")?,
            lora_scratch: a(14, "LoRA scratch")?,
            fp8_x: a(15, "FP8 activations")?,
            fp8_stats: a(16, "FP8 activation scales")?,
            fp8,
        })
    }

    /// Total bytes.
    pub fn bytes(&self, d: &Dims) -> usize {
        Self::bytes_for(d, self.tokens, self.samples, self.lora_width, self.fp8)
            .iter()
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_adds_room_for_the_widest_product_quantized_and_its_statistics() {
        let d = Dims {
            hidden: 64,
            head_dim: 16,
            q_heads: 4,
            kv_heads: 2,
            inter: 176,
            qkv: 128,
            vocab_per_rank: 256,
            vocab_start: 0,
            vocab_local: 256,
            vocab: 256,
            world_size: 1,
        };
        let plain = Workspace::bytes_for(&d, 10, 2, 0, false);
        let fp8 = Workspace::bytes_for(&d, 10, 2, 0, true);
        assert_eq!(plain[..15], fp8[..15]);
        assert_eq!(plain[15..], [0, 0]);
        // The widest K is the intermediate size (the down projection's input), one byte each.
        assert_eq!(fp8[15..], [10 * 176, STATS_BYTES]);
        // Per-row activation scales take 4 bytes a row once they outgrow the statistics.
        let many = Workspace::bytes_for(&d, 4096, 2, 0, true);
        assert_eq!(many[16], 4096 * 4);
    }
}
