//! TLS from the portal to real TLS databases (`tls.backend`): the data plane re-encrypts
//! plaintext clients, or clients whose TLS it terminates, to a TLS-only redis-server
//! (`--tls-port`), to PostgreSQL with `ssl = on` that refuses plaintext, and to an etcd member
//! serving HTTPS; the real checker probes the same nodes over TLS, and a wrong CA fails
//! visibly. PostgreSQL logins with SCRAM: plaintext clients with libpq's defaults (the portal
//! drops the server's channel-binding offer for them), TLS-terminated clients with
//! `channel_binding=disable` (and what `prefer` does).

mod common;

use common::tls as tlsca;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use common::{skip_without, Outcome, Portal, PortalBuilder, TempDir};
use portal::health::{spawn_checker, HealthHandle, HealthView, StandaloneCredentials};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

/// The databases' CA and certificate, a CA that signed nothing here, and the portal's own
/// certificate for its clients (from the databases' CA, to keep one trust file).
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
    wrong_ca: PathBuf,
    db_cert: PathBuf,
    db_key: PathBuf,
    portal_cert: PathBuf,
    portal_key: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = TempDir::new(tag);
        let ca = tlsca::TestCa::new("database CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let wrong_ca = dir.path().join("wrong-ca.pem");
        std::fs::write(&wrong_ca, tlsca::TestCa::new("another CA").cert_pem).unwrap();
        let (db_cert, db_key) = ca
            .server("db", &["127.0.0.1", "localhost"])
            .write(dir.path(), "db");
        let (portal_cert, portal_key) = ca
            .server("portal", &["127.0.0.1", "localhost"])
            .write(dir.path(), "portal");
        Pki {
            _dir: dir,
            ca: ca_file,
            wrong_ca,
            db_cert,
            db_key,
            portal_cert,
            portal_key,
        }
    }

    /// A portal configuration for `engine` in front of `backend`, TLS to it verified against
    /// `backend_ca`; clients plaintext, or TLS terminated with the portal's certificate.
    fn yaml(
        &self,
        engine: &str,
        backend: &str,
        backend_ca: &Path,
        client_tls: bool,
        extra: &str,
    ) -> String {
        let clients = if client_tls {
            format!(
                "mode: terminate, certFile: \"{}\", keyFile: \"{}\"",
                self.portal_cert.display(),
                self.portal_key.display()
            )
        } else {
            "mode: disabled".into()
        };
        format!(
            "engine: {engine}\nport: 7000\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\n\
             drainTimeout: 1s\nrouting: {{mode: leader}}\n\
             timeouts: {{connect: 3s}}\nhealthCheck: {{interval: 200ms}}\n\
             backends:\n  - {{name: db0, address: \"{backend}\"}}\n\
             tls: {{{clients}, backend: {{enabled: true, caFile: \"{}\"}}}}\n{extra}",
            backend_ca.display()
        )
    }
}

/// The portal in-process with the real checker (probing over the same backend TLS).
async fn portal_with_checker(
    yaml: &str,
) -> (
    Portal,
    HealthHandle,
    watch::Sender<Arc<portal::config::Config>>,
) {
    let config = common::config(yaml);
    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    let checker = spawn_checker(config_rx, Arc::new(StandaloneCredentials));
    let (unused, _) = watch::channel(HealthView::default());
    let portal = PortalBuilder::new(yaml)
        .health(unused, checker.view())
        .start()
        .await;
    (portal, checker, config_tx)
}

/// Waits until the checker's view satisfies `ok`; panics with the last view otherwise.
async fn wait_view(
    checker: &HealthHandle,
    what: &str,
    ok: impl Fn(&HealthView) -> bool,
) -> HealthView {
    let mut view = checker.view();
    let seen = match tokio::time::timeout(common::STEP, view.wait_for(|v| ok(v))).await {
        Ok(Ok(v)) => Some(v.clone()),
        _ => None,
    };
    seen.unwrap_or_else(|| panic!("{what} not seen; last view: {:#?}", *view.borrow()))
}

