//! A stand-in model endpoint for the LLM relay tests: plain HTTP/1.1 on
//! 127.0.0.1, recording every request it sees.
//!
//! Routes:
//! - `POST /v1/echo`: `{"len": n, "sum": Σ bytes mod 2³²}` of the body;
//! - `GET /v1/sse`: five server-sent events; the first at once, the other
//!   four 200 ms apart once the test calls [`Upstream::release`];
//! - `GET /v1/concurrent`: answers only once 16 such requests are in flight;
//! - `GET /v1/ratelimited`: `429` with `retry-after: 7`;
//! - `GET /v1/big`: 64 MiB, streamed;
//! - a WebSocket upgrade (any path): `101`, then a greeting from the
//!   upstream, then each text message echoed as `echo: <text>`;
//! - anything else: `200` with `ok`.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Barrier, Notify};

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: hyper::HeaderMap,
    pub body_len: usize,
}

pub struct Upstream {
    pub port: u16,
    /// TCP connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    release: Arc<Notify>,
    /// Log of the SSE route: "sent 0", "released", "sent 1", ...
    pub sse_log: Arc<Mutex<Vec<String>>>,
    server: tokio::task::JoinHandle<()>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
    r
}

impl Upstream {
    pub async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(Notify::new());
        let sse_log = Arc::new(Mutex::new(Vec::new()));
        let barrier = Arc::new(Barrier::new(16));
        let state = (seen.clone(), release.clone(), sse_log.clone(), barrier);
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            Ok::<_, Infallible>(
                                handle(req, &state.0, &state.1, &state.2, &state.3).await,
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Upstream {
            port,
            accepted,
            seen,
            release,
            sse_log,
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Lets the SSE route send its remaining events.
    pub fn release(&self) {
        self.sse_log.lock().expect("log").push("released".into());
        self.release.notify_one();
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    seen: &Mutex<Vec<Seen>>,
    release: &Arc<Notify>,
    sse_log: &Arc<Mutex<Vec<String>>>,
    barrier: &Barrier,
) -> Response<Body> {
    if req.headers().contains_key(hyper::header::UPGRADE) {
        return websocket(req, seen);
    }
    let path = req.uri().path().to_string();
    let headers = req.headers().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return full(400, "bad body"),
    };
    seen.lock().expect("seen").push(Seen {
        path: path.clone(),
        headers,
        body_len: body.len(),
    });
    match path.as_str() {
        "/v1/echo" => {
            let sum = body.iter().fold(0u32, |s, b| s.wrapping_add(u32::from(*b)));
            full(200, format!("{{\"len\": {}, \"sum\": {sum}}}", body.len()))
        }
        "/v1/sse" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
            let release = release.clone();
            let log = sse_log.clone();
            tokio::spawn(async move {
                for i in 0..5 {
                    if i == 1 {
                        release.notified().await;
                    }
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    let ev = format!("event: tick\ndata: {{\"n\": {i}}}\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                        return;
                    }
                    log.lock().expect("log").push(format!("sent {i}"));
                }
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            let mut r = Response::new(BodyExt::boxed(body));
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        "/v1/big" => {
            // 64 MiB, streamed; stops when the client goes away.
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            tokio::spawn(async move {
                let chunk = Bytes::from(vec![b'b'; 64 * 1024]);
                for _ in 0..1024 {
                    if tx.send(Ok(Frame::data(chunk.clone()))).await.is_err() {
                        return;
                    }
                }
            });
            let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            Response::new(BodyExt::boxed(body))
        }
        "/v1/concurrent" => {
            barrier.wait().await;
            full(200, "together")
        }
        "/v1/ratelimited" => {
            let mut r = full(
                429,
                r#"{"type":"error","error":{"type":"rate_limit_error"}}"#,
            );
            r.headers_mut()
                .insert("retry-after", hyper::header::HeaderValue::from_static("7"));
            r
        }
        _ => full(200, "ok"),
    }
}

/// Answers a WebSocket upgrade: `101`, then (on the upgraded connection) a
/// greeting and an echo of each text message, until the client closes.
fn websocket(mut req: Request<Incoming>, seen: &Mutex<Vec<Seen>>) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key, protocol::Role};
    seen.lock().expect("seen").push(Seen {
        path: req.uri().path().to_string(),
        headers: req.headers().clone(),
        body_len: 0,
    });
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return full(400, "no sec-websocket-key");
    };
    let upgraded = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(io) = upgraded.await else { return };
        let io = hyper_util::rt::TokioIo::new(io);
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
        if ws.send(Message::text("hello from upstream")).await.is_err() {
            return;
        }
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) => Message::text(format!("echo: {t}")),
                Message::Close(_) => return,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                return;
            }
        }
    });
    let mut r = full(101, Bytes::new());
    let h = r.headers_mut();
    h.insert(
        "connection",
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        "upgrade",
        hyper::header::HeaderValue::from_static("websocket"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", v);
    }
    r
}
