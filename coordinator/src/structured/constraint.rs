//! What a request constrains its output to, in the request's own terms: a JSON schema, any JSON
//! object, a regular expression, one of a list of strings, or a Lark grammar. Each turns into
//! one llguidance grammar ([`Constraint::to_grammar`]); [`Constraint::key`] is the text the
//! compiled grammar is cached under.
//!
//! JSON is generated without free whitespace (`", "` between items, `": "` after keys, nothing
//! else), so a model cannot pad the output with newlines until `max_tokens` runs out; a schema
//! may override that with llguidance's own `x-guidance` options.

use llguidance::api::TopLevelGrammar;
use serde_json::{json, Value};

/// An output constraint.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this JSON schema.
    JsonSchema(Value),
    /// Text matching this regular expression (whole output).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this Lark grammar (llguidance's Lark dialect; it may embed `%json` and regexes).
    Grammar(String),
}

impl Constraint {
    /// The text the compiled grammar is cached under: the kind and the constraint's exact text
    /// (a schema as serialized JSON).
    pub fn key(&self) -> String {
        match self {
            Self::JsonObject => "json_object".into(),
            Self::JsonSchema(schema) => format!("json:{schema}"),
            Self::Regex(rx) => format!("regex:{rx}"),
            Self::Choice(choices) => format!("choice:{}", Value::from(choices.clone())),
            Self::Grammar(g) => format!("grammar:{g}"),
        }
    }

    /// The llguidance grammar that enforces it.
    pub fn to_grammar(&self) -> TopLevelGrammar {
        match self {
            Self::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({
                "type": "object"
            }))),
            Self::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact(schema.clone())),
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Choice(choices) => TopLevelGrammar::from_regex(&choice_regex(choices)),
            Self::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// The schema with llguidance told to generate compact JSON, unless it says otherwise.
fn compact(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(|| {
            json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// A regex that matches exactly one of `choices` (each escaped literally).
fn choice_regex(choices: &[String]) -> String {
    let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
    format!("({})", alternatives.join("|"))
}

/// `text` with every regex metacharacter escaped.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        // regex-syntax's metacharacters (what `regex_syntax::escape` escapes).
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choice_regex_escapes_metacharacters() {
        let choices = vec!["a.b".to_string(), "(c)|d".to_string()];
        assert_eq!(choice_regex(&choices), r"(a\.b|\(c\)\|d)");
    }

    #[test]
    fn compact_keeps_a_schemas_own_options() {
        let own = json!({"type": "object", "x-guidance": {"whitespace_flexible": true}});
        assert_eq!(compact(own.clone()), own);
        let plain = compact(json!({"type": "object"}));
        assert_eq!(plain["x-guidance"]["whitespace_flexible"], false);
    }

    #[test]
    fn keys_differ_by_kind_and_text() {
        let a = Constraint::Regex("a".into()).key();
        let b = Constraint::Grammar("a".into()).key();
        assert_ne!(a, b);
        assert_eq!(a, Constraint::Regex("a".into()).key());
    }
}
