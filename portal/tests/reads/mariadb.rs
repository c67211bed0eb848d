//! MariaDB: a primary and two GTID replicas (`read_only`), with `STOP REPLICA` and a promotion.

use super::*;
use mysql_async::prelude::Queryable;

const USER: &str = "app";
const PW: &str = "mypw";
const PROBE: &str = "healthCheck: {interval: 200ms, credentials: {username: app, password: mypw}}";

/// Runs `sql` with the `mariadb` client through the portal listener on `port` as `user`; its
/// success, output and errors.
async fn sql_via(port: u16, user: &str, password: &str, sql: &str) -> (bool, String, String) {
    let (port, password) = (port.to_string(), format!("-p{password}"));
    let args = [
        "--no-defaults",
        "-h",
        "127.0.0.1",
        "-P",
        &port,
        "-u",
        user,
        &password,
        "--connect-timeout=5",
        "-N",
        "-B",
        "-e",
        sql,
    ];
    run("mariadb", &args, &[]).await
}

/// The port of the server a new client through `addr` reaches.
async fn server_port(addr: SocketAddr) -> String {
    let (ok, out, err) = sql_via(addr.port(), USER, PW, "SELECT @@port").await;
    assert!(ok, "mariadb through {addr}: {err}");
    out.trim().to_string()
}

fn ports(servers: &[&Mariadb]) -> BTreeSet<String> {
    servers.iter().map(|m| m.port.to_string()).collect()
}

/// A client held open through `addr`, and the port of the server it is on.
async fn hold(addr: SocketAddr) -> (mysql_async::Conn, String) {
    let opts = mysql_async::OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(addr.port())
        .user(Some(USER))
        .pass(Some(PW))
        .prefer_socket(false);
    let mut conn = mysql_async::Conn::new(opts).await.expect("connect");
    let port: u16 = conn
        .query_first("SELECT @@port")
        .await
        .unwrap()
        .expect("a row");
    (conn, port.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_reads_go_to_running_replicas_and_follow_a_promotion() {
    if skip_without(&["mariadbd", "mariadb"]) {
        return;
    }
    let (mut primary, r1, r2) = tokio::task::spawn_blocking(|| {
        let primary = Mariadb::primary(USER, PW);
        let r1 = Mariadb::replica_of(&primary, 2);
        let r2 = Mariadb::replica_of(&primary, 3);
        // A user without the privilege to write on a read-only server, replicated to both.
        primary.sql(
            "CREATE USER 'reader'@'%' IDENTIFIED BY 'rpw'; \
             GRANT SELECT, INSERT, CREATE ON *.* TO 'reader'@'%'; CREATE DATABASE d",
        );
        (primary, r1, r2)
    })
    .await
    .unwrap();
    let backends = [
        ("m0", loopback(primary.port)),
        ("m1", loopback(r1.port)),
        ("m2", loopback(r2.port)),
    ];
    let portal = ReadPortal::start("mysql", &backends, "maxLag: 5s", PROBE).await;
    portal
        .wait_serving(&["m1", "m2"], Duration::from_secs(20))
        .await;
    let ro = portal.reads;

    // Reads spread over both replicas only; the main listener reaches the primary.
    assert_eq!(answers(8, || server_port(ro)).await, ports(&[&r1, &r2]));
    assert_eq!(server_port(portal.addr).await, primary.port.to_string());

    // A write through the read-only listener is refused by the replica (read_only), once the
    // user has reached it.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let refused = loop {
        let (ok, out, err) = sql_via(ro.port(), "reader", "rpw", "CREATE TABLE d.w (i int)").await;
        if !ok && err.contains("1290") {
            break err;
        }
        assert!(
            !ok,
            "a write through the read-only listener succeeded: {out}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the write was not refused as on a replica: {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.contains("read-only"), "{refused}");

    // A replica whose replication is stopped leaves the set; started again, it returns.
    r2.sql("STOP SLAVE");
    portal.wait_serving(&["m1"], Duration::from_secs(10)).await;
    let s = portal.status().await;
    assert_eq!(s["backends"][2]["replication"]["state"], "broken", "{s:#}");
    assert_eq!(answers(4, || server_port(ro)).await, ports(&[&r1]));
    r2.sql("START SLAVE");
    portal
        .wait_serving(&["m1", "m2"], Duration::from_secs(15))
        .await;
    let m = portal.metrics().await;
    let lag = metric(
        &m,
        "dbportal_backend_replication_lag_seconds{backend=\"m1\"}",
    );
    assert!(lag.is_some_and(|l| l < 5.0), "{lag:?}\n{m}");

    // One client held on each replica (round robin).
    let (a, a_port) = hold(ro).await;
    let (b, b_port) = hold(ro).await;
    assert_eq!(set(&[a_port.clone(), b_port]), ports(&[&r1, &r2]));
    let (mut on_r1, on_r2) = if a_port == r1.port.to_string() {
        (a, b)
    } else {
        (b, a)
    };

    // r1 promoted after the primary's crash: it leads, its read session is cut.
    primary.kill();
    r1.promote();
    portal.wait_leader("m1").await;
    assert_eq!(server_port(portal.addr).await, r1.port.to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while on_r1.query_drop("SELECT 1").await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the read session on the promoted replica was not cut"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // r2 has lost its primary: no replica qualifies, and the leader serves reads...
    portal.wait_serving(&["m1"], Duration::from_secs(15)).await;
    assert_eq!(answers(2, || server_port(ro)).await, ports(&[&r1]));
    // ...or, without the fallback, a new client gets a MySQL error packet.
    let strict = ReadPortal::start("mysql", &backends, "fallbackToLeader: false", PROBE).await;
    strict.wait_leader("m1").await;
    strict.wait_serving(&[], Duration::from_secs(15)).await;
    let (ok, _, err) = sql_via(strict.reads.port(), USER, PW, "SELECT 1").await;
    assert!(!ok);
    assert!(
        err.contains("1105") && err.contains("readOnly.maxLag"),
        "{err}"
    );

    // r2 follows the new primary: it serves reads again, on both portals.
    r2.follow(r1.port);
    portal.wait_serving(&["m2"], Duration::from_secs(20)).await;
    strict.wait_serving(&["m2"], Duration::from_secs(20)).await;
    assert_eq!(answers(4, || server_port(ro)).await, ports(&[&r2]));
    assert_eq!(server_port(strict.reads).await, r2.port.to_string());
    drop(on_r2);
}
