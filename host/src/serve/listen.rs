//! The daemon's accept loop: hyper's HTTP/1 and HTTP/2 (cleartext) connections with a deadline
//! for each request's head, socket options per connection, and a graceful drain. axum's own
//! `serve` installs no timer, so hyper's header timeout never fires there: a client that opens a
//! connection and sends nothing (or a byte a minute) would hold it forever.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

use super::link::Linked;
use crate::units::ByteSize;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionRules {
    /// The most time a request's head may take to arrive (and an idle keep-alive connection
    /// may wait for the next one).
    pub header_timeout: Duration,
    /// Each connection's kernel send buffer, when set.
    pub send_buffer: Option<ByteSize>,
}

/// Accepts and serves connections with `router` until `shutdown` completes, then stops
/// accepting and returns once every open connection has finished its requests (the caller
/// bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    rules: ConnectionRules,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(rules.header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin, and keep serving.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        configure(&tcp, rules);
        let router = router.clone();
        let (builder, watcher) = (builder.clone(), graceful.watcher());
        let first_byte = rules.header_timeout;
        tokio::spawn(async move {
            // hyper's head timeout starts with the first byte: a connection that never sends
            // one is closed here.
            let mut probe = [0u8; 1];
            match tokio::time::timeout(first_byte, tcp.peek(&mut probe)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let (io, link) = Linked::new(tcp);
            let service = tower::ServiceExt::map_request(
                router,
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    // HTTP/2 carries many streams on one connection: the bytes its client
                    // acknowledges say nothing of one stream's reader.
                    if request.version() <= axum::http::Version::HTTP_11 {
                        request.extensions_mut().insert(link.clone());
                    }
                    request
                },
            );
            let service = TowerToHyperService::new(service);
            let connection = builder.serve_connection(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(connection).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The most bytes a connection's kernel queue holds that it has not yet sent. Without a bound the
/// send buffer autotunes to megabytes, so a client that stops reading absorbs ~20,000 tokens of
/// stream before the daemon's writes block: its generation never paused and it was never cut
/// off (the stall timeout counts only once writes block). Data in flight is still bounded by the
/// client's window alone, so throughput is untouched.
const NOT_SENT_LOW_WATER: u32 = 16 << 10;

fn configure(tcp: &TcpStream, rules: ConnectionRules) {
    // Tokens are small writes that should leave at once, not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOT_SENT_LOW_WATER) {
        tracing::debug!("cannot bound a connection's unsent bytes (TCP_NOTSENT_LOWAT): {e}");
    }
    if let Some(bytes) = rules.send_buffer {
        let size = usize::try_from(bytes.0).unwrap_or(usize::MAX);
        if let Err(e) = socket2::SockRef::from(tcp).set_send_buffer_size(size) {
            tracing::warn!("cannot set a connection's send buffer (server.send_buffer): {e}");
        }
    }
}
