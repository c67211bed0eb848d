//! Sessions end to end: Redis through the portal, the allow list, connection limits,
//! inactivity timeouts and half-close.

use super::*;

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
