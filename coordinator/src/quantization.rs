//! `--quantization`: which quantized-weight method runs, resolved at start from the flag, the
//! checkpoint (a GGUF file, or a Hugging Face `quantization_config`) and `--dtype`. Methods we do
//! not run are refused here, by name, before any worker starts.
//!
//! What runs today: `gguf`, a GGUF file's blocks kept quantized on the CPU backend (on a GPU a
//! GGUF is dequantized to the dtype at load, and an explicit `--quantization gguf` is refused by
//! the CUDA worker); `fp8`, a bf16/f16 checkpoint's linear layers quantized to FP8 E4M3 at load
//! (per-tensor weight scales, vLLM's online FP8; per-token activation scales) on CUDA GPUs of compute capability 8.9 or newer (the
//! worker refuses older GPUs); FP8 checkpoints (`quant_method` `fp8` or `compressed-tensors`,
//! `tpserve_modelfile::quantization`), whose weights run as stored where the workers multiply
//! FP8 and are dequantized to `--dtype` elsewhere (and when block-scaled); AWQ and GPTQ
//! checkpoints (`quant_method` `awq` or `gptq`, `tpserve_modelfile::quantization::packed_int`),
//! dequantized to `--dtype` at load; `none`, everything dequantized to `--dtype`.

use tpserve_modelfile::{Fp8Checkpoint, ModelSource, PackedIntCheckpoint};

use crate::error::StartError;

/// Methods vLLM accepts for `--quantization` (or checkpoints name in `quant_method`) that this
/// build does not run: named in the refusal, so a user sees we know of them.
const NOT_YET: &[&str] = &[
    "marlin",
    "bitsandbytes",
    "fbgemm_fp8",
    "modelopt",
    "gptq_marlin_24",
    "aqlm",
    "hqq",
    "experts_int8",
    "tpu_int8",
    "deepspeedfp",
    "ptpc_fp8",
    "torchao",
    "quark",
    "moe_wna16",
    "mxfp4",
];

/// What the workers are asked for (`LoadModelRequest.quantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// Keep GGUF blocks where the backend runs them (the CPU, unless `--dtype float32`).
    Auto,
    /// Keep GGUF blocks; a CUDA worker refuses.
    Gguf,
    /// Dequantize everything to the dtype.
    None,
    /// Linear weights in FP8 E4M3 (CUDA): an FP8 checkpoint's as stored, else quantized at load.
    Fp8,
}

impl Quantization {
    /// The request's field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Gguf => "gguf",
            Self::None => "none",
            Self::Fp8 => "fp8",
        }
    }
}

fn refuse(detail: String) -> StartError {
    StartError::Config { detail }
}

/// What `--quantization` takes, for the refusals.
const SUPPORTED: &str = "gguf on the CPU backend; fp8 (and compressed-tensors, for such FP8 \
                         checkpoints) on CUDA GPUs of compute capability 8.9 or newer; awq and \
                         gptq (or awq_marlin, gptq_marlin) for such checkpoints; none";

/// The `--quantization` names that fit an AWQ or GPTQ checkpoint of `method`.
fn fits_packed_int(flag: &str, method: &str) -> bool {
    flag.strip_suffix("_marlin").unwrap_or(flag) == method
}

