//! Crate-private GGUF plumbing: the file, mapped and parsed once; typed metadata look-ups; the
//! llama.cpp -> Hugging Face tensor name map; and the q/k row un-permutation.
//!
//! Invariants: a [`GgufFile`] is parsed exactly once (header, metadata, tensor infos) and then
//! shared (`Arc`) by the config, the tokenizer and the weight reader; tensor bytes are only
//! touched when a tensor is read. candle's reader already reverses GGUF's dimension order, so
//! `TensorInfo::shape` is in Hugging Face (row-major) order. Costs: opening maps the file and
//! parses its header (for SmolLM2: 49k token strings and 49k merges, a few tens of ms).

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::Tensor;

use crate::error::{Error, Result};

/// A GGUF file, memory-mapped, with its parsed header.
pub(crate) struct GgufFile {
    pub path: PathBuf,
    pub mmap: memmap2::Mmap,
    pub content: gguf_file::Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process; like every reader of
        // model files (llama.cpp, candle, safetensors) we accept that another process truncating
        // or rewriting the file while it is mapped is outside our control.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut Cursor::new(&mmap[..])).map_err(|e| {
            let msg = e.to_string();
            match msg.find("unknown dtype for tensor ") {
                Some(at) => Error::UnsupportedTensorType {
                    tensor: "(one of the file's tensors: candle's GGUF reader stops at the first unknown type)"
                        .to_string(),
                    dtype: format!("ggml type {}", &msg[at + "unknown dtype for tensor ".len()..]),
                },
                None => Error::parse(path, format!("not a readable GGUF file: {msg}")),
            }
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// The bytes of one tensor, bounds-checked against the file. GGUF requires tensor data to be
    /// aligned to `general.alignment` (a multiple of 8); data that is not 8-aligned is rejected
    /// because candle reinterprets it as blocks of f16/f32 fields.
    pub fn tensor_bytes(&self, gguf_name: &str, info: &gguf_file::TensorInfo) -> Result<&[u8]> {
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count();
        let block = dtype.block_size();
        if block == 0 || !elems.is_multiple_of(block) {
            return Err(Error::tensor(
                gguf_name,
                format!("{elems} elements is not a whole number of {dtype:?} blocks of {block}"),
            ));
        }
        let size = (elems / block)
            .checked_mul(dtype.type_size())
            .ok_or_else(|| Error::tensor(gguf_name, "tensor size overflows"))?;
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| {
                Error::parse(&self.path, format!("tensor `{gguf_name}` offset overflows"))
            })?;
        let bytes = start
            .checked_add(size)
            .and_then(|end| self.mmap.get(start..end))
            .ok_or_else(|| {
                Error::parse(
                    &self.path,
                    format!("tensor `{gguf_name}` ({size} bytes at {start}) runs past the end of the file"),
                )
            })?;
        if !(bytes.as_ptr() as usize).is_multiple_of(8) {
            return Err(Error::parse(
                &self.path,
                format!("tensor `{gguf_name}` data at {start} is not 8-byte aligned"),
            ));
        }
        Ok(bytes)
    }

    /// Dequantizes one tensor (GGUF name) to f32 on the CPU, in Hugging Face dimension order.
    pub fn dequantize(&self, gguf_name: &str) -> Result<Tensor> {
        let info =
            self.content
                .tensor_infos
                .get(gguf_name)
                .ok_or_else(|| Error::MissingTensor {
                    name: gguf_name.to_string(),
                })?;
        let bytes = self.tensor_bytes(gguf_name, info)?;
        let cpu = candle_core::Device::Cpu;
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            info.ggml_dtype,
            bytes,
            info.shape.dims().to_vec(),
            &cpu,
        )
        .map_err(|e| Error::tensor(gguf_name, e))?;
        q.dequantize(&cpu).map_err(|e| Error::tensor(gguf_name, e))
    }
}

fn meta_get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value> {
    md.get(key).ok_or_else(|| Error::GgufMetadata {
        key: key.to_string(),
        detail: "missing".to_string(),
    })
}

fn wrong_type(key: &str, want: &str, v: &Value) -> Error {
    Error::GgufMetadata {
        key: key.to_string(),
        detail: format!("expected {want}, found {:?}", v.value_type()),
    }
}

/// Any integer value as u64 (negative values are `None`).
pub(crate) fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

pub(crate) fn meta_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize> {
    let v = meta_get(md, key)?;
    value_u64(v)
        .and_then(|x| usize::try_from(x).ok())
        .ok_or_else(|| wrong_type(key, "a non-negative integer", v))
}

pub(crate) fn meta_u32(md: &HashMap<String, Value>, key: &str) -> Result<u32> {
    let v = meta_get(md, key)?;
    value_u64(v)
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| wrong_type(key, "a u32", v))
}

