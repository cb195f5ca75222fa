//! The structured-output fields of a request, turned into one [`Constraint`] and compiled:
//! OpenAI's `response_format` (`text`, `json_object`, `json_schema`), vLLM's
//! `structured_outputs` object (`json`, `regex`, `choice`, `grammar`, `json_object`) and its
//! older top-level `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`. At most
//! one constraint per request; a second is a 400, as is anything llguidance cannot compile (its
//! own message, under the field that carried it).

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::error::{from_json, ApiError};
use super::protocol::SamplingFields;
use crate::error::StructuredError;
use crate::served_model::ServedModel;
use crate::structured::{Constraint, Grammar};

/// vLLM's `structured_outputs` object (its other members, such as whitespace options, are
/// accepted and ignored: output JSON is always compact).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StructuredOutputsField {
    /// A JSON schema, as an object or as JSON text.
    pub json: Option<Value>,
    pub regex: Option<String>,
    pub choice: Option<Vec<String>>,
    /// A Lark grammar.
    pub grammar: Option<String>,
    /// Any JSON object.
    pub json_object: Option<bool>,
}

/// OpenAI's `response_format`.
#[derive(Debug, Clone, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    json_schema: Option<JsonSchemaFormat>,
}

/// `response_format.json_schema`. OpenAI's `strict` is accepted either way: the output always
/// follows the schema exactly.
#[derive(Debug, Clone, Deserialize)]
struct JsonSchemaFormat {
    schema: Option<Value>,
}

/// The request's output constraint, if it asks for one, with the field that carried it.
pub fn requested_constraint(
    fields: &SamplingFields,
) -> Result<Option<(Constraint, &'static str)>, ApiError> {
    let mut found: Vec<(Constraint, &'static str)> = Vec::new();
    if let Some(format) = fields.response_format.as_ref().filter(|v| !v.is_null()) {
        let format: ResponseFormat = nested(format, "response_format")?;
        match format.kind.as_str() {
            "text" => {}
            "json_object" => found.push((Constraint::JsonObject, "response_format")),
            "json_schema" => {
                let schema = format
                    .json_schema
                    .and_then(|j| j.schema)
                    .filter(|s| !s.is_null())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "response_format",
                            "`response_format.json_schema.schema` is required when \
                             `response_format.type` is \"json_schema\"",
                        )
                    })?;
                found.push((Constraint::JsonSchema(schema), "response_format"));
            }
            other => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!(
                        "`response_format.type` must be \"text\", \"json_object\" or \
                         \"json_schema\", got {other:?}"
                    ),
                ))
            }
        }
    }
    if let Some(outputs) = fields.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        let so: StructuredOutputsField = nested(outputs, "structured_outputs")?;
        const P: &str = "structured_outputs";
        if let Some(json) = so.json {
            found.push((Constraint::JsonSchema(schema_value(json, P)?), P));
        }
        if let Some(rx) = so.regex {
            found.push((Constraint::Regex(rx), P));
        }
        if let Some(choice) = so.choice {
            found.push((choice_constraint(choice, P)?, P));
        }
        if let Some(grammar) = so.grammar {
            found.push((Constraint::Grammar(grammar), P));
        }
        if so.json_object == Some(true) {
            found.push((Constraint::JsonObject, P));
        }
    }
    if let Some(json) = fields.guided_json.clone().filter(|v| !v.is_null()) {
        found.push((
            Constraint::JsonSchema(schema_value(json, "guided_json")?),
            "guided_json",
        ));
    }
    if let Some(rx) = &fields.guided_regex {
        found.push((Constraint::Regex(rx.clone()), "guided_regex"));
    }
    if let Some(choice) = &fields.guided_choice {
        found.push((
            choice_constraint(choice.clone(), "guided_choice")?,
            "guided_choice",
        ));
    }
    if let Some(grammar) = &fields.guided_grammar {
        found.push((Constraint::Grammar(grammar.clone()), "guided_grammar"));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(c, _)| describe(c)).collect();
        return Err(ApiError::invalid(
            found[1].1,
            format!(
                "Only one kind of structured output may be requested at a time, got {}",
                names.join(" and ")
            ),
        ));
    }
    Ok(found.pop())
}

/// Compiles the request's constraint, if any (cached by its text, off the async threads).
pub async fn compile_constraint(
    model: &ServedModel,
    fields: &SamplingFields,
) -> Result<Option<Arc<Grammar>>, ApiError> {
    let Some((constraint, param)) = requested_constraint(fields)? else {
        return Ok(None);
    };
    let what = describe(&constraint);
    model
        .structured
        .compile(constraint)
        .await
        .map(Some)
        .map_err(|e| compile_error(e, param, what))
}

