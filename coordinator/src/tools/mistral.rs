//! Mistral's calls: `[TOOL_CALLS]` and then a JSON array of `{"name": ..., "arguments": {...}}`
//! objects (Mistral 7B v0.3, Mistral Nemo and their templates); text before it is content.
//! `[TOOL_CALLS]` is a special token, so its text survives decoding only because tool parsing
//! turns `skip_special_tokens` off (as vLLM's parser does). Ids are Mistral's: 9 letters and
//! digits, which its templates insist on when the calls come back. (vLLM's `mistral` parser.)

use serde_json::Value;

use super::parser::call_from_object;

/// Opens the calls.
pub const START: &str = "[TOOL_CALLS]";

/// The calls of one `[TOOL_CALLS]` array (a lone object is taken as a one-call array). `None`
/// when any element is not a call.
pub fn calls(body: &str) -> Option<Vec<(String, String)>> {
    match serde_json::from_str(body).ok()? {
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|item| call_from_object(item, "arguments"))
            .collect(),
        object @ Value::Object(_) => call_from_object(&object, "arguments").map(|c| vec![c]),
        _ => None,
    }
}
