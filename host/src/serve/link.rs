//! A connection's link to its client as the kernel sees it: how many bytes it still holds
//! unacknowledged. A stream judges a stalled client by it, because tokio wakes a writer only
//! when a good part of the send buffer has drained: a client reading slowly but steadily can go
//! seconds between two writes while acknowledging data all along.

use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A request's view of its connection's send queue (an extension of every request the
/// daemon's listener serves).
#[derive(Debug, Clone, Default)]
pub struct Link {
    /// The socket while the connection is open; `None` once it closed, so that a number the
    /// kernel hands to another file is never asked about.
    fd: Arc<Mutex<Option<RawFd>>>,
}

impl Link {
    /// Bytes written to the connection that its client has not acknowledged yet; `None` once
    /// the connection closed (or where the kernel cannot say).
    pub fn unacknowledged(&self) -> Option<u64> {
        let fd = self.fd.lock().ok()?;
        let fd = (*fd)?;
        let mut queued: libc::c_int = 0;
        // SAFETY: `fd` is open while the lock is held (`Linked` clears it under the same lock
        // before the socket closes), and TIOCOUTQ (SIOCOUTQ for sockets) writes one int.
        let ok = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } == 0;
        ok.then(|| u64::try_from(queued).unwrap_or(0))
    }
}

/// A TCP connection that keeps its [`Link`] told whether the socket is still open.
pub struct Linked {
    tcp: TcpStream,
    link: Link,
}

impl Linked {
    /// Wraps `tcp`; the returned [`Link`] goes with each of its requests.
    pub fn new(tcp: TcpStream) -> (Self, Link) {
        let link = Link {
            fd: Arc::new(Mutex::new(Some(tcp.as_raw_fd()))),
        };
        (
            Self {
                tcp,
                link: link.clone(),
            },
            link,
        )
    }
}

impl Drop for Linked {
    fn drop(&mut self) {
        // Runs before `tcp` closes the socket.
        if let Ok(mut fd) = self.link.fd.lock() {
            *fd = None;
        }
    }
}

impl AsyncRead for Linked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Linked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the link reports follows the client's reading: data sits unacknowledged while the
    /// client's window is full, drains as it reads, and nothing is reported once closed.
    #[tokio::test]
    async fn the_link_sees_a_client_read_and_a_connection_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Small buffers on both ends, set before the handshake, so that they fill at once.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let client = tokio::spawn(async move { socket.connect(addr).await.unwrap() });
        let (tcp, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&tcp)
            .set_send_buffer_size(8192)
            .unwrap();
        let mut client = client.await.unwrap();
        let (mut linked, link) = Linked::new(tcp);
        assert_eq!(link.unacknowledged(), Some(0));
        // Write until the kernel takes no more: the client reads nothing meanwhile.
        let block = vec![7u8; 4096];
        let mut sent = 0;
        for _ in 0..1000 {
            let wrote = linked.write(&block);
            match tokio::time::timeout(std::time::Duration::from_millis(100), wrote).await {
                Ok(Ok(n)) => sent += n,
                _ => break,
            }
        }
        let full = link.unacknowledged().unwrap();
        assert!(full > 0, "{sent} bytes written, none held");
        // The client reads all: the queue drains.
        let mut got = vec![0u8; sent];
        client.read_exact(&mut got).await.unwrap();
        let mut drained = full;
        for _ in 0..100 {
            drained = link.unacknowledged().unwrap();
            if drained < full {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(drained < full, "{full} bytes stayed unacknowledged");
        drop(linked);
        assert_eq!(link.unacknowledged(), None);
    }
}
