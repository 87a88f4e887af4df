//! Request bodies that a retry can send again.
//!
//! The first attempt streams the client's body as it arrives while a copy of the frames is
//! kept, up to [`MAX_REPLAY_BYTES`] (64 KiB). A later attempt replays the copy, then goes on
//! reading the client where the copy ends (a retry may start before the client finished
//! sending). Past the limit the copy is dropped and the request can no longer be retried;
//! the attempt in progress streams on unaffected. Starting an attempt supersedes the
//! previous one: its body ends with an error so that its upstream stream is reset.
//!
//! A mirror ([`Replay::copy_when_done`]) gets a copy of the kept frames once the client's
//! body has ended, without holding the client's body itself.

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// The largest body kept for replay; a larger one disables retries of its request.
pub const MAX_REPLAY_BYTES: usize = 64 * 1024;

/// An error ending a request body the proxy no longer sends.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
enum Chunk {
    Data(Bytes),
    Trailers(HeaderMap),
}

struct State {
    /// The client's body; `None` once it ended.
    source: Option<Incoming>,
    /// The frames read so far (all of them while `!overflowed`).
    chunks: Vec<Chunk>,
    /// How many frames were read from the client.
    read: usize,
    buffered: usize,
    overflowed: bool,
    failed: bool,
    /// The attempt allowed to read; older attempts' bodies fail.
    generation: u64,
    /// Request bytes for the access log, counted once however often they are sent.
    bytes: Option<Arc<AtomicU64>>,
    /// The whole body for mirrors once it ended (`Some(None)`: it cannot be copied).
    done: tokio::sync::watch::Sender<Option<Option<Arc<[Chunk]>>>>,
}

impl State {
    /// Tells the mirrors waiting for the body that it ended (or cannot be copied).
    fn publish(&self) {
        if self.done.receiver_count() == 0 || self.done.borrow().is_some() {
            return;
        }
        let copy = if self.overflowed || self.failed {
            None
        } else if self.source.is_none() {
            Some(Arc::from(self.chunks.as_slice()))
        } else {
            return;
        };
        self.done.send_replace(Some(copy));
    }
}

/// A client body shared by the attempts of one request.
#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<State>>,
}

impl Replay {
    /// Whether a body with this `size_hint` can be kept for replay at all.
    pub fn fits(hint: &SizeHint) -> bool {
        hint.lower() <= MAX_REPLAY_BYTES as u64
    }

