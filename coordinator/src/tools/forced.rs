//! The output of a forced call: what the schema of
//! [`super::ToolRequest::required_call_schema`] describes. For a named function the whole
//! output is its arguments object; for `required`, a non-empty JSON array of
//! `{"name": ..., "parameters": {...}}` objects (vLLM's shape). Until the structured-output
//! engine constrains decoding to that schema, a model may write something else: then `None`,
//! and the caller falls back on the template's own call format.

use serde_json::Value;

use super::parser::call_from_object;

/// The calls in `text`, or `None` when it is not what the forced schema describes.
pub fn calls(text: &str, function: Option<&str>) -> Option<Vec<(String, String)>> {
    let value: Value = serde_json::from_str(text.trim()).ok()?;
    match (function, value) {
        (Some(name), args @ Value::Object(_)) => Some(vec![(name.to_string(), args.to_string())]),
        (None, Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| call_from_object(item, "parameters"))
            .collect(),
        _ => None,
    }
}
