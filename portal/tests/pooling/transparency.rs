//! What a pooled client sees of its session, compared with a direct connection to the same
//! server: startup parameters (pg_regress's PGDATESTYLE, PGTZ and PGOPTIONS) that RESET,
//! RESET ALL and DISCARD ALL return to; SQL-level PREPARE and DEALLOCATE; a SET of a parameter
//! the server does not report (search_path) never reaching the next client of the server
//! connection.

use super::*;

/// pg_regress's own environment for its clients.
const REGRESS_ENV: [(&str, &str); 3] = [
    ("PGDATESTYLE", "Postgres, MDY"),
    ("PGTZ", "PST8PDT"),
    ("PGOPTIONS", "-c intervalstyle=postgres_verbose"),
];

/// One psql session running `script` (one query each, as psql sends a script's statements)
/// with pg_regress's environment, on `port`.
async fn regress_session(port: u16, script: &[&str]) -> (bool, String, String) {
    let mut p = psql(port, "app", "apppw").conninfo("connect_timeout=5 sslmode=disable");
    for (k, v) in REGRESS_ENV {
        p = p.env(k, v);
    }
    let mut args = vec!["-XAtq", "-v", "ON_ERROR_STOP=1"];
    for statement in script {
        args.extend(["-c", statement]);
    }
    p.run(&args).await
}

/// What a script answers direct and through the portal, with pg_regress's environment.
async fn direct_and_pooled(pg: &Postgres, portal: &Portal, script: &[&str]) -> (String, String) {
    let (ok, direct, err) = regress_session(pg.port, script).await;
    assert!(ok, "direct: {err}");
    let (ok, pooled, err) = regress_session(portal.addr.port(), script).await;
    assert!(ok, "pooled: {err}");
    (direct, pooled)
}

