//! FP8 E4M3 weights as pre-quantized checkpoints store them (issue 12): a linear layer's
//! `X.weight` in `F8_E4M3` beside its scale, and optionally its activations' static scale.
//!
//! The layouts read, by the scale tensor next to the weight `[rows, cols]`:
//! - `X.weight_scale` of one element: one scale for the tensor (AutoFP8 and `quant_method:
//!   "fp8"` checkpoints, compressed-tensors' `strategy: "tensor"`);
//! - `X.weight_scale` of `rows` elements (`[rows]` or `[rows, 1]`): one scale per output row
//!   (compressed-tensors' `strategy: "channel"`, llm-compressor's FP8_DYNAMIC);
//! - `X.weight_scale_inv` of `[ceil(rows / br), ceil(cols / bc)]`: one scale per `br x bc`
//!   block (DeepSeek-V3 and Qwen3's `weight_block_size`, compressed-tensors' `strategy:
//!   "block"`); despite its name it multiplies, as the others do.
//!
//! `X.input_scale` (one element) is the activations' static scale. A weight's value is its E4M3
//! value times its scale. Readers dequantize FP8 weights to f32 on `read` (every backend can run
//! the checkpoint) and hand them over as stored on [`super::WeightReader::read_fp8`] (backends
//! that multiply FP8; per-tensor and per-row scales).

use crate::error::{Error, Result};

/// The f32 value of an E4M3 (`fn`: no infinities, one NaN pattern per sign) byte.
pub fn e4m3_to_f32(bits: u8) -> f32 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((bits >> 3) & 0x0f);
    let mantissa = f32::from(bits & 0x07);
    if exponent == 0x0f && bits & 0x07 == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    sign * magnitude
}

/// A weight's scales as stored.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredScales {
    /// One for the whole tensor.
    Tensor(f32),
    /// One per row (output feature).
    Rows(Vec<f32>),
    /// One per `rows x cols` block, row-major `[ceil(R / rows), ceil(C / cols)]`.
    Blocks {
        rows: usize,
        cols: usize,
        scales: Vec<f32>,
        grid_cols: usize,
    },
}

impl StoredScales {
    /// Interprets the scale tensor `scale_name` (`values`, `shape`) of the weight `weight_shape`;
    /// `block` is the checkpoint's block size for `weight_scale_inv` tensors.
    pub fn new(
        scale_name: &str,
        values: Vec<f32>,
        shape: &[usize],
        weight_shape: &[usize],
        block: Option<(usize, usize)>,
    ) -> Result<Self> {
        let rows = weight_shape.first().copied().unwrap_or(1);
        let cols = weight_shape.get(1).copied().unwrap_or(1);
        let bad = |detail: String| Error::tensor(scale_name, detail);
        if values.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(bad("a scale that is not a positive finite number".into()));
        }
        if scale_name.ends_with("weight_scale_inv") {
            let (br, bc) = block.unwrap_or((128, 128));
            let grid = [rows.div_ceil(br), cols.div_ceil(bc)];
            if shape != grid {
                return Err(bad(format!(
                    "block scales of shape {shape:?} for a weight {weight_shape:?} in {br} x {bc} \
                     blocks (expected {grid:?})"
                )));
            }
            return Ok(Self::Blocks {
                rows: br,
                cols: bc,
                scales: values,
                grid_cols: grid[1],
            });
        }
        match values.len() {
            1 => Ok(Self::Tensor(values[0])),
            n if n == rows && weight_shape.len() == 2 => Ok(Self::Rows(values)),
            n => Err(bad(format!(
                "{n} scales (shape {shape:?}) for a weight {weight_shape:?}: expected one, or one \
                 per row"
            ))),
        }
    }

    /// The scale of element `(row, col)` of the weight.
    pub fn at(&self, row: usize, col: usize) -> f32 {
        match self {
            Self::Tensor(s) => *s,
            Self::Rows(v) => v[row],
            Self::Blocks {
                rows,
                cols,
                scales,
                grid_cols,
            } => scales[(row / rows) * grid_cols + col / cols],
        }
    }

    /// Multiplies `values`, the weight's slice `start..start + len` along `dim` (E4M3 values in
    /// row-major order, `weight_shape` the whole weight's), by their scales.
    pub fn apply(&self, values: &mut [f32], weight_shape: &[usize], dim: usize, start: usize) {
        if let Self::Tensor(s) = self {
            values.iter_mut().for_each(|v| *v *= s);
            return;
        }
        let cols = weight_shape.get(1).copied().unwrap_or(1);
        let (row0, col0, width) = if dim == 0 {
            (start, 0, cols)
        } else {
            let len = values.len() / weight_shape[0].max(1);
            (0, start, len)
        };
        for (i, row) in values.chunks_mut(width.max(1)).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v *= self.at(row0 + i, col0 + j);
            }
        }
    }
}

