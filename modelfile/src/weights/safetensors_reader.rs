//! Safetensors weights: one file or a sharded set, memory-mapped; F32, F16 and BF16 converted to
//! f32 on read.
//!
//! Invariants: every listed tensor's byte range was checked against its shard's mapping when the
//! reader was built, so reads cannot run past a file; a name appears in exactly one shard.
//! Costs: building maps each shard and parses its JSON header; a read converts only the bytes it
//! returns (a slice along dim 0 is one contiguous range; along another dim, one range per outer
//! index).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::{check_slice, WeightReader};
use crate::error::{Error, Result};

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

/// Weights from one or more `.safetensors` files.
pub struct SafetensorsReader {
    shards: Vec<Shard>,
    tensors: HashMap<String, Entry>,
}

fn elem_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
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
}

impl WeightReader for SafetensorsReader {
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        Ok(self.entry(name)?.shape.clone())
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        match e.shape.first() {
            Some(&rows) => self.read_slice(name, 0, 0, rows),
            None => {
                // A scalar: one element, no dimension to slice along.
                let size = elem_size(e.dtype).unwrap_or(4);
                let bytes = &self.shards[e.shard].mmap[e.start..e.start + size];
                let mut out = Vec::with_capacity(1);
                extend_f32(&mut out, e.dtype, bytes);
                Tensor::from_vec(out, (), &Device::Cpu).map_err(|err| Error::tensor(name, err))
            }
        }
    }

    fn read_slice(&self, name: &str, dim: usize, start: usize, len: usize) -> Result<Tensor> {
        let e = self.entry(name)?;
        check_slice(name, &e.shape, dim, start, len)?;
        let size = elem_size(e.dtype).unwrap_or(4);
        // Offsets were checked against the mapping at open, and the slice against the shape.
        let outer: usize = e.shape[..dim].iter().product();
        let inner: usize = e.shape[dim + 1..].iter().product();
        let dim_size = e.shape[dim];
        let row_bytes = inner * size;
        let mmap = &self.shards[e.shard].mmap;
        let mut out = Vec::with_capacity(outer * len * inner);
        for o in 0..outer {
            let from = e.start + (o * dim_size + start) * row_bytes;
            extend_f32(&mut out, e.dtype, &mmap[from..from + len * row_bytes]);
        }
        let mut shape = e.shape.clone();
        shape[dim] = len;
        Tensor::from_vec(out, shape, &Device::Cpu).map_err(|err| Error::tensor(name, err))
    }
}
