//! The daemon's accept loop: hyper's HTTP/1 and HTTP/2 (cleartext) connections with a deadline
//! for each request's head, socket options per connection, and a graceful drain. axum's own
//! `serve` installs no timer, so hyper's header timeout never fires there: a client that opens a
//! connection and sends nothing (or a byte a minute) would hold it forever.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
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
    // Each connection's task holds a sender: when all are gone, every connection has ended.
    let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
    let (stop, stopping) = tokio::sync::watch::channel(false);
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
        let (builder, open, stopping) = (builder.clone(), open.clone(), stopping.clone());
        let first_byte = rules.header_timeout;
        tokio::spawn(async move {
            let _open = open;
            // hyper's head timeout starts with the first byte: a connection that never sends
            // one is closed here, and at once when the daemon stops (it held the drain for the
            // whole timeout: a browser's or a balancer's pre-opened connection).
            let mut probe = [0u8; 1];
            let mut ending = stopping.clone();
            let peeked = tokio::select! {
                peeked = tokio::time::timeout(first_byte, tcp.peek(&mut probe)) => peeked,
                _ = ending.wait_for(|stop| *stop) => return,
            };
            match peeked {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let (io, link) = Linked::new(tcp);
            let activity = Arc::new(Activity::new(rules.header_timeout));
            let tracked = activity.clone();
            let service = tower::service_fn(
                move |mut request: axum::http::Request<hyper::body::Incoming>| {
                    let guard = tracked.begin();
                    // HTTP/2 carries many streams on one connection: the bytes its client
                    // acknowledges say nothing of one stream's reader.
                    if request.version() <= axum::http::Version::HTTP_11 {
                        request.extensions_mut().insert(link.clone());
                    }
                    let answer = tower::ServiceExt::oneshot(router.clone(), request);
                    async move {
                        let response = answer.await?;
                        // In flight until its body is sent (a stream may run for minutes).
                        Ok::<_, std::convert::Infallible>(response.map(|body| {
                            axum::body::Body::new(Tracked {
                                body,
                                _guard: guard,
                            })
                        }))
                    }
                },
            );
            let service = TowerToHyperService::new(service);
            let connection = builder.serve_connection(TokioIo::new(io), service);
            if let Err(e) = run_connection(connection, &activity, stopping).await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    let _ = stop.send(true);
    drop(open);
    let _ = all_closed.recv().await;
}

/// A connection's requests: how many are in flight (until their bodies are sent), when the
/// last one began or ended, and how long it may go idle.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
    timeout: Duration,
}

impl Activity {
    fn new(timeout: Duration) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            timeout,
        }
    }

    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// A request begins; it ends when the guard drops.
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        InFlight(self.clone())
    }

    /// When the connection will have been idle for its timeout: `None` while a request is in
    /// flight.
    fn idle_at(&self) -> Option<Instant> {
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        (self.in_flight.load(Ordering::SeqCst) == 0).then_some(last + self.timeout)
    }
}

/// One request in flight.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that holds its request in flight until it is dropped.
struct Tracked {
    body: axum::body::Body,
    _guard: InFlight,
}

impl axum::body::HttpBody for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Serves `connection` to its end, shutting it down gracefully (requests in flight finish, no
/// new one starts) when the daemon stops, or when it has had no request in flight for its
/// timeout; an idle one that does not then end (a client that never answers HTTP/2's closing
/// ping) is dropped a timeout later. hyper's head timeout covers HTTP/1 only: an HTTP/2 preface
/// cut short, or an HTTP/2 connection that never sends a request, would otherwise stay open.
async fn run_connection<C>(
    connection: C,
    activity: &Activity,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + Closable,
{
    tokio::pin!(connection);
    let mut closed_at: Option<Instant> = None;
    // Checked at least this often, since a request's end moves the deadline.
    let every = activity.timeout.min(Duration::from_secs(1));
    loop {
        tokio::select! {
            ended = connection.as_mut() => return ended,
            _ = stopping.wait_for(|stop| *stop), if closed_at.is_none() => {
                connection.as_mut().close();
                closed_at = Some(Instant::now());
            }
            () = tokio::time::sleep(every) => {
                let Some(idle_at) = activity.idle_at() else { continue };
                match closed_at {
                    None if Instant::now() >= idle_at => {
                        connection.as_mut().close();
                        closed_at = Some(Instant::now());
                    }
                    Some(at) if Instant::now() >= at.max(idle_at) + activity.timeout => {
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A connection that can be asked to finish its requests and close.
trait Closable {
    fn close(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E> Closable for hyper_util::server::conn::auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn close(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that never sent a byte does not hold the stop for the head timeout.
    #[tokio::test]
    async fn a_silent_connection_does_not_hold_the_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let rules = ConnectionRules {
            header_timeout: Duration::from_secs(30),
            send_buffer: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(serve(listener, Router::new(), rules, async {
            let _ = stopped.await;
        }));
        let _silent = tokio::net::TcpStream::connect(address).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = stop.send(());
        let ended = tokio::time::timeout(Duration::from_secs(5), served).await;
        assert!(
            ended.is_ok(),
            "the stop waited on a connection that sent nothing"
        );
    }
}
