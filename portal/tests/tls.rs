//! TLS termination with real clients: redis-cli, psql, the mariadb client and openssl against a
//! portal in front of real servers, a Rust client for PostgreSQL 17 direct TLS, certificate
//! rotation under load with the portal binary, and malformed negotiations.

mod common;

use common::tls as tlsca;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::{metric, Portal, PortalBuilder, RedisServer, TempDir, TestServer};
use common::{psql, redis_cli, run, skip_without};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use tlsca::{Leaf, TestCa};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A CA, a server certificate for localhost / 127.0.0.1, and their files.
struct Pki {
    dir: TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir = TempDir::new(tag);
        let ca = TestCa::new("dbportal test CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let (cert, key) = ca
            .server("portal-1", &["localhost", "127.0.0.1"])
            .write(dir.path(), "portal");
        Pki {
            dir,
            ca,
            ca_file,
            cert,
            key,
        }
    }

    fn leaf(&self, cn: &str) -> Leaf {
        self.ca.server(cn, &["localhost", "127.0.0.1"])
    }

    /// A portal configuration terminating TLS for `engine` in front of `backend`; `tls_extra`
    /// lines go under `tls:` (indented by the caller's two spaces).
    fn yaml(&self, engine: &str, backend: &str, tls_extra: &str) -> String {
        format!(
            "engine: {engine}\nport: 7000\nlisten: \"127.0.0.1:0\"\nadmin: \"127.0.0.1:0\"\n\
             routing: {{mode: first}}\ndrainTimeout: 1s\n\
             backends:\n  - {{name: n0, address: \"{backend}\"}}\n\
             tls:\n  certFile: \"{}\"\n  keyFile: \"{}\"\n{tls_extra}",
            self.cert.display(),
            self.key.display()
        )
    }

    fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.ca.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(portal::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(config)
    }
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake"))?
}

/// The common name of the certificate a new handshake is served.
async fn served_cn(addr: std::net::SocketAddr, config: Arc<rustls::ClientConfig>) -> String {
    let tls = tls_connect(addr, config).await.unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    use x509_cert::der::Decode;
    x509_cert::Certificate::from_der(der.as_ref())
        .unwrap()
        .tbs_certificate
        .subject
        .to_string()
}

