//! Structured outputs over real HTTP against the real model (SmolLM2-135M) on the CPU (issue 13,
//! item 3): `response_format` (json_object, json_schema), vLLM's `structured_outputs` and
//! `guided_*` fields, streaming, `n > 1`, cancellation, refusals, 100 random JSON schemas run at
//! once, guided and plain requests in one batch, preemption, and tensor parallelism. Every
//! output is checked with a validator of its own (below) for the JSON-schema subset the
//! generator uses.

use serde_json::{json, Map, Value};
use tpserve_e2e::{
    chat_stream_text, default_model, metric, post_json, read_sse, wait_until_idle, Server,
};

/// A server of the default model; `extra` flags come after `--model` (with a
/// `--max-model-len` of 512 unless they set one).
async fn start(extra: &[&str]) -> Server {
    let model = default_model();
    let mut args = vec!["--model", model.to_str().unwrap()];
    if !extra.contains(&"--max-model-len") {
        args.extend(["--max-model-len", "512"]);
    }
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// A greedy chat request asking `prompt`, with `extra`'s fields added.
fn chat_body(prompt: &str, extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": 200});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

/// Posts a chat request that must succeed; returns choice 0's text and finish reason.
async fn chat(http: &reqwest::Client, s: &Server, body: &Value) -> (String, String) {
    let r = post_json(http, s.url("/v1/chat/completions"), body).await;
    assert!(r.get("error").is_none(), "{r}");
    let c = &r["choices"][0];
    (
        c["message"]["content"].as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// Posts a completion request that must succeed; returns choice 0's text and finish reason.
async fn complete(http: &reqwest::Client, s: &Server, body: &Value) -> (String, String) {
    let r = post_json(http, s.url("/v1/completions"), body).await;
    assert!(r.get("error").is_none(), "{r}");
    let c = &r["choices"][0];
    (
        c["text"].as_str().unwrap().to_string(),
        c["finish_reason"].as_str().unwrap().to_string(),
    )
}

/// Parses `text` as JSON and checks it against `schema`, with the schema in the message.
fn assert_valid(schema: &Value, text: &str) {
    let value: Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?} for schema {schema}"));
    if let Err(e) = validate(schema, &value) {
        panic!("{text} does not follow {schema}: {e}");
    }
}

/// A 400 in OpenAI's error shape naming `param`; returns the message.
async fn refused(
    http: &reqwest::Client,
    s: &Server,
    path: &str,
    body: &Value,
    param: &str,
) -> String {
    let resp = http.post(s.url(path)).json(body).send().await.unwrap();
    assert_eq!(resp.status(), 400, "{body}");
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    assert_eq!(e["error"]["param"], param, "{e}");
    e["error"]["message"].as_str().unwrap().to_string()
}

const PERSON: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "minItems": 1, "maxItems": 3}},
  "required": ["name", "age", "pets"], "additionalProperties": false}"#;

