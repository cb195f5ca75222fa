//! Structured outputs: output constrained to a JSON schema, any JSON object, a regex, a choice
//! of strings or a Lark grammar, enforced token by token with llguidance.
//!
//! Flow: the API turns a request's `response_format`, `structured_outputs` or `guided_*` field
//! into a [`Constraint`]; the [`GrammarCompiler`] compiles it against the served tokenizer (off
//! the engine loop, cached by text) into a [`Grammar`]; the engine starts one [`Guide`] per
//! sequence, sends the workers the guide's allowed-token mask with each plan that samples the
//! sequence (the worker sets every other logit to -inf before temperature and the filters),
//! and advances the guide with each token that comes back. A guide whose grammar is complete
//! ends its sequence (`finish_reason: "stop"`).
//!
//! Async scheduling: the mask for a sequence's next token depends on its previous token, so a
//! constrained sequence is planned only when no token of it is in flight (the scheduler skips
//! it otherwise). It thus decodes every other step while two plans are in flight, and
//! sequences without a constraint in the same batch lose nothing.
//!
//! Other features (tool calling's `tool_choice: required` or a named function) enforce their
//! output by building a [`Constraint::JsonSchema`] and compiling it here.

mod compiler;
mod constraint;
mod guide;
mod tokenizer;

pub use compiler::{Grammar, GrammarCompiler, CACHE_CAPACITY};
pub use constraint::Constraint;
pub use guide::{Advance, Guide};
