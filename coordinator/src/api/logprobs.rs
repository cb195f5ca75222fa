//! Log probabilities in OpenAI's shapes (chat's `logprobs.content`, completions' `tokens` /
//! `token_logprobs` / `top_logprobs` / `text_offset`) and vLLM's `prompt_logprobs`, from the
//! engine's [`TokenLogprobs`] (computed by the workers from the raw logits: before penalties,
//! logit_bias and temperature, as vLLM's default `logprobs_mode` `raw_logprobs`).
//!
//! A token's text is its own bytes (byte-level BPE symbols mapped back to bytes, SentencePiece's
//! `▁` and `<0xNN>` pieces likewise), read as UTF-8 with replacement; `bytes` carries the bytes
//! themselves, so a character split over tokens reassembles exactly. Log probabilities below
//! -9999 (banned tokens: -inf) are reported as -9999, as vLLM does, since JSON has no infinity.

use std::collections::BTreeMap;

use serde::Serialize;
use tokenizers::Tokenizer;

use crate::engine::TokenLogprobs;

/// The lowest log probability reported.
const FLOOR: f32 = -9999.0;

fn clamp(logprob: f32) -> f32 {
    if logprob.is_nan() {
        FLOOR
    } else {
        logprob.max(FLOOR)
    }
}

/// Turns token ids into their texts and bytes.
pub struct TokenTexts<'a> {
    tokenizer: &'a Tokenizer,
    /// The tokenizer's tokens are GPT-2 byte-level symbols.
    byte_level: bool,
}

impl<'a> TokenTexts<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        let byte_level = tokenizer
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|json| json.contains("ByteLevel"));
        Self {
            tokenizer,
            byte_level,
        }
    }

    /// The bytes token `id` stands for.
    pub fn bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.tokenizer.id_to_token(id) else {
            return Vec::new();
        };
        if let Some(byte) = piece
            .strip_prefix("<0x")
            .and_then(|p| p.strip_suffix('>'))
            .filter(|h| h.len() == 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            return vec![byte];
        }
        if self.byte_level {
            if let Some(bytes) = piece
                .chars()
                .map(byte_of_symbol)
                .collect::<Option<Vec<u8>>>()
            {
                return bytes;
            }
        }
        piece.replace('\u{2581}', " ").into_bytes()
    }

    /// The token's text (its bytes as UTF-8, a partial character replaced).
    pub fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.bytes(id)).into_owned()
    }
}

/// The byte GPT-2's byte-level alphabet maps to `c`: printable Latin-1 bytes stand for
/// themselves, the other 68 bytes for U+0100 onwards, in byte order.
fn byte_of_symbol(c: char) -> Option<u8> {
    let code = c as u32;
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    let index = code.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(index as usize)
        .map(|b| b as u8)
}

/// One of chat's `top_logprobs`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One entry of chat's `logprobs.content`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// A chat choice's (or chunk's) `logprobs`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
    /// OpenAI's field for refusals; always null here.
    pub refusal: Option<()>,
}

impl TokenTexts<'_> {
    /// Chat's entry for one sampled token.
    pub fn chat_entry(&self, lp: &TokenLogprobs) -> ChatTokenLogprob {
        let top = |&(id, logprob): &(u32, f32)| ChatTopLogprob {
            token: self.text(id),
            logprob: clamp(logprob),
            bytes: self.bytes(id),
        };
        ChatTokenLogprob {
            token: self.text(lp.token_id),
            logprob: clamp(lp.logprob),
            bytes: self.bytes(lp.token_id),
            top_logprobs: lp.top.iter().map(top).collect(),
        }
    }

    /// Chat's `logprobs` of some sampled tokens.
    pub fn chat(&self, lps: &[TokenLogprobs]) -> ChatLogprobs {
        ChatLogprobs {
            content: lps.iter().map(|lp| self.chat_entry(lp)).collect(),
            refusal: None,
        }
    }
}

/// A completion choice's (or chunk's) `logprobs`, OpenAI's legacy shape.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Character offset of each token's text in the choice's text.
    pub text_offset: Vec<usize>,
    /// Null for the first prompt token (echo), which has no context.
    pub token_logprobs: Vec<Option<f32>>,
    pub tokens: Vec<String>,
    /// The most likely tokens and the chosen one (vLLM's convention), by text.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
}

impl CompletionLogprobs {
    /// Appends one position: `token` with its log probabilities (`None` for a first prompt
    /// token). `offset` is the character offset where its text starts, advanced past it.
    pub fn push(
        &mut self,
        texts: &TokenTexts,
        token: u32,
        lp: Option<&TokenLogprobs>,
        offset: &mut usize,
    ) {
        let text = texts.text(token);
        self.text_offset.push(*offset);
        *offset += text.chars().count();
        self.token_logprobs.push(lp.map(|l| clamp(l.logprob)));
        self.top_logprobs.push(lp.map(|l| {
            let mut top: BTreeMap<String, f32> = l
                .top
                .iter()
                .map(|&(id, logprob)| (texts.text(id), clamp(logprob)))
                .collect();
            top.entry(text.clone()).or_insert(clamp(l.logprob));
            top
        }));
        self.tokens.push(text);
    }
}

/// One entry of vLLM's `prompt_logprobs` position map (keyed by token id).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptLogprob {
    pub logprob: f32,
    pub rank: u32,
    pub decoded_token: String,
}

/// vLLM's `prompt_logprobs`: per prompt position, null for the first, else the prompt token and
/// the most likely ones, keyed by token id.
pub type PromptLogprobs = Vec<Option<BTreeMap<String, PromptLogprob>>>;

impl TokenTexts<'_> {
    /// vLLM's `prompt_logprobs` for the engine's per-position entries.
    pub fn prompt(&self, entries: &[Option<TokenLogprobs>]) -> PromptLogprobs {
        entries
            .iter()
            .map(|e| {
                e.as_ref().map(|lp| {
                    let mut map: BTreeMap<String, PromptLogprob> = lp
                        .top
                        .iter()
                        .enumerate()
                        .map(|(i, &(id, logprob))| {
                            let entry = PromptLogprob {
                                logprob: clamp(logprob),
                                rank: i as u32 + 1,
                                decoded_token: self.text(id),
                            };
                            (id.to_string(), entry)
                        })
                        .collect();
                    map.insert(
                        lp.token_id.to_string(),
                        PromptLogprob {
                            logprob: clamp(lp.logprob),
                            rank: lp.rank,
                            decoded_token: self.text(lp.token_id),
                        },
                    );
                    map
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_symbols_map_back_to_their_bytes() {
        assert_eq!(byte_of_symbol('a'), Some(b'a'));
        // GPT-2's space and newline symbols.
        assert_eq!(byte_of_symbol('\u{120}'), Some(b' '));
        assert_eq!(byte_of_symbol('\u{10a}'), Some(b'\n'));
        assert_eq!(byte_of_symbol('\u{100}'), Some(0));
        assert_eq!(byte_of_symbol('\u{4e00}'), None);
    }
}
