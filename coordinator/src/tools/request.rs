//! A chat request's `tools`, `tool_choice` and `parallel_tool_calls`, checked into a
//! [`ToolRequest`]: what the chat template gets as `tools`, which parser reads the output, and
//! the JSON schema a forced call must satisfy.
//!
//! Rules (OpenAI's, as vLLM applies them): only `function` tools; names of 1-64 characters from
//! `a-z A-Z 0-9 _ -`, each once; `parameters` a JSON object when given; `tool_choice` defaults to
//! `auto` with tools and `none` without, and anything but `none` needs tools; a named choice
//! must name one of them. Every refusal is a 400 naming the field.

use serde_json::{json, Map, Value};

use crate::api::ApiError;

/// One `{"type": "function", "function": {...}}` tool.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema object (`{"type": "object", "properties": {}}` when the tool gave none).
    pub parameters: Option<Map<String, Value>>,
    /// OpenAI's `strict`: kept and shown to the template; see the README for what is enforced.
    pub strict: Option<bool>,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The template gets the tools; the output is never parsed for calls.
    None,
    /// The model decides; the server's `--tool-call-parser` reads its calls.
    Auto,
    /// At least one call, as a JSON array of `{name, parameters}` objects.
    Required,
    /// Exactly this function, whose arguments are the whole output.
    Function(String),
}

/// The checked tool fields of a chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<FunctionTool>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): false keeps only the first call.
    pub parallel: bool,
}

/// The raw fields as the request body has them.
pub struct ToolFields<'a> {
    pub tools: Option<&'a Value>,
    pub tool_choice: Option<&'a Value>,
    pub parallel_tool_calls: Option<&'a Value>,
}

impl ToolRequest {
    /// Checks the fields. `None` when the request has no tools and no choice other than none.
    pub fn parse(fields: ToolFields<'_>) -> Result<Option<ToolRequest>, ApiError> {
        let tools = match fields.tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, t)| parse_tool(t, i))
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(ApiError::invalid("tools", "`tools` must be a list")),
        };
        for (i, tool) in tools.iter().enumerate() {
            if tools[..i].iter().any(|t| t.name == tool.name) {
                return Err(ApiError::invalid(
                    &format!("tools[{i}].function.name"),
                    format!("The function name `{}` is used by two tools", tool.name),
                ));
            }
        }
        let parallel = match fields.parallel_tool_calls {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(ApiError::invalid(
                    "parallel_tool_calls",
                    "`parallel_tool_calls` must be a boolean",
                ))
            }
        };
        let choice = parse_choice(fields.tool_choice, &tools)?;
        if tools.is_empty() {
            return Ok(None);
        }
        Ok(Some(ToolRequest {
            tools,
            choice,
            parallel,
        }))
    }

    /// The tools as the chat template gets them: vLLM's `tool.model_dump()` shape, keys in that
    /// order (`type`, then `function` with `name`, `description`, `parameters`, and `strict`
    /// when the request set it).
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                let mut function = Map::new();
                function.insert("name".into(), json!(t.name));
                function.insert("description".into(), json!(t.description));
                function.insert("parameters".into(), json!(t.parameters));
                if let Some(strict) = t.strict {
                    function.insert("strict".into(), json!(strict));
                }
                json!({"type": "function", "function": function})
            })
            .collect()
    }

    /// The JSON schema the output must satisfy when the call is forced (vLLM's): for
    /// `required`, a non-empty array (at most one item without `parallel_tool_calls`) of
    /// `{"name": <a tool's name>, "parameters": <its arguments>}` objects, one `anyOf` branch
    /// per tool, with the tools' `$defs` lifted to the top; for a named function, its
    /// parameters. `None` for `auto` and `none`. A `$defs` name two tools define differently
    /// is a 400.
    pub fn required_call_schema(&self) -> Result<Option<Value>, ApiError> {
        match &self.choice {
            ToolChoice::None | ToolChoice::Auto => Ok(None),
            ToolChoice::Function(name) => {
                let tool = self.tools.iter().find(|t| &t.name == name);
                Ok(tool.map(|t| Value::Object(parameters_or_empty(t))))
            }
            ToolChoice::Required => {
                let mut defs = Map::new();
                let mut branches = Vec::with_capacity(self.tools.len());
                for tool in &self.tools {
                    let mut parameters = parameters_or_empty(tool);
                    if let Some(Value::Object(own)) = parameters.remove("$defs") {
                        for (key, def) in own {
                            match defs.get(&key) {
                                Some(existing) if existing != &def => {
                                    return Err(ApiError::invalid(
                                        "tools",
                                        format!(
                                            "Two tools define `$defs.{key}` differently, so \
                                             `tool_choice: required` cannot combine them"
                                        ),
                                    ))
                                }
                                _ => {
                                    defs.insert(key, def);
                                }
                            }
                        }
                    }
                    branches.push(json!({
                        "properties": {
                            "name": {"type": "string", "enum": [tool.name]},
                            "parameters": parameters,
                        },
                        "required": ["name", "parameters"],
                    }));
                }
                let mut schema = json!({
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "anyOf": branches},
                });
                if !self.parallel {
                    schema["maxItems"] = json!(1);
                }
                if !defs.is_empty() {
                    schema["$defs"] = Value::Object(defs);
                }
                Ok(Some(schema))
            }
        }
    }
}

