//! Safetensors weights: one file or a sharded set, memory-mapped; F32, F16 and BF16 converted to
//! f32 on read, FP8 E4M3 weights dequantized with their scales (`fp8.rs`) or read as stored, and
//! AWQ/GPTQ layers (int32 words, `packed_int.rs`) listed under `X.weight` and dequantized.
//!
//! Invariants: every listed tensor's byte range was checked against its shard's mapping when the
//! reader was built, so reads cannot run past a file; a name appears in exactly one shard.
//! Costs: building maps each shard and parses its JSON header; a read converts only the bytes it
//! returns (a slice along dim 0 is one contiguous range; along another dim, one range per outer
//! index).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::fp8::{e4m3_to_f32, scale_names, Fp8Scale, Fp8Tensor, StoredScales};
use super::packed_int::{packed_names, Int4Tensor, PackedIntWeight};
use super::{check_slice, StoredDtype, StoredTensor, WeightReader};
use crate::error::{Error, Result};
use crate::quantization::PackedIntCheckpoint;

struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte offset of the tensor's data in the shard's mapping.
    start: usize,
}

/// A slice of a tensor: its entry, its bytes in row-major order, its shape.
struct Slice<'a> {
    entry: &'a Entry,
    bytes: Cow<'a, [u8]>,
    shape: Vec<usize>,
}

/// Weights from one or more `.safetensors` files.
pub struct SafetensorsReader {
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
    /// The block size of `weight_scale_inv` scales (`weight_block_size`), when not 128 x 128.
    fp8_block: Option<(usize, usize)>,
    /// An AWQ/GPTQ checkpoint's scheme, and the shapes `[out, in]` of the layers it stores
    /// packed, under their `X.weight` names.
    packed: Option<(PackedIntCheckpoint, HashMap<String, [usize; 2]>)>,
}

fn elem_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 | Dtype::I32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        Dtype::F8_E4M3 => Some(1),
        _ => None,
    }
}

/// Appends `bytes` (little-endian `dtype` values) to `out` as f32.
fn extend_f32(out: &mut Vec<f32>, dtype: Dtype, bytes: &[u8]) {
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::F8_E4M3 => out.extend(bytes.iter().map(|&b| e4m3_to_f32(b))),
        // Packed words and group indices (AWQ, GPTQ): as numbers.
        Dtype::I32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32),
        ),
        // `open_*` rejects every other dtype before a read can happen.
        _ => {}
    }
}

