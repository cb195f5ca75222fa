//! Tool calling end to end: the real `tpserve` with real workers serving SmolLM2 (the default
//! GGUF) under Qwen2.5's real tool-capable chat template (`--chat-template`, from
//! `scripts/fetch-chat-templates.sh`; SmolLM2 speaks the same ChatML tokens), talked to over
//! HTTP. A 135M model does not decide to call tools, but greedily it copies a call it is shown:
//! that gives a real call (and a real malformed one) through the real parser, streamed and not.

use std::path::PathBuf;

use serde_json::{json, Value};
use tpserve_e2e::{chat_template, post_json, read_sse, repo_root, Server};

fn qwen_template() -> PathBuf {
    chat_template("Qwen-Qwen2.5-7B-Instruct.jinja")
}

async fn server(extra: &[&str]) -> Server {
    let template = qwen_template();
    let mut args = vec![
        "--max-model-len",
        "2048",
        "--chat-template",
        template.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Server::smollm2(&args).await
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}})
}

/// The first golden case: a Qwen2.5 conversation with two tools, an assistant turn of two
/// parallel calls with null content, and two tool results, as Python's Jinja2 renders it.
fn golden_qwen_case() -> Value {
    let path = repo_root().join("tests/fixtures/goldens/tool-templates.json");
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = golden["cases"][0].clone();
    assert_eq!(case["template"], "Qwen-Qwen2.5-7B-Instruct.jinja");
    case
}

/// A streamed chat's choice 0 put back together: (content, [(id, name, arguments)], reason).
fn reassemble(events: &[Value]) -> (Option<String>, Vec<(String, String, String)>, Value) {
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut reason = Value::Null;
    for e in events {
        for c in e["choices"].as_array().into_iter().flatten() {
            let delta = &c["delta"];
            if let Some(text) = delta["content"].as_str() {
                content.push_str(text);
            }
            for call in delta["tool_calls"].as_array().into_iter().flatten() {
                let index = call["index"].as_u64().unwrap() as usize;
                if let Some(id) = call["id"].as_str() {
                    // The first delta of a call: id, type, name, empty arguments.
                    assert_eq!(index, calls.len(), "calls open in index order");
                    assert_eq!(call["type"], "function");
                    assert_eq!(call["function"]["arguments"], "");
                    let name = call["function"]["name"].as_str().unwrap().to_string();
                    calls.push((id.to_string(), name, String::new()));
                } else {
                    assert!(call["function"].get("name").is_none());
                    calls[index]
                        .2
                        .push_str(call["function"]["arguments"].as_str().unwrap());
                }
            }
            if !c["finish_reason"].is_null() {
                reason = c["finish_reason"].clone();
            }
        }
    }
    ((!content.is_empty()).then_some(content), calls, reason)
}

