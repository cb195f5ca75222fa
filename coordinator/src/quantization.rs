//! `--quantization`: which quantized-weight method runs, resolved at start from the flag, the
//! checkpoint (a GGUF file, or a Hugging Face `quantization_config`) and `--dtype`. Methods we do
//! not run are refused here, by name, before any worker starts.
//!
//! What runs today: `gguf`, a GGUF file's blocks kept quantized on the CPU backend (on a GPU a
//! GGUF is dequantized to the dtype at load, and an explicit `--quantization gguf` is refused by
//! the CUDA worker); `fp8`, a bf16/f16 checkpoint's linear layers quantized to FP8 E4M3 at load
//! (per-tensor scales, vLLM's online FP8) on CUDA GPUs of compute capability 8.9 or newer (the
//! worker refuses older GPUs); `none`, everything dequantized to `--dtype`.

use crate::error::StartError;

/// Methods vLLM accepts for `--quantization` (or checkpoints name in `quant_method`) that this
/// build does not run: named in the refusal, so a user sees we know of them.
const NOT_YET: &[&str] = &[
    "awq",
    "awq_marlin",
    "gptq",
    "gptq_marlin",
    "marlin",
    "compressed-tensors",
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
    /// Linear weights quantized to FP8 E4M3 at load (CUDA).
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
const SUPPORTED: &str = "gguf on the CPU backend, fp8 on CUDA GPUs of compute capability 8.9 or \
                         newer, none";

/// Checks `--quantization` on its own and against `--dtype` and `--device` (no checkpoint
/// needed).
pub fn validate_flag(flag: Option<&str>, dtype: &str, device: &str) -> Result<(), StartError> {
    match flag {
        None | Some("gguf" | "none" | "fp8") => {}
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
    if flag == Some("fp8") && device == "cpu" {
        return Err(refuse(
            "--quantization fp8 runs on CUDA GPUs of compute capability 8.9 or newer, not on \
             --device cpu (the CPU backend keeps GGUF files quantized: --quantization gguf)"
                .into(),
        ));
    }
    if flag == Some("fp8") && matches!(dtype, "float32" | "float") {
        return Err(refuse(
            "--quantization fp8 multiplies FP8 weights into bfloat16 or float16 activations; \
             --dtype float32 is not one of them"
                .into(),
        ));
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

/// The method to ask the workers for, given the flag and the checkpoint's own quantization
/// (`ModelSource::quantization`: `gguf`, a `quant_method`, or `None`).
pub fn resolve(flag: Option<&str>, checkpoint: Option<&str>) -> Result<Quantization, StartError> {
    match (checkpoint, flag) {
        (Some("gguf"), None) => Ok(Quantization::Auto),
        (Some("gguf"), Some("gguf")) => Ok(Quantization::Gguf),
        (_, Some("none")) if checkpoint.is_none_or(|c| c == "gguf") => Ok(Quantization::None),
        (None, Some("fp8")) => Ok(Quantization::Fp8),
        (Some("gguf"), Some("fp8")) => Err(refuse(
            "--quantization fp8 quantizes a bfloat16/float16 checkpoint at load; this one is a \
             GGUF file, already quantized (on a GPU it is dequantized to --dtype: leave \
             --quantization unset)"
                .into(),
        )),
        (Some(method), _) => Err(refuse(format!(
            "the checkpoint is quantized with {method:?} (config.json quantization_config), which \
             tpserve does not run yet (supported: GGUF files, on the CPU kept quantized)"
        ))),
        (None, Some(m)) => Err(refuse(format!(
            "--quantization {m} needs a checkpoint quantized that way; this one has no quantized \
             weights (use a .gguf file)"
        ))),
        (None, None) => Ok(Quantization::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: Result<impl std::fmt::Debug, StartError>) -> String {
        r.expect_err("refused").to_string()
    }

    #[test]
    fn methods_we_do_not_run_are_refused_by_name() {
        for m in ["awq", "gptq", "compressed-tensors"] {
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
        for dtype in ["auto", "bfloat16", "float16"] {
            assert!(validate_flag(Some("fp8"), dtype, "cuda").is_ok(), "{dtype}");
            assert!(validate_flag(Some("fp8"), dtype, "auto").is_ok(), "{dtype}");
        }
        let msg = message(validate_flag(Some("fp8"), "auto", "cpu"));
        assert!(msg.contains("--device cpu"), "{msg}");
        let msg = message(validate_flag(Some("fp8"), "float32", "cuda"));
        assert!(msg.contains("--dtype float32"), "{msg}");
        assert_eq!(resolve(Some("fp8"), None).unwrap(), Quantization::Fp8);
        let msg = message(resolve(Some("fp8"), Some("gguf")));
        assert!(msg.contains("GGUF file"), "{msg}");
    }

    #[test]
    fn the_checkpoint_decides_what_the_flag_leaves_open() {
        assert_eq!(resolve(None, Some("gguf")).unwrap(), Quantization::Auto);
        assert_eq!(
            resolve(Some("gguf"), Some("gguf")).unwrap(),
            Quantization::Gguf
        );
        assert_eq!(
            resolve(Some("none"), Some("gguf")).unwrap(),
            Quantization::None
        );
        assert_eq!(resolve(None, None).unwrap(), Quantization::None);
        assert_eq!(resolve(Some("none"), None).unwrap(), Quantization::None);
    }

    #[test]
    fn quantized_hf_checkpoints_and_mismatched_flags_are_refused_by_name() {
        for (flag, checkpoint, needle) in [
            (None, Some("awq"), "\"awq\""),
            (Some("none"), Some("gptq"), "\"gptq\""),
            (Some("gguf"), Some("fp8"), "\"fp8\""),
            (Some("fp8"), Some("fp8"), "\"fp8\""),
            (Some("gguf"), None, "--quantization gguf needs"),
        ] {
            let msg = message(resolve(flag, checkpoint));
            assert!(msg.contains(needle), "{flag:?} {checkpoint:?}: {msg}");
        }
    }
}
