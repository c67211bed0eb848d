//! Cancel, prepared statements across server connections with real drivers, and the session
//! state that pins a client.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_the_portal_reaches_the_query_and_the_session_goes_on() {
    let Some((pg, portal)) = app_portal("mode: transaction, poolSize: 2", "").await else {
        return;
    };
    let a = std::sync::Arc::new(portal.client("app", "apppw").await.unwrap());
    let token = a.cancel_token();
    // Idle: nothing to cancel, the request is dropped.
    let tcp = TcpStream::connect(portal.addr).await.unwrap();
    token
        .cancel_query_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(
        &portal.metrics().await,
        "dbportal_pool_cancels_total{result=\"dropped\"}",
    ) != 1.0
    {
        assert!(Instant::now() < deadline, "the idle cancel was not seen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let running = {
        let a = a.clone();
        tokio::spawn(async move { a.simple_query("SELECT pg_sleep(20)").await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'") != "1" {
        assert!(Instant::now() < deadline, "the query did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tcp = TcpStream::connect(portal.addr).await.unwrap();
    token
        .cancel_query_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let e = running.await.unwrap().unwrap_err();
    assert!(db_text(&e).starts_with("57014"), "{e:?}");
    assert_eq!(query_one(&a, "SELECT 'still here'").await, "still here");
    // Counted once the server has taken the request (it closes the cancel connection), which
    // may come after the client already heard of the cancel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(
        &portal.metrics().await,
        "dbportal_pool_cancels_total{result=\"forwarded\"}",
    ) != 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the forwarded cancel was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = portal.metrics().await;
    assert_eq!(
        sample(&m, "dbportal_pool_cancels_total{result=\"dropped\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_with_real_drivers_across_server_connections() {
    let Some((pg, portal)) = app_portal(
        "mode: transaction, poolSize: 3, maxPreparedStatements: 4",
        "",
    )
    .await
    else {
        return;
    };
    // tokio-postgres prepares a named statement for every query with parameters.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(portal.client("app", "apppw").await.unwrap());
    }
    let mut statements = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let sql = format!("SELECT $1::int + {i}");
        statements.push(c.prepare(&sql).await.unwrap());
    }
    for round in 0..20i32 {
        for (i, c) in clients.iter().enumerate() {
            // Hold some connections in transactions so that statements land on others.
            if round % 3 == 0 && i % 2 == 0 {
                c.simple_query("BEGIN").await.unwrap();
            }
            let row = c.query_one(&statements[i], &[&round]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), round + i as i32);
            // More distinct statements than maxPreparedStatements: the LRU closes some.
            let v: i64 = c
                .query_one(
                    &format!("SELECT count(*) + {} FROM t WHERE id > $1", round % 7),
                    &[&0i32],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(v, i64::from(round % 7));
            if round % 3 == 0 && i % 2 == 0 {
                c.simple_query("COMMIT").await.unwrap();
            }
        }
    }
    // A statement that fails to prepare is an error for its client only.
    let e = clients[0]
        .prepare("SELECT * FROM nowhere")
        .await
        .unwrap_err();
    assert!(db_text(&e).starts_with("42P01"), "{e:?}");
    assert_eq!(
        clients[0]
            .query_one(&statements[0], &[&1i32])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
    // The server connections never hold more than maxPreparedStatements of the portal's.
    let most: i64 = pg
        .psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'")
        .parse()
        .unwrap();
    assert!(most <= 3);
    let m = portal.metrics().await;
    assert!(
        sample(
            &m,
            "dbportal_pool_prepared_statements_total{result=\"miss\"}"
        ) > 0.0
    );
    assert!(
        sample(
            &m,
            "dbportal_pool_prepared_statements_total{result=\"hit\"}"
        ) > 0.0
    );

    // psycopg 3 (libpq) with server-side prepared statements: prepare=True, executemany,
    // DEALLOCATE, and Close of statements it drops.
    if !installed("/usr/bin/python3") {
        return;
    }
    let script = r#"
import sys, psycopg
port = sys.argv[1]
conns = [psycopg.connect(f"host=127.0.0.1 port={port} user=app password=apppw dbname=postgres", autocommit=True, prepare_threshold=0) for _ in range(4)]
for r in range(15):
    for i, c in enumerate(conns):
        got = c.execute("SELECT %s::int * 2 + %s::int", (r, i), prepare=True).fetchone()[0]
        assert got == r * 2 + i, (got, r, i)
        if r % 5 == 0:
            with c.transaction():
                c.cursor().executemany("INSERT INTO t (v) VALUES (%s)", [(f"py{i}",), (f"py{i}",)])
for c in conns:
    c.execute("DEALLOCATE ALL")
    assert c.execute("SELECT %s::text", ("after",), prepare=True).fetchone()[0] == "after"
print(conns[0].execute("SELECT count(*) FROM t WHERE v LIKE 'py%%'").fetchone()[0])
"#;
    let out = portal.python("prepared.py", script).await;
    assert_eq!(out, "24");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_that_cannot_move_pins_the_client_and_is_counted() {
    let Some((_pg, portal)) = app_portal("mode: transaction, poolSize: 3", "").await else {
        return;
    };
    let a = portal.client("app", "apppw").await.unwrap();
    let b = portal.client("app", "apppw").await.unwrap();
    let c = portal.client("app", "apppw").await.unwrap();
    a.simple_query("CREATE TEMP TABLE scratch (x int); INSERT INTO scratch VALUES (1)")
        .await
        .unwrap();
    let pid_a = query_one(&a, "SELECT pg_backend_pid()").await;
    b.simple_query("SET statement_timeout = '1234ms'")
        .await
        .unwrap();
    for i in 0..15 {
        // Others come and go in between; a keeps its server connection and its table.
        let other = portal.client("app", "apppw").await.unwrap();
        assert_eq!(query_one(&other, "SHOW statement_timeout").await, "0");
        let e = other
            .simple_query("SELECT * FROM scratch")
            .await
            .unwrap_err();
        assert!(db_text(&e).starts_with("42P01"), "{e:?}");
        assert_eq!(query_one(&a, "SELECT count(*) FROM scratch").await, "1");
        assert_eq!(query_one(&a, "SELECT pg_backend_pid()").await, pid_a);
        assert_eq!(query_one(&b, "SHOW statement_timeout").await, "1234ms");
        assert_eq!(query_one(&c, &format!("SELECT {i}")).await, i.to_string());
    }
    let m = portal.metrics().await;
    assert_eq!(
        sample(&m, "dbportal_pool_pinned_clients{reason=\"temp_table\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "dbportal_pool_pinned_clients{reason=\"set\"}"),
        1.0
    );
    assert_eq!(
        sample(&m, "dbportal_pool_pins_total{reason=\"listen\"}"),
        0.0
    );
    drop(a);
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(
        &portal.metrics().await,
        "dbportal_pool_pinned_clients{reason=\"temp_table\"}",
    ) != 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the pinned client was not counted out"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Their server connections were reset before anyone else got them.
    for _ in 0..6 {
        let d = portal.client("app", "apppw").await.unwrap();
        assert_eq!(query_one(&d, "SHOW statement_timeout").await, "0");
        assert!(d.simple_query("SELECT * FROM scratch").await.is_err());
    }
}
