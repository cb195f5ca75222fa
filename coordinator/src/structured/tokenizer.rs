//! The tokenizer as llguidance sees it: every token's bytes in a trie ([`TokTrie`]), with the
//! model's end-of-sequence tokens, plus our `tokenizers` tokenizer for the few places llguidance
//! tokenizes text itself (forced prefixes). Built from our own tokenizer rather than through
//! `toktrie_hf_tokenizers`, which pins an older `tokenizers` and would put a second copy in the
//! build. Cost: one walk over the vocabulary at start (tens of milliseconds for 50k tokens).

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use tokenizers::Tokenizer;

use crate::error::{StructuredError, StructuredResult};

/// Our tokenizer with its token trie.
struct TrieTokenizer {
    tokenizer: Arc<Tokenizer>,
    trie: TokTrie,
}

impl TokenizerEnv for TrieTokenizer {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            // The greedy trie walk covers what this cannot encode; an error yields no tokens.
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// llguidance's view of `tokenizer`, whose end-of-sequence tokens are `eos_token_ids` (the
/// first is the one a finished grammar allows; all of them end a sequence). Fails for tokenizers
/// whose decoder is neither byte-level nor byte-fallback (llguidance needs each token's bytes).
pub fn token_env(tokenizer: Arc<Tokenizer>, eos_token_ids: &[u32]) -> StructuredResult<TokEnv> {
    let unsupported = |detail: String| StructuredError::Tokenizer { detail };
    let json = serde_json::to_value(tokenizer.as_ref())
        .map_err(|e| unsupported(format!("cannot serialize the tokenizer: {e}")))?;
    let mut token_bytes = llguidance::token_bytes_from_tokenizer_json(&json)
        .map_err(|e| unsupported(e.to_string()))?;
    let vocab_size = tokenizer.get_vocab_size(true).max(token_bytes.len());
    token_bytes.resize(vocab_size, Vec::new());
    let Some((&eos, _)) = eos_token_ids.split_first() else {
        return Err(unsupported(
            "the model names no end-of-sequence token, so no grammar could end".into(),
        ));
    };
    if let Some(bad) = eos_token_ids.iter().find(|&&t| t as usize >= vocab_size) {
        return Err(unsupported(format!(
            "end-of-sequence token {bad} is outside the tokenizer's {vocab_size} tokens"
        )));
    }
    let info = TokRxInfo::new(vocab_size as u32, eos);
    let mut trie = TokTrie::from(&info, &token_bytes);
    if eos_token_ids.len() > 1 {
        trie = trie.with_eos_tokens(eos_token_ids);
    }
    Ok(Arc::new(TrieTokenizer { tokenizer, trie }))
}
