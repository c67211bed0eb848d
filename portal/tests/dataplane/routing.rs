//! Picking backends: refused and unanswering backends skipped, the routing modes, and the
//! PROXY protocol in and out.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_unanswering_backends_are_skipped() {
    let echo = TestServer::named("good").await;
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let hole = Blackhole::start().await;
    let portal = Portal::start(&yaml(
        "tcp",
        &[
            ("refused", refused),
            ("hole", hole.addr),
            ("good", echo.addr),
        ],
        "routing: {mode: first}\ntimeouts: {connect: 3s}",
    ))
    .await;
    let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    let mut line = [0u8; 5];
    within("failover", c.read_exact(&mut line)).await.unwrap();
    assert_eq!(&line, b"good\n");
    let m = portal.metrics().await;
    assert_eq!(
        metric(
            &m,
            "dbportal_backend_connect_errors_total{backend=\"refused\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "dbportal_backend_connect_errors_total{backend=\"hole\"}"
        ),
        Some(1.0)
    );
    // Nothing routable: the client is closed and counted.
    portal.reload(&yaml(
        "tcp",
        &[("refused", refused)],
        "timeouts: {connect: 1s}",
    ));
    let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    assert!(closed_within(&mut c, STEP).await);
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"no_backend\"}"),
        Some(1.0)
    );
    portal.stop().await;
}

