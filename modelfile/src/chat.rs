//! Chat templates: Hugging Face's Jinja chat templates rendered with minijinja, set up the way
//! transformers sets up its Jinja environment (`trim_blocks`, `lstrip_blocks`, Python string and
//! dict methods, `raise_exception`, a `tojson` that writes what Python's `json.dumps` writes,
//! `strftime_now`, loop controls).
//!
//! Invariants: a [`ChatTemplate`] holds a template that compiled; rendering never panics on
//! user input (a template error comes back as [`Error::ChatTemplate`]). Costs: compiling once in
//! [`ChatTemplate::new`]; a render walks the template once (microseconds for a short chat).

use std::fmt::Write as _;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};

use crate::error::{Error, Result};

const TEMPLATE_NAME: &str = "chat";

/// One message of a chat.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template plus the special token strings it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_err(e: minijinja::Error) -> Error {
    // `{:#}` adds the template line and context minijinja knows about.
    Error::ChatTemplate {
        detail: format!("{e:#}"),
    }
}

impl ChatTemplate {
    /// Compiles `template`. A template that does not compile is [`Error::ChatTemplate`].
    pub fn new(
        template: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, template.clone())
            .map_err(template_err)?;
        Ok(ChatTemplate {
            env,
            source: template,
            bos_token,
            eos_token,
        })
    }

    /// Another template with the same BOS/EOS token strings (a `--chat-template` override).
    pub fn with_template(&self, template: String) -> Result<Self> {
        Self::new(template, self.bos_token.clone(), self.eos_token.clone())
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant's reply
    /// starts. The template sees `messages`, `add_generation_prompt`, `tools` (none), and
    /// `bos_token` / `eos_token` when known.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_value(Value::from_serialize(messages), None, add_generation_prompt)
    }

    /// Renders messages given as JSON objects, so fields beyond role and content reach the
    /// template in the shape Hugging Face templates index (an assistant's `tool_calls`, a tool
    /// result's `tool_call_id`), with `tools` as transformers' `apply_chat_template(tools=...)`
    /// passes them: the list, or none when absent. Object keys keep their order.
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_value(
            Value::from_serialize(messages),
            tools.map(Value::from_serialize),
            add_generation_prompt,
        )
    }

    fn render_value(
        &self,
        messages: Value,
        tools: Option<Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.env.get_template(TEMPLATE_NAME).map_err(template_err)?;
        let mut ctx = vec![
            ("messages", messages),
            ("tools", tools.unwrap_or(Value::from(()))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ];
        if let Some(bos) = &self.bos_token {
            ctx.push(("bos_token", Value::from(bos.as_str())));
        }
        if let Some(eos) = &self.eos_token {
            ctx.push(("eos_token", Value::from(eos.as_str())));
        }
        let ctx: Value = ctx.into_iter().collect();
        template.render(ctx).map_err(template_err)
    }
}

fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson(value, indent=None, sort_keys=False)` as transformers defines it: Python's
/// `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, so `", "` and
/// `": "` separators without indent and no HTML escaping (minijinja's built-in escapes `<`).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // transformers accepts and ignores these; accept them so templates that pass them work.
    let _: Option<Value> = kwargs.get("ensure_ascii")?;
    let _: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(
        &mut out,
        &value,
        JsonStyle {
            indent,
            sort_keys: sort_keys.unwrap_or(false),
        },
        0,
    )?;
    Ok(Value::from_safe_string(out))
}

#[derive(Clone, Copy)]
struct JsonStyle {
    indent: Option<usize>,
    sort_keys: bool,
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, `.0` on integral values, exponent form
/// (`1e-05`, `1e+16`) outside `1e-4 <= |x| < 1e16`.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        let s = format!("{x:e}");
        return match s.split_once('e') {
            Some((mantissa, exp)) => {
                let (sign, digits) = match exp.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', exp),
                };
                format!("{mantissa}e{sign}{digits:0>2}")
            }
            None => s,
        };
    }
    if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

fn newline_indent(out: &mut String, style: JsonStyle, level: usize) {
    if let Some(n) = style.indent {
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', n * level));
    }
}

fn write_json(
    out: &mut String,
    v: &Value,
    style: JsonStyle,
    level: usize,
) -> std::result::Result<(), minijinja::Error> {
    let item_sep = if style.indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let x = f64::try_from(v.clone())?;
                out.push_str(&python_float(x));
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if style.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline_indent(out, style, level + 1);
                match k.as_str() {
                    Some(s) => write_json_str(out, s),
                    None => write_json_str(out, &k.to_string()),
                }
                out.push_str(": ");
                write_json(out, &v.get_item(k)?, style, level + 1)?;
            }
            newline_indent(out, style, level);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline_indent(out, style, level + 1);
                write_json(out, item, style, level + 1)?;
            }
            newline_indent(out, style, level);
            out.push(']');
        }
        _ => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {} value", v.kind()),
            ))
        }
    }
    Ok(())
}

