//! Every other GGUF block type (the K-quants Q2_K..Q8_K, Q5_0, Q5_1, Q8_1), multiplied through
//! candle-core's own dot products (`GgmlType::vec_dot`: AVX2 on x86 where candle has it, NEON on
//! Arm), with activations quantized by candle to the type's partner (`VecDotType`: Q8_K for the
//! K-quants, as llama.cpp). Also runs Q4_0/Q4_1/Q8_0, to measure candle against [`super::own`].
//!
//! Invariants: `blocks` holds `rows * cols / T::BLCK_SIZE` blocks, row-major. Costs: the weights
//! once in their file's size; per product one quantized copy of the activations.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, BlockQ8_1,
};
use candle_core::quantized::{GgmlDType, GgmlType};

use super::{for_row_chunks, Kernel, OutRows};

/// A matrix of candle blocks of type `T`.
pub struct CandleBlocks<T: GgmlType> {
    blocks: Vec<T>,
    rows: usize,
    cols: usize,
}

impl<T: GgmlType> std::fmt::Debug for CandleBlocks<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CandleBlocks<{:?}>[{}, {}]",
            T::DTYPE,
            self.rows,
            self.cols
        )
    }
}

impl<T: GgmlType> CandleBlocks<T> {
    fn from_bytes(data: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let size = std::mem::size_of::<T>();
        if size != T::DTYPE.type_size() || !data.len().is_multiple_of(size) {
            return None;
        }
        let n = data.len() / size;
        let mut blocks: Vec<T> = Vec::with_capacity(n);
        // SAFETY: candle's block types are `repr(C)` structs of f16, f32, u8, i8 and i16 fields
        // only, so every bit pattern is a valid value; the capacity holds `n` blocks, which is
        // exactly `data.len()` bytes, and they are initialised before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                blocks.as_mut_ptr() as *mut u8,
                data.len(),
            );
            blocks.set_len(n);
        }
        Some(Self { blocks, rows, cols })
    }
}

impl<T: GgmlType + 'static> Kernel for CandleBlocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<T>()
    }

    fn matmul(&self, x: &[f32], n: usize, out: &OutRows) {
        let (cols, nb) = (self.cols, self.cols / T::BLCK_SIZE);
        let mut act = vec![T::VecDotType::zeros(); n * nb];
        for (row, dst) in x.chunks_exact(cols).zip(act.chunks_exact_mut(nb)) {
            T::VecDotType::from_float(row, dst);
        }
        for_row_chunks(self.rows, |range| {
            for r in range {
                let w = &self.blocks[r * nb..(r + 1) * nb];
                for (j, a) in act.chunks_exact(nb).enumerate() {
                    out.set(j, r, T::vec_dot(cols, w, a));
                }
            }
        });
    }

    fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let nb = self.cols / T::BLCK_SIZE;
        T::to_float(&self.blocks[r * nb..(r + 1) * nb], dst);
    }
}

/// candle's kernel for `dtype`, or `None` for a type it has no quantized dot product for (or
/// whose block does not divide `cols`).
pub fn kernel(dtype: GgmlDType, data: &[u8], rows: usize, cols: usize) -> Option<Box<dyn Kernel>> {
    fn boxed<T: GgmlType + 'static>(d: &[u8], r: usize, c: usize) -> Option<Box<dyn Kernel>> {
        if !c.is_multiple_of(T::BLCK_SIZE) || T::BLCK_SIZE != T::VecDotType::BLCK_SIZE {
            return None;
        }
        CandleBlocks::<T>::from_bytes(d, r, c).map(|k| Box::new(k) as Box<dyn Kernel>)
    }
    match dtype {
        GgmlDType::Q4_0 => boxed::<BlockQ4_0>(data, rows, cols),
        GgmlDType::Q4_1 => boxed::<BlockQ4_1>(data, rows, cols),
        GgmlDType::Q5_0 => boxed::<BlockQ5_0>(data, rows, cols),
        GgmlDType::Q5_1 => boxed::<BlockQ5_1>(data, rows, cols),
        GgmlDType::Q8_0 => boxed::<BlockQ8_0>(data, rows, cols),
        GgmlDType::Q8_1 => boxed::<BlockQ8_1>(data, rows, cols),
        GgmlDType::Q2K => boxed::<BlockQ2K>(data, rows, cols),
        GgmlDType::Q3K => boxed::<BlockQ3K>(data, rows, cols),
        GgmlDType::Q4K => boxed::<BlockQ4K>(data, rows, cols),
        GgmlDType::Q5K => boxed::<BlockQ5K>(data, rows, cols),
        GgmlDType::Q6K => boxed::<BlockQ6K>(data, rows, cols),
        GgmlDType::Q8K => boxed::<BlockQ8K>(data, rows, cols),
        _ => None,
    }
}
