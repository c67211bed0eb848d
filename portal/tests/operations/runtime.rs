//! Runtime drain, maint and weight through the admin endpoint, behind its token.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_open_sessions_maint_cuts_them_and_both_survive_reloads() {
    let servers = redis_backends(2).await;
    let dir = TempDir::new("drain");
    let token = dir.write("token", TOKEN);
    let more = format!("adminTokenFile: {}", token.display());
    let yaml = backends_yaml("roundrobin", &servers, &[], &more);
    let portal = Portal::start(&yaml).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(session(portal.addr).await);
    }
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        r#"{"state": "drain"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    // Open sessions go on, on both backends; new ones go to b1 only.
    for s in &mut open {
        assert_eq!(redis_cmd(s, &["PING"]).await.unwrap(), "+PONG");
    }
    let before = totals(&portal).await;
    for _ in 0..10 {
        drop(session(portal.addr).await);
    }
    let after = totals(&portal).await;
    assert_eq!(
        after["b0"], before["b0"],
        "a drained backend took a session"
    );
    let status = portal.status().await;
    assert_eq!(backend(&status, "b0")["adminState"], "drain");
    assert_eq!(backend(&status, "b0")["adminOverride"], true);
    assert_eq!(backend(&status, "b0")["activeSessions"], 2);

    // A reload (another timeout) keeps the runtime state.
    assert!(portal.reload(&yaml.replace("drainTimeout: 1s", "drainTimeout: 2s")));
    for _ in 0..4 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b0"], before["b0"]);
    assert_eq!(
        metric(
            &portal.metrics().await,
            "dbportal_backend_admin_state{backend=\"b0\",state=\"drain\"}"
        ),
        Some(1.0)
    );

    // maint with cutSessions closes b0's open sessions, not b1's.
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        r#"{"state": "maint", "cutSessions": true}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"cut\":2"), "{body}");
    let mut alive = 0;
    for s in &mut open {
        if redis_cmd(s, &["PING"]).await.is_ok_and(|r| r == "+PONG") {
            alive += 1;
        }
    }
    assert_eq!(alive, 2, "b1's two sessions go on");
    let m = portal.metrics().await;
    assert_eq!(
        metric(&m, "dbportal_sessions_closed_total{reason=\"admin\"}"),
        Some(2.0)
    );

    // Cleared: the configuration's state (ready) applies again.
    let (code, _) = http(
        portal.admin,
        "DELETE",
        "/backends/b0/state",
        Some(TOKEN),
        "",
    )
    .await;
    assert_eq!(code, 200);
    let before = totals(&portal).await["b0"];
    for _ in 0..4 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b0"], before + 2);

    // The configuration can drain too (the operator's spec.backends[].state).
    assert!(portal.reload(&yaml.replace(
        &format!("address: \"{}\"}}", servers[1].addr),
        &format!("address: \"{}\", state: drain}}", servers[1].addr)
    )));
    let before = totals(&portal).await["b1"];
    for _ in 0..4 {
        drop(session(portal.addr).await);
    }
    assert_eq!(totals(&portal).await["b1"], before);

    // Sessions of one client address, or of a backend, closed on request.
    let mut s = session(portal.addr).await;
    let (code, body) = http(
        portal.admin,
        "POST",
        "/sessions/close",
        Some(TOKEN),
        r#"{"client": "127.0.0.1"}"#,
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert!(closed_within(&mut s, STEP).await);
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_requests_need_the_token_and_change_nothing_without_it() {
    let servers = redis_backends(1).await;
    let dir = TempDir::new("token");
    let token = dir.write("token", &format!("{TOKEN}\n"));
    let yaml = backends_yaml(
        "roundrobin",
        &servers,
        &[],
        &format!("adminTokenFile: {}", token.display()),
    );
    let portal = Portal::start(&yaml).await;
    let drain = r#"{"state": "drain"}"#;
    for token in [None, Some("wrong"), Some("s3cret-token-012345678")] {
        let (code, _) = http(portal.admin, "POST", "/backends/b0/state", token, drain).await;
        assert_eq!(code, 401, "{token:?}");
        let (code, _) = http(
            portal.admin,
            "POST",
            "/sessions/close",
            token,
            r#"{"backend": "b0"}"#,
        )
        .await;
        assert_eq!(code, 401);
    }
    assert_eq!(backend(&portal.status().await, "b0")["adminState"], "ready");
    // Errors name what is wrong.
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/nope/state",
        Some(TOKEN),
        drain,
    )
    .await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/weight",
        Some(TOKEN),
        r#"{"weight": 300}"#,
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("weight"), "{body}");
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        r#"{"state": "paused"}"#,
    )
    .await;
    assert_eq!(code, 400);
    assert!(body.contains("paused"), "{body}");
    // Rotated: the new token works at once, the old one no longer.
    std::fs::write(&token, "rotated-token-abcdef").unwrap();
    let (code, _) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        drain,
    )
    .await;
    assert_eq!(code, 401);
    let (code, _) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some("rotated-token-abcdef"),
        drain,
    )
    .await;
    assert_eq!(code, 200);
    // Reads are open unless adminTokenForReads; probes always are.
    assert_eq!(http_get(portal.admin, "/status").await.0, 200);
    assert!(portal.reload(&format!("{yaml}adminTokenForReads: true\n")));
    for path in ["/status", "/metrics", "/", "/;csv"] {
        assert_eq!(http_get(portal.admin, path).await.0, 401, "{path}");
        let (code, _) = http(portal.admin, "GET", path, Some("rotated-token-abcdef"), "").await;
        assert_eq!(code, 200, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        let code = http_get(portal.admin, path).await.0;
        assert!(code == 200 || code == 503, "{path}: {code}");
        assert_ne!(code, 401);
    }
    portal.stop().await;

    // Without adminTokenFile nothing may change.
    let portal = Portal::start(&backends_yaml("roundrobin", &servers, &[], "")).await;
    let (code, body) = http(
        portal.admin,
        "POST",
        "/backends/b0/state",
        Some(TOKEN),
        drain,
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("adminTokenFile"), "{body}");
    portal.stop().await;
}
