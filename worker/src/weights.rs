//! Where a rank's weights come from, and reading one tensor of it, narrowed to this rank's shard,
//! as f32: from a checkpoint (safetensors or GGUF, dequantized) or random of the config's shape
//! (`--load-format dummy`). Shared by the backends; the CUDA backend rounds what it reads to its
//! dtype and initialises dummy weights on the device instead.

use std::path::Path;

use rand::{Rng, SeedableRng};
use tpserve_modelfile::{Format, LlamaConfig, WeightReader};
use tpserve_proto as pb;

use crate::error::{Result, WorkerError};

/// Where the weights come from.
pub enum WeightSource<'a> {
    /// A real checkpoint.
    Reader(&'a dyn WeightReader),
    /// Random weights of the config's shape, from this seed.
    Dummy(u64),
}

pub(crate) fn tensor_err(name: &str, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::Unsupported {
        detail: format!("tensor {name}: {e}"),
    }
}

/// Reads `name` narrowed to `range` along `dim` (all of it when `range` is `None`) as f32.
pub fn read(
    source: &WeightSource,
    name: &str,
    slice: Option<(usize, std::ops::Range<usize>)>,
    shape: &[usize],
) -> Result<Vec<f32>> {
    match source {
        WeightSource::Reader(reader) => {
            let t = match &slice {
                Some((dim, r)) => reader.read_slice(name, *dim, r.start, r.len())?,
                None => reader.read(name)?,
            };
            if t.dims() != shape {
                return Err(tensor_err(
                    name,
                    format!("shape {:?}, expected {shape:?}", t.dims()),
                ));
            }
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| tensor_err(name, e))
        }
        WeightSource::Dummy(seed) => {
            let n: usize = shape.iter().product();
            let salt = tensor_seed(*seed, name);
            let mut rng = rand::rngs::StdRng::seed_from_u64(salt);
            if name.ends_with("norm.weight") {
                Ok(vec![1.0; n])
            } else {
                Ok((0..n).map(|_| rng.gen_range(-0.02f32..0.02)).collect())
            }
        }
    }
}

/// The config of a `dummy` model: `path` is a config.json or a directory holding one.
pub fn dummy_config(path: &Path) -> Result<LlamaConfig> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| WorkerError::Unsupported {
        detail: format!("dummy weights need a config.json: {}: {e}", file.display()),
    })?;
    Ok(LlamaConfig::from_hf_json(&text)?)
}

/// A stable 64-bit seed per tensor name, so dummy weights do not depend on load order.
pub fn tensor_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed, |h, b| {
        h.wrapping_mul(0x100000001b3).wrapping_add(b as u64)
    })
}

/// The checkpoint format a load request names (`None`: decide from the path).
pub fn checkpoint_format(load_format: i32) -> Option<Format> {
    match pb::LoadFormat::try_from(load_format).unwrap_or(pb::LoadFormat::Unspecified) {
        pb::LoadFormat::Safetensors => Some(Format::Safetensors),
        pb::LoadFormat::Gguf => Some(Format::Gguf),
        _ => None,
    }
}

/// Refuses architectures the backends do not implement.
pub fn ensure_supported(config: &LlamaConfig) -> Result<()> {
    if matches!(
        config.architecture.as_str(),
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"
    ) {
        Ok(())
    } else {
        Err(WorkerError::Unsupported {
            detail: format!(
                "architecture {} (supported: Llama, Mistral, Qwen2)",
                config.architecture
            ),
        })
    }
}

/// What `LoadModel` answers for a loaded shard.
pub fn load_response(
    config: &LlamaConfig,
    kv_heads_per_rank: usize,
    weight_bytes: usize,
    started: std::time::Instant,
) -> pb::LoadModelResponse {
    pb::LoadModelResponse {
        weight_bytes: weight_bytes as u64,
        num_layers: config.num_hidden_layers as u32,
        num_kv_heads_per_rank: kv_heads_per_rank as u32,
        head_dim: config.head_dim as u32,
        vocab_size: config.vocab_size as u32,
        load_seconds: started.elapsed().as_secs_f64(),
    }
}
