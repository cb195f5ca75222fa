//! The crate's error type. Each variant names the phase that failed (reading a file, parsing it,
//! mapping a config, reading a tensor, building the tokenizer, compiling or rendering the chat
//! template) and carries the file, key or tensor involved, so a caller can report it without
//! guessing. No variant is built from a panic: bad files come back as values.

use std::path::PathBuf;

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong while reading a model source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be opened, read or mapped.
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its contents are not what its format says (bad JSON, bad GGUF or
    /// safetensors header, tensor data past the end of the file, ...).
    #[error("parsing {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    /// The path is neither a Hugging Face directory nor a `.gguf` file, or the requested format
    /// does not fit it.
    #[error("cannot tell the model format of {}: {detail}", path.display())]
    UnknownFormat { path: PathBuf, detail: String },
    /// A config field is missing or inconsistent (for example heads not dividing the hidden size).
    #[error("model config: {detail}")]
    Config { detail: String },
    /// The model's architecture is not one this crate maps (see [`crate::config`]).
    #[error("unsupported architecture `{name}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and their headless LlamaModel, MistralModel, Qwen2Model; GGUF: llama, qwen2)")]
    UnsupportedArchitecture { name: String },
    /// A RoPE scaling type other than the ones [`crate::RopeScaling`] describes.
    #[error("unsupported rope scaling type `{rope_type}` (supported: llama3)")]
    UnsupportedRopeScaling { rope_type: String },
    /// A required GGUF metadata key is missing or has the wrong type.
    #[error("GGUF metadata `{key}`: {detail}")]
    GgufMetadata { key: String, detail: String },
    /// A tensor is stored in a type this crate cannot convert to f32.
    #[error("tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedTensorType { tensor: String, dtype: String },
    /// No tensor of that (Hugging Face) name exists in the source.
    #[error("missing tensor `{name}`")]
    MissingTensor { name: String },
    /// A tensor exists but reading it failed: a slice out of range, a shape that does not fit, a
    /// failed dequantization.
    #[error("reading tensor `{name}`: {detail}")]
    Tensor { name: String, detail: String },
    /// The tokenizer could not be built or loaded.
    #[error("tokenizer: {detail}")]
    Tokenizer { detail: String },
    /// The chat template did not compile or did not render.
    #[error("chat template: {detail}")]
    ChatTemplate { detail: String },
    /// A LoRA adapter cannot be served: `field` names the config field, file or tensor at fault.
    #[error("LoRA adapter {}: `{field}` {detail}", path.display())]
    Lora {
        path: PathBuf,
        field: String,
        detail: String,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn parse(path: impl Into<PathBuf>, detail: impl ToString) -> Self {
        Error::Parse {
            path: path.into(),
            detail: detail.to_string(),
        }
    }

    pub(crate) fn tensor(name: &str, detail: impl ToString) -> Self {
        Error::Tensor {
            name: name.to_string(),
            detail: detail.to_string(),
        }
    }
}
