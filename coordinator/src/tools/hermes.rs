//! Hermes-style calls, as Qwen2.5's template asks for them: each call is
//! `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`; several may follow each
//! other; text before them is the message's content. (vLLM's `hermes` parser.)

use serde_json::Value;

use super::parser::call_from_object;

/// Opens a call.
pub const START: &str = "<tool_call>";
/// Closes a call.
pub const END: &str = "</tool_call>";

/// The call between the tags: one JSON object with `name` and `arguments`. `None` when it is
/// not that.
pub fn call(body: &str) -> Option<(String, String)> {
    let value: Value = serde_json::from_str(body.trim()).ok()?;
    call_from_object(&value, "arguments")
}
