//! Messages that carry tool calls and tool results, shaped the way Hugging Face chat templates
//! read them (as vLLM passes them): an assistant's `tool_calls` as
//! `[{"id", "type", "function": {"name", "arguments"}}]` with `arguments` parsed from the JSON
//! string OpenAI clients send into an object (Qwen2.5, Llama 3.1 and Mistral templates all
//! write `arguments | tojson`, which would quote a string), a tool result's `tool_call_id`.

use serde_json::{json, Map, Value};

use crate::api::ApiError;

/// An assistant message's `tool_calls` (message `message` of the request) for the template.
pub fn template_tool_calls(calls: &Value, message: usize) -> Result<Value, ApiError> {
    let param = |field: &str| format!("messages[{message}].tool_calls{field}");
    let Value::Array(calls) = calls else {
        return Err(ApiError::invalid(&param(""), "`tool_calls` must be a list"));
    };
    let mut out = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let at = |field: &str| param(&format!("[{i}]{field}"));
        let function = call.get("function").and_then(Value::as_object);
        let name = function.and_then(|f| f.get("name")).and_then(Value::as_str);
        let (Some(function), Some(name)) = (function, name) else {
            return Err(ApiError::invalid(
                &at(".function"),
                "A tool call needs a `function` with a string `name`",
            ));
        };
        let arguments = match function.get("arguments") {
            None | Some(Value::Null) => json!({}),
            Some(Value::String(s)) => serde_json::from_str(s).map_err(|e| {
                ApiError::invalid(
                    &at(".function.arguments"),
                    format!("`arguments` is not valid JSON: {e}"),
                )
            })?,
            Some(other) => other.clone(),
        };
        let mut shaped = Map::new();
        if let Some(id) = call.get("id").filter(|v| !v.is_null()) {
            let Some(id) = id.as_str() else {
                return Err(ApiError::invalid(&at(".id"), "`id` must be a string"));
            };
            shaped.insert("id".into(), json!(id));
        }
        shaped.insert("type".into(), json!("function"));
        shaped.insert(
            "function".into(),
            json!({"name": name, "arguments": arguments}),
        );
        out.push(Value::Object(shaped));
    }
    Ok(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_strings_become_objects_keeping_key_order() {
        let calls = json!([{"id": "call_1", "type": "function",
            "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": [true]}"}}]);
        let shaped = template_tool_calls(&calls, 2).unwrap();
        assert_eq!(
            serde_json::to_string(&shaped).unwrap(),
            r#"[{"id":"call_1","type":"function","function":{"name":"f","arguments":{"b":1,"a":[true]}}}]"#
        );
    }

    #[test]
    fn bad_tool_calls_are_refused_naming_the_field() {
        let err = template_tool_calls(
            &json!([{"function": {"name": "f", "arguments": "{nope"}}]),
            1,
        )
        .unwrap_err();
        match err {
            ApiError::InvalidRequest { param, .. } => assert_eq!(
                param.as_deref(),
                Some("messages[1].tool_calls[0].function.arguments")
            ),
            other => panic!("{other:?}"),
        }
        assert!(template_tool_calls(&json!([{"type": "function"}]), 0).is_err());
        assert!(template_tool_calls(&json!({"a": 1}), 0).is_err());
    }
}