#[tokio::test]
async fn tool_messages_round_trip_through_the_template_as_python_renders_them() {
    let s = server(&["--enable-auto-tool-choice"]).await;
    let http = reqwest::Client::new();
    let case = golden_qwen_case();
    let rendered = case["rendered"].as_str().unwrap();
    let want: Value = post_json(
        &http,
        s.url("/tokenize"),
        &json!({"model": "smollm2", "prompt": rendered, "add_special_tokens": false}),
    )
    .await;
    for choice in ["auto", "none"] {
        let mut body = case["request"].clone();
        body["model"] = json!("smollm2");
        body["max_tokens"] = json!(1);
        body["temperature"] = json!(0);
        body["tool_choice"] = json!(choice);
        let r: Value = post_json(&http, s.url("/v1/chat/completions"), &body).await;
        // The template got the tools, both calls (arguments as objects) and both results,
        // whatever tool_choice says (vLLM's default: tools stay in the prompt with `none`).
        assert_eq!(
            r["usage"]["prompt_tokens"], want["count"],
            "tool_choice {choice}: {r}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn streamed_tool_calls_reassemble_to_the_whole_answer() {
    let s = server(&["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]).await;
    let http = reqwest::Client::new();
    // (prompt, whether SmolLM2's greedy answer must be a call). The first it copies as a call.
    // The second it copies as a call or with a broken closing tag (`</tool_call}`, which stays
    // content), depending on a near tie; either way streamed must equal whole.
    let prompts = [
        (
            r#"Copy this text exactly: <tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>"#,
            true,
        ),
        (
            "Repeat exactly, with nothing else: <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>",
            false,
        ),
        ("Say hello.", false),
    ];
    for (prompt, calls_tool) in prompts {
        let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "user", "content": prompt}], "tools": [weather_tool()]});
        // A first run fills the prefix cache, so the whole and the streamed runs below see the
        // same cache hits, hence the same logits and the same greedy tokens.
        post_json(&http, s.url("/v1/chat/completions"), &body).await;
        let whole: Value = post_json(&http, s.url("/v1/chat/completions"), &body).await;
        let choice = &whole["choices"][0];
        let message = &choice["message"];
        let calls: Vec<(String, String, String)> = message["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                assert_eq!(c["type"], "function");
                let id = c["id"].as_str().unwrap();
                assert!(id.starts_with("call_") && id.len() == 29, "{id}");
                let arguments = c["function"]["arguments"].as_str().unwrap();
                // Arguments are a JSON object in a string.
                assert!(serde_json::from_str::<Value>(arguments)
                    .unwrap()
                    .is_object());
                (
                    id.to_string(),
                    c["function"]["name"].as_str().unwrap().to_string(),
                    arguments.to_string(),
                )
            })
            .collect();
        if calls.is_empty() {
            assert!(message.get("tool_calls").is_none(), "{whole}");
            assert!(message["content"].is_string(), "{whole}");
        } else if choice["finish_reason"] == "stop" {
            panic!("a call with finish_reason stop: {whole}");
        }
        let content = message["content"].as_str().map(str::to_string);
        if calls_tool {
            assert_eq!(calls.len(), 1, "{whole}");
            assert_eq!(calls[0].1, "get_weather");
            assert_eq!(calls[0].2, r#"{"city":"Rome"}"#);
            // Whether it stops after the call or chatters on to max_tokens is a near tie in
            // SmolLM2's greedy choice (it flips with prefix-cache hits); both are valid answers.
            let reason = choice["finish_reason"].as_str().unwrap();
            assert!(reason == "tool_calls" || reason == "length", "{whole}");
        }
        // No markup of a parsed call leaks into content.
        if let Some(text) = &content {
            if !calls.is_empty() {
                assert!(!text.contains("<tool_call>"), "{whole}");
            }
        }

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let resp = http
            .post(s.url("/v1/chat/completions"))
            .json(&streamed)
            .send()
            .await
            .unwrap();
        let (events, done) = read_sse(resp).await;
        assert!(done);
        let (s_content, s_calls, s_reason) = reassemble(&events);
        assert_eq!(s_reason, choice["finish_reason"], "{prompt}");
        assert_eq!(s_content, content, "{prompt}");
        let strip = |calls: &[(String, String, String)]| -> Vec<(String, String)> {
            calls
                .iter()
                .map(|(_, n, a)| (n.clone(), a.clone()))
                .collect()
        };
        assert_eq!(strip(&s_calls), strip(&calls), "{prompt}");
        eprintln!("{prompt:?}: content {content:?}, calls {calls:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn bad_tool_requests_are_400s_in_openai_shape() {
    // Without --enable-auto-tool-choice: `auto` is refused, the rest works.
    let s = server(&[]).await;
    let http = reqwest::Client::new();
    let user = json!([{"role": "user", "content": "Weather in Paris?"}]);
    let cases = [
        (
            json!({"messages": user, "tools": [weather_tool()]}),
            "tool_choice",
            "--enable-auto-tool-choice",
        ),
        (
            json!({"messages": user, "tools": [weather_tool(), weather_tool()],
                "tool_choice": "none"}),
            "tools[1].function.name",
            "two tools",
        ),
        (
            json!({"messages": user, "tool_choice": "none", "tools": [
                {"type": "function", "function": {"name": "get weather!"}}]}),
            "tools[0].function.name",
            "invalid",
        ),
        (
            json!({"messages": user, "tool_choice": "none", "tools": [
                {"type": "function", "function": {"name": "f", "parameters": [1]}}]}),
            "tools[0].function.parameters",
            "JSON schema object",
        ),
        (
            json!({"messages": user, "tools": [weather_tool()],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
            "tool_choice",
            "get_time",
        ),
        (
            json!({"messages": user, "tool_choice": "required"}),
            "tool_choice",
            "needs `tools`",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                 "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]}),
            "messages[1].tool_calls[0].function.arguments",
            "not valid JSON",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hi"},
                {"role": "tool", "content": "21"}]}),
            "messages[1].tool_call_id",
            "tool_call_id",
        ),
    ];
    for (mut body, param, fragment) in cases {
        body["model"] = json!("smollm2");
        let r = http
            .post(s.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(fragment), "{message}");
    }
    // `none` sends the tools to the template and never parses: plain content, `stop`/`length`.
    let body = json!({"model": "smollm2", "messages": user, "tools": [weather_tool()],
        "tool_choice": "none", "max_tokens": 8, "temperature": 0});
    let r: Value = post_json(&http, s.url("/v1/chat/completions"), &body).await;
    assert!(r["choices"][0]["message"]["content"].is_string(), "{r}");
    assert!(
        r["choices"][0]["message"].get("tool_calls").is_none(),
        "{r}"
    );
    assert_eq!(
        http.get(s.url("/health")).send().await.unwrap().status(),
        200
    );
    s.stop().await;
}

/// `tool_choice: "required"` and a named function constrain decoding to the call schema: the
/// 135M model, asked about the weather with no hint of a call format, still answers with calls
/// that parse, name a given tool and carry arguments valid under its parameters, streamed or not.
#[tokio::test]
async fn required_and_named_tool_choices_always_produce_calls_that_parse() {
    let s = server(&[]).await;
    let http = reqwest::Client::new();
    let time_tool = json!({"type": "function", "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                       "required": ["zone"], "additionalProperties": false}}});
    let tools = json!([weather_tool(), time_tool]);
    let named = json!({"type": "function", "function": {"name": "get_time"}});
    for (choice, parallel) in [
        (json!("required"), true),
        (json!("required"), false),
        (named, true),
    ] {
        let body = json!({"model": "smollm2", "temperature": 0, "max_tokens": 64,
            "messages": [{"role": "user", "content": "What is the weather like in Oslo today?"}],
            "tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel});
        let answer = post_json(&http, s.url("/v1/chat/completions"), &body).await;
        let message = &answer["choices"][0]["message"];
        let calls = message["tool_calls"].as_array().unwrap_or_else(|| {
            panic!("{choice}: no tool_calls in {answer}");
        });
        assert!(!calls.is_empty(), "{choice}: {answer}");
        if !parallel {
            assert_eq!(calls.len(), 1, "parallel_tool_calls false: {answer}");
        }
        for call in calls {
            let name = call["function"]["name"].as_str().unwrap();
            let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{choice}: arguments do not parse ({e}): {answer}"));
            match name {
                "get_weather" => assert!(args["city"].is_string(), "{answer}"),
                "get_time" => assert!(["utc", "cet"].contains(&args["zone"].as_str().unwrap())),
                other => panic!("{choice}: called {other}, not a given tool: {answer}"),
            }
            if choice.is_object() {
                assert_eq!(name, "get_time", "the named function: {answer}");
            }
        }
    }
    // A forced call and a response_format both constrain the whole output: refused.
    let body = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
        "tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}});
    let answer = post_json(&http, s.url("/v1/chat/completions"), &body).await;
    assert_eq!(answer["error"]["param"], "tool_choice", "{answer}");
}
