//! PostgreSQL: a primary and two streaming standbys; pooled clients on the read-only listener.

use super::*;
use tokio_postgres::{error::SqlState, Client, NoTls};

const PW: &str = "pgpw";
const PROBE: &str =
    "healthCheck: {interval: 200ms, credentials: {username: postgres, password: pgpw}}";

async fn connect(addr: SocketAddr) -> Result<Client, tokio_postgres::Error> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("TCP connect to the portal");
    let mut config = tokio_postgres::Config::new();
    config.user("postgres").password(PW).dbname("postgres");
    let (client, connection) = config.connect_raw(tcp, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The port of the server `client` is on.
async fn port_of(client: &Client) -> String {
    let row = client
        .query_one("SELECT inet_server_port()::text", &[])
        .await
        .expect("inet_server_port()");
    row.get(0)
}

/// The port of the server a new connection through `addr` reaches.
async fn server_port(addr: SocketAddr) -> String {
    let client = connect(addr).await.expect("connect");
    port_of(&client).await
}

fn ports(servers: &[&Postgres]) -> BTreeSet<String> {
    servers.iter().map(|p| p.port.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_go_to_standbys_within_max_lag_and_follow_a_promotion() {
    if skip_without(&["/usr/lib/postgresql/15/bin/postgres"]) {
        return;
    }
    let mut primary = Postgres::primary(PW);
    let s1 = Postgres::standby_of(&primary);
    let mut s2 = Postgres::standby_of(&primary);
    let backends = [
        ("pg0", loopback(primary.port)),
        ("pg1", loopback(s1.port)),
        ("pg2", loopback(s2.port)),
    ];
    let portal = ReadPortal::start("postgres", &backends, "maxLag: 2s", PROBE).await;
    portal
        .wait_serving(&["pg1", "pg2"], Duration::from_secs(15))
        .await;
    let ro = portal.reads;

    // Reads spread over both standbys only; the main listener reaches the primary.
    assert_eq!(answers(8, || server_port(ro)).await, ports(&[&s1, &s2]));
    assert_eq!(server_port(portal.addr).await, primary.port.to_string());

    // A write through the read-only listener is refused by the standby.
    let client = connect(ro).await.unwrap();
    let err = client
        .simple_query("CREATE TABLE w (i int)")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );

    // Two clients held open, one on each standby (round robin).
    let (a, b) = (connect(ro).await.unwrap(), connect(ro).await.unwrap());
    let (on_s1, on_s2) = if port_of(&a).await == s1.port.to_string() {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(port_of(&on_s2).await, s2.port.to_string());

    // A standby whose replay is paused falls behind maxLag and leaves; resumed, it returns.
    s2.psql("SELECT pg_wal_replay_pause()");
    primary.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    portal.wait_serving(&["pg1"], Duration::from_secs(15)).await;
    let s = portal.status().await;
    assert_eq!(s["backends"][2]["replication"]["state"], "lagging", "{s:#}");
    assert!(
        s["backends"][2]["replication"]["lagBytes"].as_u64() > Some(0),
        "{s:#}"
    );
    assert_eq!(answers(4, || server_port(ro)).await, ports(&[&s1]));
    let m = portal.metrics().await;
    let lag = metric(
        &m,
        "dbportal_backend_replication_lag_seconds{backend=\"pg2\"}",
    );
    assert!(lag > Some(2.0), "{lag:?}");
    s2.psql("SELECT pg_wal_replay_resume()");
    portal
        .wait_serving(&["pg1", "pg2"], Duration::from_secs(15))
        .await;
    assert_eq!(
        port_of(&on_s2).await,
        s2.port.to_string(),
        "lag cuts nobody"
    );

    // s1 promoted: it leads (the main listener reaches it) and its read sessions are cut.
    primary.stop();
    s1.promote();
    portal.wait_leader("pg1").await;
    assert_eq!(server_port(portal.addr).await, s1.port.to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !on_s1.is_closed() {
        assert!(
            std::time::Instant::now() < deadline,
            "the read session on the promoted standby was not cut"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // s2 has lost its primary (no WAL receiver): no replica qualifies, the leader serves.
    portal.wait_serving(&["pg1"], Duration::from_secs(15)).await;
    assert_eq!(answers(2, || server_port(ro)).await, ports(&[&s1]));
    // Without the fallback, a new client gets 57P03 (cannot connect now).
    let strict = ReadPortal::start("postgres", &backends, "fallbackToLeader: false", PROBE).await;
    strict.wait_leader("pg1").await;
    strict.wait_serving(&[], Duration::from_secs(15)).await;
    let Err(err) = connect(strict.reads).await else {
        panic!("a client of the read-only listener was not refused");
    };
    assert_eq!(err.code(), Some(&SqlState::CANNOT_CONNECT_NOW), "{err}");
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("readOnly.maxLag"), "{err:?}");

    // s2 follows the new primary: it serves reads again, on both portals.
    s2.restart_as_standby_of(&s1);
    portal.wait_serving(&["pg2"], Duration::from_secs(20)).await;
    strict.wait_serving(&["pg2"], Duration::from_secs(20)).await;
    assert_eq!(answers(4, || server_port(ro)).await, ports(&[&s2]));
    assert_eq!(server_port(strict.reads).await, s2.port.to_string());
}

/// Pooled clients (transaction pooling) on the read-only listener stay connected while the
/// standby they read from is promoted and the leader takes their reads, with leastconn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pooled_reads_stay_connected_through_a_promotion() {
    if skip_without(&["/usr/lib/postgresql/15/bin/postgres"]) {
        return;
    }
    let mut primary = Postgres::primary(PW);
    let standby = Postgres::standby_of(&primary);
    let dir = TempDir::new("reads-pool");
    let users = dir.write("users.yaml", &format!("postgres: {PW}\n"));
    let backends = [
        ("pg0", loopback(primary.port)),
        ("pg1", loopback(standby.port)),
    ];
    let pooling = format!(
        "{PROBE}\npooling: {{mode: transaction, poolSize: 2, auth: {{usersFile: {}}}}}",
        users.display()
    );
    let portal = ReadPortal::start("postgres", &backends, "routing: leastconn", &pooling).await;
    portal.wait_serving(&["pg1"], Duration::from_secs(15)).await;
    assert_eq!(portal.status().await["readOnly"]["routing"], "leastconn");
    let clients = [
        connect(portal.reads).await.unwrap(),
        connect(portal.reads).await.unwrap(),
    ];
    for c in &clients {
        assert_eq!(port_of(c).await, standby.port.to_string());
    }

    primary.stop();
    standby.promote();
    portal.wait_leader("pg1").await;
    portal.wait_serving(&["pg1"], Duration::from_secs(15)).await;
    for c in &clients {
        let (mut answered, deadline) = (None, std::time::Instant::now() + Duration::from_secs(15));
        while answered.is_none() && std::time::Instant::now() < deadline {
            match c.query_one("SELECT pg_is_in_recovery()::text", &[]).await {
                Ok(row) => answered = Some(row.get::<_, String>(0)),
                Err(e) => {
                    assert!(!c.is_closed(), "a pooled client was disconnected: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        assert_eq!(
            answered.as_deref(),
            Some("false"),
            "read from the new leader"
        );
        assert!(!c.is_closed());
    }
}
