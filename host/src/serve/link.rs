//! A connection's link to its client as the kernel sees it: how many bytes the client has
//! acknowledged. A stream judges a stalled client by it, because tokio wakes a writer only when a
//! good part of the send buffer has drained: a client reading slowly but steadily can go seconds
//! between two writes while acknowledging data all along.

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
    /// Bytes the client has acknowledged so far (it only grows, and only as the client reads
    /// once its receive window is full); `None` once the connection closed, or where the kernel
    /// does not say (before Linux 4.1).
    pub fn acknowledged(&self) -> Option<u64> {
        let fd = self.fd.lock().ok()?;
        let fd = (*fd)?;
        // SAFETY: all zeros is a valid `tcp_info` (plain integers).
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `fd` is open while the lock is held (`Linked` clears it under the same lock
        // before the socket closes); the kernel writes at most `len` bytes into `info`.
        let ok = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                std::ptr::addr_of_mut!(info).cast(),
                &mut len,
            )
        } == 0;
        // An older kernel's shorter struct ends before the field.
        let reaches = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + 8;
        (ok && len as usize >= reaches).then_some(info.tcpi_bytes_acked)
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

/// A loopback connection with small buffers on both ends (set before the handshake, so that
/// they fill at once): the server's side linked, and the client's.
#[cfg(test)]
pub(crate) async fn small_buffered_connection() -> (Linked, Link, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let client = tokio::spawn(async move { socket.connect(addr).await.unwrap() });
    let (tcp, _) = listener.accept().await.unwrap();
    socket2::SockRef::from(&tcp)
        .set_send_buffer_size(8192)
        .unwrap();
    let (linked, link) = Linked::new(tcp);
    (linked, link, client.await.unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the link reports follows the client's reading: nothing more is acknowledged while
    /// the client's window is full, more as it reads, and nothing is reported once closed.
    #[tokio::test]
    async fn the_link_sees_a_client_read_and_a_connection_close() {
        let (mut linked, link, mut client) = small_buffered_connection().await;
        let at_first = link.acknowledged().unwrap();
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
        let full = link.acknowledged().unwrap();
        assert!(full > at_first, "the client's window took some");
        assert!(
            full < (at_first + sent as u64),
            "{sent} bytes written, all acknowledged"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert_eq!(
            link.acknowledged().unwrap(),
            full,
            "nothing more while the client waits"
        );
        // The client reads all: the rest is acknowledged.
        let mut got = vec![0u8; sent];
        client.read_exact(&mut got).await.unwrap();
        let mut now = full;
        for _ in 0..100 {
            now = link.acknowledged().unwrap();
            if now == at_first + sent as u64 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            now,
            at_first + sent as u64,
            "every byte read was acknowledged"
        );
        drop(linked);
        assert_eq!(link.acknowledged(), None);
    }
}
