//! Tool calling: the request's `tools` / `tool_choice` checked ([`request`]), messages that
//! carry calls and results shaped for the chat template ([`messages`]), and the model's calls
//! read back out of its text, whole or streamed ([`parser`]), in one of three formats chosen
//! like vLLM's `--tool-call-parser`: [`llama3_json`], [`hermes`] (Qwen2.5) and [`mistral`].
//!
//! Nothing here constrains decoding: `tool_choice: required` and named functions only build the
//! JSON schema the call must satisfy ([`ToolRequest::required_call_schema`]) for the
//! structured-output engine to enforce; until it does, their output is parsed as it comes.

pub mod args;
mod forced;
pub mod hermes;
mod json_scan;
pub mod llama3_json;
pub mod messages;
pub mod mistral;
pub mod parser;
pub mod request;

use rand::distributions::Alphanumeric;
use rand::Rng;

pub use args::{ToolArgs, ToolConfig};
pub use parser::{Mode, Parsed, Piece, ToolCallParser};
pub use request::{FunctionTool, ToolChoice, ToolFields, ToolRequest};

/// A model's tool-call format (vLLM's `--tool-call-parser` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ParserKind {
    /// Llama 3.1+: `{"name": ..., "parameters": ...}` replies, `;`-separated.
    #[value(name = "llama3_json")]
    Llama3Json,
    /// Hermes / Qwen2.5: `<tool_call>{...}</tool_call>`.
    Hermes,
    /// Mistral: `[TOOL_CALLS][{...}, ...]`.
    Mistral,
}

impl ParserKind {
    /// The format a chat template asks its model for, recognised by the markup it writes for
    /// past calls (`<tool_call>`, `[TOOL_CALLS]`) or, for Llama 3.1, its `<|python_tag|>` /
    /// `"parameters"` instructions. `None` when it shows none of them.
    pub fn detect(template: &str) -> Option<ParserKind> {
        if template.contains(hermes::START) {
            Some(ParserKind::Hermes)
        } else if template.contains(mistral::START) {
            Some(ParserKind::Mistral)
        } else if template.contains(llama3_json::PYTHON_TAG)
            || template.contains("\"parameters\": dictionary of argument name")
        {
            Some(ParserKind::Llama3Json)
        } else {
            None
        }
    }

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            ParserKind::Llama3Json => "llama3_json",
            ParserKind::Hermes => "hermes",
            ParserKind::Mistral => "mistral",
        }
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_` and 24 letters and digits (OpenAI's form), or 9 letters and digits for Mistral,
    /// whose templates refuse other ids when the call comes back.
    pub id: String,
    pub name: String,
    /// The arguments object as compact JSON.
    pub arguments: String,
}

/// A fresh call id in the style of `kind`.
pub fn new_call_id(kind: Option<ParserKind>) -> String {
    let random = |n: usize| -> String {
        rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(n)
            .map(char::from)
            .collect()
    };
    match kind {
        Some(ParserKind::Mistral) => random(9),
        _ => format!("call_{}", random(24)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_detected_from_real_template_markup() {
        assert_eq!(
            ParserKind::detect("{{- '\\n<tool_call>\\n{\"name\": \"' }}"),
            Some(ParserKind::Hermes)
        );
        assert_eq!(
            ParserKind::detect("{{- \"[TOOL_CALLS][\" }}"),
            Some(ParserKind::Mistral)
        );
        assert_eq!(
            ParserKind::detect("{{- \"<|python_tag|>\" + tool_call.name }}"),
            Some(ParserKind::Llama3Json)
        );
        assert_eq!(
            ParserKind::detect("{% for m in messages %}{{ m.content }}{% endfor %}"),
            None
        );
    }
}
