//! A rank's weights, shared by the backends: which checkpoint tensors it holds and how they are
//! narrowed to its shard and fused (`model_parts`), where they come from (a checkpoint, or random
//! of the config's shape for `--load-format dummy`), and reading them as f32. The CUDA backend
//! rounds what it reads to its dtype and initialises dummy weights on the device instead.
//! Loading a checkpoint reports its progress in tensors read (`tpserve_term::progress`), whatever
//! the backend, because every read goes through `load_shard`'s counting reader.

use std::ops::Range;
use std::path::Path;

use rand::{Rng, SeedableRng};
use tpserve_modelfile::{
    Fp8Tensor, Int4Tensor, LlamaConfig, ModelSource, QuantizedTensor, StoredDtype, StoredTensor,
    WeightReader,
};
use tpserve_term::progress::{Task, Unit};

use crate::error::{Result, WorkerError};
use crate::load::{LoadFormat, LoadSpec, LoadedModel};
use crate::shard::ShardPlan;

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

/// One checkpoint tensor narrowed to this rank's share: the slice `(dimension, range)` it holds
/// (all of it when `None`), and that slice's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub slice: Option<(usize, Range<usize>)>,
    pub shape: Vec<usize>,
}

impl Part {
    fn new(name: String, slice: Option<(usize, Range<usize>)>, shape: Vec<usize>) -> Self {
        Self { name, slice, shape }
    }

    /// The slice as a reader takes it: (dimension, start, length); None for the whole tensor.
    pub fn slice_bounds(&self) -> Option<(usize, usize, usize)> {
        self.slice.as_ref().map(|(dim, r)| (*dim, r.start, r.len()))
    }

    /// Elements of the slice.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Elements of fused parts together.
pub fn total_len(parts: &[Part]) -> usize {
    parts.iter().map(Part::elements).sum()
}

/// One decoder layer's tensors on this rank, grouped as the backends fuse them.
pub struct LayerParts {
    pub input_norm: Part,
    /// `[q | k | v]` rows of this rank's heads: one matrix `[q + 2 kv, hidden]`.
    pub qkv: Vec<Part>,
    /// Their biases (Qwen2), in the same order.
    pub qkv_bias: Option<Vec<Part>>,
    /// Columns of this rank's heads.
    pub o: Part,
    pub post_norm: Part,
    /// `[gate | up]` rows of this rank's intermediate slice.
    pub gate_up: Vec<Part>,
    /// Columns of this rank's intermediate slice.
    pub down: Part,
}

/// Every tensor this rank holds.
pub struct ModelParts {
    pub layers: Vec<LayerParts>,
    /// Rows `shard.vocab` of the embedding (also the lm_head when tied).
    pub embed: Part,
    /// Rows `shard.vocab` of the lm_head; `None` when tied to the embedding.
    pub lm_head: Option<Part>,
    pub final_norm: Part,
}

/// The tensors of `config`'s model that `shard` holds (Megatron split: q/k/v and gate/up by rows,
/// o and down by columns, embedding and lm_head by vocabulary rows).
pub fn model_parts(config: &LlamaConfig, shard: &ShardPlan, source: &WeightSource) -> ModelParts {
    let (h, hd) = (config.hidden_size, config.head_dim);
    let q = (shard.q_heads.start * hd)..(shard.q_heads.end * hd);
    let kv = (shard.kv_heads.start * hd)..(shard.kv_heads.end * hd);
    let inter = shard.intermediate.clone();
    let rows = |name: String, r: &Range<usize>, cols: Option<usize>| {
        let shape = cols.map_or(vec![r.len()], |c| vec![r.len(), c]);
        Part::new(name, Some((0, r.clone())), shape)
    };
    let cols =
        |name: String, r: &Range<usize>| Part::new(name, Some((1, r.clone())), vec![h, r.len()]);
    let whole = |name: String| Part::new(name, None, vec![h]);
    // A headless checkpoint (`LlamaModel`, as e5-mistral's) names its tensors without the
    // `model.` prefix that the `*ForCausalLM` ones use.
    let prefix = match source {
        WeightSource::Reader(r)
            if !r.contains("model.embed_tokens.weight") && r.contains("embed_tokens.weight") =>
        {
            ""
        }
        _ => "model.",
    };
    let layers = (0..config.num_hidden_layers)
        .map(|i| {
            let p = format!("{prefix}layers.{i}");
            let attn = |m: &str, kind: &str, r: &Range<usize>, c: Option<usize>| {
                rows(format!("{p}.self_attn.{m}_proj.{kind}"), r, c)
            };
            LayerParts {
                input_norm: whole(format!("{p}.input_layernorm.weight")),
                qkv: vec![
                    attn("q", "weight", &q, Some(h)),
                    attn("k", "weight", &kv, Some(h)),
                    attn("v", "weight", &kv, Some(h)),
                ],
                qkv_bias: config.attention_bias.then(|| {
                    vec![
                        attn("q", "bias", &q, None),
                        attn("k", "bias", &kv, None),
                        attn("v", "bias", &kv, None),
                    ]
                }),
                o: cols(format!("{p}.self_attn.o_proj.weight"), &q),
                post_norm: whole(format!("{p}.post_attention_layernorm.weight")),
                gate_up: vec![
                    rows(format!("{p}.mlp.gate_proj.weight"), &inter, Some(h)),
                    rows(format!("{p}.mlp.up_proj.weight"), &inter, Some(h)),
                ],
                down: cols(format!("{p}.mlp.down_proj.weight"), &inter),
            }
        })
        .collect();
    let has_lm_head = match source {
        WeightSource::Reader(r) => r.contains("lm_head.weight"),
        WeightSource::Dummy(_) => !config.tie_word_embeddings && !config.is_headless(),
    };
    ModelParts {
        layers,
        embed: rows(
            format!("{prefix}embed_tokens.weight"),
            &shard.vocab,
            Some(h),
        ),
        lm_head: has_lm_head.then(|| rows("lm_head.weight".into(), &shard.vocab, Some(h))),
        final_norm: whole(format!("{prefix}norm.weight")),
    }
}

impl ModelParts {
    /// How many checkpoint tensors (or slices of them) the rank reads.
    pub fn count(&self) -> usize {
        let per_layer = |l: &LayerParts| {
            4 + l.qkv.len() + l.qkv_bias.as_ref().map_or(0, Vec::len) + l.gate_up.len()
        };
        self.layers.iter().map(per_layer).sum::<usize>() + 2 + usize::from(self.lm_head.is_some())
    }
}

/// The range dummy values of a tensor are drawn from: norm weights are all 1, everything else
/// uniform in [-0.02, 0.02).
pub fn dummy_range(name: &str) -> (f32, f32) {
    if name.ends_with("norm.weight") {
        (1.0, 1.0)
    } else {
        (-0.02, 0.02)
    }
}

/// Reads `part` as f32.
pub fn read(source: &WeightSource, part: &Part) -> Result<Vec<f32>> {
    let name = part.name.as_str();
    match source {
        WeightSource::Reader(reader) => {
            let t = match &part.slice {
                Some((dim, r)) => reader.read_slice(name, *dim, r.start, r.len())?,
                None => reader.read(name)?,
            };
            if t.dims() != part.shape.as_slice() {
                return Err(tensor_err(
                    name,
                    format!("shape {:?}, expected {:?}", t.dims(), part.shape),
                ));
            }
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| tensor_err(name, e))
        }
        WeightSource::Dummy(seed) => {
            let n = part.elements();
            let mut rng = rand::rngs::StdRng::seed_from_u64(tensor_seed(*seed, name));
            match dummy_range(name) {
                (low, high) if low == high => Ok(vec![low; n]),
                (low, high) => Ok((0..n).map(|_| rng.gen_range(low..high)).collect()),
            }
        }
    }
}