async fn first_line(portal: std::net::SocketAddr, from: &str) -> (tokio::net::TcpStream, String) {
    let mut s = connect_from(from, portal).await.unwrap();
    let mut buf = Vec::new();
    within("backend name", async {
        loop {
            let b = s.read_u8().await.unwrap();
            if b == b'\n' {
                break;
            }
            buf.push(b);
        }
    })
    .await;
    (s, String::from_utf8(buf).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_modes_pick_backends() {
    let a = TestServer::named("a").await;
    let b = TestServer::named("b").await;
    let both = [("a", a.addr), ("b", b.addr)];
    let portal = Portal::start(&yaml("tcp", &both, "routing: {mode: roundrobin}")).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(first_line(portal.addr, "127.0.0.1").await.1);
    }
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 2, "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "b").count(), 2, "{names:?}");

    // leastconn: with a session held on one backend, the next goes to the other.
    portal.reload(&yaml("tcp", &both, "routing: {mode: leastconn}"));
    let (held, first) = first_line(portal.addr, "127.0.0.1").await;
    for _ in 0..3 {
        let (s, next) = first_line(portal.addr, "127.0.0.1").await;
        assert_ne!(next, first);
        drop(s);
        // Wait until the portal counts it closed, so the next choice is not a tie.
        for _ in 0..500 {
            let st = portal.status().await;
            let open: u64 = st["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b["activeSessions"].as_u64().unwrap())
                .sum();
            if open == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    drop(held);

    // source: each client address always reaches the same backend, and both are used.
    portal.reload(&yaml("tcp", &both, "routing: {mode: source}"));
    let mut seen = std::collections::HashSet::new();
    for last in 2..12 {
        let from = format!("127.0.0.{last}");
        let (_s, one) = first_line(portal.addr, &from).await;
        for _ in 0..2 {
            let (_s, again) = first_line(portal.addr, &from).await;
            assert_eq!(again, one, "{from}");
        }
        seen.insert(one);
    }
    assert_eq!(seen.len(), 2, "source hashing used one backend only");

    // first (and leader, until a leader is known): the first healthy node, then the next.
    portal.reload(&yaml("tcp", &both, "routing: {mode: first}"));
    assert_eq!(first_line(portal.addr, "127.0.0.1").await.1, "a");
    let mut view = HealthView::assume_up(["a", "b"]);
    view.backends[0].up = false;
    portal.health.send_replace(view);
    assert_eq!(first_line(portal.addr, "127.0.0.1").await.1, "b");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_headers_in() {
    let echo = TestServer::echo().await;
    let portal = Portal::start(&yaml(
        "tcp",
        &[("e", echo.addr)],
        "proxyProtocol: {accept: true, trustedCIDRs: [\"127.0.0.1/32\"]}\nallowedCIDRs: [\"192.0.2.0/24\", \"2001:db8::/32\", \"10.0.0.0/8\"]\ntimeouts: {client: 1s}\nlimits: {maxConnectionsPerClient: 1}",
    ))
    .await;
    let v2 = proxy_protocol::encode_v2(
        "[2001:db8::7]:5000".parse().unwrap(),
        "[2001:db8::1]:7000".parse().unwrap(),
    );
    let valid: Vec<(&str, Vec<u8>)> = vec![
        (
            "v1 tcp4",
            b"PROXY TCP4 192.0.2.10 192.0.2.1 5000 7000\r\n".to_vec(),
        ),
        (
            "v1 tcp6 + data",
            b"PROXY TCP6 2001:db8::9 2001:db8::1 5000 7000\r\n".to_vec(),
        ),
        ("v2 tcp6", v2),
    ];
    let mut open = Vec::new();
    for (name, header) in valid {
        let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
        // Header and first data in one write: the bytes after the header must reach the backend.
        let mut first = header.clone();
        first.extend_from_slice(b"ping");
        c.write_all(&first).await.unwrap();
        let mut back = [0u8; 4];
        within(name, c.read_exact(&mut back)).await.unwrap();
        assert_eq!(&back, b"ping", "{name}");
        open.push(c);
    }
    let accepted = echo.accepted();
    let mut truncated_v2 = proxy_protocol::encode_v2(
        "192.0.2.5:1".parse().unwrap(),
        "192.0.2.1:2".parse().unwrap(),
    );
    truncated_v2.truncate(20);
    let refused: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "denied source",
            b"PROXY TCP4 198.51.100.1 192.0.2.1 5000 7000\r\n".to_vec(),
            false,
        ),
        (
            "per-client limit",
            b"PROXY TCP4 192.0.2.10 192.0.2.1 5001 7000\r\n".to_vec(),
            false,
        ),
        (
            "garbage",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        ("no header", b"*1\r\n$4\r\nPING\r\n".to_vec(), false),
        (
            "bad v1",
            b"PROXY TCP4 192.0.2.300 192.0.2.1 1 2\r\n".to_vec(),
            false,
        ),
        (
            "truncated v1 then FIN",
            b"PROXY TCP4 192.0.2.10 192.".to_vec(),
            true,
        ),
        ("truncated v2 then FIN", truncated_v2.clone(), true),
        ("truncated v2, silence", truncated_v2, false),
    ];
    for (name, bytes, fin) in refused {
        let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
        c.write_all(&bytes).await.unwrap();
        if fin {
            c.shutdown().await.unwrap();
        }
        assert!(closed_within(&mut c, STEP).await, "{name}: not closed");
    }
    // A header from a peer that is not a trusted load balancer is not believed: a client on
    // 127.0.0.5 claiming an allowed 10.x address is closed before its header is read.
    for i in 0..3 {
        let mut c = connect_from("127.0.0.5", portal.addr).await.unwrap();
        let _ = c
            .write_all(format!("PROXY TCP4 10.1.2.3 10.0.0.1 {} 7000\r\nping", 5000 + i).as_bytes())
            .await;
        assert!(
            closed_within(&mut c, STEP).await,
            "untrusted peer not closed"
        );
    }
    assert_eq!(
        echo.accepted(),
        accepted,
        "a refused header reached the backend"
    );
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"untrusted_proxy\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"proxy_header\"}"),
        Some(6.0)
    );
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"allowlist\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"per_client_limit\"}"),
        Some(1.0)
    );
    drop(open);
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v2_out() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let capture = TestServer::capture(28, tx).await;
    let portal = Portal::start(&yaml(
        "tcp",
        &[("c", capture.addr)],
        "proxyProtocol: {send: true}",
    ))
    .await;
    let mut c = connect_from("127.0.0.7", portal.addr).await.unwrap();
    let client = c.local_addr().unwrap();
    c.write_all(b"data").await.unwrap();
    let header = within("header", rx.recv()).await.unwrap();
    let (parsed, n) = proxy_protocol::parse(&header).unwrap().unwrap();
    assert_eq!(n, 28);
    assert_eq!(
        parsed,
        proxy_protocol::Header::Proxy {
            source: client,
            destination: portal.addr
        }
    );
    let mut back = [0u8; 4];
    within("data after header", c.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"data");
    portal.stop().await;
}
