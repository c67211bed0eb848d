//! The pools' own life (min idle, idle and old connections) and the clients' (allow-list
//! re-checks, admin closes, a login waiting past the handshake deadline).

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_keep_min_idle_close_idle_connections_and_replace_old_ones() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let wait_for = |what: &str, want: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !want() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // serverIdleTimeout: four connections opened by four transactions at once are closed
    // when idle, down to minIdle.
    {
        let portal = Portal::start(
            &[&pg],
            "mode: transaction, poolSize: 4, minIdle: 1, serverIdleTimeout: 2s",
            "",
        )
        .await;
        let mut clients = Vec::new();
        for _ in 0..4 {
            let c = portal.client("app", "apppw").await.unwrap();
            c.simple_query("BEGIN; SELECT 1").await.unwrap();
            clients.push(c);
        }
        assert_eq!(backends_of(&pg, "app"), 4);
        for c in &clients {
            c.simple_query("COMMIT").await.unwrap();
        }
        wait_for("idle connections closed down to minIdle", &|| {
            backends_of(&pg, "app") == 1
        });
        let m = portal.metrics().await;
        assert!(server_connections_closed(&m) >= 3.0, "{m}");
        // The clients are still there; their next transactions open what they need.
        for c in &clients {
            assert_eq!(query_one(c, "SELECT 2").await, "2");
        }
    }
    wait_for("the first portal's connections gone", &|| {
        backends_of(&pg, "app") == 0
    });
    // minIdle: the pool opens connections nobody asked for; serverLifetime: they are
    // replaced by new ones when they grow old.
    let portal = Portal::start(
        &[&pg],
        "mode: transaction, poolSize: 4, minIdle: 2, serverLifetime: 2s",
        "",
    )
    .await;
    let c = portal.client("app", "apppw").await.unwrap();
    wait_for("minIdle connections opened", &|| {
        backends_of(&pg, "app") == 2
    });
    let pids = |pg: &Postgres| {
        pg.psql("SELECT string_agg(pid::text, ',' ORDER BY pid) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'")
    };
    let first = pids(&pg);
    wait_for("old connections replaced", &|| {
        let now = pids(&pg);
        now.split(',').count() == 2 && now.split(',').all(|p| !first.split(',').any(|f| f == p))
    });
    assert_eq!(query_one(&c, "SELECT 3").await, "3");
}

