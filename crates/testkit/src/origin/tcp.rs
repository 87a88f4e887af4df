//! Raw TCP origins: a half-close echo and a server-speaks-first banner.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::DropGuard;

use super::tasks::{bind_loopback, Tasks};

/// The line [`BannerOrigin`] sends as soon as it accepts a connection.
pub const BANNER: &str = "220 trellis-test ready\r\n";

/// Per connection: reads until the client half-closes, then writes everything back and closes.
///
/// A client that writes, shuts down its write side and reads to EOF gets its bytes back only if
/// the half-close travelled through whatever sits in between (the proxy).
#[derive(Debug)]
pub struct TcpEchoOrigin {
    addr: SocketAddr,
    _tasks: DropGuard,
}

impl TcpEchoOrigin {
    /// Binds an ephemeral loopback port and starts serving.
    pub async fn start() -> io::Result<Self> {
        let (listener, addr) = bind_loopback().await?;
        let (tasks, guard) = Tasks::new();
        tasks.accept_loop(listener, |stream| async move {
            if let Err(err) = echo_after_eof(stream).await {
                tracing::debug!(error = %err, "tcp echo connection failed");
            }
        });
        Ok(Self {
            addr,
            _tasks: guard,
        })
    }

    /// The address the origin listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn echo_after_eof(mut stream: TcpStream) -> io::Result<()> {
    let mut received = Vec::new();
    stream.read_to_end(&mut received).await?;
    stream.write_all(&received).await?;
    stream.shutdown().await
}

/// Server-speaks-first origin: sends [`BANNER`] on accept, then answers each line it receives
/// with `echo: ` followed by the line (line ending included) until the client closes.
#[derive(Debug)]
pub struct BannerOrigin {
    addr: SocketAddr,
    _tasks: DropGuard,
}

impl BannerOrigin {
    /// Binds an ephemeral loopback port and starts serving [`BANNER`].
    pub async fn start() -> io::Result<Self> {
        Self::start_with(BANNER).await
    }

    /// Binds an ephemeral loopback port and starts serving with its own `banner` line (to
    /// tell origins apart).
    pub async fn start_with(banner: &'static str) -> io::Result<Self> {
        let (listener, addr) = bind_loopback().await?;
        let (tasks, guard) = Tasks::new();
        tasks.accept_loop(listener, move |stream| async move {
            if let Err(err) = banner_then_echo_lines(stream, banner).await {
                tracing::debug!(error = %err, "banner connection failed");
            }
        });
        Ok(Self {
            addr,
            _tasks: guard,
        })
    }

    /// The address the origin listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

async fn banner_then_echo_lines(stream: TcpStream, banner: &str) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    write.write_all(banner.as_bytes()).await?;
    let mut read = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            break;
        }
        let mut reply = Vec::with_capacity(line.len() + 6);
        reply.extend_from_slice(b"echo: ");
        reply.extend_from_slice(&line);
        write.write_all(&reply).await?;
    }
    write.shutdown().await
}

/// A listener whose accept queue is full and never drained: new TCP connects to it hang
/// (the kernel drops their SYNs), which is how a slow or partitioned host looks to a client.
/// Stops when dropped.
#[derive(Debug)]
pub struct BlackholeOrigin {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _fill: Vec<tokio::net::TcpStream>,
}

impl BlackholeOrigin {
    /// Binds with the smallest backlog and fills it.
    pub async fn start() -> io::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        let mut fill = Vec::new();
        // Connect until one attempt hangs: from then on the queue is full.
        for _ in 0..16 {
            let attempt = tokio::time::timeout(
                std::time::Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await;
            match attempt {
                Ok(Ok(s)) => fill.push(s),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Ok(Self {
                        addr,
                        _listener: listener,
                        _fill: fill,
                    })
                }
            }
        }
        Err(io::Error::other("the accept queue never filled up"))
    }

    /// The address whose connects hang.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
