//! Matrix products on the CPU: `y = x · Wᵀ (+ b)` with `W` stored as Hugging Face does,
//! `[out_features, in_features]` row-major, either dense f32 or kept in GGUF's quantized blocks
//! ([`super::quant`]). Large dense products go through the `gemm` crate (the kernel candle-core
//! itself uses), called on our own buffers so that activations never need to be wrapped in
//! tensors; one-row dense products (single-sequence decode) use a row-parallel dot loop, which
//! streams the weights once and is bound by memory bandwidth. Quantized products use block dot
//! products for few rows and dequantized tiles through the same GEMM for many
//! ([`QuantLinear::matmul`]); row by row, always the block dot products.

use rayon::prelude::*;

use super::quant::QuantLinear;

/// How a [`Linear`]'s weights are held.
#[derive(Debug)]
pub enum Weights {
    /// Row-major `[rows, cols]` f32.
    Dense(Vec<f32>),
    /// GGUF blocks, multiplied with activations quantized per block.
    Quantized(QuantLinear),
}

/// A weight matrix `[rows, cols]` with an optional bias of `rows` elements.
#[derive(Debug)]
pub struct Linear {
    pub weights: Weights,
    /// Optional bias, `[rows]`.
    pub bias: Option<Vec<f32>>,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
}

/// Rows at or below which the dot-product path beats the blocked GEMM.
const GEMV_MAX_ROWS: usize = 4;

impl Linear {
    /// A dense f32 matrix.
    pub fn dense(weight: Vec<f32>, bias: Option<Vec<f32>>, rows: usize, cols: usize) -> Self {
        debug_assert_eq!(weight.len(), rows * cols);
        Self {
            weights: Weights::Dense(weight),
            bias,
            rows,
            cols,
        }
    }

    /// A quantized matrix.
    pub fn quantized(weight: QuantLinear, bias: Option<Vec<f32>>) -> Self {
        Self {
            rows: weight.rows(),
            cols: weight.cols(),
            weights: Weights::Quantized(weight),
            bias,
        }
    }

    /// Bytes of the weights and bias.
    pub fn bytes(&self) -> usize {
        let weights = match &self.weights {
            Weights::Dense(w) => w.len() * 4,
            Weights::Quantized(q) => q.bytes(),
        };
        weights + self.bias.as_ref().map_or(0, Vec::len) * 4
    }

    /// Row `r` of the weights as f32 (an embedding lookup) into `dst` (`cols` values).
    pub fn row_into(&self, r: usize, dst: &mut [f32]) {
        match &self.weights {
            Weights::Dense(w) => dst.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
            Weights::Quantized(q) => q.dequantize_row(r, dst),
        }
    }

