//! Integer weights packed into int32 words, as AWQ and GPTQ checkpoints store a linear layer `X`
//! (issue 12): `X.qweight`, `X.qzeros`, `X.scales` and, for GPTQ, `X.g_idx`, instead of
//! `X.weight`. Readers list such a layer under `X.weight` with its Hugging Face shape `[out, in]`
//! and dequantize it on `read` (every backend can run the checkpoint): element `(n, k)` is
//! `(q - zero) * scale` with `q` its packed value and `zero`, `scale` those of its group `g(k)`
//! and column `n`, computed in f32 (exact: small integers times an f16, bf16 or f32 scale).
//!
//! Layouts (`K` inputs, `N` outputs, `P = 32 / bits` values a word, value `j` of a word at bits
//! `[bits j, bits (j + 1))`):
//! - AWQ (GEMM packing, 4-bit): `qweight [K, N / 8]`, word `(k, c)` holding columns `8 c ..
//!   8 c + 8` with column `8 c + i` at value `AWQ_VALUE_OF_COLUMN[i]` (AutoAWQ packs in the order
//!   0, 2, 4, 6, 1, 3, 5, 7); `qzeros [K / G, N / 8]` packed alike; `scales [K / G, N]`; `g(k) =
//!   k / G`.
//! - GPTQ: `qweight [K / P, N]`, word `(r, n)` holding inputs `P r .. P r + P` in order;
//!   `qzeros [groups, N / P]` holding columns in order, plus the checkpoint's zero offset (the
//!   original format stores `zero - 1`); `scales [groups, N]`; `g(k) = g_idx[k]` (act-order), or
//!   `k / G` without `g_idx`.

use super::super::quantization::{PackedIntCheckpoint, PackedIntMethod};
use crate::error::{Error, Result};

/// Where AutoAWQ's packing puts column `8 c + i` of a word: its value index.
pub const AWQ_VALUE_OF_COLUMN: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The names of the tensors that hold a linear layer stored packed, from its weight's name
/// (`X.weight` -> `X.qweight`, `X.qzeros`, `X.scales`, `X.g_idx`); `None` for a name that does
/// not end in `.weight`.
pub fn packed_names(weight: &str) -> Option<[String; 4]> {
    let base = weight.strip_suffix(".weight")?;
    Some([
        format!("{base}.qweight"),
        format!("{base}.qzeros"),
        format!("{base}.scales"),
        format!("{base}.g_idx"),
    ])
}

/// One packed linear layer's tensors, borrowed or read, checked against each other.
pub struct PackedIntWeight<'a> {
    scheme: &'a PackedIntCheckpoint,
    /// Outputs and inputs: the weight's Hugging Face shape `[rows, cols]`.
    pub rows: usize,
    pub cols: usize,
    /// `qweight`'s little-endian int32 words.
    qweight: &'a [u8],
    qzeros: &'a [u8],
    /// `[groups, rows]`.
    scales: Vec<f32>,
    /// Each input's group.
    group_of: Vec<u32>,
}

fn word(bytes: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([
        bytes[4 * i],
        bytes[4 * i + 1],
        bytes[4 * i + 2],
        bytes[4 * i + 3],
    ])
}

impl<'a> PackedIntWeight<'a> {
    /// The Hugging Face shape `[out, in]` of a layer whose `qweight` has shape `qweight_shape`.
    pub fn shape_of(scheme: &PackedIntCheckpoint, qweight_shape: &[usize]) -> Option<[usize; 2]> {
        match (scheme.method, qweight_shape) {
            (PackedIntMethod::Awq, &[k, words]) => Some([words * 8, k]),
            (PackedIntMethod::Gptq, &[words, n]) => Some([n, words * scheme.pack()]),
            _ => None,
        }
    }

