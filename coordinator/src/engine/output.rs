//! Turns one sequence's sampled tokens into text and decides when it ends. Detokenization is
//! incremental (a short window of tokens is decoded per step, so cost does not grow with the
//! output) and never emits half a UTF-8 character. Stop strings are searched in the text; the
//! tail that could still become a stop string is held back until it cannot, so a stop string is
//! never streamed to the client.

use std::sync::Arc;

use tokenizers::Tokenizer;

use super::types::{FinishReason, GenerateRequest};

/// The per-sequence output state.
#[derive(Debug)]
pub struct OutputState {
    max_tokens: usize,
    /// Stop strings do not end the sequence before this many tokens (vLLM's `min_tokens`; the
    /// workers ban end tokens until then).
    min_tokens: usize,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    skip_special_tokens: bool,
    /// Generated tokens.
    tokens: Vec<u32>,
    /// Generated text so far (after stop-string truncation).
    text: String,
    /// Bytes of `text` already sent.
    emitted: usize,
    /// Window of `tokens` for incremental decoding.
    prefix_offset: usize,
    read_offset: usize,
    /// Longest stop string, in bytes.
    hold_back: usize,
}

/// What one new token produced.
#[derive(Debug, PartialEq)]
pub struct Update {
    /// Text that is now final.
    pub text: String,
    /// Set when the sequence has ended.
    pub finished: Option<FinishReason>,
}

impl OutputState {
    /// State for a request.
    pub fn new(req: &GenerateRequest) -> Self {
        Self {
            max_tokens: req.max_tokens as usize,
            min_tokens: req.extras.min_tokens as usize,
            stop: req.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            stop_token_ids: req.stop_token_ids.clone(),
            ignore_eos: req.ignore_eos,
            skip_special_tokens: req.skip_special_tokens,
            tokens: Vec::new(),
            text: String::new(),
            emitted: 0,
            prefix_offset: 0,
            read_offset: 0,
            hold_back: req.stop.iter().map(String::len).max().unwrap_or(0),
        }
    }

    /// Tokens generated so far.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Appends `token` and reports the text that became final and whether the sequence ended.
    pub fn push(
        &mut self,
        token: u32,
        tokenizer: &Arc<Tokenizer>,
        eos_token_ids: &[u32],
    ) -> Update {
        self.tokens.push(token);
        let eos = !self.ignore_eos && eos_token_ids.contains(&token);
        let stop_token = self.stop_token_ids.contains(&token);
        if !eos && !stop_token {
            self.decode_tail(tokenizer);
        }
        let mut finished = if eos || stop_token {
            Some(FinishReason::Stop)
        } else {
            None
        };
        if finished.is_none() && !self.stop.is_empty() && self.tokens.len() >= self.min_tokens {
            let from = self.emitted.saturating_sub(self.hold_back);
            let from = floor_char_boundary(&self.text, from);
            let hit = self
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
                .min();
            if let Some(at) = hit {
                self.text.truncate(at);
                finished = Some(FinishReason::Stop);
            }
        }
        if finished.is_none() && self.tokens.len() >= self.max_tokens {
            finished = Some(FinishReason::Length);
        }
        let safe_end = if finished.is_some() {
            self.text.len()
        } else {
            floor_char_boundary(
                &self.text,
                self.text
                    .len()
                    .saturating_sub(self.hold_back.saturating_sub(1)),
            )
        };
        let text = if safe_end > self.emitted {
            let t = self.text[self.emitted..safe_end].to_string();
            self.emitted = safe_end;
            t
        } else {
            String::new()
        };
        Update { text, finished }
    }

    /// Ends the output where it is (structured outputs: the grammar is complete): returns the
    /// text held back so far (a possible stop string's start), which is final now.
    pub fn flush(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }

    fn decode_tail(&mut self, tokenizer: &Tokenizer) {
        let skip = self.skip_special_tokens;
        let prefix = tokenizer
            .decode(&self.tokens[self.prefix_offset..self.read_offset], skip)
            .unwrap_or_default();
        let full = tokenizer
            .decode(&self.tokens[self.prefix_offset..], skip)
            .unwrap_or_default();
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new = full.get(prefix.len()..).unwrap_or_default();
            self.text.push_str(new);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.tokens.len();
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
