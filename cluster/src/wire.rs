//! The JSON shapes of etcd's gRPC gateway and their decoding: base64 `bytes`, int64 as strings
//! (numbers accepted too), omitted default-valued fields, and the `{"result": ..}` /
//! `{"error": ..}` envelope of streamed answers. Private to the crate; see `client.rs`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::client::{KeyValue, LeaseId, WatchEvent};
use crate::error::{Error, Op, Result};

/// Takes the next complete JSON value off the front of `buf`; `None` if it holds no complete
/// value yet. The gateway separates values with newlines; we do not rely on it.
pub(crate) fn next_message(buf: &mut Vec<u8>) -> Option<Result<Value, serde_json::Error>> {
    let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match values.next() {
        None => {
            buf.clear(); // only whitespace
            None
        }
        Some(Ok(value)) => {
            let used = values.byte_offset();
            buf.drain(..used);
            Some(Ok(value))
        }
        Some(Err(e)) if e.is_eof() => None,
        Some(Err(e)) => Some(Err(e)),
    }
}

/// Unwraps one streamed message: `{"result": T}` or `{"error": {...}}`.
pub(crate) fn stream_result<T: DeserializeOwned>(
    op: Op,
    msg: Result<Value, serde_json::Error>,
) -> Result<T> {
    let msg = msg.map_err(|e| decode_error(op, e))?;
    let envelope: StreamEnvelope = serde_json::from_value(msg).map_err(|e| decode_error(op, e))?;
    if let Some(err) = envelope.error {
        return Err(Error::Rpc {
            op,
            code: err.grpc_code,
            message: err.message,
        });
    }
    let result = envelope
        .result
        .ok_or_else(|| decode_error(op, "stream message has neither result nor error"))?;
    serde_json::from_value(result).map_err(|e| decode_error(op, e))
}

pub(crate) fn decode_error(op: Op, detail: impl std::fmt::Display) -> Error {
    Error::Decode {
        op,
        detail: detail.to_string(),
    }
}

/// int64 fields arrive as JSON strings; accept numbers too.
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Str(String),
        Num(i64),
    }
    match Int::deserialize(d)? {
        Int::Str(s) => s.parse().map_err(serde::de::Error::custom),
        Int::Num(n) => Ok(n),
    }
}

#[derive(Deserialize, Default)]
pub(crate) struct Header {
    #[serde(default, deserialize_with = "de_i64")]
    pub(crate) revision: i64,
}

#[derive(Deserialize)]
pub(crate) struct HeaderOnly {
    #[serde(default)]
    pub(crate) header: Header,
}

#[derive(Deserialize)]
pub(crate) struct UnaryError {
    #[serde(default)]
    pub(crate) error: String,
    #[serde(default)]
    pub(crate) message: String,
    #[serde(default)]
    pub(crate) code: i32,
}

#[derive(Deserialize)]
struct StreamEnvelope {
    result: Option<Value>,
    error: Option<StreamError>,
}

#[derive(Deserialize)]
struct StreamError {
    #[serde(default)]
    grpc_code: i32,
    #[serde(default)]
    message: String,
}

/// `/v3/auth/authenticate`'s answer.
#[derive(Deserialize)]
pub(crate) struct AuthenticateResponse {
    #[serde(default)]
    pub(crate) token: String,
}

#[derive(Deserialize)]
pub(crate) struct GrantResponse {
    #[serde(rename = "ID", default, deserialize_with = "de_i64")]
    pub(crate) id: i64,
    #[serde(default)]
    pub(crate) error: String,
}

#[derive(Deserialize)]
pub(crate) struct KeepAliveResponse {
    #[serde(rename = "TTL", default, deserialize_with = "de_i64")]
    pub(crate) ttl: i64,
}

#[derive(Deserialize)]
pub(crate) struct DeleteResponse {
    #[serde(default, deserialize_with = "de_i64")]
    pub(crate) deleted: i64,
}

#[derive(Deserialize)]
pub(crate) struct RangeResponse {
    #[serde(default)]
    pub(crate) header: Header,
    #[serde(default)]
    pub(crate) kvs: Vec<WireKeyValue>,
}