impl SafetensorsReader {
    /// Opens a single `.safetensors` file.
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut reader = SafetensorsReader {
            shards: Vec::new(),
            tensors: HashMap::new(),
            fp8_block: None,
            packed: None,
        };
        reader.add_shard(path)?;
        Ok(reader)
    }

    /// Opens the shards listed by a `model.safetensors.index.json` (paths relative to it). Every
    /// tensor of its `weight_map` must be found in the shard it names.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::parse(index_path, e))?;
        let weight_map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::parse(index_path, "no `weight_map` object"))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<&str> = Vec::new();
        for (name, file) in weight_map {
            let file = file.as_str().ok_or_else(|| {
                Error::parse(index_path, format!("`{name}` maps to a non-string"))
            })?;
            if !files.contains(&file) {
                files.push(file);
            }
        }
        let mut reader = SafetensorsReader {
            shards: Vec::new(),
            tensors: HashMap::new(),
            fp8_block: None,
            packed: None,
        };
        for file in &files {
            reader.add_shard(&dir.join(file))?;
        }
        for (name, file) in weight_map {
            let in_shard = reader
                .tensors
                .get(name)
                .map(|e| reader.shards[e.shard].path == dir.join(file.as_str().unwrap_or("")));
            if in_shard != Some(true) {
                return Err(Error::parse(
                    index_path,
                    format!("tensor `{name}` is not in the shard the index names ({file})"),
                ));
            }
        }
        Ok(reader)
    }

    /// Opens the weights of a Hugging Face directory: `model.safetensors.index.json` if present,
    /// else `model.safetensors`, else the directory's only `*.safetensors` file.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::open_index(&index);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_file(&single);
        }
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut found = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.extension().is_some_and(|x| x == "safetensors") {
                found.push(path);
            }
        }
        match found.as_slice() {
            [one] => Self::open_file(one),
            [] => Err(Error::parse(
                dir,
                "no model.safetensors.index.json, model.safetensors or other *.safetensors file",
            )),
            _ => Err(Error::parse(
                dir,
                format!(
                    "{} *.safetensors files but no model.safetensors.index.json to say which to use",
                    found.len()
                ),
            )),
        }
    }

    fn add_shard(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only private mapping; a file changed by another process while mapped is
        // outside our control, as for every mmap-based weight loader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) =
            SafeTensors::read_metadata(&mmap).map_err(|e| Error::parse(path, e))?;
        let data_start = header_len
            .checked_add(8)
            .ok_or_else(|| Error::parse(path, "header length overflows"))?;
        let shard = self.shards.len();
        for (name, info) in metadata.tensors() {
            let Some(size) = elem_size(info.dtype) else {
                return Err(Error::UnsupportedTensorType {
                    tensor: name,
                    dtype: format!("{:?}", info.dtype),
                });
            };
            let (begin, end) = info.data_offsets;
            let elems = info
                .shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let start = data_start.checked_add(begin);
            let stop = data_start.checked_add(end);
            let ok = match (elems, start, stop) {
                (Some(n), Some(s), Some(e)) => {
                    e >= s && e - s == n.saturating_mul(size) && e <= mmap.len()
                }
                _ => false,
            };
            if !ok {
                return Err(Error::parse(
                    path,
                    format!("tensor `{name}`: data offsets {begin}..{end} do not fit its shape {:?} and the file", info.shape),
                ));
            }
            if self.tensors.contains_key(&name) {
                return Err(Error::parse(
                    path,
                    format!("tensor `{name}` appears in more than one shard"),
                ));
            }
            self.tensors.insert(
                name,
                Entry {
                    shard,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + begin,
                },
            );
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            mmap,
        });
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
        })
    }

    /// Sets the block size of block-scaled FP8 weights (`weight_scale_inv`; the checkpoint's
    /// `weight_block_size`, 128 x 128 when unset).
    pub fn with_fp8_block(mut self, block: Option<(usize, usize)>) -> Self {
        self.fp8_block = block;
        self
    }

    /// Reads the AWQ/GPTQ layers of `scheme` (those stored as `X.qweight` beside `X.qzeros` and
    /// `X.scales`) as `X.weight`.
    pub fn with_packed_int(mut self, scheme: Option<PackedIntCheckpoint>) -> Result<Self> {
        let Some(scheme) = scheme else {
            return Ok(self);
        };
        let mut layers = HashMap::new();
        for (name, entry) in &self.tensors {
            let Some(base) = name.strip_suffix(".qweight") else {
                continue;
            };
            let weight = format!("{base}.weight");
            let Some(shape) = PackedIntWeight::shape_of(&scheme, &entry.shape) else {
                return Err(Error::tensor(
                    name,
                    format!(
                        "{} qweight of shape {:?}: expected two dimensions",
                        scheme.method.as_str(),
                        entry.shape
                    ),
                ));
            };
            if entry.dtype != Dtype::I32 {
                return Err(Error::tensor(
                    name,
                    format!("packed weights in {:?}, expected int32 words", entry.dtype),
                ));
            }
            if self.tensors.contains_key(&weight) {
                return Err(Error::tensor(
                    &weight,
                    "stored both as a weight and packed (qweight)",
                ));
            }
            layers.insert(weight, shape);
        }
        if layers.is_empty() {
            let path = self
                .shards
                .first()
                .map_or(Path::new(""), |s| s.path.as_path());
            return Err(Error::parse(
                path,
                format!(
                    "the checkpoint's quantization_config says {}, but no layer is stored packed \
                     (no `*.qweight` tensor)",
                    scheme.method.as_str()
                ),
            ));
        }
        self.packed = Some((scheme, layers));
        Ok(self)
    }

    /// The shape `[out, in]` of the packed layer `name`, if it is one.
    fn packed_shape(&self, name: &str) -> Option<[usize; 2]> {
        self.packed.as_ref()?.1.get(name).copied()
    }

    /// The packed layer `name` (an `X.weight` of an AWQ/GPTQ checkpoint), if it is one.
    fn packed_weight(&self, name: &str) -> Result<Option<PackedIntWeight<'_>>> {
        let Some((scheme, layers)) = &self.packed else {
            return Ok(None);
        };
        if !layers.contains_key(name) {
            return Ok(None);
        }
        let [qweight, qzeros, scales, g_idx] = packed_names(name).expect("a .weight name");
        let words = |tensor: &str| -> Result<(&[usize], &[u8])> {
            let e = self.entry(tensor)?;
            if e.dtype != Dtype::I32 {
                return Err(Error::tensor(
                    tensor,
                    format!("{:?}, expected int32 words", e.dtype),
                ));
            }
            let len = e.shape.iter().product::<usize>() * 4;
            Ok((&e.shape, &self.shards[e.shard].mmap[e.start..e.start + len]))
        };
        let qweight = words(&qweight)?;
        let qzeros = words(&qzeros)?;
        let (scale_values, scale_shape) = self
            .values(&scales)?
            .ok_or_else(|| Error::tensor(name, format!("packed (qweight) without `{scales}`")))?;
        let g_idx = self.values(&g_idx)?.map(|(v, _)| v);
        PackedIntWeight::new(
            name,
            scheme,
            qweight,
            qzeros,
            (&scale_shape, scale_values),
            g_idx,
        )
        .map(Some)
    }

    /// The bytes of the slice `start..start + len` along `dim`, in row-major order (borrowed from
    /// the mapping when contiguous: a slice along the first dimension), and its shape.
    fn slice_bytes(&self, name: &str, dim: usize, start: usize, len: usize) -> Result<Slice<'_>> {
        let e = self.entry(name)?;
        let mmap = &self.shards[e.shard].mmap;
        let size = elem_size(e.dtype).unwrap_or(4);
        if e.shape.is_empty() {
            // A scalar: one element, no dimension to slice along.
            let bytes = &mmap[e.start..e.start + size];
            return Ok(Slice {
                entry: e,
                bytes: Cow::Borrowed(bytes),
                shape: Vec::new(),
            });
        }
        check_slice(name, &e.shape, dim, start, len)?;
        // Offsets were checked against the mapping at open, and the slice against the shape.
        let outer: usize = e.shape[..dim].iter().product();
        let inner: usize = e.shape[dim + 1..].iter().product();
        let dim_size = e.shape[dim];
        let row_bytes = inner * size;
        let mut shape = e.shape.clone();
        shape[dim] = len;
        if outer == 1 {
            let from = e.start + start * row_bytes;
            let bytes = Cow::Borrowed(&mmap[from..from + len * row_bytes]);
            return Ok(Slice {
                entry: e,
                bytes,
                shape,
            });
        }
        let mut out = Vec::with_capacity(outer * len * row_bytes);
        for o in 0..outer {
            let from = e.start + (o * dim_size + start) * row_bytes;
            out.extend_from_slice(&mmap[from..from + len * row_bytes]);
        }
        Ok(Slice {
            entry: e,
            bytes: Cow::Owned(out),
            shape,
        })
    }

    /// The whole tensor `name` as f32 values (no FP8 scaling), if it exists.
    fn values(&self, name: &str) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let Some(e) = self.tensors.get(name) else {
            return Ok(None);
        };
        let rows = e.shape.first().copied().unwrap_or(1);
        let Slice {
            entry: e,
            bytes,
            shape,
        } = self.slice_bytes(name, 0, 0, rows)?;
        let mut out = Vec::new();
        extend_f32(&mut out, e.dtype, &bytes);
        Ok(Some((out, shape)))
    }

    /// The scales of the FP8 weight `name` of shape `shape`: `weight_scale`, or `weight_scale_inv`.
    fn fp8_scales(&self, name: &str, shape: &[usize]) -> Result<StoredScales> {
        let Some([scale, scale_inv, _]) = scale_names(name) else {
            return Err(Error::tensor(
                name,
                "an FP8 tensor that is not a layer's weight",
            ));
        };
        for scale_name in [scale, scale_inv] {
            if let Some((values, scale_shape)) = self.values(&scale_name)? {
                return StoredScales::new(&scale_name, values, &scale_shape, shape, self.fp8_block);
            }
        }
        Err(Error::tensor(
            name,
            "FP8 E4M3 without a `weight_scale` or `weight_scale_inv` tensor beside it",
        ))
    }
}

