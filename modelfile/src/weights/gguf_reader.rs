//! GGUF weights under Hugging Face names, dequantized to f32 by candle.
//!
//! Invariants: the file is the one [`crate::ModelSource`] parsed (shared, never re-parsed); only
//! tensors with a Hugging Face counterpart are listed; for `llama` files the q/k projections
//! (weights and biases) are un-permuted from llama.cpp's interleaved-RoPE row order. Costs: a
//! read dequantizes the whole tensor (any type candle supports: F32, F16, BF16, Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, Q8_1, Q2K..Q8K); `read_slice` narrows after that and copies the slice.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::{check_slice, QuantizedTensor, WeightReader};
use crate::error::{Error, Result};
use crate::gguf::{hf_name, unpermute_rows, GgufFile, Permuted};

/// Weights of a GGUF file.
pub struct GgufReader {
    file: Arc<GgufFile>,
    /// HF name -> (GGUF name, permutation to undo).
    map: HashMap<String, (String, Permuted)>,
    n_head: usize,
    n_kv_head: usize,
}

impl GgufReader {
    pub(crate) fn new(file: Arc<GgufFile>, config: &crate::LlamaConfig) -> Self {
        let interleaved = config.architecture == "LlamaForCausalLM";
        let map = file
            .content
            .tensor_infos
            .keys()
            .filter_map(|g| hf_name(g, interleaved).map(|(hf, p)| (hf, (g.clone(), p))))
            .collect();
        GgufReader {
            file,
            map,
            n_head: config.num_attention_heads,
            n_kv_head: config.num_key_value_heads,
        }
    }

    fn lookup(&self, name: &str) -> Result<&(String, Permuted)> {
        self.map.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }
}

impl WeightReader for GgufReader {
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.map.keys().cloned().collect();
        names.sort();
        names
    }

    fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let (gguf_name, _) = self.lookup(name)?;
        match self.file.content.tensor_infos.get(gguf_name) {
            Some(info) => Ok(info.shape.dims().to_vec()),
            None => Err(Error::MissingTensor {
                name: name.to_string(),
            }),
        }
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        let (gguf_name, permuted) = self.lookup(name)?;
        let w = self.file.dequantize(gguf_name).map_err(|e| match e {
            // Report the name the caller asked for, not llama.cpp's.
            Error::Tensor { detail, .. } => Error::tensor(name, format!("{gguf_name}: {detail}")),
            other => other,
        })?;
        let heads = match permuted {
            Permuted::No => return Ok(w),
            Permuted::Query => self.n_head,
            Permuted::Key => self.n_kv_head,
        };
        unpermute_rows(&w, heads)
            .map_err(|e| Error::tensor(name, format!("un-permuting q/k rows: {e}")))
    }

    fn read_quantized(&self, name: &str) -> Result<Option<QuantizedTensor>> {
        let (gguf_name, permuted) = self.lookup(name)?;
        let Some(info) = self.file.content.tensor_infos.get(gguf_name) else {
            return Err(Error::MissingTensor {
                name: name.to_string(),
            });
        };
        let &[rows, cols] = info.shape.dims() else {
            return Ok(None);
        };
        if !QuantizedTensor::is_quantized_type(info.ggml_dtype) {
            return Ok(None);
        }
        let bytes = self.file.tensor_bytes(gguf_name, info)?;
        let heads = match permuted {
            Permuted::No => 1,
            Permuted::Query => self.n_head,
            Permuted::Key => self.n_kv_head,
        };
        let data = unpermute_row_bytes(bytes, rows, heads)
            .map_err(|detail| Error::tensor(name, format!("un-permuting q/k rows: {detail}")))?;
        QuantizedTensor::new(info.ggml_dtype, rows, cols, data)
            .map(Some)
            .map_err(|e| Error::tensor(name, e))
    }

    fn read_slice(&self, name: &str, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let shape = self.shape(name)?;
        check_slice(name, &shape, dim, start, len)?;
        let w = self.read(name)?;
        w.narrow(dim, start, len)
            .and_then(|t| t.contiguous())
            .map_err(|e| Error::tensor(name, e))
    }
}

/// [`unpermute_rows`] on raw rows of blocks: HF row `h*D + t*D/2 + j` is GGUF row `h*D + 2j + t`
/// (`D` rows a head, `t` in {0, 1}). One head is the identity.
fn unpermute_row_bytes(
    bytes: &[u8],
    rows: usize,
    n_head: usize,
) -> std::result::Result<Vec<u8>, String> {
    if n_head == 1 {
        return Ok(bytes.to_vec());
    }
    if n_head == 0 || rows == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(format!(
            "{rows} rows cannot be split into {n_head} heads of even size"
        ));
    }
    let rb = bytes.len() / rows;
    let d = rows / n_head;
    let mut out = Vec::with_capacity(bytes.len());
    for h in 0..n_head {
        for t in 0..2 {
            for j in 0..d / 2 {
                let g = h * d + 2 * j + t;
                out.extend_from_slice(&bytes[g * rb..(g + 1) * rb]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn row_bytes_unpermute_like_the_tensor_unpermute() {
        let (rows, cols, heads) = (12, 3, 2);
        let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let gguf = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu).unwrap();
        let want = unpermute_rows(&gguf, heads)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let got: Vec<f32> = unpermute_row_bytes(&bytes, rows, heads)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got, want);
        assert!(unpermute_row_bytes(&bytes, rows, 5).is_err());
    }
}