#[derive(Deserialize, Default)]
pub(crate) struct WireKeyValue {
    #[serde(default)]
    pub(crate) key: String,
    #[serde(default)]
    pub(crate) value: String,
    #[serde(default, deserialize_with = "de_i64")]
    pub(crate) create_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    pub(crate) mod_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    pub(crate) lease: i64,
}

impl WireKeyValue {
    pub(crate) fn decode(self, op: Op) -> Result<KeyValue> {
        Ok(KeyValue {
            key: decode_text(op, &self.key)?,
            value: decode_text(op, &self.value)?,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            lease: (self.lease != 0).then_some(LeaseId(self.lease)),
        })
    }
}

fn decode_text(op: Op, b64: &str) -> Result<String> {
    let bytes = B64.decode(b64).map_err(|e| decode_error(op, e))?;
    String::from_utf8(bytes).map_err(|e| decode_error(op, e))
}

#[derive(Deserialize)]
pub(crate) struct WatchResponse {
    #[serde(default)]
    pub(crate) created: bool,
    #[serde(default)]
    pub(crate) canceled: bool,
    #[serde(default, deserialize_with = "de_i64")]
    pub(crate) compact_revision: i64,
    #[serde(default)]
    pub(crate) cancel_reason: String,
    #[serde(default)]
    pub(crate) events: Vec<WireEvent>,
}

#[derive(Deserialize)]
pub(crate) struct WireEvent {
    /// Omitted for PUT (the enum's zero value); "DELETE" otherwise.
    #[serde(rename = "type", default)]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) kv: WireKeyValue,
}

impl WireEvent {
    pub(crate) fn decode(self, op: Op) -> Result<WatchEvent> {
        let revision = self.kv.mod_revision;
        match self.kind.as_str() {
            "" | "PUT" => {
                let kv = self.kv.decode(op)?;
                Ok(WatchEvent::Put {
                    key: kv.key,
                    value: kv.value,
                    revision,
                })
            }
            "DELETE" => Ok(WatchEvent::Delete {
                key: decode_text(op, &self.kv.key)?,
                revision,
            }),
            other => Err(decode_error(op, format!("unknown event type {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_messages_are_split_with_or_without_newlines_and_across_chunks() {
        let mut buf = br#"{"result":{"a":1}}
{"result":{"a":2}}{"resu"#
            .to_vec();
        assert_eq!(next_message(&mut buf).unwrap().unwrap()["result"]["a"], 1);
        assert_eq!(next_message(&mut buf).unwrap().unwrap()["result"]["a"], 2);
        assert!(next_message(&mut buf).is_none());
        buf.extend_from_slice(br#"lt":{"a":3}}"#);
        assert_eq!(next_message(&mut buf).unwrap().unwrap()["result"]["a"], 3);
        buf.extend_from_slice(b"\n");
        assert!(next_message(&mut buf).is_none());
        assert!(buf.is_empty());
    }

    #[test]
    fn watch_events_decode_with_omitted_put_type_and_string_int64s() {
        // As etcd 3.4/3.5 send them.
        let msg = serde_json::from_str(
            r#"{"result":{"header":{"revision":"7"},"events":[
                {"kv":{"key":"Zm9v","create_revision":"6","mod_revision":"6","version":"1","value":"YmFy"}},
                {"type":"DELETE","kv":{"key":"Zm9v","mod_revision":"7"}}]}}"#,
        );
        let resp: WatchResponse = stream_result(Op::Watch, msg).unwrap();
        let events: Vec<_> = resp
            .events
            .into_iter()
            .map(|e| e.decode(Op::Watch).unwrap())
            .collect();
        assert_eq!(
            events,
            [
                WatchEvent::Put {
                    key: "foo".into(),
                    value: "bar".into(),
                    revision: 6
                },
                WatchEvent::Delete {
                    key: "foo".into(),
                    revision: 7
                }
            ]
        );
    }

    #[test]
    fn stream_errors_become_rpc_errors() {
        let msg = serde_json::from_str(
            r#"{"error":{"grpc_code":14,"http_code":503,"message":"error reading from server: EOF","http_status":"Service Unavailable"}}"#,
        );
        let err = stream_result::<WatchResponse>(Op::Watch, msg)
            .err()
            .unwrap();
        assert!(matches!(err, Error::Rpc { code: 14, .. }), "{err:?}");
    }
}