fn parameters_or_empty(tool: &FunctionTool) -> Map<String, Value> {
    tool.parameters.clone().unwrap_or_else(|| {
        let mut m = Map::new();
        m.insert("type".into(), json!("object"));
        m.insert("properties".into(), json!({}));
        m
    })
}

/// OpenAI's rule for function names.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_tool(tool: &Value, i: usize) -> Result<FunctionTool, ApiError> {
    let at = |field: &str| format!("tools[{i}]{field}");
    let kind = tool.get("type").and_then(Value::as_str);
    if kind != Some("function") {
        return Err(ApiError::invalid(
            &at(".type"),
            "Only tools of type `function` are supported",
        ));
    }
    let Some(function) = tool.get("function").and_then(Value::as_object) else {
        return Err(ApiError::invalid(
            &at(".function"),
            "A function tool needs a `function` object",
        ));
    };
    let name = match function.get("name") {
        Some(Value::String(n)) if valid_name(n) => n.clone(),
        Some(Value::String(n)) => {
            return Err(ApiError::invalid(
                &at(".function.name"),
                format!(
                    "The function name `{n}` is invalid: it must be 1 to 64 characters of a-z, \
                     A-Z, 0-9, underscores and dashes"
                ),
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                &at(".function.name"),
                "A function needs a string `name`",
            ))
        }
    };
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(d.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                &at(".function.description"),
                "`description` must be a string",
            ))
        }
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => None,
        Some(Value::Object(p)) => Some(p.clone()),
        Some(_) => {
            return Err(ApiError::invalid(
                &at(".function.parameters"),
                format!("The parameters of `{name}` must be a JSON schema object"),
            ))
        }
    };
    let strict = match function.get("strict") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::invalid(
                &at(".function.strict"),
                "`strict` must be a boolean",
            ))
        }
    };
    Ok(FunctionTool {
        name,
        description,
        parameters,
        strict,
    })
}

