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
            "rms_norm_f16",
            "rms_norm_residual_bf16",
            "rms_norm_residual_f16",
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
    ("silu_mul.cu", &["silu_mul_bf16", "silu_mul_f16"]),
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
            "dequantize_w4_bf16",
            "dequantize_w4_f16",
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

    /// The base names of every entry point `code` defines, from its instantiation macros: a
    /// macro `M(SUFFIX, T)` whose body declares `extern "C" __global__ void
    /// [__launch_bounds__(..)] NAME_##SUFFIX(` gives `NAME`; a macro with more parameters,
    /// `M(SUFFIX, T, A, B)` declaring e.g. `gemv_m##A##_r##B##_##SUFFIX(`, gives one name per
    /// invocation `M(SUFFIX, T, 1, 2)` in the file (`gemv_m1_r2`).
    fn macro_entry_bases(code: &str) -> Vec<String> {
        let marker = "extern \"C\" __global__ void ";
        let mut bases = Vec::new();
        let mut rest = code;
        while let Some(at) = rest.find("#define ") {
            rest = &rest[at + "#define ".len()..];
            let macro_name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let Some(params) = rest[macro_name.len()..]
                .strip_prefix('(')
                .and_then(|p| p.split_once(')'))
                .map(|(p, _)| p.split(',').map(str::trim).collect::<Vec<_>>())
            else {
                continue;
            };
            // The macro's body: up to the first line that does not continue with a backslash.
            let body_end = rest
                .lines()
                .scan(0usize, |len, line| {
                    *len += line.len() + 1;
                    Some((*len, line.trim_end().ends_with('\\')))
                })
                .find(|(_, continues)| !continues)
                .map_or(rest.len(), |(len, _)| len.min(rest.len()));
            let body = &rest[..body_end];
            let mut patterns = Vec::new();
            let mut decls = body;
            while let Some(decl) = decls.find(marker) {
                decls = &decls[decl + marker.len()..];
                let mut after = decls.trim_start();
                if let Some(bounds) = after.strip_prefix("__launch_bounds__(") {
                    after = bounds.split_once(')').expect("closed").1.trim_start();
                }
                patterns.push(
                    after
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '#')
                        .collect::<String>(),
                );
            }
            let expand = |pattern: &str, values: &[&str]| -> String {
                let name: String = pattern
                    .split("##")
                    .map(|token| {
                        params
                            .iter()
                            .position(|p| *p == token && *p != "SUFFIX")
                            .map_or(token, |i| values[i])
                    })
                    .collect();
                name.strip_suffix("_SUFFIX")
                    .unwrap_or_else(|| {
                        panic!("entry point {pattern} is not instantiated per dtype")
                    })
                    .to_string()
            };
            if params.len() == 2 {
                bases.extend(patterns.iter().map(|p| expand(p, &params)));
                continue;
            }
            let call = format!("{macro_name}(");
            for line in code.lines().filter(|l| !l.contains("#define")) {
                if let Some(args) = line
                    .split_once(&call)
                    .and_then(|(_, a)| a.split_once(')'))
                    .map(|(a, _)| a.split(',').map(str::trim).collect::<Vec<_>>())
                {
                    assert_eq!(args.len(), params.len(), "{line}");
                    bases.extend(patterns.iter().map(|p| expand(p, &args)));
                }
            }
        }
        bases
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
            let mut declared: Vec<String> = macro_entry_bases(code)
                .iter()
                .flat_map(|base| KernelDtype::ALL.map(|d| entry_point(base, d)))
                .collect();
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
