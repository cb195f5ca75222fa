//! Finds where a JSON object or array written by a model ends, byte by byte, without parsing
//! it: brackets are counted outside strings, escapes inside them are skipped. Whether the text
//! is valid JSON is serde's question once the extent is known; this only says when to ask.
//! Costs: one pass over the text, a stack as deep as the nesting.

/// Where a JSON value that starts at byte 0 ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// The value closes at this byte offset (exclusive).
    Complete(usize),
    /// It is still open at the end of the text.
    Incomplete,
    /// A closing bracket at this offset does not match the one opened (or nothing is open).
    Mismatched(usize),
}

/// The extent of the object or array at the start of `text` (which starts with `{` or `[`).
pub fn extent(text: &str) -> Extent {
    let mut open: Vec<u8> = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    for (i, b) in text.bytes().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => open.push(b),
            b'}' | b']' => {
                let want = if b == b'}' { b'{' } else { b'[' };
                if open.pop() != Some(want) {
                    return Extent::Mismatched(i);
                }
                if open.is_empty() {
                    return Extent::Complete(i + 1);
                }
            }
            _ => {}
        }
    }
    Extent::Incomplete
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brackets_inside_strings_and_escaped_quotes_do_not_count() {
        let t = r#"{"a": "}]\"{", "b": [1, {"c": []}]} tail"#;
        assert_eq!(extent(t), Extent::Complete(t.len() - 5));
        assert_eq!(extent(r#"[{"a": 1}, {"#), Extent::Incomplete);
        assert_eq!(extent(r#"{"a": "\\"}"#), Extent::Complete(11));
        assert_eq!(extent(r#"{"a": [1}"#), Extent::Mismatched(8));
    }
}
