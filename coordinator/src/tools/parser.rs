//! Reads tool calls out of a model's output as it arrives: one incremental state machine that
//! both the streamed and the whole answer go through, so a streamed answer reassembles to
//! exactly the non-streamed one, however the text was split (the tests split at every byte).
//!
//! What comes out, in order: content (the text outside call markup) and calls. Content is
//! released as soon as it cannot be the start of a call marker; whitespace at the end of a run
//! of content (before a call, or at the end) is dropped, and so is whitespace right after a
//! call. A call is released whole once its JSON closes, with its arguments as compact JSON; a
//! call whose JSON does not parse as `{name, arguments}` is released as content instead, markup
//! and all. So no markup of a valid call ever reaches content, and nothing of a call is sent
//! before it is known to parse: arguments arrive in one delta per call, not token by token.
//! Without `parallel_tool_calls`, calls after the first are dropped.
//!
//! A forced call (`tool_choice` `required` or a named function) is read from the whole output
//! at the end: the JSON that the forced schema describes (see [`super::forced`]); output that
//! is not that falls back to the template's own format when a parser is configured.
//!
//! Costs: each byte is looked at a small constant number of times, except that a call region
//! is scanned again on each push until it closes (calls are short).

use serde_json::Value;

use super::json_scan::{extent, Extent};
use super::{forced, hermes, llama3_json, mistral, new_call_id, ParserKind, ToolCall};

/// Which calls to look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The model's own call format (`tool_choice: auto`).
    Auto(ParserKind),
    /// `tool_choice: required` (`function: None`) or a named function, with the format to fall
    /// back on.
    Forced {
        function: Option<String>,
        fallback: Option<ParserKind>,
    },
}

/// A piece of the parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Content(String),
    /// The call at this position among the choice's calls.
    Call {
        index: usize,
        call: ToolCall,
    },
}

/// The whole output, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The text outside calls; `None` when there is none.
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

impl Parsed {
    /// Gathers pieces.
    pub fn from_pieces(pieces: Vec<Piece>) -> Parsed {
        let mut content = String::new();
        let mut calls = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(text) => content.push_str(&text),
                Piece::Call { call, .. } => calls.push(call),
            }
        }
        Parsed {
            content: (!content.is_empty()).then_some(content),
            calls,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Outside calls, looking for a marker (hermes, mistral).
    Text,
    /// Inside a call region: the marker was read.
    Body,
    /// Llama 3: the reply has not shown yet whether it starts with a call.
    Start,
    /// Llama 3: after a call, before `;` and the next one.
    Between,
    /// No more calls can come: everything left is content.
    Plain,
    /// Forced: everything is read at the end.
    Whole,
}

/// The incremental parser of one choice.
pub struct ToolCallParser {
    mode: Mode,
    parallel: bool,
    state: State,
    /// Text not yet released.
    buf: String,
    /// The markup read on entering `Body` (released as content if the call does not parse).
    opened: String,
    /// Whitespace at the end of the content released so far, held until text follows it.
    held: String,
    /// A call was released and no content since: the next content's leading whitespace (the
    /// newlines after a closing tag) is dropped.
    after_call: bool,
    calls: usize,
}

impl ToolCallParser {
    /// `parallel`: `parallel_tool_calls`.
    pub fn new(mode: Mode, parallel: bool) -> Self {
        let state = match &mode {
            Mode::Auto(ParserKind::Llama3Json) => State::Start,
            Mode::Auto(_) => State::Text,
            Mode::Forced { .. } => State::Whole,
        };
        ToolCallParser {
            mode,
            parallel,
            state,
            buf: String::new(),
            opened: String::new(),
            held: String::new(),
            after_call: false,
            calls: 0,
        }
    }

    /// Parses a whole output at once.
    pub fn parse(mode: Mode, parallel: bool, text: &str) -> Parsed {
        let mut parser = Self::new(mode, parallel);
        let mut pieces = parser.push(text);
        pieces.extend(parser.finish());
        Parsed::from_pieces(pieces)
    }

    /// Whether a call has been released.
    pub fn called(&self) -> bool {
        self.calls > 0
    }