    /// Takes the client's body; `bytes`, when given, accumulates its data bytes.
    pub fn new(body: Incoming, bytes: Option<Arc<AtomicU64>>) -> Self {
        let source = (!body.is_end_stream()).then_some(body);
        Self {
            state: Arc::new(Mutex::new(State {
                source,
                chunks: Vec::new(),
                read: 0,
                buffered: 0,
                overflowed: false,
                failed: false,
                generation: 0,
                bytes,
                done: tokio::sync::watch::Sender::new(None),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another attempt can send the whole body again.
    pub fn replayable(&self) -> bool {
        let s = self.lock();
        !s.overflowed && !s.failed
    }

    /// A copy of the whole body (for a mirror) once the client has sent it: `None` when it
    /// fails, is too large to keep, or every attempt is gone before it ended. Waiting does
    /// not keep the client's body (nor its connection) alive.
    pub fn copy_when_done(&self) -> impl std::future::Future<Output = Option<Copied>> + Send {
        let mut done = {
            let s = self.lock();
            let rx = s.done.subscribe();
            s.publish();
            rx
        };
        async move {
            done.wait_for(Option::is_some)
                .await
                .ok()?
                .clone()?
                .map(Copied)
        }
    }

    /// The body of a new attempt; the previous attempt's body stops.
    pub fn attempt(&self) -> ReplayBody {
        let mut s = self.lock();
        s.generation += 1;
        ReplayBody {
            replay: self.clone(),
            generation: s.generation,
            cursor: 0,
        }
    }
}

/// A whole request body kept for mirrors ([`Replay::copy_when_done`]).
#[derive(Clone)]
pub struct Copied(Arc<[Chunk]>);

impl Copied {
    /// A body sending the copy (each call a new one).
    pub fn body(&self) -> ReplayBody {
        let buffered = self
            .0
            .iter()
            .map(|c| match c {
                Chunk::Data(d) => d.len(),
                Chunk::Trailers(_) => 0,
            })
            .sum();
        let replay = Replay {
            state: Arc::new(Mutex::new(State {
                source: None,
                chunks: self.0.to_vec(),
                read: self.0.len(),
                buffered,
                overflowed: false,
                failed: false,
                generation: 0,
                bytes: None,
                done: tokio::sync::watch::Sender::new(None),
            })),
        };
        replay.attempt()
    }
}

/// One attempt's view of a [`Replay`].
pub struct ReplayBody {
    replay: Replay,
    generation: u64,
    /// Frames of the shared body this attempt has sent.
    cursor: usize,
}

impl ReplayBody {
    /// Polls the next frame.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut s = self.replay.lock();
        if s.generation != self.generation {
            return Poll::Ready(Some(Err("request body superseded by a retry".into())));
        }
        if self.cursor < s.read {
            let Some(chunk) = s.chunks.get(self.cursor).cloned().filter(|_| !s.overflowed) else {
                return Poll::Ready(Some(Err("request body too large to replay".into())));
            };
            self.cursor += 1;
            return Poll::Ready(Some(Ok(match chunk {
                Chunk::Data(d) => Frame::data(d),
                Chunk::Trailers(t) => Frame::trailers(t),
            })));
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(source).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                s.source = None;
                s.publish();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                s.failed = true;
                s.source = None;
                s.publish();
                return Poll::Ready(Some(Err(e.into())));
            }
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        s.read += 1;
        self.cursor = s.read;
        let chunk = match frame.data_ref() {
            Some(d) => {
                if let Some(bytes) = &s.bytes {
                    bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                s.buffered += d.len();
                Chunk::Data(d.clone())
            }
            None => match frame.trailers_ref() {
                Some(t) => Chunk::Trailers(t.clone()),
                None => Chunk::Data(Bytes::new()),
            },
        };
        if s.buffered > MAX_REPLAY_BYTES {
            s.overflowed = true;
            s.chunks = Vec::new();
        } else if !s.overflowed {
            s.chunks.push(chunk);
        }
        if s.source.as_ref().is_some_and(Body::is_end_stream) {
            s.source = None;
        }
        s.publish();
        Poll::Ready(Some(Ok(frame)))
    }

    /// Whether nothing is left to send.
    pub fn is_end(&self) -> bool {
        let s = self.replay.lock();
        s.source.is_none() && self.cursor >= s.read
    }

    /// What is known of the size left to send.
    pub fn size_hint(&self) -> SizeHint {
        let s = self.replay.lock();
        match &s.source {
            Some(src) if s.read == 0 => src.size_hint(),
            Some(_) => SizeHint::default(),
            None if s.overflowed => SizeHint::default(),
            None => {
                let left = s.chunks[self.cursor.min(s.chunks.len())..]
                    .iter()
                    .map(|c| match c {
                        Chunk::Data(d) => d.len() as u64,
                        Chunk::Trailers(_) => 0,
                    })
                    .sum();
                SizeHint::with_exact(left)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real `Incoming` body carrying `data`, through an HTTP/1 exchange on a duplex pipe.
    async fn incoming(data: Vec<u8>) -> Incoming {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Arc::new(Mutex::new(Some(tx)));
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    if let Some(tx) = tx.lock().unwrap().take() {
                        let _ = tx.send(req.into_body());
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                        Bytes,
                    >::new(
                    )))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc)
                .await;
        });
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client))
                .await
                .unwrap();
        tokio::spawn(conn);
        tokio::spawn(async move {
            let req = http::Request::post("/")
                .body(http_body_util::Full::new(Bytes::from(data)))
                .unwrap();
            let _ = send.send_request(req).await;
        });
        rx.await.unwrap()
    }

    async fn read(mut body: ReplayBody) -> Result<Vec<u8>, BoxError> {
        let mut out = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| body.poll_next(cx)).await {
            if let Some(d) = f?.data_ref() {
                out.extend_from_slice(d);
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_small_body_is_replayed_whole() {
        let data = vec![7u8; 10_000];
        let bytes = Arc::new(AtomicU64::new(0));
        let r = Replay::new(incoming(data.clone()).await, Some(bytes.clone()));
        assert_eq!(read(r.attempt()).await.unwrap(), data);
        assert!(r.replayable());
        let again = r.attempt();
        assert_eq!(again.size_hint().exact(), Some(10_000));
        assert_eq!(read(again).await.unwrap(), data);
        assert_eq!(bytes.load(Ordering::Relaxed), 10_000, "counted once");
    }

    #[tokio::test]
    async fn a_body_past_the_limit_streams_but_cannot_be_replayed() {
        assert!(!Replay::fits(&SizeHint::with_exact(
            MAX_REPLAY_BYTES as u64 + 1
        )));
        assert!(Replay::fits(&SizeHint::with_exact(MAX_REPLAY_BYTES as u64)));
        let data = vec![1u8; MAX_REPLAY_BYTES + 1];
        let r = Replay::new(incoming(data.clone()).await, None);
        assert_eq!(read(r.attempt()).await.unwrap(), data);
        assert!(!r.replayable());
        assert!(read(r.attempt()).await.is_err());
    }

    #[tokio::test]
    async fn a_mirror_copies_the_body_once_it_ended() {
        let data = vec![3u8; 5_000];
        let r = Replay::new(incoming(data.clone()).await, None);
        let copy = tokio::spawn(r.copy_when_done());
        assert_eq!(read(r.attempt()).await.unwrap(), data);
        let copy = copy.await.unwrap().expect("a copy");
        assert_eq!(read(copy.body()).await.unwrap(), data);
        assert_eq!(read(copy.body()).await.unwrap(), data, "again");

        let big = Replay::new(incoming(vec![1u8; MAX_REPLAY_BYTES + 1]).await, None);
        let copy = tokio::spawn(big.copy_when_done());
        read(big.attempt()).await.unwrap();
        assert!(copy.await.unwrap().is_none(), "too large to copy");

        let abandoned = Replay::new(incoming(data).await, None);
        let copy = abandoned.copy_when_done();
        drop(abandoned);
        assert!(copy.await.is_none(), "no attempt read it");
    }

    #[tokio::test]
    async fn a_new_attempt_supersedes_the_previous_one() {
        let r = Replay::new(incoming(vec![1u8; 100]).await, None);
        let first = r.attempt();
        let second = r.attempt();
        assert!(read(first).await.is_err());
        assert_eq!(read(second).await.unwrap().len(), 100);
    }
}
