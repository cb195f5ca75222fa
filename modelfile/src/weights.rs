//! Weight access under Hugging Face tensor names, whatever the file format: [`WeightReader`],
//! implemented by [`SafetensorsReader`] (one file, or shards listed by
//! `model.safetensors.index.json`) and [`GgufReader`] (one GGUF file, dequantized by candle).
//!
//! Invariants: every name a reader lists can be read; shapes are in Hugging Face (PyTorch,
//! row-major) order; every tensor comes back as f32 on `Device::Cpu` (FP8 weights multiplied by
//! their scales, [`fp8`]; AWQ/GPTQ layers, listed as `X.weight`, dequantized, [`packed_int`]); files are mapped once when
//! the reader is built and never re-parsed. GGUF q/k projections come back un-permuted (see
//! [`crate::gguf`]), so the worker can use rotate-half RoPE for every format. Costs: safetensors
//! reads copy and convert only the requested bytes from the mapping; GGUF reads dequantize the
//! whole tensor (a slice narrows afterwards), about one f32 copy of the tensor, and GGUF's
//! quantized tensors can also be read as their blocks ([`WeightReader::read_quantized`]).

pub mod fp8;
mod gguf_reader;
pub mod packed_int;
mod quantized;
mod safetensors_reader;

pub use fp8::{Fp8Scale, Fp8Tensor};
pub use gguf_reader::GgufReader;
pub use packed_int::Int4Tensor;
pub use quantized::QuantizedTensor;
pub use safetensors_reader::SafetensorsReader;

use crate::error::Result;

/// The element types a safetensors checkpoint stores that the readers take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    Bf16,
    F8E4M3,
}

/// A tensor or slice as stored: row-major little-endian elements of `dtype`, shape `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor<'a> {
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

/// Read access to a model's weights under Hugging Face names.
pub trait WeightReader: Send + Sync {
    /// Names of all tensors, in Hugging Face naming ("model.embed_tokens.weight",
    /// "model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "lm_head.weight", ...),
    /// sorted.
    fn names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    /// The tensor's shape in HF (row-major, PyTorch) order, e.g. q_proj [out_features, in_features].
    fn shape(&self, name: &str) -> Result<Vec<usize>>;
    /// The whole tensor as an f32 candle Tensor on Device::Cpu, HF shape.
    fn read(&self, name: &str) -> Result<candle_core::Tensor>;
    /// A slice `start..start+len` along dimension `dim`, as f32. Safetensors reads only those
    /// bytes (mmap); GGUF dequantizes the whole tensor and narrows.
    fn read_slice(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<candle_core::Tensor>;
    /// The whole 2-D tensor in its stored quantized blocks (un-permuted like `read`), or `None`
    /// when it is not stored quantized (safetensors, or GGUF F32/F16/BF16).
    fn read_quantized(&self, name: &str) -> Result<Option<QuantizedTensor>> {
        let _ = name;
        Ok(None)
    }
    /// The dtype `name` is stored in, without reading it; `None` where the reader has no stored
    /// bytes to give (GGUF) or no such tensor. What [`Self::read_stored`] and
    /// [`Self::read_fp8`] would hand over, so a caller can choose its read before making it.
    fn stored_dtype(&self, name: &str) -> Option<StoredDtype> {
        let _ = name;
        None
    }
    /// The tensor `name` (or its slice `(dim, start, len)`) as stored: its bytes (borrowed from
    /// the file's mapping where the slice is contiguous) and dtype, for backends that keep the
    /// stored dtype; `None` where the reader has no stored bytes to give (GGUF).
    fn read_stored(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> Result<Option<StoredTensor<'_>>> {
        let _ = (name, slice);
        Ok(None)
    }
    /// The 2-D weight `name` (or its slice `(dim, start, len)`) as stored in FP8 E4M3 with
    /// per-tensor or per-row scales ([`fp8`]), or `None` when it is not stored so (any other
    /// dtype, or block scales, which only `read` dequantizes).
    fn read_fp8(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> Result<Option<Fp8Tensor>> {
        let _ = (name, slice);
        Ok(None)
    }
    /// The 2-D weight `name` (or its slice `(dim, start, len)`) of an AWQ/GPTQ checkpoint in
    /// the 4-bit layout backends multiply ([`packed_int::Int4Tensor`]), or `None` when it is not
    /// stored packed or that layout cannot hold it ([`packed_int::PackedIntWeight::int4`]).
    fn read_int4(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> Result<Option<Int4Tensor>> {
        let _ = (name, slice);
        Ok(None)
    }
}

/// Checks a slice request against a shape; shared by both readers so they fail alike.
pub(crate) fn check_slice(
    name: &str,
    shape: &[usize],
    dim: usize,
    start: usize,
    len: usize,
) -> Result<()> {
    let Some(&size) = shape.get(dim) else {
        return Err(crate::Error::tensor(
            name,
            format!("slice along dim {dim} of a tensor of shape {shape:?}"),
        ));
    };
    match start.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::tensor(
            name,
            format!(
                "slice {start}..{start}+{len} along dim {dim} of size {size} (shape {shape:?})"
            ),
        )),
    }
}
