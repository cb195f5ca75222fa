//! A 2-D weight kept in its file's quantized blocks (GGUF's ggml block types), for backends that
//! multiply quantized weights directly instead of dequantizing them at load.
//!
//! Invariants: `data` holds `rows` rows of `cols / block_size` blocks each, row-major, exactly as
//! GGUF lays them out (one row's blocks are contiguous, so rows can be sliced and reordered by
//! bytes); `cols` is a multiple of the type's block size. Costs: narrowing copies the bytes kept.

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// A quantized matrix `[rows, cols]` in Hugging Face (row-major) order.
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    /// The block type of every row.
    pub dtype: GgmlDType,
    /// Output features.
    pub rows: usize,
    /// Input features (a multiple of the block size).
    pub cols: usize,
    /// `rows * row_bytes()` bytes of blocks.
    pub data: Vec<u8>,
}

impl QuantizedTensor {
    /// A matrix from its blocks, checked for size.
    pub fn new(dtype: GgmlDType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let block = dtype.block_size();
        if block == 0 || !cols.is_multiple_of(block) {
            return Err(Error::Config {
                detail: format!("{cols} columns are not whole {dtype:?} blocks of {block}"),
            });
        }
        let t = Self {
            dtype,
            rows,
            cols,
            data,
        };
        if t.data.len() != rows * t.row_bytes() {
            return Err(Error::Config {
                detail: format!(
                    "{} bytes for {rows} rows of {} {dtype:?} bytes",
                    t.data.len(),
                    t.row_bytes()
                ),
            });
        }
        Ok(t)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// The slice `start..start+len` along `dim` (0: rows; 1: columns, which must fall on block
    /// boundaries), or `None` when a column slice would cut blocks.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Option<Self> {
        let rb = self.row_bytes();
        match dim {
            0 if start + len <= self.rows => Some(Self {
                dtype: self.dtype,
                rows: len,
                cols: self.cols,
                data: self.data[start * rb..(start + len) * rb].to_vec(),
            }),
            1 if start + len <= self.cols => {
                let block = self.dtype.block_size();
                if !start.is_multiple_of(block) || !len.is_multiple_of(block) {
                    return None;
                }
                let ts = self.dtype.type_size();
                let (from, bytes) = (start / block * ts, len / block * ts);
                let mut data = Vec::with_capacity(self.rows * bytes);
                for row in self.data.chunks_exact(rb) {
                    data.extend_from_slice(&row[from..from + bytes]);
                }
                Some(Self {
                    dtype: self.dtype,
                    rows: self.rows,
                    cols: len,
                    data,
                })
            }
            _ => None,
        }
    }

    /// Whether the block type is a quantized one (not F32, F16 or BF16).
    pub fn is_quantized_type(dtype: GgmlDType) -> bool {
        !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q8_0(rows: usize, cols: usize) -> QuantizedTensor {
        // 34 bytes a block: the byte value names (row, block) so slices can be checked.
        let blocks = cols / 32;
        let data = (0..rows * blocks)
            .flat_map(|b| std::iter::repeat_n(b as u8, 34))
            .collect();
        QuantizedTensor::new(GgmlDType::Q8_0, rows, cols, data).unwrap()
    }

    #[test]
    fn rows_and_block_aligned_columns_narrow_by_bytes() {
        let t = q8_0(4, 128);
        let r = t.narrow(0, 1, 2).unwrap();
        assert_eq!((r.rows, r.cols), (2, 128));
        assert_eq!(r.data[0], 4);
        let c = t.narrow(1, 64, 64).unwrap();
        assert_eq!((c.rows, c.cols, c.data.len()), (4, 64, 4 * 2 * 34));
        assert_eq!(c.data[0], 2);
        assert_eq!(c.data[2 * 34], 6);
    }

    #[test]
    fn column_slices_that_cut_blocks_are_refused() {
        let t = q8_0(2, 128);
        assert!(t.narrow(1, 16, 64).is_none());
        assert!(t.narrow(1, 0, 48).is_none());
        assert!(t.narrow(0, 1, 2).is_none());
    }

    #[test]
    fn sizes_that_do_not_fit_the_block_type_are_errors() {
        assert!(QuantizedTensor::new(GgmlDType::Q4_1, 1, 48, vec![0; 30]).is_err());
        assert!(QuantizedTensor::new(GgmlDType::Q4_1, 2, 64, vec![0; 40]).is_err());
    }
}
