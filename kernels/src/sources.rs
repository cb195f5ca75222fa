//! The embedded CUDA C sources and the table of their entry points.
//!
//! Each `.cu` file under `kernels/cuda/` is embedded with `include_str!`, so the binary carries
//! its kernels and needs no files at run time. NVRTC compiles one source string at a time and is
//! given no header files, so [`KernelSource::expanded`] inlines `common.cuh` in place of its
//! `#include` line (with `#line` directives, so NVRTC's messages name the right file and line).
//!
//! Invariant (checked by the tests): [`SOURCES`] holds every `.cu` file of `kernels/cuda/`, and
//! [`KERNELS`] lists exactly the `extern "C"` entry points each of them defines.

use crate::error::{Error, Result};

/// `common.cuh`: dtype helpers, reductions and the per-dtype instantiation macro.
pub const COMMON_HEADER: &str = include_str!("../cuda/common.cuh");

/// The line through which a kernel file includes [`COMMON_HEADER`].
const COMMON_INCLUDE: &str = "#include \"common.cuh\"";

/// One embedded CUDA C source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// The file name under `kernels/cuda/`, e.g. `rms_norm.cu`.
    pub name: &'static str,
    /// The file's text as written (with its `#include "common.cuh"` line).
    pub code: &'static str,
}

