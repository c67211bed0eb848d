//! PostgreSQL transaction and session pooling (`pooling.mode: transaction | session`) through
//! the standalone portal in front of real PostgreSQL 15 servers on loopback, with real
//! clients: psql, pgbench (simple and extended protocol, many clients on a small pool, the
//! backend count read from pg_stat_activity), tokio-postgres, python3-psycopg; wrong
//! passwords; the queue timeout; parameter replay; cancel; failover with a promoted streaming
//! standby (the old primary demoted to its standby) while pooled clients sit idle, one holds a
//! transaction open and others write in a loop; what a pooled session shows against a direct
//! one (startup parameters and RESET, PREPARE and DEALLOCATE, unreported parameters).

mod auth;
mod clients;
#[path = "../common/mod.rs"]
mod common;
mod failover;
mod lifecycle;
mod statements;
mod transparency;

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

    /// A Python script (psycopg from Debian) run with the portal's port as its argument,
    /// from a file `name` in the portal's directory: its standard output, once it succeeded.
    async fn python(&self, name: &str, script: &str) -> String {
        let path = self.dir().join(name);
        std::fs::write(&path, script).unwrap();
        let (ok, out, err) = run(
            "/usr/bin/python3",
            &[path.display().to_string(), self.port()],
            &[],
        )
        .await;
        assert!(ok, "{name}: {out}\n{err}");
        out
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

/// A primary with the `app` user and its table `t`, and a portal pooling it with `pooling`
/// (and `extra`); `None` where PostgreSQL is not installed.
async fn app_portal(pooling: &str, extra: &str) -> Option<(Postgres, Portal)> {
    if !have_postgres() {
        return None;
    }
    let pg = Postgres::primary(PW);
    with_app_user(&pg);
    let portal = Portal::start(&[&pg], pooling, extra).await;
    Some((pg, portal))
}

fn with_app_user(pg: &Postgres) {
    pg.psql("CREATE ROLE app LOGIN PASSWORD 'apppw'");
    pg.psql("CREATE TABLE t (id serial PRIMARY KEY, v text); GRANT ALL ON t TO app; GRANT ALL ON SEQUENCE t_id_seq TO app");
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

/// Waits until the portal has closed `c` (its connection task ended, or a query fails).
async fn closed_within(c: &tokio_postgres::Client, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.is_closed() && c.simple_query("SELECT 1").await.is_ok() {
        assert!(Instant::now() < deadline, "{what}: still open after 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
