//! I/O wrappers for accepted connections.

use crate::telemetry::metrics::TcpConn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pin_project_lite::pin_project! {
    /// A stream that counts the bytes read and written into `trellis_tcp_bytes_total` and
    /// closes its `trellis_tcp_connections_open` count when dropped.
    pub struct MeteredIo<T> {
        #[pin]
        inner: T,
        metrics: TcpConn,
    }
}

impl<T> MeteredIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, metrics: TcpConn) -> Self {
        Self { inner, metrics }
    }
}

impl<T: AsyncRead> AsyncRead for MeteredIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.metrics.add_bytes(n as u64);
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for MeteredIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write(cx, b);
        if let Poll::Ready(Ok(n)) = &res {
            this.metrics.add_bytes(*n as u64);
        }
        res
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let res = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            this.metrics.add_bytes(*n as u64);
        }
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}