impl KernelSource {
    /// The self-contained text NVRTC compiles: `code` with the `#include "common.cuh"` line
    /// replaced by the header's text (its `#pragma once` dropped, which would only draw a
    /// warning in a main file). This text is what the PTX cache key hashes, so a change to the
    /// header invalidates every kernel compiled from it.
    pub fn expanded(&self) -> String {
        let mut out = String::with_capacity(self.code.len() + COMMON_HEADER.len() + 128);
        for (index, line) in self.code.lines().enumerate() {
            if line.trim() == COMMON_INCLUDE {
                out.push_str("#line 1 \"common.cuh\"\n");
                for header_line in COMMON_HEADER.lines() {
                    if header_line.trim() != "#pragma once" {
                        out.push_str(header_line);
                    }
                    // An empty line keeps the header's line numbers right.
                    out.push('\n');
                }
                out.push_str(&format!("#line {} \"{}\"\n", index + 2, self.name));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Every embedded kernel source file, in the order of [`KERNELS`].
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "embedding.cu",
        code: include_str!("../cuda/embedding.cu"),
    },
    KernelSource {
        name: "rms_norm.cu",
        code: include_str!("../cuda/rms_norm.cu"),
    },
    KernelSource {
        name: "rope_kv_write.cu",
        code: include_str!("../cuda/rope_kv_write.cu"),
    },
    KernelSource {
        name: "silu_mul.cu",
        code: include_str!("../cuda/silu_mul.cu"),
    },
    KernelSource {
        name: "attention.cu",
        code: include_str!("../cuda/attention.cu"),
    },
    KernelSource {
        name: "attention_mma.cu",
        code: include_str!("../cuda/attention_mma.cu"),
    },
    KernelSource {
        name: "attention_wgmma.cu",
        code: include_str!("../cuda/attention_wgmma.cu"),
    },
    KernelSource {
        name: "attention_decode_mma.cu",
        code: include_str!("../cuda/attention_decode_mma.cu"),
    },
    KernelSource {
        name: "sampling.cu",
        code: include_str!("../cuda/sampling.cu"),
    },
    KernelSource {
        name: "elementwise.cu",
        code: include_str!("../cuda/elementwise.cu"),
    },
    KernelSource {
        name: "gemv.cu",
        code: include_str!("../cuda/gemv.cu"),
    },
    KernelSource {
        name: "fp8.cu",
        code: include_str!("../cuda/fp8.cu"),
    },
    KernelSource {
        name: "int4.cu",
        code: include_str!("../cuda/int4.cu"),
    },
    KernelSource {
        name: "gemm_bi.cu",
        code: include_str!("../cuda/gemm_bi.cu"),
    },
    KernelSource {
        name: "all_reduce.cu",
        code: include_str!("../cuda/all_reduce.cu"),
    },
    KernelSource {
        name: "lora.cu",
        code: include_str!("../cuda/lora.cu"),
    },
];

/// The `extern "C"` entry points of each source file: `(file name, entry points)`. The launch
/// wrappers load functions from each file's module by these names; the arguments of each are
/// documented above its definition in the `.cu` file.
pub const KERNELS: &[(&str, &[&str])] = &[
    ("embedding.cu", &["embedding_bf16", "embedding_f16"]),
    (
        "rms_norm.cu",
        &[
            "rms_norm_bf16",
            "rms_norm_residual_bf16",
            "rms_norm_wide_bf16",
            "rms_norm_residual_wide_bf16",
            "rms_norm_fp8_rows_bf16",
            "rms_norm_residual_fp8_rows_bf16",
            "rms_norm_f16",
            "rms_norm_residual_f16",
            "rms_norm_wide_f16",
            "rms_norm_residual_wide_f16",
            "rms_norm_fp8_rows_f16",
            "rms_norm_residual_fp8_rows_f16",
        ],
    ),
    (
        "rope_kv_write.cu",
        &[
            "rope_kv_write_bf16",
            "rope_kv_write_f16",
            "rope_kv_write_fp8kv_bf16",
            "rope_kv_write_fp8kv_f16",
        ],
    ),
    (
        "silu_mul.cu",
        &[
            "silu_mul_bf16",
            "silu_mul_f16",
            "silu_mul_fp8_rows_bf16",
            "silu_mul_fp8_rows_f16",
        ],
    ),
    (
        "attention.cu",
        &[
            "paged_attention_hd64_bf16",
            "paged_attention_hd64_f16",
            "paged_attention_hd64_fp8kv_bf16",
            "paged_attention_hd64_fp8kv_f16",
            "paged_attention_hd128_bf16",
            "paged_attention_hd128_f16",
            "paged_attention_hd128_fp8kv_bf16",
            "paged_attention_hd128_fp8kv_f16",
            "paged_attention_hd256_bf16",
            "paged_attention_hd256_f16",
            "paged_attention_hd256_fp8kv_bf16",
            "paged_attention_hd256_fp8kv_f16",
            "attention_combine_bf16",
            "attention_combine_f16",
            "paged_attention_decode_hd64_g4_bf16",
            "paged_attention_decode_hd64_g4_f16",
            "paged_attention_decode_hd64_g4_fp8kv_bf16",
            "paged_attention_decode_hd64_g4_fp8kv_f16",
            "paged_attention_decode_hd64_g8_bf16",
            "paged_attention_decode_hd64_g8_f16",
            "paged_attention_decode_hd64_g8_fp8kv_bf16",
            "paged_attention_decode_hd64_g8_fp8kv_f16",
            "paged_attention_decode_hd128_g4_bf16",
            "paged_attention_decode_hd128_g4_f16",
            "paged_attention_decode_hd128_g4_fp8kv_bf16",
            "paged_attention_decode_hd128_g4_fp8kv_f16",
            "paged_attention_decode_hd128_g8_bf16",
            "paged_attention_decode_hd128_g8_f16",
            "paged_attention_decode_hd128_g8_fp8kv_bf16",
            "paged_attention_decode_hd128_g8_fp8kv_f16",
            "paged_attention_decode_hd256_g4_bf16",
            "paged_attention_decode_hd256_g4_f16",
            "paged_attention_decode_hd256_g4_fp8kv_bf16",
            "paged_attention_decode_hd256_g4_fp8kv_f16",
            "paged_attention_decode_hd256_g8_bf16",
            "paged_attention_decode_hd256_g8_f16",
            "paged_attention_decode_hd256_g8_fp8kv_bf16",
            "paged_attention_decode_hd256_g8_fp8kv_f16",
        ],
    ),
    (
        "attention_mma.cu",
        &[
            "paged_attention_mma_hd64_bf16",
            "paged_attention_mma_hd64_f16",
            "paged_attention_mma_hd64_fp8kv_bf16",
            "paged_attention_mma_hd64_fp8kv_f16",
            "paged_attention_mma_hd128_bf16",
            "paged_attention_mma_hd128_f16",
            "paged_attention_mma_hd128_fp8kv_bf16",
            "paged_attention_mma_hd128_fp8kv_f16",
            "paged_attention_mma_wide_hd128_bf16",
            "paged_attention_mma_wide_hd128_f16",
            "paged_attention_mma_wide_hd128_fp8kv_bf16",
            "paged_attention_mma_wide_hd128_fp8kv_f16",
        ],
    ),
    (
        "attention_wgmma.cu",
        &[
            "paged_attention_wgmma_hd128_bf16",
            "paged_attention_wgmma_hd128_f16",
            "paged_attention_wgmma_hd128_fp8kv_bf16",
            "paged_attention_wgmma_hd128_fp8kv_f16",
        ],
    ),
    (
        "attention_decode_mma.cu",
        &[
            "paged_attention_decode_mma_hd64_bf16",
            "paged_attention_decode_mma_hd64_f16",
            "paged_attention_decode_mma_hd64_fp8kv_bf16",
            "paged_attention_decode_mma_hd64_fp8kv_f16",
            "paged_attention_decode_mma_hd128_bf16",
            "paged_attention_decode_mma_hd128_f16",
            "paged_attention_decode_mma_hd128_fp8kv_bf16",
            "paged_attention_decode_mma_hd128_fp8kv_f16",
        ],
    ),
    (
        "sampling.cu",
        &[
            "sample_bf16",
            "sample_f16",
            "process_logits_bf16",
            "process_logits_f16",
            "sample_processed_bf16",
            "sample_processed_f16",
            "token_logprobs_bf16",
            "token_logprobs_f16",
        ],
    ),
    (
        "elementwise.cu",
        &[
            "add_bias_bf16",
            "add_bias_f16",
            "gather_rows_bf16",
            "gather_rows_f16",
            "fill_uniform_bf16",
            "fill_uniform_f16",
            "set_entries_bf16",
            "set_entries_f16",
        ],
    ),
    (
        "gemv.cu",
        &[
            "gemv_m1_r1_bf16",
            "gemv_m1_r1_f16",
            "gemv_m1_r2_bf16",
            "gemv_m1_r2_f16",
            "gemv_m1_r4_bf16",
            "gemv_m1_r4_f16",
            "gemv_m2_r1_bf16",
            "gemv_m2_r1_f16",
            "gemv_m2_r2_bf16",
            "gemv_m2_r2_f16",
            "gemv_m2_r4_bf16",
            "gemv_m2_r4_f16",
            "gemv_m4_r1_bf16",
            "gemv_m4_r1_f16",
            "gemv_m4_r2_bf16",
            "gemv_m4_r2_f16",
            "gemv_m4_r4_bf16",
            "gemv_m4_r4_f16",
            "gemv_m8_r1_bf16",
            "gemv_m8_r1_f16",
            "gemv_m8_r2_bf16",
            "gemv_m8_r2_f16",
            "gemv_m8_r4_bf16",
            "gemv_m8_r4_f16",
            "gemv_m1_r1_u4_bf16",
            "gemv_m1_r1_u4_f16",
            "gemv_m1_r1_u8_bf16",
            "gemv_m1_r1_u8_f16",
            "gemv_m1_r2_u4_bf16",
            "gemv_m1_r2_u4_f16",
            "gemv_m1_r2_u8_bf16",
            "gemv_m1_r2_u8_f16",
            "gemv_m2_r1_u4_bf16",
            "gemv_m2_r1_u4_f16",
            "gemv_m2_r1_u8_bf16",
            "gemv_m2_r1_u8_f16",
            "gemv_m2_r2_u4_bf16",
            "gemv_m2_r2_u4_f16",
            "gemv_m2_r2_u8_bf16",
            "gemv_m2_r2_u8_f16",
            "gemv_fp8_m1_r1_bf16",
            "gemv_fp8_m1_r1_f16",
            "gemv_fp8_m1_r2_bf16",
            "gemv_fp8_m1_r2_f16",
            "gemv_fp8_m1_r4_bf16",
            "gemv_fp8_m1_r4_f16",
            "gemv_fp8_m2_r1_bf16",
            "gemv_fp8_m2_r1_f16",
            "gemv_fp8_m2_r2_bf16",
            "gemv_fp8_m2_r2_f16",
            "gemv_fp8_m2_r4_bf16",
            "gemv_fp8_m2_r4_f16",
            "gemv_fp8_m4_r1_bf16",
            "gemv_fp8_m4_r1_f16",
            "gemv_fp8_m4_r2_bf16",
            "gemv_fp8_m4_r2_f16",
            "gemv_fp8_m4_r4_bf16",
            "gemv_fp8_m4_r4_f16",
            "gemv_fp8_m8_r1_bf16",
            "gemv_fp8_m8_r1_f16",
            "gemv_fp8_m8_r2_bf16",
            "gemv_fp8_m8_r2_f16",
            "gemv_fp8_m8_r4_bf16",
            "gemv_fp8_m8_r4_f16",
            "gemv_fp8_m1_r1_u4_bf16",
            "gemv_fp8_m1_r1_u4_f16",
            "gemv_fp8_m1_r1_u8_bf16",
            "gemv_fp8_m1_r1_u8_f16",
            "gemv_fp8_m1_r2_u4_bf16",
            "gemv_fp8_m1_r2_u4_f16",
            "gemv_fp8_m1_r2_u8_bf16",
            "gemv_fp8_m1_r2_u8_f16",
            "gemv_fp8_m2_r1_u4_bf16",
            "gemv_fp8_m2_r1_u4_f16",
            "gemv_fp8_m2_r1_u8_bf16",
            "gemv_fp8_m2_r1_u8_f16",
            "gemv_fp8_m2_r2_u4_bf16",
            "gemv_fp8_m2_r2_u4_f16",
            "gemv_fp8_m2_r2_u8_bf16",
            "gemv_fp8_m2_r2_u8_f16",
            "gemv_mma_bf16",
            "gemv_mma_f16",
            "gemv_mma_m16_bf16",
            "gemv_mma_m16_f16",
            "gemv_mma_a8_bf16",
            "gemv_mma_a8_f16",
            "gemv_fp8_mma_a8_bf16",
            "gemv_fp8_mma_a8_f16",
            "gemv_fp8_mma_bf16",
            "gemv_fp8_mma_f16",
        ],
    ),
    (
        "fp8.cu",
        &[
            "fp8_amax_partial_bf16",
            "fp8_amax_partial_f16",
            "fp8_quantize_bf16",
            "fp8_quantize_f16",
            "fp8_quantize_rows_bf16",
            "fp8_quantize_rows_f16",
            "fp8_scale_outer_bf16",
            "fp8_scale_outer_f16",
        ],
    ),
    (
        "int4.cu",
        &[
            "gemv_w4_bf16",
            "gemv_w4_f16",
            "gemv_w4_gated_bf16",
            "gemv_w4_gated_f16",
            "gemv_w4_pairs_bf16",
            "gemv_w4_pairs_f16",
            "gemv_w4_gated_pairs_bf16",
            "gemv_w4_gated_pairs_f16",
            "gemm_w4_n16_bf16",
            "gemm_w4_n16_f16",
            "gemm_w4_n32_bf16",
            "gemm_w4_n32_f16",
            "gemm_w4_n64_bf16",
            "gemm_w4_n64_f16",
            "dequantize_w4_bf16",
            "dequantize_w4_f16",
            "gather_inputs_bf16",
            "gather_inputs_f16",
        ],
    ),
    ("gemm_bi.cu", &["gemm_bi_bf16", "gemm_bi_f16"]),
    (
        "all_reduce.cu",
        &[
            "all_reduce_one_shot_bf16",
            "all_reduce_one_shot_f16",
            "all_reduce_residual_norm_bf16",
            "all_reduce_residual_norm_f16",
        ],
    ),
    (
        "lora.cu",
        &[
            "lora_shrink_bf16",
            "lora_shrink_f16",
            "lora_expand_bf16",
            "lora_expand_f16",
        ],
    ),
];

/// The activation dtypes every kernel is instantiated for (`TPSERVE_FOR_EACH_DTYPE` in
/// `common.cuh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelDtype {
    /// `__nv_bfloat16`, suffix `_bf16`.
    Bf16,
    /// `__half`, suffix `_f16`.
    F16,
}

impl KernelDtype {
    /// Every dtype, in the order `common.cuh` instantiates them.
    pub const ALL: [KernelDtype; 2] = [KernelDtype::Bf16, KernelDtype::F16];

