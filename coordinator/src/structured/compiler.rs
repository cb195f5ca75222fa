//! Compiles constraints into llguidance grammars against the served tokenizer, once per distinct
//! constraint: compiled grammars are kept under their text ([`Constraint::key`]), so a client
//! that sends the same schema with every request pays for it once (vLLM keeps a cache too).
//!
//! Compiling runs on tokio's blocking pool, never on the engine loop: a large schema can take
//! tens of milliseconds. The parser factory (the tokenizer's trie and its token-class slices)
//! is built on first use, so a server that never sees a constraint never pays for it.
//! Compiling also computes the grammar's first mask, which surfaces schemas that compile but
//! cannot be satisfied and warms the lexer caches every sequence of the grammar then shares.
//!
//! Memory: at most [`CACHE_CAPACITY`] grammars; the oldest one is dropped first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::{Matcher, ParserFactory};
use tokenizers::Tokenizer;

use super::constraint::Constraint;
use super::guide::Guide;
use super::tokenizer::token_env;
use crate::error::{StructuredError, StructuredResult};

/// Compiled grammars kept for reuse.
pub const CACHE_CAPACITY: usize = 256;

/// A compiled constraint: the grammar engine in its start state, cloned for each sequence.
pub struct Grammar {
    key: String,
    start: Matcher,
}