    /// Checks the tensors of the layer `name` against each other: `qweight` (its shape and
    /// int32 bytes), `qzeros` (shape and bytes), `scales` (shape and values) and `g_idx` (its
    /// values, when stored).
    pub fn new(
        name: &str,
        scheme: &'a PackedIntCheckpoint,
        qweight: (&[usize], &'a [u8]),
        qzeros: (&[usize], &'a [u8]),
        scales: (&[usize], Vec<f32>),
        g_idx: Option<Vec<f32>>,
    ) -> Result<Self> {
        let bad = |detail: String| Err(Error::tensor(name, detail));
        let Some([rows, cols]) = Self::shape_of(scheme, qweight.0) else {
            return bad(format!(
                "{} qweight of shape {:?}: expected two dimensions",
                scheme.method.as_str(),
                qweight.0
            ));
        };
        let pack = scheme.pack();
        let zero_cols = match scheme.method {
            PackedIntMethod::Awq => rows / 8,
            PackedIntMethod::Gptq => rows.div_ceil(pack),
        };
        let groups = scales.0.first().copied().unwrap_or(0);
        if scales.0 != [groups, rows] || groups == 0 {
            return bad(format!(
                "scales of shape {:?}, expected [groups, {rows}]",
                scales.0
            ));
        }
        if qzeros.0 != [groups, zero_cols] {
            return bad(format!(
                "qzeros of shape {:?}, expected [{groups}, {zero_cols}]",
                qzeros.0
            ));
        }
        let group_of: Vec<u32> = match (g_idx, scheme.group_size) {
            (Some(g), _) => {
                if g.len() != cols {
                    return bad(format!("g_idx of {} values for {cols} inputs", g.len()));
                }
                let mut out = Vec::with_capacity(cols);
                for (k, v) in g.iter().enumerate() {
                    if v.fract() != 0.0 || *v < 0.0 || *v >= groups as f32 {
                        return bad(format!(
                            "g_idx[{k}] = {v}, not a group of the {groups} scales have"
                        ));
                    }
                    out.push(*v as u32);
                }
                out
            }
            (None, Some(g)) => (0..cols).map(|k| (k / g) as u32).collect(),
            (None, None) => vec![0; cols],
        };
        if group_of.iter().any(|&g| g as usize >= groups) {
            return bad(format!(
                "{cols} inputs in groups of {:?} need more than the {groups} groups of scales",
                scheme.group_size
            ));
        }
        Ok(Self {
            scheme,
            rows,
            cols,
            qweight: qweight.1,
            qzeros: qzeros.1,
            scales: scales.1,
            group_of,
        })
    }

    /// The packed value and zero point of element `(n, k)`, and its group.
    fn quantized(&self, n: usize, k: usize) -> (i32, i32, usize) {
        let bits = self.scheme.bits;
        let mask = (1u32 << bits) - 1;
        let g = self.group_of[k] as usize;
        let (q, z) = match self.scheme.method {
            PackedIntMethod::Awq => {
                let shift = 4 * AWQ_VALUE_OF_COLUMN[n % 8];
                let q = word(self.qweight, k * (self.rows / 8) + n / 8) >> shift;
                let z = word(self.qzeros, g * (self.rows / 8) + n / 8) >> shift;
                (q, z)
            }
            PackedIntMethod::Gptq => {
                let pack = self.scheme.pack();
                let q =
                    word(self.qweight, (k / pack) * self.rows + n) >> (bits as usize * (k % pack));
                let zero_cols = self.rows.div_ceil(pack);
                let z = word(self.qzeros, g * zero_cols + n / pack) >> (bits as usize * (n % pack));
                (q, z)
            }
        };
        (
            (q & mask) as i32,
            (z & mask) as i32 + self.scheme.zero_offset,
            g,
        )
    }

    /// The slice `start..start + len` along `dim` (0: outputs, 1: inputs) of the weight
    /// `[rows, cols]`, dequantized, row-major.
    pub fn dequantize(&self, dim: usize, start: usize, len: usize) -> Vec<f32> {
        let (n_range, k_range) = if dim == 0 {
            (start..start + len, 0..self.cols)
        } else {
            (0..self.rows, start..start + len)
        };
        let width = k_range.len();
        let mut out = vec![0f32; n_range.len() * width];
        // Inputs outermost: both packings store a word row per input (or per P inputs).
        for k in k_range.clone() {
            for n in n_range.clone() {
                let (q, z, g) = self.quantized(n, k);
                let scale = self.scales[g * self.rows + n];
                out[(n - n_range.start) * width + (k - k_range.start)] = (q - z) as f32 * scale;
            }
        }
        out
    }

    /// The slice `start..start + len` along `dim` in [`Int4Tensor`]'s layout, or `None` where
    /// that layout cannot hold it: weights of other than 4 bits, or a slice whose groups are not
    /// whole runs of a multiple of 32 inputs. Act-order groups (`g_idx` out of input order) are
    /// held with the inputs sorted by group ([`Int4Tensor::perm`]) where each group the slice
    /// touches has exactly `group_size` of its inputs: a whole GPTQ `desc_act` weight, or a
    /// slice of its outputs (a tensor-parallel slice of its inputs cuts groups).
    pub fn int4(&self, dim: usize, start: usize, len: usize) -> Option<Int4Tensor> {
        if self.scheme.bits != 4 {
            return None;
        }
        let (n_range, k_range) = if dim == 0 {
            (start..start + len, 0..self.cols)
        } else {
            (0..self.rows, start..start + len)
        };
        let group = self.scheme.group_size.unwrap_or(self.cols).min(self.cols);
        let in_order = self
            .group_of
            .iter()
            .enumerate()
            .all(|(k, &g)| g as usize == k / group);
        // One group over all inputs: any run of them is one group.
        let group = if group == self.cols {
            k_range.len()
        } else {
            group
        };
        if !group.is_multiple_of(32) || k_range.is_empty() || !k_range.start.is_multiple_of(8) {
            return None;
        }
        let perm = if in_order {
            let aligned =
                k_range.start.is_multiple_of(group) && k_range.len().is_multiple_of(group);
            if !aligned {
                return None;
            }
            None
        } else {
            Some(self.group_order(k_range.clone(), group)?)
        };
        let (rows, cols) = (n_range.len(), k_range.len());
        let per_row = cols / 8;
        let mut words = vec![0u32; rows * per_row];
        match self.scheme.method {
            // GPTQ's word (r, n) holds inputs 8r .. 8r + 8 in order: this layout's word
            // (n, r), transposed.
            PackedIntMethod::Gptq => {
                let first = k_range.start / 8;
                for (i, n) in n_range.clone().enumerate() {
                    for w in 0..per_row {
                        words[i * per_row + w] = word(self.qweight, (first + w) * self.rows + n);
                    }
                }
            }
            // AWQ's words hold 8 outputs of one input: transpose 8 x 8 blocks of values.
            PackedIntMethod::Awq => {
                let awq_cols = self.rows / 8;
                for c in n_range.start / 8..n_range.end.div_ceil(8) {
                    for b in 0..per_row {
                        let k0 = k_range.start + 8 * b;
                        let block: [u32; 8] =
                            std::array::from_fn(|i| word(self.qweight, (k0 + i) * awq_cols + c));
                        for (t, value) in AWQ_VALUE_OF_COLUMN.iter().enumerate() {
                            let n = 8 * c + t;
                            if !n_range.contains(&n) {
                                continue;
                            }
                            let shift = 4 * value;
                            let packed = block
                                .iter()
                                .enumerate()
                                .fold(0u32, |acc, (i, v)| acc | ((v >> shift) & 0xf) << (4 * i));
                            words[(n - n_range.start) * per_row + b] = packed;
                        }
                    }
                }
            }
        }
        if let Some(perm) = &perm {
            permute_rows(&mut words, per_row, perm);
        }
        // Input (relative to the slice) at position `i` of a row.
        let input = |i: usize| perm.as_ref().map_or(i, |p| p[i] as usize);
        let groups = cols / group;
        let mut scales = Vec::with_capacity(rows * groups);
        let mut zeros = Vec::with_capacity(rows * groups);
        for n in n_range {
            for g in 0..groups {
                let k = k_range.start + input(g * group);
                let (_, zero, stored_group) = self.quantized(n, k);
                scales.push(self.scales[stored_group * self.rows + n]);
                zeros.push(zero as f32);
            }
        }
        Some(Int4Tensor {
            rows,
            cols,
            group_size: group,
            words,
            scales,
            zeros,
            perm,
        })
    }

    /// The inputs of `k_range` (relative to its start) sorted by group, stably, or `None` unless
    /// every group among them has exactly `group` inputs there (then each run of `group`
    /// positions is one group).
    fn group_order(&self, k_range: std::ops::Range<usize>, group: usize) -> Option<Vec<u32>> {
        let start = k_range.start;
        let mut order: Vec<u32> = (0..k_range.len() as u32).collect();
        order.sort_by_key(|&i| self.group_of[start + i as usize]);
        let group_at = |i: usize| self.group_of[start + order[i] as usize];
        let whole_runs = (0..order.len()).all(|i| {
            let first = i / group * group;
            group_at(i) == group_at(first) && (first == 0 || group_at(first - 1) != group_at(i))
        });
        whole_runs.then_some(order)
    }
}

/// Reorders each row of 4-bit `words` (`per_row` words, 8 values each, in input order) so that
/// position `i` holds the value of input `perm[i]`; the rows in parallel on every core (an
/// act-order 8B model has ~10^9 words).
fn permute_rows(words: &mut [u32], per_row: usize, perm: &[u32]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows = words.len() / per_row;
    let rows_per_thread = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for chunk in words.chunks_mut(rows_per_thread * per_row) {
            scope.spawn(move || {
                let mut values = vec![0u8; per_row * 8];
                for row in chunk.chunks_mut(per_row) {
                    for (k, v) in values.iter_mut().enumerate() {
                        *v = ((row[k / 8] >> (4 * (k % 8))) & 0xf) as u8;
                    }
                    row.fill(0);
                    for (i, &k) in perm.iter().enumerate() {
                        row[i / 8] |= u32::from(values[k as usize]) << (4 * (i % 8));
                    }
                }
            });
        }
    });
}

