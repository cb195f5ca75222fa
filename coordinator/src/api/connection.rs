//! `WatchedConnection`: a client's TCP stream as the HTTP server reads and writes it, watched so
//! that a request whose headers stop coming gets `408 Request Timeout` (OpenAI's JSON error,
//! `Connection: close`) while an idle connection is closed without a word, as nginx does.
//!
//! hyper times each request head itself (`header_read_timeout`, from the connection's opening or
//! the end of the previous response) but then drops the connection silently. So this wrapper
//! counts the bytes read since the server last wrote (those of a head still arriving); when the
//! connection ends on a header timeout, [`HeadTimeout::fired`] is set, and the wrapper, when it
//! is dropped, writes the 408 first if any such bytes came. Before hyper reads a head at all,
//! its automatic HTTP/1-or-2 detection waits for the first bytes with no deadline; the wrapper
//! puts `--http-header-timeout` on that wait too, from the connection's opening.
//!
//! Invariants: the 408 is only written on a connection where no response has begun since the
//! last head started (the server writes nothing else after the head timeout). A pipelined head
//! that arrived in full before the previous response was written and then stalled counts as
//! idle. Cost: a counter update per read and write; one timer per connection until its first
//! bytes are classified.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::error::ApiError;
use super::request_id::REQUEST_ID_HEADER;

/// What hyper's automatic protocol detection looks for before it parses anything.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Set when the connection's HTTP server gave up waiting for a request's headers.
#[derive(Debug, Clone, Default)]
pub struct HeadTimeout(Arc<AtomicBool>);

impl HeadTimeout {
    /// Marks the connection as ended on a header timeout.
    pub fn fire(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn fired(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A client's stream, watched for heads that stop coming.
pub struct WatchedConnection {
    stream: TcpStream,
    header_timeout: Duration,
    timeout: HeadTimeout,
    /// Bytes read since the server last wrote: a head under way when the timeout fires.
    unanswered: usize,
    /// The first bytes, while they could still be the HTTP/2 preface.
    prefix: Vec<u8>,
    /// The deadline for the first bytes, until protocol detection has them.
    detect_deadline: Option<Pin<Box<Sleep>>>,
}

impl WatchedConnection {
    /// Watches `stream`, whose heads may take `header_timeout`; `timeout` is fired from outside
    /// when the HTTP server ends the connection on it.
    pub fn new(stream: TcpStream, header_timeout: Duration, timeout: HeadTimeout) -> Self {
        Self {
            stream,
            header_timeout,
            timeout,
            unanswered: 0,
            prefix: Vec::new(),
            detect_deadline: Some(Box::pin(tokio::time::sleep(header_timeout))),
        }
    }

    /// Notes `bytes` just read.
    fn took(&mut self, bytes: &[u8]) {
        self.unanswered += bytes.len();
        if self.detect_deadline.is_some() {
            self.prefix.extend_from_slice(bytes);
            let undecided =
                self.prefix.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&self.prefix);
            if !undecided {
                self.detect_deadline = None;
                self.prefix = Vec::new();
            }
        }
    }

    /// The 408 written to a client whose head stopped coming.
    fn timeout_response(&self) -> Vec<u8> {
        let error = ApiError::HeaderTimeout {
            seconds: self.header_timeout.as_secs_f64(),
        };
        let body = serde_json::to_string(&error.body()).unwrap_or_default();
        let id = uuid::Uuid::new_v4().simple();
        format!(
            "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n{REQUEST_ID_HEADER}: {id}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }
}

impl Drop for WatchedConnection {
    fn drop(&mut self) {
        if !self.timeout.fired() || self.unanswered == 0 {
            return;
        }
        // The server wrote nothing since the head began, so the socket's send buffer is empty
        // and a few hundred bytes go straight in; a client that cannot take them gets nothing.
        let socket = socket2::SockRef::from(&self.stream);
        let _ = socket.send(&self.timeout_response());
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
}

impl AsyncRead for WatchedConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.took(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .detect_deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    this.timeout.fire();
                    return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
                }
                Poll::Pending
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for WatchedConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.unanswered = 0;
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            this.unanswered = 0;
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: (the server's watched end, the client's end).
    async fn pair(timeout: &HeadTimeout) -> (WatchedConnection, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let watched = WatchedConnection::new(server, Duration::from_millis(200), timeout.clone());
        (watched, client)
    }

    async fn read_all(mut client: TcpStream) -> String {
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_head_cut_short_gets_a_408_in_openais_shape() {
        let timeout = HeadTimeout::default();
        let (mut server, mut client) = pair(&timeout).await;
        client.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0; 64];
        assert!(server.read(&mut buf).await.unwrap() > 0);
        timeout.fire();
        drop(server);
        let answer = read_all(client).await;
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );
        assert!(answer.contains("connection: close\r\n"), "{answer}");
        let body: serde_json::Value =
            serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn an_idle_connection_after_a_response_closes_without_a_word() {
        let timeout = HeadTimeout::default();
        let (mut server, mut client) = pair(&timeout).await;
        client
            .write_all(b"GET /health HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0; 64];
        let _ = server.read(&mut buf).await.unwrap();
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        timeout.fire();
        drop(server);
        assert_eq!(read_all(client).await, "HTTP/1.1 200 OK\r\n\r\n");
    }

    #[tokio::test]
    async fn first_bytes_that_never_come_time_out_silently_and_a_started_preface_gets_a_408() {
        let timeout = HeadTimeout::default();
        let (mut server, client) = pair(&timeout).await;
        let mut buf = [0; 64];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(server);
        assert_eq!(read_all(client).await, "");

        // "PR" could still become HTTP/2's preface: detection waits, and times out.
        let timeout = HeadTimeout::default();
        let (mut server, mut client) = pair(&timeout).await;
        client.write_all(b"PR").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 2);
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(server);
        assert!(read_all(client).await.starts_with("HTTP/1.1 408"));
    }

    #[tokio::test]
    async fn once_a_head_is_recognised_reads_wait_without_the_first_bytes_deadline() {
        let timeout = HeadTimeout::default();
        let (mut server, mut client) = pair(&timeout).await;
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0; 64];
        assert_eq!(server.read(&mut buf).await.unwrap(), 16);
        let waited = tokio::time::timeout(Duration::from_millis(600), server.read(&mut buf)).await;
        assert!(waited.is_err(), "the read ended: {waited:?}");
        assert!(!timeout.fired());
    }
}