impl Grammar {
    /// A fresh guide for one sequence (the compiled grammar and its lexer caches are shared).
    pub fn start(&self) -> Guide {
        Guide::new(self.start.clone())
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("key", &self.key).finish()
    }
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

#[derive(Default)]
struct Cache {
    grammars: HashMap<String, Arc<Grammar>>,
    /// Keys in insertion order, oldest first.
    order: VecDeque<String>,
}

/// Compiles constraints for one tokenizer; shared by every request.
pub struct GrammarCompiler {
    tokenizer: Arc<Tokenizer>,
    eos_token_ids: Vec<u32>,
    factory: OnceLock<StructuredResult<ParserFactory>>,
    cache: Mutex<Cache>,
}

impl GrammarCompiler {
    /// A compiler for `tokenizer`, whose sequences end on `eos_token_ids` (the first is the one
    /// a complete grammar allows).
    pub fn new(tokenizer: Arc<Tokenizer>, eos_token_ids: Vec<u32>) -> Self {
        Self {
            tokenizer,
            eos_token_ids,
            factory: OnceLock::new(),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Compiles `constraint` on the blocking pool (or finds it compiled).
    pub async fn compile(
        self: &Arc<Self>,
        constraint: Constraint,
    ) -> StructuredResult<Arc<Grammar>> {
        if let Some(hit) = self.cached(&constraint.key()) {
            return Ok(hit);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.compile_blocking(&constraint))
            .await
            .map_err(|e| StructuredError::Compile {
                detail: format!("the grammar compiler failed: {e}"),
            })?
    }

    /// Compiles `constraint` on this thread (or finds it compiled).
    pub fn compile_blocking(&self, constraint: &Constraint) -> StructuredResult<Arc<Grammar>> {
        let key = constraint.key();
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let factory = self.factory()?;
        let compile_error = |e: anyhow::Error| StructuredError::Compile {
            detail: e.to_string(),
        };
        let parser = factory
            .create_parser(constraint.to_grammar())
            .map_err(compile_error)?;
        let mut start = Matcher::new(Ok(parser));
        start.compute_mask().map_err(compile_error)?;
        let grammar = Arc::new(Grammar {
            key: key.clone(),
            start,
        });
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if !cache.grammars.contains_key(&key) {
            if cache.order.len() >= CACHE_CAPACITY {
                if let Some(oldest) = cache.order.pop_front() {
                    cache.grammars.remove(&oldest);
                }
            }
            cache.order.push_back(key.clone());
            cache.grammars.insert(key, grammar.clone());
        }
        Ok(grammar)
    }

    fn cached(&self, key: &str) -> Option<Arc<Grammar>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.grammars.get(key).cloned()
    }

    fn factory(&self) -> StructuredResult<&ParserFactory> {
        self.factory
            .get_or_init(|| {
                let env = token_env(self.tokenizer.clone(), &self.eos_token_ids)?;
                let mut factory =
                    ParserFactory::new_simple(&env).map_err(|e| StructuredError::Tokenizer {
                        detail: e.to_string(),
                    })?;
                factory.quiet();
                Ok(factory)
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value};

    use super::*;
    use crate::structured::Advance;

    /// A byte-level BPE tokenizer whose tokens are the 256 single bytes (GPT-2's byte-to-char
    /// map) and `</s>` (id 256), with no merges.
    fn byte_tokenizer() -> Arc<Tokenizer> {
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let mut vocab = Map::new();
        let mut shifted = 256;
        for b in 0u32..256 {
            let c = if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                shifted += 1;
                char::from_u32(shifted - 1).unwrap()
            };
            vocab.insert(c.to_string(), Value::from(b));
        }
        let json = json!({
            "version": "1.0",
            "added_tokens": [{"id": 256, "content": "</s>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                              "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
        });
        Arc::new(Tokenizer::from_bytes(json.to_string()).unwrap())
    }

    fn allowed(mask: &[u32]) -> Vec<u32> {
        (0..mask.len() as u32 * 32)
            .filter(|&t| mask[t as usize / 32] & (1 << (t % 32)) != 0)
            .collect()
    }

    #[test]
    fn a_choice_allows_only_its_next_bytes_and_completes_after_the_last() {
        let compiler = GrammarCompiler::new(byte_tokenizer(), vec![256]);
        let choice = Constraint::Choice(vec!["yes".into(), "no".into()]);
        let grammar = compiler.compile_blocking(&choice).unwrap();
        let mut guide = grammar.start();
        assert_eq!(
            allowed(&guide.mask().unwrap()),
            vec![u32::from(b'n'), u32::from(b'y')]
        );
        assert_eq!(guide.advance(u32::from(b'y')).unwrap(), Advance::Continue);
        assert_eq!(allowed(&guide.mask().unwrap()), vec![u32::from(b'e')]);
        assert_eq!(guide.advance(u32::from(b'e')).unwrap(), Advance::Continue);
        assert_eq!(guide.advance(u32::from(b's')).unwrap(), Advance::Complete);
        // A second sequence of the same grammar starts afresh, from the cache.
        let again = compiler.compile_blocking(&choice).unwrap();
        assert!(Arc::ptr_eq(&grammar, &again));
        assert_eq!(allowed(&again.start().mask().unwrap()).len(), 2);
    }

    #[test]
    fn a_finished_json_value_allows_end_of_sequence_where_it_may_go_on() {
        let compiler = GrammarCompiler::new(byte_tokenizer(), vec![256]);
        let schema = Constraint::JsonSchema(json!({"type": "integer"}));
        let mut guide = compiler.compile_blocking(&schema).unwrap().start();
        assert_eq!(guide.advance(u32::from(b'4')).unwrap(), Advance::Continue);
        let next = allowed(&guide.mask().unwrap());
        assert!(
            next.contains(&256) && next.contains(&u32::from(b'2')),
            "{next:?}"
        );
        assert!(!next.contains(&u32::from(b'a')));
    }

    #[test]
    fn what_does_not_compile_is_a_compile_error_with_llguidances_words() {
        let compiler = GrammarCompiler::new(byte_tokenizer(), vec![256]);
        for bad in [
            Constraint::Regex("(unclosed".into()),
            Constraint::JsonSchema(json!({"type": "nonsense"})),
            Constraint::Grammar("start: undefined_rule".into()),
        ] {
            match compiler.compile_blocking(&bad) {
                Err(StructuredError::Compile { detail }) => assert!(!detail.is_empty()),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }
}