/// A 4-bit layer (or slice) `[rows, cols]` in the layout the CUDA W4A16 kernels read: row `n`'s
/// inputs packed 8 a word in order, with a scale and a zero point per run of `group_size`
/// inputs. Element `(n, k)` is `(q - zeros[n, g]) * scales[n, g]`, `g = k / group_size`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4Tensor {
    pub rows: usize,
    pub cols: usize,
    /// A multiple of 32 that divides `cols`.
    pub group_size: usize,
    /// `[rows, cols / 8]`: value `j` (bits `4 j .. 4 j + 4`) of word `w` is input `8 w + j`.
    pub words: Vec<u32>,
    /// `[rows, cols / group_size]`.
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
    /// GPTQ's act-order: position `i` of every row holds input `perm[i]` (of the slice), the
    /// inputs sorted by group, so that a product multiplies it with `x[perm[i]]`; `None`: inputs
    /// in order.
    pub perm: Option<Vec<u32>>,
}

impl Int4Tensor {
    /// The value at position `i` of row `n` (input `i`, or `perm[i]` in act-order).
    pub fn value(&self, n: usize, i: usize) -> f32 {
        let q = (self.words[n * self.cols / 8 + i / 8] >> (4 * (i % 8))) & 0xf;
        let g = n * (self.cols / self.group_size) + i / self.group_size;
        (q as f32 - self.zeros[g]) * self.scales[g]
    }