    /// The entry-point suffix without its underscore: `bf16` or `f16`.
    pub fn suffix(self) -> &'static str {
        match self {
            KernelDtype::Bf16 => "bf16",
            KernelDtype::F16 => "f16",
        }
    }
}

/// The entry-point name of kernel `base` for `dtype`: `entry_point("rope", KernelDtype::Bf16)`
/// is `"rope_bf16"`. Meant for module load time, not the launch path (it allocates).
pub fn entry_point(base: &str, dtype: KernelDtype) -> String {
    format!("{base}_{}", dtype.suffix())
}

/// The embedded source file called `name` (e.g. `"rms_norm.cu"`).
pub fn source(name: &str) -> Result<&'static KernelSource> {
    SOURCES
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| Error::UnknownSource {
            name: name.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function-like macro: its parameters and its body (continuation lines joined).
    struct Macro {
        params: Vec<String>,
        body: String,
    }

    /// `text` without its `//` comments.
    fn without_comments(text: &str) -> String {
        text.lines()
            .map(|l| l.split_once("//").map_or(l, |(code, _)| code))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The function-like macros `text` defines, and the text outside their definitions.
    fn split_macros(text: &str) -> (std::collections::HashMap<String, Macro>, String) {
        let mut macros = std::collections::HashMap::new();
        let mut top = String::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(def) = line.trim_start().strip_prefix("#define ") else {
                top.push_str(line);
                top.push('\n');
                continue;
            };
            let mut whole = line.trim_end().to_string();
            while whole.ends_with('\\') {
                whole.pop();
                whole.push(' ');
                whole.push_str(lines.next().unwrap_or("").trim_end());
            }
            let name: String = def
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let after = &whole[whole.find(&name).expect("the name") + name.len()..];
            if let Some((params, body)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
                let params = params.split(',').map(|p| p.trim().to_string()).collect();
                let body = body.to_string();
                macros.insert(name, Macro { params, body });
            }
        }
        (macros, top)
    }

    /// The arguments of a call whose text starts after its `(`, split at top-level commas, and
    /// the text after its `)`.
    fn call_args(text: &str) -> (Vec<String>, &str) {
        let (mut depth, mut args, mut start) = (0usize, Vec::new(), 0);
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' if depth == 0 => {
                    args.push(text[start..i].trim().to_string());
                    return (args, &text[i + 1..]);
                }
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    args.push(text[start..i].trim().to_string());
                    start = i + 1;
                }
                _ => {}
            }
        }
        panic!("an unclosed call: {text}")
    }

    /// `body` with `params` replaced by `args` (whole identifiers outside string literals: the
    /// `"C"` of `extern "C"` stays) and `##` pasted.
    fn substitute(body: &str, params: &[String], args: &[String]) -> String {
        let mut out = String::new();
        let mut ident = String::new();
        let mut in_string = false;
        let flush = |ident: &mut String, out: &mut String| {
            match params.iter().position(|p| p == ident) {
                Some(i) => out.push_str(&args[i]),
                None => out.push_str(ident),
            }
            ident.clear();
        };
        for c in body.chars() {
            if c == '"' {
                in_string = !in_string;
            }
            if in_string || c == '"' {
                flush(&mut ident, &mut out);
                out.push(c);
            } else if c.is_ascii_alphanumeric() || c == '_' {
                ident.push(c);
            } else {
                flush(&mut ident, &mut out);
                out.push(c);
            }
        }
        flush(&mut ident, &mut out);
        let mut pasted = String::new();
        for (i, part) in out.split("##").enumerate() {
            pasted.push_str(if i == 0 { part.trim_end() } else { part.trim() });
        }
        pasted
    }

    /// The entry points `text` declares (`extern "C" __global__ void [__launch_bounds__(..)]
    /// NAME(`), expanding the calls of `macros` in it as the preprocessor would.
    fn declared_in(text: &str, macros: &std::collections::HashMap<String, Macro>) -> Vec<String> {
        let marker = "extern \"C\" __global__ void ";
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            let mut after = rest.trim_start();
            if let Some(bounds) = after.strip_prefix("__launch_bounds__(") {
                after = call_args(bounds).1.trim_start();
            }
            names.push(
                after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
        let mut ident = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c.is_ascii_alphanumeric() || c == '_' {
                ident.push(c);
                continue;
            }
            if c == '(' {
                if let Some(m) = macros.get(&ident) {
                    let (args, after) = call_args(&text[i + 1..]);
                    names.extend(declared_in(&substitute(&m.body, &m.params, &args), macros));
                    let skip = text.len() - after.len();
                    while chars.peek().is_some_and(|(j, _)| *j < skip) {
                        chars.next();
                    }
                }
            }
            ident.clear();
        }
        names
    }

    /// Every entry point the source `code` declares, its macros and common.cuh's expanded.
    fn declared_entry_points(code: &str) -> Vec<String> {
        let (macros, top) = split_macros(&without_comments(&format!("{COMMON_HEADER}\n{code}")));
        declared_in(&top, &macros)
    }

    #[test]
    fn every_embedded_source_is_non_empty_and_includes_the_common_header() {
        assert!(!COMMON_HEADER.trim().is_empty());
        for src in SOURCES {
            assert!(!src.code.trim().is_empty(), "{} is empty", src.name);
            assert!(
                src.code.lines().any(|l| l.trim() == COMMON_INCLUDE),
                "{} does not include common.cuh",
                src.name
            );
        }
    }

    #[test]
    fn kernel_table_lists_exactly_the_entry_points_each_source_declares() {
        let table_files: Vec<&str> = KERNELS.iter().map(|(file, _)| *file).collect();
        let source_files: Vec<&str> = SOURCES.iter().map(|s| s.name).collect();
        assert_eq!(table_files, source_files);
        for (file, entries) in KERNELS {
            let code = source(file).unwrap().code;
            let mut declared = declared_entry_points(code);
            declared.sort();
            let mut listed: Vec<String> = entries.iter().map(|e| e.to_string()).collect();
            listed.sort();
            assert_eq!(declared, listed, "entry points of {file}");
        }
    }

    #[test]
    fn common_header_instantiates_exactly_the_rust_side_dtypes() {
        let start = COMMON_HEADER
            .find("#define TPSERVE_FOR_EACH_DTYPE(M)")
            .expect("the dtype macro is defined");
        let body: String = COMMON_HEADER[start..]
            .lines()
            .take_while(|l| l.trim_end().ends_with('\\') || l.contains("M("))
            .collect();
        let instantiated = body.matches("M(").count();
        assert_eq!(instantiated, KernelDtype::ALL.len(), "{body}");
        for dtype in KernelDtype::ALL {
            assert!(body.contains(&format!("M({},", dtype.suffix())), "{body}");
        }
    }

    #[test]
    fn every_cu_file_in_the_source_directory_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = SOURCES.iter().map(|s| s.name.to_string()).collect();
        embedded.sort();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn expanded_source_inlines_the_header_and_keeps_line_numbers() {
        let src = source("rms_norm.cu").unwrap();
        let text = src.expanded();
        assert!(!text.lines().any(|l| l.trim() == COMMON_INCLUDE));
        assert!(!text.lines().any(|l| l.trim() == "#pragma once"));
        assert!(text.contains("block_reduce_sum"));
        assert!(!text.contains('\0'), "NVRTC takes a C string");
        // The line after the `#line` directive that closes the header is the source's next line.
        let include_line = src
            .code
            .lines()
            .position(|l| l.trim() == COMMON_INCLUDE)
            .unwrap();
        let marker = format!("#line {} \"rms_norm.cu\"\n", include_line + 2);
        let after = &text[text.find(&marker).unwrap() + marker.len()..];
        assert_eq!(after.lines().next(), src.code.lines().nth(include_line + 1));
    }

    #[test]
    fn unknown_source_name_is_a_typed_error() {
        assert!(matches!(
            source("nope.cu"),
            Err(Error::UnknownSource { name }) if name == "nope.cu"
        ));
        assert_eq!(entry_point("rope", KernelDtype::F16), "rope_f16");
    }
}