/// Checks `--quantization` on its own and against `--dtype` and `--device` (no checkpoint
/// needed).
pub fn validate_flag(flag: Option<&str>, dtype: &str, device: &str) -> Result<(), StartError> {
    match flag {
        None
        | Some(
            "gguf" | "none" | "fp8" | "compressed-tensors" | "awq" | "awq_marlin" | "gptq"
            | "gptq_marlin",
        ) => {}
        Some(m) if NOT_YET.contains(&m) => {
            return Err(refuse(format!(
                "--quantization {m} is not supported by tpserve yet (supported: {SUPPORTED})"
            )))
        }
        Some(m) => {
            return Err(refuse(format!(
                "unknown --quantization {m:?} (supported: {SUPPORTED})"
            )))
        }
    }
    let fp8 = flag.filter(|m| matches!(*m, "fp8" | "compressed-tensors"));
    if let (Some(m), "cpu") = (fp8, device) {
        return Err(refuse(format!(
            "--quantization {m} runs on CUDA GPUs of compute capability 8.9 or newer, not on \
             --device cpu (the CPU backend keeps GGUF files quantized, --quantization gguf, and \
             runs FP8 checkpoints dequantized: leave --quantization unset)"
        )));
    }
    if let (Some(m), "float32" | "float") = (fp8, dtype) {
        return Err(refuse(format!(
            "--quantization {m} multiplies FP8 weights into bfloat16 or float16 activations; \
             --dtype float32 is not one of them"
        )));
    }
    if flag == Some("gguf") && matches!(dtype, "float32" | "float") {
        return Err(refuse(
            "--quantization gguf keeps weights in GGUF blocks, --dtype float32 asks for them \
             dequantized to f32: choose one"
                .into(),
        ));
    }
    Ok(())
}

/// What the checkpoint holds, as far as quantization goes.
#[derive(Debug, Clone, Copy)]
pub enum Checkpoint<'a> {
    /// Plain floating-point weights (or `--load-format dummy`).
    Plain,
    /// A GGUF file, whatever its block types.
    Gguf,
    /// An FP8 checkpoint (`quant_method` fp8 or compressed-tensors): its scheme, or why we do not
    /// read it.
    Fp8(Result<&'a Fp8Checkpoint, &'a str>),
    /// An AWQ or GPTQ checkpoint: its scheme, or why we do not read it.
    PackedInt(Result<&'a PackedIntCheckpoint, &'a str>),
    /// Another `quant_method`.
    Other(&'a str),
}

impl<'a> Checkpoint<'a> {
    /// The checkpoint of `source`.
    pub fn of(source: &'a ModelSource) -> Self {
        match (
            source.quantization(),
            source.fp8_scheme(),
            source.packed_int_scheme(),
        ) {
            (None, _, _) => Self::Plain,
            (Some("gguf"), _, _) => Self::Gguf,
            (_, Some(scheme), _) => Self::Fp8(scheme),
            (_, None, Some(scheme)) => Self::PackedInt(scheme),
            (Some(method), None, None) => Self::Other(method),
        }
    }
}

