//! HTTP/2 (h2c prior knowledge) and gRPC through the real `trellis` binary.

mod common;

use common::*;
use trellis_testkit::origin::grpc::{EchoClient, EchoRequest, GrpcOrigin};
use trellis_testkit::origin::http::HttpOrigin;

/// A proxy with inbound -> gRPC app, and a per-upstream port for the gRPC service `scoring`
/// and the HTTP service `content` (both auto-detected).
async fn setup() -> (Trellis, GrpcOrigin, HttpOrigin, [std::net::SocketAddr; 4]) {
    let grpc = GrpcOrigin::start().await.unwrap();
    let http = HttpOrigin::start().await.unwrap();
    let (admin, inbound, scoring, content) = (free_addr(), free_addr(), free_addr(), free_addr());
    let outbound = free_addr();
    let yaml = format!(
        "service: exam-engine\nadmin: {admin}\n\
         inbound:\n  - listen: {inbound}\n    app: {g}\n    protocol: grpc\n\
         outbound: {{ listen: {outbound} }}\n\
         upstreams:\n\
         \x20 - service: scoring-service\n    listen: {scoring}\n    endpoints: [{g}]\n\
         \x20 - service: content-delivery\n    listen: {content}\n    endpoints: [{h}]\n",
        g = grpc.addr(),
        h = http.addr(),
    );
    let p = proxy(&yaml, admin, &[]).await;
    (p, grpc, http, [inbound, scoring, content, outbound])
}

#[tokio::test]
async fn h2c_requests_multiplex_and_keep_the_authority() {
    let (p, _g, http, [_, _, content, outbound]) = setup().await;
    let h2 = H2::connect(content).await;
    let mut handles = Vec::new();
    for i in 0..20 {
        let c = H2::connect(content).await;
        handles.push(tokio::spawn(async move {
            c.request("POST", &format!("http://content-delivery/echo/{i}"), b"abc")
                .await
        }));
    }
    for h in handles {
        let (status, _, body) = h.await.unwrap();
        assert_eq!(status, 200);
        let e = json(&body);
        assert_eq!(e["version"], "HTTP/2.0");
        assert_eq!(e["body_len"], 3);
    }
    // Many streams over one client connection.
    let reqs: Vec<_> = (0..10)
        .map(|i| {
            let h2 = h2.clone();
            tokio::spawn(async move {
                h2.request("GET", &format!("http://content-delivery/echo/s{i}"), b"")
                    .await
            })
        })
        .collect();
    for r in reqs {
        let (status, _, body) = r.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(json(&body)["authority"], "content-delivery");
    }
    // HTTP/2 to the outbound listener routes by :authority.
    let h2 = H2::connect(outbound).await;
    let (status, _, body) = h2
        .request("GET", "http://content-delivery.default/echo/x", b"")
        .await;
    assert_eq!(status, 200, "{body:?}");
    assert_eq!(json(&body)["path"], "/echo/x");
    // Upstream HTTP/2 connections are pooled: 31 requests, very few upstream connections.
    assert!(http.requests() >= 31);
    let text = p.metrics().await;
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[
                ("destination_service", "content-delivery"),
                ("response_code", "200")
            ]
        ),
        Some(31.0),
        "{text}"
    );
}

#[tokio::test]
async fn h2_trailers_are_preserved() {
    let (_p, _g, _h, [_, _, content, _]) = setup().await;
    let tcp = tokio::net::TcpStream::connect(content).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("http://content-delivery/trailers")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    use http_body_util::BodyExt;
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers forwarded");
    assert_eq!(trailers["x-trailer"], "yes");
    assert_eq!(collected.to_bytes(), "ok");
}

#[tokio::test]
async fn grpc_unary_and_status_codes() {
    let (p, _g, _h, [inbound, scoring, _, _]) = setup().await;
    for addr in [scoring, inbound] {
        let mut client = EchoClient::connect(format!("http://{addr}")).await.unwrap();
        let reply = client
            .unary(EchoRequest {
                message: "hi".into(),
            })
            .await
            .unwrap();
        assert_eq!(reply.into_inner().message, "hi");
        let err = client
            .unary(EchoRequest {
                message: "fail:no exam".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert_eq!(err.message(), "no exam");
    }
    let text = p.metrics().await;
    for (dir, dest) in [("outbound", "scoring-service"), ("inbound", "exam-engine")] {
        assert_eq!(
            sample(
                &text,
                "trellis_http_requests_total",
                &[
                    ("direction", dir),
                    ("destination_service", dest),
                    ("grpc_status", "0")
                ]
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "trellis_http_requests_total",
                &[
                    ("direction", dir),
                    ("destination_service", dest),
                    ("grpc_status", "9")
                ]
            ),
            Some(1.0),
            "{text}"
        );
    }
}

#[tokio::test]
async fn grpc_bidirectional_stream_with_trailers() {
    let (p, _g, _h, [_, scoring, _, _]) = setup().await;
    let mut client = EchoClient::connect(format!("http://{scoring}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let outbound = tokio_stream_from(rx);
    let mut replies = client.bidi(outbound).await.unwrap().into_inner();
    // Interleaved: each message is echoed before the next is sent (true streaming).
    for i in 0..3 {
        tx.send(EchoRequest {
            message: format!("m{i}"),
        })
        .await
        .unwrap();
        let r = replies.message().await.unwrap().unwrap();
        assert_eq!(r.message, format!("m{i}"));
    }
    tx.send(EchoRequest {
        message: "fail".into(),
    })
    .await
    .unwrap();
    let err = replies.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert_eq!(err.message(), "bidi fail");
    drop(tx);
    let text = p.metrics().await;
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[
                ("destination_service", "scoring-service"),
                ("grpc_status", "10")
            ]
        ),
        Some(1.0),
        "{text}"
    );
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<EchoRequest>,
) -> impl futures_util::Stream<Item = EchoRequest> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
