//! Serves the API's router on a TCP listener, as `axum::serve` does (HTTP/1.1 and HTTP/2,
//! graceful shutdown), plus what `axum::serve` cannot be told: a deadline for each request's
//! headers. hyper starts that clock whenever it waits for a request head, on a new connection and
//! between requests on a kept-alive one, so one setting covers both slow-loris senders and idle
//! keep-alive connections; the same deadline covers a new connection's first bytes, which hyper's
//! HTTP/1-or-2 detection would otherwise wait for forever. When it passes, a connection that had
//! begun a request gets `408 Request Timeout` and one that sent nothing is closed silently (as
//! nginx does): see [`super::connection`]. A body that comes too slowly gets a 408 from
//! `error::ApiJson`.
//!
//! Cost: one task per connection, as with `axum::serve`.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use super::connection::{HeadTimeout, WatchedConnection};

/// Pause after a failed `accept` (out of file descriptors, say) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets each open
/// connection finish the request it is on (idle ones close at once) and returns when all have.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small SSE chunks go out at once.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let timeout = HeadTimeout::default();
        let stream = WatchedConnection::new(stream, header_timeout, timeout.clone());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            // A client that goes away or times out ends its connection; nothing to report.
            if let Err(e) = connection.as_mut().await {
                if e.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout)
                {
                    timeout.fire();
                }
                tracing::debug!("connection ended: {e}");
            }
            // Dropping the connection closes the socket, with a 408 first if a head was cut short.
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
