//! PostgreSQL transaction and session pooling (`pooling.mode: transaction | session`) through
//! the standalone portal in front of real PostgreSQL 15 servers on loopback, with real
//! clients: psql, pgbench (simple and extended protocol, many clients on a small pool, the
//! backend count read from pg_stat_activity), tokio-postgres, python3-psycopg; wrong
//! passwords; the queue timeout; parameter replay; cancel; failover with a promoted streaming
//! standby (the old primary demoted to its standby) while pooled clients sit idle, one holds a
//! transaction open and others write in a loop.

mod common;

use common::tls as tlsca;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PW: &str = "pgpw";

/// The standalone portal with pooling in front of PostgreSQL servers.
struct Portal(Standalone);

impl std::ops::Deref for Portal {
    type Target = Standalone;

    fn deref(&self) -> &Standalone {
        &self.0
    }
}

impl Portal {
    /// A portal in front of `backends` with `pooling` (YAML flow map without braces), users
    /// `postgres` and `app` (password `apppw`) unless `pooling` has its own `auth`.
    async fn start(backends: &[&Postgres], pooling: &str, extra: &str) -> Portal {
        Portal::start_at(0, backends, pooling, extra).await
    }

    /// [`start`](Self::start) listening on `port`.
    async fn start_at(port: u16, backends: &[&Postgres], pooling: &str, extra: &str) -> Portal {
        let dir = TempDir::new("pool-portal");
        let users = dir.path().join("users.yaml");
        std::fs::write(&users, format!("postgres: {PW}\napp: apppw\n")).unwrap();
        let auth = if pooling.contains("auth:") {
            String::new()
        } else {
            format!(", auth: {{usersFile: {}}}", users.display())
        };
        let tls = if extra.contains("tls:") {
            ""
        } else {
            "tls: {mode: disabled}\n"
        };
        let mut yaml = format!(
            "engine: postgres\nlisten: 127.0.0.1:{port}\nadmin: 127.0.0.1:0\n{tls}limits: {{maxConnections: 6000, maxNegotiating: 6000, maxNegotiatingPerClient: 0}}\nhealthCheck: {{interval: 200ms, rise: 1, fall: 1, credentials: {{username: postgres, password: {PW}}}}}\npooling: {{{pooling}{auth}}}\n{extra}backends:\n",
        );
        for (i, b) in backends.iter().enumerate() {
            yaml.push_str(&format!(
                "  - {{name: pg{i}, address: \"{}\"}}\n",
                b.address()
            ));
        }
        let p = Portal(PortalBuilder::new(&yaml).in_dir(dir).standalone().await);
        p.wait_leader("pg0").await;
        p
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    async fn wait_leader(&self, name: &str) {
        self.wait_status(&format!("leader {name}"), Duration::from_secs(20), |s| {
            s["leader"] == name
        })
        .await;
    }

    /// psql through the portal as `user`.
    async fn psql(&self, user: &str, password: &str, sql: &str) -> (bool, String, String) {
        psql(self.addr.port(), user, password)
            .conninfo("connect_timeout=5 sslmode=prefer")
            .run(&["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .await
    }

    /// A tokio-postgres client through the portal from the loopback address `from`.
    async fn client_from(&self, from: &str, user: &str, password: &str) -> tokio_postgres::Client {
        let tcp = connect_from(from, self.addr).await.unwrap();
        let mut config = tokio_postgres::Config::new();
        config.user(user).password(password).dbname("postgres");
        let (client, connection) = config
            .connect_raw(tcp, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }

    /// A tokio-postgres client through the portal.
    async fn client(
        &self,
        user: &str,
        password: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let mut config = tokio_postgres::Config::new();
        config.user(user).password(password).dbname("postgres");
        let (client, connection) = config.connect_raw(tcp, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

fn have_postgres() -> bool {
    !skip_without(&[&format!("{PG_BIN}/postgres"), "psql"])
}

/// Backends of `user` connected to `pg` (from pg_stat_activity, as the superuser directly).
fn backends_of(pg: &Postgres, user: &str) -> usize {
    pg.psql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND backend_type = 'client backend'"
    ))
    .parse()
    .unwrap()
}

fn with_app_user(pg: &Postgres) {
    pg.psql("CREATE ROLE app LOGIN PASSWORD 'apppw'");
    pg.psql("CREATE TABLE t (id serial PRIMARY KEY, v text); GRANT ALL ON t TO app; GRANT ALL ON SEQUENCE t_id_seq TO app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_with_scram_and_a_wrong_password_never_reaches_the_backend() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 2", "").await;

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
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(
        &[&pg],
        "mode: transaction, poolSize: 1, queueTimeout: 300ms",
        "",
    )
    .await;
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
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 2", "").await;
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
    // Startup options cannot be kept: refused, naming why.
    let (ok, _, err) = psql(portal.addr.port(), "app", "apppw")
        .env("PGOPTIONS", "-c work_mem=64MB")
        .run(&["-XAtq", "-c", "SELECT 1"])
        .await;
    assert!(!ok && err.contains("startup options"), "{err}");
}

/// The server's (or the portal's) message of a query error.
fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

async fn query_one(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = c.simple_query(sql).await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row in {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_one_server_connection_and_discards_it_before_the_next_client() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(
        &[&pg],
        "mode: session, poolSize: 1, queueTimeout: 300ms",
        "",
    )
    .await;
    let a = portal.client("app", "apppw").await.unwrap();
    a.simple_query("CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (7)")
        .await
        .unwrap();
    a.simple_query("SET work_mem TO '7MB'").await.unwrap();
    assert_eq!(query_one(&a, "SELECT x FROM mine").await, "7");
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
    let e = b.simple_query("SELECT x FROM mine").await.unwrap_err();
    assert!(db_text(&e).contains("does not exist"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_clients_get_an_error_and_others_go_on() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 2", "").await;
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

/// A raw client logged in through SCRAM (the portal's own wire helpers and tokio-postgres's
/// SCRAM client), positioned after the first ReadyForQuery.
async fn login_raw(addr: SocketAddr, user: &str, password: &str) -> TcpStream {
    login_on(TcpStream::connect(addr).await.unwrap(), user, password).await
}

/// A client logged in over TLS (SSLRequest, then rustls at `version`), after the first
/// ReadyForQuery.
async fn login_tls(
    addr: SocketAddr,
    ca_pem: &str,
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&portal::wire::postgres::ssl_request())
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(portal::tls::provider())
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    login_on(tls, "app", "apppw").await
}

async fn login_on<S>(mut s: S, user: &str, password: &str) -> S
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use portal::wire::postgres::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    s.write_all(&startup_message(&[
        ("user", user),
        ("database", "postgres"),
    ]))
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
    loop {
        while let Ok(Some(n)) = frame(&buf, 1 << 20) {
            let msg: Vec<u8> = buf.drain(..n).collect();
            match (msg[0], parse_authentication(&msg[5..])) {
                (b'R', Some((AUTH_SASL, _))) => s
                    .write_all(&sasl_initial("SCRAM-SHA-256", scram.message()))
                    .await
                    .unwrap(),
                (b'R', Some((AUTH_SASL_CONTINUE, data))) => {
                    scram.update(data).unwrap();
                    s.write_all(&message(b'p', scram.message())).await.unwrap();
                }
                (b'Z', _) => return s,
                (b'E', _) => panic!("{}", error_text(&msg[5..])),
                _ => {}
            }
        }
        assert!(
            s.read_buf(&mut buf).await.unwrap() > 0,
            "closed during login"
        );
    }
}

/// What one writer saw: the values whose COMMIT was acknowledged, before and after the
/// failover, and the errors it was given.
#[derive(Default)]
struct Writes {
    acked: Vec<String>,
    acked_after: usize,
    errors: Vec<String>,
}

/// A client writing one row per transaction (BEGIN, INSERT, a short sleep, COMMIT) until
/// `stop`, at most 3,000 transactions or 60 s.
async fn writer(
    c: tokio_postgres::Client,
    w: usize,
    failed_over: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (tokio_postgres::Client, Writes) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = Writes::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..3000 {
        if stop.load(Relaxed) || Instant::now() > deadline {
            break;
        }
        let after = failed_over.load(Relaxed);
        let v = format!("w{w}-{i}");
        let r = async {
            c.simple_query("BEGIN").await?;
            c.simple_query(&format!("INSERT INTO t (v) VALUES ('{v}')"))
                .await?;
            c.simple_query("SELECT pg_sleep(0.005)").await?;
            c.simple_query("COMMIT").await
        }
        .await;
        match r {
            Ok(_) => {
                out.acked.push(v);
                out.acked_after += after as usize;
            }
            Err(e) => out.errors.push(db_text(&e)),
        }
    }
    (c, out)
}

/// The failover a cluster manager runs: the old primary stops (fast), the streaming standby is
/// promoted, and the old primary comes back as a standby of the new one. Through it: 200
/// pooled clients sit idle and all stay connected; one client holds an open transaction and
/// is told it was lost; six clients write in a loop, only their transactions in flight fail,
/// each acknowledged write is on the new leader, and the demoted node gets no connection
/// from the portal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_idle_pooled_clients_and_fails_the_transaction_in_flight() {
    use std::sync::{atomic::AtomicBool, atomic::Ordering::Relaxed, Arc};
    if !have_postgres() {
        return;
    }
    let mut primary = Postgres::primary(PW);
    with_app_user(&primary);
    let standby = Postgres::standby_of(&primary);
    let portal = Portal::start(
        &[&primary, &standby],
        "mode: transaction, poolSize: 5, queueTimeout: 20s",
        "timeouts: {connect: 20s}\n",
    )
    .await;
    const IDLE: usize = 200;
    let mut clients = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let c = portal
            .client("app", "apppw")
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        if i % 20 == 0 {
            c.simple_query("INSERT INTO t (v) VALUES ('before')")
                .await
                .unwrap();
        }
        clients.push(c);
    }
    // One client is inside a transaction when the leader goes.
    let busy = portal.client("app", "apppw").await.unwrap();
    busy.simple_query("BEGIN").await.unwrap();
    busy.simple_query("INSERT INTO t (v) VALUES ('in flight')")
        .await
        .unwrap();
    assert!(backends_of(&primary, "app") <= 5);
    // Six more write all through the failover (the pool of five is shared with them).
    let failed_over = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..6 {
        let c = portal.client("app", "apppw").await.unwrap();
        writers.push(tokio::spawn(writer(
            c,
            w,
            failed_over.clone(),
            stop.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    primary.stop();
    standby.promote();
    portal.wait_leader("pg1").await;
    failed_over.store(true, Relaxed);
    primary.restart_as_standby_of(&standby);
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Relaxed);

    // The transaction in flight fails with an ErrorResponse, and its client stays usable.
    let e = busy.simple_query("COMMIT").await.unwrap_err();
    assert!(db_text(&e).contains("the transaction was lost"), "{e:?}");
    assert_eq!(query_one(&busy, "SELECT 1").await, "1");
    // Every idle client's next transaction runs on the new leader, with no error and no
    // reconnect.
    let mut ok = 0;
    for c in &clients {
        assert!(!c.is_closed());
        c.simple_query("INSERT INTO t (v) VALUES ('after')")
            .await
            .unwrap();
        ok += 1;
    }
    assert_eq!(ok, IDLE);
    assert_eq!(
        query_one(&clients[0], "SELECT pg_is_in_recovery()::text").await,
        "false"
    );
    assert_eq!(
        standby.psql("SELECT count(*) FROM t WHERE v = 'after'"),
        IDLE.to_string()
    );
    assert_eq!(
        standby.psql("SELECT count(*) FROM t WHERE v = 'in flight'"),
        "0"
    );
    // The writers: still connected, each wrote on the new leader after the failover, only
    // transactions in flight on a server connection the old primary closed failed (none for
    // want of a connection while the leader changed; under load a writer may be caught in
    // flight more than once while the old primary's backends are being terminated), and
    // every write whose COMMIT was acknowledged, before the failover or after, is on the new
    // leader.
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for (w, h) in writers.into_iter().enumerate() {
        let (c, out) = h.await.unwrap();
        assert!(!c.is_closed(), "writer {w} was disconnected");
        assert!(
            out.acked_after > 0,
            "writer {w} wrote nothing after the failover: {:?}",
            out.errors
        );
        for e in &out.errors {
            assert!(
                e.contains("the transaction in flight") || e.contains("the transaction was lost"),
                "writer {w} failed other than in flight: {e}"
            );
        }
        acked.extend(out.acked);
        errors.extend(out.errors);
    }
    println!("writers: {} acknowledged, errors: {errors:?}", acked.len());
    let on_leader = standby.psql("SELECT string_agg(v, ',') FROM t WHERE v LIKE 'w%'");
    let on_leader: std::collections::HashSet<&str> = on_leader.split(',').collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|v| !on_leader.contains(v.as_str()))
        .collect();
    assert!(lost.is_empty(), "acknowledged, not on the leader: {lost:?}");
    // The demoted node is a standby that follows the new leader, the portal sees it as
    // such and holds no connection to it.
    assert_eq!(primary.psql("SELECT pg_is_in_recovery()::text"), "true");
    let status = portal.status().await;
    assert_eq!(status["leader"], "pg1", "{status:#}");
    assert_eq!(backends_of(&primary, "app"), 0);
    let count = "SELECT count(*) FROM t";
    wait_until(
        "the demoted node replays the new leader's writes",
        Duration::from_secs(20),
        || primary.try_psql("postgres", PW, count) == standby.try_psql("postgres", PW, count),
    );
    assert!(backends_of(&standby, "app") <= 5);
    let m = portal.metrics().await;
    assert_eq!(
        sample(&m, "dbportal_pool_failed_in_flight_total"),
        1.0 + errors.len() as f64
    );
    let _ = portal.dir();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_the_portal_reaches_the_query_and_the_session_goes_on() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 2", "").await;
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
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(
        &[&pg],
        "mode: transaction, poolSize: 3, maxPreparedStatements: 4",
        "",
    )
    .await;
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
    let path = portal.dir().join("prepared.py");
    std::fs::write(&path, script).unwrap();
    let (ok, out, err) = run(
        "/usr/bin/python3",
        &[path.display().to_string(), portal.port()],
        &[],
    )
    .await;
    assert!(ok, "psycopg: {out}\n{err}");
    assert_eq!(out, "24");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_state_that_cannot_move_pins_the_client_and_is_counted() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 3", "").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_clients_and_to_the_backend() {
    if !have_postgres() {
        return;
    }
    let dir = TempDir::new("pool-tls");
    let ca = tlsca::TestCa::new("pool test CA");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ca.cert_pem).unwrap();
    let (db_cert, db_key) = ca
        .server("db", &["localhost", "127.0.0.1"])
        .write(dir.path(), "db");
    let (portal_cert, portal_key) = ca
        .server("portal", &["localhost", "127.0.0.1"])
        .write(dir.path(), "portal");
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    pg.enable_tls(&db_cert, &db_key, true);
    let tls = format!(
        "tls: {{mode: terminate, certFile: \"{}\", keyFile: \"{}\", backend: {{enabled: true, caFile: \"{}\"}}}}\n",
        portal_cert.display(),
        portal_key.display(),
        ca_path.display()
    );
    let portal = Portal::start(&[&pg], "mode: transaction, poolSize: 2", &tls).await;
    let conninfo = format!(
        "host=localhost hostaddr=127.0.0.1 sslmode=verify-full sslrootcert={}",
        ca_path.display()
    );
    let port = portal.addr.port();
    // The client's TLS is verified against the portal's certificate; the server connection
    // is TLS too (the server refuses anything else).
    let (ok, out, err) = psql(port, "app", "apppw")
        .conninfo(&conninfo)
        .run(&[
            "-XAtq",
            "-c",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            "-c",
            "SELECT current_user",
        ])
        .await;
    assert!(ok, "{err}");
    assert_eq!(out, "t\napp");
    // After the handshake the portal keeps the client's TLS records itself: TLS 1.3 and 1.2,
    // queries and results of many records each way.
    let big = "x".repeat(100_000);
    for (version, want) in [
        ("TLSv1.3", "protocol: TLSv1.3"),
        ("TLSv1.2", "protocol: TLSv1.2"),
    ] {
        let (ok, out, err) = psql(port, "app", "apppw")
            .conninfo(&format!("{conninfo} ssl_max_protocol_version={version}"))
            .run(&[
                "-XAtq",
                "-c",
                "\\conninfo",
                "-c",
                &format!("SELECT length('{big}')"),
                "-c",
                &format!("SELECT '{big}'"),
                "-c",
                "SELECT repeat('z', 200000)",
            ])
            .await;
        assert!(ok, "{version}: {err}");
        // \\conninfo's second line names the client's TLS; then one line per query.
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{version}");
        assert!(lines[1].contains(want), "{version}: {}", lines[1]);
        assert_eq!(lines[2], "100000", "{version}");
        assert!(
            lines[3] == big,
            "{version}: the 100,000 bytes came back changed"
        );
        assert!(lines[4] == "z".repeat(200_000), "{version}: 200,000 bytes");
    }
    // A plaintext client is refused: the portal requires TLS.
    let (ok, _, err) = psql(port, "app", "apppw")
        .conninfo("sslmode=disable")
        .run(&["-XAtqc", "SELECT 1"])
        .await;
    assert!(!ok && err.contains("requires TLS"), "{err}");

    // The portal ends a client's TLS with close_notify: after Terminate, and in answer to the
    // client's own (a client that sees none reads an unexpected end of file).
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        for terminate in [true, false] {
            let mut tls = login_tls(portal.addr, &ca.cert_pem, version).await;
            if terminate {
                tls.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
                tls.flush().await.unwrap();
            } else {
                tls.shutdown().await.unwrap();
            }
            let mut rest = Vec::new();
            let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
                .await
                .expect("the portal closes");
            assert!(end.is_ok(), "{version:?} terminate={terminate}: {end:?}");
        }
    }
    // A record that fails its check: the client gets bad_record_mac, the portal counts it
    // apart from ordinary disconnects.
    let mut tls = login_tls(portal.addr, &ca.cert_pem, &rustls::version::TLS13).await;
    let mut forged = vec![23, 3, 3, 0, 40];
    forged.extend_from_slice(&[0x5a; 40]);
    tls.get_mut().0.write_all(&forged).await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut rest))
        .await
        .expect("the portal closes");
    let e = end.expect_err("an alert");
    assert!(e.to_string().contains("BadRecordMac"), "{e}");
    let refused = r#"dbportal_sessions_closed_total{reason="tls_record"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&portal.metrics().await, refused) < 1.0 {
        assert!(Instant::now() < deadline, "{}", portal.metrics().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The users' secrets as PostgreSQL keeps them (SCRAM verifier, md5 hash), read as the
/// superuser.
fn stored_secret(pg: &Postgres, user: &str) -> String {
    pg.psql(&format!(
        "SELECT passwd FROM pg_shadow WHERE usename = '{user}'"
    ))
}

/// A user whose password is stored as an md5 hash, allowed to log in with md5.
fn with_md5_user(pg: &Postgres) {
    pg.psql("SET password_encryption = 'md5'; CREATE ROLE legacy LOGIN PASSWORD 'oldpw'");
    pg.hba_first("host all legacy 127.0.0.1/32 md5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_is_stored_scram_passthrough_by_auth_query_or_verifier_and_md5_users() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    with_md5_user(&pg);
    assert!(stored_secret(&pg, "app").starts_with("SCRAM-SHA-256$"));
    assert!(stored_secret(&pg, "legacy").starts_with("md5"));
    // Two ways to hold no password: the portal fetches the stored secrets with
    // pooling.auth.query, or the users file holds the stored secrets themselves.
    let dir = TempDir::new("pool-secrets");
    let file = dir.path().join("users.yaml");
    std::fs::write(
        &file,
        format!(
            "app: \"{}\"\nlegacy: \"{}\"\n",
            stored_secret(&pg, "app"),
            stored_secret(&pg, "legacy")
        ),
    )
    .unwrap();
    for auth in [
        "auth: {query: \"\"}".to_string(),
        format!("auth: {{usersFile: {}}}", file.display()),
    ] {
        let portal = Portal::start(
            &[&pg],
            &format!("mode: transaction, poolSize: 2, {auth}"),
            "",
        )
        .await;
        // SCRAM to the client, and to the server with the key the client's proof revealed.
        let (ok, out, err) = portal.psql("app", "apppw", "SELECT current_user").await;
        assert!(ok, "{auth}: {err}");
        assert_eq!(out, "app");
        assert!(backends_of(&pg, "app") >= 1);
        // md5 to the client (its secret is an md5 hash), and md5 to the server.
        let (ok, out, err) = portal.psql("legacy", "oldpw", "SELECT current_user").await;
        assert!(ok, "{auth}: {err}");
        assert_eq!(out, "legacy");
        // Wrong passwords and unknown users: 28P01, nothing opened for them.
        for (user, password) in [("app", "wrong"), ("legacy", "wrong"), ("nobody", "x")] {
            let (ok, _, err) = portal.psql(user, password, "SELECT 1").await;
            assert!(
                !ok && err.contains(&format!(
                    "password authentication failed for user \"{user}\""
                )),
                "{auth}: {user}: {err}"
            );
        }
        let m = portal.metrics().await;
        assert_eq!(
            sample(&m, "dbportal_pool_auth_failures_total"),
            3.0,
            "{auth}"
        );
        assert_eq!(
            sample(
                &m,
                "dbportal_pool_server_connection_events_total{event=\"opened\"}"
            ),
            2.0,
            "{auth}: one server connection for app, one for legacy"
        );
        let _ = portal.dir();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_query_that_fails_refuses_the_client_and_names_no_secret() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(
        &[&pg],
        "mode: transaction, auth: {query: \"SELECT passwd FROM no_such_table WHERE usename = $1\"}",
        "",
    )
    .await;
    let (ok, _, err) = portal.psql("app", "apppw", "SELECT 1").await;
    assert!(
        !ok && err.contains("the portal cannot check passwords now"),
        "{err}"
    );
    assert_eq!(backends_of(&pg, "app"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_sent_to_the_other_portal_is_forwarded_to_the_one_that_gave_the_key() {
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let (pa, pb) = (free_port(), free_port());
    let peers = format!(
        "peers: [{{name: portal-b, address: \"127.0.0.1:{pb}\"}}, {{name: portal-a, address: \"127.0.0.1:{pa}\"}}]\n"
    );
    let a = Portal::start_at(
        pa,
        &[&pg],
        "mode: transaction, poolSize: 2",
        &format!("{peers}name: portal-a\n"),
    )
    .await;
    let b = Portal::start_at(
        pb,
        &[&pg],
        "mode: transaction, poolSize: 2",
        &format!("{peers}name: portal-b\n"),
    )
    .await;
    let client = std::sync::Arc::new(a.client("app", "apppw").await.unwrap());
    let token = client.cancel_token();
    let running = {
        let client = client.clone();
        tokio::spawn(async move { client.simple_query("SELECT pg_sleep(20)").await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' AND state = 'active'") != "1" {
        assert!(Instant::now() < deadline, "the query did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cancel reaches the other portal, as a load balancer may send it.
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    token
        .cancel_query_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let e = running.await.unwrap().unwrap_err();
    assert!(db_text(&e).starts_with("57014"), "{e:?}");
    assert_eq!(
        query_one(&client, "SELECT 'still here'").await,
        "still here"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ma, mb) = (a.metrics().await, b.metrics().await);
        let sent = sample(&mb, "dbportal_pool_cancels_total{result=\"peer\"}");
        let served = sample(&ma, "dbportal_pool_cancels_total{result=\"forwarded\"}");
        if (sent, served) == (1.0, 1.0) {
            assert_eq!(
                sample(&ma, "dbportal_pool_cancels_total{result=\"peer\"}"),
                0.0
            );
            assert_eq!(
                sample(&mb, "dbportal_pool_cancels_total{result=\"forwarded\"}"),
                0.0
            );
            break;
        }
        assert!(Instant::now() < deadline, "peer {sent}, forwarded {served}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A key of a portal that is not among the peers is dropped, not bounced around.
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    let mut raw = tcp;
    let mut request = vec![0, 0, 0, 16];
    request.extend_from_slice(&80_877_102u32.to_be_bytes());
    request.extend_from_slice(&((9u32 << 23) | 1).to_be_bytes());
    request.extend_from_slice(&7u32.to_be_bytes());
    raw.write_all(&request).await.unwrap();
    let _ = raw.read(&mut [0u8; 1]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(
        &b.metrics().await,
        "dbportal_pool_cancels_total{result=\"dropped\"}",
    ) != 1.0
    {
        assert!(
            Instant::now() < deadline,
            "the stray cancel was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
        assert!(
            sample(
                &m,
                "dbportal_pool_server_connection_events_total{event=\"closed\"}"
            ) >= 3.0,
            "{m}"
        );
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

/// Waits until the portal has closed `c` (its connection task ended, or a query fails).
async fn closed_within(c: &tokio_postgres::Client, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.is_closed() && c.simple_query("SELECT 1").await.is_ok() {
        assert!(Instant::now() < deadline, "{what}: still open after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    if !have_postgres() {
        return;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(
        &[&pg],
        "mode: transaction, poolSize: 1, queueTimeout: 10s",
        "timeouts: {handshake: 500ms}\n",
    )
    .await;
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
