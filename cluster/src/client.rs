//! A small etcd v3 client over etcd's JSON gRPC gateway (`POST /v3/...` on the client port).
//!
//! Why not the `etcd-client` crate: its build script needs a system `protoc`; this needs nothing
//! but reqwest. The gateway maps the protobuf messages to JSON: `bytes` fields (keys, values) are
//! base64, int64 fields are JSON strings (we accept numbers too), and fields holding their default
//! value are omitted (a PUT watch event has no `"type"`, an expired lease's keepalive answer has no
//! `"TTL"`). Streaming RPCs (`/v3/watch`, `/v3/lease/keepalive`) answer with a stream of JSON
//! objects, one per line, each `{"result": {...}}` or `{"error": {"grpc_code": .., "message": ..}}`;
//! their request body is a single message, so a keepalive call is one refresh and a watch cannot
//! be modified after it is created. Checked against etcd 3.4.23 and 3.5.1.
//!
//! Endpoints are tried in order starting from the last one that answered; a request moves to the
//! next endpoint when one cannot be reached or answers gRPC `Unavailable`.
//!
//! A secured etcd ([`EtcdSecurity`]): `https://` endpoints are reached over rustls, trusting only
//! the configured CA and presenting the client certificate when there is one; with a user and
//! password every request carries a token from `/v3/auth/authenticate` (the gateway's
//! `Authorization` header), fetched on first use and again when etcd says it has expired. Unary calls time out
//! after [`REQUEST_TIMEOUT`]; a watch has no overall timeout (callers watch for silence).
//! Costs: one HTTP/1.1 request per call over pooled connections; no background tasks.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::error::{Error, Op, Result};
use crate::security::EtcdSecurity;
use crate::wire::{
    decode_error, next_message, stream_result, AuthenticateResponse, DeleteResponse, GrantResponse,
    HeaderOnly, KeepAliveResponse, RangeResponse, UnaryError, WatchResponse,
};

/// How long to wait for a TCP connection to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a unary call (and a watch's creation) may take on one endpoint.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// gRPC status codes that etcd's gateway reports and that we act on.
const GRPC_NOT_FOUND: i32 = 5;
const GRPC_FAILED_PRECONDITION: i32 = 9;
const GRPC_UNAVAILABLE: i32 = 14;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// An etcd lease id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// One key as etcd stores it (key and value must be UTF-8 for this crate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Revision of the write that created this key (changes after a delete and re-create).
    pub create_revision: i64,
    /// Revision of the last write to this key.
    pub mod_revision: i64,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A change under a watched prefix. `revision` is the etcd revision of the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: String,
        revision: i64,
    },
    Delete {
        key: String,
        revision: i64,
    },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Put { revision, .. } | WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// The events of one watch. It never ends by itself: it ends after yielding an error
/// ([`Error::WatchBroken`] or [`Error::WatchCanceled`]); the caller then re-lists and watches again.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

/// A cheap-to-clone handle to an etcd cluster.
#[derive(Clone)]
pub struct EtcdClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// Index of the endpoint that answered last; calls start there.
    preferred: AtomicUsize,
    /// Password authentication, when configured.
    auth: Option<Auth>,
}

/// A user's credentials and the token they were last exchanged for.
struct Auth {
    user: String,
    password: String,
    /// `None` until the first request, and after etcd reports the token expired. The lock is held
    /// while authenticating, so concurrent callers wait for one exchange instead of each making one.
    token: tokio::sync::Mutex<Option<Token>>,
}

/// What authenticating gave.
#[derive(Clone)]
enum Token {
    /// Send this with every request.
    Some(String),
    /// etcd has authentication off: requests go without a token.
    NotNeeded,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.inner.endpoints)
            .finish()
    }
}

impl EtcdClient {
    /// Endpoints like `http://10.0.0.5:2379`, `https://etcd:2379` or `10.0.0.5:2379` (`http://`
    /// is added); an entry may hold several, comma-separated. TLS and authentication come from the
    /// `TPSERVE_ETCD_*` variables ([`EtcdSecurity::from_env`]). Connects lazily.
    pub fn new(endpoints: &[String]) -> Result<Self> {
        Self::with_security(endpoints, &EtcdSecurity::from_env())
    }