/// A float value as f64. An f32 is widened through its shortest decimal form, so GGUF's
/// `1e-5f32` becomes the `1e-5` that `config.json` says rather than `9.99999974e-6`.
pub(crate) fn meta_f64(md: &HashMap<String, Value>, key: &str) -> Result<f64> {
    let v = meta_get(md, key)?;
    match *v {
        Value::F32(x) => x
            .to_string()
            .parse::<f64>()
            .map_err(|_| wrong_type(key, "a finite float", v)),
        Value::F64(x) => Ok(x),
        _ => value_u64(v)
            .map(|x| x as f64)
            .ok_or_else(|| wrong_type(key, "a number", v)),
    }
}

pub(crate) fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a str> {
    match meta_get(md, key)? {
        Value::String(s) => Ok(s.as_str()),
        v => Err(wrong_type(key, "a string", v)),
    }
}

pub(crate) fn meta_bool(md: &HashMap<String, Value>, key: &str) -> Result<bool> {
    match meta_get(md, key)? {
        Value::Bool(b) => Ok(*b),
        v => value_u64(v)
            .map(|x| x != 0)
            .ok_or_else(|| wrong_type(key, "a bool", v)),
    }
}

pub(crate) fn meta_array<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a [Value]> {
    match meta_get(md, key)? {
        Value::Array(items) => Ok(items.as_slice()),
        v => Err(wrong_type(key, "an array", v)),
    }
}

pub(crate) fn meta_strings<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    meta_array(md, key)?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(wrong_type(key, "an array of strings", other)),
        })
        .collect()
}

/// Which rows of a tensor llama.cpp permuted for its interleaved RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Permuted {
    No,
    /// q projection: heads = num_attention_heads.
    Query,
    /// k projection: heads = num_key_value_heads.
    Key,
}

/// Maps a llama.cpp tensor name to its Hugging Face name, and says whether its rows are permuted
/// (only for architectures that llama.cpp runs with interleaved RoPE, i.e. `llama`; `qwen2` uses
/// the NeoX ordering and is stored unpermuted). `None` for names with no Hugging Face
/// counterpart (e.g. `rope_freqs.weight`).
pub(crate) fn hf_name(gguf_name: &str, interleaved_rope: bool) -> Option<(String, Permuted)> {
    match gguf_name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), Permuted::No)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), Permuted::No)),
        "output.weight" => return Some(("lm_head.weight".into(), Permuted::No)),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (hf_module, permuted) = match module {
        "attn_norm" => ("input_layernorm", Permuted::No),
        "ffn_norm" => ("post_attention_layernorm", Permuted::No),
        "attn_q" => ("self_attn.q_proj", Permuted::Query),
        "attn_k" => ("self_attn.k_proj", Permuted::Key),
        "attn_v" => ("self_attn.v_proj", Permuted::No),
        "attn_output" => ("self_attn.o_proj", Permuted::No),
        "ffn_gate" => ("mlp.gate_proj", Permuted::No),
        "ffn_up" => ("mlp.up_proj", Permuted::No),
        "ffn_down" => ("mlp.down_proj", Permuted::No),
        _ => return None,
    };
    let permuted = if interleaved_rope {
        permuted
    } else {
        Permuted::No
    };
    Some((format!("model.layers.{layer}.{hf_module}.{kind}"), permuted))
}

fn regroup_rows(w: &Tensor, n_head: usize, to_hf: bool) -> candle_core::Result<Tensor> {
    let shape = w.dims().to_vec();
    let Some(&rows) = shape.first() else {
        candle_core::bail!("a scalar has no rows to regroup into heads")
    };
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        candle_core::bail!("{rows} rows cannot be split into {n_head} heads of even size")
    }
    let cols: usize = shape[1..].iter().product();
    let half = rows / n_head / 2;
    // GGUF row h*D + 2j + t holds HF row h*D + t*D/2 + j (D = head size, t in {0, 1}).
    let grouped = if to_hf {
        (n_head, half, 2, cols)
    } else {
        (n_head, 2, half, cols)
    };
    w.reshape(grouped)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(shape)
}

/// Undoes llama.cpp's q/k permutation: GGUF (interleaved RoPE) rows -> Hugging Face
/// (rotate-half) rows, i.e. `w.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2)`. Works
/// for weights `[rows, cols]` and biases `[rows]`. Costs one copy of the tensor.
pub(crate) fn unpermute_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    regroup_rows(w, n_head, true)
}

