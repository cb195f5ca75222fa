//! The activation dtype of the CUDA backend and what each library calls it.

use tpserve_kernels::KernelDtype;

use super::ELEM;
use crate::error::{Result, WorkerError};

/// The activation dtype on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F16,
}

impl Dtype {
    /// Parses a `--dtype` value; `auto` is bfloat16.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "" | "auto" | "bfloat16" | "bf16" => Ok(Self::Bf16),
            "float16" | "half" | "fp16" => Ok(Self::F16),
            other => Err(WorkerError::Device {
                detail: format!("the CUDA backend computes in bfloat16 or float16, not {other:?}"),
            }),
        }
    }

    /// The dtype's name as `--dtype` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bfloat16",
            Self::F16 => "float16",
        }
    }

    /// The checkpoint dtype whose bytes are this dtype's.
    pub fn stored(self) -> tpserve_modelfile::StoredDtype {
        match self {
            Self::Bf16 => tpserve_modelfile::StoredDtype::Bf16,
            Self::F16 => tpserve_modelfile::StoredDtype::F16,
        }
    }

    /// Rounds an f32 to this dtype's bits.
    pub fn from_f32(self, x: f32) -> u16 {
        match self {
            Self::Bf16 => half::bf16::from_f32(x).to_bits(),
            Self::F16 => half::f16::from_f32(x).to_bits(),
        }
    }

    /// The f32 value of this dtype's bits.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            Self::Bf16 => half::bf16::from_bits(bits).to_f32(),
            Self::F16 => half::f16::from_bits(bits).to_f32(),
        }
    }

    pub(super) fn kernel_dtype(self) -> KernelDtype {
        match self {
            Self::Bf16 => KernelDtype::Bf16,
            Self::F16 => KernelDtype::F16,
        }
    }

    /// Bytes per element.
    pub fn bytes(self) -> usize {
        ELEM
    }

    /// cuBLAS's name for it.
    pub fn cublas(self) -> cudarc::cublas::sys::cudaDataType_t {
        match self {
            Self::Bf16 => cudarc::cublas::sys::cudaDataType_t::CUDA_R_16BF,
            Self::F16 => cudarc::cublas::sys::cudaDataType_t::CUDA_R_16F,
        }
    }

    /// NCCL's name for it.
    pub fn nccl(self) -> cudarc::nccl::sys::ncclDataType_t {
        match self {
            Self::Bf16 => cudarc::nccl::sys::ncclDataType_t::ncclBfloat16,
            Self::F16 => cudarc::nccl::sys::ncclDataType_t::ncclFloat16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_round_trip_and_parse() {
        assert_eq!(Dtype::parse("auto").unwrap(), Dtype::Bf16);
        assert_eq!(Dtype::parse("float16").unwrap(), Dtype::F16);
        assert!(Dtype::parse("float32").is_err());
        for d in [Dtype::Bf16, Dtype::F16] {
            assert_eq!(d.to_f32(d.from_f32(1.5)), 1.5);
        }
    }
}