async fn redis_ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
) -> std::io::Result<()> {
    s.write_all(b"*1\r\n$4\r\nPING\r\n").await?;
    s.flush().await?;
    let mut reply = [0u8; 7];
    s.read_exact(&mut reply).await?;
    if &reply != b"+PONG\r\n" {
        return Err(std::io::Error::other(format!("reply {reply:?}")));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_over_tls_and_client_certificates() {
    if skip_without(&["redis-server", "redis-cli"]) {
        return;
    }
    let redis = RedisServer::start().await;
    let pki = Pki::new("tls-redis");
    let portal = Portal::start(&pki.yaml("redis", &redis.addr.to_string(), "")).await;
    let port = portal.addr.port();
    let ca = pki.ca_file.display().to_string();
    let cli = |extra: Vec<String>, cmd: &'static [&'static str]| {
        let mut args: Vec<String> = vec!["--tls".into(), "--cacert".into(), ca.clone()];
        args.extend(extra);
        args.extend(cmd.iter().map(|s| s.to_string()));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            redis_cli(port, &args).await
        }
    };
    let (ok, out, err) = cli(vec![], &["PING"]).await;
    assert!(ok && out == "PONG", "{out} {err}");
    assert_eq!(cli(vec![], &["SET", "k", "over-tls"]).await.1, "OK");
    assert_eq!(cli(vec![], &["GET", "k"]).await.1, "over-tls");

    // Plaintext to a TLS portal gets nowhere.
    let (_, out, _) = redis_cli(port, &["PING"]).await;
    assert_ne!(out, "PONG");

    let status = portal.status().await;
    assert!(
        status["tls"]["certificate"]["subject"]
            .as_str()
            .unwrap()
            .contains("portal-1"),
        "{status}"
    );
    let metrics = portal.metrics().await;
    let expiry = metric(&metrics, "dbportal_tls_certificate_expiry_seconds").unwrap();
    assert!(expiry > 80_000.0 && expiry <= 86_401.0, "{expiry}");
    portal.stop().await;

    // Client certificates required.
    let clients = TestCa::new("client CA");
    let client_ca = pki.dir.path().join("client-ca.pem");
    std::fs::write(&client_ca, &clients.cert_pem).unwrap();
    let portal = Portal::start(&pki.yaml(
        "redis",
        &redis.addr.to_string(),
        &format!("  clientCAFile: \"{}\"\n", client_ca.display()),
    ))
    .await;
    let port = portal.addr.port();
    let cli = |extra: Vec<String>| {
        let mut args: Vec<String> = vec!["--tls".into(), "--cacert".into(), ca.clone()];
        args.extend(extra);
        args.push("PING".into());
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            redis_cli(port, &args).await
        }
    };
    let with_cert = |leaf: Leaf, stem: &str| {
        let (c, k) = leaf.write(pki.dir.path(), stem);
        vec![
            "--cert".to_string(),
            c.display().to_string(),
            "--key".to_string(),
            k.display().to_string(),
        ]
    };
    let (_, out, err) = cli(with_cert(clients.client("app"), "app")).await;
    assert_eq!(out, "PONG", "{err}");
    let (_, out, _) = cli(vec![]).await;
    assert_ne!(out, "PONG", "no client certificate");
    let (_, out, _) = cli(with_cert(TestCa::new("rogue").client("app"), "rogue")).await;
    assert_ne!(out, "PONG", "untrusted client certificate");
    // The client may exit on the portal's alert before the portal has counted the failure
    // it sent the alert for: wait (bounded) for the count.
    let failures = "dbportal_tls_negotiation_failures_total{reason=\"handshake\"}";
    let mut metrics = portal.metrics().await;
    for _ in 0..50 {
        if metric(&metrics, failures).unwrap() >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        metrics = portal.metrics().await;
    }
    assert!(metric(&metrics, failures).unwrap() >= 2.0, "{metrics}");
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_tls_versions_are_refused() {
    if skip_without(&["openssl"]) {
        return;
    }
    let backend = TestServer::echo().await;
    let pki = Pki::new("tls-versions");
    let s_client = |port: u16, version: &'static str| async move {
        let connect = format!("127.0.0.1:{port}");
        // SECLEVEL=0 so that the client itself is willing to speak TLS 1.0/1.1: the refusal
        // must come from the portal.
        run(
            "openssl",
            &[
                "s_client",
                "-connect",
                &connect,
                version,
                "-cipher",
                "DEFAULT@SECLEVEL=0",
                "-brief",
            ],
            &[],
        )
        .await
    };
    let portal = Portal::start(&pki.yaml("tcp", &backend.addr.to_string(), "")).await;
    let port = portal.addr.port();
    for old in ["-tls1", "-tls1_1"] {
        let (ok, out, err) = s_client(port, old).await;
        assert!(!ok, "{old} accepted: {out} {err}");
        assert!(
            err.contains("alert") || err.contains("error"),
            "{old}: {err}"
        );
    }
    let (ok, _, err) = s_client(port, "-tls1_2").await;
    assert!(ok && err.contains("TLSv1.2"), "{err}");
    let (ok, _, err) = s_client(port, "-tls1_3").await;
    assert!(ok && err.contains("TLSv1.3"), "{err}");
    portal.stop().await;

    let portal =
        Portal::start(&pki.yaml("tcp", &backend.addr.to_string(), "  minVersion: \"1.3\"\n")).await;
    let port = portal.addr.port();
    let (ok, _, err) = s_client(port, "-tls1_2").await;
    assert!(!ok, "TLS 1.2 accepted with minVersion 1.3: {err}");
    let (ok, _, err) = s_client(port, "-tls1_3").await;
    assert!(ok && err.contains("TLSv1.3"), "{err}");
    portal.stop().await;
}