impl WeightReader for SafetensorsReader {
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        if let Some((_, layers)) = &self.packed {
            names.extend(layers.keys().cloned());
        }
        names.sort();
        names
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.packed_shape(name).is_some()
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        if let Some(shape) = self.packed_shape(name) {
            return Ok(shape.to_vec());
        }
        Ok(self.entry(name)?.shape.clone())
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        let rows = self.shape(name)?.first().copied().unwrap_or(1);
        self.read_slice(name, 0, 0, rows)
    }

    fn read_slice(&self, name: &str, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        if let Some(w) = self.packed_weight(name)? {
            let mut shape = vec![w.rows, w.cols];
            check_slice(name, &shape, dim, start, len)?;
            shape[dim] = len;
            let values = w.dequantize(dim, start, len);
            return Tensor::from_vec(values, shape, &Device::Cpu)
                .map_err(|err| Error::tensor(name, err));
        }
        let Slice {
            entry: e,
            bytes,
            shape,
        } = self.slice_bytes(name, dim, start, len)?;
        let mut out = Vec::with_capacity(bytes.len());
        extend_f32(&mut out, e.dtype, &bytes);
        if e.dtype == Dtype::F8_E4M3 {
            self.fp8_scales(name, &e.shape)?
                .apply(&mut out, &e.shape, dim, start);
        }
        Tensor::from_vec(out, shape, &Device::Cpu).map_err(|err| Error::tensor(name, err))
    }

    fn stored_dtype(&self, name: &str) -> Option<StoredDtype> {
        match self.tensors.get(name)?.dtype {
            // Packed words are not a weight's elements.
            Dtype::I32 => None,
            Dtype::F32 => Some(StoredDtype::F32),
            Dtype::F16 => Some(StoredDtype::F16),
            Dtype::BF16 => Some(StoredDtype::Bf16),
            Dtype::F8_E4M3 => Some(StoredDtype::F8E4M3),
            _ => None,
        }
    }

    fn read_stored(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> Result<Option<StoredTensor<'_>>> {
        if self.packed_shape(name).is_some() {
            return Ok(None);
        }
        let e = self.entry(name)?;
        let Some(dtype) = self.stored_dtype(name) else {
            return Ok(None);
        };
        let (dim, start, len) = slice.unwrap_or((0, 0, e.shape.first().copied().unwrap_or(1)));
        let Slice { bytes, shape, .. } = self.slice_bytes(name, dim, start, len)?;
        Ok(Some(StoredTensor {
            dtype,
            shape,
            bytes,
        }))
    }

    fn read_int4(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> Result<Option<Int4Tensor>> {
        let Some(w) = self.packed_weight(name)? else {
            return Ok(None);
        };
        let (dim, start, len) = slice.unwrap_or((0, 0, w.rows));
        check_slice(name, &[w.rows, w.cols], dim, start, len)?;
        Ok(w.int4(dim, start, len))
    }

    fn read_fp8(
        &self,
        name: &str,
        slice: Option<(usize, usize, usize)>,
    ) -> Result<Option<Fp8Tensor>> {
        if self.packed_shape(name).is_some() {
            return Ok(None);
        }
        let e = self.entry(name)?;
        if e.dtype != Dtype::F8_E4M3 || e.shape.len() != 2 {
            return Ok(None);
        }
        let scales = self.fp8_scales(name, &e.shape)?;
        let (dim, start, len) = slice.unwrap_or((0, 0, e.shape[0]));
        let Slice { bytes, shape, .. } = self.slice_bytes(name, dim, start, len)?;
        let data = bytes.into_owned();
        let scale = match scales {
            StoredScales::Tensor(s) => Fp8Scale::Tensor(s),
            StoredScales::Rows(v) if dim == 0 => Fp8Scale::Rows(v[start..start + len].to_vec()),
            StoredScales::Rows(v) => Fp8Scale::Rows(v),
            // Block scales are dequantized (`read`) by backends that multiply per-row scales.
            StoredScales::Blocks { .. } => return Ok(None),
        };
        let [_, _, input] = scale_names(name).expect("an FP8 weight's name ends in .weight");
        let input_scale = match self.values(&input)? {
            Some((v, _)) if v.len() == 1 && v[0].is_finite() && v[0] > 0.0 => Some(v[0]),
            Some((v, shape)) => {
                return Err(Error::tensor(
                    &input,
                    format!("an activation scale of shape {shape:?} ({} values): expected one positive value", v.len()),
                ))
            }
            None => None,
        };
        Ok(Some(Fp8Tensor {
            rows: shape[0],
            cols: shape[1],
            data,
            scale,
            input_scale,
        }))
    }
}