#[tokio::test]
async fn each_kind_of_constraint_shapes_the_output_and_bad_ones_are_refused() {
    let http = reqwest::Client::new();
    let s = start(&[]).await;
    let person: Value = serde_json::from_str(PERSON).unwrap();
    let ask = "Describe a person who likes animals.";

    // 1. json_object: any JSON object, complete.
    let (text, finish) = chat(
        &http,
        &s,
        &chat_body(ask, json!({"response_format": {"type": "json_object"}})),
    )
    .await;
    assert_eq!(finish, "stop", "{text}");
    assert!(
        serde_json::from_str::<Value>(&text).unwrap().is_object(),
        "{text}"
    );

    // 2. json_schema (OpenAI's shape, strict), and the same schema through the other fields.
    let format = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "person", "schema": person, "strict": true}}});
    let (text, finish) = chat(&http, &s, &chat_body(ask, format)).await;
    assert_eq!(finish, "stop", "{text}");
    assert_valid(&person, &text);
    for extra in [
        json!({"structured_outputs": {"json": person}}),
        json!({"guided_json": PERSON}),
    ] {
        // Property order may differ (the test's JSON maps sort their keys), validity may not.
        let (other, finish) = chat(&http, &s, &chat_body(ask, extra)).await;
        assert_eq!(finish, "stop", "{other}");
        assert_valid(&person, &other);
    }
    let body = json!({"prompt": "A person as JSON:", "max_tokens": 200, "temperature": 0,
                      "guided_json": person});
    let (text, finish) = complete(&http, &s, &body).await;
    assert_eq!(finish, "stop");
    assert_valid(&person, &text);

    // 3. A regex, a choice and a Lark grammar, on both endpoints.
    let body = json!({"prompt": "My phone number is", "max_tokens": 30, "temperature": 0,
                      "guided_regex": "[0-9]{3}-[0-9]{4}"});
    let (text, _) = complete(&http, &s, &body).await;
    let re = regex::Regex::new("^[0-9]{3}-[0-9]{4}$").unwrap();
    assert!(re.is_match(&text), "{text:?}");
    let choices = ["positive", "negative", "neutral"];
    let body = chat_body(
        "Is 'I love this film' positive or negative?",
        json!({"structured_outputs": {"choice": choices}}),
    );
    let (text, finish) = chat(&http, &s, &body).await;
    assert!(choices.contains(&text.as_str()), "{text:?}");
    assert_eq!(finish, "stop");
    let grammar = "start: \"The answer is \" NUMBER \".\"\nNUMBER: /[1-9][0-9]{0,2}/";
    let body = chat_body("What is 12 + 30?", json!({"guided_grammar": grammar}));
    let (text, finish) = chat(&http, &s, &body).await;
    assert!(
        regex::Regex::new(r"^The answer is [1-9][0-9]{0,2}\.$")
            .unwrap()
            .is_match(&text),
        "{text:?}"
    );
    assert_eq!(finish, "stop");

    // 4. Streaming gives the same text as the whole answer, and ends with "stop".
    let format = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "person", "schema": person}}});
    let (whole, _) = chat(&http, &s, &chat_body(ask, format.clone())).await;
    let mut body = chat_body(ask, format);
    body["stream"] = json!(true);
    let resp = http
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let (events, done) = read_sse(resp).await;
    assert!(done);
    assert_eq!(chat_stream_text(&events, 0), whole);
    let last = events
        .iter()
        .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
        .next_back();
    assert_eq!(last, Some("stop"));

    // 5. n > 1 with sampling: every choice follows the schema.
    let body = chat_body(
        ask,
        json!({"n": 3, "temperature": 1.0, "seed": 7, "guided_json": person}),
    );
    let r = post_json(&http, s.url("/v1/chat/completions"), &body).await;
    let got = r["choices"].as_array().unwrap();
    assert_eq!(got.len(), 3, "{r}");
    for c in got {
        if c["finish_reason"] == "stop" {
            assert_valid(&person, c["message"]["content"].as_str().unwrap());
        }
    }

    // 6. max_tokens cuts a constrained output: "length" (the JSON is then incomplete).
    let body = chat_body(ask, json!({"guided_json": person, "max_tokens": 3}));
    let (_, finish) = chat(&http, &s, &body).await;
    assert_eq!(finish, "length");

    // 7. A client that hangs up mid-stream frees its guided sequence; the next one runs.
    let mut body = chat_body(
        "Write a very long list of words.",
        json!({"guided_regex": "[a-z]+( [a-z]+)*", "max_tokens": 400, "stream": true}),
    );
    body["ignore_eos"] = json!(true);
    let mut resp = http
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.chunk().await.unwrap().is_some(), "a first chunk");
    drop(resp);
    wait_until_idle(&http, &s).await;
    let (text, _) = chat(&http, &s, &chat_body(ask, json!({"guided_json": person}))).await;
    assert_valid(&person, &text);

    // 8. Refusals name the problem and the field.
    let chat_path = "/v1/chat/completions";
    let bad_schema = json!({"type": "object", "properties": {"a": {"type": "nonsense"}}});
    let m = refused(
        &http,
        &s,
        chat_path,
        &chat_body(ask, json!({"guided_json": bad_schema})),
        "guided_json",
    )
    .await;
    assert!(m.contains("JSON schema") && m.contains("nonsense"), "{m}");
    let m = refused(
        &http,
        &s,
        "/v1/completions",
        &json!({"prompt": "x", "guided_regex": "(unclosed"}),
        "guided_regex",
    )
    .await;
    assert!(m.contains("regex"), "{m}");
    let m = refused(
        &http,
        &s,
        chat_path,
        &chat_body(ask, json!({"guided_grammar": "start: undefined_rule"})),
        "guided_grammar",
    )
    .await;
    assert!(m.contains("grammar"), "{m}");
    let m = refused(
        &http,
        &s,
        chat_path,
        &chat_body(ask, json!({"guided_regex": "a", "guided_choice": ["a"]})),
        "guided_choice",
    )
    .await;
    assert!(m.contains("Only one"), "{m}");
    refused(
        &http,
        &s,
        chat_path,
        &chat_body(
            ask,
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
        ),
        "response_format",
    )
    .await;
    refused(
        &http,
        &s,
        chat_path,
        &chat_body(ask, json!({"structured_outputs": {"choice": []}})),
        "structured_outputs",
    )
    .await;
    // The server is still fine, and mask computations were counted.
    let (_, finish) = chat(&http, &s, &chat_body("Hi", json!({"max_tokens": 4}))).await;
    assert_eq!(finish, "length");
    assert!(metric(&http, &s, "tpserve:structured_output_mask_seconds_count").await > 0.0);
    s.stop().await;
}