/// A PostgreSQL StartupMessage for `user` on database `postgres`.
fn pg_startup(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    msg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_verify_full_direct_tls_and_plaintext_refusal() {
    if skip_without(&["psql", &format!("{}/postgres", common::PG_BIN)]) {
        return;
    }
    let pg = tokio::task::spawn_blocking(|| common::Postgres::primary("s3cret"))
        .await
        .unwrap();
    let pki = Pki::new("tls-pg");
    let portal = Portal::start(&pki.yaml("postgres", &pg.address(), "")).await;
    let port = portal.addr.port();
    let conninfo = |mode: &str| {
        format!(
            "host=localhost hostaddr=127.0.0.1 sslmode={mode} sslrootcert={} connect_timeout=10",
            pki.ca_file.display()
        )
    };
    let (ok, out, err) = psql(port, "postgres", "s3cret")
        .conninfo(&conninfo("verify-full"))
        .run(&["-XAtq", "-c", "SELECT 40 + 2"])
        .await;
    assert!(ok && out == "42", "{out} {err}");
    let (ok, out, err) = psql(port, "postgres", "s3cret")
        .conninfo(&conninfo("verify-full"))
        .run(&["-Xq", "-c", "\\conninfo"])
        .await;
    assert!(ok && out.contains("SSL connection"), "{out} {err}");

    // A plaintext client is told why it is refused.
    let (ok, out, err) = psql(port, "postgres", "s3cret")
        .conninfo(&conninfo("disable"))
        .run(&["-XAtq", "-c", "SELECT 1"])
        .await;
    assert!(!ok, "{out}");
    assert!(err.contains("requires TLS"), "{err}");

    // PostgreSQL 17 direct TLS: ALPN "postgresql", the startup straight inside TLS; the
    // server answers with its SCRAM authentication request.
    let mut tls = tls_connect(portal.addr, pki.client_config(&[b"postgresql"]))
        .await
        .unwrap();
    tls.write_all(&pg_startup("postgres")).await.unwrap();
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R', "{head:?}");
    assert_eq!(u32::from_be_bytes([head[5], head[6], head[7], head[8]]), 10);
    // Direct TLS without ALPN is refused.
    let refused = async {
        let mut tls = tls_connect(portal.addr, pki.client_config(&[])).await?;
        tls.write_all(&pg_startup("postgres")).await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await
    }
    .await;
    assert!(refused.is_err());
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mariadb_client_through_a_mysql_portal() {
    if skip_without(&["mariadb", "mariadbd", "mariadb-install-db"]) {
        return;
    }
    let db = tokio::task::spawn_blocking(|| common::Mariadb::start("app", "pw"))
        .await
        .unwrap();
    let pki = Pki::new("tls-mysql");
    let portal = Portal::start(&pki.yaml("mysql", &db.address(), "")).await;
    let port = portal.addr.port().to_string();
    let ca = format!("--ssl-ca={}", pki.ca_file.display());
    let base = [
        "--no-defaults",
        "--protocol=TCP",
        "-h",
        "127.0.0.1",
        "-P",
        &port,
        "-u",
        "app",
        "-ppw",
        "--connect-timeout=10",
    ];
    let sql = |extra: &[&str], sql: &str| {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-N".into(), "-B".into(), "-e".into(), sql.to_string()]);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run("mariadb", &args, &[]).await
        }
    };
    let verified = ["--ssl", &ca, "--ssl-verify-server-cert"];
    let (ok, out, err) = sql(&verified, "SELECT 40 + 2").await;
    assert!(ok && out == "42", "{out} {err}");
    let (ok, out, err) = sql(&verified, "status").await;
    assert!(ok && out.contains("Cipher in use"), "{out} {err}");

    // A client that does not ask for TLS gets an ERR packet saying why.
    let (ok, out, err) = sql(&["--skip-ssl"], "SELECT 1").await;
    assert!(!ok, "{out}");
    assert!(err.contains("requires TLS"), "{err}");

    // Truncated MySQL packets close that client only.
    let mut bad = Vec::new();
    for bytes in [
        &[32u8, 0, 0, 1, 0x85, 0xae][..],
        &[0xff, 0xff, 0xff, 1, 0, 0][..],
    ] {
        let mut s = TcpStream::connect(portal.addr).await.unwrap();
        let mut greeting = [0u8; 4];
        s.read_exact(&mut greeting).await.unwrap();
        s.write_all(bytes).await.unwrap();
        bad.push(s);
    }
    let (ok, out, err) = sql(&verified, "SELECT 7").await;
    assert!(ok && out == "7", "{out} {err}");
    // The absurd length is refused at once; the cut SSLRequest when its sender gives up.
    let mut closed = 0;
    for mut s in bad {
        s.shutdown().await.ok();
        if common::closed_within(&mut s, Duration::from_secs(12)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 2);
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_postgres_negotiations_close_only_that_client() {
    let backend = TestServer::echo().await;
    let pki = Pki::new("tls-malformed");
    let portal = Portal::start(&pki.yaml("postgres", &backend.addr.to_string(), "")).await;
    let ssl_request = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let cases: Vec<Vec<u8>> = vec![
        ssl_request[..5].to_vec(), // truncated SSLRequest, then silence
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), // not PostgreSQL at all
        [&ssl_request[..], b"this is not a ClientHello"].concat(), // garbage after 'S'
        vec![0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00], // a cut direct-TLS ClientHello
    ];
    let mut bad = Vec::new();
    for bytes in &cases {
        let mut s = TcpStream::connect(portal.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        bad.push(s);
    }
    // A good client meanwhile: SSLRequest, TLS, bytes echoed by the backend.
    let mut good = TcpStream::connect(portal.addr).await.unwrap();
    good.write_all(&ssl_request).await.unwrap();
    let mut s = [0u8; 1];
    good.read_exact(&mut s).await.unwrap();
    assert_eq!(&s, b"S");
    let mut tls = tokio_rustls::TlsConnector::from(pki.client_config(&[]))
        .connect(ServerName::try_from("localhost").unwrap(), good)
        .await
        .unwrap();
    tls.write_all(b"hello through TLS").await.unwrap();
    let mut echoed = [0u8; 17];
    tls.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello through TLS");

    // Each bad client is closed (the silent one by the handshake deadline).
    let started = Instant::now();
    for (i, mut s) in bad.into_iter().enumerate() {
        assert!(
            common::closed_within(&mut s, Duration::from_secs(12)).await,
            "bad client {i} still open"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(12));
    // The good session still works.
    tls.write_all(b"still here").await.unwrap();
    let mut echoed = [0u8; 10];
    tls.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"still here");
    let metrics = portal.metrics().await;
    assert!(
        metric(
            &metrics,
            "dbportal_tls_negotiation_failures_total{reason=\"handshake_timeout\"}"
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
    portal.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_load() {
    if skip_without(&["redis-server"]) {
        return;
    }
    let redis = RedisServer::start().await;
    let pki = Pki::new("tls-rotate");
    let portal = PortalBuilder::new(&pki.yaml("redis", &redis.addr.to_string(), ""))
        .file(&pki.dir.path().join("portal.yaml"))
        .spawn();
    let addr = portal.addr;
    let client = pki.client_config(&[]);
    assert!(served_cn(addr, client.clone()).await.contains("portal-1"));

    // Load: long-lived sessions pinging, and new sessions opening, all through rotations.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let pings = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let mut tls = tls_connect(addr, client.clone()).await.unwrap();
        let (stop, errors, pings) = (stop.clone(), errors.clone(), pings.clone());
        load.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match redis_ping(&mut tls).await {
                    Ok(()) => pings.fetch_add(1, Ordering::Relaxed),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    {
        let (stop, errors, client) = (stop.clone(), errors.clone(), client.clone());
        load.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let ok = match tls_connect(addr, client.clone()).await {
                    Ok(mut tls) => redis_ping(&mut tls).await.is_ok(),
                    Err(_) => false,
                };
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    for n in 2..=4 {
        let cn = format!("portal-{n}");
        pki.leaf(&cn).replace(&pki.cert, &pki.key);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if served_cn(addr, client.clone()).await.contains(&cn) {
                break;
            }
            assert!(Instant::now() < deadline, "{cn} not served within 10s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A broken replacement (the key of another certificate) is refused; portal-4 stays.
    let other = pki.leaf("portal-5");
    std::fs::write(&pki.cert, &other.cert_pem).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !portal.log_contains("reload refused") {
        assert!(Instant::now() < deadline, "no refusal logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served_cn(addr, client.clone()).await.contains("portal-4"));
    let status: serde_json::Value =
        serde_json::from_str(&common::http_get(portal.admin, "/status").await.1).unwrap();
    assert_eq!(
        status["tls"]["certificate"]["lastRefusal"]["reason"], "key_mismatch",
        "{status}"
    );
    let metrics = common::http_get(portal.admin, "/metrics").await.1;
    assert_eq!(metric(&metrics, "dbportal_tls_reload_refused"), Some(1.0));

    let before = pings.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "sessions dropped or refused"
    );
    assert!(
        pings.load(Ordering::Relaxed) > before,
        "open sessions stalled"
    );
    portal.proc.signal("TERM");
}
