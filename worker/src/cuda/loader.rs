//! A shard's weights onto the GPU: read as f32 and rounded to the dtype (fused and padded where
//! the model wants them so), filled on the device for dummy weights, quantized to FP8 at load,
//! or kept as a checkpoint stores them (FP8, 4-bit packed into the GEMV's layout).

use super::device::{DeviceBuffer, Gpu};
use super::fp8::{Fp8Weight, E4M3_MAX, ROWS_OFFSET, SCALE_OFFSET};
use super::int4::{mma_layout, pack_params, Int4Weight};
use super::kernels::{Dtype, Kernels, ELEM};
use super::model::{Fp8Load, LinearWeight};
use crate::error::Result;
use crate::weights::{dummy_range, read, tensor_seed, total_len, Part, WeightSource};

/// Stores weights on the GPU: read as f32 and rounded to the dtype, or filled on the device.
pub(super) struct Loader<'a> {
    pub(super) gpu: &'a Gpu,
    pub(super) kernels: &'a Kernels,
    pub(super) dtype: Dtype,
    pub(super) source: &'a WeightSource<'a>,
    pub(super) bytes: usize,
    /// Which linear weights to hold in FP8.
    pub(super) fp8: Fp8Load,
    /// Whether any is.
    pub(super) any_fp8: bool,
    /// Whether to keep a checkpoint's 4-bit weights packed (else they are dequantized).
    pub(super) int4: bool,
}