/// Reads fused parts one after another.
pub fn read_fused(source: &WeightSource, parts: &[Part]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(total_len(parts));
    for part in parts {
        out.extend(read(source, part)?);
    }
    Ok(out)
}

/// Reads fused parts in their stored quantized blocks, stacked by rows: `None` when the source
/// does not hold every part quantized (safetensors, dummy weights, F32/F16 GGUF tensors) or a
/// part's column slice would cut blocks (tensor parallelism over a dimension that is not a
/// multiple of the block size); the caller then reads f32.
pub fn read_quantized_fused(
    source: &WeightSource,
    parts: &[Part],
) -> Result<Option<Vec<QuantizedTensor>>> {
    let WeightSource::Reader(reader) = source else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        let Some(t) = reader.read_quantized(&part.name)? else {
            return Ok(None);
        };
        let t = match &part.slice {
            Some((dim, r)) => match t.narrow(*dim, r.start, r.len()) {
                Some(t) => t,
                None => return Ok(None),
            },
            None => t,
        };
        if [t.rows, t.cols] != part.shape[..] {
            return Err(tensor_err(
                &part.name,
                format!("shape [{}, {}], expected {:?}", t.rows, t.cols, part.shape),
            ));
        }
        out.push(t);
    }
    Ok(Some(out))
}

/// Resolves a load request to the model's config and weights as rank `rank` of `world` sees
/// them, and calls `load` with them: a checkpoint read in the requested format, or random weights
/// of a config.json's shape ([`LoadFormat::Dummy`]).
pub fn load_shard<T>(
    spec: &LoadSpec,
    rank: usize,
    world: usize,
    load: impl FnOnce(&LlamaConfig, ShardPlan, &WeightSource) -> Result<T>,
) -> Result<T> {
    let path = Path::new(&spec.model_path);
    let format = match spec.format {
        LoadFormat::Dummy { seed } => {
            let config = dummy_config(path)?;
            let shard = ShardPlan::new(&config, rank, world)?;
            return load(&config, shard, &WeightSource::Dummy(seed));
        }
        LoadFormat::Checkpoint(format) => format,
    };
    let source = ModelSource::open(path, format)?;
    let config = source.config().clone();
    let shard = ShardPlan::new(&config, rank, world)?;
    let weights = source.weights()?;
    let tensors = model_parts(&config, &shard, &WeightSource::Reader(weights.as_ref())).count();
    let counted = Counted {
        inner: weights.as_ref(),
        task: Task::new("loading weights", tensors as u64, Unit::items("tensors")),
    };
    let loaded = load(&config, shard, &WeightSource::Reader(&counted));
    counted.task.finish();
    loaded
}