/// Waits until the checker's view says `db0` is up and leads.
async fn wait_leader(checker: &HealthHandle) {
    wait_view(checker, "db0 leads", |v| v.leader_name() == Some("db0")).await;
}

/// redis-cli through the portal, with TLS trusting `ca` when given.
async fn redis_cli(portal: &Portal, ca: Option<&Path>, cmd: &[&str]) -> Outcome {
    let ca = ca.map(|ca| ca.display().to_string());
    let mut args = match &ca {
        Some(ca) => vec!["--tls", "--cacert", ca],
        None => Vec::new(),
    };
    args.extend_from_slice(cmd);
    common::redis_cli(portal.addr.port(), &args).await
}

/// Redis multiplexing with TLS both ways: the portal terminates the clients' TLS and its
/// shared and dedicated server connections speak TLS to a TLS-only redis-server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_multiplexing_over_tls_both_ways() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let pki = Pki::new("backend-tls-mux");
    let (cert, key, ca) = (pki.db_cert.clone(), pki.db_key.clone(), pki.ca.clone());
    let redis = tokio::task::spawn_blocking(move || common::Redis::start_tls(&cert, &key, &ca))
        .await
        .unwrap();
    let yaml = pki.yaml(
        "redis",
        &redis.address(),
        &pki.ca,
        true,
        "pooling: {mode: multiplex, serverConnections: 2}\n",
    );
    let (portal, checker, _config) = portal_with_checker(&yaml).await;
    wait_leader(&checker).await;
    let (ok, out, err) = redis_cli(&portal, Some(&pki.ca), &["SET", "k", "muxed"]).await;
    assert!(ok && out == "OK", "{out} {err}");
    assert_eq!(
        redis_cli(&portal, Some(&pki.ca), &["GET", "k"]).await.1,
        "muxed"
    );
    // A dedicated connection (MULTI), over TLS as well.
    let (ok, out, err) = redis_cli(
        &portal,
        Some(&pki.ca),
        &["EVAL", "return redis.call('INCR', KEYS[1])", "1", "n"],
    )
    .await;
    assert!(ok && out == "1", "{out} {err}");
    let (ok, out, err) = redis_cli(&portal, Some(&pki.ca), &["BLPOP", "empty", "0.1"]).await;
    assert!(ok && out.is_empty(), "{out:?} {err}");
    let status = portal.status().await;
    assert_eq!(status["multiplex"]["pinned"]["blocking"], 0, "{status}");
    assert_eq!(redis.cli(&["GET", "k"]), "muxed");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sessions_reencrypted_to_a_tls_only_redis() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let pki = Pki::new("backend-tls-redis");
    let (cert, key, ca) = (pki.db_cert.clone(), pki.db_key.clone(), pki.ca.clone());
    let redis = tokio::task::spawn_blocking(move || common::Redis::start_tls(&cert, &key, &ca))
        .await
        .unwrap();
    // The server takes TLS only: plaintext gets no PONG.
    let (_, out, _) = common::redis_cli(redis.port, &["PING"]).await;
    assert_ne!(out, "PONG", "the server must refuse plaintext");

    // Plaintext clients, re-encrypted by the portal; the checker probes over TLS too.
    let (portal, checker, _config) =
        portal_with_checker(&pki.yaml("redis", &redis.address(), &pki.ca, false, "")).await;
    wait_leader(&checker).await;
    let (ok, out, err) = redis_cli(&portal, None, &["SET", "k", "through-tls"]).await;
    assert!(ok && out == "OK", "{out} {err}");
    assert_eq!(
        redis_cli(&portal, None, &["GET", "k"]).await.1,
        "through-tls"
    );
    assert_eq!(redis.cli(&["GET", "k"]), "through-tls");
    let status = portal.status().await;
    assert_eq!(status["backends"][0]["role"], "leader", "{status}");
    portal.stop().await;

    // Client TLS terminated by the portal, then TLS again to the server.
    let (portal, checker, _config) =
        portal_with_checker(&pki.yaml("redis", &redis.address(), &pki.ca, true, "")).await;
    wait_leader(&checker).await;
    let (ok, out, err) = redis_cli(&portal, Some(&pki.ca), &["GET", "k"]).await;
    assert!(ok && out == "through-tls", "{out} {err}");
    portal.stop().await;

    // A CA that did not sign the server: the probe says so, and no session gets through.
    let (portal, checker, _config) =
        portal_with_checker(&pki.yaml("redis", &redis.address(), &pki.wrong_ca, false, "")).await;
    wait_view(&checker, "db0 down", |v| {
        v.get("db0").is_some_and(|b| !b.up)
    })
    .await;
    let status = portal.status().await;
    let error = status["backends"][0]["lastError"].as_str().unwrap_or("");
    assert!(error.contains("UnknownIssuer"), "{status}");
    let (_, out, _) = redis_cli(&portal, None, &["PING"]).await;
    assert_ne!(out, "PONG");
    portal.stop().await;
}