impl Loader<'_> {
    /// Stores `parts` one after another in a buffer of `total` elements (zero beyond what they
    /// fill: the padded vocabulary rows).
    pub(super) fn padded(&mut self, parts: &[Part], total: usize) -> Result<DeviceBuffer> {
        let buf = self.gpu.alloc(total * ELEM, "weights")?;
        let mut offset = 0usize;
        for part in parts {
            match self.source {
                WeightSource::Dummy(seed) => {
                    let (low, high) = dummy_range(&part.name);
                    self.kernels.fill_uniform(
                        buf.at(offset),
                        part.elements(),
                        tensor_seed(*seed, &part.name),
                        low,
                        high,
                    )?;
                }
                WeightSource::Reader(reader) => {
                    // Stored in the dtype: the bytes as they are (from the file's mapping where
                    // contiguous); otherwise read as f32 and rounded. Each part is read once.
                    let stored = if reader.stored_dtype(&part.name) == Some(self.dtype.stored()) {
                        reader.read_stored(&part.name, part.slice_bounds())?
                    } else {
                        None
                    };
                    match stored {
                        Some(t) if t.shape == part.shape => {
                            self.gpu.upload_at(&buf, offset, &t.bytes)?;
                        }
                        _ => {
                            let values = read(self.source, part)?;
                            let bits: Vec<u16> =
                                values.iter().map(|v| self.dtype.from_f32(*v)).collect();
                            self.gpu.upload_at(&buf, offset, &bits)?;
                        }
                    }
                    // The host copy is freed (or unmapped) after return: wait for the copy
                    // rather than rely on the driver staging pageable memory before it returns.
                    self.gpu.sync()?;
                }
            }
            offset += part.elements() * ELEM;
        }
        self.bytes += total * ELEM;
        Ok(buf)
    }

    /// Stores `parts` one after another.
    pub(super) fn fused(&mut self, parts: &[Part]) -> Result<DeviceBuffer> {
        self.padded(parts, total_len(parts))
    }

    pub(super) fn one(&mut self, part: &Part) -> Result<DeviceBuffer> {
        self.fused(std::slice::from_ref(part))
    }

    /// Stores a linear layer's `parts` one after another: as the checkpoint stores them in FP8
    /// (when every part is, and the loader keeps FP8), quantized to FP8 here (`Fp8Load::Always`;
    /// the dtype copy is freed, stream-ordered, after the quantization), or in the dtype.
    pub(super) fn linear(&mut self, parts: &[Part]) -> Result<LinearWeight> {
        if self.int4 {
            if let Some(w) = self.stored_int4(parts)? {
                return Ok(w);
            }
        }
        if self.fp8 != Fp8Load::Off {
            if let Some(w) = self.stored_fp8(parts)? {
                self.any_fp8 = true;
                return Ok(w);
            }
        }
        let data = self.fused(parts)?;
        if self.fp8 != Fp8Load::Always {
            return Ok(LinearWeight {
                data,
                fp8: None,
                int4: None,
            });
        }
        let n = total_len(parts);
        let rows: usize = parts.iter().map(|p| p.shape[0]).sum();
        let q = self.gpu.alloc(n, "FP8 weights")?;
        let scale_bytes = ROWS_OFFSET + rows * 4;
        let stats = self.gpu.alloc(scale_bytes, "FP8 weight scales")?;
        self.kernels.fp8_quantize(q.ptr, stats.ptr, data.ptr, n)?;
        // The scale once per output row, for cuBLASLt's outer-vector scaling.
        let mut scale = [0f32];
        self.gpu.download(stats.at(SCALE_OFFSET), &mut scale)?;
        self.gpu
            .upload_at(&stats, ROWS_OFFSET, &vec![scale[0]; rows])?;
        self.bytes = self.bytes - n * ELEM + n + scale_bytes;
        self.any_fp8 = true;
        Ok(LinearWeight {
            data: q,
            fp8: Some(Fp8Weight {
                scales: stats,
                scale_offset: SCALE_OFFSET,
                per_row: false,
                static_input: None,
                rows_offset: ROWS_OFFSET,
            }),
            int4: None,
        })
    }

    /// `parts` as an AWQ/GPTQ checkpoint stores them, in the 4-bit layout (`int4.rs`), or
    /// `None` when one of them is not stored so or the layout cannot hold it (8-bit weights,
    /// groups that a tensor-parallel slice cuts or that differ between parts, act-order
    /// permutations that differ between parts, groups not a power of two from 32 inputs, rows
    /// not a multiple of 16 or inputs of 64): those are dequantized to the dtype.
    pub(super) fn stored_int4(&mut self, parts: &[Part]) -> Result<Option<LinearWeight>> {
        let WeightSource::Reader(reader) = self.source else {
            return Ok(None);
        };
        let Some(tensors) = read_stored_parts(parts, "4-bit", |name, slice| {
            let t = reader.read_int4(name, slice)?;
            Ok(t.map(|t| ([t.rows, t.cols], t)))
        })?
        else {
            return Ok(None);
        };
        let group_size = tensors[0].group_size;
        // The parts of a fused product share its inputs, so also their order.
        if tensors
            .iter()
            .any(|t| t.group_size != group_size || t.perm != tensors[0].perm)
        {
            return Ok(None);
        }
        let mut words = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let Some(w) = mma_layout(t) else {
                return Ok(None);
            };
            words.push(w);
        }
        let (n, k) = (total_len(parts) / tensors[0].cols, tensors[0].cols);
        let data = self.gpu.alloc(n * k / 2, "4-bit weights")?;
        let params = self
            .gpu
            .alloc(n * (k / group_size) * 4, "4-bit weight groups")?;
        // Uploaded before the parts', whose last wait covers it.
        let perm = match &tensors[0].perm {
            Some(p) => {
                let buffer = self
                    .gpu
                    .alloc(p.len() * 4, "4-bit act-order permutations")?;
                self.gpu.upload(&buffer, p)?;
                self.bytes += buffer.bytes;
                Some(buffer)
            }
            None => None,
        };
        let (mut words_at, mut params_at) = (0, 0);
        for (t, w) in tensors.iter().zip(&words) {
            self.gpu.upload_at(&data, words_at, w)?;
            words_at += w.len() * 4;
            let packed = pack_params(t);
            self.gpu.upload_at(&params, params_at, &packed)?;
            params_at += packed.len() * 4;
            // The host copies are freed on return: wait for the uploads.
            self.gpu.sync()?;
        }
        self.bytes += data.bytes + params.bytes;
        Ok(Some(LinearWeight {
            data,
            fp8: None,
            int4: Some(Int4Weight {
                params,
                group_size,
                perm,
            }),
        }))
    }

    /// `parts` as the checkpoint stores them in FP8, or `None` when one of them is not
    /// (another dtype, block scales, or random weights). Parts of one per-tensor scale keep it;
    /// otherwise every row gets its part's scale. A static activation scale is the largest of
    /// the parts' (vLLM's rule for fused layers); without one on every part, activations are
    /// quantized dynamically.
    pub(super) fn stored_fp8(&mut self, parts: &[Part]) -> Result<Option<LinearWeight>> {
        let WeightSource::Reader(reader) = self.source else {
            return Ok(None);
        };
        // Decided before reading, so that a linear layer of mixed parts is read once, in the
        // dtype.
        let fp8 = Some(tpserve_modelfile::StoredDtype::F8E4M3);
        if parts.iter().any(|p| reader.stored_dtype(&p.name) != fp8) {
            return Ok(None);
        }
        let Some(tensors) = read_stored_parts(parts, "FP8", |name, slice| {
            let t = reader.read_fp8(name, slice)?;
            Ok(t.map(|t| ([t.rows, t.cols], t)))
        })?
        else {
            return Ok(None);
        };
        let one_scale = match tensors.first().map(|t| &t.scale) {
            Some(tpserve_modelfile::Fp8Scale::Tensor(s))
                if tensors
                    .iter()
                    .all(|t| t.scale == tpserve_modelfile::Fp8Scale::Tensor(*s)) =>
            {
                Some(*s)
            }
            _ => None,
        };
        let mut scales: Vec<f32> = match one_scale {
            Some(s) => vec![s],
            None => tensors.iter().flat_map(|t| t.row_scales()).collect(),
        };
        let scale_count = scales.len();
        let input = tensors
            .iter()
            .map(|t| t.input_scale)
            .try_fold(0f32, |m, s| s.map(|s| m.max(s)));
        if let Some(s) = input {
            scales.push(s * E4M3_MAX);
        }
        // One scale: repeated once per output row after the others (16-byte aligned), for
        // cuBLASLt's outer-vector scaling.
        let rows_offset = match one_scale {
            Some(s) => {
                scales.resize(scales.len().next_multiple_of(4), 0.0);
                let offset = scales.len() * 4;
                let rows: usize = tensors.iter().map(|t| t.rows).sum();
                scales.extend(std::iter::repeat_n(s, rows));
                offset
            }
            None => 0,
        };
        let n = total_len(parts);
        let data = self.gpu.alloc(n, "FP8 weights")?;
        let mut offset = 0;
        for t in &tensors {
            self.gpu.upload_at(&data, offset, &t.data)?;
            offset += t.data.len();
        }
        let buf = self.gpu.alloc(scales.len() * 4, "FP8 weight scales")?;
        self.gpu.upload(&buf, &scales)?;
        // The host copies are freed on return: wait for the uploads.
        self.gpu.sync()?;
        self.bytes += n + scales.len() * 4;
        Ok(Some(LinearWeight {
            data,
            fp8: Some(Fp8Weight {
                scales: buf,
                scale_offset: 0,
                per_row: one_scale.is_none(),
                static_input: input.map(|_| scale_count * 4),
                rows_offset,
            }),
            int4: None,
        }))
    }
}

/// A fused product's parts as the checkpoint stores them (4-bit or FP8: `kind` names it in
/// errors), each read by `read` from its tensor's name and slice (dimension, start, length) with
/// its [rows, cols]; None where a part is not stored so (the caller loads the product another
/// way), an error where a part's shape is not the one expected.
fn read_stored_parts<T>(
    parts: &[Part],
    kind: &str,
    read: impl Fn(&str, Option<(usize, usize, usize)>) -> Result<Option<([usize; 2], T)>>,
) -> Result<Option<Vec<T>>> {
    let mut tensors = Vec::with_capacity(parts.len());
    for part in parts {
        let Some((shape, t)) = read(&part.name, part.slice_bounds())? else {
            return Ok(None);
        };
        if shape[..] != part.shape[..] {
            return Err(crate::weights::tensor_err(
                &part.name,
                format!(
                    "{kind} shape [{}, {}], expected {:?}",
                    shape[0], shape[1], part.shape
                ),
            ));
        }
        tensors.push(t);
    }
    Ok(Some(tensors))
}
