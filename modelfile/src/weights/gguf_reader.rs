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

use super::{check_slice, WeightReader};
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

    fn read_slice(&self, name: &str, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let shape = self.shape(name)?;
        check_slice(name, &shape, dim, start, len)?;
        let w = self.read(name)?;
        w.narrow(dim, start, len)
            .and_then(|t| t.contiguous())
            .map_err(|e| Error::tensor(name, e))
    }
}