/// Straight to the server over TLS (trusting `ca`): a StartupMessage as `postgres`, then a
/// SASLInitialResponse choosing SCRAM-SHA-256 (no binding) with gs2 flag `flag` and `nonce`.
/// Returns the mechanisms the server offered and its answer: tag and text.
async fn scram_first_step(
    port: u16,
    ca: &Path,
    flag: char,
    nonce: &str,
) -> (Vec<String>, u8, String) {
    let (mechanism, client_first) = ("SCRAM-SHA-256", format!("{flag},,n=,r={nonce}"));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(portal::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut ssl_request = 8u32.to_be_bytes().to_vec();
    ssl_request.extend_from_slice(&80_877_103u32.to_be_bytes());
    tcp.write_all(&ssl_request).await.unwrap();
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for s in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut startup = (body.len() as u32 + 4).to_be_bytes().to_vec();
    startup.extend_from_slice(&body);
    tls.write_all(&startup).await.unwrap();

    async fn message<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        (head[0], body)
    }
    let (tag, offer) = message(&mut tls).await;
    assert_eq!(tag, b'R');
    assert_eq!(offer[..4], 10u32.to_be_bytes(), "not AuthenticationSASL");
    let offered = offer[4..]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect();

    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(client_first.len() as u32).to_be_bytes());
    body.extend_from_slice(client_first.as_bytes());
    let mut initial = vec![b'p'];
    initial.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    initial.extend_from_slice(&body);
    tls.write_all(&initial).await.unwrap();
    let (tag, body) = message(&mut tls).await;
    (offered, tag, String::from_utf8_lossy(&body).into_owned())
}

