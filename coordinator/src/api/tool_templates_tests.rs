//! Tool conversations rendered through the chat request path (request JSON -> template messages
//! and tools -> minijinja) with the real Qwen2.5, Llama 3.1 and Mistral Nemo templates
//! (`scripts/fetch-chat-templates.sh`) equal, byte for byte, what Python's Jinja2 renders for
//! the same requests (`tests/fixtures/goldens/tool-templates.json`, written by
//! `scripts/reference/render_tool_templates.py`).

use std::path::PathBuf;

use serde_json::Value;
use tpserve_modelfile::chat::ChatTemplate;

use super::chat::template_message;
use super::protocol::ChatMessageIn;
use crate::tools::{ToolFields, ToolRequest};

fn templates_dir() -> PathBuf {
    let dir = match std::env::var_os("TPSERVE_CHAT_TEMPLATES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var("HOME").unwrap_or_default())
            .join(".cache/tpserve/chat-templates"),
    };
    assert!(
        dir.is_dir(),
        "{} is missing: run scripts/fetch-chat-templates.sh",
        dir.display()
    );
    dir
}

#[test]
fn tool_conversations_render_as_python_jinja2_renders_them() {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/goldens/tool-templates.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(golden).unwrap()).unwrap();
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    let dir = templates_dir();
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let token = |k: &str| case[k].as_str().map(str::to_string);
        let source = std::fs::read_to_string(dir.join(name)).unwrap();
        let template = ChatTemplate::new(source, token("bos_token"), token("eos_token")).unwrap();
        let request = &case["request"];
        let messages: Vec<ChatMessageIn> =
            serde_json::from_value(request["messages"].clone()).unwrap();
        let messages: Vec<Value> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| template_message(m, i).unwrap())
            .collect();
        let tools = ToolRequest::parse(ToolFields {
            tools: request.get("tools"),
            tool_choice: None,
            parallel_tool_calls: None,
        })
        .unwrap()
        .map(|t| t.template_tools());
        let rendered = template
            .render_json(&messages, tools.as_deref(), true)
            .unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name}");
    }
}
