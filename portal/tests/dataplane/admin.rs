//! The admin endpoints and configuration reloads: an invalid reload refused, a reload under
//! load.

use super::*;

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