    /// Feeds new output; returns what became final.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        if self.state != State::Whole {
            self.step(&mut out, false);
        }
        out
    }

    /// The output ended: releases everything left.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.state == State::Whole {
            self.finish_forced(&mut out);
        } else {
            self.step(&mut out, true);
        }
        out
    }

    fn kind(&self) -> Option<ParserKind> {
        match &self.mode {
            Mode::Auto(kind) => Some(*kind),
            Mode::Forced { fallback, .. } => *fallback,
        }
    }

    fn step(&mut self, out: &mut Vec<Piece>, finishing: bool) {
        let Some(kind) = self.kind() else {
            // Forced without a fallback format: nothing to look for but content.
            let text = std::mem::take(&mut self.buf);
            self.content(out, &text, finishing);
            return;
        };
        loop {
            let progressed = match self.state {
                State::Text => self.step_text(out, kind, finishing),
                State::Body => self.step_body(out, kind, finishing),
                State::Start => self.step_start(finishing),
                State::Between => self.step_between(finishing),
                State::Plain | State::Whole => {
                    let text = std::mem::take(&mut self.buf);
                    self.content(out, &text, finishing);
                    false
                }
            };
            if !progressed {
                return;
            }
        }
    }

    /// Releases content up to a marker (entering `Body`) or up to what may begin one.
    fn step_text(&mut self, out: &mut Vec<Piece>, kind: ParserKind, finishing: bool) -> bool {
        let marker = match kind {
            ParserKind::Hermes => hermes::START,
            ParserKind::Mistral => mistral::START,
            ParserKind::Llama3Json => unreachable!("llama3_json has no marker state"),
        };
        if let Some(at) = self.buf.find(marker) {
            let before: String = self.buf.drain(..at).collect();
            self.buf.drain(..marker.len());
            self.content(out, &before, true);
            self.opened = marker.to_string();
            self.state = State::Body;
            return true;
        }
        let keep = if finishing {
            0
        } else {
            partial_marker_len(&self.buf, marker)
        };
        let text: String = self.buf.drain(..self.buf.len() - keep).collect();
        self.content(out, &text, finishing);
        false
    }

    /// Waits for the call region to close, then releases its calls (or its text as content).
    fn step_body(&mut self, out: &mut Vec<Piece>, kind: ParserKind, finishing: bool) -> bool {
        let region = match kind {
            ParserKind::Hermes => match self.buf.find(hermes::END) {
                Some(at) => Region {
                    len: at + hermes::END.len(),
                    calls: hermes::call(&self.buf[..at]).map(|c| vec![c]),
                },
                // A call the output ended inside (no closing tag) still counts if it parses.
                None if finishing => Region {
                    len: self.buf.len(),
                    calls: hermes::call(&self.buf).map(|c| vec![c]),
                },
                None => return false,
            },
            ParserKind::Mistral => match json_region(&self.buf, finishing) {
                Some((len, body)) => Region {
                    len,
                    calls: body.and_then(|b| mistral::calls(&self.buf[b..len])),
                },
                None => return false,
            },
            ParserKind::Llama3Json => match json_region(&self.buf, finishing) {
                Some((len, body)) => Region {
                    len,
                    calls: body
                        .and_then(|b| llama3_json::call(&self.buf[b..len]))
                        .map(|c| vec![c]),
                },
                None => return false,
            },
        };
        let text: String = self.buf.drain(..region.len).collect();
        let parsed = match region.calls {
            Some(calls) => {
                for (name, arguments) in calls {
                    self.call(out, name, arguments);
                }
                true
            }
            None => {
                let raw = std::mem::take(&mut self.opened) + &text;
                self.content(out, &raw, false);
                false
            }
        };
        self.opened.clear();
        self.state = match (kind, parsed) {
            (ParserKind::Llama3Json, true) => State::Between,
            (ParserKind::Llama3Json, false) => State::Plain,
            _ => State::Text,
        };
        true
    }

    /// Llama 3: a reply that starts (after whitespace) with `<|python_tag|>` or `{` is calls.
    fn step_start(&mut self, finishing: bool) -> bool {
        let trimmed = self.buf.trim_start();
        if trimmed.is_empty() {
            return false;
        }
        let lead = self.buf.len() - trimmed.len();
        if trimmed.starts_with(llama3_json::PYTHON_TAG) {
            let tag = lead + llama3_json::PYTHON_TAG.len();
            self.opened = self.buf.drain(..tag).collect();
            self.state = State::Body;
        } else if trimmed.starts_with('{') {
            self.opened = self.buf.drain(..lead).collect();
            self.state = State::Body;
        } else if !finishing && llama3_json::PYTHON_TAG.starts_with(trimmed) {
            return false;
        } else {
            self.state = State::Plain;
        }
        true
    }

    /// Llama 3: `;` starts the next call; anything else ends the calls.
    fn step_between(&mut self, finishing: bool) -> bool {
        let trimmed = self.buf.trim_start();
        if trimmed.is_empty() {
            if finishing {
                self.buf.clear();
            }
            return false;
        }
        if trimmed.starts_with(llama3_json::SEPARATOR) {
            let lead = self.buf.len() - trimmed.len() + 1;
            self.opened = self.buf.drain(..lead).collect();
            self.state = State::Body;
        } else {
            let lead = self.buf.len() - trimmed.len();
            self.buf.drain(..lead);
            self.state = State::Plain;
        }
        true
    }

    fn finish_forced(&mut self, out: &mut Vec<Piece>) {
        let Mode::Forced { function, fallback } = self.mode.clone() else {
            return;
        };
        if let Some(calls) = forced::calls(&self.buf, function.as_deref()) {
            for (name, arguments) in calls {
                self.call(out, name, arguments);
            }
            self.buf.clear();
            return;
        }
        self.state = match fallback {
            Some(ParserKind::Llama3Json) => State::Start,
            Some(_) => State::Text,
            None => State::Plain,
        };
        self.step(out, true);
    }

    fn call(&mut self, out: &mut Vec<Piece>, name: String, arguments: String) {
        if self.calls > 0 && !self.parallel {
            return;
        }
        self.after_call = true;
        out.push(Piece::Call {
            index: self.calls,
            call: ToolCall {
                id: new_call_id(self.kind()),
                name,
                arguments,
            },
        });
        self.calls += 1;
    }

    /// Releases `text` as content. At a `boundary` (a call follows, or the output ended) the
    /// whitespace at its end is dropped; elsewhere it is held until more text follows.
    fn content(&mut self, out: &mut Vec<Piece>, text: &str, boundary: bool) {
        let mut all = std::mem::take(&mut self.held);
        all.push_str(text);
        let end = all.trim_end().len();
        if !boundary {
            self.held = all[end..].to_string();
        }
        all.truncate(end);
        if self.after_call {
            all = all.trim_start().to_string();
        }
        if !all.is_empty() {
            self.after_call = false;
            out.push(Piece::Content(all));
        }
    }
}

