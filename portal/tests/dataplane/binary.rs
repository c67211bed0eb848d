//! The `portal` binary: serving Redis, draining on SIGTERM, the drain timeout and bad files.

use super::*;

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