/// `strftime_now(format)`: the current UTC time formatted with the common `strftime` codes
/// (`%d %m %Y %y %b %B %a %A %H %I %M %S %p %j %%`); Llama 3 templates use it for the date.
fn strftime_now(format: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(strftime(&format, secs)))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Formats `unix_secs` (UTC). Unknown codes are kept as written, like glibc.
fn strftime(format: &str, unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for all dates after 1970.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    let leap = (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400);
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + u64::from(leap && month > 2);
    let weekday = ((days + 3) % 7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday).
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('d') => write!(out, "{day:02}"),
            Some('m') => write!(out, "{month:02}"),
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{yday:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn render(template: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(
            template.to_string(),
            Some("<s>".into()),
            Some("</s>".into()),
        )?
        .render(messages, true)
    }

    #[test]
    fn blocks_are_trimmed_like_transformers() {
        // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before it.
        let t = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
        assert_eq!(
            render(t, &[msg("user", "a"), msg("assistant", "b")]).unwrap(),
            "[a]\n"
        );
    }

    #[test]
    fn python_string_and_dict_methods_work() {
        let t = "{{ messages[0].content.strip() }}|{{ messages[0].content.startswith('  hi') }}|{{ messages[0].content.upper().strip() }}|{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}|{{ messages[0].get('role') }}";
        // Booleans print as Python prints them, like Jinja2.
        assert_eq!(
            render(t, &[msg("user", "  hi there ")]).unwrap(),
            "hi there|True|HI THERE|a=1|user"
        );
    }

    #[test]
    fn raise_exception_becomes_a_chat_template_error() {
        let t = "{% if messages[0].role != 'system' %}{{ raise_exception('System first, please') }}{% endif %}";
        match render(t, &[msg("user", "x")]) {
            Err(Error::ChatTemplate { detail }) => {
                assert!(detail.contains("System first, please"), "{detail}")
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn template_that_does_not_compile_is_an_error_at_new() {
        let err = ChatTemplate::new("{% for m in messages %}".into(), None, None).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate { .. }));
    }

    #[test]
    fn bos_eos_and_generation_prompt_are_in_the_context() {
        let t = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}>{% endif %}";
        let ct = ChatTemplate::new(t.into(), Some("<s>".into()), Some("</s>".into())).unwrap();
        assert_eq!(ct.render(&[msg("user", "q")], true).unwrap(), "<s>q</s>>");
        assert_eq!(ct.render(&[msg("user", "q")], false).unwrap(), "<s>q</s>");
        // Without token strings, they render as nothing rather than failing.
        let ct = ChatTemplate::new(t.into(), None, None).unwrap();
        assert_eq!(ct.render(&[msg("user", "q")], false).unwrap(), "q");
    }

    #[test]
    fn loop_controls_and_namespaces_work() {
        let t = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}";
        assert_eq!(
            render(t, &[msg("a", ""), msg("b", ""), msg("c", "")]).unwrap(),
            "2"
        );
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = r#"{{ {"name": "f", "n": 1, "x": 0.5, "big": 1e20, "ok": true, "none": none, "list": [1, "<b>&'"], "t": "a\"b\n\u00e9"} | tojson }}"#;
        assert_eq!(
            render(t, &[]).unwrap(),
            r#"{"name": "f", "n": 1, "x": 0.5, "big": 1e+20, "ok": true, "none": null, "list": [1, "<b>&'"], "t": "a\"b\né"}"#
        );
        let t = r#"{{ {"b": [1, 2], "a": {}} | tojson(indent=2, sort_keys=true) }}"#;
        assert_eq!(
            render(t, &[]).unwrap(),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    2\n  ]\n}"
        );
        assert_eq!(
            render("{{ messages | tojson }}", &[msg("user", "hi")]).unwrap(),
            r#"[{"role": "user", "content": "hi"}]"#
        );
    }

    #[test]
    fn python_float_repr_is_matched() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (1.5e16, "1.5e+16"),
            (-2.25, "-2.25"),
            (123456.0, "123456.0"),
            (0.0, "0.0"),
        ] {
            assert_eq!(python_float(x), want);
        }
    }

    #[test]
    fn strftime_formats_a_known_instant() {
        // 2024-11-28 13:05:09 UTC, a Thursday, day 333 of a leap year.
        let t = 1_732_799_109;
        assert_eq!(strftime("%d %b %Y", t), "28 Nov 2024");
        assert_eq!(
            strftime("%A %B %m/%d/%y %H:%M:%S %I%p %j %%", t),
            "Thursday November 11/28/24 13:05:09 01PM 333 %"
        );
        assert_eq!(strftime("%d %b %Y %a", 0), "01 Jan 1970 Thu");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn chat_template_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChatTemplate>();
    }
}
