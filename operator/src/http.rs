//! The operator's small HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (alive) and
//! `/readyz` (started: the API was reached and the controller, or its standby, runs).
//!
//! May import: `metrics`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::debug;

use crate::metrics::Metrics;

/// Readiness shared between the operator and its HTTP endpoint.
#[derive(Clone, Default, Debug)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Serves until the task is dropped, HTTP/1.1 through hyper (as the portal's admin endpoint).
/// Requests are tiny GETs: a head gets 5 s to arrive and 8 KiB at most, a connection 30 s.
pub async fn serve(listener: TcpListener, metrics: Metrics, ready: Readiness) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (metrics, ready) = (metrics.clone(), ready.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let reply = respond(&metrics, &ready, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(reply) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(8192)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), connection).await;
        });
    }
}

/// The answer to one request: what a path serves, by method.
fn respond(
    metrics: &Metrics,
    ready: &Readiness,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    let (status, content_type, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (&Method::GET | &Method::HEAD, "/healthz") => (StatusCode::OK, text, "ok\n".into()),
        (&Method::GET | &Method::HEAD, "/readyz") if ready.get() => {
            (StatusCode::OK, text, "ok\n".into())
        }
        (&Method::GET | &Method::HEAD, "/readyz") => {
            (StatusCode::SERVICE_UNAVAILABLE, text, "starting\n".into())
        }
        (&Method::GET | &Method::HEAD, _) => (StatusCode::NOT_FOUND, text, "not found\n".into()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, text, "GET only\n".into()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// One request as bytes on the wire, the connection closed after it; the whole answer.
    async fn send(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        send(addr, request.as_bytes()).await
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ready = Readiness::default();
        let metrics = Metrics::default();
        metrics.reconcile_started();
        let server = tokio::spawn(serve(listener, metrics, ready.clone()));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        ready.set(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let m = get(addr, "/metrics").await;
        assert!(m.contains("dbportal_operator_reconciles_total 1"), "{m}");
        assert!(
            m.contains("content-type: application/openmetrics-text"),
            "{m}"
        );
        assert!(get(addr, "/metrics?x=1").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        let post = send(
            addr,
            b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.contains("allow: GET, HEAD"), "{post}");
        // Not HTTP: hyper answers 400 and closes.
        let junk = send(addr, b"\x16\x03\x01 not http\r\n\r\n").await;
        assert!(junk.starts_with("HTTP/1.1 400"), "{junk}");
        // A head past 8 KiB is refused rather than buffered.
        let big = format!(
            "GET /healthz HTTP/1.1\r\nx: {}\r\n\r\n",
            "a".repeat(16 * 1024)
        );
        let big = send(addr, big.as_bytes()).await;
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
        // Two requests on one connection (keep-alive) both answered.
        let two = send(
            addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(two.matches("HTTP/1.1 200").count(), 2, "{two}");
        server.abort();
    }
}