fn parse_choice(choice: Option<&Value>, tools: &[FunctionTool]) -> Result<ToolChoice, ApiError> {
    let bad = |message: String| Err(ApiError::invalid("tool_choice", message));
    let choice = match choice {
        None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return bad(format!(
                    "`tool_choice` `{other}` is not one of `none`, `auto`, `required` or \
                     {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                ))
            }
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str);
            match (o.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(name)) => ToolChoice::Function(name.to_string()),
                _ => {
                    return bad("A named `tool_choice` must be {\"type\": \"function\", \
                         \"function\": {\"name\": ...}}"
                        .into())
                }
            }
        }
        Some(_) => return bad("`tool_choice` must be a string or an object".into()),
    };
    if tools.is_empty() && choice != ToolChoice::None {
        return bad("`tool_choice` needs `tools`: the request gives none".into());
    }
    if let ToolChoice::Function(name) = &choice {
        if !tools.iter().any(|t| &t.name == name) {
            return bad(format!(
                "`tool_choice` names the function `{name}`, which is not among the tools"
            ));
        }
    }
    Ok(choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}})
    }

    fn parse(body: Value) -> Result<Option<ToolRequest>, ApiError> {
        ToolRequest::parse(ToolFields {
            tools: body.get("tools"),
            tool_choice: body.get("tool_choice"),
            parallel_tool_calls: body.get("parallel_tool_calls"),
        })
    }

    fn refusal(body: Value) -> (String, String) {
        match parse(body) {
            Err(ApiError::InvalidRequest {
                message,
                param: Some(param),
            }) => (param, message),
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn tools_default_to_auto_and_parallel() {
        let t = parse(json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(t.choice, ToolChoice::Auto);
        assert!(t.parallel);
        assert_eq!(t.tools[0].name, "get_weather");
        assert_eq!(parse(json!({})).unwrap(), None);
        assert_eq!(
            parse(json!({"tools": [], "tool_choice": "none"})).unwrap(),
            None
        );
    }

    #[test]
    fn bad_tools_are_refused_naming_the_field() {
        let (param, msg) = refusal(json!({"tools": [weather(), weather()]}));
        assert_eq!(param, "tools[1].function.name");
        assert!(msg.contains("two tools"), "{msg}");
        let (param, msg) =
            refusal(json!({"tools": [{"type": "function", "function": {"name": "get weather"}}]}));
        assert_eq!(param, "tools[0].function.name");
        assert!(msg.contains("invalid"), "{msg}");
        let (param, _) = refusal(json!({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": "x"}}]}));
        assert_eq!(param, "tools[0].function.parameters");
        let (param, _) = refusal(json!({"tools": [{"type": "retrieval"}]}));
        assert_eq!(param, "tools[0].type");
        let (param, _) = refusal(json!({"tools": {"a": 1}}));
        assert_eq!(param, "tools");
        let long = "a".repeat(65);
        let (param, _) =
            refusal(json!({"tools": [{"type": "function", "function": {"name": long}}]}));
        assert_eq!(param, "tools[0].function.name");
    }

    #[test]
    fn bad_tool_choices_are_refused() {
        let (param, msg) = refusal(json!({"tools": [weather()], "tool_choice":
            {"type": "function", "function": {"name": "get_time"}}}));
        assert_eq!(param, "tool_choice");
        assert!(msg.contains("get_time"), "{msg}");
        let (_, msg) = refusal(json!({"tool_choice": "required"}));
        assert!(msg.contains("needs `tools`"), "{msg}");
        let (_, msg) = refusal(json!({"tools": [weather()], "tool_choice": "always"}));
        assert!(msg.contains("always"), "{msg}");
        let (param, _) = refusal(json!({"tools": [weather()], "parallel_tool_calls": "yes"}));
        assert_eq!(param, "parallel_tool_calls");
    }

    #[test]
    fn template_tools_have_vllms_shape_and_key_order() {
        let t = parse(json!({"tools": [weather(),
            {"type": "function", "function": {"name": "now", "strict": true}}]}))
        .unwrap()
        .unwrap();
        let tools = t.template_tools();
        assert_eq!(
            serde_json::to_string(&tools[0]).unwrap(),
            r#"{"type":"function","function":{"name":"get_weather","description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}"#
        );
        assert_eq!(
            serde_json::to_string(&tools[1]).unwrap(),
            r#"{"type":"function","function":{"name":"now","description":null,"parameters":null,"strict":true}}"#
        );
    }

    #[test]
    fn required_schema_is_an_array_of_name_and_parameters_with_defs_lifted() {
        let with_defs = json!({"type": "function", "function": {"name": "book",
            "parameters": {"type": "object", "properties": {"when": {"$ref": "#/$defs/date"}},
                           "$defs": {"date": {"type": "string"}}}}});
        let t = parse(
            json!({"tools": [weather(), with_defs], "tool_choice": "required",
            "parallel_tool_calls": false}),
        )
        .unwrap()
        .unwrap();
        let schema = t.required_call_schema().unwrap().unwrap();
        assert_eq!(schema["type"], "array");
        assert_eq!(schema["minItems"], 1);
        assert_eq!(schema["maxItems"], 1);
        assert_eq!(schema["$defs"], json!({"date": {"type": "string"}}));
        let branches = schema["items"]["anyOf"].as_array().unwrap();
        assert_eq!(branches.len(), 2);
        assert_eq!(
            branches[0]["properties"]["name"],
            json!({"type": "string", "enum": ["get_weather"]})
        );
        assert_eq!(
            branches[0]["properties"]["parameters"]["required"],
            json!(["city"])
        );
        assert!(branches[1]["properties"]["parameters"]
            .get("$defs")
            .is_none());
        assert_eq!(branches[0]["required"], json!(["name", "parameters"]));
    }

    #[test]
    fn named_schema_is_the_functions_parameters() {
        let t = parse(json!({"tools": [weather(),
            {"type": "function", "function": {"name": "now"}}],
            "tool_choice": {"type": "function", "function": {"name": "now"}}}))
        .unwrap()
        .unwrap();
        assert_eq!(
            t.required_call_schema().unwrap(),
            Some(json!({"type": "object", "properties": {}}))
        );
        let auto = parse(json!({"tools": [weather()]})).unwrap().unwrap();
        assert_eq!(auto.required_call_schema().unwrap(), None);
    }

    #[test]
    fn conflicting_defs_are_refused() {
        let tool = |name: &str, ty: &str| {
            json!({"type": "function", "function": {"name": name,
                "parameters": {"type": "object", "$defs": {"d": {"type": ty}}}}})
        };
        let t = parse(json!({"tools": [tool("a", "string"), tool("b", "integer")],
            "tool_choice": "required"}))
        .unwrap()
        .unwrap();
        assert!(t.required_call_schema().is_err());
    }
}