/// A reader that counts the tensors read, for the progress of a load.
struct Counted<'a> {
    inner: &'a dyn WeightReader,
    task: Task,
}

impl WeightReader for Counted<'_> {
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn shape(&self, name: &str) -> tpserve_modelfile::Result<Vec<usize>> {
        self.inner.shape(name)
    }

    fn read(&self, name: &str) -> tpserve_modelfile::Result<candle_core::Tensor> {
        let t = self.inner.read(name);
        self.task.inc(1);
        t
    }

    fn read_slice(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        len: usize,
    ) -> tpserve_modelfile::Result<candle_core::Tensor> {
        let t = self.inner.read_slice(name, dim, start, len);
        self.task.inc(1);
        t
    }

    fn read_quantized(&self, name: &str) -> tpserve_modelfile::Result<Option<QuantizedTensor>> {
        let t = self.inner.read_quantized(name);
        if matches!(t, Ok(Some(_))) {
            self.task.inc(1);
        }
        t
    }

    fn stored_dtype(&self, name: &str) -> Option<StoredDtype> {
        self.inner.stored_dtype(name)
    }

    fn read_stored(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> tpserve_modelfile::Result<Option<StoredTensor<'_>>> {
        let t = self.inner.read_stored(name, slice);
        if matches!(t, Ok(Some(_))) {
            self.task.inc(1);
        }
        t
    }

    fn read_fp8(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> tpserve_modelfile::Result<Option<Fp8Tensor>> {
        let t = self.inner.read_fp8(name, slice);
        if matches!(t, Ok(Some(_))) {
            self.task.inc(1);
        }
        t
    }

    fn read_int4(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> tpserve_modelfile::Result<Option<Int4Tensor>> {
        let t = self.inner.read_int4(name, slice);
        if matches!(t, Ok(Some(_))) {
            self.task.inc(1);
        }
        t
    }
}

/// The config of a `dummy` model: `path` is a config.json or a directory holding one.
fn dummy_config(path: &Path) -> Result<LlamaConfig> {
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

/// What a load request asks of the weights' quantization (`LoadModelRequest.quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizationRequest {
    /// Keep GGUF blocks, or an FP8 checkpoint's FP8 weights, where the backend runs them, else
    /// dequantize.
    Auto,
    /// Keep GGUF blocks; refused where the backend cannot.
    Gguf,
    /// Dequantize everything.
    None,
    /// Linear weights in FP8 E4M3: an FP8 checkpoint's as stored, others quantized at load
    /// with per-tensor scales (CUDA, compute capability 8.9+).
    Fp8,
}

impl QuantizationRequest {
    /// Parses the request's field; other methods are refused by name.
    pub fn parse(quantization: &str) -> Result<Self> {
        match quantization {
            "" | "auto" => Ok(Self::Auto),
            "gguf" => Ok(Self::Gguf),
            "none" => Ok(Self::None),
            "fp8" => Ok(Self::Fp8),
            other => Err(WorkerError::Unsupported {
                detail: format!(
                    "quantization method {other:?} (this worker runs: gguf on the CPU, fp8 on \
                     CUDA GPUs of compute capability 8.9 or newer, none)"
                ),
            }),
        }
    }
}

/// Refuses architectures the backends do not implement.
pub fn ensure_supported(config: &LlamaConfig) -> Result<()> {
    if matches!(
        config.architecture.as_str(),
        "LlamaForCausalLM"
            | "MistralForCausalLM"
            | "Qwen2ForCausalLM"
            | "LlamaModel"
            | "MistralModel"
            | "Qwen2Model"
    ) {
        Ok(())
    } else {
        Err(WorkerError::Unsupported {
            detail: format!(
                "architecture {} (supported: Llama, Mistral, Qwen2, with or without an LM head)",
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
) -> LoadedModel {
    LoadedModel {
        weight_bytes: weight_bytes as u64,
        num_layers: config.num_hidden_layers,
        num_kv_heads_per_rank: kv_heads_per_rank,
        head_dim: config.head_dim,
        vocab_size: config.vocab_size,
        load_seconds: started.elapsed().as_secs_f64(),
        // Set by the backend, which knows how it holds the weights.
        quantization: String::new(),
        weight_types: String::new(),
        kv_cache_dtype: String::new(),
    }
}
