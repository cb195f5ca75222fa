//! The worker's side of the group token (see the coordinator's `workers::token`): a worker
//! started with `--worker-token` answers only calls that carry it in the gRPC metadata
//! `x-tpserve-worker-token`; others get `UNAUTHENTICATED` before any work is done. The
//! comparison takes the same time wherever the first difference is.

use tonic::service::Interceptor;
use tonic::{Request, Status};
use tpserve_proto::WORKER_TOKEN_METADATA;

/// Checks each call's token; `None` accepts every call.
#[derive(Clone, Default)]
pub struct TokenCheck(Option<Vec<u8>>);

impl TokenCheck {
    /// A check for `token`; `None` or empty: no check.
    pub fn new(token: Option<&str>) -> Self {
        Self(
            token
                .filter(|t| !t.is_empty())
                .map(|t| t.as_bytes().to_vec()),
        )
    }
}

/// `a == b` in time that depends only on their lengths.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else {
            return Ok(request);
        };
        let given = request.metadata().get(WORKER_TOKEN_METADATA);
        if given.is_some_and(|g| same(g.as_bytes(), expected)) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "this worker needs its group's token (the coordinator's --worker-token)",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(check: &TokenCheck, token: Option<&str>) -> Result<(), Status> {
        let mut request = Request::new(());
        if let Some(t) = token {
            request
                .metadata_mut()
                .insert(WORKER_TOKEN_METADATA, t.parse().unwrap());
        }
        check.clone().call(request).map(|_| ())
    }

    #[test]
    fn calls_without_the_right_token_are_refused_and_no_token_accepts_all() {
        let check = TokenCheck::new(Some("0123456789abcdef"));
        assert!(call(&check, Some("0123456789abcdef")).is_ok());
        let refused = call(&check, Some("0123456789abcdeX")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(call(&check, None).is_err());
        assert!(call(&TokenCheck::new(None), None).is_ok());
    }
}
