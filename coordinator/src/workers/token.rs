//! The worker group's shared token: the coordinator sends it with every RPC (gRPC metadata
//! `x-tpserve-worker-token`), and workers started with it refuse any caller without it, so a
//! process that can reach a worker's port still cannot drive it. Spawned workers get a fresh
//! random token per start through their environment; cluster workers and the coordinator share
//! one from `--worker-token` (a Kubernetes Secret in the Helm chart).

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tpserve_proto::WORKER_TOKEN_METADATA;

/// A token, or none (workers that accept anyone).
#[derive(Clone, Default)]
pub struct GroupToken(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for GroupToken {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "GroupToken(set)"
        } else {
            "GroupToken(none)"
        })
    }
}

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--worker-token must be 16 to 256 visible ASCII characters")]
pub struct BadToken;

impl GroupToken {
    /// `text` as a token.
    pub fn new(text: &str) -> Result<Self, BadToken> {
        let ok = (16..=256).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(BadToken);
        }
        text.parse().map(|v| Self(Some(v))).map_err(|_| BadToken)
    }

    /// A fresh random token (256 bits from two v4 uuids' random bits).
    pub fn random() -> Self {
        let text = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        Self::new(&text).expect("64 hex digits are a valid token")
    }

    /// The token's text, for a spawned worker's environment.
    pub fn text(&self) -> Option<&str> {
        self.0.as_ref().and_then(|v| v.to_str().ok())
    }
}

impl Interceptor for GroupToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert(WORKER_TOKEN_METADATA, token.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_spaced_tokens_are_refused_and_random_ones_differ() {
        assert!(GroupToken::new("short").is_err());
        assert!(GroupToken::new("has a space in the middle").is_err());
        assert!(GroupToken::new("0123456789abcdef").is_ok());
        assert_ne!(GroupToken::random().text(), GroupToken::random().text());
        assert_eq!(format!("{:?}", GroupToken::random()), "GroupToken(set)");
    }
}