/// llama.cpp's permutation (HF -> GGUF), the inverse of [`unpermute_rows`]; for tests and for
/// writing GGUF fixtures.
#[cfg(test)]
pub(crate) fn permute_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    regroup_rows(w, n_head, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows_tensor(rows: usize, cols: usize) -> Tensor {
        // Row r holds r*cols .. r*cols+cols, so a row's first value names it.
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    fn first_col(t: &Tensor, cols: usize) -> Vec<usize> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.chunks(cols).map(|r| r[0] as usize / cols).collect()
    }

    #[test]
    fn llama_cpp_permute_interleaves_the_two_halves_of_each_head() {
        // Two heads of size 4: HF rows (h, t, j) = h*4 + t*2 + j go to GGUF rows h*4 + 2j + t.
        let hf = rows_tensor(8, 3);
        let gguf = permute_rows(&hf, 2).unwrap();
        assert_eq!(first_col(&gguf, 3), vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn gguf_q_and_k_are_unpermuted_to_hf_layout() {
        // A GGUF-permuted matrix built with llama.cpp's formula from a known HF matrix comes back
        // as the HF matrix, for q (9 heads of 64 like SmolLM2) and k (3 heads), and for biases.
        for heads in [9, 3, 1] {
            let hf = rows_tensor(heads * 64, 5);
            let gguf = permute_rows(&hf, heads).unwrap();
            assert_ne!(first_col(&gguf, 5), first_col(&hf, 5));
            let back = unpermute_rows(&gguf, heads).unwrap();
            assert_eq!(first_col(&back, 5), (0..heads * 64).collect::<Vec<_>>());
        }
        let bias = Tensor::arange(0f32, 8.0, &Device::Cpu).unwrap();
        let gguf_bias = permute_rows(&bias, 2).unwrap();
        assert_eq!(
            gguf_bias.to_vec1::<f32>().unwrap(),
            vec![0., 2., 1., 3., 4., 6., 5., 7.]
        );
        assert_eq!(
            unpermute_rows(&gguf_bias, 2)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            bias.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn unpermute_rejects_rows_that_do_not_split_into_heads() {
        assert!(unpermute_rows(&rows_tensor(6, 2), 2).is_err());
        assert!(unpermute_rows(&rows_tensor(8, 2), 0).is_err());
        assert!(unpermute_rows(&Tensor::new(1f32, &Device::Cpu).unwrap(), 1).is_err());
    }

    #[test]
    fn gguf_names_map_to_hugging_face_names() {
        let cases = [
            (
                "token_embd.weight",
                "model.embed_tokens.weight",
                Permuted::No,
            ),
            ("output_norm.weight", "model.norm.weight", Permuted::No),
            ("output.weight", "lm_head.weight", Permuted::No),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
                Permuted::No,
            ),
            (
                "blk.7.ffn_norm.weight",
                "model.layers.7.post_attention_layernorm.weight",
                Permuted::No,
            ),
            (
                "blk.12.attn_q.weight",
                "model.layers.12.self_attn.q_proj.weight",
                Permuted::Query,
            ),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
                Permuted::Query,
            ),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
                Permuted::Key,
            ),
            (
                "blk.3.attn_v.bias",
                "model.layers.3.self_attn.v_proj.bias",
                Permuted::No,
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
                Permuted::No,
            ),
            (
                "blk.29.ffn_gate.weight",
                "model.layers.29.mlp.gate_proj.weight",
                Permuted::No,
            ),
            (
                "blk.29.ffn_up.weight",
                "model.layers.29.mlp.up_proj.weight",
                Permuted::No,
            ),
            (
                "blk.29.ffn_down.weight",
                "model.layers.29.mlp.down_proj.weight",
                Permuted::No,
            ),
        ];
        for (gguf, hf, permuted) in cases {
            assert_eq!(
                hf_name(gguf, true),
                Some((hf.to_string(), permuted)),
                "{gguf}"
            );
        }
        // Qwen2 files are stored in NeoX order: nothing to undo.
        assert_eq!(
            hf_name("blk.1.attn_q.weight", false),
            Some((
                "model.layers.1.self_attn.q_proj.weight".to_string(),
                Permuted::No
            ))
        );
        for unknown in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.1.attn_q",
            "blk.1.ssm_a.weight",
            "blk.1.attn_q.scale",
        ] {
            assert_eq!(hf_name(unknown, true), None, "{unknown}");
        }
    }

    #[test]
    fn f32_metadata_widens_to_its_decimal_value() {
        let md: HashMap<String, Value> = [
            ("eps".to_string(), Value::F32(1e-5)),
            ("theta".to_string(), Value::F32(100000.0)),
            ("n".to_string(), Value::I32(-1)),
        ]
        .into_iter()
        .collect();
        assert_eq!(meta_f64(&md, "eps").unwrap(), 1e-5);
        assert_eq!(meta_f64(&md, "theta").unwrap(), 100000.0);
        assert!(matches!(meta_usize(&md, "n"), Err(Error::GgufMetadata { key, .. }) if key == "n"));
        assert!(
            matches!(meta_str(&md, "absent"), Err(Error::GgufMetadata { key, .. }) if key == "absent")
        );
    }
}
