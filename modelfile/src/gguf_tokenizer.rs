//! A `tokenizers::Tokenizer` rebuilt from GGUF metadata, meant to give the same ids as the
//! model's Hugging Face `tokenizer.json`.
//!
//! Supported `tokenizer.ggml.model`s: `gpt2` (byte-level BPE; the pre-tokenizer is chosen by
//! `tokenizer.ggml.pre`, see [`pre_tokenizer_for`]) and `llama` (SentencePiece BPE with byte
//! fallback, merges derived from the scores as transformers does). Tokens typed control (3)
//! become special added tokens and user-defined (4) plain added tokens, so both always stay one
//! id and are never split. BOS/EOS are added only when `tokenizer.ggml.add_bos_token` /
//! `add_eos_token` say so. Anything else is [`Error::Tokenizer`] naming what is unsupported.
//! Costs: building the BPE model from the vocabulary and merges (tens of ms for 49k tokens).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence, NFC,
};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::sequence::Sequence as ProcessorSequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};
use crate::gguf::{meta_array, meta_bool, meta_str, meta_strings, meta_u32, value_u64};

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_UNKNOWN: u64 = 2;
const TOKEN_TYPE_CONTROL: u64 = 3;
const TOKEN_TYPE_USER_DEFINED: u64 = 4;

/// Llama 3's split regex (its tokenizer.json `Split` pattern).
const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (its tokenizer.json `Split` pattern).
const REGEX_QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn tok_err(detail: impl Into<String>) -> Error {
    Error::Tokenizer {
        detail: detail.into(),
    }
}

/// The string of the token whose id is stored under `key` (e.g. `tokenizer.ggml.bos_token_id`),
/// if the key and the token exist.
pub(crate) fn token_string(md: &HashMap<String, Value>, key: &str) -> Option<String> {
    let id = meta_u32(md, key).ok()?;
    let tokens = meta_array(md, "tokenizer.ggml.tokens").ok()?;
    match tokens.get(id as usize)? {
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// How a byte-level model splits text before BPE, after Hugging Face's tokenizer.json of the
/// model family llama.cpp's `tokenizer.ggml.pre` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreFamily {
    /// GPT-2: `ByteLevel(use_regex=true)`.
    Gpt2,
    /// StarCoder / SmolLM: `Digits(individual)` then `ByteLevel(use_regex=true)`.
    StarCoder,
    /// Llama 3: the Llama 3 `Split` then `ByteLevel(use_regex=false)`; `ignore_merges`.
    Llama3,
    /// Qwen2: NFC, the Qwen2 `Split` then `ByteLevel(use_regex=false)`.
    Qwen2,
}

fn pre_family(pre: &str) -> Option<PreFamily> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" | "phi-2" | "roberta-bpe" => PreFamily::Gpt2,
        "smollm" | "starcoder" | "refact" | "codeshell" => PreFamily::StarCoder,
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "pixtral" => {
            PreFamily::Llama3
        }
        "qwen2" | "deepseek-r1-qwen" => PreFamily::Qwen2,
        _ => return None,
    })
}

