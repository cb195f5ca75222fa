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
}