/// A closed call region: its length in the buffer and its calls, if it parsed.
struct Region {
    len: usize,
    calls: Option<Vec<(String, String)>>,
}

/// The JSON value after optional whitespace at the start of `buf`: `Some((end, Some(start)))`
/// once it closes, `Some((len, None))` when it cannot be a call (not an object or array,
/// mismatched brackets, or unclosed at the end), `None` while it may still close.
fn json_region(buf: &str, finishing: bool) -> Option<(usize, Option<usize>)> {
    let start = buf.len() - buf.trim_start().len();
    let rest = &buf[start..];
    match rest.as_bytes().first() {
        None if finishing => Some((buf.len(), None)),
        None => None,
        Some(b'{' | b'[') => match extent(rest) {
            Extent::Complete(end) => Some((start + end, Some(start))),
            Extent::Mismatched(at) => Some((start + at + 1, None)),
            Extent::Incomplete if finishing => Some((buf.len(), None)),
            Extent::Incomplete => None,
        },
        Some(_) => Some((start, None)),
    }
}

/// The length of the longest end of `text` that is the beginning of `marker`.
fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// `{"name": <string>, <args_key>: <object>}` as a call with compact JSON arguments (`{}` when
/// the arguments are absent). A string holding a JSON object is taken as that object.
pub fn call_from_object(value: &Value, args_key: &str) -> Option<(String, String)> {
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?.to_string();
    let arguments = match object.get(args_key) {
        None | Some(Value::Null) => "{}".to_string(),
        Some(args @ Value::Object(_)) => args.to_string(),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s).ok()? {
            args @ Value::Object(_) => args.to_string(),
            _ => return None,
        },
        Some(_) => return None,
    };
    Some((name, arguments))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(kind: ParserKind) -> Mode {
        Mode::Auto(kind)
    }

    /// (content, [(name, arguments)]) without the random ids.
    fn shape(parsed: &Parsed) -> (Option<String>, Vec<(String, String)>) {
        let calls = parsed
            .calls
            .iter()
            .map(|c| (c.name.clone(), c.arguments.clone()))
            .collect();
        (parsed.content.clone(), calls)
    }

    fn whole(mode: Mode, text: &str) -> (Option<String>, Vec<(String, String)>) {
        shape(&ToolCallParser::parse(mode, true, text))
    }

    fn pair(name: &str, args: &str) -> (String, String) {
        (name.to_string(), args.to_string())
    }

    /// Feeds `text` in pieces split at each pair of byte offsets (every single split point and
    /// every split into three), and checks each reassembles to the whole parse.
    fn assert_split_invariant(mode: Mode, text: &str) {
        let want = whole(mode.clone(), text);
        let cuts: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        for (n, &a) in cuts.iter().enumerate() {
            for &b in &cuts[n..] {
                let mut parser = ToolCallParser::new(mode.clone(), true);
                let mut pieces = parser.push(&text[..a]);
                pieces.extend(parser.push(&text[a..b]));
                pieces.extend(parser.push(&text[b..]));
                pieces.extend(parser.finish());
                for (i, call) in pieces
                    .iter()
                    .filter_map(|p| match p {
                        Piece::Call { index, .. } => Some(*index),
                        Piece::Content(_) => None,
                    })
                    .enumerate()
                {
                    assert_eq!(i, call, "call indexes count up");
                }
                let got = shape(&Parsed::from_pieces(pieces));
                assert_eq!(got, want, "split at {a} and {b} of {text:?}");
            }
        }
    }

    const HERMES_TWO: &str = "I'll check both.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"Europe/Paris\"}}\n</tool_call>";

    #[test]
    fn hermes_calls_with_text_before_them() {
        assert_eq!(
            whole(auto(ParserKind::Hermes), HERMES_TWO),
            (
                Some("I'll check both.".into()),
                vec![
                    pair("get_weather", r#"{"city":"Paris","unit":"c"}"#),
                    pair("get_time", r#"{"tz":"Europe/Paris"}"#)
                ]
            )
        );
        assert_split_invariant(auto(ParserKind::Hermes), HERMES_TWO);
        let after = format!("{HERMES_TWO}\n\nBoth asked.\n");
        assert_eq!(
            whole(auto(ParserKind::Hermes), &after).0.as_deref(),
            Some("I'll check both.Both asked.")
        );
        assert_split_invariant(auto(ParserKind::Hermes), &after);
    }

    #[test]
    fn hermes_malformed_json_is_content() {
        let text = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": Paris}}\n</tool_call>";
        assert_eq!(
            whole(auto(ParserKind::Hermes), text),
            (Some(text.to_string()), vec![])
        );
        assert_split_invariant(auto(ParserKind::Hermes), text);
        // A valid call after a malformed one still counts.
        let text = "<tool_call>{\"name\": 1}</tool_call>\n<tool_call>{\"name\": \"f\"}</tool_call>";
        assert_eq!(
            whole(auto(ParserKind::Hermes), text),
            (
                Some("<tool_call>{\"name\": 1}</tool_call>".into()),
                vec![pair("f", "{}")]
            )
        );
        assert_split_invariant(auto(ParserKind::Hermes), text);
    }

    #[test]
    fn hermes_plain_answers_and_lookalike_tags_stay_content() {
        let text = "The <tool> box and <tool_call wait, no: a < b.\n";
        assert_eq!(
            whole(auto(ParserKind::Hermes), text),
            (Some(text.trim_end().to_string()), vec![])
        );
        assert_split_invariant(auto(ParserKind::Hermes), text);
        assert_eq!(whole(auto(ParserKind::Hermes), ""), (None, vec![]));
    }

    #[test]
    fn hermes_call_cut_off_before_its_closing_tag_counts_if_it_parses() {
        let text = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": [1, 2]}}";
        assert_eq!(
            whole(auto(ParserKind::Hermes), text),
            (None, vec![pair("f", r#"{"x":[1,2]}"#)])
        );
        let cut = "<tool_call>\n{\"name\": \"f\", \"argu";
        assert_eq!(
            whole(auto(ParserKind::Hermes), cut),
            (Some(cut.to_string()), vec![])
        );
        assert_split_invariant(auto(ParserKind::Hermes), cut);
    }

    #[test]
    fn mistral_parallel_calls_in_one_array() {
        let text = "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}, {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Lyon\"}}]";
        assert_eq!(
            whole(auto(ParserKind::Mistral), text),
            (
                None,
                vec![
                    pair("get_weather", r#"{"city":"Paris"}"#),
                    pair("get_weather", r#"{"city":"Lyon"}"#)
                ]
            )
        );
        assert_split_invariant(auto(ParserKind::Mistral), text);
        let before = format!("Let me look. {text}");
        assert_eq!(
            whole(auto(ParserKind::Mistral), &before).0.as_deref(),
            Some("Let me look.")
        );
        assert_split_invariant(auto(ParserKind::Mistral), &before);
    }

    #[test]
    fn mistral_ids_are_nine_alphanumerics() {
        let parsed = ToolCallParser::parse(
            auto(ParserKind::Mistral),
            true,
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]",
        );
        let id = &parsed.calls[0].id;
        assert_eq!(id.len(), 9);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        let parsed = ToolCallParser::parse(
            auto(ParserKind::Hermes),
            true,
            "<tool_call>{\"name\": \"f\"}</tool_call>",
        );
        assert!(parsed.calls[0].id.starts_with("call_"));
        assert_eq!(parsed.calls[0].id.len(), 29);
    }

    #[test]
    fn mistral_malformed_array_is_content() {
        let text = "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {\"a\": 1}]";
        assert_eq!(
            whole(auto(ParserKind::Mistral), text),
            (Some(text.to_string()), vec![])
        );
        assert_split_invariant(auto(ParserKind::Mistral), text);
        let text = "[TOOL_CALLS] sorry";
        assert_eq!(
            whole(auto(ParserKind::Mistral), text),
            (Some(text.to_string()), vec![])
        );
    }

    #[test]
    fn llama3_json_calls_with_tag_and_separators() {
        let text = "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}; {\"name\": \"get_time\", \"parameters\": {}}";
        assert_eq!(
            whole(auto(ParserKind::Llama3Json), text),
            (
                None,
                vec![
                    pair("get_weather", r#"{"city":"Paris"}"#),
                    pair("get_time", "{}")
                ]
            )
        );
        assert_split_invariant(auto(ParserKind::Llama3Json), text);
        let bare = "\n{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}\n";
        assert_eq!(
            whole(auto(ParserKind::Llama3Json), bare).1,
            vec![pair("get_weather", r#"{"city":"Paris"}"#)]
        );
        assert_split_invariant(auto(ParserKind::Llama3Json), bare);
    }

    #[test]
    fn llama3_json_plain_text_and_malformed_calls_are_content() {
        let text = "The weather in {Paris} is fine.";
        assert_eq!(
            whole(auto(ParserKind::Llama3Json), text),
            (Some(text.to_string()), vec![])
        );
        assert_split_invariant(auto(ParserKind::Llama3Json), text);
        let text = "{\"name\": \"get_weather\", \"parameters\": {\"city\": }}";
        assert_eq!(
            whole(auto(ParserKind::Llama3Json), text),
            (Some(text.to_string()), vec![])
        );
        assert_split_invariant(auto(ParserKind::Llama3Json), text);
        // Text after the calls is content.
        let text = "{\"name\": \"f\", \"parameters\": {}} and then some";
        assert_eq!(
            whole(auto(ParserKind::Llama3Json), text),
            (Some("and then some".into()), vec![pair("f", "{}")])
        );
        assert_split_invariant(auto(ParserKind::Llama3Json), text);
    }

    #[test]
    fn without_parallel_tool_calls_only_the_first_call_is_kept() {
        let parsed = ToolCallParser::parse(auto(ParserKind::Hermes), false, HERMES_TWO);
        assert_eq!(parsed.calls.len(), 1);
        assert_eq!(parsed.calls[0].name, "get_weather");
    }

    #[test]
    fn forced_named_function_takes_the_whole_output_as_arguments() {
        let named = Mode::Forced {
            function: Some("get_weather".into()),
            fallback: None,
        };
        assert_eq!(
            whole(named.clone(), " {\"city\": \"Paris\"}\n"),
            (None, vec![pair("get_weather", r#"{"city":"Paris"}"#)])
        );
        assert_split_invariant(named.clone(), "{\"city\": \"Paris\"}");
        assert_eq!(
            whole(named, "Paris, I think"),
            (Some("Paris, I think".into()), vec![])
        );
    }

    #[test]
    fn forced_required_reads_an_array_and_falls_back_to_the_template_format() {
        let required = Mode::Forced {
            function: None,
            fallback: Some(ParserKind::Hermes),
        };
        assert_eq!(
            whole(
                required.clone(),
                "[{\"name\": \"a\", \"parameters\": {\"x\": 1}}, {\"name\": \"b\", \"parameters\": {}}]"
            ),
            (None, vec![pair("a", r#"{"x":1}"#), pair("b", "{}")])
        );
        assert_eq!(
            whole(required.clone(), HERMES_TWO),
            whole(auto(ParserKind::Hermes), HERMES_TWO)
        );
        assert_split_invariant(required, HERMES_TWO);
    }

    #[test]
    fn multibyte_text_splits_only_at_char_boundaries() {
        let text = "Météo à Zürich 🌦\n<tool_call>{\"name\": \"météo\", \"arguments\": {\"ville\": \"Zürich\"}}</tool_call>";
        assert_eq!(
            whole(auto(ParserKind::Hermes), text),
            (
                Some("Météo à Zürich 🌦".into()),
                vec![pair("météo", r#"{"ville":"Zürich"}"#)]
            )
        );
        assert_split_invariant(auto(ParserKind::Hermes), text);
    }
}