/// The method to ask the workers for, given the flag and the checkpoint.
pub fn resolve(flag: Option<&str>, checkpoint: Checkpoint) -> Result<Quantization, StartError> {
    use Checkpoint as C;
    match (checkpoint, flag) {
        (C::Gguf, None) => Ok(Quantization::Auto),
        (C::Gguf, Some("gguf")) => Ok(Quantization::Gguf),
        (C::Plain | C::Gguf, Some("none")) => Ok(Quantization::None),
        (C::Plain, Some("fp8")) => Ok(Quantization::Fp8),
        (C::Gguf, Some("fp8")) => Err(refuse(
            "--quantization fp8 quantizes a bfloat16/float16 checkpoint at load; this one is a \
             GGUF file, already quantized (on a GPU it is dequantized to --dtype: leave \
             --quantization unset)"
                .into(),
        )),
        (C::Gguf, Some(m)) => Err(refuse(format!(
            "--quantization {m} does not fit a GGUF file (leave --quantization unset, or pass \
             gguf or none)"
        ))),
        (C::Fp8(Err(why)), _) => Err(refuse(format!(
            "the checkpoint's quantization_config is an FP8 form tpserve does not read: {why}"
        ))),
        // Where the workers multiply FP8 (CUDA, compute capability 8.9+) the checkpoint's FP8
        // weights run as stored; elsewhere they are dequantized to --dtype.
        (C::Fp8(Ok(_)), None) => Ok(Quantization::Auto),
        (C::Fp8(Ok(_)), Some("none")) => Ok(Quantization::None),
        (C::Fp8(Ok(s)), Some(m)) if m == "fp8" || m == s.method => match s.block() {
            Some((r, c)) => Err(refuse(format!(
                "--quantization {m}: this checkpoint's FP8 weights have {r} x {c} block scales, \
                 which tpserve dequantizes to --dtype at load rather than multiplying in FP8 \
                 (leave --quantization unset, or none)"
            ))),
            None => Ok(Quantization::Fp8),
        },
        (C::Fp8(Ok(s)), Some(m)) => Err(refuse(format!(
            "--quantization {m} does not fit this checkpoint, which is quantized with {:?} \
             ({}): leave --quantization unset, or pass {:?} or none",
            s.method,
            s.describe(),
            s.method
        ))),
        (C::PackedInt(Err(why)), _) => Err(refuse(format!(
            "the checkpoint's quantization_config is a form tpserve does not read: {why}"
        ))),
        // The workers keep the packed weights where they multiply them, and dequantize them to
        // --dtype elsewhere.
        (C::PackedInt(Ok(_)), None) => Ok(Quantization::Auto),
        (C::PackedInt(Ok(_)), Some("none")) => Ok(Quantization::None),
        (C::PackedInt(Ok(s)), Some(m)) if fits_packed_int(m, s.method.as_str()) => {
            Ok(Quantization::Auto)
        }
        (C::PackedInt(Ok(s)), Some(m)) => Err(refuse(format!(
            "--quantization {m} does not fit this checkpoint, which is quantized with {:?} \
             ({}): leave --quantization unset, or pass {:?} or none",
            s.method.as_str(),
            s.describe(),
            s.method.as_str()
        ))),
        (C::Other(method), _) => Err(refuse(format!(
            "the checkpoint is quantized with {method:?} (config.json quantization_config), which \
             tpserve does not run yet (supported: GGUF files, on the CPU kept quantized; FP8 \
             checkpoints, quant_method fp8 or compressed-tensors; AWQ and GPTQ checkpoints, \
             quant_method awq or gptq)"
        ))),
        (C::Plain, Some(m)) => Err(refuse(format!(
            "--quantization {m} needs a checkpoint quantized that way; this one has no quantized \
             weights (use a .gguf file)"
        ))),
        (C::Plain, None) => Ok(Quantization::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpserve_modelfile::quantization::{Fp8ActivationScales, Fp8WeightScales};

    fn message(r: Result<impl std::fmt::Debug, StartError>) -> String {
        r.expect_err("refused").to_string()
    }

    fn fp8(weights: Fp8WeightScales) -> Fp8Checkpoint {
        Fp8Checkpoint {
            method: "compressed-tensors".into(),
            weights,
            activations: Fp8ActivationScales::DynamicToken,
            kv_cache_scales: false,
        }
    }

    #[test]
    fn methods_we_do_not_run_are_refused_by_name() {
        for m in ["bitsandbytes", "hqq", "marlin"] {
            let msg = message(validate_flag(Some(m), "auto", "auto"));
            assert!(msg.contains(m) && msg.contains("not supported"), "{msg}");
        }
        let msg = message(validate_flag(Some("int3"), "auto", "auto"));
        assert!(msg.contains("unknown --quantization \"int3\""), "{msg}");
    }

    #[test]
    fn gguf_with_float32_is_a_contradiction() {
        let msg = message(validate_flag(Some("gguf"), "float32", "auto"));
        assert!(msg.contains("--dtype float32"), "{msg}");
        assert!(validate_flag(Some("gguf"), "auto", "auto").is_ok());
        assert!(validate_flag(Some("none"), "float32", "auto").is_ok());
        assert!(validate_flag(None, "float32", "auto").is_ok());
    }

    #[test]
    fn fp8_is_for_cuda_with_half_precision_activations() {
        for m in ["fp8", "compressed-tensors"] {
            for dtype in ["auto", "bfloat16", "float16"] {
                assert!(validate_flag(Some(m), dtype, "cuda").is_ok(), "{m} {dtype}");
                assert!(validate_flag(Some(m), dtype, "auto").is_ok(), "{m} {dtype}");
            }
            let msg = message(validate_flag(Some(m), "auto", "cpu"));
            assert!(msg.contains("--device cpu") && msg.contains(m), "{msg}");
            let msg = message(validate_flag(Some(m), "float32", "cuda"));
            assert!(msg.contains("--dtype float32"), "{msg}");
        }
        assert_eq!(
            resolve(Some("fp8"), Checkpoint::Plain).unwrap(),
            Quantization::Fp8
        );
        let msg = message(resolve(Some("fp8"), Checkpoint::Gguf));
        assert!(msg.contains("GGUF file"), "{msg}");
    }

    #[test]
    fn the_checkpoint_decides_what_the_flag_leaves_open() {
        use Checkpoint as C;
        assert_eq!(resolve(None, C::Gguf).unwrap(), Quantization::Auto);
        assert_eq!(resolve(Some("gguf"), C::Gguf).unwrap(), Quantization::Gguf);
        assert_eq!(resolve(Some("none"), C::Gguf).unwrap(), Quantization::None);
        assert_eq!(resolve(None, C::Plain).unwrap(), Quantization::None);
        assert_eq!(resolve(Some("none"), C::Plain).unwrap(), Quantization::None);
    }

    #[test]
    fn fp8_checkpoints_run_as_stored_or_dequantized() {
        use Checkpoint as C;
        let channel = fp8(Fp8WeightScales::Channel);
        let ok = || C::Fp8(Ok(&channel));
        assert_eq!(resolve(None, ok()).unwrap(), Quantization::Auto);
        assert_eq!(resolve(Some("none"), ok()).unwrap(), Quantization::None);
        for m in ["fp8", "compressed-tensors"] {
            assert_eq!(resolve(Some(m), ok()).unwrap(), Quantization::Fp8, "{m}");
        }
        let msg = message(resolve(Some("gguf"), ok()));
        assert!(msg.contains("\"compressed-tensors\""), "{msg}");
        let blocks = fp8(Fp8WeightScales::Block(128, 128));
        assert_eq!(
            resolve(None, C::Fp8(Ok(&blocks))).unwrap(),
            Quantization::Auto
        );
        let msg = message(resolve(Some("fp8"), C::Fp8(Ok(&blocks))));
        assert!(msg.contains("128 x 128 block scales"), "{msg}");
        let msg = message(resolve(None, C::Fp8(Err("format \"pack-quantized\""))));
        assert!(msg.contains("pack-quantized"), "{msg}");
    }

    #[test]
    fn awq_and_gptq_checkpoints_take_their_own_flags() {
        use tpserve_modelfile::quantization::PackedIntMethod;
        use Checkpoint as C;
        let gptq = PackedIntCheckpoint {
            method: PackedIntMethod::Gptq,
            bits: 4,
            group_size: Some(128),
            act_order: false,
            symmetric: true,
            zero_offset: 1,
        };
        let ok = || C::PackedInt(Ok(&gptq));
        for flag in [None, Some("gptq"), Some("gptq_marlin")] {
            assert!(validate_flag(flag, "auto", "cpu").is_ok(), "{flag:?}");
            assert_eq!(resolve(flag, ok()).unwrap(), Quantization::Auto, "{flag:?}");
        }
        assert_eq!(resolve(Some("none"), ok()).unwrap(), Quantization::None);
        let msg = message(resolve(Some("awq"), ok()));
        assert!(msg.contains("\"gptq\"") && msg.contains("4-bit"), "{msg}");
        let msg = message(resolve(None, C::PackedInt(Err("awq version \"gemv\""))));
        assert!(msg.contains("gemv"), "{msg}");
    }

    #[test]
    fn quantized_hf_checkpoints_and_mismatched_flags_are_refused_by_name() {
        use Checkpoint as C;
        for (flag, checkpoint, needle) in [
            (None, C::Other("bitsandbytes"), "\"bitsandbytes\""),
            (Some("none"), C::Other("hqq"), "\"hqq\""),
            (Some("awq"), C::Plain, "--quantization awq needs"),
            (Some("compressed-tensors"), C::Gguf, "GGUF file"),
            (Some("gguf"), C::Plain, "--quantization gguf needs"),
        ] {
            let msg = message(resolve(flag, checkpoint));
            assert!(msg.contains(needle), "{flag:?} {checkpoint:?}: {msg}");
        }
    }
}
