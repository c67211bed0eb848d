//! SIGTERM and the drain reach the clients of every data plane as they reach forwarded
//! sessions (`dataplane.rs` tests those): the portal binary in front of a real PostgreSQL 15
//! (transaction and session pooling) and a real redis-server (multiplexing) stops accepting,
//! keeps serving its open clients until the last one leaves and then exits; at
//! `drainTimeout` it closes the rest — a pooled transaction left open is rolled back, never
//! handed on — and exits.

mod common;

use std::time::Duration;

use common::{
    closed_within, eventually, skip_without, within, PortalBuilder, PortalProcess, Postgres, Redis,
    TempDir, PG_BIN, STEP,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const PW: &str = "lifecyclepw";

/// A data plane under test and the server behind it.
enum Plane {
    Pooled { mode: &'static str, pg: Postgres },
    Multiplexed { redis: Redis },
}

/// A client of the plane: a tokio-postgres client, or a RESP connection.
enum Client {
    Pg(tokio_postgres::Client),
    Redis(TcpStream),
}

impl Plane {
    fn name(&self) -> String {
        match self {
            Plane::Pooled { mode, .. } => format!("pooling.mode {mode}"),
            Plane::Multiplexed { .. } => "pooling.mode multiplex".to_string(),
        }
    }

    /// The portal's configuration, with `drain` as drainTimeout (its users file in `dir`).
    fn config(&self, dir: &TempDir, drain: &str) -> String {
        let head = format!(
            "port: 7000\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\ntls: {{mode: disabled}}\ndrainTimeout: {drain}\n"
        );
        let body = match self {
            Plane::Pooled { mode, pg } => {
                let users = dir.write("users.yaml", &format!("postgres: {PW}\n"));
                format!(
                    "engine: postgres\nhealthCheck: {{interval: 200ms, rise: 1, fall: 2, credentials: {{username: postgres, password: {PW}}}}}\npooling: {{mode: {mode}, poolSize: 2, auth: {{usersFile: {}}}}}\nbackends:\n  - {{name: pg0, address: \"{}\"}}\n",
                    users.display(),
                    pg.address()
                )
            }
            Plane::Multiplexed { redis } => format!(
                "engine: redis\nhealthCheck: {{interval: 200ms, rise: 1, fall: 2}}\npooling: {{mode: multiplex}}\nbackends:\n  - {{name: r0, address: \"{}\"}}\n",
                redis.address()
            ),
        };
        format!("{head}{body}")
    }

    /// A client through the portal at `addr`, answered once.
    async fn connect(&self, addr: std::net::SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        match self {
            Plane::Pooled { .. } => {
                let mut config = tokio_postgres::Config::new();
                config.user("postgres").password(PW).dbname("postgres");
                let (client, connection) =
                    within("login", config.connect_raw(stream, tokio_postgres::NoTls))
                        .await
                        .unwrap();
                tokio::spawn(connection);
                let mut c = Client::Pg(client);
                assert!(c.works().await, "{}: a new client", self.name());
                c
            }
            Plane::Multiplexed { .. } => {
                let mut c = Client::Redis(stream);
                assert!(c.works().await, "{}: a new client", self.name());
                c
            }
        }
    }
}

impl Client {
    /// Whether one round trip (SELECT 1, PING) is answered.
    async fn works(&mut self) -> bool {
        match self {
            Client::Pg(c) => within("SELECT 1", c.simple_query("SELECT 1")).await.is_ok(),
            Client::Redis(s) => {
                if s.write_all(b"*1\r\n$4\r\nPING\r\n").await.is_err() {
                    return false;
                }
                let mut reply = [0u8; 7];
                matches!(
                    tokio::time::timeout(STEP, s.read_exact(&mut reply)).await,
                    Ok(Ok(_))
                ) && &reply == b"+PONG\r\n"
            }
        }
    }

    /// Whether the portal closed this client (within `STEP`).
    async fn closed(&mut self) -> bool {
        match self {
            Client::Pg(c) => {
                let deadline = tokio::time::Instant::now() + STEP;
                while !c.is_closed() && c.simple_query("SELECT 1").await.is_ok() {
                    if tokio::time::Instant::now() > deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                true
            }
            Client::Redis(s) => closed_within(s, STEP).await,
        }
    }
}

fn planes(pg: bool) -> Vec<Plane> {
    let mut planes = Vec::new();
    if pg {
        for mode in ["transaction", "session"] {
            planes.push(Plane::Pooled {
                mode,
                pg: Postgres::primary(PW),
            });
        }
    }
    planes.push(Plane::Multiplexed {
        redis: Redis::start(),
    });
    planes
}

fn have_servers() -> Option<bool> {
    if skip_without(&["redis-server"]) {
        return None;
    }
    Some(!skip_without(&[&format!("{PG_BIN}/postgres"), "psql"]))
}

async fn wait_exit(p: PortalProcess, what: &str) -> PortalProcess {
    let (status, p) = tokio::task::spawn_blocking(move || {
        let mut p = p;
        (p.proc.wait_exit(STEP), p)
    })
    .await
    .unwrap();
    let status = status.unwrap_or_else(|| panic!("{what}: no exit: {:?}", p.log.lock().unwrap()));
    assert!(status.success(), "{what}: exit {status:?}");
    p
}

async fn wait_leader(p: &PortalProcess) {
    let admin = p.admin;
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let (_, body) = common::http_get(admin, "/status").await;
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status["leader"].is_string() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_pooled_and_multiplexed_clients_until_they_leave() {
    let Some(pg) = have_servers() else { return };
    for plane in planes(pg) {
        let what = plane.name();
        let dir = TempDir::new("lifecycle-drain");
        let yaml = plane.config(&dir, "20s");
        let p = PortalBuilder::new(&yaml).in_dir(dir).spawn();
        wait_leader(&p).await;
        let mut client = plane.connect(p.addr).await;

        p.proc.signal("TERM");
        eventually(&what, STEP, || p.log_contains("shutting down")).await;
        // Draining: the open client is still served, a new connection is not.
        assert!(
            client.works().await,
            "{what}: the open client during the drain"
        );
        let refused = match TcpStream::connect(p.addr).await {
            Err(_) => true,
            Ok(mut s) => closed_within(&mut s, Duration::from_secs(2)).await,
        };
        assert!(
            refused,
            "{what}: a new connection was served while draining"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut p = p;
        assert!(p.proc.running(), "{what}: exited before its client left");
        assert!(client.works().await, "{what}: the open client, still");
        // The last client leaves: the portal exits.
        drop(client);
        let p = wait_exit(p, &what).await;
        assert!(!p.log_contains("drain timeout reached"), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_timeout_closes_pooled_and_multiplexed_clients() {
    let Some(pg) = have_servers() else { return };
    for plane in planes(pg) {
        let what = plane.name();
        let dir = TempDir::new("lifecycle-timeout");
        let yaml = plane.config(&dir, "500ms");
        let p = PortalBuilder::new(&yaml).in_dir(dir).spawn();
        wait_leader(&p).await;
        let mut idle = plane.connect(p.addr).await;
        let mut busy = plane.connect(p.addr).await;
        if let (Client::Pg(c), Plane::Pooled { pg, .. }) = (&busy, &plane) {
            pg.psql("CREATE TABLE IF NOT EXISTS cut (v text)");
            c.simple_query("BEGIN; INSERT INTO cut VALUES ('drained')")
                .await
                .unwrap();
        }
        p.proc.signal("TERM");
        assert!(
            idle.closed().await,
            "{what}: an idle client at the drain timeout"
        );
        assert!(
            busy.closed().await,
            "{what}: a busy client at the drain timeout"
        );
        let p = wait_exit(p, &what).await;
        assert!(p.log_contains("drain timeout reached"), "{what}");
        if let Plane::Pooled { pg, .. } = &plane {
            // The transaction left open was rolled back with its server connection.
            assert_eq!(pg.psql("SELECT count(*) FROM cut"), "0", "{what}");
        }
    }
}
