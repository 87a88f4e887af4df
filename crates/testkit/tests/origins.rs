//! Exercises each origin directly (no proxy in between).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use trellis_testkit::client::{http1_get, ws_echo};
use trellis_testkit::origin::grpc::{EchoClient, EchoRequest, GrpcOrigin};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::origin::tcp::{BannerOrigin, TcpEchoOrigin, BANNER};
use trellis_testkit::wait::{wait_for, wait_tcp};

const DEADLINE: Duration = Duration::from_secs(5);

/// Sends one request over a fresh h2c (prior knowledge) connection and returns the response
/// with its body collected (trailers included).
async fn h2c_request(
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> (http::response::Parts, http_body_util::Collected<Bytes>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts, body.collect().await.unwrap())
}

#[tokio::test]
async fn http_echo_over_http1() {
    let origin = HttpOrigin::start_with_name("alpha").await.unwrap();
    let headers = [("x-multi", "one"), ("x-multi", "two")];
    let (status, resp_headers, body) = http1_get(origin.addr(), "/echo/sub?q=1", &headers)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(resp_headers["x-origin"], "alpha");
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/echo/sub?q=1");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["body_len"], 0);
    assert_eq!(echo["headers"]["x-multi"], "one, two");
    assert_eq!(echo["headers"]["host"], origin.addr().to_string());
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn http_echo_over_h2c() {
    let origin = HttpOrigin::start().await.unwrap();
    let request = Request::post(format!("http://{}/echo", origin.addr()))
        .header("x-test", "h2")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let (parts, body) = h2c_request(origin.addr(), request).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert!(!parts.headers.contains_key("x-origin"));
    let echo: Value = serde_json::from_slice(&body.to_bytes()).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["body_len"], 5);
    assert_eq!(echo["headers"]["x-test"], "h2");
    assert_eq!(echo["authority"], origin.addr().to_string());
}

#[tokio::test]
async fn http_status_slow_and_not_found() {
    let origin = HttpOrigin::start().await.unwrap();
    let (status, _, body) = http1_get(origin.addr(), "/status/418", &[]).await.unwrap();
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert_eq!(body, "status 418");
    let (status, _, body) = http1_get(origin.addr(), "/slow/30", &[]).await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"slow"[..]));
    let (status, _, _) = http1_get(origin.addr(), "/nope", &[]).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(origin.requests(), 3);
}

#[tokio::test]
async fn http_stream_is_chunked_and_exact() {
    let origin = HttpOrigin::start().await.unwrap();
    let len = 3 * 64 * 1024 + 123;
    let (status, headers, body) = http1_get(origin.addr(), &format!("/stream/{len}"), &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert_eq!(body.len(), len);
    assert!(body.iter().all(|&b| b == b'x'));
}

#[tokio::test]
async fn http_upload_counts_bytes_and_trailers_arrive() {
    let origin = HttpOrigin::start().await.unwrap();
    let upload = Request::post(format!("http://{}/upload", origin.addr()))
        .body(Full::new(Bytes::from(vec![7u8; 300_000])))
        .unwrap();
    let (parts, body) = h2c_request(origin.addr(), upload).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body.to_bytes(), "300000");

    let trailers = Request::get(format!("http://{}/trailers", origin.addr()))
        .body(Full::default())
        .unwrap();
    let (parts, body) = h2c_request(origin.addr(), trailers).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body.trailers().unwrap()["x-trailer"], "yes");
    assert_eq!(body.to_bytes(), "ok");
}

#[tokio::test]
async fn websocket_echo() {
    let origin = HttpOrigin::start().await.unwrap();
    let url = format!("ws://{}/ws", origin.addr());
    assert_eq!(ws_echo(&url, "hello ws").await.unwrap(), "hello ws");
}

#[tokio::test]
async fn tcp_echo_answers_after_half_close() {
    let origin = TcpEchoOrigin::start().await.unwrap();
    let mut stream = TcpStream::connect(origin.addr()).await.unwrap();
    stream.write_all(b"half-close me").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"half-close me");
}

#[tokio::test]
async fn banner_speaks_first_then_echoes_lines() {
    let origin = BannerOrigin::start().await.unwrap();
    let stream = TcpStream::connect(origin.addr()).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await.unwrap();
    assert_eq!(line, BANNER);
    write.write_all(b"ping\r\n").await.unwrap();
    line.clear();
    read.read_line(&mut line).await.unwrap();
    assert_eq!(line, "echo: ping\r\n");
    write.shutdown().await.unwrap();
    line.clear();
    assert_eq!(read.read_line(&mut line).await.unwrap(), 0);
}

#[tokio::test]
async fn grpc_unary_ok_and_failure() {
    let origin = GrpcOrigin::start().await.unwrap();
    let mut client = EchoClient::connect(format!("http://{}", origin.addr()))
        .await
        .unwrap();
    let reply = client
        .unary(EchoRequest {
            message: "hi".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "hi");
    let status = client
        .unary(EchoRequest {
            message: "fail:no way".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "no way");
}

#[tokio::test]
async fn grpc_bidi_echoes_then_aborts() {
    let origin = GrpcOrigin::start().await.unwrap();
    let mut client = EchoClient::connect(format!("http://{}", origin.addr()))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    let mut replies = client
        .bidi(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for message in ["one", "two", "three"] {
        tx.send(EchoRequest {
            message: message.into(),
        })
        .await
        .unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!(reply.message, message);
    }
    tx.send(EchoRequest {
        message: "fail".into(),
    })
    .await
    .unwrap();
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    assert_eq!(status.message(), "bidi fail");
}

#[tokio::test]
async fn dropping_an_origin_closes_its_port() {
    let origin = HttpOrigin::start().await.unwrap();
    let addr = origin.addr();
    wait_tcp(addr, DEADLINE).await;
    drop(origin);
    wait_for("origin port to close", DEADLINE, || async move {
        TcpStream::connect(addr).await.is_err()
    })
    .await;
}

#[tokio::test]
async fn http1_trailers_are_sent_when_the_client_accepts_them() {
    let origin = HttpOrigin::start().await.unwrap();
    let mut stream = TcpStream::connect(origin.addr()).await.unwrap();
    stream
        .write_all(
            b"GET /trailers HTTP/1.1\r\nhost: t\r\nte: trailers\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert!(
        raw.ends_with("2\r\nok\r\n0\r\nx-trailer: yes\r\n\r\n"),
        "{raw}"
    );
}