    /// Like [`EtcdClient::new`], with the TLS and authentication settings given.
    pub fn with_security(endpoints: &[String], security: &EtcdSecurity) -> Result<Self> {
        let mut normalized = Vec::new();
        for endpoint in endpoints.iter().flat_map(|e| e.split(',')) {
            let endpoint = endpoint.trim();
            if endpoint.is_empty() {
                continue;
            }
            normalized.push(normalize_endpoint(endpoint)?);
        }
        if normalized.is_empty() {
            return Err(Error::NoEndpoints);
        }
        security.validate(&normalized)?;
        let builder =
            security.configure(reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT))?;
        let http = builder.build().map_err(|e| Error::Config {
            endpoint: normalized.join(","),
            reason: error_chain(&e),
        })?;
        let auth = security.password_auth().map(|(user, password)| Auth {
            user: user.to_string(),
            password: password.to_string(),
            token: tokio::sync::Mutex::new(None),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                endpoints: normalized,
                preferred: AtomicUsize::new(0),
                auth,
            }),
        })
    }

    /// The normalized endpoints, in the order given.
    pub fn endpoints(&self) -> &[String] {
        &self.inner.endpoints
    }

    /// Grants a lease of `ttl_secs` seconds. etcd may raise a short TTL to its minimum (about
    /// 1.5 x the election timeout, i.e. 2 s with default settings).
    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<LeaseId> {
        let op = Op::Grant;
        let resp: GrantResponse = self
            .unary(
                op,
                "/v3/lease/grant",
                &json!({ "TTL": ttl_secs.to_string() }),
            )
            .await?;
        if !resp.error.is_empty() {
            return Err(Error::Rpc {
                op,
                code: 0,
                message: resp.error,
            });
        }
        if resp.id == 0 {
            return Err(decode_error(op, "grant answer has no lease ID"));
        }
        Ok(LeaseId(resp.id))
    }

    /// Refreshes the lease once; returns its TTL in seconds. [`Error::LeaseExpired`] when the lease
    /// no longer exists (etcd answers such a keepalive without a TTL rather than with an error).
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<i64> {
        let op = Op::KeepAlive;
        let body = self
            .request(
                op,
                "/v3/lease/keepalive",
                &json!({ "ID": lease.0.to_string() }),
            )
            .await
            .map_err(|e| lease_not_found(e, lease))?;
        let mut buf = body;
        let resp: KeepAliveResponse = match next_message(&mut buf) {
            Some(msg) => stream_result(op, msg)?,
            None => return Err(decode_error(op, "empty keepalive answer")),
        };
        if resp.ttl <= 0 {
            return Err(Error::LeaseExpired { lease });
        }
        Ok(resp.ttl)
    }

    /// Revokes the lease, deleting every key attached to it at once.
    /// [`Error::LeaseExpired`] if it was already gone.
    pub async fn revoke(&self, lease: LeaseId) -> Result<()> {
        let _: HeaderOnly = self
            .unary(
                Op::Revoke,
                "/v3/lease/revoke",
                &json!({ "ID": lease.0.to_string() }),
            )
            .await
            .map_err(|e| lease_not_found(e, lease))?;
        Ok(())
    }

    /// Writes `key = value`, attached to `lease` if given (the key is deleted when the lease
    /// ends). Returns the revision of the write. [`Error::LeaseExpired`] if the lease is gone.
    pub async fn put(&self, key: &str, value: &str, lease: Option<LeaseId>) -> Result<i64> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(lease) = lease {
            body["lease"] = Value::String(lease.0.to_string());
        }
        let resp: HeaderOnly = self
            .unary(Op::Put, "/v3/kv/put", &body)
            .await
            .map_err(|e| match lease {
                Some(lease) => lease_not_found(e, lease),
                None => e,
            })?;
        Ok(resp.header.revision)
    }

    /// All keys under `prefix` with their values, sorted by key, and the store revision they were
    /// read at (watch from `revision + 1` to see every later change).
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<(String, String)>, i64)> {
        let (kvs, revision) = self.get_prefix_kvs(prefix).await?;
        Ok((
            kvs.into_iter().map(|kv| (kv.key, kv.value)).collect(),
            revision,
        ))
    }

    /// Like [`EtcdClient::get_prefix`], with each key's revisions and lease.
    pub async fn get_prefix_kvs(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let op = Op::Range;
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix.as_bytes())),
        });
        let resp: RangeResponse = self.unary(op, "/v3/kv/range", &body).await?;
        let kvs = resp
            .kvs
            .into_iter()
            .map(|kv| kv.decode(op))
            .collect::<Result<Vec<_>>>()?;
        Ok((kvs, resp.header.revision))
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64> {
        let resp: DeleteResponse = self
            .unary(
                Op::Delete,
                "/v3/kv/deleterange",
                &json!({ "key": B64.encode(key) }),
            )
            .await?;
        Ok(resp.deleted)
    }

    /// Watches every key under `prefix`, starting at `start_revision` (0: from now). Returns once
    /// etcd has confirmed the watch, so events written after this returns are never missed.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        match self.try_watch(prefix, start_revision).await {
            // etcd refuses a watch with an expired token as "permission denied"; one fresh
            // token tells the two apart.
            Err(Error::WatchCanceled { .. }) if self.inner.auth.is_some() => {
                self.forget_token().await;
                self.try_watch(prefix, start_revision).await
            }
            other => other,
        }
    }

    async fn try_watch(&self, prefix: &str, start_revision: i64) -> Result<WatchStream> {
        let op = Op::Watch;
        let body = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix.as_bytes())),
            "start_revision": start_revision.to_string(),
        }});
        let token = self.token().await?;
        let n = self.inner.endpoints.len();
        let first = self.inner.preferred.load(Ordering::Relaxed);
        let mut last_error = String::new();
        for attempt in 0..=n {
            let idx = (first + attempt) % n;
            let endpoint = &self.inner.endpoints[idx];
            let mut post = self.inner.http.post(format!("{endpoint}/v3/watch"));
            if let Some(token) = &token {
                post = post.header(reqwest::header::AUTHORIZATION, token);
            }
            let opened =
                tokio::time::timeout(REQUEST_TIMEOUT, open_watch(post, &body, prefix)).await;
            match opened {
                Ok(Ok(stream)) => {
                    self.inner.preferred.store(idx, Ordering::Relaxed);
                    return Ok(stream);
                }
                Ok(Err(WatchOpenError::Transport(e))) => last_error = format!("{endpoint}: {e}"),
                Ok(Err(WatchOpenError::Fatal(e))) => return Err(e),
                Err(_) => {
                    last_error = format!("{endpoint}: watch not created within {REQUEST_TIMEOUT:?}")
                }
            }
        }
        Err(Error::Connect {
            op,
            endpoints: self.inner.endpoints.join(","),
            last_error,
        })
    }

    /// POSTs `body` and decodes a unary answer.
    async fn unary<T: DeserializeOwned>(&self, op: Op, path: &str, body: &Value) -> Result<T> {
        let bytes = self.request(op, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| decode_error(op, e))
    }

    /// [`EtcdClient::send`] with the token, when authenticating; once more with a fresh token when
    /// etcd says the token is no longer valid (tokens expire: 5 minutes unused by default).
    async fn request(&self, op: Op, path: &str, body: &Value) -> Result<Vec<u8>> {
        let token = self.token().await?;
        match self.send(op, path, body, token.as_deref()).await {
            Err(Error::Rpc { code, .. }) if code == GRPC_UNAUTHENTICATED && token.is_some() => {
                self.forget_token().await;
                let token = self.token().await?;
                self.send(op, path, body, token.as_deref()).await
            }
            other => other,
        }
    }

    /// The token to send, authenticating first when there is none yet; `None` without password
    /// authentication, or when etcd has authentication off.
    async fn token(&self) -> Result<Option<String>> {
        let Some(auth) = &self.inner.auth else {
            return Ok(None);
        };
        let mut token = auth.token.lock().await;
        if token.is_none() {
            *token = Some(self.authenticate(auth).await?);
        }
        Ok(match token.as_ref() {
            Some(Token::Some(t)) => Some(t.clone()),
            _ => None,
        })
    }

    async fn forget_token(&self) {
        if let Some(auth) = &self.inner.auth {
            *auth.token.lock().await = None;
        }
    }

    /// Exchanges the user's password for a token.
    async fn authenticate(&self, auth: &Auth) -> Result<Token> {
        let op = Op::Authenticate;
        let body = json!({ "name": auth.user, "password": auth.password });
        let bytes = match self.send(op, "/v3/auth/authenticate", &body, None).await {
            Ok(bytes) => bytes,
            Err(Error::Rpc { code, message, .. })
                if code == GRPC_FAILED_PRECONDITION && message.contains("not enabled") =>
            {
                tracing::warn!(
                    user = %auth.user,
                    "etcd has authentication off: requests go without credentials"
                );
                return Ok(Token::NotNeeded);
            }
            Err(e) => return Err(e),
        };
        let resp: AuthenticateResponse =
            serde_json::from_slice(&bytes).map_err(|e| decode_error(op, e))?;
        if resp.token.is_empty() {
            return Err(decode_error(op, "authenticate answer has no token"));
        }
        tracing::debug!(user = %auth.user, "authenticated to etcd");
        Ok(Token::Some(resp.token))
    }

    /// POSTs `body` to the first endpoint that answers (each endpoint once, the first twice so a
    /// single endpoint gets one retry over a fresh connection); maps an HTTP error to `Rpc`.
    async fn send(&self, op: Op, path: &str, body: &Value, token: Option<&str>) -> Result<Vec<u8>> {
        let n = self.inner.endpoints.len();
        let first = self.inner.preferred.load(Ordering::Relaxed);
        let mut last_error = String::new();
        for attempt in 0..=n {
            let idx = (first + attempt) % n;
            let endpoint = &self.inner.endpoints[idx];
            let mut post = self
                .inner
                .http
                .post(format!("{endpoint}{path}"))
                .json(body)
                .timeout(REQUEST_TIMEOUT);
            if let Some(token) = token {
                post = post.header(reqwest::header::AUTHORIZATION, token);
            }
            let resp = match post.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    last_error = format!("{endpoint}: {}", error_chain(&e));
                    continue;
                }
            };
            let status = resp.status();
            let bytes = match resp.bytes().await {
                Ok(bytes) => bytes,
                Err(e) => {
                    last_error = format!("{endpoint}: {}", error_chain(&e));
                    continue;
                }
            };
            if status.is_success() {
                self.inner.preferred.store(idx, Ordering::Relaxed);
                return Ok(bytes.to_vec());
            }
            let (code, message) = match serde_json::from_slice::<UnaryError>(&bytes) {
                Ok(e) => (
                    e.code,
                    if e.message.is_empty() {
                        e.error
                    } else {
                        e.message
                    },
                ),
                Err(_) => (
                    -1,
                    format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)),
                ),
            };
            if code == GRPC_UNAVAILABLE {
                // e.g. "etcdserver: no leader": another member may do better.
                last_error = format!("{endpoint}: {message}");
                continue;
            }
            self.inner.preferred.store(idx, Ordering::Relaxed);
            return Err(Error::Rpc { op, code, message });
        }
        Err(Error::Connect {
            op,
            endpoints: self.inner.endpoints.join(","),
            last_error,
        })
    }
}