/// [`compile_constraint`] on the calling thread, for callers outside the async runtime (the
/// Python bindings, which prepare a batch with the GIL released).
pub fn compile_constraint_blocking(
    model: &ServedModel,
    fields: &SamplingFields,
) -> Result<Option<Arc<Grammar>>, ApiError> {
    let Some((constraint, param)) = requested_constraint(fields)? else {
        return Ok(None);
    };
    let what = describe(&constraint);
    model
        .structured
        .compile_blocking(&constraint)
        .map(Some)
        .map_err(|e| compile_error(e, param, what))
}

/// A compile failure as the 400 naming the field that carried the constraint.
fn compile_error(e: StructuredError, param: &str, what: &str) -> ApiError {
    match e {
        StructuredError::Compile { detail } => {
            ApiError::invalid(param, format!("Invalid {what}: {detail}"))
        }
        other => ApiError::invalid(param, other.to_string()),
    }
}

/// The constraint that enforces `tool_choice` `"required"` or a named function: `schema`, the
/// JSON the call must be (`ToolRequest::required_call_schema`), compiled as any JSON schema; a
/// schema that does not compile is a 400 naming `tools` (it is built from their parameters).
pub async fn compile_tool_call_schema(
    model: &ServedModel,
    schema: Value,
) -> Result<Arc<Grammar>, ApiError> {
    model
        .structured
        .compile(Constraint::JsonSchema(schema))
        .await
        .map_err(|e| match e {
            StructuredError::Compile { detail } => ApiError::invalid(
                "tools",
                format!("The tools' parameters do not compile as a JSON schema: {detail}"),
            ),
            other => ApiError::invalid("tools", other.to_string()),
        })
}

/// A member of a structured-output field read as `T`; a type error names the member.
fn nested<T: serde::de::DeserializeOwned>(value: &Value, param: &str) -> Result<T, ApiError> {
    from_json(value).map_err(|e| match e {
        ApiError::InvalidRequest { message, .. } => {
            ApiError::invalid(param, format!("`{param}`: {message}"))
        }
        other => other,
    })
}

/// A JSON schema given as an object or as JSON text (vLLM takes both).
fn schema_value(value: Value, param: &str) -> Result<Value, ApiError> {
    match value {
        Value::String(text) => serde_json::from_str(&text)
            .map_err(|e| ApiError::invalid(param, format!("`{param}` is not valid JSON: {e}"))),
        schema => Ok(schema),
    }
}

fn choice_constraint(choices: Vec<String>, param: &str) -> Result<Constraint, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must list at least one choice"),
        ));
    }
    Ok(Constraint::Choice(choices))
}

/// Words for a kind of constraint in messages.
fn describe(constraint: &Constraint) -> &'static str {
    match constraint {
        Constraint::JsonObject => "JSON object format",
        Constraint::JsonSchema(_) => "JSON schema",
        Constraint::Regex(_) => "regex",
        Constraint::Choice(_) => "choice list",
        Constraint::Grammar(_) => "grammar",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(body: Value) -> SamplingFields {
        from_json(&body).unwrap()
    }

    #[test]
    fn each_field_gives_its_constraint() {
        let cases = [
            (json!({"response_format": {"type": "text"}}), None),
            (
                json!({"response_format": {"type": "json_object"}}),
                Some(Constraint::JsonObject),
            ),
            (
                json!({"response_format": {"type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "integer"}, "strict": true}}}),
                Some(Constraint::JsonSchema(json!({"type": "integer"}))),
            ),
            (
                json!({"structured_outputs": {"choice": ["a", "b"]}}),
                Some(Constraint::Choice(vec!["a".into(), "b".into()])),
            ),
            (
                json!({"guided_json": "{\"type\": \"string\"}"}),
                Some(Constraint::JsonSchema(json!({"type": "string"}))),
            ),
            (
                json!({"guided_regex": "[0-9]+"}),
                Some(Constraint::Regex("[0-9]+".into())),
            ),
            (
                json!({"guided_grammar": "start: \"x\""}),
                Some(Constraint::Grammar("start: \"x\"".into())),
            ),
        ];
        for (body, want) in cases {
            let got = requested_constraint(&fields(body.clone())).unwrap();
            assert_eq!(got.map(|(c, _)| c), want, "{body}");
        }
    }

    #[test]
    fn two_constraints_are_refused_naming_the_second() {
        let body = json!({"guided_regex": "a", "guided_choice": ["a"]});
        let err = requested_constraint(&fields(body)).unwrap_err();
        let ApiError::InvalidRequest { message, param } = err else {
            panic!("{err:?}");
        };
        assert_eq!(param.as_deref(), Some("guided_choice"));
        assert!(message.contains("regex and choice list"), "{message}");
    }

    #[test]
    fn a_json_schema_format_without_a_schema_is_refused() {
        let body =
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}});
        let err = requested_constraint(&fields(body)).unwrap_err();
        assert!(err.to_string().contains("schema"), "{err}");
        let body = json!({"response_format": {"type": "yaml"}});
        assert!(requested_constraint(&fields(body)).is_err());
    }
}
