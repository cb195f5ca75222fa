//! What loading a model and sizing its KV cache ask of a backend, and what a backend answers, in
//! the worker's own types. The runner converts `LoadModel` and `ProfileMemory` messages into
//! these once, so the backends (`cpu`, `cuda`) never see protobuf.

use tpserve_modelfile::Format;
use tpserve_proto as pb;

/// Where a model's weights come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFormat {
    /// A stored checkpoint in this format; `None`: decided from the path (a `.gguf` file, else
    /// a safetensors checkpoint directory).
    Checkpoint(Option<Format>),
    /// Random weights of a config.json's shape, from this seed.
    Dummy { seed: u64 },
}

impl Default for LoadFormat {
    fn default() -> Self {
        Self::Checkpoint(None)
    }
}

/// A request to load a model shard (`LoadModel`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadSpec {
    /// A checkpoint directory, a GGUF file, or (dummy weights) a directory with a config.json.
    pub model_path: String,
    pub format: LoadFormat,
    /// `auto`, `float32`, `bfloat16`, `float16` (empty: auto).
    pub dtype: String,
    /// Kernels whose per-row results do not depend on the batch (`--batch-invariant`).
    pub batch_invariant: bool,
    /// LoRA adapters one step may use (0: LoRA off), their largest rank, and the adapters kept
    /// in host memory (at least `max_loras`).
    pub max_loras: usize,
    pub max_lora_rank: usize,
    pub max_cpu_loras: usize,
    /// `--quantization` as the user gave it (empty: auto).
    pub quantization: String,
    /// `--kv-cache-dtype` as the user gave it (empty: auto).
    pub kv_cache_dtype: String,
}

impl From<&pb::LoadModelRequest> for LoadSpec {
    fn from(req: &pb::LoadModelRequest) -> Self {
        let format = match pb::LoadFormat::try_from(req.load_format)
            .unwrap_or(pb::LoadFormat::Unspecified)
        {
            pb::LoadFormat::Safetensors => LoadFormat::Checkpoint(Some(Format::Safetensors)),
            pb::LoadFormat::Gguf => LoadFormat::Checkpoint(Some(Format::Gguf)),
            pb::LoadFormat::Dummy => LoadFormat::Dummy {
                seed: req.dummy_seed,
            },
            _ => LoadFormat::Checkpoint(None),
        };
        Self {
            model_path: req.model_path.clone(),
            format,
            dtype: req.dtype.clone(),
            batch_invariant: req.batch_invariant,
            max_loras: req.max_loras as usize,
            max_lora_rank: req.max_lora_rank as usize,
            max_cpu_loras: req.max_cpu_loras as usize,
            quantization: req.quantization.clone(),
            kv_cache_dtype: req.kv_cache_dtype.clone(),
        }
    }
}

/// What a backend loaded (`LoadModel`'s answer).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadedModel {
    /// Bytes of this rank's weights on the device.
    pub weight_bytes: u64,
    pub num_layers: usize,
    pub num_kv_heads_per_rank: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub load_seconds: f64,
    /// How the weights are held: `none`, `gguf`, `fp8`, `awq`, `gptq`.
    pub quantization: String,
    /// The quantized block types, comma-separated (GGUF), or empty.
    pub weight_types: String,
    /// What the KV cache stores: the compute dtype's name or `fp8_e4m3`.
    pub kv_cache_dtype: String,
}

impl From<LoadedModel> for pb::LoadModelResponse {
    fn from(m: LoadedModel) -> Self {
        Self {
            weight_bytes: m.weight_bytes,
            num_layers: m.num_layers as u32,
            num_kv_heads_per_rank: m.num_kv_heads_per_rank as u32,
            head_dim: m.head_dim as u32,
            vocab_size: m.vocab_size as u32,
            load_seconds: m.load_seconds,
            quantization: m.quantization,
            weight_types: m.weight_types,
            kv_cache_dtype: m.kv_cache_dtype,
        }
    }
}

/// What sizes the KV cache (`ProfileMemory`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MemoryBudget {
    /// Tokens per block (positive).
    pub block_size: usize,
    /// Bytes the cache may take (0: the backend's rule, from `gpu_memory_utilization` on a GPU).
    pub kv_cache_bytes: u64,
    /// The fraction of the GPU's memory the whole worker may use.
    pub gpu_memory_utilization: f32,
    /// The step limits, which size the activations that must fit beside the cache.
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
}

impl From<&pb::ProfileMemoryRequest> for MemoryBudget {
    fn from(req: &pb::ProfileMemoryRequest) -> Self {
        Self {
            block_size: req.block_size as usize,
            kv_cache_bytes: req.kv_cache_bytes,
            gpu_memory_utilization: req.gpu_memory_utilization,
            max_num_batched_tokens: req.max_num_batched_tokens as usize,
            max_num_seqs: req.max_num_seqs as usize,
        }
    }
}

/// How many KV blocks fit (`ProfileMemory`'s answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryProfile {
    pub num_blocks: u64,
    pub bytes_per_block: u64,
}

impl From<MemoryProfile> for pb::ProfileMemoryResponse {
    fn from(p: MemoryProfile) -> Self {
        Self {
            num_blocks: p.num_blocks,
            bytes_per_block: p.bytes_per_block,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocols_load_formats_map_one_to_one() {
        let spec = |format: pb::LoadFormat| {
            LoadSpec::from(&pb::LoadModelRequest {
                load_format: format as i32,
                dummy_seed: 7,
                ..Default::default()
            })
            .format
        };
        assert_eq!(
            spec(pb::LoadFormat::Unspecified),
            LoadFormat::Checkpoint(None)
        );
        assert_eq!(
            spec(pb::LoadFormat::Safetensors),
            LoadFormat::Checkpoint(Some(Format::Safetensors))
        );
        assert_eq!(
            spec(pb::LoadFormat::Gguf),
            LoadFormat::Checkpoint(Some(Format::Gguf))
        );
        assert_eq!(spec(pb::LoadFormat::Dummy), LoadFormat::Dummy { seed: 7 });
        let unknown = pb::LoadModelRequest {
            load_format: 99,
            ..Default::default()
        };
        assert_eq!(
            LoadSpec::from(&unknown).format,
            LoadFormat::Checkpoint(None)
        );
    }
}