enum WatchOpenError {
    /// Try the next endpoint.
    Transport(String),
    /// etcd refused the watch itself.
    Fatal(Error),
}

/// Sends the create request (`post`, to one endpoint's `/v3/watch`) and waits for etcd's
/// `created` answer.
async fn open_watch(
    post: reqwest::RequestBuilder,
    body: &Value,
    prefix: &str,
) -> Result<WatchStream, WatchOpenError> {
    let op = Op::Watch;
    let resp = post
        .json(body)
        .send()
        .await
        .map_err(|e| WatchOpenError::Transport(error_chain(&e)))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return Err(WatchOpenError::Transport(format!("HTTP {status}: {text}")));
    }
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    // The first message confirms the watch (`created: true`).
    loop {
        if let Some(msg) = next_message(&mut buf) {
            let resp: WatchResponse = match stream_result(op, msg) {
                Ok(resp) => resp,
                Err(Error::Rpc { code, message, .. }) if code == GRPC_UNAVAILABLE => {
                    return Err(WatchOpenError::Transport(message))
                }
                Err(e) => return Err(WatchOpenError::Fatal(e)),
            };
            if resp.canceled {
                return Err(WatchOpenError::Fatal(canceled(prefix, &resp)));
            }
            if resp.created {
                break;
            }
            return Err(WatchOpenError::Fatal(decode_error(
                op,
                "first watch answer is not `created`",
            )));
        }
        match body.next().await {
            Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
            Some(Err(e)) => return Err(WatchOpenError::Transport(error_chain(&e))),
            None => {
                return Err(WatchOpenError::Transport(
                    "stream ended before the watch was created".into(),
                ))
            }
        }
    }
    let prefix = prefix.to_string();
    Ok(Box::pin(async_stream::stream! {
        loop {
            while let Some(msg) = next_message(&mut buf) {
                let mut resp: WatchResponse = match stream_result(op, msg) {
                    Ok(resp) => resp,
                    Err(Error::Rpc { code, message, .. }) => {
                        yield Err(Error::WatchBroken {
                            prefix: prefix.clone(),
                            detail: format!("{message} (grpc code {code})"),
                        });
                        return;
                    }
                    Err(e) => {
                        yield Err(e);
                        return;
                    }
                };
                for event in std::mem::take(&mut resp.events) {
                    yield event.decode(op);
                }
                if resp.canceled {
                    yield Err(canceled(&prefix, &resp));
                    return;
                }
            }
            match body.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    yield Err(Error::WatchBroken { prefix: prefix.clone(), detail: error_chain(&e) });
                    return;
                }
                None => {
                    yield Err(Error::WatchBroken {
                        prefix: prefix.clone(),
                        detail: "stream ended".into(),
                    });
                    return;
                }
            }
        }
    }))
}

