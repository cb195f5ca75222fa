//! Reads model sources: Hugging Face directories (config.json, safetensors, tokenizer files) and
//! single GGUF files. Gives the model's config, its weights under Hugging Face names as f32
//! tensors, its tokenizer and its chat template, whatever the format.
//!
//! Entry point: [`ModelSource::open`]. Everything is CPU-side and synchronous; nothing here
//! touches a GPU. Bad files are errors ([`Error`]), never panics.

pub mod chat;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
mod gguf;
pub mod gguf_tokenizer;
pub mod lora;
pub mod quantization;
pub mod source;
pub mod weights;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{LlamaConfig, RopeScaling};
pub use error::{Error, Result};
pub use lora::{LoraAdapter, LoraModule, Projection};
pub use quantization::{Fp8Checkpoint, PackedIntCheckpoint};
pub use source::{Format, GenerationDefaults, ModelSource};
pub use weights::{
    Fp8Scale, Fp8Tensor, Int4Tensor, QuantizedTensor, StoredDtype, StoredTensor, WeightReader,
};
