//! One sequence's place in its grammar: which tokens may come next, and what a sampled token
//! does to it. The engine actor owns one per constrained sequence, advances it with each token
//! the workers return, and asks it for the next mask when it plans that sequence's next sample.
//!
//! Cost: a mask is one bit per vocabulary entry (6 KiB for a 49k vocabulary); llguidance
//! computes it by walking the token trie against the lexer's state, typically tens of
//! microseconds to a millisecond per token (see `docs/PERFORMANCE.md`).

use llguidance::Matcher;

use crate::error::{StructuredError, StructuredResult};

/// What a token did to the grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// The grammar goes on.
    Continue,
    /// The grammar is complete and allows nothing more: the sequence ends here.
    Complete,
}

/// A sequence's grammar state.
pub struct Guide {
    matcher: Matcher,
}

impl Guide {
    pub(super) fn new(matcher: Matcher) -> Self {
        Self { matcher }
    }

    /// The tokens allowed next, as a bitmask: token `t` is allowed when bit `t % 32` of word
    /// `t / 32` is set. Where the grammar may end, the end-of-sequence token is allowed.
    pub fn mask(&mut self) -> StructuredResult<Vec<u32>> {
        let mask = self.matcher.compute_mask().map_err(failed)?;
        Ok(mask.as_slice().to_vec())
    }

    /// Moves past `token`, which the last mask allowed.
    pub fn advance(&mut self, token: u32) -> StructuredResult<Advance> {
        self.matcher.consume_token(token).map_err(failed)?;
        Ok(if self.matcher.is_stopped() {
            Advance::Complete
        } else {
            Advance::Continue
        })
    }
}

fn failed(e: anyhow::Error) -> StructuredError {
    StructuredError::Match {
        detail: e.to_string(),
    }
}
