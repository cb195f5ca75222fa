//! Llama 3.1+'s JSON calls: the reply is `{"name": ..., "parameters": {...}}` (optionally after
//! `<|python_tag|>`), several joined by `;`. A reply that starts with anything else is plain
//! content: the format has no marker to find later in the text. (vLLM's `llama3_json` parser.)

use serde_json::Value;

use super::parser::call_from_object;

/// The token Llama 3.1 may put before a call.
pub const PYTHON_TAG: &str = "<|python_tag|>";
/// Between calls.
pub const SEPARATOR: char = ';';

/// One call object. Llama's templates say `parameters`; `arguments` is taken too.
pub fn call(body: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(body).ok()?;
    let key = if value.get("parameters").is_some() {
        "parameters"
    } else {
        "arguments"
    };
    call_from_object(&value, key)
}
