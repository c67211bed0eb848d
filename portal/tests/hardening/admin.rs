//! The admin endpoint's own limits on connections, header and body sizes.

use super::*;

/// Opens `n` admin connections and waits until the portal has closed those past its cap;
/// returns how many it closed, and the ones left open.
async fn flood_admin(admin: SocketAddr, n: usize, expect_closed: usize) -> (usize, Vec<TcpStream>) {
    let mut idle = Vec::new();
    for _ in 0..n {
        idle.push(TcpStream::connect(admin).await.unwrap());
    }
    // The accept loop closes the ones past the cap as it reaches them.
    let deadline = Instant::now() + STEP;
    let closed = loop {
        let closed = closed_count(&mut idle).await;
        if closed >= expect_closed || Instant::now() > deadline {
            break closed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (closed, idle)
}

/// Sends `request` on a new admin connection and reads until the portal closes it.
async fn admin_raw(admin: SocketAddr, request: Vec<u8>) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    let _ = s.write_all(&request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

fn with_header(bytes: usize) -> Vec<u8> {
    format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(bytes)
    )
    .into_bytes()
}

fn with_body(bytes: usize) -> Vec<u8> {
    let mut r = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: {bytes}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    r.resize(r.len() + bytes, b'b');
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_caps_connections_heads_and_bodies() {
    let echo = TestServer::echo().await;
    let base = yaml("tcp", &[("e", echo.addr)], "");
    let portal = Portal::start(&base).await;
    let refused = |m: &str, reason: &str| {
        metric(
            m,
            &format!("dbportal_admin_requests_refused_total{{reason=\"{reason}\"}}"),
        )
    };

    // The defaults: 64 connections, 16 KiB heads, 64 KiB bodies.
    let cap = portal.config.borrow().admin_limits.max_connections;
    assert_eq!(cap, 64);
    let (closed, idle) = flood_admin(portal.admin, cap + 36, 36).await;
    assert_eq!(closed, 36, "connections past the cap are closed at once");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_admin_connections_refused_total"),
        Some(36.0)
    );
    assert_eq!(refused(&m, "header_too_large"), Some(0.0));
    assert_eq!(refused(&m, "body_too_large"), Some(0.0));

    let r = admin_raw(portal.admin, with_header(64 << 10)).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let r = admin_raw(
        portal.admin,
        b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    for request in [with_header(12 << 10), with_body(3000)] {
        let r = admin_raw(portal.admin, request).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let m = portal.metrics().await;
    assert_eq!(refused(&m, "header_too_large"), Some(1.0));
    assert_eq!(refused(&m, "body_too_large"), Some(1.0));

    // Configured smaller, applied by a reload to the next connections.
    let limits = "adminLimits: {maxConnections: 4, maxHeaderBytes: 8Ki, maxBodyBytes: 2Ki, \
                  connectionLifetime: 1s}";
    assert!(portal.reload(&yaml("tcp", &[("e", echo.addr)], limits)));
    let (closed, idle) = flood_admin(portal.admin, 4 + 3, 3).await;
    assert_eq!(
        closed, 3,
        "connections past the configured cap are closed at once"
    );
    drop(idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (request, status) in [
        (with_header(12 << 10), "431"),
        (with_header(6 << 10), "200"),
        (with_body(3000), "413"),
        (with_body(1000), "200"),
    ] {
        let r = admin_raw(portal.admin, request).await;
        assert!(r.starts_with(&format!("HTTP/1.1 {status}")), "{r}");
    }
    // A kept-alive connection ends at connectionLifetime, well before the head deadline.
    let mut kept = TcpStream::connect(portal.admin).await.unwrap();
    let opened = Instant::now();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, kept.read_to_end(&mut out)).await;
    let lasted = opened.elapsed();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(3),
        "closed after {lasted:?}"
    );
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_admin_connections_refused_total"),
        Some(39.0)
    );
    assert_eq!(refused(&m, "header_too_large"), Some(2.0));
    assert_eq!(refused(&m, "body_too_large"), Some(2.0));

    // Back to the defaults: 12 KiB heads pass again.
    assert!(portal.reload(&base));
    let r = admin_raw(portal.admin, with_header(12 << 10)).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    portal.stop().await;
}
