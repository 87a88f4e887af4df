//! Background tasks of one origin, all cancelled together when the origin's handle drops.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Spawns tasks that stop when the owning origin is dropped; cheap to clone into tasks that
/// spawn further tasks (connections, upgraded streams, HTTP/2 streams).
#[derive(Clone, Debug)]
pub(crate) struct Tasks {
    token: CancellationToken,
}

impl Tasks {
    /// A new task group and the guard that cancels it when dropped.
    pub(crate) fn new() -> (Self, DropGuard) {
        let token = CancellationToken::new();
        let guard = token.clone().drop_guard();
        (Self { token }, guard)
    }

    /// The token cancelled when the origin is dropped.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Runs `fut` on the current runtime until it finishes or the group is cancelled.
    pub(crate) fn spawn<F>(&self, fut: F)
    where
        F: Future + Send + 'static,
    {
        let token = self.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// Accepts connections from `listener` forever, running `handler` on each in its own task.
    pub(crate) fn accept_loop<H, Fut>(&self, listener: TcpListener, handler: H)
    where
        H: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tasks = self.clone();
        self.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _peer)) => tasks.spawn(handler(stream)),
                    Err(err) => {
                        // Usually fd exhaustion; back off instead of spinning.
                        tracing::debug!(error = %err, "origin accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
}

/// Lets hyper run its per-stream tasks (HTTP/2) inside the group.
impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(fut);
    }
}

/// Binds an ephemeral loopback port.
pub(crate) async fn bind_loopback() -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}
