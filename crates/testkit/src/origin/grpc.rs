//! gRPC origin (h2c) serving `trellis.test.Echo` from `proto/echo.proto`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;

use futures_util::{stream, Stream, StreamExt};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::transport::Server;
use tonic::{Code, Request, Response, Status, Streaming};

use super::tasks::{bind_loopback, Tasks};

/// Code generated from `proto/echo.proto` (package `trellis.test`): messages, client and server.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("trellis.test");
}

pub use pb::echo_client::EchoClient;
pub use pb::{EchoReply, EchoRequest};

use pb::echo_server::{Echo, EchoServer};

/// A running gRPC origin; stops when dropped (open bidi streams end, connections get GOAWAY).
///
/// `Unary` echoes the message, or fails with `FAILED_PRECONDITION` and the text after the
/// prefix when the message starts with `fail:`; a message `unavailable-once:{key}` fails with
/// `UNAVAILABLE` the first time the origin sees that key, then echoes (retry tests). `Bidi` echoes each message as it arrives and
/// ends the stream with `ABORTED` ("bidi fail") on the message `fail`.
#[derive(Debug)]
pub struct GrpcOrigin {
    addr: SocketAddr,
    _tasks: DropGuard,
}

impl GrpcOrigin {
    /// Binds an ephemeral loopback port and starts serving.
    pub async fn start() -> io::Result<Self> {
        let (listener, addr) = bind_loopback().await?;
        let (tasks, guard) = Tasks::new();
        let service = EchoServer::new(EchoService {
            shutdown: tasks.token().clone(),
            seen: Default::default(),
        });
        tasks.spawn(async move {
            let served = Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
            if let Err(err) = served {
                tracing::debug!(error = %err, "grpc origin stopped");
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

struct EchoService {
    /// Cancelled when the origin drops, so open bidi streams end with it.
    shutdown: CancellationToken,
    /// Keys of `unavailable-once:` messages already failed.
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let message = request.into_inner().message;
        if let Some(key) = message.strip_prefix("unavailable-once:") {
            let first = self
                .seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.to_owned());
            if first {
                return Err(Status::unavailable("try again"));
            }
        }
        match message.strip_prefix("fail:") {
            Some(reason) => Err(Status::new(Code::FailedPrecondition, reason)),
            None => Ok(Response::new(EchoReply { message })),
        }
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let replies = stream::unfold(Some(request.into_inner()), |inbound| async move {
            let mut inbound = inbound?;
            match inbound.message().await {
                Ok(Some(req)) if req.message == "fail" => {
                    Some((Err(Status::aborted("bidi fail")), None))
                }
                Ok(Some(req)) => Some((
                    Ok(EchoReply {
                        message: req.message,
                    }),
                    Some(inbound),
                )),
                Ok(None) => None,
                Err(status) => Some((Err(status), None)),
            }
        });
        let replies = replies.take_until(self.shutdown.clone().cancelled_owned());
        Ok(Response::new(Box::pin(replies)))
    }
}