fn split(regex: &str) -> Result<PreTokenizerWrapper> {
    Split::new(
        SplitPattern::Regex(regex.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map(Into::into)
    .map_err(|e| tok_err(format!("pre-tokenizer regex: {e}")))
}

/// The pre-tokenizer Hugging Face uses for the family named by `tokenizer.ggml.pre`.
fn pre_tokenizer_for(family: PreFamily) -> Result<PreTokenizerWrapper> {
    Ok(match family {
        PreFamily::Gpt2 => ByteLevel::new(false, true, true).into(),
        PreFamily::StarCoder => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        PreFamily::Llama3 => PreSequence::new(vec![
            split(REGEX_LLAMA3)?,
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        PreFamily::Qwen2 => PreSequence::new(vec![
            split(REGEX_QWEN2)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
    })
}

/// Builds the tokenizer a GGUF file's metadata describes.
pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Tokenizer> {
    let model = meta_str(md, "tokenizer.ggml.model").map_err(|e| tok_err(e.to_string()))?;
    let tokens = meta_strings(md, "tokenizer.ggml.tokens").map_err(|e| tok_err(e.to_string()))?;
    let types: Vec<u64> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(items)) => items.iter().map(|v| value_u64(v).unwrap_or(1)).collect(),
        _ => Vec::new(),
    };
    let flag = |key: &str, default: bool| {
        if md.contains_key(key) {
            meta_bool(md, key).map_err(|e| tok_err(e.to_string()))
        } else {
            Ok(default)
        }
    };
    let mut tokenizer = match model {
        "gpt2" => byte_level_bpe(md, &tokens)?,
        "llama" => sentencepiece_bpe(
            md,
            &tokens,
            &types,
            flag("tokenizer.ggml.add_space_prefix", true)?,
        )?,
        other => {
            return Err(tok_err(format!(
                "tokenizer.ggml.model `{other}` is not supported (supported: gpt2, llama)"
            )))
        }
    };

    // Control tokens are special (skipped by `decode(.., skip_special_tokens=true)`),
    // user-defined ones are not, as in transformers' GGUF conversion; both are matched whole.
    let mut specials = Vec::new();
    let mut plain = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id).copied() {
            Some(TOKEN_TYPE_CONTROL) => {
                specials.push(AddedToken::from(token.to_string(), true).normalized(false))
            }
            Some(TOKEN_TYPE_USER_DEFINED) => {
                plain.push(AddedToken::from(token.to_string(), false).normalized(false))
            }
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| tok_err(format!("adding control tokens: {e}")))?;
    tokenizer
        .add_tokens(plain)
        .map_err(|e| tok_err(format!("adding user-defined tokens: {e}")))?;

    let add_bos = flag("tokenizer.ggml.add_bos_token", model == "llama")?;
    let add_eos = flag("tokenizer.ggml.add_eos_token", false)?;
    let template = template_processor(md, add_bos, add_eos)?;
    let byte_level_pp: Option<PostProcessorWrapper> =
        (model == "gpt2").then(|| ByteLevel::new(true, false, true).into());
    let post: Option<PostProcessorWrapper> = match (byte_level_pp, template) {
        (Some(a), Some(b)) => Some(ProcessorSequence::new(vec![a, b]).into()),
        (a, b) => a.or(b),
    };
    tokenizer.with_post_processor(post);
    Ok(tokenizer)
}

fn byte_level_bpe(md: &HashMap<String, Value>, tokens: &[&str]) -> Result<Tokenizer> {
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(_) => meta_str(md, "tokenizer.ggml.pre").map_err(|e| tok_err(e.to_string()))?,
        None => "default",
    };
    let family = pre_family(pre).ok_or_else(|| {
        tok_err(format!(
            "tokenizer.ggml.pre `{pre}` is not supported (supported: gpt2, smollm, starcoder, llama-bpe, qwen2 and aliases)"
        ))
    })?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges = meta_strings(md, "tokenizer.ggml.merges")
        .map_err(|e| tok_err(e.to_string()))?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| tok_err(format!("merge `{m}` is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(family == PreFamily::Llama3)
        .build()
        .map_err(|e| tok_err(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    if family == PreFamily::Qwen2 {
        tokenizer
            .with_normalizer(Some(NFC))
            .map_err(|e| tok_err(e.to_string()))?;
    }
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer_for(family)?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

/// SentencePiece BPE (Llama 1/2, Mistral): what transformers' `LlamaTokenizerFast` builds.
fn sentencepiece_bpe(
    md: &HashMap<String, Value>,
    tokens: &[&str],
    types: &[u64],
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::F32(x) => Ok(*x),
                other => Err(tok_err(format!(
                    "tokenizer.ggml.scores holds a {:?}",
                    other.value_type()
                ))),
            })
            .collect::<Result<_>>()?,
        _ => {
            return Err(tok_err(
                "tokenizer.ggml.scores is missing (needed for a llama tokenizer)",
            ))
        }
    };
    if scores.len() != tokens.len() {
        return Err(tok_err(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i as u32))
        .collect();
    let merges = match meta_strings(md, "tokenizer.ggml.merges") {
        Ok(list) => list
            .into_iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        Err(_) => merges_from_scores(tokens, &scores, &vocab),
    };
    let unk = match meta_u32(md, "tokenizer.ggml.unknown_token_id") {
        Ok(id) => tokens.get(id as usize).map(|s| s.to_string()),
        Err(_) => types
            .iter()
            .position(|&t| t == TOKEN_TYPE_UNKNOWN)
            .and_then(|i| tokens.get(i))
            .map(|s| s.to_string()),
    };
    let bpe_vocab: Vocab = vocab.iter().map(|(t, i)| (t.to_string(), *i)).collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| tok_err(format!("building the BPE model: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "\u{2581}").map_err(|e| tok_err(e.to_string()))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        NormalizerSequence::new(vec![
            Prepend::new("\u{2581}".to_string()).into(),
            replace.into(),
        ])
        .into()
    } else {
        replace.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| tok_err(e.to_string()))?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| tok_err(e.to_string()))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tokenizer)
}

/// transformers' `generate_merges(vocab, vocab_scores)`: every split of a token into two vocab
/// pieces is a merge, ranked by the merged token's score (best first), then by the pieces'
/// lengths (longest first); ties keep vocabulary order.
fn merges_from_scores(
    tokens: &[&str],
    scores: &[f32],
    vocab: &HashMap<&str, u32>,
) -> Vec<(String, String)> {
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(&str, &str, f32)> = token
            .char_indices()
            .skip(1)
            .map(|(at, _)| token.split_at(at))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges
        .into_iter()
        .map(|(l, r, _)| (l.to_string(), r.to_string()))
        .collect()
}

fn template_processor(
    md: &HashMap<String, Value>,
    add_bos: bool,
    add_eos: bool,
) -> Result<Option<PostProcessorWrapper>> {
    if !add_bos && !add_eos {
        return Ok(None);
    }
    let special = |key: &str| -> Result<(String, u32)> {
        let id = meta_u32(md, key).map_err(|e| tok_err(e.to_string()))?;
        let token = token_string(md, key)
            .ok_or_else(|| tok_err(format!("{key} {id} is not a token of the vocabulary")))?;
        Ok((token, id))
    };
    let bos = add_bos
        .then(|| special("tokenizer.ggml.bos_token_id"))
        .transpose()?;
    let eos = add_eos
        .then(|| special("tokenizer.ggml.eos_token_id"))
        .transpose()?;
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    if let Some((t, id)) = &bos {
        single.push(format!("{t}:0"));
        pair.push(format!("{t}:0"));
        specials.push((t.clone(), *id));
    }
    single.push("$A:0".to_string());
    pair.push("$A:0".to_string());
    if let Some((t, id)) = &eos {
        single.push(format!("{t}:0"));
        pair.push(format!("{t}:0"));
        if !specials.iter().any(|(s, _)| s == t) {
            specials.push((t.clone(), *id));
        }
    }
    if let Some((t, _)) = &bos {
        pair.push(format!("{t}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some((t, _)) = &eos {
        pair.push(format!("{t}:1"));
    }
    let processor = TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(|e| tok_err(format!("BOS/EOS template: {e}")))?
        .special_tokens(specials)
        .build()
        .map_err(|e| tok_err(format!("BOS/EOS template: {e}")))?;
    Ok(Some(processor.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn md(entries: Vec<(&str, Value)>) -> HashMap<String, Value> {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    /// A byte-level vocabulary over "hello world" plus two control tokens.
    fn tiny_gpt2(pre: &str, add_bos: bool) -> HashMap<String, Value> {
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "h",
            "e",
            "l",
            "o",
            "w",
            "r",
            "d",
            "Ġ",
            "1",
            "2",
            "he",
            "ll",
            "hell",
            "hello",
            "Ġw",
            "Ġwor",
            "or",
            "Ġworld",
            "ld",
            "12",
        ];
        let mut types = vec![Value::I32(3), Value::I32(3)];
        types.extend(std::iter::repeat_n(Value::I32(1), tokens.len() - 2));
        md(vec![
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String(pre.into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            ("tokenizer.ggml.token_type", Value::Array(types)),
            (
                "tokenizer.ggml.merges",
                strings(&[
                    "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2",
                ]),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)),
        ])
    }

    #[test]
    fn byte_level_bpe_applies_merges_and_keeps_control_tokens_whole() {
        let tok = from_gguf_metadata(&tiny_gpt2("gpt2", false)).unwrap();
        let enc = tok.encode("<|im_start|>hello world", true).unwrap();
        assert_eq!(enc.get_ids(), &[1, 15, 19]);
        assert_eq!(
            tok.decode(enc.get_ids(), false).unwrap(),
            "<|im_start|>hello world"
        );
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hello world");
    }

    #[test]
    fn smollm_pre_tokenizer_splits_digits_and_gpt2_does_not() {
        let smol = from_gguf_metadata(&tiny_gpt2("smollm", false)).unwrap();
        assert_eq!(smol.encode("12", false).unwrap().get_ids(), &[10, 11]);
        let gpt2 = from_gguf_metadata(&tiny_gpt2("gpt2", false)).unwrap();
        assert_eq!(gpt2.encode("12", false).unwrap().get_ids(), &[21]);
    }

    #[test]
    fn bos_is_added_only_when_the_file_says_so() {
        let tok = from_gguf_metadata(&tiny_gpt2("llama-bpe", true)).unwrap();
        assert_eq!(tok.encode("hello", true).unwrap().get_ids(), &[1, 15]);
        assert_eq!(tok.encode("hello", false).unwrap().get_ids(), &[15]);
        let tok = from_gguf_metadata(&tiny_gpt2("llama-bpe", false)).unwrap();
        assert_eq!(tok.encode("hello", true).unwrap().get_ids(), &[15]);
    }

    #[test]
    fn unsupported_models_and_pre_tokenizers_are_named() {
        let mut m = tiny_gpt2("gpt2", false);
        m.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
        match from_gguf_metadata(&m) {
            Err(Error::Tokenizer { detail }) => assert!(detail.contains("`bert`"), "{detail}"),
            other => panic!("unexpected {:?}", other.map(|_| ())),
        }
        match from_gguf_metadata(&tiny_gpt2("chatglm-bpe", false)) {
            Err(Error::Tokenizer { detail }) => {
                assert!(detail.contains("`chatglm-bpe`"), "{detail}")
            }
            other => panic!("unexpected {:?}", other.map(|_| ())),
        }
        let mut m = tiny_gpt2("gpt2", false);
        m.remove("tokenizer.ggml.tokens");
        assert!(matches!(
            from_gguf_metadata(&m),
            Err(Error::Tokenizer { .. })
        ));
    }

    /// A SentencePiece vocabulary: <unk>, <s>, </s>, two byte tokens, pieces with scores.
    fn tiny_llama() -> HashMap<String, Value> {
        let tokens = [
            "<unk>", "<s>", "</s>", "<0x21>", "<0x69>", "▁", "h", "e", "l", "o", "▁h", "ll", "▁he",
            "llo", "▁hello",
        ];
        let types = [2, 3, 3, 6, 6, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        let scores = [
            0.0, 0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0, -10.0,
        ];
        md(vec![
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", strings(&tokens)),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.iter().map(|&s| Value::F32(s)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ])
    }

    #[test]
    fn sentencepiece_vocab_gets_a_space_prefix_bos_and_byte_fallback() {
        let tok = from_gguf_metadata(&tiny_llama()).unwrap();
        let enc = tok.encode("hello", true).unwrap();
        assert_eq!(enc.get_ids(), &[1, 14]);
        // 'i' is not a piece: it falls back to its byte token; '!' too; 'x' has none: <unk>.
        let enc = tok.encode("hi!x", false).unwrap();
        assert_eq!(enc.get_ids(), &[10, 4, 3, 0]);
        assert_eq!(tok.decode(&[1, 14, 10, 4, 3], true).unwrap(), "hello hi!");
    }

    #[test]
    fn merges_are_derived_from_scores_best_first() {
        let tokens = ["a", "b", "c", "ab", "bc", "abc"];
        let scores = [0.0, 0.0, 0.0, -1.0, -0.5, -2.0];
        let vocab: HashMap<&str, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, i as u32))
            .collect();
        let merges = merges_from_scores(&tokens, &scores, &vocab);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        // bc (-0.5) before ab (-1.0) before abc (-2.0); abc's splits ordered by piece length
        // descending: "ab"+"c" and "a"+"bc" tie on score, the longer left piece goes first.
        assert_eq!(
            pairs,
            vec![("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
        );
    }
}