    /// `x` is `[n, cols]`; returns `[n, rows]`.
    pub fn forward(&self, x: &[f32], n: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * self.cols);
        let mut out = vec![0.0f32; n * self.rows];
        if n == 0 {
            return out;
        }
        match &self.weights {
            Weights::Quantized(q) => q.matmul(x, n, &mut out),
            Weights::Dense(w) if n <= GEMV_MAX_ROWS => self.forward_dots(w, x, n, &mut out),
            Weights::Dense(w) => self.forward_gemm(w, x, n, &mut out),
        }
        self.add_bias(&mut out);
        out
    }

    fn add_bias(&self, out: &mut [f32]) {
        if let Some(bias) = &self.bias {
            for row in out.chunks_exact_mut(self.rows) {
                for (y, b) in row.iter_mut().zip(bias) {
                    *y += *b;
                }
            }
        }
    }

    /// As `forward`, every output by the same dot product whatever `n`: row r's result does not
    /// depend on the other rows (the blocked GEMM's summation order does).
    pub fn forward_row_by_row(&self, x: &[f32], n: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), n * self.cols);
        let mut out = vec![0.0f32; n * self.rows];
        if n > 0 {
            match &self.weights {
                Weights::Dense(w) => self.forward_dots(w, x, n, &mut out),
                // Block dot products: each output the same in any batch.
                Weights::Quantized(q) => q.matmul_rows(x, n, &mut out),
            }
        }
        self.add_bias(&mut out);
        out
    }

    fn forward_dots(&self, weight: &[f32], x: &[f32], n: usize, out: &mut [f32]) {
        // Output features in parallel chunks; each weight row is read once for all n inputs.
        const CHUNK: usize = 64;
        let cols = self.cols;
        let rows = self.rows;
        let mut transposed = vec![0.0f32; n * rows];
        transposed
            .par_chunks_mut(CHUNK * n)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let first = chunk * CHUNK;
                for (i, w) in weight[first * cols..]
                    .chunks_exact(cols)
                    .take(dst.len() / n)
                    .enumerate()
                {
                    for (j, xr) in x.chunks_exact(cols).enumerate() {
                        dst[i * n + j] = dot(w, xr);
                    }
                }
            });
        for r in 0..rows {
            for j in 0..n {
                out[j * rows + r] = transposed[r * n + j];
            }
        }
    }

    fn forward_gemm(&self, weight: &[f32], x: &[f32], n: usize, out: &mut [f32]) {
        let (m, k, cols_out) = (n, self.cols, self.rows);
        // SAFETY: `out` is [m, cols_out], `x` is [m, k] and `weight` is [cols_out, k], all
        // row-major and live for the call; the strides below describe exactly those layouts
        // (rhs element (kk, j) = weight[j * k + kk]), so gemm reads and writes in bounds.
        unsafe {
            gemm::gemm(
                m,
                cols_out,
                k,
                out.as_mut_ptr(),
                1,
                cols_out as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                weight.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                match rayon::current_num_threads() {
                    1 => gemm::Parallelism::None,
                    n => gemm::Parallelism::Rayon(n),
                },
            );
        }
    }
}

/// Dot product in eight independent lanes, so the compiler vectorises it without reassociating.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.split_at(a.len() / 8 * 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    // The lanes in order, from the first (not from a zero: `Sum`'s start value changed between
    // Rust releases, and the CPU attention's eight-keys-at-a-time form repeats this order).
    let mut s = acc[1..].iter().fold(acc[0], |s, x| s + x);
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(l: &Linear, x: &[f32], n: usize) -> Vec<f32> {
        let Weights::Dense(weight) = &l.weights else {
            unreachable!("dense test matrices")
        };
        let mut out = vec![0.0; n * l.rows];
        for i in 0..n {
            for r in 0..l.rows {
                let mut s = 0.0f64;
                for c in 0..l.cols {
                    s += (x[i * l.cols + c] * weight[r * l.cols + c]) as f64;
                }
                out[i * l.rows + r] = s as f32 + l.bias.as_ref().map_or(0.0, |b| b[r]);
            }
        }
        out
    }

    #[test]
    fn both_paths_match_a_naive_product() {
        let (rows, cols) = (131, 77);
        let weight: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let bias = Some((0..rows).map(|i| i as f32 / 10.0).collect());
        let l = Linear::dense(weight, bias, rows, cols);
        for n in [1, 3, 4, 5, 19] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let got = l.forward(&x, n);
            let want = naive(&l, &x, n);
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "n={n}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn row_by_row_gives_each_row_the_same_bits_in_any_batch() {
        let (rows, cols) = (67, 515);
        let l = Linear::dense(
            (0..rows * cols)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 37.0)
                .collect(),
            None,
            rows,
            cols,
        );
        let x: Vec<f32> = (0..9 * cols)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let batch = l.forward_row_by_row(&x, 9);
        for r in 0..9 {
            let alone = l.forward_row_by_row(&x[r * cols..(r + 1) * cols], 1);
            assert_eq!(alone, &batch[r * rows..(r + 1) * rows], "row {r}");
        }
    }
}