/// A weight's scales as a backend multiplying FP8 takes them.
#[derive(Debug, Clone, PartialEq)]
pub enum Fp8Scale {
    /// One for the whole tensor.
    Tensor(f32),
    /// One per row of the slice read.
    Rows(Vec<f32>),
}

/// A 2-D FP8 E4M3 weight (or a slice of it) as stored: its bytes in row-major order, its scales,
/// and the static scale of its activations when the checkpoint has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Tensor {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
    pub scale: Fp8Scale,
    pub input_scale: Option<f32>,
}

impl Fp8Tensor {
    /// The scale of each row, whatever the layout.
    pub fn row_scales(&self) -> Vec<f32> {
        match &self.scale {
            Fp8Scale::Tensor(s) => vec![*s; self.rows],
            Fp8Scale::Rows(v) => v.clone(),
        }
    }
}

/// The name of the scale tensors of the weight `name` (`X.weight`): `X.weight_scale`,
/// `X.weight_scale_inv` and `X.input_scale`.
pub fn scale_names(name: &str) -> Option<[String; 3]> {
    let base = name.strip_suffix(".weight")?;
    Some([
        format!("{base}.weight_scale"),
        format!("{base}.weight_scale_inv"),
        format!("{base}.input_scale"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_bytes_decode_to_their_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x3c), 1.5);
        assert!(e4m3_to_f32(0x7f).is_nan() && e4m3_to_f32(0xff).is_nan());
        // Every other byte agrees with the float8 crate's E4M3 (candle's F8E4M3).
        for b in 0..=255u8 {
            let ours = e4m3_to_f32(b);
            let theirs = float8::F8E4M3::from_bits(b).to_f32();
            assert!(
                ours == theirs || (ours.is_nan() && theirs.is_nan()),
                "{b:#x}"
            );
        }
    }

    #[test]
    fn scales_apply_by_tensor_row_and_block_to_any_slice() {
        let shape = [4, 4];
        let rows = StoredScales::new(
            "w.weight_scale",
            vec![1., 2., 3., 4.],
            &[4, 1],
            &shape,
            None,
        )
        .unwrap();
        let mut v = vec![1.0; 8];
        rows.apply(&mut v, &shape, 0, 2); // rows 2..4
        assert_eq!(v, [3., 3., 3., 3., 4., 4., 4., 4.]);
        let mut v = vec![1.0; 8];
        rows.apply(&mut v, &shape, 1, 2); // columns 2..4 of every row
        assert_eq!(v, [1., 1., 2., 2., 3., 3., 4., 4.]);
        let blocks = StoredScales::new(
            "w.weight_scale_inv",
            vec![1., 2., 3., 4.],
            &[2, 2],
            &shape,
            Some((2, 2)),
        )
        .unwrap();
        let mut v = vec![1.0; 8];
        blocks.apply(&mut v, &shape, 1, 1); // columns 1..3
        assert_eq!(v, [1., 2., 1., 2., 3., 4., 3., 4.]);
        let tensor = StoredScales::new("w.weight_scale", vec![0.5], &[], &shape, None).unwrap();
        assert_eq!(tensor, StoredScales::Tensor(0.5));
        for (values, shape) in [(vec![1.0; 3], vec![3]), (vec![-1.0], vec![1])] {
            assert!(StoredScales::new("w.weight_scale", values, &shape, &[4, 4], None).is_err());
        }
        let wrong_grid = StoredScales::new("w.weight_scale_inv", vec![1.0], &[1, 1], &shape, None);
        assert!(
            wrong_grid.is_ok(),
            "one 128 x 128 block covers a 4 x 4 weight"
        );
        let wrong_grid = StoredScales::new(
            "w.weight_scale_inv",
            vec![1.0],
            &[1, 1],
            &shape,
            Some((2, 2)),
        );
        assert!(wrong_grid.is_err());
    }
}