/// Pooled clients are in the session registry, in both pooling modes: narrowing
/// `allowedCIDRs` closes the clients it excludes and keeps the others; `POST /sessions/close`
/// by client closes that address's clients and says how many; by backend, the clients that
/// hold one of its server connections now (mid-transaction; in session mode every logged-in
/// client), and a transaction cut that way is never handed to the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_changes_and_admin_closes_reach_pooled_clients() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    for mode in ["transaction", "session"] {
        // One server connection in transaction mode: a transaction left on it would be seen.
        let size = if mode == "transaction" { 1 } else { 8 };
        let dir = TempDir::new("pool-admin");
        let token = dir.path().join("token");
        std::fs::write(&token, "pool-admin-token-0123456789").unwrap();
        let extra = format!(
            "adminTokenFile: {}\nallowedCIDRs: [\"127.0.0.0/8\"]\n",
            token.display()
        );
        let pooling = format!("mode: {mode}, poolSize: {size}, queueTimeout: 5s");
        let portal = Portal::start(&[&pg], &pooling, &extra).await;
        let kept = [
            portal.client_from("127.0.0.2", "app", "apppw").await,
            portal.client_from("127.0.0.2", "app", "apppw").await,
        ];
        let cut = [
            portal.client_from("127.0.0.3", "app", "apppw").await,
            portal.client_from("127.0.0.3", "app", "apppw").await,
        ];
        for c in kept.iter().chain(&cut) {
            assert_eq!(query_one(c, "SELECT 1").await, "1");
        }
        rewrite_config(&portal.path, |yaml| {
            yaml.replace(
                "allowedCIDRs: [\"127.0.0.0/8\"]",
                "allowedCIDRs: [\"127.0.0.2/32\", \"127.0.0.4/32\"]",
            )
        });
        for c in &cut {
            closed_within(c, &format!("{mode}: a client of an excluded address")).await;
        }
        for c in &kept {
            assert_eq!(query_one(c, "SELECT 1").await, "1", "{mode}: a kept client");
        }
        let close = |body: &'static str| {
            let admin = portal.admin;
            async move {
                let (code, body) = http(
                    admin,
                    "POST",
                    "/sessions/close",
                    Some("pool-admin-token-0123456789"),
                    body,
                )
                .await;
                assert_eq!(code, 200, "{body}");
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                v["closed"].as_u64().unwrap()
            }
        };
        assert_eq!(close(r#"{"client": "127.0.0.2"}"#).await, 2, "{mode}");
        for c in &kept {
            closed_within(c, &format!("{mode}: a client closed by address")).await;
        }
        // By backend: the client in a transaction holds pg0's connection; the other has run
        // a query (in session mode it holds one too).
        let busy = portal.client_from("127.0.0.4", "app", "apppw").await;
        let idle = portal.client_from("127.0.0.4", "app", "apppw").await;
        assert_eq!(query_one(&idle, "SELECT 1").await, "1");
        busy.simple_query("BEGIN; INSERT INTO t (v) VALUES ('cut')")
            .await
            .unwrap();
        let holding = if mode == "transaction" { 1 } else { 2 };
        assert_eq!(close(r#"{"backend": "pg0"}"#).await, holding, "{mode}");
        closed_within(&busy, &format!("{mode}: a client mid-transaction")).await;
        let next = if mode == "transaction" {
            idle
        } else {
            closed_within(&idle, "session: a logged-in client").await;
            portal.client_from("127.0.0.4", "app", "apppw").await
        };
        // The cut transaction was rolled back, not handed over: the next client is in none.
        assert_eq!(
            query_one(&next, "SELECT count(*) FROM t WHERE v = 'cut'").await,
            "0",
            "{mode}"
        );
        assert_eq!(
            query_one(&next, "SELECT now() = statement_timestamp()").await,
            "t",
            "{mode}: the next client's statement ran in a transaction of its own"
        );
        assert_eq!(close(r#"{"client": "127.0.0.9"}"#).await, 0, "{mode}");
    }
}

/// A login waits for a server connection within `pooling.queueTimeout`, not
/// `timeouts.handshake`: with the pool's one connection held by a transaction for longer than
/// the handshake deadline, a new client still logs in once it is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_waits_for_a_server_connection_past_the_handshake_deadline() {
    let Some((_pg, portal)) = app_portal(
        "mode: transaction, poolSize: 1, queueTimeout: 10s",
        "timeouts: {handshake: 500ms}\n",
    )
    .await
    else {
        return;
    };
    let holder = portal.client("app", "apppw").await.unwrap();
    holder.simple_query("BEGIN; SELECT 1").await.unwrap();
    let addr = portal.addr;
    let login = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut config = tokio_postgres::Config::new();
        config.user("app").password("apppw").dbname("postgres");
        let (client, connection) = config.connect_raw(tcp, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let value = query_one(&client, "SELECT 2").await;
        Ok::<_, tokio_postgres::Error>(value)
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !login.is_finished(),
        "the login did not wait for the pool's one connection: {:?}",
        login.await
    );
    holder.simple_query("COMMIT").await.unwrap();
    let value = tokio::time::timeout(Duration::from_secs(10), login)
        .await
        .expect("the login ended")
        .unwrap()
        .expect("logged in past timeouts.handshake");
    assert_eq!(value, "2");
}

/// A server connection that the server closes while it is idle in the pool is not handed to
/// the next transaction: the pool sees it closed when it takes it, and opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_closed_while_idle_is_not_handed_out() {
    let Some((pg, portal)) = app_portal("mode: transaction, poolSize: 1", "").await else {
        return;
    };
    let c = portal.client("app", "apppw").await.unwrap();
    let pid = |pg: &Postgres| {
        pg.psql("SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'")
    };
    for round in 0..3 {
        assert_eq!(query_one(&c, "SELECT 1").await, "1");
        let first = pid(&pg);
        assert!(!first.is_empty(), "round {round}: no server connection");
        pg.psql(&format!("SELECT pg_terminate_backend({first})"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while backends_of(&pg, "app") != 0 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the backend stayed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The portal's event loop has seen the close once its next turn ran: a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            query_one(&c, "SELECT 2").await,
            "2",
            "round {round}: the next transaction failed on the closed connection"
        );
        assert_ne!(pid(&pg), first, "round {round}: the same server process");
    }
    let m = portal.metrics().await;
    assert!(server_connections_closed(&m) >= 3.0, "{m}");
}

/// The pools' server connections closed so far, from a `/metrics` scrape.
fn server_connections_closed(metrics: &str) -> f64 {
    sample(
        metrics,
        "dbportal_pool_server_connection_events_total{event=\"closed\"}",
    )
}