    /// Row `n` over its inputs in order.
    pub fn row(&self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        for i in 0..self.cols {
            out[self.perm.as_ref().map_or(i, |p| p[i] as usize)] = self.value(n, i);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gptq(bits: u32, group_size: Option<usize>, zero_offset: i32) -> PackedIntCheckpoint {
        PackedIntCheckpoint {
            method: PackedIntMethod::Gptq,
            bits,
            group_size,
            act_order: false,
            symmetric: false,
            zero_offset,
        }
    }

    fn le(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn awq_columns_sit_in_autoawq_order() {
        let scheme = PackedIntCheckpoint {
            method: PackedIntMethod::Awq,
            bits: 4,
            group_size: Some(2),
            act_order: false,
            symmetric: false,
            zero_offset: 0,
        };
        // K = 2 inputs, N = 8 outputs: column n holds value n + k (k = 0, 1); zero 1; scale
        // 0.5 for every column. Packed as AutoAWQ's `pack` does: value i of a word is column
        // `order_map[i]`.
        let order_map = [0u32, 2, 4, 6, 1, 3, 5, 7];
        let pack =
            |k: u32| (0..8u32).fold(0u32, |w, i| w | ((order_map[i as usize] + k) << (4 * i)));
        let qweight = le(&[pack(0), pack(1)]);
        let qzeros = le(&[0x1111_1111]);
        let w = PackedIntWeight::new(
            "x.weight",
            &scheme,
            (&[2, 1], &qweight),
            (&[1, 1], &qzeros),
            (&[1, 8], vec![0.5; 8]),
            None,
        )
        .unwrap();
        assert_eq!((w.rows, w.cols), (8, 2));
        let all = w.dequantize(0, 0, 8);
        for n in 0..8 {
            for k in 0..2 {
                assert_eq!(
                    all[n * 2 + k],
                    (n as f32 + k as f32 - 1.0) * 0.5,
                    "({n}, {k})"
                );
            }
        }
        assert_eq!(
            w.dequantize(1, 1, 1),
            (0..8).map(|n| n as f32 * 0.5).collect::<Vec<_>>()
        );
    }

    #[test]
    fn gptq_inputs_pack_in_order_and_the_original_format_stores_zero_minus_one() {
        for (bits, offset) in [(4u32, 1), (8, 0)] {
            let scheme = gptq(bits, Some(4), offset);
            let pack = scheme.pack();
            let (k_total, n_total) = (8usize, pack);
            // q(n, k) = (n + 2k) mod 2^bits; stored zeros 3 (zero 3 + offset).
            let mask = (1u32 << bits) - 1;
            let q = |n: usize, k: usize| ((n + 2 * k) as u32) & mask;
            let mut words = vec![0u32; (k_total / pack) * n_total];
            for k in 0..k_total {
                for n in 0..n_total {
                    words[(k / pack) * n_total + n] |= q(n, k) << (bits as usize * (k % pack));
                }
            }
            let zeros_word = (0..pack).fold(0u32, |w, j| w | (3 << (bits as usize * j)));
            let qweight = le(&words);
            let qzeros = le(&[zeros_word, zeros_word]);
            let scales: Vec<f32> = (0..2 * n_total)
                .map(|i| 0.25 * (1 + i / n_total) as f32)
                .collect();
            let w = PackedIntWeight::new(
                "x.weight",
                &scheme,
                (&[k_total / pack, n_total], &qweight),
                (&[2, 1], &qzeros),
                (&[2, n_total], scales),
                None,
            )
            .unwrap();
            let all = w.dequantize(0, 0, n_total);
            for n in 0..n_total {
                for k in 0..k_total {
                    let scale = if k < 4 { 0.25 } else { 0.5 };
                    let want = (q(n, k) as i32 - 3 - offset) as f32 * scale;
                    assert_eq!(all[n * k_total + k], want, "bits {bits} ({n}, {k})");
                }
            }
        }
    }

    #[test]
    fn act_order_groups_come_from_g_idx_and_bad_g_idx_is_an_error() {
        let scheme = PackedIntCheckpoint {
            act_order: true,
            ..gptq(4, Some(4), 0)
        };
        let qweight = le(&[0x7654_3210]);
        let qzeros = le(&[0, 0]);
        let g_idx: Vec<f32> = vec![1., 0., 1., 0., 1., 0., 1., 0.];
        let w = PackedIntWeight::new(
            "x.weight",
            &scheme,
            (&[1, 1], &qweight),
            (&[2, 1], &qzeros),
            (&[2, 1], vec![1.0, 10.0]),
            Some(g_idx.clone()),
        )
        .unwrap();
        let want: Vec<f32> = (0..8)
            .map(|k| k as f32 * if k % 2 == 0 { 10.0 } else { 1.0 })
            .collect();
        assert_eq!(w.dequantize(0, 0, 1), want);
        let mut bad = g_idx;
        bad[3] = 2.0;
        let e = PackedIntWeight::new(
            "x.weight",
            &scheme,
            (&[1, 1], &qweight),
            (&[2, 1], &qzeros),
            (&[2, 1], vec![1.0, 10.0]),
            Some(bad),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("g_idx[3]"), "{e}");
        let e = PackedIntWeight::new(
            "x.weight",
            &scheme,
            (&[1, 1], &qweight),
            (&[3, 1], &qzeros),
            (&[2, 1], vec![1.0, 10.0]),
            None,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("qzeros of shape [3, 1]"), "{e}");
    }
}
