//! What the paged KV cache stores (`LoadModelRequest.kv_cache_dtype`, vLLM's `--kv-cache-dtype`):
//! the compute dtype, or FP8 E4M3 with one scale per layer for keys and one for values, which
//! halves the cache's bytes (twice the tokens in the same memory, half the bytes a decode step's
//! attention reads) for the rounding of three mantissa bits.

use crate::weights::WeightSource;
use crate::{Result, WorkerError};

/// What the KV cache stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDtype {
    /// The compute dtype.
    #[default]
    Compute,
    /// FP8 E4M3: a key `k` is stored as E4M3(k / k_scale), a value as E4M3(v / v_scale).
    Fp8E4M3,
}

impl KvCacheDtype {
    /// Parses the request's field: `""`/`auto`, or `fp8`/`fp8_e4m3`; others are refused by name.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "" | "auto" => Ok(Self::Compute),
            "fp8" | "fp8_e4m3" => Ok(Self::Fp8E4M3),
            other => Err(WorkerError::Unsupported {
                detail: format!(
                    "kv cache dtype {other:?} (this worker stores auto, the compute dtype, or \
                     fp8 / fp8_e4m3 on CUDA GPUs of compute capability 8.9 or newer)"
                ),
            }),
        }
    }

    /// The name `LoadModelResponse.kv_cache_dtype` gives: `compute` (the compute dtype's name)
    /// or `fp8_e4m3`.
    pub fn name(self, compute: &str) -> String {
        match self {
            Self::Compute => compute.to_string(),
            Self::Fp8E4M3 => "fp8_e4m3".to_string(),
        }
    }
}

/// One layer's key and value scales for an FP8 cache, as a checkpoint gives them (vLLM reads
/// the same names): `self_attn.k_scale` and `self_attn.v_scale`; an older single
/// `self_attn.kv_scale` for both; or llm-compressor's `self_attn.k_proj.output_scale` and
/// `self_attn.v_proj.output_scale`. 1 where the checkpoint has none (vLLM's default too;
/// keys and values then must fit E4M3's +-448 as they are). Each must be one finite positive
/// number.
pub fn layer_kv_scales(source: &WeightSource, layer: usize) -> Result<(f32, f32)> {
    let WeightSource::Reader(reader) = source else {
        return Ok((1.0, 1.0));
    };
    let prefix = format!("model.layers.{layer}.self_attn");
    let scale = |names: &[String]| -> Result<Option<f32>> {
        let Some(name) = names.iter().find(|n| reader.contains(n)) else {
            return Ok(None);
        };
        let values = reader
            .read(name)?
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| crate::weights::tensor_err(name, e))?;
        match values[..] {
            [v] if v.is_finite() && v > 0.0 => Ok(Some(v)),
            _ => Err(crate::weights::tensor_err(
                name,
                format!("a KV cache scale must be one finite positive number, not {values:?}"),
            )),
        }
    };
    let both = scale(&[format!("{prefix}.kv_scale")])?;
    let k = scale(&[
        format!("{prefix}.k_scale"),
        format!("{prefix}.k_proj.output_scale"),
    ])?;
    let v = scale(&[
        format!("{prefix}.v_scale"),
        format!("{prefix}.v_proj.output_scale"),
    ])?;
    Ok((k.or(both).unwrap_or(1.0), v.or(both).unwrap_or(1.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vllm_names_and_refuses_others_by_name() {
        assert_eq!(KvCacheDtype::parse("").unwrap(), KvCacheDtype::Compute);
        assert_eq!(KvCacheDtype::parse("auto").unwrap(), KvCacheDtype::Compute);
        assert_eq!(KvCacheDtype::parse("fp8").unwrap(), KvCacheDtype::Fp8E4M3);
        assert_eq!(
            KvCacheDtype::parse("fp8_e4m3").unwrap(),
            KvCacheDtype::Fp8E4M3
        );
        let err = KvCacheDtype::parse("fp8_e5m2").unwrap_err().to_string();
        assert!(err.contains("\"fp8_e5m2\""), "{err}");
        assert_eq!(KvCacheDtype::Fp8E4M3.name("bfloat16"), "fp8_e4m3");
        assert_eq!(KvCacheDtype::Compute.name("bfloat16"), "bfloat16");
    }

    /// A checkpoint of scalar f32 tensors only (all `layer_kv_scales` reads).
    fn scales_file(dir: &std::path::Path, tensors: &[(&str, Vec<f32>)]) -> std::path::PathBuf {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((name, v), b)| {
                let shape = if v.len() == 1 { vec![] } else { vec![v.len()] };
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, b)
                    .unwrap();
                (name.to_string(), view)
            })
            .collect();
        let path = dir.join("model.safetensors");
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }

    #[test]
    fn scales_come_from_the_names_vllm_reads_else_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = scales_file(
            dir.path(),
            &[
                ("model.layers.0.self_attn.k_scale", vec![0.5]),
                ("model.layers.0.self_attn.v_scale", vec![0.25]),
                ("model.layers.1.self_attn.kv_scale", vec![2.0]),
                ("model.layers.2.self_attn.k_proj.output_scale", vec![3.0]),
                ("model.layers.2.self_attn.v_proj.output_scale", vec![4.0]),
                ("model.layers.4.self_attn.k_scale", vec![-1.0]),
                ("model.layers.5.self_attn.v_scale", vec![1.0, 2.0]),
            ],
        );
        let reader = tpserve_modelfile::weights::SafetensorsReader::open_file(&path).unwrap();
        let source = WeightSource::Reader(&reader);
        assert_eq!(layer_kv_scales(&source, 0).unwrap(), (0.5, 0.25));
        assert_eq!(layer_kv_scales(&source, 1).unwrap(), (2.0, 2.0));
        assert_eq!(layer_kv_scales(&source, 2).unwrap(), (3.0, 4.0));
        assert_eq!(layer_kv_scales(&source, 3).unwrap(), (1.0, 1.0));
        for layer in [4, 5] {
            let err = layer_kv_scales(&source, layer).unwrap_err().to_string();
            assert!(err.contains("one finite positive number"), "{err}");
        }
        assert_eq!(
            layer_kv_scales(&WeightSource::Dummy(7), 0).unwrap(),
            (1.0, 1.0)
        );
    }
}