/// Waits until the portal process says it is ready (a healthy leader to route to).
async fn wait_ready(portal: &common::PortalProcess) {
    common::within("the portal ready", async {
        while common::http_get(portal.admin, "/readyz").await.0 != 200 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_reencrypted_to_a_ssl_postgres() {
    if skip_without(&["psql", &format!("{}/postgres", common::PG_BIN)]) {
        return;
    }
    let pki = Pki::new("backend-tls-pg");
    let (cert, key) = (pki.db_cert.clone(), pki.db_key.clone());
    let pg = tokio::task::spawn_blocking(move || {
        let pg = common::Postgres::primary("pgpw");
        pg.enable_tls(&cert, &key, true);
        // One role per authentication request the server can answer a startup with.
        pg.psql("SET password_encryption = 'md5'; CREATE ROLE app_md5 LOGIN PASSWORD 'md5pw'");
        pg.hba_first("hostssl all app_md5 127.0.0.1/32 md5");
        pg.psql("CREATE ROLE app_clear LOGIN PASSWORD 'clearpw'");
        pg.hba_first("hostssl all app_clear 127.0.0.1/32 password");
        pg.psql("CREATE ROLE app_trust LOGIN");
        pg.hba_first("hostssl all app_trust 127.0.0.1/32 trust");
        pg.hba_first("hostssl all app_rejected 127.0.0.1/32 reject");
        pg
    })
    .await
    .unwrap();
    let ssl_query = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // psql as `user` (password `password`) with more conninfo (libpq's defaults otherwise:
    // sslmode=prefer, channel_binding=prefer); (ok, out, err).
    let psql = |port: u16, user: &str, password: &str, conninfo: &str| {
        let psql = common::psql(port, user, password).conninfo(&format!(
            "host=localhost hostaddr=127.0.0.1 sslrootcert={} connect_timeout=10 {conninfo}",
            pki.ca.display()
        ));
        async move { psql.run(&["-XAtq", "-c", ssl_query]).await }
    };
    // The server refuses plaintext.
    let (ok, out, err) = psql(pg.port, "postgres", "pgpw", "sslmode=disable").await;
    assert!(!ok, "plaintext must be refused: {out}");
    assert!(err.contains("no encryption"), "{err}");

    // Over TLS the server offers channel binding first. A client that saw no -PLUS offer but
    // could bind says so with gs2 flag `y`, and the server rejects that as a downgrade: so the
    // portal cannot drop the offer for a client whose TLS it terminates. Flag `n` (a client
    // without TLS, which cannot bind) is accepted: what a plaintext client sends once the
    // portal dropped the offer.
    let nonce = "fyko+d2lbbFgONRv9qkxdawL";
    let (offered, tag, text) = scram_first_step(pg.port, &pki.ca, 'y', nonce).await;
    assert_eq!(offered, ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
    assert_eq!(tag, b'E', "{text}");
    assert!(text.contains("channel binding negotiation error"), "{text}");
    let (_, tag, text) = scram_first_step(pg.port, &pki.ca, 'n', nonce).await;
    assert_eq!(tag, b'R', "{text}");
    assert!(text.contains(nonce), "SCRAM continues: {text}");

    let credentials =
        "healthCheck: {interval: 200ms, credentials: {username: postgres, password: pgpw}}\n";
    let with_credentials = |client_tls: bool| {
        pki.yaml("postgres", &pg.address(), &pki.ca, client_tls, "")
            .replace("healthCheck: {interval: 200ms}\n", credentials)
    };

    // Plaintext clients with libpq's defaults (the portal declines their SSLRequest): SCRAM
    // works, since the portal drops the SCRAM-SHA-256-PLUS offer that libpq refuses over a
    // connection without TLS; the server sees an SSL session. Every other first answer (md5,
    // cleartext, trust, an error) reaches the client untouched.
    let (portal, checker, _config) = portal_with_checker(&with_credentials(false)).await;
    wait_leader(&checker).await;
    let port = portal.addr.port();
    let (ok, out, err) = psql(port, "postgres", "pgpw", "").await;
    assert!(ok && out == "t", "{out} {err}");
    let (ok, out, err) = psql(port, "postgres", "wrong", "").await;
    assert!(
        !ok && err.contains("password authentication failed"),
        "{out} {err}"
    );
    for (user, password) in [
        ("app_md5", "md5pw"),
        ("app_clear", "clearpw"),
        ("app_trust", ""),
    ] {
        let (ok, out, err) = psql(port, user, password, "").await;
        assert!(ok && out == "t", "{user}: {out} {err}");
    }
    let (ok, _, err) = psql(port, "app_rejected", "", "").await;
    assert!(!ok && err.contains("rejects connection"), "{err}");
    // tokio-postgres without TLS, its defaults too.
    let tcp = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
    let (client, connection) = "user=postgres password=pgpw dbname=postgres"
        .parse::<tokio_postgres::Config>()
        .unwrap()
        .connect_raw(tcp, tokio_postgres::NoTls)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let row = client.query_one(ssl_query, &[]).await.unwrap();
    assert!(row.get::<_, bool>(0));
    drop(client);
    let _ = connection.await;
    portal.stop().await;

    // The client's TLS terminated by the portal (verify-full), TLS again to the server. SCRAM
    // works without channel binding; with libpq's default (prefer) the client binds to the
    // portal's certificate, the server refuses, and the portal logs the fix.
    let dir = pki.ca.parent().unwrap();
    let config = dir.join("portal.yaml");
    let portal = PortalBuilder::new(&with_credentials(true))
        .file(&config)
        .spawn();
    wait_ready(&portal).await;
    let port = portal.addr.port();
    let (ok, out, err) = psql(
        port,
        "postgres",
        "pgpw",
        "sslmode=verify-full channel_binding=disable",
    )
    .await;
    assert!(ok && out == "t", "{out} {err}");
    let (ok, out, err) = psql(port, "app_md5", "md5pw", "sslmode=require").await;
    assert!(ok && out == "t", "{out} {err}");
    let fix = "channel_binding=disable";
    assert!(
        !portal.log_contains(fix),
        "no warning for clients that do not bind"
    );
    let (ok, out, err) = psql(port, "postgres", "pgpw", "sslmode=verify-full").await;
    assert!(!ok, "{out}");
    assert!(err.contains("channel binding check failed"), "{err}");
    common::within("the portal's warning", async {
        while !portal.log_contains(fix) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(portal);

    // Binding works only when the portal serves the server's own certificate (the binding is
    // a hash of it), which means giving the portal the database's private key.
    let same_cert = with_credentials(true)
        .replace(
            &pki.portal_cert.display().to_string(),
            &pki.db_cert.display().to_string(),
        )
        .replace(
            &pki.portal_key.display().to_string(),
            &pki.db_key.display().to_string(),
        );
    let (portal, checker, _config) = portal_with_checker(&same_cert).await;
    wait_leader(&checker).await;
    let (ok, out, err) = psql(
        portal.addr.port(),
        "postgres",
        "pgpw",
        "sslmode=verify-full channel_binding=require",
    )
    .await;
    assert!(ok && out == "t", "{out} {err}");
    portal.stop().await;

    // A wrong CA: the probe fails with the reason, the client is not let through.
    let wrong = pki
        .yaml("postgres", &pg.address(), &pki.wrong_ca, false, "")
        .replace("healthCheck: {interval: 200ms}\n", credentials);
    let (portal, checker, _config) = portal_with_checker(&wrong).await;
    let view = wait_view(&checker, "db0 down", |v| {
        v.get("db0").is_some_and(|b| !b.up)
    })
    .await;
    let error = view
        .get("db0")
        .and_then(|b| b.last_error.clone())
        .unwrap_or_default();
    assert!(error.contains("UnknownIssuer"), "{error}");
    let (ok, out, _) = psql(portal.addr.port(), "app_md5", "md5pw", "sslmode=disable").await;
    assert!(!ok && out.is_empty(), "{out}");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_https_through_the_portal_with_its_raft_leader_in_status() {
    if skip_without(&["etcd", "etcdctl"]) {
        return;
    }
    let pki = Pki::new("backend-tls-etcd");
    let tls = (pki.db_cert.clone(), pki.db_key.clone(), pki.ca.clone());
    let etcd = tokio::task::spawn_blocking(move || {
        common::Etcd::start(
            1,
            &common::EtcdOptions {
                tls: Some(tls),
                ..common::EtcdOptions::default()
            },
        )
    })
    .await
    .unwrap();
    let (portal, checker, _config) =
        portal_with_checker(&pki.yaml("etcd", &etcd.members[0].address(), &pki.ca, false, ""))
            .await;
    wait_leader(&checker).await;
    let status = portal.status().await;
    assert_eq!(status["backends"][0]["role"], "shared-leader", "{status}");
    assert_eq!(status["backends"][0]["engineLeader"], true, "{status}");

    // Plain HTTP/1.1 from the client, HTTPS from the portal to the member.
    let body = common::within("GET /version through the portal", async {
        let mut s = tokio::net::TcpStream::connect(portal.addr).await.unwrap();
        s.write_all(b"GET /version HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await;
    assert!(
        body.starts_with("HTTP/1.1 200") && body.contains("etcdserver"),
        "{body}"
    );
    portal.stop().await;
}
