//! Error chains on one line. Libraries here often say their cause in their own message and also
//! return it as `source()`, so printing every link (anyhow's `{:#}`) repeats the cause: "reading
//! m.gguf: No such file or directory (os error 2): No such file or directory (os error 2)".
//! `one_line` joins the links with ": " and leaves out each link that the text already says.

/// The messages of an error chain, outermost first, joined with ": " without repeats.
pub fn one_line<I, S>(chain: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut text = String::new();
    for message in chain {
        let message = message.as_ref().trim();
        if message.is_empty() || text.contains(message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(message);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let chain = [
            "model: reading /m.gguf: No such file or directory (os error 2)",
            "reading /m.gguf: No such file or directory (os error 2)",
            "No such file or directory (os error 2)",
        ];
        assert_eq!(
            one_line(chain),
            "model: reading /m.gguf: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn causes_not_yet_said_are_appended_in_order() {
        assert_eq!(
            one_line(["opening results.jsonl", "Permission denied (os error 13)"]),
            "opening results.jsonl: Permission denied (os error 13)"
        );
    }
}