const RESETS: &[&str] = &[
    "SHOW DateStyle",
    "SHOW TimeZone",
    "SHOW IntervalStyle",
    "SET DateStyle TO ISO",
    "SET TimeZone TO 'UTC'",
    "SET IntervalStyle TO iso_8601",
    "RESET DateStyle",
    "RESET TimeZone",
    "SHOW DateStyle",
    "SHOW TimeZone",
    "SET DateStyle TO SQL",
    "RESET ALL",
    "SHOW DateStyle",
    "SHOW IntervalStyle",
    "SET TimeZone TO 'Asia/Tokyo'",
    "DISCARD ALL",
    "SHOW TimeZone",
    "SELECT interval '1 day 2 hours'",
    "SET TIME ZONE 'UTC'",
    "RESET TIME ZONE",
    "SHOW TimeZone",
    "SET TIME ZONE 'UTC'",
    "SET TIME ZONE DEFAULT",
    "SHOW TimeZone",
    "SET DateStyle = ISO",
    "SET SESSION DateStyle TO DEFAULT",
    "SHOW DateStyle",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_resets_to_the_clients_startup_parameters_as_direct() {
    let Some((pg, portal)) = app_portal("mode: session, poolSize: 2", "").await else {
        return;
    };
    // Another client first, with the server's defaults: its connection is not the one the
    // next client's RESET would return to.
    let (ok, _, err) = portal.psql("app", "apppw", "SELECT 1").await;
    assert!(ok, "{err}");
    let (direct, pooled) = direct_and_pooled(&pg, &portal, RESETS).await;
    assert_eq!(
        direct,
        "Postgres, MDY\nPST8PDT\npostgres_verbose\nPostgres, MDY\nPST8PDT\nPostgres, MDY\npostgres_verbose\nPST8PDT\n@ 1 day 2 hours\nPST8PDT\nPST8PDT\nPostgres, MDY"
    );
    assert_eq!(pooled, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_resets_to_the_clients_startup_parameters_and_takes_its_options() {
    let Some((pg, portal)) = app_portal("mode: transaction, poolSize: 2", "").await else {
        return;
    };
    let (ok, _, err) = portal.psql("app", "apppw", "SELECT 1").await;
    assert!(ok, "{err}");
    let (direct, pooled) = direct_and_pooled(&pg, &portal, RESETS).await;
    assert_eq!(pooled, direct);
    // Options other than the reported parameters are honoured too, in both modes.
    let (ok, out, err) = psql(portal.addr.port(), "app", "apppw")
        .env("PGOPTIONS", "-c work_mem=64MB")
        .run(&["-XAtq", "-c", "SHOW work_mem"])
        .await;
    assert!(ok, "{err}");
    assert_eq!(out, "64MB");
    // Clients without them share none of their connections' settings.
    let (ok, out, err) = portal.psql("app", "apppw", "SHOW work_mem").await;
    assert!(ok, "{err}");
    assert_eq!(out, "4MB");
    // A setting the server refuses fails the login with its reason.
    let (ok, _, err) = psql(portal.addr.port(), "app", "apppw")
        .env("PGOPTIONS", "-c no_such_setting=1")
        .run(&["-XAtq", "-c", "SELECT 1"])
        .await;
    assert!(
        !ok && err.contains("invalid startup parameter") && err.contains("no_such_setting"),
        "{err}"
    );
}

/// A session that leaves what DISCARD ALL does not undo (a library loaded, a temporary
/// schema made) ends with its server connection closed: the next client's session is as new
/// as a direct one (pg_regress' guc and temp tests), while a plain session's connection is
/// reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_closes_a_connection_left_with_state_discard_all_keeps() {
    let Some((_pg, portal)) = app_portal("mode: session, poolSize: 1", "").await else {
        return;
    };
    let pid = || async {
        let (ok, out, err) = portal.psql("app", "apppw", "SELECT pg_backend_pid()").await;
        assert!(ok, "{err}");
        out
    };
    let first = pid().await;
    assert_eq!(pid().await, first, "a plain session's connection is reused");
    for leftover in [
        "DO $$ BEGIN PERFORM 1; END $$",
        "CREATE TEMP TABLE t (a int)",
    ] {
        let before = pid().await;
        let (ok, _, err) = portal.psql("app", "apppw", leftover).await;
        assert!(ok, "{leftover}: {err}");
        let after = pid().await;
        assert_ne!(after, before, "after {leftover}");
        // As on a new connection: plpgsql not loaded, so its prefix is free; no temporary
        // schema.
        let (ok, out, err) = portal
            .psql(
                "app",
                "apppw",
                "SET plpgsql.extra_foo = true; SELECT pg_my_temp_schema() = 0",
            )
            .await;
        assert!(ok, "after {leftover}: {err}");
        assert_eq!(out, "t");
    }
}

/// PREPARE, DEALLOCATE and PREPARE again under the same name, then DEALLOCATE ALL: the
/// server's statements and the portal's bookkeeping agree, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deallocate_then_prepare_again_runs_the_new_statement() {
    for mode in ["session", "transaction"] {
        let Some((pg, portal)) = app_portal(&format!("mode: {mode}, poolSize: 2"), "").await else {
            return;
        };
        let script = [
            "PREPARE q1 AS SELECT 1",
            "EXECUTE q1",
            "DEALLOCATE q1",
            "PREPARE q1 AS SELECT 2",
            "EXECUTE q1",
            "DEALLOCATE PREPARE q1",
            "PREPARE q2 AS SELECT 3",
            "DEALLOCATE ALL",
            "PREPARE q2 AS SELECT 4",
            "EXECUTE q2",
        ];
        let (direct, pooled) = direct_and_pooled(&pg, &portal, &script).await;
        assert_eq!(direct, "1\n2\n4", "{mode}");
        assert_eq!(pooled, direct, "{mode}");
        // The same one statement per query (each its own simple Query), from one client.
        let c = portal.client("app", "apppw").await.unwrap();
        for sql in [
            "PREPARE q1 AS SELECT 1",
            "DEALLOCATE q1",
            "PREPARE q1 AS SELECT 2",
        ] {
            c.simple_query(sql).await.unwrap();
        }
        assert_eq!(query_one(&c, "EXECUTE q1").await, "2", "{mode}");
        c.simple_query("DEALLOCATE ALL").await.unwrap();
        let e = c.simple_query("EXECUTE q1").await.unwrap_err();
        assert!(db_text(&e).contains("does not exist"), "{mode}: {e:?}");
        // A name never prepared gets the server's own error, as direct.
        let e = c.simple_query("DEALLOCATE nothing").await.unwrap_err();
        assert!(db_text(&e).starts_with("26000"), "{mode}: {e:?}");
    }
}

/// A SET of a parameter the server does not report stays with the client that made it: the
/// next client of that server connection sees the default. So does a SET of a reported one
/// the portal replays (IntervalStyle, DateStyle, application_name): a new client starts from
/// a new connection's values, as a direct one does.
const CHECK: &str = "SHOW search_path; SHOW work_mem; SHOW statement_timeout; SHOW lock_timeout; \
     SHOW IntervalStyle; SHOW DateStyle; SHOW application_name";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_set_of_an_unreported_parameter_never_reaches_the_next_client() {
    let Some((pg, portal)) = app_portal("mode: transaction, poolSize: 1", "").await else {
        return;
    };
    pg.psql("CREATE SCHEMA notme; GRANT USAGE ON SCHEMA notme TO app");
    let defaults = portal.psql("app", "apppw", CHECK).await;
    assert!(defaults.0, "{}", defaults.2);
    for set in [
        "SET search_path = notme",
        "SET search_path TO notme, public",
        "SELECT set_config('search_path', 'notme', false)",
        "SET work_mem = '7MB'",
        "SET SESSION statement_timeout = 1234",
        "SET lock_timeout TO 99",
        "SET IntervalStyle = iso_8601",
        "SET DateStyle = 'SQL, DMY'",
        "SET application_name = 'earlier client'",
    ] {
        let a = portal.client("app", "apppw").await.unwrap();
        a.simple_query(set).await.unwrap();
        // a keeps its value.
        if set.contains("search_path") {
            assert!(query_one(&a, "SHOW search_path").await.contains("notme"));
        }
        drop(a);
        // The pool's only connection comes to the next client without it.
        let b = portal.psql("app", "apppw", CHECK).await;
        assert_eq!(b, defaults, "after {set}");
    }
}

/// libpq's `PQprepare` and `PQdescribePrepared` of the unnamed statement (psql's `\gdesc`) are
/// two requests, which may run on different server connections in transaction mode; another
/// client's unnamed statement in between must not be the one described or run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_of_one_request_is_the_clients_in_the_next() {
    if !installed("/usr/bin/python3") {
        return;
    }
    let Some((_pg, portal)) = app_portal("mode: transaction, poolSize: 1", "").await else {
        return;
    };
    let script = r#"
import sys, psycopg
from psycopg import pq
port = sys.argv[1]
dsn = f"host=127.0.0.1 port={port} user=app password=apppw dbname=postgres"
a, b = psycopg.connect(dsn, autocommit=True), psycopg.connect(dsn, autocommit=True)
def check(res):
    assert res.status in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK), res.error_message
    return res
for i in range(3):
    check(a.pgconn.prepare(b"", b"SELECT 1 AS mine"))
    # b's unnamed statement, on the pool's only server connection, in between.
    check(b.pgconn.prepare(b"", b"SELECT 2 AS theirs, 3 AS more"))
    d = check(a.pgconn.describe_prepared(b""))
    assert [d.fname(n) for n in range(d.nfields)] == [b"mine"], [d.fname(n) for n in range(d.nfields)]
    r = check(a.pgconn.exec_prepared(b"", []))
    assert r.get_value(0, 0) == b"1", r.get_value(0, 0)
    r = check(b.pgconn.exec_prepared(b"", []))
    assert r.get_value(0, 0) == b"2", r.get_value(0, 0)
print("ok")
"#;
    let out = portal.python("unnamed.py", script).await;
    assert_eq!(out, "ok");
}