fn canceled(prefix: &str, resp: &WatchResponse) -> Error {
    Error::WatchCanceled {
        prefix: prefix.to_string(),
        compact_revision: resp.compact_revision,
        reason: resp.cancel_reason.clone(),
    }
}

/// `http://host:port` or `https://host:port` without a trailing slash.
fn normalize_endpoint(endpoint: &str) -> Result<String> {
    let url = if endpoint.contains("://") {
        if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
            return Err(Error::Config {
                endpoint: endpoint.to_string(),
                reason: "only http:// and https:// endpoints are supported".into(),
            });
        }
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    };
    Ok(url.trim_end_matches('/').to_string())
}

/// The smallest key greater than every key starting with `prefix` (etcd's `range_end` for a
/// prefix query); `"\0"` (all keys) if the prefix is empty or all 0xff.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// etcd reports a missing lease as gRPC NotFound ("requested lease not found").
fn lease_not_found(e: Error, lease: LeaseId) -> Error {
    match e {
        Error::Rpc {
            code, ref message, ..
        } if code == GRPC_NOT_FOUND && message.contains("lease not found") => {
            Error::LeaseExpired { lease }
        }
        e => e,
    }
}

/// An error and its sources on one line (reqwest's own message omits the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte_below_0xff() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_get_http_and_lose_trailing_slashes() {
        let plain = EtcdSecurity::default();
        let c =
            EtcdClient::with_security(&["127.0.0.1:2379, http://h:1/".into(), "".into()], &plain)
                .unwrap();
        assert_eq!(c.endpoints(), ["http://127.0.0.1:2379", "http://h:1"]);
        assert!(matches!(
            EtcdClient::with_security(&["unix://h:1".into()], &plain),
            Err(Error::Config { .. })
        ));
        assert!(
            matches!(
                EtcdClient::with_security(&["https://h:1".into()], &plain),
                Err(Error::Security { .. })
            ),
            "https without a CA"
        );
        assert!(matches!(
            EtcdClient::with_security(&[], &plain),
            Err(Error::NoEndpoints)
        ));
    }
}
