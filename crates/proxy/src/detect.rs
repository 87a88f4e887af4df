//! Protocol detection on an accepted connection.
//!
//! We read (not peek) the client's first bytes, decide HTTP/1, HTTP/2 prior knowledge, TLS or
//! opaque, and hand the bytes back in a [`PrefixedIo`] so nothing is lost. If the client says
//! nothing within the detection timeout (a server-speaks-first protocol) the connection is
//! opaque TCP.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest HTTP method token we look for before giving up on HTTP/1.
const MAX_METHOD_LEN: usize = 20;

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// A TLS handshake record (ClientHello).
    Tls,
    /// Anything else, or nothing within the timeout.
    Opaque,
}

/// Outcome of looking at a prefix so far.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done(Detected),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    // TLS record: content type 22 (handshake), major version 3.
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => Verdict::NeedMore,
            Some(3) => Verdict::Done(Detected::Tls),
            Some(_) => Verdict::Done(Detected::Opaque),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Done(Detected::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // HTTP/1: a method token (upper-case letters) followed by a space.
    for (i, &b) in buf.iter().enumerate().take(MAX_METHOD_LEN + 1) {
        match b {
            b'A'..=b'Z' | b'-' | b'_' => continue,
            b' ' if i > 0 => return Verdict::Done(Detected::Http1),
            _ => return Verdict::Done(Detected::Opaque),
        }
    }
    if buf.len() > MAX_METHOD_LEN {
        Verdict::Done(Detected::Opaque)
    } else {
        Verdict::NeedMore
    }
}

/// Reads from `io` until the protocol is known, the client stops sending (timeout), or EOF.
/// Returns the verdict and every byte read. `None` means the client closed without a byte.
pub async fn detect<I: AsyncRead + Unpin>(
    io: &mut I,
    timeout: Duration,
) -> io::Result<Option<(Detected, Bytes)>> {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await;
        match read {
            Err(_elapsed) => return Ok(Some((Detected::Opaque, buf.freeze()))),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                // EOF after a partial prefix: whatever it is, pass it on as bytes.
                return Ok(Some((Detected::Opaque, buf.freeze())));
            }
            Ok(Ok(_)) => {
                if let Verdict::Done(d) = classify(&buf) {
                    return Ok(Some((d, buf.freeze())));
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// An I/O stream that first replays bytes already read from it.
    #[derive(Debug)]
    pub struct PrefixedIo<T> {
        prefix: Bytes,
        #[pin]
        inner: T,
    }
}

impl<T> PrefixedIo<T> {
    /// Wraps `inner`, replaying `prefix` before its own bytes.
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead> AsyncRead for PrefixedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(out.remaining());
            out.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read(cx, out)
    }
}

impl<T: AsyncWrite> AsyncWrite for PrefixedIo<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_prefixes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n"),
            Verdict::Done(Detected::Http1)
        );
        assert_eq!(
            classify(b"CONNECT a:1 HTTP/1.1"),
            Verdict::Done(Detected::Http1)
        );
        assert_eq!(classify(b"GE"), Verdict::NeedMore);
        assert_eq!(classify(b"PRI * HT"), Verdict::NeedMore);
        assert_eq!(classify(H2_PREFACE), Verdict::Done(Detected::Http2));
        assert_eq!(
            classify(b"PRI * HTTP/1.1\r\n"),
            Verdict::Done(Detected::Http1)
        );
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Verdict::Done(Detected::Tls));
        assert_eq!(classify(&[0x16]), Verdict::NeedMore);
        assert_eq!(classify(b"\x00\x01binary"), Verdict::Done(Detected::Opaque));
        assert_eq!(classify(b"hello"), Verdict::Done(Detected::Opaque));
        assert_eq!(classify(b" GET"), Verdict::Done(Detected::Opaque));
        assert_eq!(classify(&[b'A'; 40]), Verdict::Done(Detected::Opaque));
    }

    #[tokio::test]
    async fn silent_client_is_opaque_after_timeout() {
        let (mut a, _b) = tokio::io::duplex(64);
        let got = detect(&mut a, Duration::from_millis(20)).await.unwrap();
        assert_eq!(got, Some((Detected::Opaque, Bytes::new())));
    }

    #[tokio::test]
    async fn prefix_is_replayed() {
        use tokio::io::AsyncWriteExt;
        let (mut a, mut b) = tokio::io::duplex(64);
        b.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (d, prefix) = detect(&mut a, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d, Detected::Http1);
        b.write_all(b"rest").await.unwrap();
        drop(b);
        let mut io = PrefixedIo::new(prefix, a);
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\nrest");
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any bytes get a verdict without panicking, and a verdict once reached never changes
        /// as more bytes arrive (detection is stable).
        #[test]
        fn classification_is_total_and_stable(bytes in proptest::collection::vec(any::<u8>(), 0..64), extra in proptest::collection::vec(any::<u8>(), 0..16)) {
            let first = classify(&bytes);
            if let Verdict::Done(d) = first {
                let mut longer = bytes.clone();
                longer.extend_from_slice(&extra);
                prop_assert_eq!(classify(&longer), Verdict::Done(d));
            }
        }

        /// Whatever the prefix, a request line is detected as HTTP/1 and the preface as HTTP/2.
        #[test]
        fn http_is_recognised(method in "[A-Z]{1,12}", path in "/[a-z0-9/]{0,20}") {
            let line = format!("{method} {path} HTTP/1.1\r\n");
            prop_assert_eq!(classify(line.as_bytes()), Verdict::Done(Detected::Http1));
        }
    }
}
