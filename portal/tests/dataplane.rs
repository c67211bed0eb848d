//! The data plane end to end on loopback: the portal in-process (and one binary) in front of a
//! real redis-server and small TCP servers.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use portal::{health::HealthView, proxy_protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHORT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_through_the_portal() {
    let redis = RedisServer::start().await;
    let portal = Portal::start(&yaml(
        "redis",
        &[("r0", redis.addr)],
        "routing: {mode: first}",
    ))
    .await;
    let mut c = within("connect", tokio::net::TcpStream::connect(portal.addr))
        .await
        .unwrap();
    within("SET", async {
        assert_eq!(redis_cmd(&mut c, &["SET", "k", "v1"]).await.unwrap(), "+OK");
        assert_eq!(redis_cmd(&mut c, &["GET", "k"]).await.unwrap(), "$2 v1");
        assert_eq!(redis_cmd(&mut c, &["INCR", "n"]).await.unwrap(), ":1");
    })
    .await;
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_sessions_total"), Some(1.0));
    assert_eq!(metric(&m, "dbportal_sessions_active"), Some(1.0));
    assert!(metric(&m, "dbportal_bytes_total{direction=\"client_to_backend\"}").unwrap() > 50.0);
    assert!(metric(&m, "dbportal_bytes_total{direction=\"backend_to_client\"}").unwrap() > 10.0);
    drop(c);
    let mut closed = false;
    for _ in 0..500 {
        let m = portal.metrics().await;
        if metric(&m, "dbportal_sessions_active") == Some(0.0) {
            assert_eq!(
                metric(&m, "dbportal_sessions_closed_total{reason=\"done\"}"),
                Some(1.0)
            );
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "the session did not end after the client left");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_closes_denied_clients_before_any_backend_connection() {
    let echo = TestServer::echo().await;
    let portal = Portal::start(&yaml(
        "tcp",
        &[("e", echo.addr)],
        "allowedCIDRs: [\"127.0.0.2/32\", \"10.0.0.0/8\"]",
    ))
    .await;
    let mut ok = connect_from("127.0.0.2", portal.addr).await.unwrap();
    assert_eq!(
        within("echo", echo_roundtrip(&mut ok, b"hi"))
            .await
            .unwrap(),
        b"hi"
    );
    for from in ["127.0.0.3", "127.0.0.1"] {
        let mut denied = connect_from(from, portal.addr).await.unwrap();
        let _ = denied.write_all(b"hello").await;
        assert!(closed_within(&mut denied, SHORT).await, "{from} not closed");
    }
    assert_eq!(echo.accepted(), 1, "a denied client reached the backend");
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"allowlist\"}"),
        Some(2.0)
    );
    assert_eq!(
        within("echo", echo_roundtrip(&mut ok, b"still"))
            .await
            .unwrap(),
        b"still"
    );
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_close_new_clients_and_spare_open_sessions() {
    let echo = TestServer::echo().await;
    let portal = Portal::start(&yaml(
        "tcp",
        &[("e", echo.addr)],
        "limits: {maxConnections: 3, maxConnectionsPerClient: 2}",
    ))
    .await;
    // Per client: two from 127.0.0.2, the third is closed.
    let mut a1 = connect_from("127.0.0.2", portal.addr).await.unwrap();
    let mut a2 = connect_from("127.0.0.2", portal.addr).await.unwrap();
    for s in [&mut a1, &mut a2] {
        assert_eq!(within("echo", echo_roundtrip(s, b"x")).await.unwrap(), b"x");
    }
    let mut a3 = connect_from("127.0.0.2", portal.addr).await.unwrap();
    assert!(closed_within(&mut a3, SHORT).await);
    // Another client still fits under maxConnections (3) ...
    let mut b1 = connect_from("127.0.0.3", portal.addr).await.unwrap();
    assert_eq!(
        within("echo", echo_roundtrip(&mut b1, b"y")).await.unwrap(),
        b"y"
    );
    // ... and the next one does not.
    let mut b2 = connect_from("127.0.0.4", portal.addr).await.unwrap();
    assert!(closed_within(&mut b2, SHORT).await);
    assert_eq!(
        echo.accepted(),
        3,
        "a client past a limit reached the backend"
    );
    for s in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(
            within("echo", echo_roundtrip(s, b"alive")).await.unwrap(),
            b"alive"
        );
    }
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"per_client_limit\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "dbportal_rejections_total{reason=\"limit\"}"),
        Some(1.0)
    );
    // Closing one frees a slot.
    drop(b1);
    eventually("slot released", STEP, || echo.accepted() == 3).await;
    let st = portal.status().await;
    assert!(st["connections"]["active"].as_u64().unwrap() <= 3);
    let mut c = None;
    for _ in 0..50 {
        let mut s = connect_from("127.0.0.5", portal.addr).await.unwrap();
        if let Ok(Ok(b)) = tokio::time::timeout(SHORT, echo_roundtrip(&mut s, b"z")).await {
            assert_eq!(b, b"z");
            c = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(c.is_some(), "the freed slot was not reusable");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactivity_timeouts_close_sessions() {
    let echo = TestServer::echo().await;
    let portal = Portal::start(&yaml(
        "tcp",
        &[("e", echo.addr)],
        "timeouts: {client: 300ms, server: 1h}",
    ))
    .await;
    let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    assert_eq!(
        within("echo", echo_roundtrip(&mut c, b"x")).await.unwrap(),
        b"x"
    );
    assert!(closed_within(&mut c, STEP).await, "idle client not cut");
    // Server side: a backend that never answers.
    let silent = TestServer::silent().await;
    portal.reload(&yaml(
        "tcp",
        &[("s", silent.addr)],
        "timeouts: {client: 1h, server: 300ms}",
    ));
    let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    c.write_all(b"are you there?").await.unwrap();
    assert!(closed_within(&mut c, STEP).await, "silent server not cut");
    let m = portal.metrics().await;
    assert_eq!(
        metric(
            &m,
            "dbportal_sessions_closed_total{reason=\"client_timeout\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "dbportal_sessions_closed_total{reason=\"server_timeout\"}"
        ),
        Some(1.0)
    );
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_other_direction() {
    let echo = TestServer::echo().await;
    let portal = Portal::start(&yaml("tcp", &[("e", echo.addr)], "")).await;
    let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = c.split();
    let ((), got) = within("half close", async {
        tokio::join!(
            async {
                w.write_all(&payload).await.unwrap();
                w.shutdown().await.unwrap();
            },
            async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            }
        )
    })
    .await;
    assert_eq!(got.len(), payload.len());
    assert_eq!(got, payload, "bytes after our FIN were lost or changed");
    portal.stop().await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let echo = TestServer::echo().await;
    let portal = Portal::start(&yaml("tcp", &[("e0", echo.addr), ("e1", echo.addr)], "")).await;
    assert_eq!(
        http_get(portal.admin, "/healthz").await,
        (200, "ok\n".into())
    );
    let (code, body) = http_get(portal.admin, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("e0, e1"), "{body}");
    let (code, _) = http_get(portal.admin, "/nope").await;
    assert_eq!(code, 404);
    let _held = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    eventually("session counted", STEP, || true).await;
    let st = portal.status().await;
    assert_eq!(st["backends"][0]["name"], "e0");
    assert_eq!(st["backends"][0]["up"], true);
    assert_eq!(st["backends"][1]["role"], "unknown");
    assert_eq!(st["leader"], serde_json::Value::Null);
    assert_eq!(st["config"]["generation"], 1);
    let m = portal.metrics().await;
    for family in [
        "dbportal_sessions_active",
        "dbportal_sessions_total",
        "dbportal_rejections_total{reason=\"allowlist\"}",
        "dbportal_rejections_total{reason=\"limit\"}",
        "dbportal_rejections_total{reason=\"per_client_limit\"}",
        "dbportal_rejections_total{reason=\"no_backend\"}",
        "dbportal_bytes_total{direction=\"client_to_backend\"}",
        "dbportal_bytes_total{direction=\"backend_to_client\"}",
        "dbportal_backend_up{backend=\"e0\"}",
        "dbportal_backend_connect_errors_total{backend=\"e1\"}",
        "dbportal_config_reloads_total{result=\"ok\"}",
        "dbportal_config_reloads_total{result=\"failed\"}",
        "dbportal_config_last_reload_successful",
        "dbportal_config_stale",
    ] {
        assert!(metric(&m, family).is_some(), "{family} missing:\n{m}");
    }
    // Every backend down: not ready, and the body says why.
    let mut view = HealthView::assume_up(["e0", "e1"]);
    for b in &mut view.backends {
        b.up = false;
        b.last_error = Some("connection refused".into());
    }
    portal.health.send_replace(view);
    let (code, body) = http_get(portal.admin, "/readyz").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("no routable backend") && body.contains("connection refused"),
        "{body}"
    );
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_backend_up{backend=\"e0\"}"), Some(0.0));
    assert_eq!(metric(&m, "dbportal_ready"), Some(0.0));
    let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    assert!(
        closed_within(&mut c, STEP).await,
        "a client was routed to a down backend"
    );
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_refused_and_the_old_config_keeps_serving() {
    let echo = TestServer::echo().await;
    let dir = TempDir::new("invalid-reload");
    let good = yaml(
        "tcp",
        &[("e", echo.addr)],
        "allowedCIDRs: [\"127.0.0.0/8\"]",
    );
    let path = dir.write("portal.yaml", &good);
    let portal = Portal::start(&good).await;
    let watcher = portal.watch_file(path.clone(), good.clone());
    dir.write("portal.yaml", &good.replace("127.0.0.0/8", "127.0.0.0/33"));
    eventually("refusal seen", STEP, || {
        portal.reload.snapshot().reloads_failed == 1
    })
    .await;
    let st = portal.status().await;
    let reload = &st["config"]["reload"];
    assert_eq!(reload["stale"], true);
    assert_eq!(reload["lastErrorFields"][0], "allowedCIDRs[0]");
    assert!(
        reload["lastError"]
            .as_str()
            .unwrap()
            .contains("allowedCIDRs[0]"),
        "{reload}"
    );
    assert_eq!(st["config"]["generation"], 1);
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_config_stale"), Some(1.0));
    assert_eq!(
        metric(&m, "dbportal_config_reloads_total{result=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "dbportal_config_last_reload_successful"),
        Some(0.0)
    );
    let (code, body) = http_get(portal.admin, "/readyz").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("refused") && body.contains("allowedCIDRs[0]"),
        "{body}"
    );
    // The last good configuration serves.
    let mut c = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    assert_eq!(
        within("echo", echo_roundtrip(&mut c, b"ok")).await.unwrap(),
        b"ok"
    );
    // An unknown field is refused by name too; then a good file clears the stale flag.
    dir.write("portal.yaml", &format!("{good}maxConnection: 5\n"));
    eventually("second refusal", STEP, || {
        portal.reload.snapshot().reloads_failed == 2
    })
    .await;
    assert_eq!(
        portal.reload.snapshot().last_error_fields,
        vec!["maxConnection".to_string()]
    );
    dir.write("portal.yaml", &good.replace("127.0.0.0/8", "127.0.0.0/16"));
    eventually("recovery", STEP, || {
        portal.reload.snapshot().reloads_ok == 1
    })
    .await;
    let m = portal.metrics().await;
    assert_eq!(metric(&m, "dbportal_config_stale"), Some(0.0));
    assert_eq!(metric(&m, "dbportal_config_generation"), Some(2.0));
    watcher.abort();
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_nothing_and_cuts_removed_networks() {
    let redis = RedisServer::start().await;
    let dir = TempDir::new("reload-load");
    let base = |n: usize, cidrs: &str| {
        yaml(
            "redis",
            &[("r0", redis.addr)],
            &format!(
                "routing: {{mode: first}}\nlimits: {{maxConnections: {}}}\nallowedCIDRs: [{cidrs}]",
                100 + n
            ),
        )
    };
    let both = "\"127.0.0.2/32\", \"127.0.0.3/32\"";
    let first = base(0, both);
    let path = dir.write("portal.yaml", &first);
    let portal = Arc::new(Portal::start(&first).await);
    let watcher = portal.watch_file(path, first);

    // Busy clients from 127.0.0.2: persistent sessions plus fresh connections, bounded.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, addr) = (stop.clone(), portal.addr);
        workers.push(tokio::spawn(async move {
            let mut ops = 0u64;
            let mut errors = Vec::new();
            let mut s = connect_from("127.0.0.2", addr).await.unwrap();
            for i in 0..200_000u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let key = format!("w{w}");
                match tokio::time::timeout(STEP, redis_cmd(&mut s, &["INCR", &key])).await {
                    Ok(Ok(r)) if r.starts_with(':') => ops += 1,
                    other => errors.push(format!("op {i}: {other:?}")),
                }
                if w == 0 && i % 50 == 0 {
                    // A fresh session now and then.
                    match connect_from("127.0.0.2", addr).await {
                        Ok(mut fresh) => match redis_cmd(&mut fresh, &["PING"]).await {
                            Ok(r) if r == "+PONG" => {}
                            other => errors.push(format!("fresh {i}: {other:?}")),
                        },
                        Err(e) => errors.push(format!("fresh connect {i}: {e}")),
                    }
                }
            }
            (ops, errors)
        }));
    }
    // A session from 127.0.0.3 that the last change removes.
    let mut doomed = connect_from("127.0.0.3", portal.addr).await.unwrap();
    assert_eq!(
        within("doomed", redis_cmd(&mut doomed, &["PING"]))
            .await
            .unwrap(),
        "+PONG"
    );

    let dir_ref = &dir;
    for n in 1..=20 {
        dir_ref.write("portal.yaml", &base(n, both));
        let p = portal.clone();
        eventually("reload applied", STEP, || {
            p.reload.snapshot().reloads_ok == n as u64
        })
        .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(
        within("doomed still served", redis_cmd(&mut doomed, &["PING"]))
            .await
            .unwrap(),
        "+PONG"
    );
    dir.write("portal.yaml", &base(21, "\"127.0.0.2/32\""));
    assert!(
        closed_within(&mut doomed, STEP).await,
        "a session from a removed CIDR stayed open"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let (ops, errors) = within("worker", w).await.unwrap();
        assert!(
            errors.is_empty(),
            "session errors during reloads: {errors:?}"
        );
        assert!(ops > 0);
        total += ops;
    }
    assert!(total > 20, "the load was not running ({total} ops)");
    let st = portal.status().await;
    assert_eq!(st["config"]["generation"], 22);
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_sessions_closed_total{reason=\"policy\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "dbportal_config_reloads_total{result=\"failed\"}"),
        Some(0.0)
    );
    watcher.abort();
    Arc::try_unwrap(portal).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_redis_and_drains_on_sigterm() {
    let redis = RedisServer::start().await;
    let mut p = PortalBuilder::new(&yaml(
        "redis",
        &[("r0", redis.addr)],
        "routing: {mode: first}\ndrainTimeout: 20s",
    ))
    .spawn();
    let mut session = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        within("SET", redis_cmd(&mut session, &["SET", "a", "1"]))
            .await
            .unwrap(),
        "+OK"
    );
    let (code, _) = http_get(p.admin, "/healthz").await;
    assert_eq!(code, 200);

    p.proc.signal("TERM");
    // Draining: the open session still works, new connections are not accepted.
    eventually("stops accepting", STEP, || p.log_contains("shutting down")).await;
    assert_eq!(
        within("GET during drain", redis_cmd(&mut session, &["GET", "a"]))
            .await
            .unwrap(),
        "$1 1"
    );
    let refused = match tokio::net::TcpStream::connect(p.addr).await {
        Err(_) => true,
        Ok(mut s) => closed_within(&mut s, SHORT).await,
    };
    assert!(refused, "a new connection was served while draining");
    assert!(p.proc.running(), "exited before its session ended");
    drop(session);
    let status = tokio::task::spawn_blocking(move || {
        let s = p.proc.wait_exit(STEP);
        (s, p)
    })
    .await
    .unwrap();
    let (status, p) = status;
    let status = status.unwrap_or_else(|| {
        panic!(
            "no exit after the last session: {:?}",
            p.log.lock().unwrap()
        )
    });
    assert!(status.success(), "exit {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_closes_sessions_at_the_drain_timeout_and_refuses_bad_files() {
    let echo = TestServer::echo().await;
    let dir = TempDir::new("binary-drain");
    let good = yaml("tcp", &[("e", echo.addr)], "drainTimeout: 500ms");
    let mut p = PortalBuilder::new(&good)
        .file(&dir.path().join("portal.yaml"))
        .spawn();
    let mut session = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    assert_eq!(
        within("echo", echo_roundtrip(&mut session, b"x"))
            .await
            .unwrap(),
        b"x"
    );
    // An invalid file (SIGHUP re-reads at once) is refused with the field named.
    dir.write(
        "portal.yaml",
        &good.replace("engine: tcp", "engine: oracle"),
    );
    p.proc.signal("HUP");
    eventually("refusal logged", STEP, || {
        p.log_contains("configuration refused")
    })
    .await;
    assert!(p.log_contains("engine"), "{:?}", p.log.lock().unwrap());
    let (_, status) = http_get(p.admin, "/status").await;
    assert!(status.contains("\"stale\":true"), "{status}");
    assert_eq!(
        within("still served", echo_roundtrip(&mut session, b"y"))
            .await
            .unwrap(),
        b"y"
    );

    p.proc.signal("TERM");
    assert!(
        closed_within(&mut session, STEP).await,
        "session not closed at the drain timeout"
    );
    let (status, p) = tokio::task::spawn_blocking(move || (p.proc.wait_exit(STEP), p))
        .await
        .unwrap();
    let status = status.unwrap_or_else(|| panic!("no exit: {:?}", p.log.lock().unwrap()));
    assert!(status.success(), "exit {status:?}");
    assert!(p.log_contains("drain timeout reached"));
}
