//! A Hugging Face checkpoint's `quantization_config`, for the methods tpserve reads (issue 12):
//! the FP8 forms ([`fp8`]: `quant_method` `fp8` and compressed-tensors' float-quantized format)
//! and 4- or 8-bit integer weights packed into int32 words ([`packed_int`]: `awq` and `gptq`).
//! Other methods, and other forms of these, are named back to the caller, which refuses them.

pub mod fp8;
pub mod packed_int;

pub use fp8::{fp8_scheme, Fp8ActivationScales, Fp8Checkpoint, Fp8WeightScales};
pub use packed_int::{packed_int_scheme, PackedIntCheckpoint, PackedIntMethod};
