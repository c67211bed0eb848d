//! Logging in and running queries through the pool: psql with SCRAM (a wrong password never
//! reaches the backend), pgbench on a small pool, the queue timeout, parameter replay,
//! session mode's one connection, malformed clients.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_with_scram_and_a_wrong_password_never_reaches_the_backend() {
    let Some((pg, portal)) = app_portal("mode: transaction, poolSize: 2", "").await else {
        return;
    };

    // Wrong password, unknown user: 28P01, and no server connection was ever opened.
    let (ok, _, err) = portal.psql("app", "wrong", "SELECT 1").await;
    assert!(
        !ok && err.contains("password authentication failed for user \"app\""),
        "{err}"
    );
    let (ok, _, err) = portal.psql("nobody", "x", "SELECT 1").await;
    assert!(
        !ok && err.contains("password authentication failed"),
        "{err}"
    );
    let m = portal.metrics().await;
    assert_eq!(
        sample(
            &m,
            "dbportal_pool_server_connection_events_total{event=\"opened\"}"
        ),
        0.0
    );
    assert_eq!(sample(&m, "dbportal_pool_auth_failures_total"), 2.0);
    assert_eq!(backends_of(&pg, "app"), 0);

    // The right one: queries run as that user on the backend.
    let (ok, out, err) = portal.psql("app", "apppw", "SELECT current_user").await;
    assert!(ok, "{err}");
    assert_eq!(out, "app");
    let (ok, out, err) = portal
        .psql(
            "app",
            "apppw",
            "INSERT INTO t (v) VALUES ('a'); SELECT count(*) FROM t",
        )
        .await;
    assert!(ok, "{err}");
    assert_eq!(out, "1");
    // An SQL error is the client's own, the session goes on.
    let (ok, _, err) = portal.psql("app", "apppw", "SELECT * FROM missing").await;
    assert!(!ok && err.contains("does not exist"), "{err}");
    // psql's \copy (COPY FROM STDIN) holds the server connection through the copy.
    let (ok, out, err) = portal
        .psql(
            "app",
            "apppw",
            "COPY (SELECT generate_series(1, 3)) TO STDOUT",
        )
        .await;
    assert!(ok, "{err}");
    assert_eq!(out, "1\n2\n3");
    let m = portal.metrics().await;
    assert!(sample(&m, "dbportal_pool_transactions_total") >= 4.0, "{m}");
    let s = portal.status().await;
    assert_eq!(s["pooling"]["pools"][0]["user"], "app", "{s:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_many_clients_on_a_small_pool_simple_extended_and_prepared() {
    if !have_postgres() || skip_without(&["pgbench"]) {
        return;
    }
    let pg = Postgres::primary(PW);
    let (ok, _, err) = run(
        "pgbench",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-i",
            "-s",
            "1",
            "-q",
            "postgres",
        ],
        &[("PGPASSWORD", PW)],
    )
    .await;
    assert!(ok, "pgbench -i: {err}");
    pg.psql("CREATE ROLE app LOGIN PASSWORD 'apppw'; GRANT ALL ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO app");
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 4", "").await;
    for mode in ["simple", "extended", "prepared"] {
        let port = portal.port();
        let bench = tokio::spawn(async move {
            run(
                "pgbench",
                &[
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "app",
                    "-c",
                    "40",
                    "-j",
                    "2",
                    "-t",
                    "50",
                    "-M",
                    mode,
                    "-n",
                    "postgres",
                ],
                &[("PGPASSWORD", "apppw")],
            )
            .await
        });
        // While it runs, the backend never has more than the pool.
        let mut most = 0;
        while !bench.is_finished() {
            most = most.max(backends_of(&pg, "app"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (ok, out, err) = bench.await.unwrap();
        assert!(ok, "pgbench -M {mode}: {out}\n{err}");
        assert!(
            out.contains("number of transactions actually processed: 2000/2000"),
            "{out}"
        );
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        assert!(most <= 4, "{most} server connections for a pool of 4");
        eprintln!("pgbench -M {mode}: at most {most} backends");
    }
    let m = portal.metrics().await;
    assert!(
        sample(&m, "dbportal_pool_transactions_total") >= 4000.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "dbportal_pool_server_connection_events_total{event=\"opened\"}"
        ) <= 4.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_the_queue_timeout_gets_53300_and_a_held_transaction_keeps_its_connection() {
    let Some((_pg, portal)) =
        app_portal("mode: transaction, poolSize: 1, queueTimeout: 300ms", "").await
    else {
        return;
    };
    let a = portal.client("app", "apppw").await.unwrap();
    a.simple_query("BEGIN").await.unwrap();
    a.simple_query("INSERT INTO t (v) VALUES ('held')")
        .await
        .unwrap();
    // The only server connection is held by a's open transaction: b waits, then gets 53300.
    let (ok, _, err) = portal.psql("app", "apppw", "SELECT 1").await;
    assert!(
        !ok && err.contains("no server connection available within pooling.queueTimeout"),
        "{err}"
    );
    let m = portal.metrics().await;
    assert_eq!(sample(&m, "dbportal_pool_queue_timeouts_total"), 1.0);
    // a's transaction is intact: it sees its own row, then commits.
    assert_eq!(query_one(&a, "SELECT count(*) FROM t").await, "1");
    a.simple_query("COMMIT").await.unwrap();
    // Once it ended, the next client gets the connection.
    let (ok, out, err) = portal.psql("app", "apppw", "SELECT count(*) FROM t").await;
    assert!(ok, "{err}");
    assert_eq!(out, "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_follow_the_client_across_server_connections() {
    let Some((_pg, portal)) = app_portal("mode: transaction, poolSize: 2", "").await else {
        return;
    };
    let a = portal.client("app", "apppw").await.unwrap();
    let b = portal.client("app", "apppw").await.unwrap();
    a.simple_query("SET TimeZone TO 'Asia/Tokyo'")
        .await
        .unwrap();
    a.simple_query("SET application_name TO 'client-a'")
        .await
        .unwrap();
    for _ in 0..10 {
        // b and a alternate on the two server connections; each keeps its own values.
        let tb = query_one(&b, "SHOW TimeZone").await;
        assert_ne!(tb, "Asia/Tokyo");
        let ta = query_one(&a, "SHOW TimeZone").await;
        assert_eq!(ta, "Asia/Tokyo");
        assert_eq!(query_one(&a, "SHOW application_name").await, "client-a");
        assert_eq!(query_one(&b, "SHOW application_name").await, "");
        // Hold one connection in b's transaction so a must use the other one.
        b.simple_query("BEGIN").await.unwrap();
        assert_eq!(query_one(&a, "SHOW TimeZone").await, "Asia/Tokyo");
        b.simple_query("COMMIT").await.unwrap();
    }
    // A startup parameter (psql's PGAPPNAME, PGTZ) is applied too.
    let (ok, out, err) = psql(portal.addr.port(), "app", "apppw")
        .env("PGAPPNAME", "from-startup")
        .env("PGTZ", "America/Lima")
        .run(&[
            "-XAtq",
            "-c",
            "SHOW application_name",
            "-c",
            "SHOW TimeZone",
        ])
        .await;
    assert!(ok, "{err}");
    assert_eq!(out, "from-startup\nAmerica/Lima");
    // An invalid value fails the login with the server's reason.
    let (ok, _, err) = psql(portal.addr.port(), "app", "apppw")
        .env("PGTZ", "Not/AZone")
        .run(&["-XAtq", "-c", "SELECT 1"])
        .await;
    assert!(!ok && err.contains("invalid startup parameter"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_one_server_connection_and_discards_it_before_the_next_client() {
    let Some((_pg, portal)) =
        app_portal("mode: session, poolSize: 1, queueTimeout: 300ms", "").await
    else {
        return;
    };
    let a = portal.client("app", "apppw").await.unwrap();
    a.simple_query("PREPARE mine AS SELECT 7").await.unwrap();
    a.simple_query("SET work_mem TO '7MB'").await.unwrap();
    assert_eq!(query_one(&a, "EXECUTE mine").await, "7");
    let pid = query_one(&a, "SELECT pg_backend_pid()").await;
    // The pool's only connection is a's for its session.
    let (ok, _, err) = portal.psql("app", "apppw", "SELECT 1").await;
    assert!(!ok && err.contains("queueTimeout"), "{err}");
    drop(a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next client gets the same server connection, reset by DISCARD ALL.
    let b = portal.client("app", "apppw").await.unwrap();
    assert_eq!(query_one(&b, "SELECT pg_backend_pid()").await, pid);
    assert_eq!(query_one(&b, "SHOW work_mem").await, "4MB");
    let e = b.simple_query("EXECUTE mine").await.unwrap_err();
    assert!(db_text(&e).contains("does not exist"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_clients_get_an_error_and_others_go_on() {
    let Some((_pg, portal)) = app_portal("mode: transaction, poolSize: 2", "").await else {
        return;
    };
    let good = portal.client("app", "apppw").await.unwrap();
    // A startup packet with an unterminated parameter.
    let mut s = TcpStream::connect(portal.addr).await.unwrap();
    let mut bad = vec![0, 0, 0, 0, 0, 3, 0, 0];
    bad.extend_from_slice(b"user\0app");
    let len = bad.len() as u32;
    bad[..4].copy_from_slice(&len.to_be_bytes());
    s.write_all(&bad).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        out.first() == Some(&b'E') && text.contains("08P01") && text.contains("unterminated"),
        "{text}"
    );
    // A logged-in client that sends a message with an impossible length.
    let c = portal.client("app", "apppw").await.unwrap();
    drop(c);
    let mut raw = login_raw(portal.addr, "app", "apppw").await;
    raw.write_all(&[b'Q', 0, 0, 0, 2]).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("08P01") && text.contains("invalid message"),
        "{text}"
    );
    assert_eq!(query_one(&good, "SELECT 40 + 2").await, "42");
}