#[tokio::test]
async fn one_hundred_random_schemas_each_produce_valid_json() {
    let http = reqwest::Client::new();
    let s = start(&["--max-num-seqs", "100"]).await;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let schemas: Vec<Value> = (0..100).map(|_| random_object(&mut rng, 0)).collect();
    let results = futures::future::join_all(schemas.iter().map(|schema| {
        let (http, url) = (http.clone(), s.url("/v1/chat/completions"));
        let body = chat_body(
            "Fill in this form with plausible values.",
            json!({"max_tokens": 300, "response_format": {"type": "json_schema",
                   "json_schema": {"name": "form", "schema": schema, "strict": true}}}),
        );
        async move { post_json(&http, url, &body).await }
    }))
    .await;
    for (schema, r) in schemas.iter().zip(&results) {
        let c = &r["choices"][0];
        assert_eq!(c["finish_reason"], "stop", "{r} for {schema}");
        assert_valid(schema, c["message"]["content"].as_str().unwrap());
    }
    s.stop().await;
}

#[tokio::test]
async fn guided_and_plain_requests_share_batches_and_survive_preemption() {
    // 20 blocks of 16 tokens: eight requests of ~100 tokens need more, so some are preempted.
    let s = start(&[
        "--max-model-len",
        "256",
        "--kv-cache-space",
        "0.0138",
        "--max-num-seqs",
        "8",
    ])
    .await;
    let http = reqwest::Client::new();
    let person: Value = serde_json::from_str(PERSON).unwrap();
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let prompt = format!("Describe person number {i}, who likes animals.");
            if i % 2 == 0 {
                chat_body(&prompt, json!({"guided_json": person, "max_tokens": 80}))
            } else {
                chat_body(&prompt, json!({"max_tokens": 60, "ignore_eos": true}))
            }
        })
        .collect();
    let mut alone = Vec::new();
    for b in &bodies {
        alone.push(chat(&http, &s, b).await);
    }
    assert_eq!(metric(&http, &s, "vllm:num_preemptions_total").await, 0.0);
    let together = futures::future::join_all(bodies.iter().map(|b| {
        let (http, url, b) = (http.clone(), s.url("/v1/chat/completions"), b.clone());
        async move {
            let r = post_json(&http, url, &b).await;
            let c = &r["choices"][0];
            (
                c["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                c["finish_reason"].as_str().unwrap_or_default().to_string(),
            )
        }
    }))
    .await;
    assert!(metric(&http, &s, "vllm:num_preemptions_total").await > 0.0);
    for (i, ((a, t), b)) in alone.iter().zip(&together).zip(&bodies).enumerate() {
        assert_eq!(a, t, "request {i} gave another output in a batch");
        if b.get("guided_json").is_some() {
            assert_eq!(t.1, "stop");
            assert_valid(&person, &t.0);
        } else {
            assert_eq!(t.1, "length");
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn structured_outputs_at_tensor_parallel_three_match_one_rank() {
    // SmolLM2-135M has 9 attention heads: 3 is the smallest tensor-parallel size above 1 that
    // divides them.
    let http = reqwest::Client::new();
    let person: Value = serde_json::from_str(PERSON).unwrap();
    let body = chat_body(
        "Describe a person who likes animals.",
        json!({"guided_json": person}),
    );
    let choice = chat_body("Is the sky blue?", json!({"guided_choice": ["yes", "no"]}));
    let mut outputs = Vec::new();
    for tp in ["1", "3"] {
        let s = start(&["--tensor-parallel-size", tp]).await;
        let (text, finish) = chat(&http, &s, &body).await;
        assert_eq!(finish, "stop");
        assert_valid(&person, &text);
        let (yes_no, _) = chat(&http, &s, &choice).await;
        assert!(yes_no == "yes" || yes_no == "no", "{yes_no:?}");
        outputs.push((text, yes_no));
        s.stop().await;
    }
    assert_eq!(outputs[0], outputs[1], "TP=3 gives TP=1's greedy output");
}

/// xorshift64*: the schema generator's seeded randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const KEYS: [&str; 10] = [
    "name", "id", "color", "size", "tags", "ok", "count", "kind", "price", "owner",
];
const WORDS: [&str; 6] = ["red", "green", "blue", "small", "large", "round"];

/// An object of 1-4 properties (leaves, arrays, and below depth 2 nested objects), some of them
/// required, no others allowed.
fn random_object(rng: &mut Rng, depth: u32) -> Value {
    let n = 1 + rng.below(4) as usize;
    let mut keys: Vec<&str> = KEYS.to_vec();
    let mut properties = Map::new();
    let mut required = Vec::new();
    for _ in 0..n {
        let key = keys.remove(rng.below(keys.len() as u64) as usize);
        properties.insert(key.to_string(), random_schema(rng, depth + 1));
        if rng.below(3) > 0 {
            required.push(json!(key));
        }
    }
    json!({"type": "object", "properties": properties, "required": required,
           "additionalProperties": false})
}

fn random_schema(rng: &mut Rng, depth: u32) -> Value {
    let kinds = if depth < 2 { 8 } else { 6 };
    match rng.below(kinds) {
        0 => json!({"type": "string", "minLength": rng.below(3), "maxLength": 4 + rng.below(12)}),
        1 => {
            let lo = rng.below(50) as i64 - 25;
            json!({"type": "integer", "minimum": lo, "maximum": lo + 1 + rng.below(200) as i64})
        }
        // With `multipleOf`: a bare JSON number may have any number of digits, and the 135M
        // model, once it starts a fraction, can keep writing digits until `max_tokens`.
        2 => json!({"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01}),
        3 => json!({"type": "boolean"}),
        4 => {
            let n = 2 + rng.below(3) as usize;
            let start = rng.below(WORDS.len() as u64) as usize;
            let words: Vec<&str> = (0..n).map(|i| WORDS[(start + i) % WORDS.len()]).collect();
            json!({"enum": words})
        }
        5 => json!({"type": "string", "enum": ["yes", "no"]}),
        6 => {
            let min = rng.below(2);
            json!({"type": "array", "items": random_schema(rng, depth + 1),
                   "minItems": min, "maxItems": min + 1 + rng.below(2)})
        }
        _ => random_object(rng, depth),
    }
}

/// Checks `value` against `schema`, for the keywords the generator and `PERSON` use: `type`
/// (object, array, string, integer, number, boolean), `properties`, `required`,
/// `additionalProperties: false`, `items`, `minItems`, `maxItems`, `minLength`, `maxLength`,
/// `minimum`, `maximum`, `multipleOf` and `enum`.
fn validate(schema: &Value, value: &Value) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{value} {why} (schema {schema})"));
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            return fail("is not one of the enum's values");
        }
    }
    let number = |key: &str| schema.get(key).and_then(Value::as_f64);
    let count = |key: &str| schema.get(key).and_then(Value::as_u64).map(|n| n as usize);
    match schema.get("type").and_then(Value::as_str) {
        None => {}
        Some("object") => {
            let Some(object) = value.as_object() else {
                return fail("is not an object");
            };
            let properties = schema["properties"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for key in schema["required"].as_array().into_iter().flatten() {
                if !object.contains_key(key.as_str().unwrap()) {
                    return fail(&format!("lacks required {key}"));
                }
            }
            for (key, v) in object {
                match properties.get(key) {
                    Some(sub) => validate(sub, v)?,
                    None if schema["additionalProperties"] == json!(false) => {
                        return fail(&format!("has the extra property {key:?}"))
                    }
                    None => {}
                }
            }
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                return fail("is not an array");
            };
            if count("minItems").is_some_and(|m| items.len() < m)
                || count("maxItems").is_some_and(|m| items.len() > m)
            {
                return fail("has the wrong number of items");
            }
            for item in items {
                if let Some(sub) = schema.get("items") {
                    validate(sub, item)?;
                }
            }
        }
        Some("string") => {
            let Some(s) = value.as_str() else {
                return fail("is not a string");
            };
            let chars = s.chars().count();
            if count("minLength").is_some_and(|m| chars < m)
                || count("maxLength").is_some_and(|m| chars > m)
            {
                return fail("has the wrong length");
            }
        }
        Some(kind @ ("integer" | "number")) => {
            let ok = if kind == "integer" {
                value.is_i64() || value.is_u64()
            } else {
                value.is_number()
            };
            if !ok {
                return fail(&format!("is not an {kind}"));
            }
            let x = value.as_f64().unwrap();
            if number("minimum").is_some_and(|m| x < m) || number("maximum").is_some_and(|m| x > m)
            {
                return fail("is out of range");
            }
            if number("multipleOf").is_some_and(|m| ((x / m).round() - x / m).abs() > 1e-6) {
                return fail("is not a multiple of `multipleOf`");
            }
        }
        Some("boolean") if !value.is_boolean() => return fail("is not a boolean"),
        Some("boolean") => {}
        Some(other) => return fail(&format!("has a type the validator does not know: {other}")),
    }
    Ok(())
}

#[test]
fn the_validator_catches_what_it_should() {
    let person: Value = serde_json::from_str(PERSON).unwrap();
    assert!(validate(&person, &json!({"name": "Ann", "age": 30, "pets": ["cat"]})).is_ok());
    for bad in [
        json!({"name": "Ann", "age": 30}),
        json!({"name": "Ann", "age": 300, "pets": ["cat"]}),
        json!({"name": "Ann", "age": 3.5, "pets": ["cat"]}),
        json!({"name": "Ann", "age": 30, "pets": []}),
        json!({"name": "Ann", "age": 30, "pets": ["cow"]}),
        json!({"name": "Ann", "age": 30, "pets": ["cat"], "x": 1}),
        json!({"name": "A very long name indeed, far too long", "age": 30, "pets": ["cat"]}),
    ] {
        assert!(validate(&person, &bad).is_err(), "{bad}");
    }
    let price = json!({"type": "number", "multipleOf": 0.01});
    assert!(validate(&price, &json!(12.25)).is_ok());
    assert!(validate(&price, &json!(12.255)).is_err());
}
